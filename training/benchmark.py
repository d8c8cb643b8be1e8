"""Speed benchmark (not a timed test): the app against the stock path on one study, and whether detection moved.

    python -m training.benchmark --out runs/benchmark [--study DICOM_DIR | --slices 300 --slice-mm 1.0]
        [--runs 3] [--accuracy [--set NAME FOLDER ...]]

Speed. Each run starts a process and times it from start to exit (wall time; peak RSS of the process and its
children, i.e. the app and its analysis process): `python app -i STUDY` as a user runs it, then the stock path
(`--stock STUDY`): the app's own input stage (operators.series_selection.read_study), then the same weights as
shipped through MONAI's `sliding_window_inference` over the whole volume in float32 (overlap 0.25, 4 windows per
batch), softmax, back to the input grid and thresholded: what a generic MONAI Deploy segmentation app does. The
two alternate, so that both see the same machine. Printed: medians over the runs of wall time, start-up (the wall
time outside the app's own "application" time: interpreter, imports, the all-or-nothing output wrapper), each
operator (the app's timing log), peak RSS, peak GPU memory where the app used a GPU, and the ratio stock / app.
Without --study, a phantom study of --slices slices of --slice-mm is generated (training.phantom, --seed).

Accuracy (--accuracy): training.evaluate_real over the sets (default: the held-out phantoms of `make evaluate`
and ../shared/data/real), once with the network in float32 and once in model.json's precision, on the GPU where
there is one (float16 autocast) and on the CPU otherwise (bfloat16 where native): lesions found and
false lesions per set, every case where a lesion appears or disappears, and the largest probability difference
(from the float16 probability cache, so differences under about 5e-4 are not resolved).

Writes OUT/benchmark.json and OUT/benchmark.md; prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"\(timing\) - ([\w ]+): ([\d.]+) s")
GPU_MEMORY = re.compile(r"peak GPU memory (\d+) MiB")


def timed_process(command: list[str], log: Path) -> dict:
    """Run `command` (stdout and stderr into `log`): wall seconds, peak RSS in MiB of it and its children, status.
    On Linux the peak starts at this process's own peak, so this process holds no study in memory."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"wall_s": time.perf_counter() - start, "peak_rss_mib": usage.ru_maxrss / 1024,
            "status": process.returncode}


def app_run(study: Path, out: Path, log: Path) -> dict:
    """One `python app` run: timed_process's figures, each operator's seconds and the start-up seconds."""
    run = timed_process([sys.executable, "app", "-i", str(study), "-o", str(out)], log)
    text = log.read_text()
    timings = {name: float(seconds) for name, seconds in TIMING.findall(text)}
    run["application_s"] = timings.pop("application", float("nan"))
    run["startup_s"] = run["wall_s"] - run["application_s"]
    run["operators_s"] = timings
    gpu = GPU_MEMORY.findall(text)
    if gpu:
        run["peak_gpu_mib"] = float(gpu[-1])
    return run


def stock_path(study: Path) -> None:
    """The stock path (module notes) on one study, in this process: the app's own resampling and MONAI sliding
    window, but over the whole volume, in float32, 4 windows per batch, with the network as stored (not frozen)."""
    import torch

    from operators.lesion_segmentation import inference_device, load_model_config, predict_lesion_probability
    from operators.series_selection import read_study

    model_dir = REPO / "models" / "lesion_seg"
    config = {**load_model_config(model_dir), "precision": {}, "overlap": 0.25, "sw_batch_size": 4}
    device = inference_device()
    model = torch.jit.load(str(model_dir / config["file"]), map_location=device).eval()
    volume = read_study(study)
    probability = predict_lesion_probability(volume.hu, volume.spacing, model, config, device)
    print(f"stock path: {int((probability >= config['probability_threshold']).sum())} lesion voxels")


def _write_study(folder: Path, seed: int, slices: int, slice_mm: float) -> Path:
    from training.phantom import Scanner, generate_phantom
    from training.phantom_io import write_dicom_series

    scanner = dataclasses.replace(Scanner.random(np.random.default_rng(seed)), slice_mm=slice_mm)
    write_dicom_series(generate_phantom(seed, 5, scanner=scanner, slices=slices), folder)
    return folder


def generate_study(folder: Path, seed: int, slices: int, slice_mm: float) -> Path:
    """A phantom DICOM study of `slices` slices of `slice_mm` (training.phantom's scanner otherwise), written by a
    process of its own: on Linux a child's peak RSS (ru_maxrss) starts at its parent's peak, which the generation
    would raise above the app's (1850 MiB on the 300-slice study, against the app's 1425)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_write_study, folder, seed, slices, slice_mm).result()


def _median(runs: list[dict], key: str) -> float:
    return float(np.median([run[key] for run in runs]))


def speed(study: Path, runs: int, work: Path, log=print) -> dict:
    """Alternating runs of the app and the stock path; their medians and the ratio."""
    app_runs, stock_runs = [], []
    for k in range(runs):
        app_runs.append(app_run(study, work / f"app_{k}", work / f"app_{k}.log"))
        stock_runs.append(timed_process([sys.executable, "-m", "training.benchmark", "--stock", str(study)],
                                        work / f"stock_{k}.log"))
        log(f"[run {k + 1}/{runs}] app {app_runs[-1]['wall_s']:.1f} s (status {app_runs[-1]['status']}), "
            f"stock path {stock_runs[-1]['wall_s']:.1f} s (status {stock_runs[-1]['status']})", flush=True)
    failed = [run for run in app_runs + stock_runs if run["status"] != 0]
    if failed:
        raise SystemExit(f"a run failed (status {failed[0]['status']}); logs in {work}")
    operators = {name: float(np.median([run["operators_s"][name] for run in app_runs]))
                 for name in app_runs[0]["operators_s"]}
    result = {"runs": runs, "app": {key: _median(app_runs, key) for key in
                                    ("wall_s", "startup_s", "application_s", "peak_rss_mib")},
              "operators_s": operators,
              "stock": {key: _median(stock_runs, key) for key in ("wall_s", "peak_rss_mib")}}
    if "peak_gpu_mib" in app_runs[0]:
        result["app"]["peak_gpu_mib"] = _median(app_runs, "peak_gpu_mib")
    result["stock_over_app"] = result["stock"]["wall_s"] / result["app"]["wall_s"]
    return result


def accuracy(sets: dict[str, Path], out: Path, log=print) -> dict:
    """training.evaluate_real in float32 and in the shipped precision: per set found / false, what moved."""
    from operators.lesion_segmentation import inference_device
    from training.evaluate_real import cached_probabilities, evaluate_sets, network_config, network_key

    seg_dir, cascade_dir = REPO / "models" / "lesion_seg", REPO / "models" / "cascade_fp"
    cache = REPO / "runs" / "probability_cache"
    variants = {"float32": "float32", "shipped": None}
    reports, summaries = {}, {}
    for label, precision in variants.items():
        summaries[label] = evaluate_sets(sets, seg_dir, cascade_dir, out / label, cache, log=lambda *a, **k: None,
                                         precision=precision)
        reports[label] = json.loads((out / label / "report.json").read_text())["sets"]
        found = ", ".join(f"{name}: {s['detected']}/{s['measurable_lesions']} found" for name, s in summaries[label].items())
        log(f"accuracy, {label}: {found}", flush=True)
    folders = {label: cache / network_key(seg_dir, network_config(seg_dir, p), inference_device())
               for label, p in variants.items()}
    result = {}
    for name in sets:
        moved, largest = [], 0.0
        for before, after in zip(reports["float32"][name], reports["shipped"][name]):
            found = [{lesion["lesion"] for lesion in case["lesions"] if lesion["found"]} for case in (before, after)]
            false = [len(case["false_lesions"]) for case in (before, after)]
            if found[0] != found[1] or false[0] != false[1]:
                moved.append(f"{before['case']}: found {sorted(found[0])} -> {sorted(found[1])}, "
                             f"false lesions {false[0]} -> {false[1]}")
            for stored in cached_probabilities(folders["float32"], before["case"]):
                first, second = (np.load(folder / stored.name)["probability"].astype(np.float32)
                                 for folder in folders.values())
                largest = max(largest, float(np.abs(first - second).max()))
        result[name] = {label: {key: summaries[label][name].get(key) for key in
                                ("detected", "measurable_lesions", "lesion_dice_mean", "false_positives",
                                 "unlabelled_findings_per_scan")} for label in variants}
        result[name].update(moved=moved, largest_probability_difference=largest)
    return result


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_tables(result: dict) -> str:
    lines = []
    if "speed" in result:
        s = result["speed"]
        lines += [f"## Speed: {result['study']} ({s['runs']} runs, medians)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {name} | {seconds:.2f} |" for name, seconds in s["operators_s"].items()]
        lines += [f"| start-up (wall outside the application) | {s['app']['startup_s']:.2f} |",
                  f"| **app, process start to exit** | **{s['app']['wall_s']:.2f}** |",
                  f"| stock path, process start to exit | {s['stock']['wall_s']:.2f} |", "",
                  f"stock / app: {s['stock_over_app']:.2f} x; peak RSS app {s['app']['peak_rss_mib']:.0f} MiB, "
                  f"stock path {s['stock']['peak_rss_mib']:.0f} MiB"
                  + (f"; peak GPU memory {s['app']['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in s["app"] else ""),
                  ""]
    if "accuracy" in result:
        lines += ["## Accuracy: network in float32 -> as shipped", "",
                  "| set | found | lesion Dice | false lesions | largest probability difference | cases that moved |",
                  "|---|---|---|---|---|---|"]
        for name, a in result["accuracy"].items():
            before, after = a["float32"], a["shipped"]
            false = "false_positives" if before["false_positives"] is not None else "unlabelled_findings_per_scan"
            lines.append(f"| {name} | {before['detected']} -> {after['detected']} of {before['measurable_lesions']} | "
                         f"{_number(before['lesion_dice_mean'])} -> {_number(after['lesion_dice_mean'])} | "
                         f"{before[false]} -> {after[false]} | {a['largest_probability_difference']:.4f} | "
                         f"{'; '.join(a['moved']) or 'none'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stock", type=Path, help=argparse.SUPPRESS)  # one stock-path run (a child process)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--study", type=Path, help="a DICOM study folder (default: a generated phantom)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--slice-mm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true", help="only the accuracy part")
    parser.add_argument("--accuracy", action="store_true")
    parser.add_argument("--set", nargs=2, action="append", metavar=("NAME", "FOLDER"),
                        help='accuracy sets (default: "held-out phantoms" data/heldout, "real" ../shared/data/real)')
    args = parser.parse_args(argv)
    if args.stock:
        return stock_path(args.stock)
    if not args.out:
        parser.error("--out is required")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {}
    if not args.no_speed:
        with tempfile.TemporaryDirectory(dir=args.out) as work:
            study = args.study or generate_study(Path(work) / "study", args.seed, args.slices, args.slice_mm)
            result["study"] = str(args.study) if args.study else f"phantom seed {args.seed}, {args.slices} x {args.slice_mm} mm"
            result["speed"] = speed(study, args.runs, Path(work))
    if args.accuracy:
        sets = args.set or [("held-out phantoms", REPO / "data" / "heldout"), ("real", REPO.parent / "shared" / "data" / "real")]
        result["accuracy"] = accuracy({name: Path(folder) for name, folder in sets}, args.out / "accuracy")
    (args.out / "benchmark.json").write_text(json.dumps(result, indent=1))
    tables = format_tables(result)
    (args.out / "benchmark.md").write_text(tables)
    print(tables)


if __name__ == "__main__":
    main()
