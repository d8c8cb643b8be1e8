"""Thoracic box: holds every truth lesion (real cases and phantoms), refuses series without lungs, is fast."""

import json
import time

import numpy as np
import pytest

from scipy.spatial import ConvexHull

from operators.thorax_crop import NoThoraxError, _axial_convex_hulls, body_and_lung_masks, crop_thorax
from tests.conftest import REAL_CASES, hu_volume, read_series, real_case


def _lesion_voxels_outside(label: np.ndarray, box) -> int:
    inside = np.zeros(label.shape, bool)
    inside[box] = True
    return int(((label > 0) & ~inside).sum())


@pytest.mark.parametrize("case", [c for c in REAL_CASES if c != "abdomen_negative"])
def test_box_holds_real_lesions(case):
    folder = real_case(case)
    truth = json.loads((folder / "truth.json").read_text())
    datasets = read_series(folder / "dicom", truth["series_uid"])
    label = np.load(folder / "truth.npz")["label"][::-1]  # head first there, feet first here
    crop = crop_thorax(hu_volume(datasets), truth["spacing_mm"])
    assert _lesion_voxels_outside(label, crop.box) == 0
    assert crop.body.shape == crop.lungs.shape == crop.shape


def test_real_abdomen_has_no_thorax():
    folder = real_case("abdomen_negative")
    truth = json.loads((folder / "truth.json").read_text())
    with pytest.raises(NoThoraxError, match="no thorax in this series"):
        crop_thorax(hu_volume(read_series(folder / "dicom")), truth["spacing_mm"])


def test_box_holds_phantom_lesions(phantom_study):
    phantom = phantom_study[1]
    crop = crop_thorax(phantom.hu.astype(np.float32), phantom.spacing)
    assert phantom.label.max() > 0
    assert _lesion_voxels_outside(phantom.label, crop.box) == 0
    lungs_inside = np.zeros(phantom.hu.shape, bool)
    lungs_inside[crop.box] = crop.lungs
    assert (lungs_inside & phantom.lungs).sum() >= 0.9 * phantom.lungs.sum()


@pytest.mark.parametrize("seed", [11, 12])
def test_box_holds_lesions_of_more_phantoms(seed):
    from training.phantom import generate_phantom

    phantom = generate_phantom(seed, lesion_count=8, slices=60)
    crop = crop_thorax(phantom.hu.astype(np.float32), phantom.spacing)
    assert _lesion_voxels_outside(phantom.label, crop.box) == 0


def test_no_lungs_no_thorax():
    water = np.full((40, 128, 128), -1000.0, np.float32)
    water[:, 20:108, 20:108] = 0.0
    with pytest.raises(NoThoraxError, match="no thorax in this series"):
        crop_thorax(water, (2.0, 2.0, 2.0))


def test_masks_are_fast_on_a_large_volume(phantom_study):
    hu = phantom_study[1].hu.astype(np.float32)
    start = time.perf_counter()
    body, lungs = body_and_lung_masks(hu, phantom_study[1].spacing)
    crop_thorax(hu, phantom_study[1].spacing)
    assert time.perf_counter() - start < 10.0
    assert body.shape == lungs.shape == hu.shape and not (lungs & ~body).any()


def test_axial_convex_hulls_hold_exactly_the_hull_voxels():
    """Filled row by row, the hulls hold exactly the voxels that every hull edge keeps (on an edge: inside)."""
    rng = np.random.default_rng(3)
    planes = np.zeros((6, 40, 50), bool)
    for plane in planes[:4]:
        for _ in range(3):  # blobs, some far apart, so that hull edges cross empty rows and columns
            y, x = rng.integers(0, 36), rng.integers(0, 46)
            plane[y:y + rng.integers(1, 5), x:x + rng.integers(1, 5)] = True
    planes[4, 5:30, 10] = True  # all on a line: no hull
    grid = np.indices(planes.shape[1:]).reshape(2, -1).T
    hulls = _axial_convex_hulls(planes)
    assert not hulls[4:].any()  # a line, an empty plane
    for plane, hull in zip(planes[:4], hulls[:4]):
        equations = ConvexHull(np.argwhere(plane)).equations
        inside = (grid @ equations[:, :2].T + equations[:, 2] <= 1e-9).all(axis=1)
        assert np.array_equal(hull, inside.reshape(hull.shape))


def _thin_walled_chest(spacing=(2.0, 0.8, 0.8), slices=60):
    """HU [z, y, x]: an elliptical body (224 x 160 mm) of aerated lung behind a 14 mm chest wall that is only
    6 mm thick in three places, with a mediastinum and a 35 mm thick back, 10 mm above a table. Returns HU,
    spacing and the lung voxel count."""
    y, x = np.mgrid[:400, :400] * spacing[1]
    radius, angle = np.hypot(y - 160, (x - 160) / 1.4), np.degrees(np.arctan2(y - 160, (x - 160) / 1.4))
    thin = (np.abs(angle + 90) < 10) | (np.abs(angle + 30) < 10) | (np.abs(angle + 150) < 10)
    plane = np.full(radius.shape, -1000.0)
    plane[radius < 80] = -850.0
    plane[(radius < 80) & ((radius >= 66) & ~thin | (radius >= 74))] = -100.0
    plane[(radius < 80) & ((np.abs(x - 160) < 15) | (y > 205))] = 40.0
    plane[(y > 250) & (y < 256) & (np.abs(x - 160) < 130)] = 200.0  # table
    return np.repeat(plane[None].astype(np.float32), slices, axis=0), spacing, (plane == -850.0).sum() * slices


def test_lungs_inside_a_thin_chest_wall():
    """A chest wall thinner in places than the opening that detaches the table still encloses the lungs."""
    hu, spacing, lung_voxels = _thin_walled_chest()
    crop = crop_thorax(hu, spacing)
    assert crop.lung_volume_ml == pytest.approx(lung_voxels * np.prod(spacing) / 1000.0, rel=0.1)
    assert crop.box[1].stop * spacing[1] < 240 + 30 + 5  # the body's back (240 mm) plus the 30 mm margin


@pytest.mark.parametrize("outside_circle", [None, -1024.0, -3024.0])
def test_lungs_cut_open_by_a_narrow_field_of_view(phantom_study, outside_circle):
    """A field of view narrower than the chest (cardiac, targeted reconstructions) cuts the lungs open at the
    image edge or the reconstruction circle: they are still lungs, and the lesions lie in the box."""
    phantom = phantom_study[1]
    lungs_y, lungs_x = (np.flatnonzero(phantom.lungs.any(axis=axes)) for axes in ((0, 2), (0, 1)))
    columns = slice(lungs_x[0] + 20, lungs_x[-1] - 20)  # about 15 mm of each lung outside the square image
    centre, half = (lungs_y[0] + lungs_y[-1]) // 2, (columns.stop - columns.start) // 2
    square = (slice(None), slice(centre - half, centre + half), columns)
    hu, lungs, label = (a[square].copy() for a in (phantom.hu.astype(np.float32), phantom.lungs, phantom.label))
    if outside_circle is not None:
        y, x = np.ogrid[:hu.shape[1], :hu.shape[2]]
        half = hu.shape[2] / 2
        hu[:, (y - half) ** 2 + (x - half) ** 2 > half ** 2] = outside_circle
    crop = crop_thorax(hu, phantom.spacing)
    found = np.zeros(hu.shape, bool)
    found[crop.box] = crop.lungs
    assert (found & lungs).sum() >= 0.8 * lungs.sum()
    assert _lesion_voxels_outside(label, crop.box) == 0
