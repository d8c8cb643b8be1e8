"""Report outputs beside lesions.json, and the switches that turn every output on or off.

Files in the output folder (fixed names, never built from tag text), each behind a switch:
- `sr.dcm` (sr): DICOM Comprehensive 3D SR, TID 1500 (operators.sr_report); it references the
  SEG's segments, so with lesions but the SEG switched off it is not written (a warning says so);
- `report.pdf` and `report_pdf.dcm` (pdf): the visual report (operators.visual_report) and the
  same PDF as a DICOM Encapsulated PDF;
- `report_summary.png`, `report_lesion_<segment number>.png` (png): its pages as images.
An output that is switched off is not written, and an earlier run's file of that name is removed.

Switches (OUTPUTS, all on by default): app.yaml's `outputs` section, then the command line:
`--no-<output>` / `--<output>`, and `--no-report` for sr, pdf and png together.

Plain functions: `split_output_flags(argv)`, `output_switches(config, flags)`,
`write_reports(source_datasets, hu, instance_labels, document, out_dir, ...)`.

LesionReportOperator ports (inputs only): `source_datasets`, `hu`, `instance_labels` (as for the
SEG writer) and `document` (the lesions.json document from LesionSegWriterOperator).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_pdf import PdfPages
from pydicom import Dataset

from monai.deploy.core import Fragment, Operator, OperatorSpec

from operators.seg_writer import write_atomically
from operators.sr_report import SR_FILE, build_measurement_sr
from operators.visual_report import REPORT_TITLE, encapsulated_pdf, report_figures
from operators.volume import timed_compute

log = logging.getLogger(__name__)

OUTPUTS = ("json", "seg", "sr", "pdf", "png")
REPORT_OUTPUTS = ("sr", "pdf", "png")
PDF_FILE = "report.pdf"
PDF_DICOM_FILE = "report_pdf.dcm"
PNG_PREFIX = "report_"


def _flag_value(arg: str) -> tuple[tuple[str, ...], bool] | None:
    """The outputs an argument switches and to what, or None when it is no output flag."""
    if arg == "--no-report":
        return REPORT_OUTPUTS, False
    name = arg.removeprefix("--")
    if arg.startswith("--") and name in OUTPUTS:
        return (name,), True
    if arg.startswith("--no-") and name[3:] in OUTPUTS:
        return (name[3:],), False
    return None


def split_output_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the output flags, the other arguments) of a command line."""
    flags = [arg for arg in argv if _flag_value(arg)]
    return flags, [arg for arg in argv if not _flag_value(arg)]


def output_switches(config: Mapping[str, object] | None, flags: Sequence[str] = ()) -> dict[str, bool]:
    """Which outputs to write: all, then the app.yaml `outputs` section, then the flags in order."""
    switches = dict.fromkeys(OUTPUTS, True)
    for name, value in (config or {}).items():
        if name not in switches or not isinstance(value, bool):
            raise ValueError(f"app.yaml outputs: {name}: {value!r} (outputs are {', '.join(OUTPUTS)}; true or false)")
        switches[name] = value
    for flag in flags:
        names, value = _flag_value(flag)
        switches.update(dict.fromkeys(names, value))
    return switches


def _pdf_bytes(figures) -> bytes:
    buffer = io.BytesIO()
    with PdfPages(buffer, metadata={"Title": REPORT_TITLE, "Creator": "Lung lesion MAP"}) as pages:
        for _, figure in figures:
            pages.savefig(figure)
    return buffer.getvalue()


def write_reports(source_datasets: Sequence[Dataset], hu: np.ndarray, instance_labels: np.ndarray, document: dict,
                  out_dir: str | Path, *, sr: bool = True, pdf: bool = True, png: bool = True,
                  algorithm_name: str = "lesion_seg", algorithm_version: str = "0.1.0") -> list[Path]:
    """Write the switched-on report outputs (module docstring) into `out_dir`; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    sr_path = out_dir / SR_FILE
    if sr and document["lesions"] and document["seg"] is None:
        log.warning("SR not written: it references the lesions' SEG segments, and the SEG is switched off")
        sr = False
    if sr:
        report = build_measurement_sr(source_datasets, document, algorithm_name=algorithm_name,
                                      algorithm_version=algorithm_version)
        write_atomically(sr_path, lambda p: report.save_as(p, enforce_file_format=True))
        written.append(sr_path)
    else:
        sr_path.unlink(missing_ok=True)
    figures = report_figures(source_datasets, hu, instance_labels, document) if pdf or png else []
    for stale in out_dir.glob(f"{PNG_PREFIX}*.png"):
        stale.unlink()
    if png:
        for name, figure in figures:
            path = out_dir / f"{PNG_PREFIX}{name}.png"
            write_atomically(path, lambda p: figure.savefig(p, format="png", pil_kwargs={"compress_level": 1}))  # noqa: B023
            written.append(path)
    pdf_path, dicom_path = out_dir / PDF_FILE, out_dir / PDF_DICOM_FILE
    if pdf:
        content = _pdf_bytes(figures)
        wrapped = encapsulated_pdf(content, source_datasets[0], document)
        write_atomically(pdf_path, lambda p: p.write_bytes(content))
        write_atomically(dicom_path, lambda p: wrapped.save_as(p, enforce_file_format=True))
        written += [pdf_path, dicom_path]
    else:
        pdf_path.unlink(missing_ok=True)
        dicom_path.unlink(missing_ok=True)
    return written


class LesionReportOperator(Operator):
    """Writes the SR and the visual report into `output_folder` (ports and switches in the module docstring)."""

    def __init__(self, fragment: Fragment, *args, output_folder: str | Path, sr: bool = True, pdf: bool = True,
                 png: bool = True, algorithm_name: str = "lesion_seg", algorithm_version: str = "0.1.0",
                 **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.options = {"sr": sr, "pdf": pdf, "png": png, "algorithm_name": algorithm_name,
                        "algorithm_version": algorithm_version}
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for name in ("source_datasets", "hu", "instance_labels", "document"):
            spec.input(name)

    @timed_compute
    def compute(self, op_input, op_output, context) -> None:
        written = write_reports(op_input.receive("source_datasets"), op_input.receive("hu"),
                                op_input.receive("instance_labels"), op_input.receive("document"),
                                self.output_folder, **self.options)
        log.info("report outputs: %s", ", ".join(path.name for path in written) or "none")
