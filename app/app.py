"""Lung lesion MAP: every lung cancer lesion in a chest CT study, as DICOM SEG, lesions.json, DICOM SR and a
visual report (PDF, Encapsulated PDF, PNG)."""

import os
from collections.abc import Sequence
from pathlib import Path

from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application

from operators.cascade_fp import CascadeFPOperator
from operators.lesion_segmentation import LesionSegmentationOperator
from operators.report_writer import REPORT_OUTPUTS, LesionReportOperator, output_switches
from operators.seg_writer import LesionSegWriterOperator
from operators.series_selection import ChestCTSeriesSelectorOperator, CTVolumeOperator, RobustDICOMDataLoaderOperator
from operators.thorax_crop import ThoraxCropOperator

VERSION = "0.1.0"
# The MAP's manifest (HOLOSCAN_CONFIG_PATH in a MAP); its `outputs` section switches the outputs.
CONFIG = Path(os.environ.get("HOLOSCAN_CONFIG_PATH", Path(__file__).resolve().parents[1] / "app.yaml"))


class LungLesionApp(Application):
    """DICOM study in; one DICOM SEG segment per lesion, lesions.json and the reports out.

    `output_flags`: command-line output switches (operators.report_writer), applied over app.yaml's;
    `output_folder`: where the outputs go instead of the SDK's output path (the staging folder of app/__main__.py).
    """

    def __init__(self, *args, output_flags: Sequence[str] = (), output_folder: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output_folder = output_folder
        config = {}
        if CONFIG.is_file():
            self.config(str(CONFIG))
            config = self.kwargs("outputs")
        self.outputs = output_switches(config, output_flags)

    def compose(self):
        app_context = Application.init_app_context(self.argv)
        output = Path(self.output_folder or app_context.output_path)

        loader = RobustDICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=Path(app_context.input_path),
                                               name="dicom_loader")
        selector = ChestCTSeriesSelectorOperator(self, name="series_selector")
        to_volume = CTVolumeOperator(self, name="series_to_volume")
        thorax = ThoraxCropOperator(self, name="thorax_crop")
        segmentation = LesionSegmentationOperator(self, app_context=app_context, model_name="lesion_seg",
                                                  name="lesion_segmentation")
        cascade = CascadeFPOperator(self, app_context=app_context, model_name="cascade_fp", name="cascade_fp")
        writer = LesionSegWriterOperator(self, output_folder=output, seg=self.outputs["seg"],
                                         lesions_json=self.outputs["json"], algorithm_name="lesion_seg",
                                         algorithm_version=VERSION, name="seg_writer")
        report = LesionReportOperator(self, output_folder=output,
                                      **{name: self.outputs[name] for name in REPORT_OUTPUTS},
                                      algorithm_name="lesion_seg", algorithm_version=VERSION, name="report_writer")

        self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
        self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
        self.add_flow(to_volume, thorax, {("volume", "volume")})
        self.add_flow(thorax, segmentation, {("volume", "volume"), ("thorax", "thorax")})
        self.add_flow(segmentation, cascade, {("volume", "volume"), ("thorax", "thorax"), ("candidates", "candidates")})
        self.add_flow(cascade, writer, {(port, port) for port in
                                        ("source_datasets", "hu", "spacing", "instance_labels", "scores")})
        self.add_flow(thorax, writer, {("thorax", "thorax")})
        self.add_flow(cascade, report, {(port, port) for port in ("source_datasets", "hu", "instance_labels")})
        self.add_flow(writer, report, {("document", "document")})
