"""The learned cascade: multiscale patches, Hessian measures, candidate labels, training, export and stage order."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from operators.cascade_fp import (equivalent_diameter_mm, filter_candidates, hessian_features, load_cascade,
                                  multiscale_patches, stage_probability, whole_candidate_zoom)
from operators.lesion_segmentation import extract_candidates
from operators.thorax_crop import ThoraxCrop
from tests.conftest import REPO, shipped_feature_stage
from training.cross_validate_cascade import patient_sets, shipped_learned_stages, without_patient
from training.cross_validate_nodes import fold_row, format_table, patient_split, patients_of
from training.evaluate_real import list_cases
from training.mine_candidates import match_candidates, near_misses
from training.train_cascade import (MeanProbability, MultiscaleCNN, Standardized, augment, cascade_spec,
                                    export_stage, judged_size_limit, set_thresholds, shipped_members,
                                    threshold_for_retention, train_cnn, train_feature_classifier)

SPEC = {"fov_mm": [20, 40, 80], "size": 24, "intensity_window_hu": [-1000, 400]}
FEATURE_STAGE = shipped_feature_stage(min_long_axis_mm=10.0)  # the tests' sizes assume a 10 mm rule
SPACING = (2.5, 0.8, 0.8)
SHAPE = (32, 100, 100)
CENTRE = 11.5  # the centre of a 24-voxel patch


def _ball(centre, radius_mm, shape=SHAPE, spacing=SPACING):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing)) <= radius_mm ** 2


def _tube(centre, radius_mm, axis, shape=SHAPE, spacing=SPACING):
    grid = np.indices(shape).astype(float)
    return sum(((g - c) * s) ** 2 for a, (g, c, s) in enumerate(zip(grid, centre, spacing)) if a != axis) <= radius_mm ** 2


def _lung(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(-850, 20, shape).astype(np.float32)


def test_patches_are_centred_at_every_scale_also_at_the_border():
    hu, labels = _lung(), np.zeros(SHAPE, np.int32)
    places = [(16, 50, 40), (16, 50, 65), (2.5, 8, 20)]  # two neighbours 20 mm apart, one near two borders
    for number, centre in enumerate(places, start=1):
        ball = _ball(centre, 5.0)
        hu[ball], labels[ball] = 40.0, number
    patches = multiscale_patches(labels, hu, SPACING, SPEC)
    assert patches.shape == (3, 3, 2, 24, 24, 24) and patches.dtype == np.float32
    assert 0.0 <= patches.min() and patches.max() <= 1.0
    for candidate in patches:
        for scale, fov in zip(candidate, SPEC["fov_mm"]):
            mask = scale[1]
            assert np.allclose(np.average(np.indices(mask.shape), axis=(1, 2, 3), weights=np.broadcast_to(mask, (3,) + mask.shape)),
                               CENTRE, atol=0.35)
            if fov < 80:  # point samples 3.3 mm apart do not keep a 10 mm ball's volume
                assert mask.sum() * (fov / 24) ** 3 == pytest.approx(4 / 3 * np.pi * 5.0 ** 3, rel=0.2)
            assert scale[0, 12, 12, 12] > 0.7  # the lesion (40 HU) at the centre, lung (0.1) around
    # The neighbour is in the first candidate's image at 80 mm (20 mm off-centre = 6 voxels) but not its mask.
    assert patches[0, 2, 0, 12, 12, 17] > 0.7 and patches[0, 2, 1, 12, 12, 17] == 0.0
    # Beyond the volume the border continues: the slices below the near-border candidate repeat slice 0.
    assert np.allclose(patches[2, 2, 0, 0], patches[2, 2, 0, 1], atol=0.02)


def test_a_candidate_wider_than_the_largest_patch_is_seen_whole_at_every_scale():
    """With `whole_candidate_fill`, a 100 mm mass widens all three fields of view by one factor, so the 80 mm
    patch holds all of it and the scales keep their ratios; a 20 mm nodule's patches do not change."""
    spacing, shape = (2.5, 2.0, 2.0), (48, 64, 64)  # 120 x 128 x 128 mm
    hu, labels = _lung(shape), np.zeros(shape, np.int32)
    mass, nodule = _ball((24, 32, 32), 50.0, shape, spacing), _ball((24, 8, 8), 10.0, shape, spacing)
    hu[mass | nodule], labels[mass], labels[nodule] = 40.0, 1, 2
    fixed = multiscale_patches(labels, hu, spacing, SPEC)
    whole = multiscale_patches(labels, hu, spacing, {**SPEC, "whole_candidate_fill": 1.0})
    assert fixed[0, 2, 1][[0, -1]].max() == 1.0  # without it the mass overfills even the 80 mm patch
    zoom = whole_candidate_zoom(np.argwhere(labels == 1), spacing, 80.0, 1.0)
    assert 1.25 < zoom < 1.35  # (100 mm + a voxel) / 80 mm
    largest = whole[0, 2, 1]
    assert largest.max() == 1.0 and largest[[0, -1]].max() < 0.5 and largest[:, [0, -1]].max() < 0.5
    assert largest.sum() * (80 * zoom / 24) ** 3 == pytest.approx(4 / 3 * np.pi * 50.0 ** 3, rel=0.15)
    assert np.array_equal(whole[0, 0, 1], multiscale_patches(labels, hu, spacing, {**SPEC, "fov_mm": [20 * zoom, 40, 80]})[0, 0, 1])
    assert np.array_equal(whole[1], fixed[1])


def test_hessian_measures_tell_a_sphere_from_a_tube():
    hu, labels = _lung(), np.zeros(SHAPE, np.int32)
    for number, shape in enumerate([_ball((16, 50, 30), 7.0), _tube((16, 50, 70), 2.5, axis=0)], start=1):
        hu[shape], labels[shape] = 30.0, number
    sphere, tube = hessian_features(multiscale_patches(labels, hu, SPACING, SPEC), SPEC)
    for fov in (20, 40):
        assert sphere[f"hessian_blob_{fov}mm"] > 0.6 > 0.2 > tube[f"hessian_blob_{fov}mm"]
        assert tube[f"hessian_tube_{fov}mm"] > 0.6 > 0.2 > sphere[f"hessian_tube_{fov}mm"]
    assert sphere["hessian_log_40mm"] > sphere["hessian_log_80mm"]  # a 14 mm blob answers most at 40 mm (sigma 5 mm)


def test_hessian_measures_of_no_candidates():
    patches = multiscale_patches(np.zeros(SHAPE, np.int32), _lung(), SPACING, SPEC)
    assert len(patches) == 0 and hessian_features(patches, SPEC) == []


def test_candidate_labels_follow_the_metrics():
    truth = np.zeros((10, 20, 20), np.int16)
    truth[2:8, 2:8, 2:8] = 1  # 216 voxels
    candidates = np.zeros_like(truth, np.int32)
    candidates[3:7, 3:7, 3:7] = 1  # inside the lesion: Dice 2 * 64 / 280
    candidates[7:10, 7:12, 7:12] = 2  # one corner voxel of the lesion: Dice below 0.1
    candidates[0:2, 15:18, 15:18] = 3  # touches nothing
    label, dice, lesion = match_candidates(candidates, truth, np.bincount(truth.ravel()), 3, boxes_only=False)
    assert label.tolist() == [1, -1, 0] and lesion.tolist() == [1, 1, 0]
    assert dice[0] == pytest.approx(2 * 64 / 280)
    assert match_candidates(candidates, truth, np.bincount(truth.ravel()), 3, boxes_only=True)[0].tolist() == [1, 1, 0]


def test_near_misses_stay_below_the_threshold_and_touch_no_lesion():
    probability = np.zeros(SHAPE, np.float32)
    probability[_ball((10, 30, 30), 5)] = 0.9  # a candidate
    probability[_ball((10, 70, 30), 5)] = 0.3  # a near miss
    probability[_ball((20, 30, 70), 5)] = 0.3  # a near miss on a lesion: not false
    probability[_ball((20, 70, 70), 5)] = 0.1  # below the near-miss threshold
    truth = _ball((20, 30, 70), 4).astype(np.int16)
    near = near_misses(probability, truth, threshold=0.5, near_threshold=0.2, spacing=SPACING)
    assert near.count == 1 and near.max_probability.tolist() == pytest.approx([0.3])
    assert (near.labels == 1).sum() == _ball((10, 70, 30), 5).sum()


def test_threshold_keeps_the_asked_share_of_true_candidates():
    probabilities = np.linspace(0.01, 1.0, 100)
    assert threshold_for_retention(probabilities, 0.98) == pytest.approx(0.03)  # 98 of 100 kept
    assert threshold_for_retention(probabilities[:10], 0.98) == pytest.approx(0.01)  # 10: keep them all
    assert (probabilities >= threshold_for_retention(probabilities, 0.9)).mean() >= 0.9


def _synthetic_candidates(count: int, seed: int = 0):
    """Patches and features of lesion-like spheres (label 1) and vessel-like tubes (label 0)."""
    rng = np.random.default_rng(seed)
    shape, spacing = (24, 64, 64), (2.0, 1.0, 1.0)
    patches, labels = [], []
    for n in range(count):
        hu, mask = _lung(shape, seed + n), None
        if n % 2:
            mask = _ball((12, 32, 32), rng.uniform(5, 9), shape, spacing)
        else:
            mask = _tube((12, 32, 32), rng.uniform(1.5, 3), int(rng.integers(3)), shape, spacing)
        hu[mask] = rng.uniform(-100, 60)
        patches.append(multiscale_patches(mask.astype(np.int32), hu, spacing, SPEC)[0])
        labels.append(n % 2)
    patches = np.stack(patches)
    features = np.array([[h[k] for k in sorted(h)] for h in hessian_features(patches, SPEC)], np.float32)
    return patches, features, np.array(labels, np.float32)


def test_partial_outline_augmentation_keeps_part_of_the_mask_centred_at_every_scale():
    hu, labels = _lung(), np.zeros(SHAPE, np.int32)
    ball = _ball((16, 50, 50), 7.0)
    hu[ball], labels[ball] = 40.0, 1
    patches = multiscale_patches(labels, hu, SPACING, SPEC)
    for seed in range(5):
        out = augment(patches, np.random.default_rng(seed), SPEC["fov_mm"], partial=1.0, jitter_mm=0.0)
        for scale in range(2):  # the 80 mm scale's few mask voxels are too coarse to test
            kept = out[0, scale, 1].sum() / patches[0, scale, 1].sum()
            assert 0.1 < kept < 0.95
            centroid = np.average(np.indices(out.shape[-3:]), axis=(1, 2, 3),
                                  weights=np.broadcast_to(out[0, scale, 1], (3,) + out.shape[-3:]))
            assert np.allclose(centroid, CENTRE, atol=1.0)
        assert out[0, 0, 0].max() > 0.7  # the lesion's image stays in the patch


def test_tiny_cascade_training_lowers_the_loss():
    patches, features, labels = _synthetic_candidates(24)
    _, losses = train_feature_classifier(features, labels, steps=100)
    assert losses[-1] < 0.5 * losses[0]
    model, history = train_cnn(patches, labels, patches, labels.astype(np.int8), retention=0.98,
                               fov_mm=SPEC["fov_mm"], epochs=12, batch=8, log=lambda line: None)
    assert history[-1]["loss"] < history[0]["loss"]
    assert isinstance(model, MultiscaleCNN)


class _SizeGate(nn.Module):
    """Probability from the long axis: sigmoid(long_axis_mm - 14)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x[:, 0] - 14.0)


class _MaskShare(nn.Module):
    """Probability = the candidate mask's share of the 20 mm patch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 1].mean(dim=(1, 2, 3))


def _save_stages(folder, stages_and_modules):
    stages = []
    for stage, module in stages_and_modules:
        if module is not None:
            torch.jit.save(torch.jit.script(module), str(folder / stage["file"]))
        stages.append(stage)
    (folder / "model.json").write_text(json.dumps({"name": "cascade_fp", "patches": SPEC, "stages": stages}))
    return load_cascade(folder)


def test_fine_tuning_starts_from_the_exported_ensemble(tmp_path):
    patches, _, labels = _synthetic_candidates(8)
    torch.manual_seed(0)
    members = [MultiscaleCNN().eval() for _ in range(2)]
    export_stage(MeanProbability(members).eval(), torch.from_numpy(patches[:2]), tmp_path / "multiscale_cnn.ts")
    loaded = shipped_members(tmp_path, 2)
    x = torch.from_numpy(patches)
    with torch.no_grad():
        assert all(torch.allclose(a.eval()(x), b(x), atol=1e-6) for a, b in zip(loaded, members))
    model, history = train_cnn(patches, labels, patches, labels.astype(np.int8), retention=0.98, fov_mm=SPEC["fov_mm"],
                               epochs=1, batch=8, log=lambda line: None, init=loaded[0], learning_rate=0.0)
    for trained, start in zip(model.parameters(), members[0].parameters()):  # learning rate 0: the weights it began with
        assert torch.equal(trained, start)


def test_exported_stages_load_and_match_the_eager_models(tmp_path):
    patches, features, _ = _synthetic_candidates(6)
    torch.manual_seed(0)
    members = [MultiscaleCNN().eval() for _ in range(2)]
    cnn, mlp = MeanProbability(members).eval(), Standardized(features.mean(0), features.std(0) + 1e-6).eval()
    export_stage(cnn, torch.from_numpy(patches[:2]), tmp_path / "cnn.ts")
    export_stage(mlp, torch.from_numpy(features[:2]), tmp_path / "mlp.ts")
    names = sorted(hessian_features(patches[:1], SPEC)[0])
    cascade = _save_stages(tmp_path, [
        ({"order": 1, "name": "mlp", "type": "torchscript", "file": "mlp.ts", "input": "features",
          "feature_names": names, "threshold": 0.5}, None),
        ({"order": 2, "name": "cnn", "type": "torchscript", "file": "cnn.ts", "input": "patches", "threshold": 0.5}, None),
    ])
    with torch.no_grad():
        eager_cnn, eager_mlp = cnn(torch.from_numpy(patches)).numpy(), mlp(torch.from_numpy(features)).numpy()
        member_mean = np.mean([member(torch.from_numpy(patches)).numpy() for member in members], axis=0)
    assert np.allclose(eager_cnn, member_mean, atol=1e-6)
    feature_dicts = [dict(zip(names, row.tolist())) for row in features]
    assert np.allclose(stage_probability(cascade["stages"][1], feature_dicts, patches), eager_cnn, atol=1e-5)
    assert np.allclose(stage_probability(cascade["stages"][0], feature_dicts, None), eager_mlp, atol=1e-5)


def test_stages_run_in_order_and_the_score_is_the_last_probability(tmp_path):
    hu, labels = _lung(), np.zeros(SHAPE, np.int32)
    lungs = np.zeros(SHAPE, bool)
    lungs[:, 5:95, 5:95] = True
    radii = {(16, 30, 30): 4.0, (16, 30, 70): 6.0, (16, 70, 30): 9.0, (16, 70, 70): 8.0}  # 8, 12, 18, 16 mm
    for centre, radius in radii.items():
        ball = _ball(centre, radius)
        hu[ball], labels[ball] = 30.0, 1
    candidates = extract_candidates(labels.astype(np.float32), 0.5, SPACING)
    # Listed last-first: the order field decides.
    cascade = _save_stages(tmp_path, [
        ({"order": 3, "name": "share", "type": "torchscript", "file": "share.ts", "input": "patches", "threshold": 0.2},
         _MaskShare()),
        ({"order": 2, "name": "size", "type": "torchscript", "file": "size.ts", "input": "features",
          "feature_names": ["long_axis_mm"], "threshold": 0.5}, _SizeGate()),
        (FEATURE_STAGE, None),
    ])
    result = filter_candidates(candidates, hu, SPACING, ThoraxCrop((slice(None),) * 3, hu > -500, lungs, 0.0), cascade)
    by_size = sorted(result.features, key=lambda f: f["long_axis_mm"])
    assert by_size[0]["dropped_by"] == "measured_features: size" and "size_probability" not in by_size[0]
    assert by_size[1]["dropped_by"].startswith("size: probability") and "share_probability" not in by_size[1]
    assert all("dropped_by" not in f and "hessian_blob_20mm" in f for f in by_size[2:])
    kept = [k for k, f in enumerate(result.features) if "dropped_by" not in f]
    shares = multiscale_patches(candidates.labels, hu, SPACING, SPEC, kept)[:, 0, 1].mean(axis=(1, 2, 3))
    assert result.scores == pytest.approx(shares.tolist(), abs=1e-5)
    assert [result.features[k]["share_probability"] for k in kept] == pytest.approx(result.scores)
    assert result.labels.max() == 2


def test_a_learned_stage_judges_the_sizes_at_which_it_saw_both_classes():
    """Up to the smaller of the largest true and the largest false training candidate (equivalent diameters)."""
    features = [{"volume_ml": ml} for ml in (0.5, 4.0, 1.0, 30.0)]
    assert judged_size_limit(features, np.array([0, 0, 1, 1])) == pytest.approx(equivalent_diameter_mm(4.0))
    assert judged_size_limit(features, np.array([0, 0, 1, 0])) == pytest.approx(equivalent_diameter_mm(1.0))


def test_a_new_cascade_folder_takes_its_hand_set_stage_from_the_initial_cascade(tmp_path):
    """Training into an empty --out folder starts from --init's model.json (else the shipped one), never fails."""
    init = tmp_path / "init"
    init.mkdir()
    (init / "model.json").write_text(json.dumps({"stages": [FEATURE_STAGE]}))
    assert cascade_spec(tmp_path / "new", init)["stages"] == [FEATURE_STAGE]
    shipped = json.loads((REPO / "models" / "cascade_fp" / "model.json").read_text())
    assert cascade_spec(tmp_path / "new", None) == shipped
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "model.json").write_text(json.dumps({"stages": []}))
    assert cascade_spec(tmp_path / "new", init) == {"stages": []}


def test_a_learned_stage_does_not_judge_masses_larger_than_it_learned_to_reject(tmp_path):
    """A mass whose volume's sphere is wider than the stage's `max_equivalent_diameter_mm` passes it unjudged
    (noted), however it would score; a smaller one, and a long thin one, are judged."""
    hu, labels = _lung(), np.zeros(SHAPE, np.int32)
    lungs = np.zeros(SHAPE, bool)
    lungs[:, 5:95, 5:95] = True
    sliver = np.zeros(SHAPE, bool)
    sliver[14:18, 85:88, 10:90] = True  # 64 mm long, 10 x 2.4 mm across: a sphere of its volume is 12 mm wide
    for shape in (_ball((16, 25, 25), 6.0), _ball((16, 55, 60), 14.0), sliver):  # 12, 28 and 64 mm long
        hu[shape], labels[shape] = 30.0, 1
    candidates = extract_candidates(labels.astype(np.float32), 0.5, SPACING)
    never = ({"order": 2, "name": "cnn", "type": "torchscript", "file": "cnn.ts", "input": "patches",
              "threshold": 0.99, "max_equivalent_diameter_mm": 20.0}, _MaskShare())  # no mask fills 99 % of a patch
    stage1 = shipped_feature_stage(min_long_axis_mm=10.0, max_elongation=100.0)
    cascade = _save_stages(tmp_path, [(stage1, None), never])
    result = filter_candidates(candidates, hu, SPACING, ThoraxCrop((slice(None),) * 3, hu > -500, lungs, 0.0), cascade)
    small, mass, thin = sorted(result.features, key=lambda f: f["long_axis_mm"])
    assert small["dropped_by"].startswith("cnn: probability") and thin["dropped_by"].startswith("cnn: probability")
    assert "dropped_by" not in mass and "cnn_probability" not in mass
    assert mass["cnn_not_judged"] == "a mass over 20 mm, larger than it learned to reject"
    assert result.labels.max() == 1 and result.scores == [pytest.approx(1.0)]


def test_thresholds_set_again_on_more_validation_candidates(tmp_path):
    """--thresholds-only: the learned stage's new threshold keeps the asked share of the true candidates that reach
    it and that it judges (not those stage 1 drops, ambiguous ones or masses it does not judge); weights, size limit
    and stage 1 stay."""
    rng = np.random.default_rng(0)
    count = 24
    names = ["long_axis_mm", "thorax_fraction", "mean_hu", "elongation", "volume_ml", "max_probability"]
    features = np.tile(np.array([15.0, 1.0, 0.0, 1.5, 1.0, 0.9], np.float32), (count, 1))  # 12.4 mm: judged
    features[0, 0] = 3.0  # dropped by stage 1
    features[1, 4] = 50.0  # 46 mm: not judged
    labels = np.array([1, 1] + [1, 0, -1] * 7 + [1], np.int8)
    patches = rng.random((count, 3, 2, 24, 24, 24)).astype(np.float16)
    mined = tmp_path / "mined"
    mined.mkdir()
    np.savez(mined / "case.npz", feature_names=names, features=features, patches=patches, label=labels,
             near_miss_features=features[:0], near_miss_patches=patches[:0])
    shipped = REPO / "models" / "cascade_fp"
    record = set_thresholds(shipped, [mined], tmp_path / "out", retention=0.9, log=lambda line: None)

    before, after = (json.loads((d / "model.json").read_text()) for d in (shipped, tmp_path / "out"))
    cnn = load_cascade(shipped)["stages"][1]
    judged = np.arange(2, count)
    p = stage_probability(cnn, [], patches[judged])
    expected = threshold_for_retention(p[labels[judged] == 1], 0.9)
    assert after["stages"][1]["threshold"] == pytest.approx(expected)
    assert record["stages"]["multiscale_cnn"]["validation_judged"] == {"true": 8, "false": 7}
    assert after["stages"][0] == before["stages"][0]
    assert {k: v for k, v in after["stages"][1].items() if k != "threshold"} == \
        {k: v for k, v in before["stages"][1].items() if k != "threshold"}
    assert (tmp_path / "out" / "multiscale_cnn.ts").read_bytes() == (shipped / "multiscale_cnn.ts").read_bytes()


def test_the_repository_cascade_loads():
    cascade = load_cascade(REPO / "models" / "cascade_fp")
    orders = [s["order"] for s in cascade["stages"]]
    assert len(set(orders)) == len(orders) and cascade["stages"][0]["type"] == "features"
    for stage in cascade["stages"]:
        if stage["type"] == "torchscript":
            assert 0.0 <= stage["threshold"] < 1.0 and isinstance(stage["module"], torch.jit.ScriptModule)


def test_a_cross_validation_fold_leaves_out_every_mined_case_of_its_patient(tmp_path):
    mined = tmp_path / "mined"
    mined.mkdir()
    for name in ("qin_lsc_0014_s0", "qin_lsc_0014_s1", "qin_lsc_0028_s0", "phantom_01000"):
        (mined / f"{name}.npz").write_bytes(b"")
    (subset,) = without_patient([mined], "qin_lsc_0014", tmp_path / "fold")
    assert sorted(p.name for p in subset.glob("*.npz")) == ["phantom_01000.npz", "qin_lsc_0028_s0.npz"]
    assert all(p.resolve().parent == mined.resolve() for p in subset.glob("*.npz"))


def test_a_cross_validation_fold_evaluates_its_patient_as_scanned_and_in_every_scanner_variant(tmp_path):
    real_train, variants = tmp_path / "real-train", tmp_path / "variants"
    for patient in ("qin_lsc_0014", "qin_lsc_0028"):
        (real_train / patient).mkdir(parents=True)
        (real_train / patient / "truth.json").write_text("{}")
        for variant in ("slices_6mm", "low_dose"):
            for sub, suffix in (("imagesTr", ".nii.gz"), ("labelsTr", ".nii.gz"), ("labelsTr", ".json")):
                (variants / variant / sub).mkdir(parents=True, exist_ok=True)
                (variants / variant / sub / f"{patient}{suffix}").write_bytes(b"")
    sets = patient_sets("qin_lsc_0014", real_train, variants, tmp_path / "fold")
    assert sorted(sets) == ["real-train", "real-train, low_dose", "real-train, slices_6mm"]
    assert [case.resolve() for case in list_cases(sets["real-train"])] == [(real_train / "qin_lsc_0014").resolve()]
    assert [case.name for case in list_cases(sets["real-train, low_dose"])] == ["qin_lsc_0014.nii.gz"]
    assert (sets["real-train, low_dose"] / "labelsTr" / "qin_lsc_0014.json").resolve().parent.parent.name == "low_dose"


def test_a_cross_validation_fold_trains_only_the_learned_stages_that_ship():
    assert shipped_learned_stages(REPO / "models" / "cascade_fp") == ["multiscale_cnn"]


def _node_dataset(root):
    items = []
    for name in ("qin_lsc_0014_s0", "qin_lsc_0014_s1", "qin_lsc_0028_s0"):
        for sub, suffix in (("imagesTr", ".nii.gz"), ("labelsTr", ".nii.gz"), ("labelsTr", ".json")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / f"{name}{suffix}").write_bytes(b"")
        items.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": items}))
    return root


def test_a_node_fold_trains_on_the_other_patients_and_watches_and_tests_its_own(tmp_path):
    data = _node_dataset(tmp_path / "nodes")
    assert patients_of(data) == ["qin_lsc_0014", "qin_lsc_0028"]
    train_dir, test_dir = patient_split(data, "qin_lsc_0014", tmp_path / "fold")
    trained = json.loads((train_dir / "dataset.json").read_text())
    assert [Path(item["image"]).name for item in trained["training"]] == ["qin_lsc_0028_s0.nii.gz"]
    assert [Path(item["label"]).name for item in trained["validation"]] == ["qin_lsc_0014_s0.nii.gz"]
    assert [case.name for case in list_cases(test_dir)] == ["qin_lsc_0014_s0.nii.gz", "qin_lsc_0014_s1.nii.gz"]
    assert sorted(p.name for p in (train_dir / "labelsTr").iterdir()) == ["qin_lsc_0028_s0.json", "qin_lsc_0028_s0.nii.gz"]
    assert (test_dir / "labelsTr" / "qin_lsc_0014_s1.json").resolve().parent == (data / "labelsTr").resolve()
    with pytest.raises(ValueError, match="no case of qin_lsc_0049"):
        patient_split(data, "qin_lsc_0049", tmp_path / "other")


def test_the_node_cross_validation_table_sums_nodes_and_averages_findings_per_scan():
    def ablation(cases, measurable, alone, kept, findings_alone, findings_kept):
        return {"segmentation alone": {"cases": cases, "measurable_lesions": measurable, "detected": alone,
                                       "unlabelled_findings_per_scan": findings_alone},
                "full cascade: multiscale_cnn": {"cases": cases, "measurable_lesions": measurable, "detected": kept,
                                                 "unlabelled_findings_per_scan": findings_kept}}

    rows = [fold_row("a", {"ablations": {"nodes": ablation(4, 20, 15, 10, 8.0, 2.0),
                                         "original scan": ablation(1, 1, 1, 1, 10.0, 2.0)}}),
            fold_row("b", {"ablations": {"nodes": ablation(2, 10, 9, 5, 5.0, 0.5),
                                         "original scan": ablation(1, 1, 1, 1, 20.0, 5.0)}})]
    assert rows[0]["kept"] == 10 and rows[1]["original_kept"] == 5.0
    last = format_table(rows).splitlines()[-1]
    assert last == "| all (2 folds) | 24 / 30, 15 / 30 | 7.0, 1.50 | 15.0, 3.5 per scan |"
