"""False-positive reduction: candidates pass a cascade of stages, in the order models/cascade_fp/model.json gives.

Stage type "features" (the first, cheapest stage) measures each candidate and keeps those within thresholds:
- size: longest axial diameter (RECIST) >= min_long_axis_mm (7 mm in the shipped model.json, so that a
  10 mm lesion whose outline measures short is still kept; the RECIST targets in lesions.json are >= 10 mm);
- location: share of its voxels inside the thorax (per slice with lung, the rectangle spanned by both
  lungs in the slices within 30 mm, which holds the lungs, hila, mediastinum and the pleura, and masses
  that replace aerated lung) >= min_thorax_fraction;
- intensity: mean HU within mean_hu (soft tissue or ground glass, not air, contrast-filled vessel or bone);
- shape: elongation (ratio of the two largest principal axes) <= max_elongation, vessels being tubes.

Stage type "torchscript" (learned, `file` beside model.json) gives each remaining candidate a lesion
probability and keeps it when the probability >= `threshold`. Its `input` is either
- "patches": the multiscale patches of model.json's `patches` spec, float32 [N, scales, 2, size, size, size]:
  per scale a cube of `fov_mm` centred on the candidate's centroid, resampled (trilinear) to `size`^3
  voxels; channel 0 the HU clipped to `intensity_window_hu` and scaled to [0, 1], channel 1 the
  candidate's own mask. A candidate reaching beyond the largest cube (over `whole_candidate_fill` of
  its side) widens every scale by the same factor, so that the stage sees it whole at any size; or
- "features": float32 [N, F], the candidate's features named in `feature_names`.
It returns the probability, float32 [N]. Patches and the multiscale Hessian measures (blob versus
tube, `hessian_features`) are computed once, for the candidates that reach the first learned stage.
A learned stage judges only candidates of the sizes at which it saw both lesions and false candidates in
training: a mass larger than that (the diameter of a sphere of the candidate's volume over the stage's
`max_equivalent_diameter_mm`) passes it unjudged, with a note in its features, rather than being dropped
by a stage that never learned to reject anything that large. A long but thin candidate (a sliver along
the heart or diaphragm) is still judged.

The lesion score is the probability of the last learned stage a candidate passed (the network's
maximum probability when there is none).

Plain functions: `filter_candidates(candidates, hu, spacing, thorax, cascade) -> CascadeResult`,
`load_cascade(model_dir) -> dict` (model.json with each learned stage's "module"), and the pieces the
training scripts share: `candidate_features`, `multiscale_patches`, `hessian_features`, `run_stages`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from monai.deploy.core import Fragment, Operator, OperatorSpec

from operators.lesion_segmentation import Candidates
from operators.measurements import axial_diameters, instance_boxes, relabel
from operators.thorax_crop import ThoraxCrop
from operators.volume import CTVolume, timed_compute

log = logging.getLogger(__name__)

STAGE_TYPES = ("features", "torchscript")
HESSIAN_SIGMA_FRACTION = 1 / 8  # Gaussian scale of the Hessian at each patch scale: fov_mm / 8
THORAX_REGION_REACH_MM = 30.0  # a slice's thorax rectangle spans the lungs of the slices this near


@dataclass
class CascadeResult:
    """Kept lesions renumbered 1..n (labels on the input grid of `candidates`), scores at index k - 1,
    and the measured features of every candidate (with the stage that dropped it, if any)."""

    labels: np.ndarray
    scores: list[float]
    features: list[dict]


def thorax_region(lungs: np.ndarray, spacing) -> np.ndarray:
    """Per axial slice with lung, the rectangle spanned by the lungs of the slices within
    THORAX_REGION_REACH_MM (empty where a slice has no lung).

    The reach keeps a mass or effusion that replaces the lateral or posterior lung over a few slices
    inside the region that the neighbouring slices' aerated lung spans.
    """
    reach = 2 * int(round(THORAX_REGION_REACH_MM / spacing[0])) + 1
    rows = ndimage.maximum_filter1d(lungs.any(axis=2), reach, axis=0)  # [z, y]
    columns = ndimage.maximum_filter1d(lungs.any(axis=1), reach, axis=0)  # [z, x]
    region = np.zeros_like(lungs)
    for z in np.flatnonzero(lungs.any(axis=(1, 2))):
        y, x = np.flatnonzero(rows[z]), np.flatnonzero(columns[z])
        region[z, y[0]:y[-1] + 1, x[0]:x[-1] + 1] = True
    return region


def _elongation(mask: np.ndarray, spacing) -> float:
    points = np.argwhere(mask) * np.asarray(spacing)
    if len(points) < 4:
        return 1.0
    eigen = np.sort(np.linalg.eigvalsh(np.cov(points.T)))[::-1]
    return float(np.sqrt(eigen[0] / max(eigen[1], 1e-6)))


def candidate_features(candidates: Candidates, hu: np.ndarray, spacing, region: np.ndarray) -> list[dict]:
    """Measured features of each candidate (list index k - 1 for instance k); `region` from `thorax_region`."""
    features = []
    for k, box in enumerate(instance_boxes(candidates.labels), start=1):
        mask = candidates.labels[box] == k
        diameters = axial_diameters(mask, spacing)
        features.append({
            "long_axis_mm": diameters.long_mm,
            "short_axis_mm": diameters.short_mm,
            "volume_ml": float(mask.sum() * np.prod(spacing) / 1000.0),
            "thorax_fraction": float(region[box][mask].mean()),
            "mean_hu": float(hu[box][mask].mean()),
            "elongation": _elongation(mask, spacing),
            "max_probability": float(candidates.max_probability[k - 1]),
            "mean_probability": float(candidates.mean_probability[k - 1]),
        })
    return features


def _sample(volume: np.ndarray, axes: list[np.ndarray], value: int | None = None) -> np.ndarray:
    """Trilinear samples on the grid spanned by per-axis voxel coordinates (edge values continue outside).

    Only the sub-box that the grid needs is read (and, with `value`, turned into the mask `== value`),
    so a patch costs the same in a volume of any size.
    """
    low = [min(max(int(np.floor(a.min())) - 1, 0), n - 1) for a, n in zip(axes, volume.shape)]
    high = [max(min(int(np.ceil(a.max())) + 2, n), lo + 1) for a, lo, n in zip(axes, low, volume.shape)]
    block = volume[tuple(slice(lo, hi) for lo, hi in zip(low, high))]
    block = (block == value) if value is not None else block
    grid = np.meshgrid(*[a - lo for a, lo in zip(axes, low)], indexing="ij")
    return ndimage.map_coordinates(block.astype(np.float32), grid, order=1, mode="nearest")


def cell_centres(size: int) -> np.ndarray:
    """Positions of a patch's `size` cells along one axis, across a cube of side 1 centred on 0."""
    return (np.arange(size) - (size - 1) / 2) / size


def whole_candidate_zoom(voxels: np.ndarray, spacing, largest_fov_mm: float, fill: float) -> float:
    """How much every scale's field of view widens (1 or more) so that the largest one, centred on the
    candidate's centroid, holds the whole candidate (voxel indices `voxels` [V, 3]) within the central
    share `fill` of its side."""
    reach_mm = (np.abs(voxels - voxels.mean(axis=0)).max(axis=0) + 0.5) * np.asarray(spacing, float)
    return max(1.0, 2 * float(reach_mm.max()) / (fill * largest_fov_mm))


def multiscale_patches(labels: np.ndarray, hu: np.ndarray, spacing, spec: dict, indices=None) -> np.ndarray:
    """Patches of candidates `indices` (0-based; all by default), float32 [N, scales, 2, size, size, size].

    Per scale a cube of side fov_mm centred on the candidate's centroid: channel 0 the HU clipped to
    the window and scaled to [0, 1], channel 1 the candidate's mask (instance index + 1 of `labels`).
    With `whole_candidate_fill` in the spec, a candidate wider than that share of the largest fov_mm
    widens every scale by the same factor (`whole_candidate_zoom`), so that the largest patch sees it whole
    and the scales keep their ratios.
    """
    size = int(spec["size"])
    low, high = spec["intensity_window_hu"]
    boxes = instance_boxes(labels)
    indices = range(len(boxes)) if indices is None else indices
    steps = cell_centres(size)
    patches = np.zeros((len(indices), len(spec["fov_mm"]), 2, size, size, size), np.float32)
    for n, index in enumerate(indices):
        box = boxes[index]
        voxels = np.argwhere(labels[box] == index + 1) + [s.start for s in box]
        centre = voxels.mean(axis=0)
        fill = spec.get("whole_candidate_fill")
        zoom = whole_candidate_zoom(voxels, spacing, max(spec["fov_mm"]), fill) if fill else 1.0
        for s, fov in enumerate(spec["fov_mm"]):
            axes = [c + steps * fov * zoom / d for c, d in zip(centre, spacing)]
            patches[n, s, 0] = (np.clip(_sample(hu, axes), low, high) - low) / (high - low)
            patches[n, s, 1] = _sample(labels, axes, value=index + 1)
    return patches


def _hessian_kernels(size: int) -> np.ndarray:
    """Gaussian second-derivative kernels (sigma = size / 8 voxels) at the cube's centre, scale-normalised
    (sigma^2 d2G), for the pairs (zz, yy, xx, zy, zx, yx); each sums to zero."""
    sigma = size * HESSIAN_SIGMA_FRACTION
    z, y, x = np.meshgrid(*[np.arange(size) - (size - 1) / 2] * 3, indexing="ij")
    gauss = np.exp(-(z ** 2 + y ** 2 + x ** 2) / (2 * sigma ** 2))
    gauss /= gauss.sum()
    kernels = [gauss * (a * a / sigma ** 2 - 1) for a in (z, y, x)] + [gauss * a * b / sigma ** 2
                                                                      for a, b in ((z, y), (z, x), (y, x))]
    return np.stack([k - gauss * k.sum() for k in kernels]).astype(np.float32)


def hessian_features(patches: np.ndarray, spec: dict) -> list[dict]:
    """Blob-versus-tube measures at each patch scale, from the Hessian of the windowed image at the centre.

    With eigenvalues l1 <= l2 <= l3 of the scale-normalised Hessian (sigma = fov_mm / 8): a bright
    sphere has l1 ~ l2 ~ l3 < 0, a bright tube l1 ~ l2 < 0 ~ l3, a plate l1 < 0 ~ l2 ~ l3. Per scale:
    blob = -l3 / -l1 (1 sphere, 0 tube), tube = -l2 / -l1 - blob (1 tube, 0 sphere), log = -(l1 + l2 + l3)
    (the scale-normalised Laplacian of Gaussian, large for a bright blob about that size). Geometry and
    contrast only, so they mean the same on phantoms and real CT.
    """
    kernels = _hessian_kernels(patches.shape[-1]).reshape(6, -1)
    measures = [{} for _ in range(len(patches))]
    for s, fov in enumerate(spec["fov_mm"]):
        zz, yy, xx, zy, zx, yx = (patches[:, s, 0].reshape(len(patches), kernels.shape[1]) @ kernels.T).T
        hessian = np.stack([np.stack([zz, zy, zx], -1), np.stack([zy, yy, yx], -1), np.stack([zx, yx, xx], -1)], -2)
        l1, l2, l3 = np.linalg.eigvalsh(hessian).T
        bright = np.maximum(-l1, 1e-6)
        blob = np.clip(-l3, 0, None) / bright
        tube = np.clip(-l2, 0, None) / bright - blob
        for measure, values in (("blob", blob), ("tube", tube), ("log", -(l1 + l2 + l3))):
            for candidate, value in zip(measures, values):
                candidate[f"hessian_{measure}_{fov:g}mm"] = float(value)
    return measures


def equivalent_diameter_mm(volume_ml: float) -> float:
    """The diameter of a sphere of this volume."""
    return float((6000.0 * volume_ml / np.pi) ** (1 / 3))


def stage_judges(stage: dict, feature: dict) -> bool:
    """Whether a learned stage judges this candidate: a sphere of its volume is no wider than the stage's
    `max_equivalent_diameter_mm` (larger candidates pass the stage unjudged)."""
    return equivalent_diameter_mm(feature["volume_ml"]) <= stage.get("max_equivalent_diameter_mm", np.inf)


def _feature_stage_rejects(feature: dict, thresholds: dict) -> str | None:
    """Why the feature stage drops a candidate, or None to keep it."""
    low_hu, high_hu = thresholds["mean_hu"]
    checks = [
        (feature["long_axis_mm"] >= thresholds["min_long_axis_mm"], "size"),
        (feature["thorax_fraction"] >= thresholds["min_thorax_fraction"], "location"),
        (low_hu <= feature["mean_hu"] <= high_hu, "intensity"),
        (feature["elongation"] <= thresholds["max_elongation"], "shape"),
    ]
    return next((reason for passed, reason in checks if not passed), None)


def stage_probability(stage: dict, features: list[dict], patches: np.ndarray | None) -> np.ndarray:
    """A learned stage's lesion probability for these candidates (float32 [N]; patches only for input "patches")."""
    if stage["input"] == "patches":
        inputs = torch.from_numpy(np.ascontiguousarray(patches, np.float32))
    else:
        inputs = torch.tensor([[f[name] for name in stage["feature_names"]] for f in features], dtype=torch.float32)
    with torch.inference_mode():
        return torch.cat([stage["module"](batch) for batch in inputs.split(64)]).numpy().astype(np.float32)


def run_stages(features: list[dict], stages: list[dict], patches_of: Callable[[list[int]], np.ndarray]) -> np.ndarray:
    """Apply `stages` in ascending order; dropped candidates get "dropped_by" in their features.

    `patches_of(indices)` gives the patches of candidates (0-based indices) and may add measures to
    their features; it is called once per candidate, when a learned stage first judges it.
    Returns every candidate's score: the probability of the last learned stage that saw it.
    """
    scores = np.array([f["max_probability"] for f in features], np.float32)
    patches = {}
    for stage in sorted(stages, key=lambda s: s["order"]):
        if stage["type"] not in STAGE_TYPES:
            raise ValueError(f"cascade stage type {stage['type']!r} is not supported by this version")
        alive = [i for i, feature in enumerate(features) if "dropped_by" not in feature]
        if not alive:
            break
        if stage["type"] == "features":
            for i in alive:
                reason = _feature_stage_rejects(features[i], stage["thresholds"])
                if reason:
                    features[i]["dropped_by"] = f"{stage['name']}: {reason}"
            continue
        judged = [i for i in alive if stage_judges(stage, features[i])]
        for i in set(alive) - set(judged):
            features[i][f"{stage['name']}_not_judged"] = (f"a mass over {stage['max_equivalent_diameter_mm']:g} mm, "
                                                          "larger than it learned to reject")
        if not judged:
            continue
        missing = [i for i in judged if i not in patches]
        if missing:
            patches.update(zip(missing, patches_of(missing)))
        batch = np.stack([patches[i] for i in judged]) if stage["input"] == "patches" else None
        probability = stage_probability(stage, [features[i] for i in judged], batch)
        for i, p in zip(judged, probability):
            features[i][f"{stage['name']}_probability"] = float(p)
            scores[i] = p
            if p < stage["threshold"]:
                features[i]["dropped_by"] = f"{stage['name']}: probability {p:.3f} < {stage['threshold']:.3f}"
    return scores


def filter_candidates(candidates: Candidates, hu: np.ndarray, spacing, thorax: ThoraxCrop, cascade: dict) -> CascadeResult:
    """Run the cascade's stages in order over the candidates (`hu` and masks in the candidates' frame).

    `cascade` is model.json as `load_cascade` returns it (learned stages carry their "module").
    """
    features = candidate_features(candidates, hu, spacing, thorax_region(thorax.lungs, spacing))

    def patches_of(indices):
        patches = multiscale_patches(candidates.labels, hu, spacing, cascade["patches"], indices)
        for i, measures in zip(indices, hessian_features(patches, cascade["patches"])):
            features[i].update(measures)
        return patches

    scores = run_stages(features, cascade["stages"], patches_of)
    kept = [k for k, feature in enumerate(features, start=1) if "dropped_by" not in feature]
    renumber = np.zeros(candidates.count + 1, np.int32)
    renumber[kept] = np.arange(1, len(kept) + 1)
    return CascadeResult(relabel(candidates.labels, renumber), [float(scores[k - 1]) for k in kept], features)


def learned_stage_names(cascade: dict) -> list[str]:
    """The names of the cascade's learned (TorchScript) stages, in model.json's order."""
    return [stage["name"] for stage in cascade["stages"] if stage["type"] == "torchscript"]


def load_cascade(model_dir: Path) -> dict:
    """model.json of the cascade with each learned stage's TorchScript module loaded (CPU, eval mode)."""
    model_dir = Path(model_dir)
    cascade = json.loads((model_dir / "model.json").read_text())
    for stage in cascade["stages"]:
        if stage["type"] == "torchscript":
            path = model_dir / stage["file"]
            if not path.is_file():
                raise FileNotFoundError(f"cascade stage {stage['name']!r}: no TorchScript file {path}")
            stage["module"] = torch.jit.load(str(path), map_location="cpu").eval()
    return cascade


class CascadeFPOperator(Operator):
    """Ports in: "volume", "thorax", "candidates"; out: the writer's inputs ("source_datasets", "hu",
    "spacing", "instance_labels" on the full series grid, "scores")."""

    def __init__(self, fragment: Fragment, *args, app_context, model_name: str = "cascade_fp", **kwargs):
        self.cascade = load_cascade(Path(app_context.model_path) / model_name)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        for name in ("volume", "thorax", "candidates"):
            spec.input(name)
        for name in ("source_datasets", "hu", "spacing", "instance_labels", "scores"):
            spec.output(name)

    @timed_compute
    def compute(self, op_input, op_output, context):
        volume: CTVolume = op_input.receive("volume")
        thorax: ThoraxCrop = op_input.receive("thorax")
        candidates: Candidates = op_input.receive("candidates")
        result = filter_candidates(candidates, volume.hu[thorax.box], volume.spacing, thorax, self.cascade)
        for k, feature in enumerate(result.features, start=1):
            log.log(logging.DEBUG if "dropped_by" in feature else logging.INFO, "candidate %d: %s", k, ", ".join(
                f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in feature.items()))
        log.info("%d of %d candidates kept", len(result.scores), candidates.count)
        labels = np.zeros(volume.hu.shape, np.int32)
        np.copyto(labels[thorax.box], result.labels, where=result.labels > 0)  # writes the lesions' voxels only
        op_output.emit(volume.source_datasets, "source_datasets")
        op_output.emit(volume.hu, "hu")
        op_output.emit(volume.spacing, "spacing")
        op_output.emit(labels, "instance_labels")
        op_output.emit(result.scores, "scores")
