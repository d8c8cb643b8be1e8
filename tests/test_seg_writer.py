"""Lesion SEG + lesions.json: validity (dciodvfy), exact read-back, measurements of known geometry.

Synthetic CT series carry ellipsoids placed in patient coordinates; the expected values come from
that geometry, not from the writer's own arithmetic.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from operators.seg_writer import LESIONS_FILE, SEG_FILE, LesionSegWriterOperator, write_lesion_outputs
from tests.dicom_validation import assert_dciodvfy_clean, assert_dcmqi_reads_exactly

REAL_DATA = Path(os.environ.get("LUNG_MAP_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/real"))
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class Lesion:
    """An ellipsoid: centre (mm) along the table, image columns and rows from the first voxel of the
    ascending series (a table offset that is a multiple of the slice step puts it on a slice);
    semi-axes (mm) along patient x, y, z."""

    centre_grid_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    hu: float


@dataclass(frozen=True)
class Series:
    """A synthetic CT series in ascending slice order with its geometry, labels and HU."""

    datasets: list[Dataset]
    labels: np.ndarray
    hu: np.ndarray
    spacing: tuple[float, float, float]
    centres_mm: np.ndarray  # LPS centre of each lesion


def make_series(lesions: list[Lesion], *, shape=(24, 64, 64), pixel_mm=(0.8, 0.8), table_step_mm=2.0, tilt_deg=0.0,
                orientation=None, signed=True, drop: tuple[str, ...] = (), incomplete_study_reference=False) -> Series:
    """One CT Image Storage dataset per slice; pixel_mm is (between rows, between columns) like
    PixelSpacing; a gantry tilt turns the image plane about patient x, the slices still stepping along
    the table (patient z). `orientation` (row and column direction) stacks the slices along its normal
    instead, table_step_mm apart; a lesion's table offset is then along that normal."""
    nz, ny, nx = shape
    dy, dx = pixel_mm
    tilt = math.radians(tilt_deg)
    row_dir, col_dir = np.array([1.0, 0, 0]), np.array([0, math.cos(tilt), math.sin(tilt)])
    stack = np.array([0, 0, 1.0])
    if orientation is not None:
        row_dir, col_dir = (np.asarray(v, float) for v in orientation)
        stack = np.cross(row_dir, col_dir)
    origins = np.array([-20.0, -30.0, -100.0]) + np.outer(np.arange(nz) * table_step_mm, stack)
    k, i, j = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    points = origins[k] + (j * dx)[..., None] * row_dir + (i * dy)[..., None] * col_dir
    labels = np.zeros(shape, np.int32)
    hu = np.full(shape, -850.0, np.float32)
    centres = []
    for number, lesion in enumerate(lesions, 1):
        cz, cy, cx = lesion.centre_grid_mm
        centre = origins[0] + cz * stack + cx * row_dir + cy * col_dir
        inside = (((points - centre) / lesion.semi_axes_mm) ** 2).sum(axis=-1) <= 1
        labels[inside], hu[inside] = number, lesion.hu
        centres.append(centre)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    stored = hu.astype(np.int16) if signed else (hu + 1024).astype(np.uint16)
    datasets = []
    for z in range(nz):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Lesion", "SEGTEST", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer = "", "Synthetic"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, nz - z
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [*row_dir, *col_dir]
        ds.ImagePositionPatient = list(origins[z])
        ds.PixelSpacing = [dy, dx]
        ds.SliceThickness = table_step_mm
        ds.GantryDetectorTilt = tilt_deg
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
        ds.RescaleIntercept, ds.RescaleSlope = (0, 1) if signed else (-1024, 1)
        ds.PixelData = stored[z].tobytes()
        if incomplete_study_reference:  # as in de-identified archives: the item lacks its SOP Class UID
            ds.ReferencedStudySequence = [Dataset()]
            ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID = generate_uid()
        for keyword in drop:
            delattr(ds, keyword)
        datasets.append(ds)
    spacing = (table_step_mm * math.cos(tilt), dy, dx)
    return Series(datasets, labels, hu, spacing, np.array(centres))


SPHERE = Lesion((12, 16, 17.6), (7, 7, 7), 35.0)
ELLIPSOID = Lesion((30, 33.6, 30.8), (10, 5, 4), -20.0)
SMALL = Lesion((36, 9.6, 40), (2, 2, 2), 60.0)
VARIANTS = {  # (make_series arguments, source order); slice steps divide the lesions' table offsets
    "ascending_signed": (dict(), "ascending"),
    "descending_unsigned": (dict(signed=False, pixel_mm=(0.7, 0.75), table_step_mm=1.5, shape=(32, 72, 72)),
                            "descending"),
    "shuffled": (dict(table_step_mm=3.0, shape=(17, 64, 64)), "shuffled"),
    "missing_attributes": (dict(drop=("PatientName", "StudyID", "AccessionNumber", "PatientBirthDate",
                                      "PatientSex", "ReferringPhysicianName", "StudyTime")), "ascending"),
    "incomplete_study_reference": (dict(incomplete_study_reference=True), "ascending"),
}


def _permutation(order: str, n: int) -> np.ndarray:
    return {"ascending": np.arange(n), "descending": np.arange(n)[::-1],
            "shuffled": np.random.default_rng(0).permutation(n)}[order]


def _check_seg(seg_path: Path, datasets: list[Dataset], labels: np.ndarray, document: dict) -> None:
    """Valid SEG, same patient/study/frame of reference, frames on the right source slices, exact masks."""
    assert_dciodvfy_clean(seg_path)
    seg = hd.seg.segread(seg_path)
    source = datasets[0]
    assert seg.SOPClassUID == SEG_SOP_CLASS and seg.SegmentationType == "BINARY"
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert seg.get(keyword) == source.get(keyword)
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert (seg.SeriesInstanceUID, seg.SOPInstanceUID) == (document["seg"]["series_instance_uid"],
                                                          document["seg"]["sop_instance_uid"])
    by_uid = {ds.SOPInstanceUID: ds for ds in datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        referenced = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(frame.PlanePositionSequence[0].ImagePositionPatient,
                           by_uid[referenced].ImagePositionPatient)
    assert_untilted_grid(seg)
    assert_dcmqi_reads_exactly(seg_path, datasets, labels)
    records = document["lesions"]
    numbers = [r["segment_number"] for r in records]
    assert list(seg.get_segment_numbers()) == numbers
    pixels = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in datasets], segment_numbers=numbers,
                                               assert_missing_frames_are_empty=True)
    for channel, record in enumerate(records):
        number = record["segment_number"]
        assert np.array_equal(pixels[..., channel], labels == number), f"segment {number} differs"
        description = seg.get_segment_description(number)
        assert description.segment_label == f"Lesion {number}"
        assert (description.tracking_id, description.tracking_uid) == (record["tracking_id"], record["tracking_uid"])
        assert description.segmented_property_type.value == "108369006"  # SCT Neoplasm
        assert description.algorithm_identification[0].AlgorithmName == "lesion_seg"


def assert_untilted_grid(seg: Dataset) -> None:
    """What dcmqi relies on to place frames: every frame on the normal through the first frame's position, at a
    whole number of SpacingBetweenSlices (the shared Pixel Measures) from it."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    cosines = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float)
    normal = np.cross(cosines[:3], cosines[3:])
    step = float(shared.PixelMeasuresSequence[0].SpacingBetweenSlices)
    frames = seg.PerFrameFunctionalGroupsSequence
    positions = np.array([f.PlanePositionSequence[0].ImagePositionPatient for f in frames], float)
    from_first = positions - positions[0]
    along = from_first @ normal
    assert np.abs(from_first - np.outer(along, normal)).max() < 0.05
    assert np.abs(along / step - np.round(along / step)).max() < 0.01


@pytest.mark.parametrize("variant", VARIANTS)
def test_seg_and_measurements_of_known_geometry(tmp_path, variant):
    kwargs, order = VARIANTS[variant]
    lesions = [SPHERE, ELLIPSOID, SMALL]
    series = make_series(lesions, **kwargs)
    perm = _permutation(order, len(series.datasets))
    datasets = [series.datasets[k] for k in perm]
    labels, hu = series.labels[perm], series.hu[perm]
    scores = [0.9, 0.75, 0.6]

    records = write_lesion_outputs(datasets, labels, scores, hu, series.spacing, tmp_path)["lesions"]

    assert sorted(p.name for p in tmp_path.iterdir()) == [LESIONS_FILE, SEG_FILE], "only final files remain"
    document = json.loads((tmp_path / LESIONS_FILE).read_text())
    assert document["lesions"] == records
    assert document["study_instance_uid"] == datasets[0].StudyInstanceUID
    assert document["series_instance_uid"] == datasets[0].SeriesInstanceUID
    assert "Test^Lesion" not in (tmp_path / LESIONS_FILE).read_text(), "no patient name in lesions.json"
    _check_seg(tmp_path / SEG_FILE, datasets, labels, document)

    voxel_mm = max(series.spacing)
    in_plane_voxel_mm = math.hypot(*series.spacing[1:])
    voxel_ml = float(np.prod(series.spacing)) / 1000
    ascending_uids = [ds.SOPInstanceUID for ds in series.datasets]
    for lesion, centre, record, score in zip(lesions, series.centres_mm, records, scores):
        a, b, c = lesion.semi_axes_mm
        assert np.linalg.norm(np.array(record["centroid_mm"]) - centre) <= voxel_mm / 2
        assert record["volume_ml"] == pytest.approx(record["voxel_count"] * voxel_ml, abs=1e-4)
        if min(a, b, c) >= 4:  # the smallest lesion is too coarse for an analytic volume
            assert record["volume_ml"] == pytest.approx(4 / 3 * math.pi * a * b * c / 1000, rel=0.1)
        assert abs(record["long_axis_mm"] - 2 * max(a, b)) <= in_plane_voxel_mm
        assert abs(record["short_axis_mm"] - 2 * min(a, b)) <= in_plane_voxel_mm
        centre_slice = lesion.centre_grid_mm[0] / kwargs.get("table_step_mm", 2.0)
        assert abs(ascending_uids.index(record["axial_slice_sop_instance_uid"]) - centre_slice) <= 1
        assert datasets[record["axial_slice_index"]].SOPInstanceUID == record["axial_slice_sop_instance_uid"]
        assert record["mean_hu"] == pytest.approx(lesion.hu)
        assert record["score"] == pytest.approx(score)


def test_tilted_series_gets_no_seg(tmp_path):
    """dcmqi places SEG frames on a grid stacked along the normal; a tilted series is refused by the series
    selector, and the writer refuses it too rather than write a SEG that dcmqi misreads."""
    series = make_series([SPHERE], shape=(12, 48, 48), tilt_deg=5.0)
    with pytest.raises(ValueError, match="gantry tilt"):
        write_lesion_outputs(series.datasets, series.labels, [0.9], series.hu, series.spacing, tmp_path)
    assert not (tmp_path / SEG_FILE).exists()


def test_no_lesions_writes_empty_list_and_no_seg(tmp_path):
    series = make_series([SPHERE], shape=(12, 48, 48))
    write_lesion_outputs(series.datasets, series.labels, [0.9], series.hu, series.spacing, tmp_path)
    assert (tmp_path / SEG_FILE).exists()

    empty = np.zeros_like(series.labels)
    assert write_lesion_outputs(series.datasets, empty, [], series.hu, series.spacing, tmp_path)["lesions"] == []

    document = json.loads((tmp_path / LESIONS_FILE).read_text())
    assert document["lesions"] == [] and document["seg"] is None
    assert [p.name for p in tmp_path.iterdir()] == [LESIONS_FILE], "the earlier SEG is gone, nothing partial"


def test_inconsistent_inputs_write_nothing(tmp_path):
    series = make_series([SPHERE, ELLIPSOID], shape=(20, 64, 64))
    with pytest.raises(ValueError, match="scores"):
        write_lesion_outputs(series.datasets, series.labels, [0.9], series.hu, series.spacing, tmp_path / "out")
    with pytest.raises(ValueError, match="slices"):
        write_lesion_outputs(series.datasets[1:], series.labels, [0.9, 0.8], series.hu, series.spacing, tmp_path)
    assert not any(tmp_path.rglob("*.*"))


def test_real_case_radiomics_lung1(tmp_path):
    case = REAL_DATA / "radiomics_lung1"
    if not case.is_dir():
        pytest.skip(f"real test case not found at {case} (set LUNG_MAP_REAL_DATA to the shared real data folder)")
    truth = json.loads((case / "truth.json").read_text())
    npz = np.load(case / "truth.npz")
    datasets = [pydicom.dcmread(p) for p in sorted((case / "dicom").glob("*.dcm"))]
    normal = np.cross(*np.reshape(datasets[0].ImageOrientationPatient, (2, 3)).astype(float))
    datasets.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, normal)))
    truth_row = {uid: k for k, uid in enumerate(npz["sop_uids"])}
    labels = npz["label"][[truth_row[ds.SOPInstanceUID] for ds in datasets]].astype(np.int32)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    spacing = (float(truth["spacing_mm"][0]), *map(float, datasets[0].PixelSpacing))

    records = write_lesion_outputs(datasets, labels, [0.8] * int(labels.max()), hu.astype(np.float32), spacing,
                                   tmp_path)["lesions"]

    _check_seg(tmp_path / SEG_FILE, datasets, labels, json.loads((tmp_path / LESIONS_FILE).read_text()))
    assert len(records) == len(truth["lesions"])
    for record, lesion in zip(records, truth["lesions"]):
        assert np.linalg.norm(np.subtract(record["centroid_mm"], lesion["centre_mm"])) <= spacing[0] / 2
        assert record["volume_ml"] == pytest.approx(lesion["volume_ml"], rel=0.02)
        assert abs(record["long_axis_mm"] - lesion["diameter_mm"]) <= math.hypot(*spacing[1:])


def test_operator_writes_outputs_in_an_application(tmp_path):
    from holoscan.conditions import CountCondition
    from monai.deploy.core import Application, Operator

    from operators.thorax_crop import ThoraxCrop

    series = make_series([SPHERE], shape=(12, 48, 48))
    whole = tuple(slice(0, n) for n in series.hu.shape)
    inputs = {"source_datasets": series.datasets, "hu": series.hu, "spacing": series.spacing,
              "instance_labels": series.labels, "scores": [0.7],
              "thorax": ThoraxCrop(whole, np.ones(series.hu.shape, bool), series.labels == 0, 1.0)}

    class Feed(Operator):
        def setup(self, spec):
            for name in inputs:
                spec.output(name)

        def compute(self, op_input, op_output, context):
            for name, value in inputs.items():
                op_output.emit(value, name)

    class App(Application):
        def compose(self):
            feed = Feed(self, CountCondition(self, 1), name="feed")
            writer = LesionSegWriterOperator(self, output_folder=tmp_path, name="seg_writer")
            self.add_flow(feed, writer, {(name, name) for name in inputs})

    App().run()
    document = json.loads((tmp_path / LESIONS_FILE).read_text())
    assert [r["segment_number"] for r in document["lesions"]] == [1] and (tmp_path / SEG_FILE).exists()
