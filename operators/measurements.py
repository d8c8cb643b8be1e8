"""Lesion geometry on a voxel grid: RECIST axial diameters and 26-connected instances.

Arrays are indexed [z, y, x] (slice, row, column); spacing is (z, y, x) in mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError


@dataclass(frozen=True)
class AxialDiameters:
    """Longest axial diameter and its perpendicular short axis (RECIST 1.1), in mm.

    The end points are (z, y, x) voxel coordinates on the slice `slice_index`.
    """

    long_mm: float
    short_mm: float
    slice_index: int
    long_endpoints: tuple[tuple[float, float, float], tuple[float, float, float]]
    short_endpoints: tuple[tuple[float, float, float], tuple[float, float, float]]


def label_instances(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected components of a binary mask: (int32 labels, count)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    return labels.astype(np.int32), int(count)


def _hull_points(points_mm: np.ndarray) -> np.ndarray:
    """Vertices of the 2D convex hull (all points when they are too few or collinear)."""
    if len(points_mm) < 4:
        return points_mm
    try:
        return points_mm[ConvexHull(points_mm).vertices]
    except QhullError:
        return points_mm


def _slice_diameters(yx: np.ndarray, spacing_yx: np.ndarray):
    """Longest diameter and longest perpendicular width of one slice's voxels (corner-to-corner extent)."""
    # Each voxel is a square: measure between its corners so a single voxel spans one pixel.
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    pts = (yx[:, None, :] + corners[None]).reshape(-1, 2) * spacing_yx
    hull = _hull_points(pts)
    dist = np.linalg.norm(hull[:, None] - hull[None], axis=-1)
    i, j = np.unravel_index(np.argmax(dist), dist.shape)
    long_mm = float(dist[i, j])
    direction = (hull[j] - hull[i]) / max(long_mm, 1e-9)
    normal = np.array([-direction[1], direction[0]])
    across = hull @ normal
    k, m = int(np.argmin(across)), int(np.argmax(across))
    short_mm = float(across[m] - across[k])
    # Short axis end points: the extreme hull points, projected onto the line through the long axis midpoint.
    mid = (hull[i] + hull[j]) / 2
    along_mid = mid @ direction
    short_a = normal * across[k] + direction * along_mid
    short_b = normal * across[m] + direction * along_mid
    to_voxel = lambda p: p / spacing_yx  # noqa: E731
    return long_mm, short_mm, (to_voxel(hull[i]), to_voxel(hull[j])), (to_voxel(short_a), to_voxel(short_b))


def axial_diameters(mask: np.ndarray, spacing: tuple[float, float, float]) -> AxialDiameters:
    """RECIST axial diameters of one lesion mask: the slice with the longest in-plane diameter wins."""
    spacing_yx = np.asarray(spacing[1:], float)
    best = None
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        yx = np.argwhere(mask[z]).astype(float)
        long_mm, short_mm, long_pts, short_pts = _slice_diameters(yx, spacing_yx)
        if best is None or long_mm > best[0]:
            best = (long_mm, short_mm, int(z), long_pts, short_pts)
    if best is None:
        return AxialDiameters(0.0, 0.0, -1, ((0, 0, 0), (0, 0, 0)), ((0, 0, 0), (0, 0, 0)))
    long_mm, short_mm, z, long_pts, short_pts = best
    as_zyx = lambda pair: tuple((float(z), float(p[0]), float(p[1])) for p in pair)  # noqa: E731
    return AxialDiameters(long_mm, short_mm, z, as_zyx(long_pts), as_zyx(short_pts))
