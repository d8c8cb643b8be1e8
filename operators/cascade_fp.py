"""False-positive reduction: candidates pass a cascade of stages, in the order models/cascade_fp/model.json gives.

Stage type "features" (the first stage) measures each candidate and keeps those within thresholds:
- size: longest axial diameter (RECIST) >= min_long_axis_mm (10 mm by default);
- location: share of its voxels inside the thorax (the per-slice rectangle spanned by both lungs,
  which holds the lungs, hila, mediastinum and the pleura) >= min_thorax_fraction;
- intensity: mean HU within mean_hu (soft tissue or ground glass, not air, contrast-filled vessel or bone);
- shape: elongation (ratio of the two largest principal axes) <= max_elongation, vessels being tubes.
The lesion score is the candidate's maximum network probability. Learned stages (TorchScript CNNs
over multiscale patches) will be further types in `stages`, each with its order and threshold.

Plain function: `filter_candidates(candidates, hu, spacing, thorax, config) -> CascadeResult`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from monai.deploy.core import Fragment, Operator, OperatorSpec

from operators.lesion_segmentation import Candidates
from operators.measurements import axial_diameters
from operators.thorax_crop import ThoraxCrop
from operators.volume import CTVolume, timed_compute

log = logging.getLogger(__name__)


@dataclass
class CascadeResult:
    """Kept lesions renumbered 1..n (labels on the input grid of `candidates`), scores at index k - 1,
    and the measured features of every candidate (with the stage that dropped it, if any)."""

    labels: np.ndarray
    scores: list[float]
    features: list[dict]


def _thorax_region(lungs: np.ndarray) -> np.ndarray:
    """Per axial slice, the rectangle spanned by the lungs (empty where a slice has no lung)."""
    region = np.zeros_like(lungs)
    for z in np.flatnonzero(lungs.any(axis=(1, 2))):
        rows, columns = np.flatnonzero(lungs[z].any(axis=1)), np.flatnonzero(lungs[z].any(axis=0))
        region[z, rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1] = True
    return region


def _elongation(mask: np.ndarray, spacing) -> float:
    points = np.argwhere(mask) * np.asarray(spacing)
    if len(points) < 4:
        return 1.0
    eigen = np.sort(np.linalg.eigvalsh(np.cov(points.T)))[::-1]
    return float(np.sqrt(eigen[0] / max(eigen[1], 1e-6)))


def candidate_features(candidates: Candidates, hu: np.ndarray, spacing, thorax_region: np.ndarray) -> list[dict]:
    """Measured features of each candidate (list index k - 1 for instance k)."""
    features = []
    for k, box in enumerate(ndimage.find_objects(candidates.labels), start=1):
        mask = candidates.labels[box] == k
        diameters = axial_diameters(mask, spacing)
        features.append({
            "long_axis_mm": diameters.long_mm,
            "short_axis_mm": diameters.short_mm,
            "volume_ml": float(mask.sum() * np.prod(spacing) / 1000.0),
            "thorax_fraction": float(thorax_region[box][mask].mean()),
            "mean_hu": float(hu[box][mask].mean()),
            "elongation": _elongation(mask, spacing),
            "max_probability": float(candidates.max_probability[k - 1]),
        })
    return features


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


def filter_candidates(candidates: Candidates, hu: np.ndarray, spacing, thorax: ThoraxCrop, config: dict) -> CascadeResult:
    """Run the configured stages in order over the candidates (`hu` and masks in the candidates' frame)."""
    features = candidate_features(candidates, hu, spacing, _thorax_region(thorax.lungs))
    for stage in sorted(config["stages"], key=lambda s: s["order"]):
        if stage["type"] != "features":
            raise ValueError(f"cascade stage type {stage['type']!r} is not supported by this version")
        for feature in features:
            if "dropped_by" not in feature:
                reason = _feature_stage_rejects(feature, stage["thresholds"])
                if reason:
                    feature["dropped_by"] = f"{stage['name']}: {reason}"
    kept = [k for k, feature in enumerate(features, start=1) if "dropped_by" not in feature]
    renumber = np.zeros(candidates.count + 1, np.int32)
    renumber[kept] = np.arange(1, len(kept) + 1)
    return CascadeResult(renumber[candidates.labels], [features[k - 1]["max_probability"] for k in kept], features)


class CascadeFPOperator(Operator):
    """Ports in: "volume", "thorax", "candidates"; out: the writer's inputs ("source_datasets", "hu",
    "spacing", "instance_labels" on the full series grid, "scores")."""

    def __init__(self, fragment: Fragment, *args, app_context, model_name: str = "cascade_fp", **kwargs):
        self.config = json.loads((Path(app_context.model_path) / model_name / "model.json").read_text())
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
        result = filter_candidates(candidates, volume.hu[thorax.box], volume.spacing, thorax, self.config)
        for k, feature in enumerate(result.features, start=1):
            log.log(logging.DEBUG if "dropped_by" in feature else logging.INFO, "candidate %d: %s", k, ", ".join(
                f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}" for key, value in feature.items()))
        log.info("%d of %d candidates kept", len(result.scores), candidates.count)
        labels = np.zeros(volume.hu.shape, np.int32)
        labels[thorax.box] = result.labels
        op_output.emit(volume.source_datasets, "source_datasets")
        op_output.emit(volume.hu, "hu")
        op_output.emit(volume.spacing, "spacing")
        op_output.emit(labels, "instance_labels")
        op_output.emit(result.scores, "scores")
