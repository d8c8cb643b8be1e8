"""Property-based fuzzing (hypothesis) of the header reading path: whatever a file or a header element holds,
the input stage either reads the study or refuses it with a one-line StudyError listed in the README, and the
writers' source headers build; nothing else may escape (an app exit status 1).

The suite runs 150 examples per test; LUNG_MAP_FUZZ_EXAMPLES sets another count (README: the 1,000-example run)."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from operators.seg_writer import build_lesion_seg
from operators.series_selection import read_instance, read_study
from operators.volume import StudyError
from tests.exit_status import assert_documented_refusal
from tests.test_seg_writer import SPHERE, make_series

SERIES = make_series([SPHERE], shape=(12, 16, 16), pixel_mm=(2.0, 2.0), table_step_mm=3.0)
FUZZ = settings(max_examples=int(os.environ.get("LUNG_MAP_FUZZ_EXAMPLES", 150)), deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
# Header elements the loader, the series choice, the volume and the writers read.
KEYWORDS = ["ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "SliceThickness", "SpacingBetweenSlices",
            "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
            "PhotometricInterpretation", "RescaleSlope", "RescaleIntercept", "RescaleType", "Modality", "ImageType",
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID",
            "SeriesNumber", "InstanceNumber", "AcquisitionNumber", "NumberOfFrames", "SpecificCharacterSet",
            "PatientName", "PatientID", "StudyDate", "ConvolutionKernel", "GantryDetectorTilt",
            "PatientIdentityRemoved", "LossyImageCompression", "PixelPaddingValue"]
TEXT = st.one_of(
    st.binary(max_size=24),
    st.sampled_from([b"", b" ", b"0", b"-0", b"1e308", b"nan", b"inf", b"-1", b"abc", b"1\\0\\0\\0\\1\\0",
                     b"0\\0\\0\\0\\0\\0", b"1\\0\\0\\0\\0\\1", b"0.5\\0.5", b"ISO_IR 100", b"ISO 2022 IR 87",
                     b"\xff\xfe\x00\x01", b"YES", b"01", "Ž".encode() * 30]),
)


def _edit_header(keyword: str, value: bytes):
    """An edit that puts `value` (raw bytes, unchecked) into the element `keyword`."""
    tag = Tag(tag_for_keyword(keyword))
    vr = dictionary_VR(tag).split(" or ")[0]
    data = value + b" " * (len(value) % 2)

    def edit(ds):
        ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)
    return edit


@FUZZ
@given(keyword=st.sampled_from(KEYWORDS), value=TEXT, which=st.sampled_from(["all", "one"]))
def test_any_header_value_is_read_or_refused(keyword, value, which):
    edit = _edit_header(keyword, value)
    with tempfile.TemporaryDirectory() as folder:
        for index, source in enumerate(SERIES.datasets):
            ds = copy.deepcopy(source)
            if which == "all" or index == 5:
                edit(ds)
            try:
                ds.save_as(Path(folder) / f"s{index:02d}.dcm", enforce_file_format=True)
            except Exception:  # noqa: BLE001 (a value pydicom itself cannot write is no input case)
                return
        try:
            volume = read_study(Path(folder))
        except StudyError as error:
            assert "\n" not in str(error)
            assert_documented_refusal(str(error))
            return
    labels = np.zeros(volume.hu.shape, np.int32)
    labels[5, 4:8, 4:8] = 1
    record = {"segment_number": 1, "label": "Lesion 1", "tracking_id": "Lesion 1",
              "tracking_uid": pydicom.uid.generate_uid()}
    build_lesion_seg(volume.source_datasets, labels, [record], "lesion_seg", "0.1.0")


@FUZZ
@given(cut=st.integers(0, 4000), flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=8))
def test_any_damaged_file_is_read_or_skipped(cut, flips):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "slice.dcm"
        SERIES.datasets[0].save_as(path, enforce_file_format=True)
        data = bytearray(path.read_bytes())
        for position, byte in flips:
            data[position % len(data)] = byte
        path.write_bytes(bytes(data[: len(data) - cut % len(data)]))
        instance = read_instance(str(path))
    assert isinstance(instance, (pydicom.Dataset, str))
