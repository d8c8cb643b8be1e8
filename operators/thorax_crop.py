"""Thoracic bounding box: body and lung masks from HU, the box around the lungs plus a margin.

Plain functions (numpy in, numpy out; arrays [z, y, x], spacing (z, y, x) mm):
- `body_and_lung_masks(hu, spacing) -> (body, lungs)`: bool masks on the input grid.
- `crop_thorax(hu, spacing, margin_mm) -> ThoraxCrop`: the box (slices) and the masks inside it.

The masks are computed on a grid of about MASK_GRID_MM (strided sampling after a box filter), so a
512 x 512 x 300 volume takes a few seconds, and brought back to the input grid by nearest neighbour.
The margin keeps lesions that push the lung boundary inwards: juxtapleural (chest wall), hilar and
mediastinal lesions, and apical or basal lesions beyond the aerated lung.

Lungs are the air that the body encloses, and also, where a field of view narrower than the chest
(cardiac or targeted reconstructions; checked on real-train scans cut to 153-347 mm) cuts them open
at the image edge or the reconstruction circle, the air that touches that edge and looks like lung
(median above CUT_LUNG_MEDIAN_HU, partly inside the body's convex outline), unlike the plain air
around the body.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from monai.deploy.core import Fragment, Operator, OperatorSpec

from operators.volume import CTVolume, StudyError, timed_compute

log = logging.getLogger(__name__)

MASK_GRID_MM = 3.0
BODY_HU = -500.0  # soft tissue and bone above, air below
LUNG_HU = -400.0  # aerated lung below (inside the body)
MIN_LUNG_ML = 250.0  # less aerated lung than this (both lungs together): not a chest CT
MIN_LUNG_PART_ML = 5.0  # air pockets inside the body smaller than this are not lung
DEFAULT_MARGIN_MM = 30.0
CHEST_WALL_MM = 6.0  # the thinnest chest wall expected outside the lungs
NOT_IMAGED_HU = -1100.0  # below any air: padding outside the reconstruction circle
# Lung cut open by the field of view (see _coarse_masks): at least this large, its median above plain air's (parenchyma
# and vessels; the air around a body has its median below), and this share of it in the body's convex outline.
MIN_CUT_LUNG_ML = 50.0
CUT_LUNG_MEDIAN_HU = -900.0
CUT_LUNG_IN_OUTLINE = 0.1
HULL_TOLERANCE = 1e-6  # voxels: a voxel centre this close to a hull edge lies on it


class NoThoraxError(StudyError):
    """The series shows no lungs."""


@dataclass
class ThoraxCrop:
    """The thoracic box on the input grid and the masks inside it (arrays have the box's shape)."""

    box: tuple[slice, slice, slice]
    body: np.ndarray
    lungs: np.ndarray
    lung_volume_ml: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.box)


def _strides(spacing) -> tuple[int, int, int]:
    return tuple(max(1, int(round(MASK_GRID_MM / s))) for s in spacing)


def _fill_axial_holes(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(plane) for plane in mask])


def _axial_convex_hulls(mask: np.ndarray) -> np.ndarray:
    """Per axial plane, the mask's filled convex hull: the hull of each row's first and last voxel (the same hull),
    filled row by row between the column bounds that its edges set (voxels on an edge are inside)."""
    hulls = np.zeros_like(mask)
    for z, plane in enumerate(mask):
        rows = np.flatnonzero(plane.any(axis=1))
        if len(rows) == 0:
            continue
        inner = plane[rows[0]:rows[-1] + 1]
        filled = np.flatnonzero(inner.any(axis=1))
        first = np.argmax(inner[filled], axis=1)
        last = inner.shape[1] - 1 - np.argmax(inner[filled, ::-1], axis=1)
        ends = np.concatenate([np.stack([filled, first], 1), np.stack([filled, last], 1)])
        try:
            equations = ConvexHull(ends).equations
        except (QhullError, ValueError):  # fewer than three points, or all on a line
            continue
        # Edge (a, b, d) keeps (row r, column c) where a r + b c + d <= 0: a column bound per row where b != 0.
        slack = -(np.arange(len(inner))[:, None] * equations[:, 0] + equations[:, 2])  # b c <= slack
        b = equations[:, 1]
        low = np.ceil(slack[:, b < 0] / b[b < 0] - HULL_TOLERANCE).max(axis=1, initial=0)
        high = np.floor(slack[:, b > 0] / b[b > 0] + HULL_TOLERANCE).min(axis=1, initial=plane.shape[1] - 1)
        high[(slack[:, b == 0] < -HULL_TOLERANCE).any(axis=1)] = -1
        columns = np.arange(plane.shape[1])
        hulls[z, rows[0]:rows[-1] + 1] = (columns >= low[:, None]) & (columns <= high[:, None])
    return hulls


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _never_imaged(planes: np.ndarray, strides) -> np.ndarray:
    """Per (row, column) of the strided grid: never imaged in any slice (padding below any air, or the same
    air value in every slice, as outside a reconstruction circle)."""
    never = (planes <= NOT_IMAGED_HU).all(axis=0) | ((planes == planes[0]).all(axis=0) & (planes[0] <= LUNG_HU))
    return ndimage.maximum_filter(never, size=strides[1:])[::strides[1], ::strides[2]]


def _components(mask: np.ndarray, voxel_ml: float, min_ml: float) -> tuple[np.ndarray, list[int]]:
    """Face-connected components of `mask` and the labels of those of at least `min_ml`."""
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1) * voxel_ml
    sizes[0] = 0.0
    return labels, np.flatnonzero(sizes >= min_ml).tolist()


def _coarse_masks(hu: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Body and lung masks on the strided grid, and the strides used."""
    strides = _strides(spacing)
    planes = hu[::strides[0]].astype(np.float32, copy=False)
    # uniform_filter(size=(1, sy, sx)) sampled at every stride: its second pass only along the sampled rows
    rows = ndimage.uniform_filter1d(planes, strides[1], axis=1)[:, ::strides[1]]
    small = ndimage.uniform_filter1d(rows, strides[2], axis=2)[:, :, ::strides[2]]
    tissue = small > BODY_HU
    opened = ndimage.binary_opening(tissue, structure=np.ones((1, 3, 3), bool))  # detaches table, cables
    body = _fill_axial_holes(_largest_component(opened))
    # A chest wall thinner than the opening leaves gaps in the outline, and the lungs outside the body: add what
    # the unopened tissue encloses deeper than a chest wall inside the body's convex outline (not the air
    # between the back and a curved table pad).
    outline = _axial_convex_hulls(body)
    inner = ndimage.binary_erosion(outline, np.ones((1, 3, 3), bool),
                                   iterations=max(1, round(CHEST_WALL_MM / MASK_GRID_MM)))
    body |= _fill_axial_holes(tissue) & inner
    voxel_ml = np.prod(np.asarray(spacing) * strides) / 1000.0
    labels, large = _components(body & (small < LUNG_HU), voxel_ml, MIN_LUNG_PART_ML)
    lungs = np.isin(labels, large)
    # A field of view narrower than the chest (cardiac, targeted reconstructions) cuts the lungs open at its
    # edge, so no outline encloses them: air cut by that edge is lung too when it looks like lung (the air around
    # the body, which the never-imaged area does not join to the lungs, is plain air outside the outline).
    never = _never_imaged(planes, strides)
    edge = ndimage.binary_dilation(never, np.ones((3, 3), bool))
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    open_air = (small < LUNG_HU) & ~lungs & ~never
    labels, large = _components(open_air, voxel_ml, MIN_CUT_LUNG_ML)
    touching = np.intersect1d(large, labels[:, edge])
    if len(touching):
        medians = np.array([np.median(small[labels == label]) for label in touching])  # ndimage.median sorts all
        inside = np.asarray(ndimage.mean(outline, labels, touching))
        lungs |= np.isin(labels, touching[(medians > CUT_LUNG_MEDIAN_HU) & (inside >= CUT_LUNG_IN_OUTLINE)])
    return body | lungs, lungs, strides


def _to_input_grid(mask: np.ndarray, strides, shape, box=None) -> np.ndarray:
    """Nearest-neighbour upsampling of a strided mask onto (a box of) the input grid."""
    box = box or tuple(slice(0, n) for n in shape)
    index = [np.minimum(np.arange(b.start, b.stop) // s, m - 1) for b, s, m in zip(box, strides, mask.shape)]
    return mask.take(index[0], axis=0).take(index[1], axis=1).take(index[2], axis=2)  # 5 x faster than np.ix_


def body_and_lung_masks(hu: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Body (filled outline, lungs included) and aerated lung masks on the input grid."""
    body, lungs, strides = _coarse_masks(hu, spacing)
    return _to_input_grid(body, strides, hu.shape), _to_input_grid(lungs, strides, hu.shape)


def crop_thorax(hu: np.ndarray, spacing, margin_mm: float = DEFAULT_MARGIN_MM) -> ThoraxCrop:
    """The lungs' bounding box grown by `margin_mm` (kept inside the volume); NoThoraxError without lungs."""
    body, lungs, strides = _coarse_masks(hu, spacing)
    lung_ml = float(lungs.sum() * np.prod(np.asarray(spacing) * strides) / 1000.0)
    if lung_ml < MIN_LUNG_ML:
        raise NoThoraxError(f"no thorax in this series (aerated lung {lung_ml:.0f} ml, a chest CT has over "
                            f"{MIN_LUNG_ML:.0f} ml)")
    where = np.argwhere(lungs)
    low, high = where.min(axis=0) * strides, (where.max(axis=0) + 1) * strides
    margin = np.ceil(margin_mm / np.asarray(spacing)).astype(int)
    box = tuple(slice(int(max(lo - m, 0)), int(min(hi + m, n))) for lo, hi, m, n in zip(low, high, margin, hu.shape))
    return ThoraxCrop(box, _to_input_grid(body, strides, hu.shape, box), _to_input_grid(lungs, strides, hu.shape, box),
                      lung_ml)


class ThoraxCropOperator(Operator):
    """CTVolume in ("volume"); the same volume and its ThoraxCrop out ("volume", "thorax")."""

    def __init__(self, fragment: Fragment, *args, margin_mm: float = DEFAULT_MARGIN_MM, **kwargs):
        self.margin_mm = margin_mm
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("volume")
        spec.output("volume")
        spec.output("thorax")

    @timed_compute
    def compute(self, op_input, op_output, context):
        volume: CTVolume = op_input.receive("volume")
        crop = crop_thorax(volume.hu, volume.spacing, self.margin_mm)
        log.info("thorax box %s of %s, lungs %.0f ml", [(s.start, s.stop) for s in crop.box], volume.hu.shape,
                 crop.lung_volume_ml)
        op_output.emit(volume, "volume")
        op_output.emit(crop, "thorax")
