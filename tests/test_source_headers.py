"""Source headers with empty, odd or conditional elements: every writer (SEG, SR, Encapsulated PDF) still
writes, each output passes dciodvfy, and the conditions the source triggers hold in every output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from operators.report_writer import PDF_DICOM_FILE, write_reports
from operators.seg_writer import SEG_FILE, UNSTATED_DEIDENTIFICATION, write_lesion_outputs
from operators.sr_report import SR_FILE
from tests.conftest import real_train_case
from tests.dicom_validation import assert_dciodvfy_clean, assert_dcmqi_reads_exactly
from tests.test_seg_writer import SPHERE, make_series

DICOM_OUTPUTS = (SEG_FILE, SR_FILE, PDF_DICOM_FILE)


def _raw(keyword_tag: int, vr: str, value: bytes):
    """An element as read from a file, its value not yet checked (as pydicom leaves odd numbers)."""
    return RawDataElement(Tag(keyword_tag), vr, len(value), value, 0, True, True)


def _method_code(ds: Dataset) -> None:
    ds.PatientIdentityRemoved = "YES"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "113100", "DCM"
    item.CodeMeaning = "Basic Application Confidentiality Profile"
    ds.DeidentificationMethodCodeSequence = [item]


EDITS = {  # header edit of every source slice -> what the outputs must then say
    "empty SpacingBetweenSlices": lambda ds: setattr(ds, "SpacingBetweenSlices", None),
    "odd SpacingBetweenSlices": lambda ds: ds.__setitem__(0x00180088, _raw(0x00180088, "DS", b"n/a ")),
    "empty SliceThickness": lambda ds: setattr(ds, "SliceThickness", None),
    "no SliceThickness": lambda ds: delattr(ds, "SliceThickness"),
    "empty LossyImageCompression": lambda ds: setattr(ds, "LossyImageCompression", ""),
    "empty PixelAspectRatio and RescaleType": lambda ds: ds.update({"PixelAspectRatio": None, "RescaleType": ""}),
    "identity removed, no method": lambda ds: setattr(ds, "PatientIdentityRemoved", "YES"),
    "identity removed, empty method": lambda ds: ds.update({"PatientIdentityRemoved": "YES",
                                                            "DeidentificationMethod": ""}),
    "identity removed, method code": _method_code,
}


def _write_all(datasets, labels, hu, spacing, out: Path) -> None:
    document = write_lesion_outputs(datasets, labels, [0.9] * int(labels.max()), hu, spacing, out)
    write_reports(datasets, hu, labels, document, out, png=False)
    for name in DICOM_OUTPUTS:
        assert_dciodvfy_clean(out / name)


@pytest.fixture(scope="module")
def small_series():
    return make_series([SPHERE], shape=(12, 48, 48))


@pytest.mark.parametrize("edit", EDITS)
def test_every_writer_takes_odd_source_headers(edit, small_series, tmp_path):
    datasets = []
    for source in small_series.datasets:
        ds = pydicom.dcmread(_saved(source, tmp_path))
        EDITS[edit](ds)
        datasets.append(ds)

    _write_all(datasets, small_series.labels, small_series.hu, small_series.spacing, tmp_path / "out")

    if "identity removed" in edit:
        for name in DICOM_OUTPUTS:
            output = pydicom.dcmread(tmp_path / "out" / name)
            assert output.PatientIdentityRemoved == "YES"
            assert output.get("DeidentificationMethod") or output.get("DeidentificationMethodCodeSequence")
            if "no method" in edit or "empty method" in edit:
                assert output.DeidentificationMethod == UNSTATED_DEIDENTIFICATION


def _saved(ds: Dataset, folder: Path) -> Path:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_real_train_headers(tmp_path):
    """QIN LUNG CT headers: empty SpacingBetweenSlices (broke the SR) and LossyImageCompression (SEG error)."""
    folder = real_train_case("qin_lsc_0014") / "dicom"
    datasets = sorted((pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))[40:48]),
                      key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert datasets[0]["SpacingBetweenSlices"].is_empty and datasets[0]["LossyImageCompression"].is_empty
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    labels = np.zeros(hu.shape, np.int32)
    labels[2:6, 200:230, 200:230] = 1
    spacing = (3.0, *map(float, datasets[0].PixelSpacing))

    _write_all(datasets, labels, hu.astype(np.float32), spacing, tmp_path)

    assert pydicom.dcmread(tmp_path / SEG_FILE).LossyImageCompression == "00"
    assert_dcmqi_reads_exactly(tmp_path / SEG_FILE, datasets, labels)
