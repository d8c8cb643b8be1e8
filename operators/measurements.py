"""Lesion geometry on a voxel grid: RECIST diameters, 26-connected instances, location and burden.

Arrays are indexed [z, y, x] (slice, row, column); spacing is (z, y, x) in mm; patient
coordinates are DICOM LPS mm (+x patient left, +z head).

Location (`lesion_location`) is a documented heuristic, not an anatomical segmentation: lobes
need fissures, which the aerated-lung mask does not show, so the lung is split into zones.
- side: the lesion centroid's patient x against the midline between the lungs' outer edges;
- zone: upper, middle or lower third of the lungs' craniocaudal extent;
- region: "lung" when at least LUNG_CONTACT of a LUNG_SHELL_MM shell around the lesion is aerated
  lung, or when the lesion lies laterally (offset from the midline at least HILUM_OFFSET of the
  lungs' half width: chest wall contact); otherwise "mediastinum" near the midline (offset below
  MEDIASTINUM_OFFSET) and "hilum" between.
RECIST 1.1 (`recist_burden`): hilar and mediastinal lesions are taken as lymph nodes (target when
the short axis is at least 15 mm, measured by it); lung lesions are target from a long axis of
10 mm. At most five targets, at most two per organ, where the lungs are one organ and all lymph
nodes another (EORTC RECIST FAQ); the largest are chosen.
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
    return labels.astype(np.int32, copy=False), int(count)


def instance_boxes(labels: np.ndarray, count: int = 0) -> list[tuple[slice, ...] | None]:
    """`ndimage.find_objects(labels, count)`, searched within the labelled voxels' bounding box only: instances
    are sparse, and three `any` passes cost a fraction of a search over a whole volume."""
    z = np.flatnonzero(labels.any(axis=(1, 2)))
    if not len(z):
        return [None] * count
    block = labels[z[0]:z[-1] + 1]
    y, x = np.flatnonzero(block.any(axis=(0, 2))), np.flatnonzero(block.any(axis=(0, 1)))
    origin = (z[0], y[0], x[0])
    return [None if box is None else tuple(slice(s.start + o, s.stop + o) for s, o in zip(box, origin))
            for box in ndimage.find_objects(block[:, y[0]:y[-1] + 1, x[0]:x[-1] + 1], count)]


def relabel(labels: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """`mapping[labels]` (int32; 0 must map to 0), computed and written at the labelled voxels only: instances are
    sparse, and the untouched zero pages of a large result cost neither time nor memory."""
    result = np.zeros(labels.shape, np.int32)
    where = np.flatnonzero(labels)
    result.flat[where] = mapping[labels.flat[where]]
    return result


def _hull_points(points_mm: np.ndarray) -> np.ndarray:
    """Vertices of the 2D convex hull (all points when they are too few or collinear)."""
    if len(points_mm) < 4:
        return points_mm
    try:
        return points_mm[ConvexHull(points_mm).vertices]
    except QhullError:
        return points_mm


def _slice_diameters(yx: np.ndarray, spacing_yx: np.ndarray):
    """Longest diameter (corner to corner) and the longest chord perpendicular to it of one slice's voxels."""
    # Each voxel is a square: measure between its corners so a single voxel spans one pixel.
    corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    pts = (yx[:, None, :] + corners[None]).reshape(-1, 2) * spacing_yx
    hull = _hull_points(pts)
    dist = np.linalg.norm(hull[:, None] - hull[None], axis=-1)
    i, j = np.unravel_index(np.argmax(dist), dist.shape)
    long_mm = float(dist[i, j])
    direction = (hull[j] - hull[i]) / max(long_mm, 1e-9)
    normal = np.array([-direction[1], direction[0]])
    # Short axis: the longest chord perpendicular to the long axis, over strips of pixels one pixel wide
    # across the long axis (a hull width would overstate it when the long axis runs corner to corner).
    centres = yx * spacing_yx
    along, across = centres @ direction, centres @ normal
    half_along, half_across = 0.5 * np.abs(direction) @ spacing_yx, 0.5 * np.abs(normal) @ spacing_yx
    strip = np.floor((along - along.min()) / (2 * half_along)).astype(int)
    low, high = np.full(strip.max() + 1, np.inf), np.full(strip.max() + 1, -np.inf)
    np.minimum.at(low, strip, across - half_across)
    np.maximum.at(high, strip, across + half_across)
    k = int(np.argmax(high - low))
    short_mm = float(high[k] - low[k])
    at = along.min() + (2 * k + 1) * half_along
    short_a, short_b = normal * low[k] + direction * at, normal * high[k] + direction * at
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


def longest_diameter_3d(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Longest 3D diameter of a mask in mm: the longest distance between voxel centres plus one voxel's
    extent along it (so a single voxel measures its own size).

    Only surface voxels can hold the extremes, so the pairs are taken from their convex hull.
    """
    surface = mask & ~ndimage.binary_erosion(mask)
    points = np.argwhere(surface) * np.asarray(spacing, float)
    try:
        points = points[ConvexHull(points).vertices]
    except QhullError:  # flat or tiny: all points
        pass
    # Pairwise distances in blocks, so a large hull does not need a full distance matrix.
    longest, ends = 0.0, (points[0], points[0])
    for start in range(0, len(points), 1024):
        squared = ((points[start:start + 1024, None] - points[None]) ** 2).sum(-1)
        i, j = np.unravel_index(np.argmax(squared), squared.shape)
        if squared[i, j] > longest ** 2:
            longest, ends = float(np.sqrt(squared[i, j])), (points[start + i], points[j])
    direction = (ends[1] - ends[0]) / longest if longest else np.array([1.0, 0.0, 0.0])
    return longest + float(np.abs(direction) @ np.asarray(spacing, float))


LUNG_SHELL_MM = 5.0
LUNG_CONTACT = 0.5
MEDIASTINUM_OFFSET = 0.25
HILUM_OFFSET = 0.5


def lung_contact(mask: np.ndarray, lungs: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Share of the LUNG_SHELL_MM shell around `mask` that is aerated lung.

    Both arrays cover the lesion's box padded by at least the shell width.
    """
    shell = (ndimage.distance_transform_edt(~mask, sampling=spacing) <= LUNG_SHELL_MM) & ~mask
    return float(lungs[shell].mean()) if shell.any() else 0.0


def lesion_location(centroid_mm, contact: float, lung_box_mm: tuple[float, float, float, float]) -> dict:
    """Region, side and zone (module docstring) from the centroid (LPS mm), the lung contact and the
    lungs' patient extent (x_min, x_max, z_min, z_max)."""
    x_min, x_max, z_min, z_max = lung_box_mm
    x, z = float(centroid_mm[0]), float(centroid_mm[2])
    midline, half_width = (x_min + x_max) / 2, max((x_max - x_min) / 2, 1e-6)
    offset = abs(x - midline) / half_width
    side = "left" if x > midline else "right"
    height = min(max((z - z_min) / max(z_max - z_min, 1e-6), 0.0), 1.0)
    zone = "lower" if height < 1 / 3 else "middle" if height < 2 / 3 else "upper"
    if contact >= LUNG_CONTACT or offset >= HILUM_OFFSET:
        location = {"region": "lung", "side": side, "zone": zone, "text": f"{side} lung, {zone} zone"}
    elif offset < MEDIASTINUM_OFFSET:
        location = {"region": "mediastinum", "side": None, "zone": None, "text": "mediastinum"}
    else:
        location = {"region": "hilum", "side": side, "zone": None, "text": f"{side} hilum"}
    return {**location, "lung_contact": round(contact, 2)}


def recist_burden(records: list[dict]) -> dict:
    """Lesion count, total volume and the RECIST 1.1 sum of diameters of the target lesions.

    Records carry `segment_number`, `volume_ml`, `long_axis_mm`, `short_axis_mm` and optionally a
    `location` with a `region`; without one a lesion counts as a lung lesion.
    """
    candidates = []
    for record in records:
        node = (record.get("location") or {}).get("region") in ("hilum", "mediastinum")
        diameter = record["short_axis_mm"] if node else record["long_axis_mm"]
        if diameter >= (15.0 if node else 10.0):
            candidates.append((diameter, "lymph node" if node else "lung", record["segment_number"]))
    targets, per_organ = [], {}
    for diameter, organ, number in sorted(candidates, key=lambda c: -c[0]):
        if len(targets) < 5 and per_organ.get(organ, 0) < 2:
            per_organ[organ] = per_organ.get(organ, 0) + 1
            targets.append({"segment_number": number, "organ": organ, "diameter_mm": diameter})
    return {
        "lesion_count": len(records),
        "total_volume_ml": round(sum(r["volume_ml"] for r in records), 4),
        "recist_targets": targets,
        "recist_sum_mm": round(sum(t["diameter_mm"] for t in targets), 2),
    }
