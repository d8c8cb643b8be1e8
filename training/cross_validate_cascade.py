"""Leave-one-patient-out cross-validation of the cascade on real-train: per patient, the cascade is trained
(training.train_cascade, the shipped settings) without that patient's mined cases, and that patient's
real-train scan is evaluated with it (training.evaluate_real): targets found, and unlabelled findings, on
scans whose anatomy the cascade never saw.

    python -m training.cross_validate_cascade --real-train ../shared/data/real-train \
        --train runs/cascade/mined_ft/real_backgrounds runs/cascade/mined_ft/phantoms --val runs/cascade/mined_ft/val \
        --init PREVIOUS/models/cascade_fp --epochs 15 --learning-rate 5e-4 --out runs/cv_cascade

A mined case belongs to a patient when its name starts with the patient's folder name (training.real_backgrounds
names its cases <patient>_s<seed>). The segmentation network is not cross-validated (one fine-tuning takes
36 min on this CPU); the real-train targets were IGNORE in its training and in the cascade's.
Writes OUT/<patient>/ (the fold's cascade and evaluation) and OUT/report.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from training.evaluate_real import REPO, evaluate_sets, list_cases
from training.train_cascade import train_cascade


def without_patient(folders: list[Path], patient: str, out: Path) -> list[Path]:
    """Copies of `folders` (symbolic links to their .npz files) without the patient's mined cases."""
    kept = []
    for number, folder in enumerate(folders):
        subset = out / f"{number}_{folder.name}"
        subset.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob("*.npz")):
            if not path.name.startswith(patient):
                link = subset / path.name
                if not link.exists():
                    link.symlink_to(path.resolve())
        kept.append(subset)
    return kept


def fold_row(patient: str, report: dict) -> dict:
    """The patient's target(s) and unlabelled findings from a fold's report.json."""
    (case,) = [case for cases in report["sets"].values() for case in cases]
    targets = [lesion for lesion in case["lesions"] if lesion["measurable"]]
    return {"patient": patient, "targets": len(targets), "found": sum(t["found"] for t in targets),
            "dice": [t["dice"] for t in targets], "lost_at": [t.get("lost_at", "") for t in targets],
            "unlabelled_findings": len(case["false_lesions"])}


def format_table(rows: list[dict]) -> str:
    lines = ["| patient (held out) | targets found | target Dice | lost at | unlabelled findings |",
             "|---|---|---|---|---|"]
    for r in rows:
        dice = ", ".join(f"{d:.3f}" for d in r["dice"] if d is not None) or "-"
        lost_at = "; ".join(x for x in r["lost_at"] if x) or "-"
        found = f"{r['found']} / {r['targets']}"
        lines.append(f"| {r['patient']} | {found} | {dice} | {lost_at} | {r['unlabelled_findings']} |")
    found, targets = sum(r["found"] for r in rows), sum(r["targets"] for r in rows)
    findings = sum(r["unlabelled_findings"] for r in rows) / max(len(rows), 1)
    lines.append(f"| all ({len(rows)} folds) | {found} / {targets} | | | {findings:.1f} per scan |")
    return "\n".join(lines) + "\n"


def cross_validate(real_train: Path, train_dirs: list[Path], val_dirs: list[Path], out: Path, base: Path,
                   seg_dir: Path, cache: Path, **training) -> list[dict]:
    rows, start = [], time.perf_counter()
    patients = [case.name for case in list_cases(real_train)]
    for number, patient in enumerate(patients, 1):
        fold = out / patient
        cascade_dir = fold / "cascade"
        cascade_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(base / "model.json", cascade_dir / "model.json")
        train_cascade(without_patient(train_dirs, patient, fold / "train"), val_dirs, cascade_dir,
                      log=lambda line: None, **training)
        case_set = fold / "case"
        case_set.mkdir(exist_ok=True)
        if not (case_set / patient).exists():
            (case_set / patient).symlink_to((real_train / patient).resolve())
        evaluate_sets({f"real-train {patient}": case_set}, seg_dir, cascade_dir, fold / "evaluation", cache,
                      log=lambda line, **_: None)
        rows.append(fold_row(patient, json.loads((fold / "evaluation" / "report.json").read_text())))
        print(f"[{number}/{len(patients)}, {time.perf_counter() - start:.0f} s] {patient} held out: "
              f"{rows[-1]['found']}/{rows[-1]['targets']} targets found, {rows[-1]['unlabelled_findings']} unlabelled "
              f"findings", flush=True)
    table = format_table(rows)
    (out / "report.md").write_text(table)
    print(table)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-train", type=Path, required=True, help="the real-train case folders")
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="mined candidate folders")
    parser.add_argument("--val", type=Path, nargs="+", required=True, help="mined folders for thresholds")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--base", type=Path, default=REPO / "models" / "cascade_fp",
                        help="the cascade whose model.json (feature stage, patches) each fold starts from")
    parser.add_argument("--seg-model", type=Path, default=REPO / "models" / "lesion_seg")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "probability_cache")
    parser.add_argument("--init", type=Path, help="fine-tune the multiscale CNN ensemble exported in this folder")
    parser.add_argument("--retention", type=float, default=0.99)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cross_validate(args.real_train, args.train, args.val, args.out, args.base, args.seg_model, args.cache,
                   retention=args.retention, epochs=args.epochs, seeds=args.seeds, init_dir=args.init,
                   learning_rate=args.learning_rate)


if __name__ == "__main__":
    main()
