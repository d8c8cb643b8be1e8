"""Lesion library and insertion CLI: placement, appearance, determinism, I/O."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from training.insert_lesions import main, read_dicom_series
from training.lesions import DEFAULT_KINDS, KIND_WEIGHTS, estimate_noise_and_blur, insert_lesions
from training.nifti import read_nifti, write_nifti

SPACING = (2.0, 1.25, 1.25)
SOLID_KINDS = ["solid", "lobulated", "spiculated", "juxtapleural", "juxtavascular", "perihilar", "mass"]


def torso(blur_mm=0.0, noise_sd=0.0, seed=0):
    """A simple chest: soft-tissue body in air, two lungs with vessels, fat mediastinum between them."""
    nz, ny, nx = 90, 200, 240
    z, y, x = (np.arange(n, dtype=np.float32) * sp for n, sp in zip((nz, ny, nx), SPACING))
    z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
    cy, cx = ny * SPACING[1] / 2, nx * SPACING[2] / 2
    hu = np.full((nz, ny, nx), -1000.0, np.float32)
    body = np.broadcast_to(((y - cy) / 115) ** 2 + ((x - cx) / 145) ** 2 < 1, hu.shape)
    hu[body] = 40.0
    lungs = np.zeros(hu.shape, bool)
    for side in (-1, 1):
        lungs |= ((z - 90) / 80) ** 2 + ((y - cy) / 85) ** 2 + ((x - cx - side * 62) / 48) ** 2 < 1
    mediastinum = (np.abs(x - cx) < 12) & (np.abs(y - cy) < 60) & (np.abs(z - 90) < 60)
    hu[lungs] = -850.0
    hu[mediastinum] = -80.0
    vessels = np.zeros(hu.shape, bool)
    for side in (-1, 1):
        for dy in (-40, -10, 25, 50):
            vessels |= ((y - cy - dy) ** 2 + (x - cx - side * (62 + dy / 3)) ** 2 < 2.5 ** 2) & lungs
    hu[vessels] = 40.0
    if blur_mm:
        hu = ndimage.gaussian_filter(hu, blur_mm / np.asarray(SPACING))
    if noise_sd:
        hu += np.random.default_rng(seed).normal(0, noise_sd, hu.shape).astype(np.float32)
    return hu, lungs, mediastinum


@pytest.fixture(scope="module")
def background():
    return torso()


def insert(background, seed=0, count=10, **kwargs):
    hu, lungs, mediastinum = background
    return insert_lesions(hu, SPACING, lungs, mediastinum, np.random.default_rng(seed), count, **kwargs)


def test_labels_only_in_lungs_or_mediastinum_and_apart(background):
    hu, lungs, mediastinum = background
    out, labels, lesions = insert(background, seed=1, count=10)
    assert out.dtype == np.float32 and labels.dtype == np.int16
    assert 5 <= len(lesions) <= 10
    assert sorted(np.unique(labels[labels > 0])) == [lesion["label"] for lesion in lesions]
    assert not (labels > 0)[~(lungs | mediastinum)].any()
    for lesion in lesions:  # no two lesions touch
        grown = ndimage.binary_dilation(labels == lesion["label"])
        assert set(np.unique(labels[grown])) <= {0, lesion["label"]}


def test_deterministic_by_seed(background):
    a = insert(background, seed=4, count=6)
    b = insert(background, seed=4, count=6)
    c = insert(background, seed=5, count=6)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[1], c[1])


def test_fewer_when_room_lacks_and_zero_count(background):
    hu, lungs, mediastinum = background
    small = np.zeros_like(lungs)
    small[40:46, 95:105, 50:60] = True  # about 12 x 12 x 12 mm of lung
    _, labels, lesions = insert_lesions(hu, SPACING, small, None, np.random.default_rng(0), 5, size_range_mm=(10, 40))
    assert len(lesions) <= 1 and not (labels > 0)[~small].any()
    out, labels, lesions = insert(background, count=0)
    assert lesions == [] and not labels.any() and np.array_equal(out, hu)


@pytest.mark.parametrize("kind", list(KIND_WEIGHTS))
def test_each_kind_renders_with_its_hu(background, kind):
    hu, lungs, mediastinum = background
    out, labels, lesions = insert(background, seed=2, count=3, kinds=[kind], size_range_mm=(16, 30))
    assert lesions and all(lesion["kind"] == kind for lesion in lesions)
    for lesion in lesions:
        mask = labels == lesion["label"]
        core = ndimage.binary_erosion(mask, iterations=1)
        values = out[core]
        if kind in SOLID_KINDS:
            assert -10 <= np.median(values) <= 70
        elif kind == "node":
            assert 15 <= np.median(values) <= 65 and mask[mediastinum].sum() == mask.sum()
        elif kind == "ggo":
            assert -650 <= np.median(values) <= -300
        elif kind == "faint_ggo":
            assert -850 <= np.median(values) <= -500
        elif kind == "part_solid":
            assert np.median(values) < -300 and values.max() > -50
        elif kind == "cavitating":
            assert values.min() < -800 and np.percentile(values, 90) > -50
        if kind != "node":
            assert mask[lungs].sum() == mask.sum()


@pytest.mark.parametrize("kind", ["juxtapleural", "mass"])
def test_pleural_kinds_touch_chest_wall_or_mediastinum(background, kind):
    hu, lungs, _ = background
    wall = ~lungs & (hu > -300)
    _, labels, lesions = insert(background, seed=3, count=4, kinds=[kind], size_range_mm=(5, 90))
    assert lesions
    for lesion in lesions:
        assert (ndimage.binary_dilation(labels == lesion["label"], iterations=2) & wall).any()


def test_juxtavascular_touches_a_vessel(background):
    hu, lungs, _ = background
    vessels = lungs & (hu > -300)
    _, labels, lesions = insert(background, seed=3, count=4, kinds=["juxtavascular"], size_range_mm=(5, 30))
    assert lesions
    for lesion in lesions:
        mask = labels == lesion["label"]
        assert (ndimage.binary_dilation(mask, iterations=2) & ~mask & vessels).any()


def test_size_distribution(background):
    lesions = [lesion for seed in range(6) for lesion in insert(background, seed=10 + seed, count=10)[2]]
    assert {lesion["kind"] for lesion in lesions} <= set(DEFAULT_KINDS)  # masses and faint ground glass only when named
    diameters = np.array([lesion["diameter_mm"] for lesion in lesions])
    assert diameters.min() >= 3 and diameters.max() <= 60
    assert np.median(diameters) < 20 and (diameters < 10).sum() > (diameters >= 40).sum()  # more small than big
    assert 0.3 <= (diameters >= 10).mean() <= 0.9  # and plenty of measurable ones


def test_blur_and_noise_match_the_background():
    hu, lungs, mediastinum = torso(blur_mm=1.0, noise_sd=20.0)
    noise, blur = estimate_noise_and_blur(hu, SPACING, lungs)
    assert 15 < noise < 25
    assert 0.6 < blur[2] < 1.5 and blur[0] >= SPACING[0] / 2.355
    for noise_sd_hu, low, high in ((noise, 0.8, 1.4), (0.0, 0.0, 0.5)):  # lesion core SD vs the background's
        out, labels, lesions = insert_lesions(hu, SPACING, lungs, mediastinum, np.random.default_rng(0), 3, blur_sigma_mm=blur,
                                              noise_sd_hu=noise_sd_hu, kinds=["solid"], size_range_mm=(25, 30))
        assert lesions
        for lesion in lesions:
            core = ndimage.binary_erosion(labels == lesion["label"], iterations=3)
            assert low * noise < out[core].std() < high * noise


def test_read_dicom_series_sorts_and_rescales(tmp_path, background):
    from training.phantom_io import write_dicom_series

    hu = np.clip(background[0][::6, ::4, ::4], -1024, 3071).astype(np.int16)
    scanner = SimpleNamespace(signed_storage=False, contrast=False, slice_mm=SPACING[0], kernel="B30f", pixel_mm=1.25)
    write_dicom_series(SimpleNamespace(hu=hu, scanner=scanner, seed=1, origin=(-100.0, -80.0, 20.0)), tmp_path / "ct")
    volume, spacing, origin = read_dicom_series(tmp_path / "ct")
    assert np.array_equal(volume, hu) and spacing == (SPACING[0], 1.25, 1.25) and origin == (-100.0, -80.0, 20.0)


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a CT")
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "notes.txt", tmp_path / "empty"):
        with pytest.raises(SystemExit) as exit_:
            main(["--input", str(bad), "--out", str(tmp_path / "out"), "--seed", "1"])
        assert str(exit_.value).startswith("insert_lesions: ") and "\n" not in str(exit_.value)


def test_cli_on_nifti_background(tmp_path, background):
    pytest.importorskip("operators.thorax_crop", reason="operators/thorax_crop.py not there yet")
    hu, lungs, _ = background
    write_nifti(tmp_path / "normal chest.nii.gz", np.rint(hu).astype(np.int16), SPACING)
    main(["--input", str(tmp_path / "normal chest.nii.gz"), "--out", str(tmp_path / "ds"), "--seed", "3", "--count", "5"])
    image, spacing = read_nifti(tmp_path / "ds" / "imagesTr" / "normal_chest.nii.gz")
    labels, _ = read_nifti(tmp_path / "ds" / "labelsTr" / "normal_chest.nii.gz")
    record = json.loads((tmp_path / "ds" / "normal_chest.json").read_text())
    assert image.shape == labels.shape == hu.shape and np.allclose(spacing, SPACING)
    assert 1 <= len(record["lesions"]) <= 5 and labels.max() == len(record["lesions"])
    assert (labels > 0).sum() and (np.asarray(labels) > 0)[~ndimage.binary_dilation(lungs, iterations=2)].sum() == 0


def test_nodes_at_fat_sites_stay_out_of_lung_enhanced_vessels_and_bone(background):
    """Real backgrounds (node_sites="fat"): centred in fat, displacing at most a third of unenhanced soft tissue."""
    hu, lungs, mediastinum = (array.copy() for array in background)
    vessel, oesophagus = np.zeros_like(mediastinum), np.zeros_like(mediastinum)
    vessel[:, 105:112, 93:99] = oesophagus[:, 70:76, 93:99] = True
    hu[vessel], hu[oesophagus] = 200.0, 40.0
    fat = mediastinum & ~vessel & ~oesophagus
    nodes = [lesion for seed in range(3) for lesion in insert_lesions(
        hu, SPACING, lungs, fat, np.random.default_rng(seed), 3, kinds=["node"], size_range_mm=(10, 30),
        node_sites="fat")[2]]
    assert len(nodes) >= 6
    out, labels, lesions = insert_lesions(hu, SPACING, lungs, fat, np.random.default_rng(0), 3, kinds=["node"],
                                          size_range_mm=(10, 30), node_sites="fat")
    for lesion in lesions:
        mask = labels == lesion["label"]
        assert not (mask & (lungs | vessel)).any() and (mask & fat).sum() >= 2 / 3 * mask.sum()
        assert 15 <= np.median(out[ndimage.binary_erosion(mask)]) <= 65
    with pytest.raises(ValueError, match="node_sites"):
        insert_lesions(hu, SPACING, lungs, fat, np.random.default_rng(0), 1, node_sites="anywhere")
