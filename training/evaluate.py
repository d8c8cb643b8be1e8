"""Evaluate predicted lesion labels against truth (metrics of ../shared/docs/DESIGN.md, see training/metrics.py).

    python -m training.evaluate --pred PRED_DIR --truth labelsTr [--out OUT_DIR]

PRED_DIR holds <case>.nii.gz instance labels and optionally <case>.json {"scores": {"1": 0.93, ...}}
(unscored labels count 1.0); the truth folder holds <case>.nii.gz instance labels on the same grids.
Every truth case needs a prediction unless --only-predicted is given (a labelsTr folder that also
holds training cases). Prints a per-case table and the summary; writes OUT/metrics.json and OUT/froc.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from training.metrics import evaluate_case, plot_froc, summarize
from training.nifti import read_nifti

SUFFIX = ".nii.gz"


class EvaluationError(Exception):
    """A problem with the inputs, reported as one line."""


def _cases(folder: Path) -> set[str]:
    return {path.name[: -len(SUFFIX)] for path in folder.glob("*" + SUFFIX)}


def _labels(path: Path):
    array, spacing = read_nifti(path)
    return np.rint(array).astype(np.int32), spacing


def _scores(path: Path) -> dict[int, float]:
    if not path.exists():
        return {}
    return {int(label): float(score) for label, score in json.loads(path.read_text()).get("scores", {}).items()}


def select_cases(pred_dir: Path, truth_dir: Path, only_predicted: bool) -> list[str]:
    predicted, truth = _cases(pred_dir), _cases(truth_dir)
    without_truth = sorted(predicted - truth)
    if without_truth:
        raise EvaluationError(f"no truth in {truth_dir} for {len(without_truth)} case(s): {', '.join(without_truth[:5])}")
    without_prediction = sorted(truth - predicted)
    if without_prediction and not only_predicted:
        raise EvaluationError(f"no prediction in {pred_dir} for {len(without_prediction)} case(s): "
                              f"{', '.join(without_prediction[:5])} (use --only-predicted to evaluate a subset)")
    cases = sorted(predicted)
    if not cases:
        raise EvaluationError(f"no {SUFFIX} predictions in {pred_dir}")
    return cases


def evaluate_folder(pred_dir: Path, truth_dir: Path, min_diameter_mm: float = 10.0, boxes_only: bool | set = False,
                    only_predicted: bool = False, log=print) -> tuple[list, dict]:
    cases = select_cases(pred_dir, truth_dir, only_predicted)
    results = []
    start = time.time()
    log(f"{'case':<24}{'dice':>7}{'meas':>6}{'det':>5}{'ovl':>5}{'fp':>5}{'inst':>6}")
    for number, case in enumerate(cases, 1):
        pred, pred_spacing = _labels(pred_dir / (case + SUFFIX))
        truth, spacing = _labels(truth_dir / (case + SUFFIX))
        if pred.shape != truth.shape or not np.allclose(pred_spacing, spacing, rtol=1e-3):
            raise EvaluationError(f"{case}: prediction grid {pred.shape} {pred_spacing} differs from truth grid "
                                  f"{truth.shape} {spacing}")
        result = evaluate_case(pred, truth, spacing, _scores(pred_dir / f"{case}.json"),
                               boxes_only=case in boxes_only if isinstance(boxes_only, set) else boxes_only,
                               min_diameter_mm=min_diameter_mm, name=case)
        results.append(result)
        dice = "-" if result.case_dice is None else f"{result.case_dice:.3f}"
        overlapped = sum(lesion.measurable and lesion.overlap_detected for lesion in result.lesions)
        log(f"{case:<24}{dice:>7}{result.measurable:>6}{result.detected:>5}{overlapped:>5}"
            f"{result.false_positives:>5}{len(result.instances):>6}   [{number}/{len(cases)}, {time.time() - start:.0f} s]")
    return results, summarize(results)


def format_summary(summary: dict) -> str:
    def number(value):
        return "n/a" if value is None else f"{value:.3f}"

    return "\n".join([
        f"cases {summary['cases']} ({summary['cases_with_lesions']} with lesions)",
        f"case Dice (mean over cases with lesions) {number(summary['case_dice_mean'])}, "
        f"pooled Dice {number(summary['pooled_dice'])}",
        f"sensitivity (Dice >= 0.1) {number(summary['sensitivity'])} "
        f"({summary['detected']}/{summary['measurable_lesions']} measurable lesions), "
        f"any overlap {number(summary['sensitivity_any_overlap'])} ({summary['detected_any_overlap']})",
        f"false positives {summary['false_positives']} ({number(summary['fp_per_scan'])} per scan)",
        f"lesion-wise Dice {number(summary['lesion_dice_mean'])}",
        f"CPM {number(summary['cpm'])}  sensitivity at FP/scan "
        + "  ".join(f"{rate}: {number(value)}" for rate, value in summary["cpm_sensitivities"].items()),
    ])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", type=Path, required=True, help="folder of predicted <case>.nii.gz (+ <case>.json)")
    parser.add_argument("--truth", type=Path, required=True, help="folder of truth <case>.nii.gz instance labels")
    parser.add_argument("--out", type=Path, help="folder for metrics.json and froc.png")
    parser.add_argument("--min-diameter-mm", type=float, default=10.0, help="smallest measurable lesion (RECIST)")
    parser.add_argument("--boxes-only", nargs="*", metavar="CASE",
                        help="truth labels are filled boxes (no Dice): for all cases, or only the cases named")
    parser.add_argument("--only-predicted", action="store_true", help="evaluate only the cases that have predictions")
    args = parser.parse_args(argv)
    for folder in (args.pred, args.truth):
        if not folder.is_dir():
            sys.exit(f"error: {folder} is not a folder")
    try:
        boxes_only = set(args.boxes_only) if args.boxes_only else args.boxes_only is not None  # names, all or none
        results, summary = evaluate_folder(args.pred, args.truth, args.min_diameter_mm, boxes_only,
                                           args.only_predicted)
    except EvaluationError as error:
        sys.exit(f"error: {error}")
    print(format_summary(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        boxes_note = sorted(boxes_only) if isinstance(boxes_only, set) else boxes_only
        (args.out / "metrics.json").write_text(json.dumps(
            {"summary": summary, "min_diameter_mm": args.min_diameter_mm, "boxes_only": boxes_note,
             "cases": [asdict(result) for result in results]}, indent=1))
        plot_froc(summary, args.out / "froc.png")
        print(f"wrote {args.out / 'metrics.json'} and {args.out / 'froc.png'}")


if __name__ == "__main__":
    main()
