"""Measurements of known geometry, the TID 1500 SR, the visual report and its Encapsulated PDF, the output
switches, the time of all report outputs on a study of realistic size, and the reports on real archives' studies.

Reference values come from the objects' geometry (ellipsoids of known size and in-plane rotation),
not from the measuring code's own arithmetic.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from scipy import ndimage

from operators.measurements import instance_boxes, lesion_location, recist_burden
from operators.report_writer import PDF_DICOM_FILE, PDF_FILE, output_switches, split_output_flags, write_reports
from operators.seg_writer import LESIONS_FILE, SEG_FILE, lesion_records, write_lesion_outputs
from operators.sr_report import BURDEN_MEASUREMENTS, BURDEN_TRACKING_ID, LESION_MEASUREMENTS, SR_FILE, finding_site
from operators.thorax_crop import body_and_lung_masks
from operators.visual_report import DISCLAIMER
from tests.conftest import REPO, hu_volume, read_series, real_case
from tests.dicom_validation import assert_dciodvfy_clean
from tests.test_seg_writer import make_series

REPORT_BUDGET_S = 10.0


def ellipsoid(shape, spacing, centre_mm, semi_axes_mm, angle_deg=0.0) -> np.ndarray:
    """Voxels whose centres lie in an ellipsoid: semi-axes (a, b, c), a along the image rows' direction
    (+x) turned by `angle_deg` towards +y in the axial plane, c along the slices; centre in mm from voxel 0."""
    angle = math.radians(angle_deg)
    z, y, x = (np.arange(n) * s - c for n, s, c in zip(shape, spacing, centre_mm))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    u = x * math.cos(angle) + y * math.sin(angle)
    v = -x * math.sin(angle) + y * math.cos(angle)
    a, b, c = semi_axes_mm
    return (u / a) ** 2 + (v / b) ** 2 + (z / c) ** 2 <= 1


def ellipsoid_area(a, b, c) -> float:
    """Surface area (Knud Thomsen's approximation, within about 1 %)."""
    p = 1.6075
    return 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)


GEOMETRIES = {  # spacing (z, y, x) mm, semi-axes (a, b, c) mm, in-plane angle
    "sphere": ((2.0, 0.8, 0.8), (9.0, 9.0, 9.0), 0.0),
    "ellipsoid": ((1.5, 0.7, 0.7), (12.0, 6.0, 5.0), 0.0),
    "ellipsoid_turned_30": ((1.25, 0.75, 0.75), (12.0, 6.0, 5.0), 30.0),
    "ellipsoid_turned_115_anisotropic": ((2.0, 0.6, 0.9), (14.0, 5.0, 8.0), 115.0),
    "tall_ellipsoid": ((1.0, 0.8, 0.8), (6.0, 4.0, 15.0), 60.0),
}


@pytest.mark.parametrize("name", GEOMETRIES)
def test_measurements_of_known_geometry(name):
    spacing, (a, b, c), angle = GEOMETRIES[name]
    shape = (int(2 * c / spacing[0]) + 9, 64, 64)
    centre = ((shape[0] // 2) * spacing[0], 32.3 * spacing[1], 31.6 * spacing[2])  # the centre on a slice
    mask = ellipsoid(shape, spacing, centre, (a, b, c), angle)
    series = make_series([], shape=shape, pixel_mm=spacing[1:], table_step_mm=spacing[0])
    hu = np.where(mask, 30.0, -850.0).astype(np.float32)
    peak = tuple(np.argwhere(mask)[0])
    hu[peak] = 250.0

    record, = lesion_records(series.datasets, mask.astype(np.int32), [0.8], hu, spacing)

    voxel_mm, in_plane_mm = math.hypot(*spacing), math.hypot(*spacing[1:])
    errors = {"long_axis": record["long_axis_mm"] - 2 * a, "short_axis": record["short_axis_mm"] - 2 * b,
              "diameter_3d": record["longest_diameter_3d_mm"] - 2 * max(a, b, c)}
    assert abs(errors["long_axis"]) <= in_plane_mm and abs(errors["short_axis"]) <= in_plane_mm, errors
    assert abs(errors["diameter_3d"]) <= voxel_mm, errors
    # Volume within one voxel layer over the surface.
    volume_error_ml = record["volume_ml"] - 4 / 3 * math.pi * a * b * c / 1000
    assert abs(volume_error_ml) <= ellipsoid_area(a, b, c) * max(spacing) / 1000, volume_error_ml
    # The key slice cuts the ellipsoid where its section is within one voxel of the largest.
    height = record["axial_slice_index"] * spacing[0] - centre[0]
    assert 2 * a * (1 - math.sqrt(max(1 - (height / c) ** 2, 0))) <= in_plane_mm, height
    # The long axis end points lie on the outline of the ellipsoid's section through the key slice.
    ends = np.array(record["long_axis_endpoints_voxel"])[:, 1:] * spacing[1:]  # (y, x) mm
    scale = math.sqrt(max(1 - ((record["axial_slice_index"] * spacing[0] - centre[0]) / c) ** 2, 0))
    turn = np.radians(angle)
    t = np.linspace(0, 2 * np.pi, 3600)
    u, v = a * scale * np.cos(t), b * scale * np.sin(t)
    outline = np.stack([u * np.sin(turn) + v * np.cos(turn), u * np.cos(turn) - v * np.sin(turn)], 1) + centre[1:]
    gaps = [np.linalg.norm(outline - end, axis=1).min() for end in ends]
    assert max(gaps) <= in_plane_mm, gaps
    short = np.array(record["short_axis_endpoints_voxel"])[:, 1:] * spacing[1:]
    cosine = np.dot(short[1] - short[0], ends[1] - ends[0]) / record["short_axis_mm"] / record["long_axis_mm"]
    assert abs(cosine) <= 0.01  # perpendicular (end points are rounded to 0.01 voxel)
    values = hu[mask]
    assert (record["mean_hu"], record["sd_hu"], record["max_hu"]) == pytest.approx(
        (values.mean(), values.std(), 250.0), abs=0.05)
    assert record["location"] is None  # no lung mask given
    print(f"{name}: errors (mm) " + ", ".join(f"{k} {v:+.2f}" for k, v in errors.items())
          + f", volume {volume_error_ml * 1000:+.0f} mm3")


def _two_lungs(shape) -> np.ndarray:
    """Two box-shaped lungs: columns 4..27 (patient right, smaller x) and 36..59, rows 8..55."""
    lungs = np.zeros(shape, bool)
    lungs[:, 8:56, 4:28] = lungs[:, 8:56, 36:60] = True
    return lungs


def test_location_side_zone_hilum_mediastinum():
    shape, spacing = (30, 64, 64), (2.0, 1.0, 1.0)
    series = make_series([], shape=shape, pixel_mm=(1.0, 1.0), table_step_mm=2.0)
    lungs = _two_lungs(shape)
    lungs[:, 22:40, 17:28] = False  # the right hilum: the lung's medial surface is indented there
    labels = np.zeros(shape, np.int32)
    for number, (z, y, x) in enumerate([(25, 30, 10), (4, 30, 48), (15, 30, 32), (15, 30, 22)], 1):
        box = ellipsoid(shape, spacing, (2 * z, y, x), (3.0, 3.0, 3.0))
        labels[box] = number
        lungs[box] = False  # a lesion is not aerated
    hu = np.where(labels > 0, 30.0, -850.0).astype(np.float32)

    records = lesion_records(series.datasets, labels, [0.9] * 4, hu, spacing, lungs)

    texts = [r["location"]["text"] for r in records]
    assert texts == ["right lung, upper zone", "left lung, lower zone", "mediastinum", "right hilum"]
    # Patient x grows to the patient's left: the same lesion on the other side of the midline is left.
    assert lesion_location([30.0, 0, 0], 0.9, (0.0, 40.0, 0.0, 90.0))["text"] == "left lung, lower zone"
    assert lesion_location([10.0, 0, 80], 0.9, (0.0, 40.0, 0.0, 90.0))["text"] == "right lung, upper zone"
    # Against the chest wall (little lung contact, lateral) the lesion is still a lung lesion.
    assert lesion_location([1.0, 0, 45], 0.3, (0.0, 40.0, 0.0, 90.0))["region"] == "lung"


def test_instance_boxes_are_find_objects():
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 50, 60), np.int32)
    for number in (1, 2, 4):  # instance 3 absent
        z, y, x = rng.integers(5, 35, 3)
        labels[z:z + rng.integers(1, 5), y:y + rng.integers(1, 9), x:x + rng.integers(1, 9)] = number
    for count in (0, 4, 6):
        assert instance_boxes(labels, count) == ndimage.find_objects(labels, count)
    assert instance_boxes(np.zeros_like(labels), 2) == ndimage.find_objects(np.zeros_like(labels), 2) == [None, None]
    assert instance_boxes(np.zeros_like(labels)) == ndimage.find_objects(np.zeros_like(labels)) == []


def test_recist_burden_targets():
    def record(number, long, short, region="lung"):
        return {"segment_number": number, "volume_ml": 1.0, "long_axis_mm": long, "short_axis_mm": short,
                "location": {"region": region}}

    records = [record(1, 40, 30), record(2, 35, 20), record(3, 30, 25), record(4, 9.5, 9),  # lung; 4 too small
               record(5, 30, 18, "mediastinum"), record(6, 25, 16, "hilum"), record(7, 40, 14, "hilum"),  # 7: node < 15
               record(8, 20, 19, "mediastinum")]
    burden = recist_burden(records)

    assert [(t["segment_number"], t["organ"]) for t in burden["recist_targets"]] == [
        (1, "lung"), (2, "lung"), (8, "lymph node"), (5, "lymph node")]
    assert burden["recist_sum_mm"] == 40 + 35 + 19 + 18
    assert burden["lesion_count"] == 8 and burden["total_volume_ml"] == 8.0
    many = [record(k, 50 - k, 5, "lung" if k < 3 else "mediastinum") for k in range(1, 3)]
    assert len(recist_burden(many + [record(k, 20, 16 + k, "hilum") for k in range(3, 9)])["recist_targets"]) == 4


def _study(tmp_path: Path, **switches):
    """A small series with three lesions (both lungs, one mediastinal) and every output of the writers."""
    shape = (30, 64, 64)
    series = make_series([], shape=shape, pixel_mm=(1.0, 1.0), table_step_mm=2.0)
    spacing = series.spacing
    lungs = _two_lungs(shape)
    labels = np.zeros(shape, np.int32)
    for number, (centre, axes, angle) in enumerate([((50, 30, 14), (7, 4, 5), 30), ((10, 30, 48), (6, 6, 6), 0),
                                                    ((30, 30, 32), (4, 3, 8), 0)], 1):
        inside = ellipsoid(shape, spacing, centre, axes, angle)
        labels[inside] = number
        lungs[inside] = False
    hu = np.where(labels > 0, 30.0 + 5 * labels, -850.0).astype(np.float32)
    document = write_lesion_outputs(series.datasets, labels, [0.9, 0.7, 0.5], hu, spacing, tmp_path, lungs=lungs,
                                    seg=switches.pop("seg", True))
    written = write_reports(series.datasets, hu, labels, document, tmp_path, **switches)
    return series, labels, document, written


def _measurement_values(group, table) -> dict:
    """Record key -> value of one measurement group, found by concept name and derivation."""
    values = {}
    for key, (name, unit, derivation, _) in table.items():
        found = [m for m in group.get_measurements(name=name)
                 if (m.derivation is None if derivation is None else m.derivation == derivation)]
        assert len(found) == 1, key
        assert found[0].unit == unit
        values[key] = found[0].value
    return values


def test_sr_reads_back_to_lesions_json(tmp_path):
    series, _, document, written = _study(tmp_path)
    assert tmp_path / SR_FILE in written
    assert_dciodvfy_clean(tmp_path / SR_FILE)
    assert json.loads((tmp_path / LESIONS_FILE).read_text()) == document

    sr = hd.sr.srread(tmp_path / SR_FILE)
    source = series.datasets[0]
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber"):
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.SeriesInstanceUID not in (source.SeriesInstanceUID, document["seg"]["series_instance_uid"])
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    assert {ds.SOPInstanceUID for ds in series.datasets} | {document["seg"]["sop_instance_uid"]} <= evidence
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(document["lesions"]) == 3
    for group, record in zip(groups, document["lesions"]):
        assert (group.tracking_identifier, group.tracking_uid) == (record["tracking_id"], record["tracking_uid"])
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == document["seg"]["sop_instance_uid"]
        assert segment.referenced_segment_numbers == [record["segment_number"]]
        assert segment.source_series_for_segmentation.value == source.SeriesInstanceUID
        assert group.finding_type == codes.SCT.Neoplasm
        assert [site.value for site in group.finding_sites] == [finding_site(record["location"]).value]
        values = _measurement_values(group, LESION_MEASUREMENTS)
        assert values == {key: record[key] for key in LESION_MEASUREMENTS}
        long_axis, = group.get_measurements(name=codes.SCT.LongAxis)
        assert [image.referenced_sop_instance_uid for image in long_axis.referenced_images] == [
            record["axial_slice_sop_instance_uid"]]
    sites = [(s.value, s.laterality) for g in groups for s in g.finding_sites]
    assert sites[2] == (codes.SCT.Mediastinum, None)
    burden, = report.get_image_measurement_groups()
    assert burden.tracking_identifier == BURDEN_TRACKING_ID
    assert _measurement_values(burden, BURDEN_MEASUREMENTS) == {
        "lesion_count": 3, "total_volume_ml": document["burden"]["total_volume_ml"],
        "recist_sum_mm": document["burden"]["recist_sum_mm"]}
    # The key slices in the image library carry the source's frame of reference.
    frames = {item.UID for item in hd.sr.utils.find_content_items(
        report[0], name=codes.DCM.FrameOfReferenceUID, recursive=True)}
    assert frames == {source.FrameOfReferenceUID}


def test_visual_report_and_encapsulated_pdf(tmp_path):
    series, _, document, written = _study(tmp_path)
    names = sorted(p.name for p in written if p.suffix == ".png")
    assert names == ["report_lesion_1.png", "report_lesion_2.png", "report_lesion_3.png", "report_summary.png"]
    assert all((tmp_path / n).read_bytes().startswith(b"\x89PNG") for n in names)
    pdf = (tmp_path / PDF_FILE).read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") - pdf.count(b"/Type /Pages") == 4
    assert_dciodvfy_clean(tmp_path / PDF_DICOM_FILE)
    wrapped = pydicom.dcmread(tmp_path / PDF_DICOM_FILE)
    source = series.datasets[0]
    for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName", "StudyDate"):
        assert wrapped.get(keyword) == source.get(keyword), keyword
    assert wrapped.SOPClassUID == "1.2.840.10008.5.1.4.1.1.104.1" and wrapped.Modality == "DOC"
    assert wrapped.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert wrapped.EncapsulatedDocument[:wrapped.EncapsulatedDocumentLength] == pdf
    assert {item.ReferencedSOPInstanceUID for item in wrapped.SourceInstanceSequence} == {
        r["axial_slice_sop_instance_uid"] for r in document["lesions"]}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "nothing partial is left"
    assert "synthetic lesions" in DISCLAIMER and "not for clinical use" in DISCLAIMER


def test_no_lesions_report(tmp_path):
    series = make_series([], shape=(12, 48, 48))
    empty = np.zeros(series.hu.shape, np.int32)
    document = write_lesion_outputs(series.datasets, empty, [], series.hu, series.spacing, tmp_path)
    written = write_reports(series.datasets, series.hu, empty, document, tmp_path)
    assert sorted(p.name for p in written) == [PDF_FILE, PDF_DICOM_FILE, "report_summary.png", SR_FILE]
    for name in (SR_FILE, PDF_DICOM_FILE):
        assert_dciodvfy_clean(tmp_path / name)
    sr = hd.sr.srread(tmp_path / SR_FILE)
    assert sr.content.get_volumetric_roi_measurement_groups() == []


def test_switched_off_outputs_are_not_written(tmp_path):
    _study(tmp_path)  # an earlier run with every output
    _, _, document, written = _study(tmp_path, sr=False, pdf=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [LESIONS_FILE, SEG_FILE, *(p.name for p in written)])
    assert all(p.suffix == ".png" for p in written) and len(written) == 4

    _, _, document, written = _study(tmp_path, seg=False, png=False)  # the SR needs the SEG: neither is written
    assert document["seg"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [LESIONS_FILE, PDF_FILE, PDF_DICOM_FILE]


def test_output_switches_from_config_and_command_line():
    flags, rest = split_output_flags(["app", "-i", "in", "--no-report", "-o", "out", "--png", "--no-seg"])
    assert rest == ["app", "-i", "in", "-o", "out"]
    assert output_switches({"pdf": True, "json": False}, flags) == {
        "json": False, "seg": False, "sr": False, "pdf": False, "png": True}
    assert output_switches({}) == dict.fromkeys(["json", "seg", "sr", "pdf", "png"], True)
    with pytest.raises(ValueError, match="outputs"):
        output_switches({"sr": "no"})
    with pytest.raises(ValueError, match="outputs"):
        output_switches({"dicom": True})


def _realistic_study(n_slices=300, size=512):
    """A 512 x 512 x 300 series (1 mm slices, 0.7 mm pixels) with two lungs and five lesions of 12 to 40 mm."""
    spacing = (1.0, 0.7, 0.7)
    datasets = make_series([], shape=(n_slices, 8, 8), pixel_mm=spacing[1:], table_step_mm=spacing[0]).datasets
    for ds in datasets:
        ds.Rows = ds.Columns = size
        del ds.PixelData  # headers are all the reports read from the slices
    rng = np.random.default_rng(5)
    hu = rng.standard_normal((n_slices, size, size), dtype=np.float32) * 30 - 850
    lungs = np.zeros(hu.shape, bool)
    lungs[40:260, 100:420, 60:240] = lungs[40:260, 100:420, 272:452] = True
    labels = np.zeros(hu.shape, np.int32)
    for number, (z, y, x, radius) in enumerate([(80, 200, 150, 20), (150, 250, 350, 12), (220, 300, 120, 9),
                                                (120, 230, 256, 10), (200, 180, 400, 6)], 1):
        box = tuple(slice(int(c - radius / s) - 1, int(c + radius / s) + 2) for c, s in zip((z, y, x), spacing))
        centre = (np.array((z, y, x)) - [b.start for b in box]) * spacing
        inside = ellipsoid([b.stop - b.start for b in box], spacing, centre, (radius, radius * 0.7, radius))
        labels[box][inside] = number
        hu[box][inside] = rng.normal(30, 15, int(inside.sum()))
        lungs[box][inside] = False
    return datasets, hu, labels, spacing, lungs


def test_report_time_on_a_realistic_study(tmp_path):
    datasets, hu, labels, spacing, lungs = _realistic_study()
    document = write_lesion_outputs(datasets, labels, [0.9, 0.8, 0.7, 0.6, 0.5], hu, spacing,
                                    tmp_path, lungs=lungs, seg=False)
    document["seg"] = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4", "series_instance_uid": "1.2.3",
                       "sop_instance_uid": "1.2.3.4"}  # the SEG itself is no report output: not timed
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        records = lesion_records(datasets, labels, [0.9, 0.8, 0.7, 0.6, 0.5], hu, spacing, lungs)
        measured = time.perf_counter()
        written = write_reports(datasets, hu, labels, {**document, "lesions": records}, tmp_path)
        runs.append((measured - start, time.perf_counter() - measured))
    measurements_s = statistics.median(r[0] for r in runs)
    reports_s = statistics.median(r[1] for r in runs)
    print(f"report outputs for {hu.shape}, {len(records)} lesions: measurements {measurements_s:.2f} s + "
          f"SR, PDF, Encapsulated PDF, PNGs {reports_s:.2f} s = {measurements_s + reports_s:.2f} s (median of 3)")
    assert len(records) == 5 and len(written) == 1 + 2 + 6
    assert [r["location"]["region"] for r in records] == ["lung", "lung", "lung", "mediastinum", "lung"]
    assert measurements_s + reports_s <= REPORT_BUDGET_S


def test_app_takes_output_flags_off_the_command_line(tmp_path, models_dir):
    """The SDK never sees the output flags: an empty input ends as 'cannot analyse', not as a usage error."""
    (tmp_path / "in").mkdir()
    result = subprocess.run([sys.executable, "app", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                             "-m", str(models_dir), "--no-sr", "--no-report", "--png"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("cannot analyse this study"), result.stderr


@pytest.mark.parametrize("case", ["lidc0001", "radiomics_lung1", "petctdx_a0001"])
def test_reports_on_real_cases(case, tmp_path):
    """Every report output of a real archive's study (truth lesions as the lesions) passes dciodvfy and reads back."""
    folder = real_case(case)
    truth = json.loads((folder / "truth.json").read_text())
    npz = np.load(folder / "truth.npz")
    datasets = read_series(folder / "dicom", truth["series_uid"])
    row = {uid: k for k, uid in enumerate(npz["sop_uids"])}
    labels = npz["label"][[row[ds.SOPInstanceUID] for ds in datasets]].astype(np.int32)
    hu = hu_volume(datasets)
    spacing = (float(truth["spacing_mm"][0]), *map(float, datasets[0].PixelSpacing))
    _, lungs = body_and_lung_masks(hu, spacing)

    document = write_lesion_outputs(datasets, labels, [0.8] * int(labels.max()), hu, spacing, tmp_path, lungs=lungs)
    write_reports(datasets, hu, labels, document, tmp_path)

    assert sorted(p.name for p in tmp_path.glob("*.dcm")) == [PDF_DICOM_FILE, SEG_FILE, SR_FILE]
    for path in tmp_path.glob("*.dcm"):
        assert_dciodvfy_clean(path)
    groups = hd.sr.srread(tmp_path / SR_FILE).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_uid for g in groups] == [r["tracking_uid"] for r in document["lesions"]]
    assert all(r["location"]["region"] in ("lung", "hilum", "mediastinum") for r in document["lesions"])
