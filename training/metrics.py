"""Lesion segmentation metrics, as defined in ../shared/docs/DESIGN.md ("Metrics").

- Instance: a 26-connected component of one predicted label.
- Measurable truth lesion: longest axial diameter >= `min_diameter_mm` (10 mm, RECIST 1.1).
  Smaller truth lesions are neither missed nor false positives when found.
- Detected: some predicted instance reaches Dice >= 0.1 with the lesion ("any overlap" is reported too).
- False positive: a predicted instance that touches no truth lesion at all.
- Case Dice: all predicted voxels against all truth voxels (1.0 when both are empty); pooled Dice likewise
  over all voxels of the set; the mean case Dice is taken over cases with truth lesions.
- Lesion-wise Dice: mean over detected measurable lesions of the Dice with their best instance.
- FROC over instance scores; CPM = mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP per scan.

CPM interpolation (as in the LUNA16 evaluation script): the FROC operating points are taken at every
distinct instance score (an instance is kept when its score >= threshold), plus the origin (nothing
kept: 0 FP, sensitivity 0). Per FP rate the best sensitivity is kept, sensitivity is interpolated
linearly in FP per scan between points, and beyond the last point it stays at the last (highest)
sensitivity.

Boxes-only truth (filled boxes, e.g. detection datasets): detection is any overlap, Dice is not
defined (None), and a box's diameter is its longer in-plane side.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from operators.measurements import axial_diameters, label_instances

DETECTION_DICE = 0.1
CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class LesionResult:
    """One truth lesion: its size, whether it was found, and by how well."""

    label: int
    diameter_mm: float
    measurable: bool
    voxels: int
    dice: float | None  # Dice with the best predicted instance (None for boxes-only truth)
    detected: bool  # Dice >= 0.1 with some instance (boxes-only truth: any overlap)
    overlap_detected: bool  # touched by some instance
    detection_score: float | None  # highest score of the instances that detect it


@dataclass
class InstanceResult:
    """One predicted instance (26-connected component of one predicted label)."""

    label: int  # the predicted label it belongs to
    score: float
    voxels: int
    false_positive: bool  # touches no truth lesion at all


@dataclass
class CaseResult:
    name: str
    case_dice: float | None  # None for boxes-only truth
    pred_voxels: int
    truth_voxels: int
    intersection_voxels: int
    lesions: list[LesionResult] = field(default_factory=list)
    instances: list[InstanceResult] = field(default_factory=list)

    @property
    def measurable(self) -> int:
        return sum(lesion.measurable for lesion in self.lesions)

    @property
    def detected(self) -> int:
        return sum(lesion.measurable and lesion.detected for lesion in self.lesions)

    @property
    def false_positives(self) -> int:
        return sum(instance.false_positive for instance in self.instances)


def _instances(pred_labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Instance map (1..n) and, per instance, the predicted label it came from (label per bounding box)."""
    instances = np.zeros(pred_labels.shape, np.int32)
    sources = []
    for index, box in enumerate(ndimage.find_objects(pred_labels)):
        if box is None:
            continue
        label = index + 1
        components, count = label_instances(pred_labels[box] == label)
        inside = components > 0
        instances[box][inside] = components[inside] + len(sources)
        sources.extend([label] * count)
    return instances, sources


def _lesion_diameter(mask: np.ndarray, spacing, boxes_only: bool) -> float:
    if boxes_only:
        _, rows, cols = mask.shape
        return float(max(rows * spacing[1], cols * spacing[2]))
    return axial_diameters(mask, spacing).long_mm


def evaluate_case(pred_labels: np.ndarray, truth_labels: np.ndarray, spacing, pred_scores: dict | None = None,
                  boxes_only: bool = False, min_diameter_mm: float = 10.0, name: str = "") -> CaseResult:
    """Compare one case's predicted labels with its truth instance labels (same [z, y, x] grid, (z, y, x) mm).

    `pred_scores` maps a predicted label to its score (default 1.0); all instances of a label share it.
    """
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction grid {pred_labels.shape} differs from truth grid {truth_labels.shape}")
    pred_scores = pred_scores or {}
    truth_labels = np.asarray(truth_labels, np.int32)
    instances, sources = _instances(np.asarray(pred_labels, np.int32))
    scores = np.array([float(pred_scores.get(label, 1.0)) for label in sources])

    instance_voxels = np.bincount(instances.ravel(), minlength=len(sources) + 1)
    truth_voxels = np.bincount(truth_labels.ravel())
    both = (instances > 0) & (truth_labels > 0)
    # Overlap of every (instance, lesion) pair, counted on the overlapping voxels only.
    stride = np.int64(len(truth_voxels))
    pairs, overlap = np.unique(instances[both] * stride + truth_labels[both], return_counts=True)
    pair_instance, pair_lesion = pairs // stride, pairs % stride
    pair_dice = 2 * overlap / (instance_voxels[pair_instance] + truth_voxels[pair_lesion])

    lesions = []
    for index, box in enumerate(ndimage.find_objects(truth_labels)):
        if box is None:
            continue
        label = index + 1
        diameter = _lesion_diameter(truth_labels[box] == label, spacing, boxes_only)
        mine = pair_lesion == label
        dice = float(pair_dice[mine].max()) if mine.any() else 0.0
        detecting = mine if boxes_only else mine & (pair_dice >= DETECTION_DICE)
        lesions.append(LesionResult(
            label=label, diameter_mm=diameter, measurable=diameter >= min_diameter_mm,
            voxels=int(truth_voxels[label]), dice=None if boxes_only else dice,
            detected=bool(detecting.any()), overlap_detected=bool(mine.any()),
            detection_score=float(scores[pair_instance[detecting] - 1].max()) if detecting.any() else None))

    touching = set(pair_instance.tolist())
    instance_results = [InstanceResult(label=source, score=float(scores[i]), voxels=int(instance_voxels[i + 1]),
                                       false_positive=(i + 1) not in touching) for i, source in enumerate(sources)]

    pred_total, truth_total, intersection = int(instance_voxels[1:].sum()), int(truth_voxels[1:].sum()), int(both.sum())
    if boxes_only:
        case_dice = None
    else:
        case_dice = 1.0 if pred_total + truth_total == 0 else 2 * intersection / (pred_total + truth_total)
    return CaseResult(name=name, case_dice=case_dice, pred_voxels=pred_total, truth_voxels=truth_total,
                      intersection_voxels=intersection, lesions=lesions, instances=instance_results)


def froc_curve(results: list[CaseResult]) -> dict:
    """Sensitivity and FP per scan at every distinct instance score (descending thresholds)."""
    measurable = [lesion for result in results for lesion in result.lesions if lesion.measurable]
    fp_scores = np.sort([i.score for result in results for i in result.instances if i.false_positive])
    detection_scores = np.sort([lesion.detection_score for lesion in measurable if lesion.detection_score is not None])
    thresholds = np.unique([i.score for result in results for i in result.instances])[::-1]

    def at_or_above(sorted_scores):
        return len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="left")

    fps = at_or_above(fp_scores) / max(len(results), 1)
    detected = at_or_above(detection_scores)
    sensitivity = (detected / len(measurable)).tolist() if measurable else [None] * len(thresholds)
    return {"thresholds": thresholds.tolist(), "fp_per_scan": fps.tolist(), "sensitivity": sensitivity}


def interpolated_sensitivity(curve: dict, fp_rates) -> np.ndarray:
    """Sensitivity at the given FP-per-scan rates, interpolated as described in the module notes."""
    fps = np.concatenate([[0.0], curve["fp_per_scan"]])
    sensitivity = np.concatenate([[0.0], curve["sensitivity"]])
    rates = np.unique(fps)
    best = np.array([sensitivity[fps == rate].max() for rate in rates])
    return np.interp(fp_rates, rates, best)


def cpm(curve: dict, fp_rates=CPM_FP_RATES) -> tuple[float, list[float]]:
    """Competition performance metric: mean interpolated sensitivity at `fp_rates`."""
    at_rates = interpolated_sensitivity(curve, fp_rates)
    return float(at_rates.mean()), at_rates.tolist()


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def summarize(results: list[CaseResult], fp_rates=CPM_FP_RATES) -> dict:
    """Set-level metrics (JSON-ready). Ratios with an empty denominator are None."""
    with_dice = [r for r in results if r.case_dice is not None]
    measurable = [lesion for r in results for lesion in r.lesions if lesion.measurable]
    detected = [lesion for lesion in measurable if lesion.detected]
    overlapped = [lesion for lesion in measurable if lesion.overlap_detected]
    false_positives = sum(r.false_positives for r in results)
    pooled_terms = sum(r.pred_voxels + r.truth_voxels for r in with_dice)
    pooled_dice = 2 * sum(r.intersection_voxels for r in with_dice) / pooled_terms if pooled_terms else 1.0
    curve = froc_curve(results)
    score, at_rates = cpm(curve, fp_rates) if measurable else (None, [None] * len(fp_rates))
    return {
        "cases": len(results),
        "cases_with_lesions": sum(r.truth_voxels > 0 for r in results),
        "case_dice_mean": _mean(r.case_dice for r in with_dice if r.truth_voxels > 0),
        "pooled_dice": pooled_dice if with_dice else None,
        "measurable_lesions": len(measurable),
        "detected": len(detected),
        "sensitivity": _ratio(len(detected), len(measurable)),
        "detected_any_overlap": len(overlapped),
        "sensitivity_any_overlap": _ratio(len(overlapped), len(measurable)),
        "false_positives": false_positives,
        "fp_per_scan": _ratio(false_positives, len(results)),
        "lesion_dice_mean": _mean(lesion.dice for lesion in detected if lesion.dice is not None),
        "froc": curve,
        "cpm": score,
        "cpm_sensitivities": dict(zip([str(rate) for rate in fp_rates], at_rates)),
    }


def plot_froc(summary_or_curves: dict, path) -> None:
    """Write a FROC plot (PNG). Pass one summary, or {name: summary} to overlay several curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {"": summary_or_curves} if "froc" in summary_or_curves else summary_or_curves
    figure, axes = plt.subplots(figsize=(6, 4.5))
    rates_axis = np.geomspace(1 / 16, 16, 400)
    for name, summary in curves.items():
        if summary["cpm"] is None:  # no measurable lesions: no curve
            continue
        # Draw the interpolated curve the CPM is read from, so the markers lie on it.
        line, = axes.plot(rates_axis, interpolated_sensitivity(summary["froc"], rates_axis), label=f"{name} (CPM {summary['cpm']:.3f})".strip())
        rates = [float(rate) for rate in summary["cpm_sensitivities"]]
        axes.plot(rates, list(summary["cpm_sensitivities"].values()), "o", color=line.get_color(), markersize=4)
    axes.set_xscale("log")
    axes.set_xlim(1 / 16, 16)
    axes.set_xticks(CPM_FP_RATES, ["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("false positives per scan")
    axes.set_ylabel("lesion sensitivity (Dice >= 0.1)")
    axes.set_title("FROC")
    axes.grid(True, which="both", alpha=0.3)
    if axes.lines:
        axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
