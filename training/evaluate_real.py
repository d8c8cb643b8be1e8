"""The whole app's analysis on real CT with lesion truth: every lesion found or not (and which step lost
it), every false lesion with its size and place, and the set metrics of ../shared/docs/DESIGN.md.

    python -m training.evaluate_real --set "real (test only)" ../shared/data/real \
        --set "real-train" ../shared/data/real-train --out runs/eval_real [--cascade DIR] [--seg-model DIR]

Each --set is a folder of cases as in ../shared/data (`dicom/`, `truth.json`, `truth.npz`), or a phantom
dataset of training.make_dataset (`imagesTr/`, `labelsTr/` with each lesion's kind), the second check beside
real CT, or lesions inserted into real CT by training.real_backgrounds (partial truth: the inserted lesions;
the IGNORE regions, which may hold the scan's own lesions, are not truth). Per case the app's own plain
functions run in the app's order: thoracic box (operators.thorax_crop), lesion probability and candidates
(operators.lesion_segmentation), the cascade (operators.cascade_fp). The network runs where the app runs it
(CUDA when there is a GPU, in model.json's precision for that device). Its probability is cached per case,
network and device type (--cache), so other cascades are evaluated in seconds.

Missed lesions name the step that lost them: "thorax box" (under half of it inside the box), "segmentation"
(no candidate detects it; the network's highest probability inside it is given) or the cascade stage that
dropped the candidate that detected it. Partial truth (`"partial_truth": true`, real-train: one target
lesion outlined per patient): sensitivity and lesion Dice of the targets only; other kept lesions are
listed as "unlabelled findings" (not proven false) and no FP rate or case Dice is given for such a set.
Each set also gives the volume of its false lesions (unlabelled findings) per scan, since a count alone
weighs a large false block like a speck.

Per lesion kind (where the truth names one), the measurable lesions found and the step that lost the others.
Two more tables come from the same candidates: the ablation (segmentation alone, then the cascade's stages
added in order, as training.ablation does on mined phantoms) and, per learned stage, its scores against the
truth (candidates that detect a truth lesion, or not, per score bin: how far a score means the same on real
CT as on the phantoms it was trained on).

Writes OUT/report.md (tables) and OUT/report.json; prints the tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from operators.cascade_fp import filter_candidates, learned_stage_names, load_cascade
from operators.lesion_segmentation import (extract_candidates, inference_device, load_model_config,
                                          predict_lesion_probability, prepared_network)
from operators.measurements import axial_diameters, lesion_location
from operators.thorax_crop import NoThoraxError, crop_thorax
from operators.volume import keep_freed_memory, return_freed_memory
from training.ablation import stage_prefixes
from training.metrics import CaseResult, evaluate_case, summarize
from training.mine_candidates import match_candidates
from training.nifti import read_nifti
from training.real_cases import real_case_arrays

REPO = Path(__file__).resolve().parents[1]
SCORE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
LOSING_STEPS = ("thorax box", "segmentation", "cascade")  # how a missed lesion's `lost_at` begins


def network_config(seg_dir: Path, precision: str | None = None) -> dict:
    """The network's model.json; with `precision` (e.g. "float32") that precision on every device."""
    config = load_model_config(seg_dir)
    if precision:
        config["precision"] = {"cpu": precision, "cuda": precision}
    return config


def network_key(seg_dir: Path, config: dict, device: str = "cpu") -> str:
    """Identifies a network and its inference settings on a device type (the cache key of its probabilities)."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode())
    digest.update((seg_dir / config.get("file", "model.ts")).read_bytes())
    if device != "cpu":  # a GPU's probabilities (float16 there) never stand in for a CPU's (bfloat16)
        digest.update(device.encode())
    return digest.hexdigest()[:12]


DIGEST_CHARS = 16  # of the image digest in a cache entry's name


def cached_probabilities(cache: Path, name: str) -> list[Path]:
    """The cache entries of a case (one per image: the case and, under the same name, its scanner variants); not those
    of another case whose name starts with this one's."""
    return sorted(cache.glob(f"{name}_{'[0-9a-f]' * DIGEST_CHARS}.npz"))


def case_probability(name: str, hu: np.ndarray, spacing, thorax, model, seg_config: dict, cache: Path,
                     device: str = "cpu") -> np.ndarray:
    """The network's lesion probability in the thorax box (cached as float16 in `cache`, named by the case and a
    digest of its image: cases of one name in several sets, such as a case and its scanner variants, each keep theirs)."""
    box = np.array([[s.start, s.stop] for s in thorax.box])
    digest = hashlib.sha1(np.ascontiguousarray(hu[thorax.box], np.float32).data).hexdigest()
    path = cache / f"{name}_{digest[:DIGEST_CHARS]}.npz"  # found again by cached_probabilities
    if path.exists():
        with np.load(path) as stored:
            if np.array_equal(stored["box"], box):
                return stored["probability"].astype(np.float32)
    probability = predict_lesion_probability(hu[thorax.box], spacing, model, seg_config, device)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, probability=probability.astype(np.float16), box=box)
    tmp.replace(path)
    return probability


def _place(centroid_zyx, spacing, lungs: np.ndarray) -> str:
    """Side, zone or mediastinum/hilum of a centroid (volume mm, x growing to the patient's left)."""
    where = [np.flatnonzero(lungs.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
    if not all(len(w) for w in where):
        return "outside the lungs"
    mm = np.asarray(centroid_zyx) * spacing
    lung_box = (where[2][0] * spacing[2], where[2][-1] * spacing[2], where[0][0] * spacing[0], where[0][-1] * spacing[0])
    z, y, x = (int(round(c)) for c in centroid_zyx)
    contact = 1.0 if lungs[min(z, lungs.shape[0] - 1), min(y, lungs.shape[1] - 1), min(x, lungs.shape[2] - 1)] else 0.0
    return lesion_location((mm[2], mm[1], mm[0]), contact, lung_box)["text"]


def list_cases(folder: Path) -> list[Path]:
    """The cases of a set: real case folders, or the images of a phantom dataset."""
    if (folder / "imagesTr").is_dir():
        return sorted((folder / "imagesTr").glob("*.nii.gz"))
    return sorted(p for p in folder.iterdir() if (p / "truth.json").is_file())


def load_case(path: Path) -> tuple[str, np.ndarray, np.ndarray, tuple, dict]:
    """(name, HU float32, truth labels, spacing, truth description) of a real case folder or a phantom image."""
    if path.is_dir():
        hu, truth, spacing, _, _ = real_case_arrays(path)
        return path.name, hu.astype(np.float32), truth, spacing, json.loads((path / "truth.json").read_text())
    name = path.name[: -len(".nii.gz")]
    hu, spacing = read_nifti(path)
    truth, _ = read_nifti(path.parents[1] / "labelsTr" / path.name)
    described = json.loads((path.parents[1] / "labelsTr" / f"{name}.json").read_text())
    lesions = [{"id": lesion["label"], "kind": lesion["kind"]} for lesion in described["lesions"]]
    truth = np.rint(truth).astype(np.int16)
    partial = described.get("partial_truth", False)
    if "ignore_label" in described:  # real background (training.real_backgrounds): its own lesions are not outlined
        truth[truth == described["ignore_label"]] = 0
        partial = True
    return name, np.asarray(hu, np.float32), truth, spacing, {"lesions": lesions, "partial_truth": partial}


def evaluate_real_case(path: Path, model, seg_config: dict, cascade: dict, cache: Path, device: str = "cpu") -> dict:
    """One case: the app's steps, then every lesion and every kept instance described; "ablation" holds the
    metrics with each prefix of the cascade's stages (the last one is the whole cascade, "metrics")."""
    start = time.perf_counter()
    name, hu, truth, spacing, truth_doc = load_case(path)
    partial, boxes_only = bool(truth_doc.get("partial_truth")), bool(truth_doc.get("boxes_only"))
    prediction = np.zeros(hu.shape, np.int32)
    scores, features, ablation = {}, [], {}
    network_max = np.zeros(hu.shape, np.float32)
    try:
        thorax = crop_thorax(hu, spacing)
    except NoThoraxError:
        thorax = None
    if thorax is not None:
        probability = case_probability(name, hu, spacing, thorax, model, seg_config, cache, device)
        network_max[thorax.box] = probability
        candidates = extract_candidates(probability, seg_config["probability_threshold"], spacing)
        for row, stages in stage_prefixes(cascade):
            result = filter_candidates(candidates, hu[thorax.box], spacing, thorax, {**cascade, "stages": stages})
            prediction[:] = 0
            prediction[thorax.box] = result.labels
            scores = {k: s for k, s in enumerate(result.scores, 1)}
            ablation[row] = evaluate_case(prediction, truth, spacing, scores, boxes_only=boxes_only, name=name)
        detects, dice, lesion = match_candidates(candidates.labels, truth[thorax.box], np.bincount(truth.ravel()),
                                                 candidates.count, boxes_only)
        features = [{**f, "truth_lesion": int(j), "truth_dice": float(d), "detects": bool(t == 1)}
                    for f, t, d, j in zip(result.features, detects, dice, lesion)]
    if not ablation:  # no thorax: the app refuses the study, nothing is found
        ablation = dict.fromkeys([row for row, _ in stage_prefixes(cascade)],
                                 evaluate_case(prediction, truth, spacing, {}, boxes_only=boxes_only, name=name))
    metrics = list(ablation.values())[-1]
    kinds = {lesion["id"]: lesion.get("kind") or ", ".join(lesion.get("histology", [])) or None
             for lesion in truth_doc.get("lesions", [])}
    lesions = []
    for lesion in metrics.lesions:
        mask = truth == lesion.label
        entry = {"lesion": lesion.label, "diameter_mm": round(lesion.diameter_mm, 1), "kind": kinds.get(lesion.label),
                 "measurable": lesion.measurable, "mean_hu": round(float(hu[mask].mean())), "found": lesion.detected,
                 "dice": None if lesion.dice is None else round(lesion.dice, 3),
                 "network_max_probability": round(float(network_max[mask].max()), 3)}
        if not lesion.detected:
            entry["lost_at"] = _lost_at(lesion.label, mask, thorax, features)
        lesions.append(entry)
    instances = []
    lungs = np.zeros(hu.shape, bool)
    if thorax is not None:
        lungs[thorax.box] = thorax.lungs
    touching = set(np.unique(prediction[truth > 0]).tolist())
    for k, box in enumerate(ndimage.find_objects(prediction), 1):
        if box is None or k in touching:
            continue
        mask = prediction[box] == k
        centroid = np.asarray(ndimage.center_of_mass(mask)) + [s.start for s in box]
        instances.append({"instance": k, "long_axis_mm": round(axial_diameters(mask, spacing).long_mm, 1),
                          "volume_ml": round(float(mask.sum() * np.prod(spacing) / 1000), 2),
                          "mean_hu": round(float(hu[box][mask].mean())), "score": round(scores[k], 3),
                          "centroid_voxel_zyx": [int(round(c)) for c in centroid],
                          "place": _place(centroid, np.asarray(spacing), lungs)})
    return {"case": name, "partial_truth": partial, "boxes_only": boxes_only, "no_thorax": thorax is None,
            "shape": list(hu.shape), "spacing_mm": [round(float(s), 3) for s in spacing],
            "lesions": lesions, "false_lesions": instances, "candidates": features,
            "metrics": metrics, "ablation": ablation,
            "seconds": round(time.perf_counter() - start, 1)}


def _lost_at(lesion: int, mask: np.ndarray, thorax, features: list[dict]) -> str:
    """The step that lost missed truth lesion `lesion` (see the module notes); `features` are the candidates'
    with the lesion each matches best ("truth_lesion") and whether it detects it ("detects", "truth_dice")."""
    if thorax is None:
        return "thorax box (no thorax found)"
    inside = np.zeros(mask.shape, bool)
    inside[thorax.box] = True
    if inside[mask].mean() < 0.5:
        return "thorax box"
    detecting = [f for f in features if f["truth_lesion"] == lesion and f["detects"]]
    if not detecting:
        return "segmentation"
    return "cascade " + max(detecting, key=lambda f: f["truth_dice"]).get("dropped_by", "?")


def summarize_set(metrics: list[CaseResult], partial: bool) -> dict:
    """Set metrics; for partial truth only the target sensitivity and lesion Dice, and the kept instances
    touching no target as unlabelled findings."""
    summary = summarize(metrics)
    summary.pop("froc")
    if partial:
        summary = {key: summary[key] for key in ("cases", "measurable_lesions", "detected", "sensitivity",
                                                 "lesion_dice_mean")}
        summary["unlabelled_findings_per_scan"] = sum(m.false_positives for m in metrics) / max(len(metrics), 1)
    return summary


def false_volume_per_scan(cases: list[dict]) -> dict:
    """The volume of the kept instances touching no truth lesion, in ml per scan: a count of false lesions treats a
    70 ml hilar block like a 10 mm speck (partial truth: unlabelled findings, which may be real lesions)."""
    partial = any(case["partial_truth"] for case in cases)
    volume = sum(fp["volume_ml"] for case in cases for fp in case["false_lesions"])
    return {f"{'unlabelled' if partial else 'false'}_volume_ml_per_scan": volume / max(len(cases), 1)}


def ablation_rows(cases: list[dict]) -> dict[str, dict]:
    """The set's metrics with each prefix of the cascade's stages (row name -> summary)."""
    partial = any(case["partial_truth"] for case in cases)
    return {row: summarize_set([case["ablation"][row] for case in cases], partial) for row in cases[0]["ablation"]}


def kind_table(cases: list[dict]) -> list[dict]:
    """Per lesion kind named by the truth: measurable lesions, those found, and per LOSING_STEPS those lost there."""
    rows = {}
    for lesion in (lesion for case in cases for lesion in case["lesions"] if lesion["measurable"] and lesion["kind"]):
        row = rows.setdefault(lesion["kind"], {"kind": lesion["kind"], "measurable": 0, "found": 0,
                                               **dict.fromkeys(LOSING_STEPS, 0)})
        row["measurable"] += 1
        if lesion["found"]:
            row["found"] += 1
        else:
            row[next(step for step in LOSING_STEPS if lesion["lost_at"].startswith(step))] += 1
    return [rows[kind] for kind in sorted(rows)]


def score_table(cases: list[dict], stage: str) -> list[dict]:
    """Per SCORE_BINS bin of a learned stage's probability: the candidates it judged that detect a truth
    lesion (Dice >= 0.1) and the others (partial truth: not proven false)."""
    judged = [(f[f"{stage}_probability"], f["detects"]) for case in cases for f in case["candidates"]
              if f"{stage}_probability" in f]
    rows = []
    for low, high in zip(SCORE_BINS, SCORE_BINS[1:]):
        inside = [t for p, t in judged if low <= p < high or (high == SCORE_BINS[-1] and p == high)]
        rows.append({"bin": f"{low:.1f}-{high:.1f}", "detecting": sum(inside), "others": len(inside) - sum(inside)})
    return rows


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def format_report(sets: dict[str, list[dict]], summaries: dict[str, dict], kinds: dict[str, list[dict]],
                  ablations: dict[str, dict], scores: dict[str, dict[str, list[dict]]]) -> str:
    lines = ["## Lesions", "", "| set | case | lesion | diameter mm | kind | found | Dice | network max p | lost at |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, cases in sets.items():
        for case in cases:
            for lesion in case["lesions"]:
                if lesion["measurable"]:
                    lines.append(f"| {name} | {case['case']} | {lesion['lesion']} | {lesion['diameter_mm']} | "
                                 f"{lesion['kind'] or '-'} | {'yes' if lesion['found'] else 'NO'} | "
                                 f"{_fmt(lesion['dice'])} | {lesion['network_max_probability']} | "
                                 f"{lesion.get('lost_at', '')} |")
    lines += ["", "## Lesion kinds: measurable lesions found, and where the others were lost", "",
              "| set | kind | found / measurable | " + " | ".join(f"lost at {step}" for step in LOSING_STEPS) + " |",
              "|---|---|---|" + "---|" * len(LOSING_STEPS)]
    for name, rows in kinds.items():
        lines += [f"| {name} | {r['kind']} | {r['found']} / {r['measurable']} | "
                  + " | ".join(str(r[step]) for step in LOSING_STEPS) + " |" for r in rows]
    lines += ["", "## Kept instances touching no truth lesion (false lesions; partial truth: unlabelled findings)", "",
              "| set | case | long axis mm | volume ml | mean HU | score | place | centroid voxel z, y, x |",
              "|---|---|---|---|---|---|---|---|"]
    for name, cases in sets.items():
        for case in cases:
            for fp in case["false_lesions"]:
                lines.append(f"| {name} | {case['case']} | {fp['long_axis_mm']} | {fp['volume_ml']} | {fp['mean_hu']} | "
                             f"{fp['score']} | {fp['place']} | {fp['centroid_voxel_zyx']} |")
    lines += ["", "## Sets", "", "| set | metric | value |", "|---|---|---|"]
    for name, summary in summaries.items():
        for key, value in summary.items():
            if key != "cpm_sensitivities":
                lines.append(f"| {name} | {key} | {_fmt(value)} |")
    lines += ["", "## Ablation: segmentation alone, then each stage added", "",
              "| set | configuration | found (detected / measurable) | lesion Dice | false lesions per scan "
              "(partial truth: unlabelled findings) |", "|---|---|---|---|---|"]
    for name, rows in ablations.items():
        for row, summary in rows.items():
            per_scan = summary.get("unlabelled_findings_per_scan", summary.get("fp_per_scan"))
            lines.append(f"| {name} | {row} | {_fmt(summary['sensitivity'])} ({summary['detected']} / "
                         f"{summary['measurable_lesions']}) | {_fmt(summary['lesion_dice_mean'])} | {_fmt(per_scan)} |")
    lines += ["", "## Learned-stage scores: candidates judged, per score bin", "",
              "| set | stage | score | detecting a truth lesion | others (partial truth: unlabelled) |",
              "|---|---|---|---|---|"]
    for name, stages in scores.items():
        for stage, rows in stages.items():
            lines += [f"| {name} | {stage} | {r['bin']} | {r['detecting']} | {r['others']} |" for r in rows]
    return "\n".join(lines) + "\n"


def evaluate_sets(sets: dict[str, Path], seg_dir: Path, cascade_dir: Path, out: Path, cache: Path, log=print,
                  precision: str | None = None) -> dict:
    """Every case of `sets` (name: folder), reports written into `out`; returns each set's summary.
    `precision` overrides model.json's (the network's probabilities are cached in cache/<network_key>). The network
    runs on the `inference_device`."""
    seg_config = network_config(seg_dir, precision)
    device = inference_device()
    model = prepared_network(torch.jit.load(str(seg_dir / seg_config.get("file", "model.ts"))), device)
    cascade = load_cascade(cascade_dir)
    cache = cache / network_key(seg_dir, seg_config, device)
    folders = {name: list_cases(folder) for name, folder in sets.items()}
    total, done, start = sum(map(len, folders.values())), 0, time.perf_counter()
    results = {}
    for name, cases in folders.items():
        results[name] = []
        for folder in cases:
            case = evaluate_real_case(folder, model, seg_config, cascade, cache, device)
            return_freed_memory()
            results[name].append(case)
            done += 1
            found = sum(lesion["found"] for lesion in case["lesions"] if lesion["measurable"])
            measurable = sum(lesion["measurable"] for lesion in case["lesions"])
            log(f"[{done}/{total}, {time.perf_counter() - start:.0f} s] {name} {case['case']}: {found}/{measurable} "
                f"found, {len(case['false_lesions'])} other kept, {case['seconds']} s", flush=True)
    summaries = {name: {**summarize_set([case["metrics"] for case in cases],
                                        any(case["partial_truth"] for case in cases)),
                        **false_volume_per_scan(cases)} for name, cases in results.items()}
    kinds = {name: kind_table(cases) for name, cases in results.items()}
    ablations = {name: ablation_rows(cases) for name, cases in results.items()}
    scores = {name: {stage: score_table(cases, stage) for stage in learned_stage_names(cascade)}
              for name, cases in results.items()}
    report = format_report(results, summaries, kinds, ablations, scores)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    for cases in results.values():
        for case in cases:
            case["metrics"] = asdict(case["metrics"])
            case["ablation"] = {row: asdict(metrics) for row, metrics in case["ablation"].items()}
    (out / "report.json").write_text(json.dumps({"seg_model": str(seg_dir), "cascade": str(cascade_dir),
                                                 "sets": results, "summaries": summaries, "kinds": kinds,
                                                 "ablations": ablations,
                                                 "scores": scores}, indent=1))
    log(report)
    return summaries


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", nargs=2, action="append", metavar=("NAME", "FOLDER"), required=True)
    parser.add_argument("--seg-model", type=Path, default=REPO / "models" / "lesion_seg")
    parser.add_argument("--cascade", type=Path, default=REPO / "models" / "cascade_fp")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "probability_cache",
                        help="the network's probabilities per case, kept between runs")
    parser.add_argument("--precision", choices=["float32", "bfloat16", "float16"],
                        help="the network's precision on every device (default: its model.json's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    evaluate_sets({name: Path(folder) for name, folder in args.set}, args.seg_model, args.cascade, args.out, args.cache,
                  precision=args.precision)


if __name__ == "__main__":
    main()
