"""Synthetic thoracic CT studies with lesion instance labels, deterministic by seed.

The anatomy is drawn in millimetres on a coarse isotropic grid (soft, partial-volume edges),
blurred by the scanner's point spread function and slice profile, resampled to the scanner's
grid, given lesions (training.lesions) and correlated noise, then stored in one of the two
HU conventions. Arrays are [z, y, x]; z index 0 is the most inferior slice, rows run anterior
to posterior and columns patient right to left (DICOM LPS, axial).

    python -m training.phantom --seed 7 --out demo_study            # DICOM + NIfTI
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from training.lesions import insert_lesions

log = logging.getLogger("phantom")

COARSE_MM = 1.25  # anatomy grid spacing
KERNELS = {  # name: (in-plane PSF sigma in mm, noise correlation sigma in pixels)
    "STANDARD": (0.75, 1.0),
    "B30f": (0.8, 1.1),
    "SOFT": (1.0, 1.3),
    "LUNG": (0.45, 0.6),
    "B70f": (0.4, 0.5),
}


@dataclass
class Scanner:
    """Acquisition and reconstruction settings of one synthetic study."""

    pixel_mm: float
    slice_mm: float
    rows: int
    kernel: str
    noise_sd: float
    contrast: bool
    signed_storage: bool
    circular_fov: bool

    @classmethod
    def random(cls, rng: np.random.Generator) -> "Scanner":
        return cls(
            pixel_mm=float(rng.uniform(0.6, 0.9)),
            slice_mm=float(rng.choice([0.625, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0], p=[0.05, 0.2, 0.15, 0.1, 0.15, 0.15, 0.1, 0.1])),
            rows=512,
            kernel=str(rng.choice(list(KERNELS))),
            noise_sd=float(rng.uniform(8, 45)),
            contrast=bool(rng.random() < 0.5),
            signed_storage=bool(rng.random() < 0.5),
            circular_fov=bool(rng.random() < 0.6),
        )


@dataclass
class Phantom:
    hu: np.ndarray  # int16 [z, y, x]
    label: np.ndarray  # int16 instance labels [z, y, x]
    spacing: tuple[float, float, float]  # (z, y, x) mm
    origin: tuple[float, float, float]  # LPS mm of voxel [0, 0, 0]
    scanner: Scanner
    seed: int
    lesions: list[dict] = field(default_factory=list)
    lungs: np.ndarray | None = None  # bool [z, y, x]


class _Canvas:
    """The coarse anatomy grid: HU values composed by soft alpha blending.

    It covers exactly the scanner grid's extent with about COARSE_MM voxels, so that a
    trilinear resize maps it onto the scanner grid.
    """

    def __init__(self, shape, spacing, origin):
        self.hu = np.full(shape, -1000.0, np.float32)
        self.spacing = np.asarray(spacing, np.float32)  # (z, y, x) mm
        self.origin = np.asarray(origin, np.float32)  # (z, y, x) mm of voxel 0
        self.z, self.y, self.x = (
            (self.origin[i] + self.spacing[i] * np.arange(n, dtype=np.float32)).reshape([-1 if j == i else 1 for j in range(3)])
            for i, n in enumerate(shape)
        )

    def paint(self, alpha: np.ndarray, value, where=(slice(None),) * 3):
        region = self.hu[where]
        region += alpha * (np.asarray(value, np.float32) - region)

    def tube(self, p0, p1, r0, r1, value, alphas: list | None = None):
        """Blend a tapered capsule from p0 to p1 (mm, z y x) with radii r0 -> r1."""
        p0, p1 = np.asarray(p0, np.float32), np.asarray(p1, np.float32)
        rmax = max(r0, r1) + COARSE_MM
        lo = np.maximum(((np.minimum(p0, p1) - rmax - self.origin) / self.spacing).astype(int), 0)
        hi = np.minimum(((np.maximum(p0, p1) + rmax - self.origin) / self.spacing).astype(int) + 2, self.hu.shape)
        if np.any(hi <= lo):
            return
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        z, y, x = self.z[box[0]], self.y[:, box[1]], self.x[:, :, box[2]]
        d = p1 - p0
        length2 = float(d @ d) + 1e-6
        t = np.clip(((z - p0[0]) * d[0] + (y - p0[1]) * d[1] + (x - p0[2]) * d[2]) / length2, 0, 1)
        dist = np.sqrt((z - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (x - p0[2] - t * d[2]) ** 2)
        alpha = np.clip(0.5 + (r0 + t * (r1 - r0) - dist) / COARSE_MM, 0, 1)
        self.paint(alpha, value, box)
        if alphas is not None:
            alphas.append((box, alpha))


def _ellipse(canvas: _Canvas, cx, cy, ax, ay, power=2.0):
    """Soft in-plane (super)ellipse membership; arguments may vary with z ([z,1,1] arrays)."""
    r = (np.abs(canvas.x - cx) / ax) ** power + (np.abs(canvas.y - cy) / ay) ** power
    edge = COARSE_MM / np.minimum(ax, ay) * power
    return np.clip(0.5 + (1 - r) / edge, 0, 1).astype(np.float32)


def _ellipsoid(canvas: _Canvas, centre_zyx, radii_zyx) -> np.ndarray:
    """Soft 3D ellipsoid membership."""
    r = sum(((axis - c) / a) ** 2 for axis, c, a in zip((canvas.z, canvas.y, canvas.x), centre_zyx, radii_zyx))
    return np.clip(0.5 + (1 - np.sqrt(r)) * min(radii_zyx) / COARSE_MM, 0, 1).astype(np.float32)


def _abdomen(rng, canvas: _Canvas, region: np.ndarray, z_top, cy, half_x, half_y, contrast: bool) -> None:
    """Upper abdominal organs under the domes, which real chest CT includes and lesion models mistake for
    masses: liver (right), spleen (left, posterior), stomach with gas and fluid (left, anterior), kidneys,
    bowel gas, all in fat."""
    u = rng.uniform
    enhance = u(50, 90) if contrast else 0.0
    canvas.paint(region, u(-110, -70))  # retroperitoneal and omental fat
    organs = [  # centre (z, y, x) mm, radii (z, y, x) mm, HU
        ((z_top - 20, cy, -half_x * 0.3), (u(100, 130), half_y * 1.05, half_x * 0.8), u(50, 65) + enhance),  # liver
        ((z_top - u(30, 50), cy + half_y * 0.5, half_x * 0.7), (u(45, 60), u(30, 40), u(18, 25)), u(40, 50) + enhance),
        ((z_top - u(90, 120), cy + half_y * 0.55, -u(55, 70)), (u(45, 55), u(22, 28), u(25, 32)), 35 + 2.5 * enhance),
        ((z_top - u(90, 120), cy + half_y * 0.55, u(55, 70)), (u(45, 55), u(22, 28), u(25, 32)), 35 + 2.5 * enhance),
    ]
    for centre, radii, hu in organs:
        canvas.paint(_ellipsoid(canvas, centre, radii) * region, hu)
    stomach_centre = np.array([z_top - u(30, 50), cy - half_y * 0.25, half_x * 0.35])
    stomach_radii = np.array([u(40, 55), u(30, 45), u(35, 50)])
    canvas.paint(_ellipsoid(canvas, stomach_centre, stomach_radii) * region, u(30, 50))  # wall
    lumen = _ellipsoid(canvas, stomach_centre, stomach_radii - 4) * region
    gas_level = stomach_centre[1] + u(-0.6, 0.3) * stomach_radii[1]  # gas rises anteriorly (smaller y)
    canvas.paint(lumen * (canvas.y < gas_level), -1000.0)
    canvas.paint(lumen * (canvas.y >= gas_level), u(0, 25))
    for _ in range(rng.integers(2, 7)):  # bowel gas
        centre = (z_top - u(40, 140), cy - half_y * u(0, 0.6), u(-1, 1) * half_x * 0.6)
        canvas.paint(_ellipsoid(canvas, centre, (u(8, 20), u(8, 20), u(10, 30))) * region, -1000.0)


def _smooth_field(rng, shape, scale_vox, amplitude):
    """Smooth random texture: Gaussian noise on a lattice `scale_vox` apart, resized trilinearly."""
    coarse = [max(int(n / scale_vox), 2) for n in shape]
    field_ = torch.from_numpy(rng.standard_normal(coarse, dtype=np.float32))[None, None]
    field_ = torch.nn.functional.interpolate(field_, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    return field_ * (amplitude / (field_.std() + 1e-6))


def _gaussian(volume: np.ndarray, sigma_vox) -> np.ndarray:
    """Gaussian blur with one sigma (in voxels) per axis."""
    return ndimage.gaussian_filter(np.asarray(volume, np.float32), sigma_vox, truncate=2.5)


def _tree(rng, root, targets, radius, canvas, value, alphas, airway=False):
    """A branching tube tree from root toward attractor points, split recursively in two.

    Radii follow Murray's law (r^3 proportional to the number of points supplied), so the
    tree tapers from the hilum to the periphery.
    """
    stack = [(np.asarray(root, np.float32), targets, radius)]
    per_point = radius / len(targets) ** (1 / 3)
    while stack:
        start, points, r = stack.pop()
        centre = points.mean(axis=0)
        end = start + (centre - start) * (0.45 if len(points) > 1 else 1.0)
        end = end + rng.normal(0, 1.0, 3).astype(np.float32) * min(r, 2.0)
        r_end = max(per_point * len(points) ** (1 / 3), 0.35)
        if airway:
            canvas.tube(start, end, r * 1.35, r_end * 1.35, 30.0)
            canvas.tube(start, end, r, r_end, -1000.0)
        else:
            canvas.tube(start, end, r, r_end, value, alphas)
        if len(points) < 2 or r_end < (0.9 if airway else 0.35):
            continue
        axis = np.linalg.svd(points - centre, full_matrices=False)[2][0]
        side = (points - centre) @ axis > 0
        for part in (points[side], points[~side]):
            if len(part):
                stack.append((end, part, r_end))


def _sample(rng, points: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` distinct rows of `points` (a short study holds few lung points)."""
    return points[rng.choice(len(points), size=min(count, len(points)), replace=False)]


def _anatomy(rng: np.random.Generator, shape, spacing, origin, contrast: bool):
    """Coarse HU canvas over the scanner grid's extent; returns (canvas, lungs, mediastinum) on it."""
    extent = np.asarray(shape) * np.asarray(spacing)
    coarse_shape = np.maximum(np.round(extent / COARSE_MM).astype(int), 2)
    coarse_spacing = extent / coarse_shape
    canvas = _Canvas(tuple(coarse_shape), coarse_spacing, np.asarray(origin) - np.asarray(spacing) / 2 + coarse_spacing / 2)
    fov_mm = extent[1]
    z, y, x = canvas.z, canvas.y, canvas.x
    u = rng.uniform

    # Body: skin/fat outline, muscle, then the thoracic cavity; the table below the back.
    z_base = u(40, 70)  # lowest point of the lung bases
    z_apex = z_base + u(190, 240)
    body_ax = u(min(140, fov_mm / 2 - 25), min(185, fov_mm / 2 - 15))  # a small field of view holds a slim body
    body_ay = u(95, 125)
    cy = u(-15, 5)
    taper = 1 - 0.12 * np.clip((z - z_apex + 20) / 60, 0, 1)  # shoulders/neck narrower
    fat = u(5, 25)
    muscle = u(6, 12)
    canvas.paint(_ellipse(canvas, 0, cy, body_ax * taper, body_ay, 2.2), -100 + u(-15, 15))
    canvas.paint(_ellipse(canvas, 0, cy, body_ax * taper - fat, body_ay - fat * 0.7, 2.2), 45 + u(-10, 10))
    cav_ax, cav_ay = body_ax * taper - fat - muscle, body_ay - fat * 0.7 - muscle
    back = cy + body_ay
    table_y = back + u(2, 25)
    canvas.paint(np.clip(0.5 + (5 - np.abs(y - table_y - 5 - 0.0004 * x**2)) / COARSE_MM, 0, 1) * np.ones_like(z), 250.0)
    canvas.paint(np.clip(0.5 + (12 - np.abs(y - table_y - 22 - 0.0004 * x**2)) / COARSE_MM, 0, 1) * np.ones_like(z), -850.0)

    if rng.random() < 0.35:  # arms down beside the chest
        for side in (-1, 1):
            ax_c = side * (body_ax + u(35, 55))
            canvas.paint(_ellipse(canvas, ax_c, cy, 42, 45) * np.ones_like(z), -90.0)
            canvas.paint(_ellipse(canvas, ax_c, cy, 32, 36) * np.ones_like(z), 50.0)
            canvas.paint(_ellipse(canvas, ax_c, cy, 11, 11) * np.ones_like(z), 700.0)
            canvas.paint(_ellipse(canvas, ax_c, cy, 7, 7) * np.ones_like(z), 60.0)
    if rng.random() < 0.35:  # breasts
        for side in (-1, 1):
            r = u(35, 65)
            bz = z_base + u(70, 110)
            membership = np.clip(1 - ((x - side * body_ax * 0.45) / r) ** 2 - ((z - bz) / r) ** 2, 0, 1)
            front = cy - body_ay + fat * 0.5 - membership * u(20, 45)
            canvas.paint(np.clip(0.5 + (cy - body_ay - y) / COARSE_MM, 0, 1) * (y > front) * (membership > 0), -40 + u(-30, 30))

    # Diaphragm domes (right higher: liver) and the abdomen beneath.
    dome_h = u(35, 55)
    dome = np.maximum(
        z_base + u(10, 25) * (x < 0) + dome_h * (1 - (x / (cav_ax * 0.9)) ** 2 - ((y - cy) / (cav_ay * 1.2)) ** 2), z_base
    )
    below = np.clip(0.5 + (dome - z) / COARSE_MM, 0, 1)
    cavity = _ellipse(canvas, 0, cy + 3, cav_ax, cav_ay, 2.3)
    _abdomen(rng, canvas, cavity * below, z_base + dome_h, cy, float(np.max(cav_ax)), cav_ay, contrast)

    # Ribs: inclined bands of bone in the chest wall; cartilage anteriorly.
    wall = _ellipse(canvas, 0, cy, cav_ax + muscle * 0.6, cav_ay + muscle * 0.6, 2.2) * (1 - cavity)
    rib_phase = np.mod(z - 0.25 * (cy - y) - u(0, 24), 24.0)
    rib = wall * np.clip(0.5 + (4.5 - np.abs(rib_phase - 12)) / COARSE_MM, 0, 1) * (z < z_apex + 10) * (z > z_base - 30)
    canvas.paint(rib * (y > cy - cav_ay * 0.6), 450.0)
    canvas.paint(rib * (y <= cy - cav_ay * 0.6), 120.0)

    # Lungs: the cavity above the domes, narrowing to the apices, minus the mediastinum.
    apex_scale = np.sqrt(np.clip((z_apex - z) / 70, 0.02, 1))
    lung_space = _ellipse(canvas, 0, cy + 3, cav_ax * apex_scale, cav_ay * apex_scale, 2.3) * (1 - below)
    # The heart (anterior, left of centre, resting on the diaphragm) bulges into the left lung.
    hz, hx, hy = z_base + dome_h * 0.6 + u(25, 40), u(15, 35), cy - cav_ay * u(0.15, 0.35)
    heart_r = np.array([u(45, 60), u(45, 60), u(60, 75)])  # z, y, x
    heart = np.clip(1 - ((z - hz) / heart_r[0]) ** 2 - ((y - hy) / heart_r[1]) ** 2 - ((x - hx) / heart_r[2]) ** 2, 0, 1)
    heart_zone = np.clip(1 - ((z - hz) / (heart_r[0] + 6)) ** 2 - ((y - hy) / (heart_r[1] + 6)) ** 2
                         - ((x - hx) / (heart_r[2] + 6)) ** 2, 0, 1) > 0
    med_base = u(15, 24)
    med_half = med_base + 10 * np.clip((cy - y) / cav_ay + 0.3, 0, 1)
    mediastinum = np.maximum(np.clip(0.5 + (med_half - np.abs(x - 6 * np.clip((cy - y) / cav_ay, 0, 1))) / COARSE_MM, 0, 1),
                             heart_zone)
    spine_y = cy + cav_ay - u(25, 35)
    spine_zone = _ellipse(canvas, 0, spine_y, 32, 30)
    lungs = lung_space * (1 - mediastinum) * (1 - spine_zone)
    parenchyma = -895 + u(-40, 40) + 70 * np.clip((y - cy) / cav_ay, 0, 1) ** 3  # gravity-dependent density
    parenchyma = parenchyma + _smooth_field(rng, canvas.hu.shape, 4, u(4, 10))
    canvas.paint(lungs, parenchyma)
    canvas.paint(lung_space * mediastinum * (1 - below), -80.0)  # mediastinal fat

    # Spine: vertebral bodies (discs between them), canal, posterior elements.
    vertebra = _ellipse(canvas, 0, spine_y, 17, 15) * np.ones_like(z)
    disc = np.clip(0.5 + (3 - np.abs(np.mod(z, 28.0) - 14)) / COARSE_MM, 0, 1)
    canvas.paint(vertebra, 650.0)
    canvas.paint(_ellipse(canvas, 0, spine_y, 14, 12) * (1 - disc), 200.0)
    canvas.paint(_ellipse(canvas, 0, spine_y, 14, 12) * disc, 85.0)
    canvas.paint(_ellipse(canvas, 0, spine_y + 26, 14, 13) * np.ones_like(z), 500.0)
    canvas.paint(_ellipse(canvas, 0, spine_y + 24, 7, 7) * np.ones_like(z), 20.0)

    # Heart, aorta, pulmonary trunk; contrast phase brightens the blood.
    blood = u(180, 320) if contrast else 40.0
    canvas.paint(np.clip(heart * 12, 0, 1), -90.0)  # pericardial fat
    canvas.paint(np.clip(heart * 12 - 1.5, 0, 1), 45.0)
    canvas.paint(np.clip(heart * 12 - 4, 0, 1), blood)
    arch_z = z_apex - u(35, 55)
    ao_r = u(11, 15)
    desc = (spine_y - 20, u(18, 26))  # y, x of the descending aorta
    canvas.tube((hz + 20, hy, 8), (arch_z, cy - cav_ay * 0.3, 5), ao_r, ao_r, blood)
    canvas.tube((arch_z, cy - cav_ay * 0.3, 5), (arch_z + 8, cy, 12), ao_r, ao_r, blood)
    canvas.tube((arch_z + 8, cy, 12), (arch_z, desc[0], desc[1]), ao_r, ao_r, blood)
    canvas.tube((arch_z, desc[0], desc[1]), (z_base - 40, desc[0] - 5, desc[1] - 8), ao_r * 0.9, ao_r * 0.8, blood)
    # Arch branches and the veins of the thoracic inlet, and the clavicles: real apices are full of them.
    arch_top = np.array([arch_z + 8 + ao_r * 0.7, cy - 5, 8.0])
    for dx, r in ((-u(12, 20), u(5, 7)), (0.0, u(3.5, 5)), (u(10, 16), u(4, 5.5))):
        canvas.tube(arch_top + (0, 0, dx), (z_apex + 60, cy - u(5, 20), dx * u(2, 3.5)), r, r * 0.85, blood)
    vein = blood if contrast and rng.random() < 0.5 else 40.0
    canvas.tube((arch_z - 5, cy - cav_ay * 0.35, -u(22, 30)), (z_apex + 60, cy - cav_ay * 0.2, -u(40, 60)), u(6, 9), 6,
                vein)
    canvas.tube((arch_z + 10, cy - cav_ay * 0.45, -20), (z_apex + 25, cy - cav_ay * 0.5, u(40, 60)), u(4, 6), 4, vein)
    clavicle_z = z_apex + u(-5, 15)
    for side in (-1, 1):
        canvas.tube((clavicle_z - 10, cy - cav_ay - 5, side * 15), (clavicle_z + 10, cy - cav_ay * 0.3, side * body_ax * 0.8),
                    u(7, 9), 6, 600.0)
    hilum_z = (arch_z + hz) / 2
    trunk_top = (hilum_z, cy - 20, 8)
    canvas.tube((hz + 30, hy - 10, hx - 10), trunk_top, 13, 12, blood)

    # Trachea and main bronchi down to the carina; esophagus behind.
    carina = np.array([hilum_z + u(10, 25), cy - 5, 0.0], np.float32)
    canvas.tube((z_apex + 60, cy - 25, 0), carina, 9.5, 8.5, 35.0)
    canvas.tube((z_apex + 60, cy - 25, 0), carina, 8.0, 7.0, -1000.0)
    canvas.tube((z_apex + 60, spine_y - 22, 6), (z_base, spine_y - 25, 12), 7, 7, 35.0)

    # Lung masks on the canvas (the vessels and airways below lie inside them).
    lung_mask = lungs > 0.5
    mediastinum_mask = (lung_space * mediastinum * (1 - below) > 0.5) & (canvas.hu < 0) & (canvas.hu > -200)

    # Vessel and airway trees grow from the hila toward points spread through each lung.
    vessel_alphas = []
    lung_points = np.argwhere(lung_mask[:, ::3, ::3]) * np.array([1, 3, 3]) * canvas.spacing + canvas.origin
    artery_hu = blood if contrast else 40.0
    vein_hu = (blood * 0.8 if contrast else 38.0)
    for side in (-1, 1):
        side_points = lung_points[np.sign(lung_points[:, 2]) == side].astype(np.float32)
        if len(side_points) < 50:
            continue
        hilum = np.array([hilum_z, cy - 10, side * (med_base + 6)], np.float32)
        for offset, hu_value, radius in ((np.array([3, -6, 0]), artery_hu, 6.0), (np.array([-18, 4, 0]), vein_hu, 5.5)):
            targets = _sample(rng, side_points, int(u(700, 1100)))
            _tree(rng, hilum + offset, targets, radius, canvas, hu_value, vessel_alphas)
        bronchus_root = np.array([carina[0] - 8, carina[1] + 5, side * med_base], np.float32)
        canvas.tube(carina, bronchus_root, 6.5, 5.5, 35.0)
        canvas.tube(carina, bronchus_root, 5.0, 4.5, -1000.0)
        targets = _sample(rng, side_points, 60)
        _tree(rng, bronchus_root, targets, 5.0, canvas, None, None, airway=True)
    _lung_details(rng, canvas, lung_mask, lung_points, cy, cav_ay)
    return canvas, lung_mask, mediastinum_mask


def _lung_details(rng, canvas, lung_mask, lung_points, cy, cav_ay):
    """Look-alikes and findings of real lungs: fissures, granulomas, scars, emphysema, atelectasis, effusion."""
    if not len(lung_points):
        return
    u = rng.uniform
    z, y, x = canvas.z, canvas.y, canvas.x
    for side in (-1, 1):  # oblique fissures: thin dense sheets
        normal = np.array([1.0, u(-0.9, -0.5), side * u(-0.2, 0.2)])
        normal /= np.linalg.norm(normal)
        side_points = lung_points[np.sign(lung_points[:, 2]) == side]
        if not len(side_points):
            continue
        c = side_points.mean(axis=0)
        dist = np.abs((z - c[0]) * normal[0] + (y - c[1]) * normal[1] + (x - c[2]) * normal[2])
        sheet = np.clip(0.5 + (0.6 - dist) / COARSE_MM, 0, 1) * lung_mask * (np.sign(x) == side)
        canvas.paint(sheet, -600.0)
    for _ in range(rng.integers(0, 4)):  # calcified granulomas
        p = lung_points[rng.integers(len(lung_points))]
        canvas.tube(p, p, u(1.0, 2.5), u(1.0, 2.5), u(250, 900))
    for _ in range(rng.integers(0, 4)):  # linear scars / plate atelectasis
        p = lung_points[rng.integers(len(lung_points))]
        q = p + rng.normal(0, 1, 3) * u(8, 20)
        canvas.tube(p, q, u(0.8, 2.0), u(0.6, 1.5), u(-350, -50))
    if rng.random() < 0.25:  # emphysema: low-attenuation patches
        field_ = _smooth_field(rng, canvas.hu.shape, 5, 1.0)
        holes = np.clip((field_ - field_.std() * u(0.8, 1.5)) * 8 / field_.std(), 0, 1) * lung_mask
        canvas.paint(holes, -975.0)
    dependent = np.clip((y - (cy + cav_ay * u(0.6, 0.85))) / 12, 0, 1) * lung_mask
    canvas.paint(dependent, u(-700, -300))
    if rng.random() < 0.12:  # pleural effusion at one base
        side = rng.choice([-1, 1])
        level = canvas.origin[0] + u(40, 90)
        fluid = lung_mask & (np.sign(x) == side) & (z < level) & (y > cy + u(0, 30))
        canvas.hu[fluid] = u(0, 20)
        lung_mask &= ~fluid


def _to_scanner_grid(volume: np.ndarray, shape, mode="trilinear") -> np.ndarray:
    """Resize a canvas volume onto the scanner grid that it covers."""
    src = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    if mode == "nearest":
        return torch.nn.functional.interpolate(src, size=shape, mode="nearest-exact")[0, 0].numpy()
    return torch.nn.functional.interpolate(src, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def generate_phantom(seed: int, lesion_count: int | None = None, scanner: Scanner | None = None,
                     slices: int | None = None, kinds: list[str] | None = None, max_lesion_mm: float = 60.0) -> Phantom:
    """One synthetic chest CT study. lesion_count None draws 0-10 lesions; slices None covers the thorax;
    kinds: the lesion kinds drawn (default: training.lesions.DEFAULT_KINDS), none larger than max_lesion_mm."""
    rng = np.random.default_rng(seed)
    scanner = scanner or Scanner.random(rng)
    fov = scanner.rows * scanner.pixel_mm
    length = rng.uniform(290, 340) if slices is None else slices * scanner.slice_mm
    nz = max(int(round(length / scanner.slice_mm)), 8)
    shape = (nz, scanner.rows, scanner.rows)
    spacing = (scanner.slice_mm, scanner.pixel_mm, scanner.pixel_mm)
    origin_zyx = (5.0, -fov / 2 + scanner.pixel_mm / 2, -fov / 2 + scanner.pixel_mm / 2)
    timings = {}
    t0 = time.perf_counter()
    canvas, lungs_c, mediastinum_c = _anatomy(rng, shape, spacing, origin_zyx, scanner.contrast)
    timings["anatomy"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    psf_mm, noise_corr = KERNELS[scanner.kernel]
    blur = (max(scanner.slice_mm / 2.355, psf_mm), psf_mm, psf_mm)  # PSF and slice profile, mm
    hu = _to_scanner_grid(_gaussian(canvas.hu, np.asarray(blur) / canvas.spacing), shape)
    lungs = _to_scanner_grid(lungs_c, shape, "nearest") > 0.5
    mediastinum = _to_scanner_grid(mediastinum_c, shape, "nearest") > 0.5
    timings["resample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if lesion_count is None:
        lesion_count = int(rng.choice(11, p=np.r_[0.08, np.full(10, 0.092)]))
    hu, label, lesions = insert_lesions(hu, spacing, lungs, mediastinum, rng, lesion_count, blur_sigma_mm=blur,
                                        size_range_mm=(3, max_lesion_mm), kinds=kinds)
    timings["lesions"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    noise = _gaussian(rng.standard_normal(shape, dtype=np.float32), (0, noise_corr, noise_corr))
    hu += noise * (scanner.noise_sd / float(noise[::4, ::4, ::4].std()))
    if scanner.circular_fov:
        yy, xx = np.ogrid[:scanner.rows, :scanner.rows]
        outside = (yy - scanner.rows / 2 + 0.5) ** 2 + (xx - scanner.rows / 2 + 0.5) ** 2 > (scanner.rows / 2) ** 2
        hu[:, outside] = -3024.0 if scanner.signed_storage else -1024.0
    hu = np.clip(np.rint(hu), -3024 if scanner.signed_storage else -1024, 3071).astype(np.int16)
    timings["noise"] = time.perf_counter() - t0
    log.info("phantom seed %d: %s, %d lesions, %s", seed, hu.shape, len(lesions),
             ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    origin_lps = (origin_zyx[2], origin_zyx[1], origin_zyx[0])
    return Phantom(hu, label.astype(np.int16), spacing, origin_lps, scanner, seed, lesions, lungs)


def main(argv=None) -> None:
    from training.phantom_io import write_dicom_series, write_phantom_nifti

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lesions", type=int, default=None, help="lesion count (default: random 0-10)")
    parser.add_argument("--slices", type=int, default=None)
    parser.add_argument("--format", choices=["dicom", "nifti", "both"], default="both")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    phantom = generate_phantom(args.seed, args.lesions, slices=args.slices)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.format in ("dicom", "both"):
        write_dicom_series(phantom, args.out / "dicom")
    if args.format in ("nifti", "both"):
        write_phantom_nifti(phantom, args.out / "image.nii.gz", args.out / "label.nii.gz")
    (args.out / "lesions.json").write_text(json.dumps({"seed": args.seed, "lesions": phantom.lesions}, indent=1, default=float))
    print(f"phantom seed {args.seed}: {phantom.hu.shape} voxels, {len(phantom.lesions)} lesions -> {args.out}")


if __name__ == "__main__":
    main()
