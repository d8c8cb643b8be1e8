"""Metrics on hand-built cases with known answers, and the evaluation CLI on tiny NIfTI files."""

import json

import numpy as np
import pytest

from training.evaluate import main
from training.metrics import evaluate_case, plot_froc, summarize
from training.nifti import write_nifti

SPACING = (1.0, 1.0, 1.0)
SHAPE = (20, 48, 48)
BIG = (slice(4, 16), slice(4, 16), slice(4, 16))  # 12 mm cube: axial diameter 17 mm, 1728 voxels
BIG2 = (slice(4, 16), slice(30, 42), slice(30, 42))
SMALL = (slice(8, 12), slice(30, 34), slice(4, 8))  # 4 mm cube: axial diameter 5.7 mm
ELSEWHERE = (slice(4, 8), slice(36, 44), slice(20, 28))  # touches no lesion above, 256 voxels


def volume(*boxes):
    """Label volume with box i labelled i + 1."""
    labels = np.zeros(SHAPE, np.int32)
    for index, box in enumerate(boxes):
        labels[box] = index + 1
    return labels


def test_perfect_prediction():
    truth = volume(BIG, BIG2)
    result = evaluate_case(truth.copy(), truth, SPACING)
    assert result.case_dice == 1.0
    assert [lesion.dice for lesion in result.lesions] == [1.0, 1.0]
    assert (result.measurable, result.detected, result.false_positives, len(result.instances)) == (2, 2, 0, 2)
    assert result.lesions[0].diameter_mm == pytest.approx(12 * np.sqrt(2))


def test_missed_lesion_and_false_positive():
    truth = volume(BIG, BIG2)
    result = evaluate_case(volume(BIG, ELSEWHERE), truth, SPACING)
    assert [lesion.detected for lesion in result.lesions] == [True, False]
    assert [instance.false_positive for instance in result.instances] == [False, True]
    assert result.case_dice == pytest.approx(2 * 1728 / (1728 + 256 + 2 * 1728))
    summary = summarize([result])
    assert (summary["sensitivity"], summary["false_positives"], summary["fp_per_scan"]) == (0.5, 1, 1.0)
    assert summary["lesion_dice_mean"] == 1.0


@pytest.mark.parametrize("found", [True, False])
def test_small_truth_lesion_is_neither_missed_nor_false(found):
    truth = volume(BIG, SMALL)
    pred = volume(BIG, SMALL) if found else volume(BIG)
    result = evaluate_case(pred, truth, SPACING)
    assert [lesion.measurable for lesion in result.lesions] == [True, False]
    assert (result.measurable, result.detected, result.false_positives) == (1, 1, 0)
    assert summarize([result])["sensitivity"] == 1.0
    # With a lower size limit the small lesion counts.
    lowered = evaluate_case(pred, truth, SPACING, min_diameter_mm=5.0)
    assert (lowered.measurable, lowered.detected) == (2, 2 if found else 1)


def test_two_pieces_of_one_lesion_and_a_touching_sliver():
    truth = volume(BIG)
    pred = np.zeros(SHAPE, np.int32)
    pred[4:10, 4:16, 4:16] = 1  # one label, two 26-connected pieces (gap at z = 10)
    pred[11:16, 4:16, 4:16] = 1
    pred[15, 15, 15:30] = 2  # a sliver of another label: one voxel inside the lesion (taken from piece 2)
    result = evaluate_case(pred, truth, SPACING, pred_scores={1: 0.8, 2: 0.3})
    assert [(i.label, i.score, i.voxels) for i in result.instances] == [(1, 0.8, 864), (1, 0.8, 719), (2, 0.3, 15)]
    assert result.false_positives == 0
    lesion = result.lesions[0]
    assert lesion.dice == pytest.approx(2 * 864 / (864 + 1728))
    assert (lesion.detected, lesion.overlap_detected, lesion.detection_score) == (True, True, 0.8)
    assert result.case_dice == pytest.approx(2 * 1584 / (1598 + 1728))


def test_sliver_alone_overlaps_but_does_not_detect():
    truth = volume(BIG)
    pred = np.zeros(SHAPE, np.int32)
    pred[15, 15, 15:30] = 1
    result = evaluate_case(pred, truth, SPACING)
    lesion = result.lesions[0]
    assert (lesion.detected, lesion.overlap_detected, result.false_positives) == (False, True, 0)
    summary = summarize([result])
    assert (summary["sensitivity"], summary["sensitivity_any_overlap"], summary["lesion_dice_mean"]) == (0.0, 1.0, None)


def test_touching_labels_are_separate_instances():
    pred = np.zeros(SHAPE, np.int32)
    pred[4:16, 4:16, 4:10] = 1
    pred[4:16, 4:16, 10:16] = 2
    result = evaluate_case(pred, volume(BIG), SPACING, pred_scores={2: 0.5})
    assert [(i.label, i.score) for i in result.instances] == [(1, 1.0), (2, 0.5)]
    assert result.lesions[0].dice == pytest.approx(2 / 3)


def test_empty_case():
    empty = np.zeros(SHAPE, np.int32)
    result = evaluate_case(empty, empty, SPACING)
    assert (result.case_dice, result.lesions, result.instances) == (1.0, [], [])
    summary = summarize([result])
    assert summary["case_dice_mean"] is None  # no case with lesions
    assert (summary["pooled_dice"], summary["sensitivity"], summary["cpm"], summary["fp_per_scan"]) == (1.0, None, None, 0.0)


def test_boxes_only():
    truth = volume((slice(4, 10), slice(4, 10), slice(4, 16)), (slice(4, 10), slice(30, 38), slice(30, 38)))
    pred = np.zeros(SHAPE, np.int32)
    pred[6, 6, 6] = 1  # one voxel inside the first box
    pred[ELSEWHERE] = 2
    result = evaluate_case(pred, truth, SPACING, boxes_only=True)
    assert result.case_dice is None
    # Box diameter is the longer in-plane side: 6 x 12 mm -> 12 (measurable), 8 x 8 mm -> 8 (not).
    assert [(lesion.diameter_mm, lesion.measurable) for lesion in result.lesions] == [(12.0, True), (8.0, False)]
    assert [(lesion.detected, lesion.dice) for lesion in result.lesions] == [(True, None), (False, None)]
    assert [i.false_positive for i in result.instances] == [False, True]
    summary = summarize([result])
    assert (summary["case_dice_mean"], summary["pooled_dice"], summary["sensitivity"]) == (None, None, 1.0)


def toy_froc_set():
    """Two scans, four measurable lesions; ranked instances: TP .9, FP .8, TP .7, FP .6, TP .5, FP .4."""
    scan_a = evaluate_case(volume(BIG, ELSEWHERE, BIG2, (slice(17, 19), slice(20, 22), slice(40, 42))),
                           volume(BIG, BIG2), SPACING, pred_scores={1: 0.9, 2: 0.8, 3: 0.5, 4: 0.4})
    scan_b = evaluate_case(volume(BIG, ELSEWHERE), volume(BIG, BIG2), SPACING, pred_scores={1: 0.7, 2: 0.6})
    return [scan_a, scan_b]


def test_froc_and_cpm_on_a_toy_score_set():
    summary = summarize(toy_froc_set())
    assert summary["froc"] == {"thresholds": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],
                               "fp_per_scan": [0.0, 0.5, 0.5, 1.0, 1.0, 1.5],
                               "sensitivity": [0.25, 0.25, 0.5, 0.5, 0.75, 0.75]}
    # Best sensitivity per FP rate: 0 -> .25, .5 -> .5, 1 -> .75, 1.5 -> .75; linear between, flat after.
    expected = [0.3125, 0.375, 0.5, 0.75, 0.75, 0.75, 0.75]
    assert list(summary["cpm_sensitivities"].values()) == pytest.approx(expected)
    assert summary["cpm"] == pytest.approx(4.1875 / 7)
    assert (summary["sensitivity"], summary["fp_per_scan"]) == (0.75, 1.5)


def test_plot_froc_overlays_named_curves(tmp_path):
    summary = summarize(toy_froc_set())
    plot_froc({"segmentation": summary, "full cascade": summary}, tmp_path / "froc.png")
    plot_froc(summary, tmp_path / "single.png")
    for name in ("froc.png", "single.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def folders(tmp_path):
    pred_dir, truth_dir = tmp_path / "pred", tmp_path / "labelsTr"
    pred_dir.mkdir()
    truth_dir.mkdir()
    spacing = (2.0, 0.8, 0.8)
    write_nifti(truth_dir / "case1.nii.gz", volume(BIG, BIG2).astype(np.uint8), spacing)
    write_nifti(pred_dir / "case1.nii.gz", volume(BIG, ELSEWHERE).astype(np.uint8), spacing)
    (pred_dir / "case1.json").write_text(json.dumps({"scores": {"1": 0.9, "2": 0.4}}))
    write_nifti(truth_dir / "case2.nii.gz", np.zeros(SHAPE, np.uint8), spacing)
    write_nifti(pred_dir / "case2.nii.gz", np.zeros(SHAPE, np.uint8), spacing)
    return pred_dir, truth_dir, spacing


def test_cli(folders, tmp_path, capsys):
    pred_dir, truth_dir, _ = folders
    out = tmp_path / "out"
    main(["--pred", str(pred_dir), "--truth", str(truth_dir), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "case1" in printed and "case2" in printed and "CPM" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    summary = metrics["summary"]
    # 12 mm cube at 0.8 mm pixels: 9.6 x 9.6 mm, diagonal 13.6 mm (measurable).
    assert (summary["measurable_lesions"], summary["detected"], summary["false_positives"]) == (2, 1, 1)
    assert summary["fp_per_scan"] == 0.5
    assert [i["score"] for i in metrics["cases"][0]["instances"]] == [0.9, 0.4]
    assert (out / "froc.png").stat().st_size > 0


def test_cli_rejects_missing_cases_and_mismatched_grids(folders, capsys):
    pred_dir, truth_dir, spacing = folders
    write_nifti(truth_dir / "case3.nii.gz", np.zeros(SHAPE, np.uint8), spacing)
    with pytest.raises(SystemExit, match="no prediction .* case3"):
        main(["--pred", str(pred_dir), "--truth", str(truth_dir)])
    main(["--pred", str(pred_dir), "--truth", str(truth_dir), "--only-predicted"])
    assert "cases 2" in capsys.readouterr().out
    write_nifti(pred_dir / "case2.nii.gz", np.zeros((10, 48, 48), np.uint8), spacing)
    with pytest.raises(SystemExit, match="case2: prediction grid"):
        main(["--pred", str(pred_dir), "--truth", str(truth_dir), "--only-predicted"])
