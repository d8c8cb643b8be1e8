"""Candidates: probability on the input grid, instances, and the cascade's feature stage."""

import json

import numpy as np
import pytest
import torch

from operators.cascade_fp import filter_candidates, thorax_region
from operators.lesion_segmentation import extract_candidates, predict_lesion_probability
from operators.thorax_crop import ThoraxCrop
from tests.conftest import REPO, WindowedSoftTissue, shipped_feature_stage

MODEL_JSON = json.loads((REPO / "models" / "cascade_fp" / "model.json").read_text())
CONFIG = {**MODEL_JSON, "stages": [shipped_feature_stage(min_long_axis_mm=10.0)]}  # the feature stage alone, 10 mm rule
SPACING = (2.0, 1.0, 1.0)
SHAPE = (40, 160, 160)


def _ball(centre, radius_mm, stretch=(1.0, 1.0, 1.0)):
    grid = np.indices(SHAPE).astype(float)
    distance = sum(((g - c) * s / k) ** 2 for g, c, s, k in zip(grid, centre, SPACING, stretch))
    return distance <= radius_mm ** 2


def _scene():
    """Lungs (-850 HU) in a body (0 HU) with a nodule, a small nodule, a vessel, a bone-dense blob and one outside."""
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[:, 10:150, 10:150] = 0.0
    lungs = np.zeros(SHAPE, bool)
    lungs[2:38, 30:130, 30:130] = True
    hu[lungs] = -850.0
    objects = {
        "lesion": (_ball((20, 60, 60), 8), 30.0),
        "small": (_ball((20, 100, 60), 3), 30.0),
        "vessel": (_ball((20, 60, 100), 3, stretch=(1, 1, 8)), 30.0),
        "dense": (_ball((20, 100, 100), 7), 600.0),
        "outside": (_ball((20, 140, 80), 6), 30.0),
    }
    labels = np.zeros(SHAPE, np.int32)
    for number, (mask, value) in enumerate(objects.values(), start=1):
        hu[mask] = value
        labels[mask] = number
    return hu, lungs, labels, list(objects)


def test_feature_stage_keeps_only_the_lesion():
    hu, lungs, labels, names = _scene()
    candidates = extract_candidates((labels > 0).astype(np.float32), 0.5, SPACING)
    assert candidates.count == len(names)
    full = tuple(slice(0, n) for n in SHAPE)
    result = filter_candidates(candidates, hu, SPACING, ThoraxCrop(full, hu > -500, lungs, 0.0), CONFIG)
    reasons = {names[labels[candidates.labels == k][0] - 1]: f.get("dropped_by", "kept")
               for k, f in enumerate(result.features, start=1)}
    assert reasons == {"lesion": "kept", "small": "measured_features: size", "vessel": "measured_features: shape",
                       "dense": "measured_features: intensity", "outside": "measured_features: location"}
    assert result.labels.max() == 1 and len(result.scores) == 1
    assert (result.labels == 1).sum() == (labels == 1).sum()


def test_thorax_region_keeps_a_mass_that_replaces_the_lateral_lung():
    lungs = np.zeros(SHAPE, bool)
    lungs[2:38, 30:130, 30:130] = True
    lungs[18:24, :, 30:70] = False  # 12 mm of slices where a mass replaces the lateral lung
    lungs[:, :, 75:85] = False  # the mediastinum between the lungs
    region = thorax_region(lungs, SPACING)
    assert region[18:24, 30:130, 30:130].all()  # the neighbouring slices' lung spans the mass
    assert not region[:2].any() and not region[38:].any()  # no lung: outside the thorax
    assert not region[:, :30].any() and not region[:, :, 130:].any()


def test_unknown_stage_type_is_refused():
    hu, lungs, labels, _ = _scene()
    candidates = extract_candidates((labels > 0).astype(np.float32), 0.5, SPACING)
    config = {"stages": [{"order": 1, "name": "svm", "type": "svm"}]}
    with pytest.raises(ValueError, match="not supported"):
        filter_candidates(candidates, hu, SPACING, ThoraxCrop((slice(0, 40),) * 3, lungs, lungs, 0.0), config)


def test_candidates_drop_specks_and_report_probabilities():
    probability = np.zeros(SHAPE, np.float32)
    probability[_ball((20, 60, 60), 6)] = 0.9
    probability[20, 120, 120] = 0.99  # one voxel: a speck
    candidates = extract_candidates(probability, 0.5, SPACING)
    assert candidates.count == 1 and candidates.labels.max() == 1
    assert candidates.max_probability[0] == pytest.approx(0.9) and candidates.mean_probability[0] == pytest.approx(0.9)


def test_probability_comes_back_on_the_input_grid():
    hu, _, labels, _ = _scene()
    config = {"spacing_mm": [2.0, 1.5, 1.5], "intensity_window_hu": [-1000, 500], "patch_size": [16, 48, 48],
              "overlap": 0.25, "sw_batch_size": 1}
    probability = predict_lesion_probability(hu, SPACING, torch.jit.script(WindowedSoftTissue()), config)
    assert probability.shape == hu.shape and probability.dtype == np.float32
    assert 0.0 <= probability.min() and probability.max() <= 1.0
    assert probability[labels == 1].mean() > 0.5 > probability[hu == -1000].mean()
