"""Leave-one-patient-out cross-validation of the segmentation network fine-tuned with the real-train targets as
labels: per patient, the network is fine-tuned (training.train) on --data and on the other patients' labelled real
backgrounds (training.real_backgrounds --label-target), and that patient's real-train scan (with --variants, also as
the other scanners image it) is evaluated through the whole app (training.evaluate_real with --cascade): targets
found, target Dice, unlabelled findings, on scans whose target and anatomy the network never saw.

    python -m training.real_backgrounds --real-train ../shared/data/real-train --out data/rb_labelled --seeds 3 \
        --label-target
    python -m training.cross_validate_network --labelled data/rb_labelled --data data/phantoms \
        --real-train ../shared/data/real-train --variants data/scanner_variants \
        --preset finetune_negatives_scanners --iterations 240 --out runs/cv_network [--final]

Each fold starts from --init (default: the preset's, the shipped weights, whose training kept every real-train
target out of the loss); its last checkpoint is evaluated. The held-out patient's first labelled case is the
training's validation case, for its logged Dice only. A fold whose exported network exists is not trained again.
Writes OUT/<patient>/ (the fold's network and evaluation) and OUT/report.md (after every fold); prints the table.
--final then fine-tunes the same way on every patient's cases (OUT/final/network/export: the network to validate on
other data and to ship; its real-train figures are no longer a fair estimate).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from training.cross_validate_cascade import fold_rows, format_table, patient_sets
from training.cross_validate_nodes import patient_split, patients_of, resolved_case
from training.evaluate_real import REPO, evaluate_sets
from training.export import export
from training.train import PRESETS, preset_config, train


def fold_network(data_dirs: list[Path], train_dir: Path, repeat: int, run: Path, config: dict) -> Path:
    """The fold's network, fine-tuned on `data_dirs` and `repeat` times on the other patients' labelled cases."""
    network = run / "export"
    if not (network / "model.ts").exists():
        train(data_dirs + [train_dir] * repeat, run, config)
        export(run, network, "last.pt")
    return network


def all_patients(labelled: Path, folder: Path) -> Path:
    """A dataset folder listing every case of `labelled`, its first case as the training's validation case."""
    items = [resolved_case(labelled, item) for item in json.loads((labelled / "dataset.json").read_text())["training"]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"training": items, "validation": items[:1]}, indent=1))
    return folder


def cross_validate(labelled: Path, data_dirs: list[Path], real_train: Path, variants: Path | None, out: Path,
                   config: dict, cascade: Path, cache: Path, repeat: int, patients: list[str]) -> list[dict]:
    rows, start = [], time.perf_counter()
    for number, patient in enumerate(patients, 1):
        fold = out / patient
        train_dir, _ = patient_split(labelled, patient, fold / "cases")
        network = fold_network(data_dirs, train_dir, repeat, fold / "network", config)
        evaluate_sets(patient_sets(patient, real_train, variants, fold / "scans"), network, cascade,
                      fold / "evaluation", cache, log=lambda line, **_: None)
        fold_result = fold_rows(patient, json.loads((fold / "evaluation" / "report.json").read_text()))
        rows += fold_result
        (out / "report.md").write_text(format_table(rows))  # the folds done so far survive an interruption
        print(f"[{number}/{len(patients)}, {time.perf_counter() - start:.0f} s] {patient} held out: "
              f"{sum(r['found'] for r in fold_result)}/{sum(r['targets'] for r in fold_result)} targets found, "
              f"{sum(r['unlabelled_findings'] for r in fold_result)} unlabelled findings in {len(fold_result)} scans",
              flush=True)
    print(format_table(rows))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labelled", type=Path, required=True,
                        help="real backgrounds with their targets labelled (training.real_backgrounds --label-target; "
                             "without it: the control, targets IGNORE)")
    parser.add_argument("--data", type=Path, action="append", default=[], help="other training data (repeatable)")
    parser.add_argument("--real-train", type=Path, required=True, help="the real-train case folders")
    parser.add_argument("--variants", type=Path, help="real-train's scanner variants (training.scanner_variants)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="finetune_negatives_scanners")
    parser.add_argument("--iterations", type=int, help="override the preset's iteration count")
    parser.add_argument("--init", type=Path, help="start from this exported model folder (default: the preset's)")
    parser.add_argument("--repeat", type=int, default=2, help="times the labelled cases are listed (sampling weight)")
    parser.add_argument("--cascade", type=Path, default=REPO / "models" / "cascade_fp")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "probability_cache")
    parser.add_argument("--patients", nargs="+", help="the patients to hold out, one fold each (default: all)")
    parser.add_argument("--final", action="store_true", help="then fine-tune on every patient (OUT/final)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = preset_config(args.preset, args.iterations, args.init)
    cross_validate(args.labelled, args.data, args.real_train, args.variants, args.out, config, args.cascade,
                   args.cache, args.repeat, args.patients or patients_of(args.labelled))
    if args.final:
        final = fold_network(args.data, all_patients(args.labelled, args.out / "final" / "cases"), args.repeat,
                             args.out / "final" / "network", config)
        print(f"every patient: {final}", flush=True)


if __name__ == "__main__":
    main()
