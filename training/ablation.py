"""Ablation of the false-positive cascade: segmentation alone, then each stage added in order.

    python -m training.ablation --set "held-out phantoms" runs/cascade/mined/heldout \
        --set "real cases" runs/cascade/mined/real --out runs/cascade/ablation \
        [--timing phantom_03000 phantom_03001 lidc0001 ...]

Each --set is a folder of training.mine_candidates .npz files (held-out phantom seeds 3000+, the real
cases; never data the cascade was trained or thresholded on). Per case the stored candidates pass the
stages of --cascade (operators.cascade_fp.run_stages, as in the app) and are scored with
training/metrics.py (Dice >= 0.1 detection, FP = touching no truth lesion, FROC, CPM); a case without
thorax (the app refuses it) has no prediction. Writes OUT/ablation.md (the table), OUT/ablation.json,
OUT/froc_<set>.png.

Timing (--timing): the cascade's added time per study, operators.cascade_fp.filter_candidates as
CascadeFPOperator runs it, on the named mined cases' volumes (NIfTI re-read, phantoms regenerated)
with their stored candidates; it also checks that it keeps the same candidates as the stored-patch
evaluation.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from operators.cascade_fp import filter_candidates, load_cascade, run_stages
from operators.lesion_segmentation import Candidates
from operators.thorax_crop import crop_thorax
from training.metrics import evaluate_case, plot_froc, summarize
from training.mine_candidates import load_mined, load_source


def stage_prefixes(cascade: dict) -> list[tuple[str, list[dict]]]:
    """("segmentation alone", []), then each stage added in order: (row name, stages so far)."""
    stages = sorted(cascade["stages"], key=lambda s: s["order"])
    rows = [("segmentation alone", [])]
    for n, stage in enumerate(stages, 1):
        rows.append((("full cascade: " if n == len(stages) and n > 1 else "+ ") + stage["name"], stages[:n]))
    return rows


def case_features(case: dict) -> list[dict]:
    names = [str(n) for n in case["feature_names"]]
    return [dict(zip(names, map(float, row))) for row in case["features"]]


def kept_and_scores(case: dict, stages: list[dict]) -> tuple[list[int], np.ndarray]:
    """Candidates (1-based) the stages keep, and every candidate's score."""
    features = case_features(case)
    scores = run_stages(features, stages, lambda index: case["patches"][index].astype(np.float32))
    return [k for k, f in enumerate(features, 1) if "dropped_by" not in f], scores


def evaluate_stages(case: dict, stages: list[dict]):
    kept, scores = kept_and_scores(case, stages)
    renumber = np.zeros(len(scores) + 1, np.int32)
    renumber[kept] = np.arange(1, len(kept) + 1)
    return evaluate_case(renumber[case["candidate_labels"]], case["truth"], tuple(case["spacing"]),
                         {n: float(scores[k - 1]) for n, k in enumerate(kept, 1)}, boxes_only=bool(case["boxes_only"]),
                         name=str(case["name"]))


def ablation(sets: dict[str, Path], cascade: dict, out: Path, log=print) -> dict:
    rows = stage_prefixes(cascade)
    report = {}
    for set_name, folder in sets.items():
        results = {row: [] for row, _ in rows}
        paths = sorted(folder.glob("*.npz"))
        start = time.perf_counter()
        for number, path in enumerate(paths, 1):
            case = load_mined(path)
            for row, stages in rows:
                results[row].append(evaluate_stages(case, stages))
            line = ", ".join(f"{len(results[row][-1].instances)}" for row, _ in rows)
            log(f"[{set_name} {number}/{len(paths)}, {time.perf_counter() - start:.0f} s] {path.stem}: "
                f"{results[rows[0][0]][-1].measurable} measurable lesions; candidates kept per row {line}")
        summaries = {row: summarize(found) for row, found in results.items()}
        report[set_name] = {"cases": len(paths), "rows": summaries}
        plot_froc(summaries, out / f"froc_{re.sub(r'[^a-z0-9]+', '_', set_name.lower()).strip('_')}.png")
    return report


def _number(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_table(report: dict) -> str:
    lines = ["| set | configuration | sensitivity (detected / measurable) | FP per scan | FP change | CPM |",
             "|---|---|---|---|---|---|"]
    for set_name, entry in report.items():
        summaries = list(entry["rows"].items())
        base = summaries[0][1]["fp_per_scan"]
        for n, (row, summary) in enumerate(summaries):
            change = f"{100 * (summary['fp_per_scan'] - base) / base:+.0f} %" if n and base else "-"
            lines.append(f"| {set_name} ({entry['cases']} scans) | {row} | {_number(summary['sensitivity'])} "
                         f"({summary['detected']} / {summary['measurable_lesions']}) | {_number(summary['fp_per_scan'], 2)} "
                         f"| {change} | {_number(summary['cpm'])} |")
    return "\n".join(lines)


def _candidates(case: dict) -> Candidates:
    """The stored candidates in the thorax box's frame."""
    box = [slice(int(t0 - e0), int(t1 - e0)) for (t0, t1), (e0, _) in zip(case["thorax_box"], case["eval_box"])]
    features = case_features(case)
    return Candidates(case["candidate_labels"][tuple(box)].astype(np.int32),
                      np.array([f["max_probability"] for f in features], np.float32),
                      np.array([f["mean_probability"] for f in features], np.float32))


def time_cascade(paths: list[Path], cascade: dict, log=print) -> dict:
    """filter_candidates' time on each mined case's volume (with its stored candidates), and agreement with
    the stored-patch evaluation."""
    timings = {}
    for path in paths:
        case = load_mined(path)
        if case["no_thorax"]:
            continue
        hu, spacing = load_source(case)
        thorax = crop_thorax(hu, spacing)
        candidates = _candidates(case)
        start = time.perf_counter()
        result = filter_candidates(candidates, hu[thorax.box], spacing, thorax, cascade)
        seconds = time.perf_counter() - start
        stored_kept, _ = kept_and_scores(case, cascade["stages"])
        kept = [k for k, f in enumerate(result.features, 1) if "dropped_by" not in f]
        timings[path.stem] = {"seconds": seconds, "candidates": candidates.count, "kept": len(kept),
                              "same_as_stored": kept == stored_kept}
        log(f"timing {path.stem}: {hu.shape}, {candidates.count} candidates -> {len(kept)} kept in {seconds:.2f} s "
            f"(stored evaluation keeps {len(stored_kept)}{'' if kept == stored_kept else ', DIFFERENT'})")
    values = [t["seconds"] for t in timings.values()]
    return {"studies": timings, "median_s": float(np.median(values)) if values else None,
            "max_s": float(np.max(values)) if values else None}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs=2, action="append", metavar=("NAME", "FOLDER"), required=True)
    parser.add_argument("--cascade", type=Path, default=Path("models/cascade_fp"))
    parser.add_argument("--out", type=Path, default=Path("runs/cascade/ablation"))
    parser.add_argument("--timing", nargs="*", default=[], help="mined cases (names) to time the cascade on")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    cascade = load_cascade(args.cascade)
    sets = {name: Path(folder) for name, folder in args.set}
    report = ablation(sets, cascade, args.out, log=lambda line: print(line, flush=True))
    mined = {p.stem: p for folder in sets.values() for p in folder.glob("*.npz")}
    timing = time_cascade([mined[name] for name in args.timing], cascade, log=lambda line: print(line, flush=True))
    table = format_table(report)
    median = timing["median_s"]
    text = (f"{table}\n\nCascade time per study (filter_candidates, {torch.get_num_threads()} threads): median "
            f"{_number(median, 2)} s, max {_number(timing['max_s'], 2)} s over {len(timing['studies'])} studies\n")
    (args.out / "ablation.md").write_text(text)
    for entry in report.values():
        for summary in entry["rows"].values():
            summary.pop("froc")
    (args.out / "ablation.json").write_text(json.dumps({"sets": report, "timing": timing}, indent=1))
    print(text)
    print(f"wrote {args.out / 'ablation.md'}, ablation.json and the FROC plots")


if __name__ == "__main__":
    main()
