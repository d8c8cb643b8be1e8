"""Leave-one-patient-out cross-validation of a mediastinal node pathway (a diagnostic, not part of the app): a node
network and its own cascade CNN, trained on real-train backgrounds with nodes inserted (training.real_backgrounds
--kinds node), evaluated on a patient they never saw.

    python -m training.real_backgrounds --real-train ../shared/data/real-train --out data/rb_nodes35 --seeds 4 \
        --count 6 --kinds node
    python -m training.cross_validate_nodes --data data/rb_nodes35 --real-train ../shared/data/real-train \
        --out runs/cv_nodes [--patients qin_lsc_0049 ...] [--iterations 1104]

Per held-out patient (its cases are named <patient>_s<seed>), in OUT/<patient>/:
1. the node network (training.train preset `nodes`, from scratch, --iterations) trained on the other patients' cases,
   the held-out patient's first case watched as validation (its Dice is logged; the last checkpoint is exported);
2. trained on with four times the background patches (preset `nodes_negatives`);
3. its candidates mined on the training cases (training.mine_candidates) and the cascade's CNN trained from scratch
   on them (training.train_cascade: the shipped feature stage, then the CNN, threshold at 0.98 retention of the
   training candidates' true nodes);
4. the held-out patient's node cases and its original real-train scan evaluated (training.evaluate_real).
OUT/report.md: per patient, the inserted nodes found by the network alone and kept by the whole pathway, and the
findings touching no truth per scan on the node cases and on the original scan (partial truth: the original scan's
own lesions are not outlined, so these may include real nodes).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from pathlib import Path

import torch

from training import mine_candidates
from training.evaluate_real import REPO, evaluate_sets
from training.export import export
from training.train import PRESETS, preset_config, train
from training.train_cascade import train_cascade

NETWORK_ALONE, WHOLE_PATHWAY = "segmentation alone", "full cascade: multiscale_cnn"


def patients_of(data: Path) -> list[str]:
    """The patients of a real-backgrounds dataset, from its case names <patient>_s<seed>."""
    items = json.loads((data / "dataset.json").read_text())["training"]
    return sorted({re.sub(r"_s\d+$", "", Path(item["image"]).name.removesuffix(".nii.gz")) for item in items})


def resolved_case(data: Path, item: dict) -> dict:
    """A dataset.json entry of `data` with absolute paths, for a dataset.json written elsewhere."""
    return {key: str((data / item[key]).resolve()) for key in ("image", "label")}


def patient_split(data: Path, patient: str, folder: Path) -> tuple[Path, Path]:
    """Dataset folders (symbolic links into `data`) of the other patients' cases (`train`, the patient's first case
    as its validation) and of the patient's own (`test`)."""
    items = json.loads((data / "dataset.json").read_text())["training"]
    own = [item for item in items if Path(item["image"]).name.startswith(f"{patient}_s")]
    if not own:
        raise ValueError(f"no case of {patient} in {data}")
    splits = {"train": [item for item in items if item not in own], "test": own}
    for name, chosen in splits.items():
        for item in chosen:
            image, label = ((data / item[key]).resolve() for key in ("image", "label"))
            description = label.with_name(label.name.removesuffix(".nii.gz") + ".json")  # the inserted lesions
            for path, sub in ((image, "imagesTr"), (label, "labelsTr"), (description, "labelsTr")):
                link = folder / name / sub / path.name
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.is_symlink():
                    link.symlink_to(path)
        spec = {"training": [resolved_case(data, item) for item in chosen]}
        if name == "train":
            spec["validation"] = [resolved_case(data, own[0])]
        (folder / name / "dataset.json").write_text(json.dumps(spec, indent=1))
    return folder / "train", folder / "test"


def train_node_network(train_dir: Path, fold: Path, iterations: int) -> Path:
    """Steps 1-2: the node network, then trained on with more background; returns the exported model folder."""
    train([train_dir], fold / "nodes", preset_config("nodes", iterations))
    export(fold / "nodes", fold / "nodes" / "export", "last.pt")
    train([train_dir], fold / "nodes_negatives", preset_config("nodes_negatives", init=fold / "nodes" / "export"))
    export(fold / "nodes_negatives", fold / "nodes_negatives" / "export", "last.pt")
    return fold / "nodes_negatives" / "export"


def fold_row(patient: str, report: dict) -> dict:
    """One fold's counts from its training.evaluate_real report (sets "nodes" and "original scan")."""
    nodes, original = report["ablations"]["nodes"], report["ablations"]["original scan"]
    return {"patient": patient, "nodes": nodes[WHOLE_PATHWAY]["measurable_lesions"],
            "network_found": nodes[NETWORK_ALONE]["detected"], "kept": nodes[WHOLE_PATHWAY]["detected"],
            "node_cases": nodes[WHOLE_PATHWAY]["cases"],
            **{f"{where}_{stage}": rows[name]["unlabelled_findings_per_scan"]
               for where, rows in (("cases", nodes), ("original", original))
               for stage, name in (("network", NETWORK_ALONE), ("kept", WHOLE_PATHWAY))}}


def format_table(rows: list[dict]) -> str:
    lines = ["| patient (held out) | inserted nodes found: network alone, kept | findings touching no truth per node case: "
             "network alone, kept | findings on the original scan: network alone, kept |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['patient']} | {r['network_found']} / {r['nodes']}, {r['kept']} / {r['nodes']} | "
                     f"{r['cases_network']:.1f}, {r['cases_kept']:.2f} | {r['original_network']:.0f}, "
                     f"{r['original_kept']:.0f} |")
    nodes, scans = sum(r["nodes"] for r in rows), sum(r["node_cases"] for r in rows)

    def per_case(key: str) -> float:
        return sum(r[key] * r["node_cases"] for r in rows) / scans

    lines.append(f"| all ({len(rows)} folds) | {sum(r['network_found'] for r in rows)} / {nodes}, "
                 f"{sum(r['kept'] for r in rows)} / {nodes} | {per_case('cases_network'):.1f}, "
                 f"{per_case('cases_kept'):.2f} | {sum(r['original_network'] for r in rows) / len(rows):.1f}, "
                 f"{sum(r['original_kept'] for r in rows) / len(rows):.1f} per scan |")
    return "\n".join(lines) + "\n"


def cross_validate(data: Path, real_train: Path, out: Path, patients: list[str], iterations: int, cache: Path,
                   workers: int) -> list[dict]:
    rows, start = [], time.perf_counter()
    for number, patient in enumerate(patients, 1):
        fold = out / patient
        train_dir, test_dir = patient_split(data, patient, fold / "cases")
        network = train_node_network(train_dir, fold, iterations)
        mine_candidates.main(["--images", str(train_dir / "imagesTr"), "--labels", str(train_dir / "labelsTr"),
                              "--seg-model", str(network), "--out", str(fold / "mined"), "--workers", str(workers)])
        train_cascade([fold / "mined"], [fold / "mined"], fold / "node_cascade", retention=0.98,
                      learned=["multiscale_cnn"], log=lambda line: print(line, flush=True))
        original = fold / "cases" / "original"
        original.mkdir(parents=True, exist_ok=True)
        if not (original / patient).is_symlink():
            (original / patient).symlink_to((real_train / patient).resolve())
        evaluate_sets({"nodes": test_dir, "original scan": original}, network, fold / "node_cascade",
                      fold / "evaluation", cache, log=lambda line, **_: None)
        rows.append(fold_row(patient, json.loads((fold / "evaluation" / "report.json").read_text())))
        table = format_table(rows)  # written after every fold: the folds done so far survive an interruption
        (out / "report.md").write_text(table)
        print(f"[{number}/{len(patients)}, {time.perf_counter() - start:.0f} s] {patient} held out\n{table}", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="real backgrounds with nodes inserted (dataset.json)")
    parser.add_argument("--real-train", type=Path, required=True, help="the real-train case folders")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--patients", nargs="+", help="the patients to hold out, one fold each (default: all)")
    parser.add_argument("--iterations", type=int, default=1104, help="of the first node training (preset nodes)")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "probability_cache")
    parser.add_argument("--workers", type=int, default=2, help="mining processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(PRESETS["nodes"]["threads"])
    cross_validate(args.data, args.real_train, args.out, args.patients or patients_of(args.data), args.iterations,
                   args.cache, args.workers)


if __name__ == "__main__":
    main()
