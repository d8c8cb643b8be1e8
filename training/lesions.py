"""Synthetic lung lesions and their insertion into a chest CT background.

Each lesion is an implicit shape in millimetres around its centre (signed distance d < 0
inside), drawn only inside its own bounding box. The fraction of each voxel it covers is a
linear ramp of d over the voxel's extent along the shape normal (partial volume); label =
voxels at least half covered. Coverage and lesion (coverage x lesion HU) both go through the
scanner PSF; the background shows through (1 - blurred coverage), and for real backgrounds noise
of the scanner's SD replaces the background noise the lesion hides, so the lesion looks acquired
by that scanner.

Kinds (HU before blur/noise):
  solid         smooth round/ovoid, 10-50 HU + texture
  lobulated     union of 3-6 blobs, 10-50 HU
  spiculated    round core with 8-20 tapering spicules up to 2.6 radii long, 10-50 HU
  part_solid    ground-glass (-650..-350 HU) around a solid core
  ggo           pure ground glass, -600..-300 HU
  cavitating    thick soft-tissue wall around an eccentric air cavity (-1000 HU)
  juxtapleural  solid/lobulated, flattened against the chest wall (clipped to the lung)
  juxtavascular solid/lobulated/spiculated, touching a lung vessel (lung voxel > -300 HU)
  perihilar     solid/lobulated/spiculated at the medial lung border at hilum height
  node          mediastinal lymph node: 20-60 HU ovoid in mediastinal fat; node_sites "hilum" (the phantom
                generator's): beside a lung's medial border at hilum height, nearly all in fat; "fat" (real
                backgrounds): centred anywhere in fat at least a third of its radius deep (every station), up to a
                third of it displacing unenhanced soft tissue (not lung, enhanced vessels or bone)

Drawn only when named in `kinds` (not in the default mix, which the phantom generator uses):
  mass          30-100 mm solid/lobulated tumour, 10-50 HU (a necrotic centre at times), flattened against
                the chest wall, the paravertebral gutter or the mediastinum
  faint_ggo     faint pure ground glass, -800..-550 HU, 8-45 mm, against the pleura half the time
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

KIND_WEIGHTS = {
    "solid": 0.17, "lobulated": 0.12, "spiculated": 0.11, "part_solid": 0.08, "ggo": 0.06,
    "cavitating": 0.06, "juxtapleural": 0.14, "juxtavascular": 0.12, "perihilar": 0.07, "node": 0.07,
    "mass": 0.12, "faint_ggo": 0.08,
}
NAMED_ONLY_KINDS = ("mass", "faint_ggo")  # drawn only when named in `kinds`
DEFAULT_KINDS = tuple(kind for kind in KIND_WEIGHTS if kind not in NAMED_ONLY_KINDS)
SIZE_LIMITS_MM = {"ggo": (5, 30), "part_solid": (8, 40), "cavitating": (12, 60), "spiculated": (6, 40),
                  "perihilar": (10, 60), "node": (8, 35), "mass": (30, 100), "faint_ggo": (8, 45)}
PLEURAL_KINDS = ("juxtapleural", "mass")  # placed against the pleura, partly outside the lung
PLACEMENT_TRIES = 40
NODE_SITES = ("hilum", "fat")
UNENHANCED_HU = (-200.0, 80.0)  # what a node may displace at "fat" sites: fat and unenhanced soft tissue
VESSEL_HU = -300.0
AIR_HU = -1000.0
_CUBE = np.array([(z, y, x) for z in (-1, 0, 1) for y in (-1, 0, 1) for x in (-1, 0, 1)], float)
SPHERE_POINTS = _CUBE / np.maximum(np.linalg.norm(_CUBE, axis=1, keepdims=True), 1)  # 26 directions and the centre


def insert_lesions(hu: np.ndarray, spacing, lungs: np.ndarray, mediastinum: np.ndarray | None,
                   rng: np.random.Generator, count: int, blur_sigma_mm=0.0, noise_sd_hu: float = 0.0,
                   size_range_mm=(3, 60), kinds=None, node_sites: str = "hilum"):
    """Insert up to `count` non-overlapping lesions into a copy of `hu` ([z, y, x] float, spacing (z, y, x) mm).

    `lungs` and `mediastinum` are bool masks (no mediastinum: no nodes); `kinds` names the kinds
    drawn (default: DEFAULT_KINDS), weighted by KIND_WEIGHTS; `node_sites` (NODE_SITES) where nodes go.
    blur_sigma_mm is the scanner PSF (a float or (z, y, x)); noise_sd_hu > 0 adds noise of that SD where the
    lesion replaces the background.
    Returns (hu with lesions float32, int16 instance labels 1..n, one dict per lesion). Fewer than
    `count` lesions are inserted where no place is found for them.
    """
    hu = np.array(hu, dtype=np.float32)
    labels = np.zeros(hu.shape, np.int16)
    scene = _Scene(hu, np.asarray(spacing, float), lungs, mediastinum,
                   np.broadcast_to(np.asarray(blur_sigma_mm, float), (3,)), float(noise_sd_hu), rng, node_sites)
    kinds = [k for k in (kinds or DEFAULT_KINDS) if mediastinum is not None or k != "node"]
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    lesions = []
    for _ in range(count):
        kind = str(rng.choice(kinds, p=weights / weights.sum()))
        low, high = SIZE_LIMITS_MM.get(kind, size_range_mm)
        low = min(max(low, size_range_mm[0]), size_range_mm[1])
        high = max(min(high, size_range_mm[1]), low)
        diameter = float(np.exp(rng.uniform(np.log(low), np.log(high))))  # log-uniform: more small ones
        lesion = scene.place(kind, diameter, labels, len(lesions) + 1)
        if lesion is not None:
            lesions.append(lesion)
    return hu, labels, lesions


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _unit(rng, n=None) -> np.ndarray:
    v = rng.standard_normal((3,) if n is None else (n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


class _Shape:
    """Signed distance (mm, approximate) of a random lesion shape around the origin, in a random frame."""

    def __init__(self, rng, radius: float, form: str, elongation: float = 0.15):
        self.radius = radius
        scales = 1 + rng.uniform(-elongation, elongation, 3)
        self.frame = (_rotation(rng) * scales[:, None]).astype(np.float32)
        self.harmonics = [(rng.uniform(0.02, 0.08), rng.uniform(1, 4), _unit(rng), rng.uniform(0, 2 * np.pi))
                          for _ in range(4)]
        self.blobs = [(np.zeros(3), radius)]
        self.spikes = []
        if form == "lobulated":
            for _ in range(rng.integers(2, 6)):
                self.blobs.append((_unit(rng) * radius * rng.uniform(0.35, 0.7), radius * rng.uniform(0.4, 0.7)))
        if form == "spiculated":
            self.blobs[0] = (np.zeros(3), radius * 0.8)
            for _ in range(rng.integers(8, 20)):
                self.spikes.append((_unit(rng), radius * rng.uniform(1.4, 2.6), max(0.5, radius * rng.uniform(0.08, 0.18))))
        ripple = 1 + sum(h[0] for h in self.harmonics)
        reach = max([(np.linalg.norm(c) + r) * ripple for c, r in self.blobs] + [length for _, length, _ in self.spikes])
        self.extent = float(reach / scales.min())  # radius (mm) of a sphere containing the shape

    def distance(self, offsets) -> np.ndarray:
        """offsets: broadcastable (z, y, x) arrays in mm from the centre -> signed distance, negative inside."""
        q = [sum(f * o for f, o in zip(row, offsets)) for row in self.frame]
        norm = np.sqrt(sum(c * c for c in q)) + 1e-6
        ripple = sum(a * np.cos(f * np.pi * sum(ax * c for ax, c in zip(axis, q)) / norm + phase)
                     for a, f, axis, phase in self.harmonics)
        d = None
        for centre, r in self.blobs:
            blob = np.sqrt(sum((c - x0) ** 2 for c, x0 in zip(q, centre))) - r * (1 + ripple)
            d = blob if d is None else np.minimum(d, blob)
        for direction, length, r in self.spikes:
            t = np.clip(sum(u * c for u, c in zip(direction, q)), 0, length)
            along = np.sqrt(sum((c - t * u) ** 2 for c, u in zip(q, direction)))
            d = np.minimum(d, along - r * (1 - t / length))
        return d


class _Scene:
    """A background volume with its masks; places and draws one lesion at a time."""

    def __init__(self, hu, spacing, lungs, mediastinum, blur_mm, noise_sd, rng, node_sites="hilum"):
        if node_sites not in NODE_SITES:
            raise ValueError(f"node_sites must be one of {NODE_SITES}, not {node_sites!r}")
        self.hu, self.spacing, self.lungs, self.mediastinum = hu, spacing, lungs, mediastinum
        self.fat_points = None  # nodes at "fat" sites: every fat voxel, and its depth (mm to the nearest non-fat one)
        if node_sites == "fat" and mediastinum is not None:
            self.fat_points = np.argwhere(mediastinum)
            self.fat_depths = ndimage.distance_transform_edt(mediastinum, sampling=spacing)[mediastinum]
        self.blur_mm, self.noise_sd, self.rng = blur_mm, noise_sd, rng
        self.original = hu.copy()  # vessel look-up unaffected by lesions already drawn
        zz, yy, xx = np.nonzero(lungs[:, ::4, ::4])
        self.lung_points = np.stack([zz, yy * 4, xx * 4], 1)
        self.lung_z = (zz.min(), zz.max()) if len(zz) else (0, 0)
        self.midline_x = float(xx.mean() * 4) if len(xx) else hu.shape[2] / 2

    # --- placement -------------------------------------------------------------------------
    def place(self, kind: str, diameter: float, labels: np.ndarray, index: int) -> dict | None:
        if len(self.lung_points) == 0:
            return None
        rng = self.rng
        for attempt in range(PLACEMENT_TRIES):
            size = diameter * (0.85 ** (attempt // 10))  # shrink when there is no room
            form = kind if kind in ("lobulated", "spiculated") else "solid"
            if kind in ("juxtapleural", "juxtavascular", "perihilar", "mass"):
                form = str(rng.choice(["solid", "lobulated"] if kind in PLEURAL_KINDS else ["solid", "lobulated", "spiculated"]))
            shape = _Shape(rng, size / 2, form, elongation=0.3 if kind in ("node", "mass") else 0.15)
            pleural = kind in PLEURAL_KINDS or (kind == "faint_ggo" and rng.random() < 0.5)
            centre = self._centre(kind, shape.radius, pleural)
            if centre is None or not self._may_fit(kind, centre, shape.radius, labels, pleural):
                continue
            drawn = self._render(shape, centre, kind, labels, pleural)
            if drawn is not None:
                box, alpha, region = drawn
                self._blend(box, alpha, self._lesion_hu(kind, shape, box, centre))
                label = (alpha >= 0.5) & region
                labels[box][label] = index
                zz, yy, xx = np.nonzero(label)
                extent_mm = (np.ptp(np.stack([zz, yy, xx], 1), 0) + 1) * self.spacing
                return {"label": index, "kind": kind, "shape": form, "diameter_mm": round(size, 2),
                        "extent_zyx_mm": [round(float(e), 1) for e in extent_mm],
                        "centre_zyx": [int(c) for c in centre], "voxels": int(label.sum())}
        return None

    def _random_lung_point(self) -> np.ndarray:
        point = self.lung_points[self.rng.integers(len(self.lung_points))]
        return point + np.r_[0, self.rng.integers(0, 4, 2)]

    def _centre(self, kind: str, radius: float, pleural: bool) -> np.ndarray | None:
        """A candidate centre (voxel, integer z, y, x) for a lesion of this kind, or None."""
        rng, sp = self.rng, self.spacing
        if pleural:  # toward the chest wall; a mass also toward the paravertebral gutter or the mediastinum
            start = self._random_lung_point()
            lateral = np.sign(start[2] - self.midline_x) or 1.0
            outward = np.r_[rng.uniform(-0.3, 0.3), rng.uniform(-1, 1), lateral]
            if kind == "mass":
                posterior = np.r_[0, 1, rng.uniform(-0.5, 0.5) * lateral]
                medial = np.r_[0, rng.uniform(-0.5, 0.5), -lateral]
                outward = (outward, posterior, medial)[rng.integers(3)]
            edge = self._march(start, outward / np.linalg.norm(outward), self.lungs)
            if edge is None or self.original[tuple(edge)] < -300:  # must end at the chest wall
                return None
            return np.rint(edge - outward / np.linalg.norm(outward) * radius * rng.uniform(0.3, 0.7) / sp).astype(int)
        if kind == "juxtavascular":
            for _ in range(50):
                point = self._random_lung_point()
                if self.lungs[tuple(point)] and self.original[tuple(point)] > VESSEL_HU:
                    return np.rint(point + _unit(rng) * radius * 0.95 / sp).astype(int)
            return None
        if kind == "node" and self.fat_points is not None:
            deep = self.fat_points[self.fat_depths >= radius / 3]
            return deep[rng.integers(len(deep))] if len(deep) else None
        if kind in ("perihilar", "node"):
            z0, z1 = self.lung_z
            z = int(z0 + (z1 - z0) * rng.uniform(0.45, 0.7))
            ys = np.nonzero(self.lungs[z].any(1))[0]
            if len(ys) == 0:
                return None
            y = int(rng.integers(ys.min() + (ys.max() - ys.min()) // 4, ys.max() - (ys.max() - ys.min()) // 4 + 1))
            side = rng.choice([-1, 1])
            xs = np.nonzero(self.lungs[z, y])[0]
            xs = xs[np.sign(xs - self.midline_x) == side]
            if len(xs) == 0:
                return None
            medial = xs[np.argmin(np.abs(xs - self.midline_x))]
            shift = radius * (0.8 if kind == "perihilar" else -1.1) / sp[2]
            return np.array([z, y, int(round(medial + side * shift))])
        return self._random_lung_point()

    def _may_fit(self, kind: str, centre, radius: float, labels: np.ndarray, pleural: bool) -> bool:
        """Cheap test before drawing: free of other lesions, and inside its region at a few points."""
        points = np.rint(centre + SPHERE_POINTS * 0.7 * radius / self.spacing).astype(int)
        if np.any(points < 0) or np.any(points >= self.hu.shape):
            return False
        index = tuple(points.T)
        if labels[index].any():
            return False
        if kind == "node":
            return bool(self.mediastinum[tuple(centre)])
        if pleural or kind == "perihilar":
            return bool(self.lungs[tuple(centre)])
        return bool(self.lungs[index].all())

    def _march(self, start, direction, mask, step_mm=1.0, max_mm=200.0):
        """First voxel outside `mask` along a ray from `start` (voxel) in a direction given in mm."""
        step = direction * step_mm / self.spacing
        for i in range(1, int(max_mm / step_mm)):
            voxel = np.rint(start + i * step).astype(int)
            if np.any(voxel < 0) or np.any(voxel >= self.hu.shape):
                return None
            if not mask[tuple(voxel)]:
                return voxel
        return None

    # --- drawing -----------------------------------------------------------------------------
    def _render(self, shape: _Shape, centre, kind: str, labels: np.ndarray, pleural: bool):
        """(box, coverage alpha, region mask) if the lesion fits at centre, else None."""
        margin = shape.extent + 3 * self.blur_mm.max() + 2 * self.spacing.max()
        half = np.ceil(margin / self.spacing).astype(int)
        lo, hi = centre - half, centre + half + 1
        if np.any(centre - np.ceil(shape.extent / self.spacing) < 0) or np.any(centre + np.ceil(shape.extent / self.spacing) >= self.hu.shape):
            return None
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.hu.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        offsets = np.meshgrid(*[((np.arange(a, b) - c) * s).astype(np.float32)
                                for a, b, c, s in zip(lo, hi, centre, self.spacing)], indexing="ij", sparse=True)
        d = shape.distance(offsets)
        # partial volume: the voxel's extent along the (radial) normal is sum |n_i| * spacing_i
        width = sum(np.abs(o) * s for o, s in zip(offsets, self.spacing)) / (np.sqrt(sum(o * o for o in offsets)) + 1e-3)
        alpha = np.clip(0.5 - d / np.maximum(width, self.spacing.min()), 0, 1).astype(np.float32)
        inside = alpha >= 0.5
        if not inside.any():
            return None
        if kind == "node":
            fat = region = self.mediastinum[box]
            outside_fat = 0.1
            if self.fat_points is not None:  # "fat" sites: a node may displace unenhanced soft tissue
                original = self.original[box]
                region = ~self.lungs[box] & (original >= UNENHANCED_HU[0]) & (original <= UNENHANCED_HU[1])
                outside_fat = 1 / 3
            if (inside & ~fat).sum() > outside_fat * inside.sum() or self.original[box][inside].mean() > 80:
                return None
        else:
            region = self.lungs[box]
            allowed_outside = 0.4 if pleural or kind == "perihilar" else 0.02
            if (inside & ~region).sum() > allowed_outside * inside.sum():
                return None
            if kind == "juxtavascular" and not self._touches_vessel(box, inside):
                return None
        if pleural or kind in ("perihilar", "node"):
            alpha = alpha * region  # flattened against the pleura / kept in the mediastinum
        near = ndimage.binary_dilation(alpha >= 0.5, iterations=2)
        if (labels[box][near] > 0).any() or not (alpha >= 0.5).any():
            return None
        return box, alpha, region

    def _touches_vessel(self, box, inside: np.ndarray) -> bool:
        shell = ndimage.binary_dilation(inside, iterations=2) & ~inside
        return bool(((self.original[box] > VESSEL_HU) & self.lungs[box] & shell).any())

    def _texture(self, shape, sd: float, scale_mm: float) -> np.ndarray:
        field = ndimage.gaussian_filter(self.rng.standard_normal(shape).astype(np.float32), scale_mm / self.spacing)
        return field * (sd / (field.std() + 1e-6))

    def _lesion_hu(self, kind: str, shape: _Shape, box, centre) -> np.ndarray:
        """Intended HU of the lesion at each voxel of its box (used where alpha > 0)."""
        rng, u = self.rng, self.rng.uniform
        box_shape = tuple(s.stop - s.start for s in box)
        solid = u(10, 50) + self._texture(box_shape, u(6, 14), 1.5)
        if kind == "node":
            return u(25, 50) + self._texture(box_shape, 5, 2.0)
        if kind == "faint_ggo":
            return u(-800, -550) + self._texture(box_shape, u(20, 40), 1.5)
        if kind in ("ggo", "part_solid"):
            glass = u(-600, -350) + self._texture(box_shape, u(25, 50), 1.5)
            if kind == "ggo":
                return glass
            core = self._inner(shape, box, centre, u(0.3, 0.6))
            return glass + (solid - glass) * core
        if kind == "cavitating":
            cavity = self._inner(shape, box, centre, u(0.35, 0.65))
            return solid + (AIR_HU - solid) * cavity
        if kind == "mass" and rng.random() < 0.4:  # necrotic centre: fluid density, no air
            necrosis = self._inner(shape, box, centre, u(0.3, 0.6))
            return solid + (u(0, 20) - solid) * necrosis
        return solid

    def _inner(self, shape: _Shape, box, centre, fraction: float) -> np.ndarray:
        """Coverage of an eccentric inner sphere (a solid core or a cavity) of `fraction` x the radius."""
        rng = self.rng
        offset = _unit(rng) * shape.radius * (1 - fraction) * rng.uniform(0, 0.6)
        offsets = [(np.arange(s.start, s.stop) - c) * sp - o for s, c, sp, o in zip(box, centre, self.spacing, offset)]
        r = np.sqrt(sum(np.square(a) for a in np.meshgrid(*offsets, indexing="ij", sparse=True)))
        return np.clip(0.5 + (shape.radius * fraction - r) / self.spacing.mean(), 0, 1).astype(np.float32)

    def _blend(self, box, alpha: np.ndarray, lesion_hu: np.ndarray) -> None:
        """The background seen through (1 - A) plus the lesion, both through the scanner PSF."""
        lesion = alpha * lesion_hu
        if self.blur_mm.max() > 0:
            lesion = ndimage.gaussian_filter(lesion, self.blur_mm / self.spacing)
            alpha = np.clip(ndimage.gaussian_filter(alpha, self.blur_mm / self.spacing), 0, 1)
        blended = self.hu[box] * (1 - alpha) + lesion
        if self.noise_sd > 0:  # restore the background's noise SD where the lesion hides it
            noise = self._texture(alpha.shape, self.noise_sd, max(self.blur_mm[1], 0.3))
            blended += noise * np.sqrt(1 - (1 - alpha) ** 2)
        self.hu[box] = blended


def estimate_noise_and_blur(hu: np.ndarray, spacing, lungs: np.ndarray, slices: int = 8):
    """Rough scanner noise SD (HU) and PSF sigma (z, y, x) in mm of a CT volume, from a few thoracic slices.

    Noise: the typical local SD over 7 x 7 pixel windows of homogeneous soft tissue (-150..150 HU).
    Blur: the 10-90 % rise of the lateral skin edges (air to body), which for a Gaussian PSF is
    2.56 sigma; the slice profile is taken as at least the spacing between slices (FWHM).
    """
    spacing = np.asarray(spacing, float)
    rows = np.nonzero(lungs.any((1, 2)))[0]
    zs = np.linspace(rows.min(), rows.max(), slices).astype(int) if len(rows) else np.linspace(0, len(hu) - 1, slices).astype(int)
    stds, rises = [], []
    for z in zs:
        image = hu[z].astype(np.float64)
        mean = ndimage.uniform_filter(image, 7)
        sd = np.sqrt(np.maximum(ndimage.uniform_filter(image ** 2, 7) - mean ** 2, 0))
        flat = ndimage.minimum_filter(image, 7) > -300  # the whole window is tissue
        stds.append(sd[flat & (np.abs(mean) < 150)])
        rises.extend(_edge_rises(image))
    stds = np.concatenate(stds)
    noise = float(np.median(stds)) if len(stds) else 0.0
    sigma_xy = float(np.median(rises) * spacing[2] / 2.563) if rises else 0.0
    return noise, (float(max(spacing[0] / 2.355, sigma_xy)), sigma_xy, sigma_xy)


def _edge_rises(image: np.ndarray) -> list[float]:
    """10-90 % rise distances (pixels) of the first air-to-body crossing from each side of central body rows."""
    body_rows = np.nonzero((image > -500).sum(1) > image.shape[1] // 5)[0]
    rises = []
    if len(body_rows) == 0:
        return rises
    for y in np.linspace(body_rows.min(), body_rows.max(), 40).astype(int)[8:-8]:
        for profile in (image[y], image[y, ::-1]):
            inside = np.nonzero(profile > -500)[0]
            if len(inside) == 0 or inside[0] < 12:
                continue
            edge = profile[inside[0] - 10: inside[0] + 10]
            low, high = np.median(edge[:4]), np.median(edge[-6:-2])
            if high - low < 600:
                continue
            level = (edge - low) / (high - low)
            rises.append(_crossing(level, 0.9) - _crossing(level, 0.1))
    return rises


def _crossing(level: np.ndarray, value: float) -> float:
    """Sub-pixel position where a rising profile first reaches value."""
    i = int(np.argmax(level >= value))
    if i == 0:
        return 0.0
    return i - 1 + (value - level[i - 1]) / max(level[i] - level[i - 1], 1e-6)
