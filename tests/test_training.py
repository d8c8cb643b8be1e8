"""A tiny real training run on phantoms: the loss falls, the export loads and matches the eager model."""

import json

import numpy as np
import pytest
import torch

from training.export import export
from training.phantom import Scanner, generate_phantom
from training.phantom_io import write_phantom_nifti
from training.train import PRESETS, build_network, learning_rate, train

TINY = dict(PRESETS["cpu"], filters=[4, 8, 16], patch_size=[16, 32, 32], batch_size=4, samples_per_volume=4,
            iterations=60, validate_every=60, learning_rate=1e-2, threads=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    scanner = Scanner(pixel_mm=0.9, slice_mm=3.0, rows=512, kernel="SOFT", noise_sd=15.0,
                      contrast=False, signed_storage=True, circular_fov=False)
    items = []
    for seed in (101, 102, 103):
        phantom = generate_phantom(seed, lesion_count=4, scanner=scanner, slices=30)
        name = f"case{seed}"
        write_phantom_nifti(phantom, root / "imagesTr" / f"{name}.nii.gz", root / "labelsTr" / f"{name}.nii.gz")
        items.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": items[:2], "validation": items[2:]}))
    return root


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    state = train(dataset, run_dir, dict(TINY))
    return run_dir, state


def test_loss_falls(run):
    run_dir, state = run
    assert state["iteration"] == TINY["iterations"]
    history = json.loads((run_dir / "history.json").read_text())
    assert history[-1]["iteration"] == TINY["iterations"]
    saved = torch.load(run_dir / "last.pt", weights_only=False)
    losses = saved["state"]["losses"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_export_matches_eager(run, tmp_path):
    run_dir, _ = run
    path = export(run_dir, tmp_path / "lesion_seg", checkpoint="last.pt")
    spec = json.loads((tmp_path / "lesion_seg" / "model.json").read_text())
    assert spec["spacing_mm"] == TINY["spacing_mm"] and spec["intensity_window_hu"] == TINY["intensity_window_hu"]
    scripted = torch.jit.load(str(path))
    saved = torch.load(run_dir / "last.pt", weights_only=False)
    eager = build_network(saved["config"])
    eager.load_state_dict(saved["model"])
    eager.eval()
    x = torch.rand(1, 1, 32, 48, 64)  # another size than the training patch
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-4)


def test_schedule_warms_up_then_anneals_to_zero():
    config = dict(TINY, learning_rate=1.0)
    rates = [learning_rate(config, p) for p in np.linspace(0, 1, 101)]
    assert rates[0] == pytest.approx(0.1) and max(rates) == pytest.approx(1.0, abs=1e-3)
    assert rates[5] == pytest.approx(1.0, abs=1e-3) and rates[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:]))


def test_wall_clock_budget_ends_training(dataset, tmp_path):
    state = train(dataset, tmp_path, dict(TINY, iterations=10_000, validate_every=10_000, max_minutes=0.4))
    assert 0 < state["iteration"] < 10_000
    assert json.loads((tmp_path / "history.json").read_text())[-1]["iteration"] == state["iteration"]
