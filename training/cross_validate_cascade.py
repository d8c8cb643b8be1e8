"""Leave-one-patient-out cross-validation of the cascade on real-train: per patient, the cascade is trained
(training.train_cascade, the shipped settings) without that patient's mined cases, and that patient's
real-train scan is evaluated with it (training.evaluate_real): targets found, and unlabelled findings, on
scans whose anatomy the cascade never saw. With --variants (training.scanner_variants of real-train), the fold also
evaluates that patient's scan as the other scanners image it.

    python -m training.cross_validate_cascade --real-train ../shared/data/real-train \
        --train runs/cascade/mined_ft/real_backgrounds runs/cascade/mined_ft/phantoms --val runs/cascade/mined_ft/val \
        --init PREVIOUS/models/cascade_fp --epochs 15 --learning-rate 5e-4 --out runs/cv_cascade \
        [--variants data/scanner_variants]

A mined case belongs to a patient when its name starts with the patient's folder name (training.real_backgrounds
names its cases <patient>_s<seed>). Each fold trains the learned stages that the base cascade ships (--base). The
segmentation network is not cross-validated (one fine-tuning takes 36 min on this CPU); the real-train targets were
IGNORE in its training and in the cascade's.
Writes OUT/<patient>/ (the fold's cascade and evaluation) and OUT/report.md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from operators.cascade_fp import learned_stage_names
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


def fold_rows(patient: str, report: dict) -> list[dict]:
    """Per set of a fold's report.json (the patient's scan, as scanned and in each variant): its target(s) and
    unlabelled findings."""
    rows = []
    for set_name, (case,) in report["sets"].items():
        targets = [lesion for lesion in case["lesions"] if lesion["measurable"]]
        rows.append({"set": set_name, "patient": patient, "targets": len(targets),
                     "found": sum(t["found"] for t in targets), "dice": [t["dice"] for t in targets],
                     "lost_at": [t.get("lost_at", "") for t in targets],
                     "unlabelled_findings": len(case["false_lesions"])})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| set | patient (held out) | targets found | target Dice | lost at | unlabelled findings |",
             "|---|---|---|---|---|---|"]
    for set_name in dict.fromkeys(r["set"] for r in rows):
        in_set = [r for r in rows if r["set"] == set_name]
        for r in in_set:
            dice = ", ".join(f"{d:.3f}" for d in r["dice"] if d is not None) or "-"
            lost_at = "; ".join(x for x in r["lost_at"] if x) or "-"
            lines.append(f"| {set_name} | {r['patient']} | {r['found']} / {r['targets']} | {dice} | {lost_at} | "
                         f"{r['unlabelled_findings']} |")
        found, targets = sum(r["found"] for r in in_set), sum(r["targets"] for r in in_set)
        findings = sum(r["unlabelled_findings"] for r in in_set) / len(in_set)
        lines.append(f"| {set_name} | all ({len(in_set)} folds) | {found} / {targets} | | | {findings:.1f} per scan |")
    return "\n".join(lines) + "\n"


def patient_sets(patient: str, real_train: Path, variants: Path | None, folder: Path) -> dict[str, Path]:
    """Sets holding only the patient's scan (symbolic links under `folder`): real-train, and each scanner variant."""
    sets = {"real-train": folder / "real-train"}
    sets["real-train"].mkdir(parents=True, exist_ok=True)
    links = [(sets["real-train"] / patient, real_train / patient)]
    for variant in sorted(p for p in (variants.iterdir() if variants else []) if (p / "imagesTr").is_dir()):
        sets[f"real-train, {variant.name}"] = folder / variant.name
        for sub, name in (("imagesTr", f"{patient}.nii.gz"), ("labelsTr", f"{patient}.nii.gz"),
                          ("labelsTr", f"{patient}.json")):
            (folder / variant.name / sub).mkdir(parents=True, exist_ok=True)
            links.append((folder / variant.name / sub / name, variant / sub / name))
    for link, target in links:
        if not link.exists():
            link.symlink_to(target.resolve())
    return sets


def shipped_learned_stages(base: Path) -> list[str]:
    """The learned stages that the base cascade ships: a fold trains these and no others."""
    return learned_stage_names(json.loads((base / "model.json").read_text()))


def cross_validate(real_train: Path, train_dirs: list[Path], val_dirs: list[Path], out: Path, base: Path,
                   seg_dir: Path, cache: Path, variants: Path | None = None, **training) -> list[dict]:
    rows, start = [], time.perf_counter()
    learned = shipped_learned_stages(base)
    patients = [case.name for case in list_cases(real_train)]
    for number, patient in enumerate(patients, 1):
        fold = out / patient
        cascade_dir = fold / "cascade"
        cascade_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(base / "model.json", cascade_dir / "model.json")
        train_cascade(without_patient(train_dirs, patient, fold / "train"), val_dirs, cascade_dir,
                      learned=learned, log=lambda line: None, **training)
        evaluate_sets(patient_sets(patient, real_train, variants, fold / "cases"), seg_dir, cascade_dir,
                      fold / "evaluation", cache, log=lambda line, **_: None)
        fold_result = fold_rows(patient, json.loads((fold / "evaluation" / "report.json").read_text()))
        rows += fold_result
        print(f"[{number}/{len(patients)}, {time.perf_counter() - start:.0f} s] {patient} held out: "
              f"{sum(r['found'] for r in fold_result)}/{sum(r['targets'] for r in fold_result)} targets found, "
              f"{sum(r['unlabelled_findings'] for r in fold_result)} unlabelled findings in {len(fold_result)} scans",
              flush=True)
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
    parser.add_argument("--variants", type=Path, help="real-train's scanner variants (training.scanner_variants)")
    parser.add_argument("--init", type=Path, help="fine-tune the multiscale CNN ensemble exported in this folder")
    parser.add_argument("--retention", type=float, default=0.99)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cross_validate(args.real_train, args.train, args.val, args.out, args.base, args.seg_model, args.cache,
                   args.variants, retention=args.retention, epochs=args.epochs, seeds=args.seeds, init_dir=args.init,
                   learning_rate=args.learning_rate)


if __name__ == "__main__":
    main()
