"""The whole-app evaluation (training.evaluate_real): every lesion reported found or lost at a named step."""

import json

import numpy as np

from operators.thorax_crop import crop_thorax
from tests.conftest import write_test_models
from training.evaluate_real import _lost_at, cached_probabilities, evaluate_sets, load_case
from training.phantom import generate_phantom
from training.nifti import write_nifti
from training.phantom_io import write_phantom_nifti
from training.train import IGNORE


def test_a_missed_lesion_names_the_step_that_lost_it():
    phantom = generate_phantom(5, lesion_count=0, slices=40)
    hu = phantom.hu.astype(np.float32)
    thorax = crop_thorax(hu, phantom.spacing)
    lesion = np.zeros(hu.shape, bool)
    z, y, x = (s.start + (s.stop - s.start) // 2 for s in thorax.box)
    lesion[z - 2:z + 2, y - 8:y + 8, x - 8:x + 8] = True
    elsewhere = [{"dropped_by": "measured_features: size", "truth_lesion": 2, "truth_dice": 0.8, "detects": True}]
    assert _lost_at(1, lesion, thorax, elsewhere) == "segmentation"
    touching = [{"dropped_by": "measured_features: size", "truth_lesion": 1, "truth_dice": 0.05, "detects": False}]
    assert _lost_at(1, lesion, thorax, touching) == "segmentation"
    detecting = touching + [{"dropped_by": "measured_features: size", "truth_lesion": 1, "truth_dice": 0.6,
                             "detects": True}]
    assert _lost_at(1, lesion, thorax, detecting) == "cascade measured_features: size"
    assert _lost_at(1, lesion, None, detecting) == "thorax box (no thorax found)"
    outside = np.zeros(hu.shape, bool)
    outside[z, :thorax.box[1].start, :] = True
    if outside.any():
        assert _lost_at(1, outside, thorax, detecting) == "thorax box"


def test_report_lists_every_lesion_and_false_lesion_and_reuses_the_cache(tmp_path):
    data = tmp_path / "phantoms"
    (data / "imagesTr").mkdir(parents=True)
    (data / "labelsTr").mkdir()
    phantom = generate_phantom(21, lesion_count=4, slices=40)
    write_phantom_nifti(phantom, data / "imagesTr" / "p21.nii.gz", data / "labelsTr" / "p21.nii.gz")
    (data / "labelsTr" / "p21.json").write_text(json.dumps({"lesions": phantom.lesions}, default=float))
    models = write_test_models(tmp_path / "models")
    cache, out = tmp_path / "cache", tmp_path / "out"

    summaries = evaluate_sets({"phantoms": data}, models / "lesion_seg", models / "cascade_fp", out, cache,
                              log=lambda *a, **k: None)
    report = json.loads((out / "report.json").read_text())
    case = report["sets"]["phantoms"][0]
    assert len(case["lesions"]) == len(np.unique(phantom.label)) - 1
    assert {lesion["kind"] for lesion in case["lesions"]} <= {lesion["kind"] for lesion in phantom.lesions}
    for lesion in case["lesions"]:
        assert lesion["found"] == ("lost_at" not in lesion)
    measurable = [lesion for lesion in case["lesions"] if lesion["measurable"]]
    assert summaries["phantoms"]["measurable_lesions"] == len(measurable)
    assert summaries["phantoms"]["false_positives"] == len(case["false_lesions"])
    assert summaries["phantoms"]["false_volume_ml_per_scan"] == sum(fp["volume_ml"] for fp in case["false_lesions"])
    assert "## Lesions" in (out / "report.md").read_text()
    kinds = report["kinds"]["phantoms"]  # every measurable lesion under its kind: found, or lost at one step
    assert sum(row["measurable"] for row in kinds) == len(measurable)
    assert sum(row["found"] for row in kinds) == sum(lesion["found"] for lesion in measurable)
    assert all(row["found"] + row["thorax box"] + row["segmentation"] + row["cascade"] == row["measurable"]
               for row in kinds)
    rows = list(case["ablation"].values())  # segmentation alone, then each stage added: the last is the app
    assert rows[-1] == case["metrics"] and len(rows) == 3
    kept = [len(r["instances"]) for r in rows]  # each stage only drops
    assert kept == sorted(kept, reverse=True)
    judged = [f for f in case["candidates"] if "multiscale_cnn_probability" in f]
    table = report["scores"]["phantoms"]["multiscale_cnn"]
    assert sum(r["detecting"] + r["others"] for r in table) == len(judged)
    assert sum(r["detecting"] for r in table) == sum(f["detects"] for f in judged)

    cached = cached_probabilities(next(cache.iterdir()), "p21")[0]
    written = cached.stat().st_mtime_ns
    evaluate_sets({"phantoms": data}, models / "lesion_seg", models / "cascade_fp", out, cache, log=lambda *a, **k: None)
    assert cached.stat().st_mtime_ns == written


def test_real_background_cases_are_partial_truth_without_their_ignore_regions(tmp_path):
    """training.real_backgrounds' IGNORE regions (the scan's own possible lesions) are neither truth nor false."""
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    labels = np.zeros((4, 6, 6), np.int16)
    labels[1, 1:3, 1:3], labels[2, 3:5, 3:5] = 1, IGNORE
    write_nifti(tmp_path / "imagesTr" / "bg_s0.nii.gz", np.zeros(labels.shape, np.int16), (2.0, 1.0, 1.0), (0, 0, 0))
    write_nifti(tmp_path / "labelsTr" / "bg_s0.nii.gz", labels, (2.0, 1.0, 1.0), (0, 0, 0))
    (tmp_path / "labelsTr" / "bg_s0.json").write_text(json.dumps(
        {"background": "bg", "seed": 0, "ignore_label": IGNORE, "lesions": [{"label": 1, "kind": "node"}]}))
    name, _, truth, _, described = load_case(tmp_path / "imagesTr" / "bg_s0.nii.gz")
    assert name == "bg_s0" and set(np.unique(truth)) == {0, 1} and (truth == 1).sum() == 4
    assert described == {"lesions": [{"id": 1, "kind": "node"}], "partial_truth": True}
