"""The app end to end as a user runs it (`python app -i -o -m`): a generated study and the real cases."""

import json
import resource
import time

import numpy as np
import pytest

from tests.conftest import REAL_CASES, read_series, real_case, run_app, seg_labels, shipped_feature_stage
from tests.dicom_validation import assert_dciodvfy_clean

MIN_LONG_AXIS_MM = shipped_feature_stage()["thresholds"]["min_long_axis_mm"]


def _check_outputs(output, source_datasets) -> tuple[list[dict], np.ndarray]:
    """Every DICOM output passes dciodvfy; lesions.json and the SEG agree; the SEG reads back on the source grid."""
    document = json.loads((output / "lesions.json").read_text())
    lesions = document["lesions"]
    dicom_files = sorted(output.glob("*.dcm"))
    assert {p.name for p in dicom_files} == {"sr.dcm", "report_pdf.dcm"} | ({"seg.dcm"} if lesions else set())
    for path in dicom_files:
        assert_dciodvfy_clean(path)
    labels = np.zeros((len(source_datasets), 1, 1), np.int32)
    if lesions:
        labels = seg_labels(output / "seg.dcm", [str(d.SOPInstanceUID) for d in source_datasets])
        counts = np.bincount(labels.ravel(), minlength=len(lesions) + 1)[1:]
        assert list(counts) == [lesion["voxel_count"] for lesion in lesions]
        assert all(lesion["long_axis_mm"] >= MIN_LONG_AXIS_MM for lesion in lesions)
    else:
        assert not (output / "seg.dcm").exists()
    return lesions, labels


def _found(truth_label: np.ndarray, labels: np.ndarray) -> str:
    """Which truth lesions some output lesion overlaps (DESIGN's 'any overlap'), for the test log."""
    hits = [t for t in np.unique(truth_label[truth_label > 0]) if (labels[truth_label == t] > 0).any()]
    return f"{len(hits)} of {len(np.unique(truth_label)) - 1} truth lesions overlapped"


def test_generated_study(phantom_study, models_dir, tmp_path):
    folder, phantom = phantom_study
    output = tmp_path / "output"
    start = time.perf_counter()
    result = run_app(folder, output, models_dir)
    wall = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2
    assert result.returncode == 0 and result.stderr == "", result.stdout[-3000:] + result.stderr
    for operator in ("dicom_loader", "series_selector", "series_to_volume", "thorax_crop", "lesion_segmentation",
                     "cascade_fp"):
        assert f"(timing) - {operator}: " in result.stdout
    assert "Phantom^" not in result.stdout  # never log patient names
    source = read_series(folder / "series")
    lesions, labels = _check_outputs(output, source)
    print(f"phantom seed {phantom.seed} {phantom.hu.shape}: {len(lesions)} lesions, {wall:.0f} s, "
          f"peak {peak_gb:.1f} GB; {_found(phantom.label, labels) if lesions else 'none found'}")
    assert wall <= 120 and peak_gb <= 6


@pytest.mark.parametrize("case", REAL_CASES)
def test_real_case(case, models_dir, tmp_path):
    folder = real_case(case)
    truth = json.loads((folder / "truth.json").read_text())
    output = tmp_path / "output"
    result = run_app(folder / "dicom", output, models_dir)
    if case == "abdomen_negative" and result.returncode != 0:
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not output.exists() or not any(output.iterdir())
        return
    assert result.returncode == 0 and result.stderr == "", result.stdout[-3000:] + result.stderr
    # The truth's series, or (petctdx_a0001) the soft-tissue reconstruction of the same slices that the app prefers.
    source = read_series(folder / "dicom", json.loads((output / "lesions.json").read_text())["series_instance_uid"])
    truth_positions = [d.ImagePositionPatient for d in read_series(folder / "dicom", truth["series_uid"])]
    assert [d.ImagePositionPatient for d in source] == truth_positions
    lesions, labels = _check_outputs(output, source)
    truth_label = np.load(folder / "truth.npz")["label"][::-1]  # head first there, feet first here
    print(f"{case}: {len(lesions)} lesions; {_found(truth_label, labels) if lesions else 'none found'}")
