"""The shared real cases (../shared/data/real) as NIfTI image + truth instance labels, for evaluation only.

    python -m training.real_cases --real ../shared/data/real --out data/real

Writes OUT/images/<case>.nii.gz (HU) and OUT/labels/<case>.nii.gz (truth instances) on the truth
series' grid, slices in ascending patient z like the app's volumes, and OUT/cases.json with each
case's boxes_only flag. These cases are test data: never train or fit thresholds on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pydicom

from training.insert_lesions import series_volume
from training.nifti import write_nifti


def _series_datasets(folder: Path, series_uid: str) -> list[pydicom.Dataset]:
    datasets = []
    for path in sorted((folder / "dicom").rglob("*")):
        if path.is_file():
            ds = pydicom.dcmread(path, force=True)
            if ds.get("SeriesInstanceUID") == series_uid:
                datasets.append(ds)
    return datasets


def real_case_arrays(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], tuple, bool]:
    """(hu, truth labels, spacing zyx, origin LPS, boxes_only) of one real case, ascending z."""
    truth = json.loads((folder / "truth.json").read_text())
    stored = np.load(folder / "truth.npz")
    hu, spacing, origin, sop_uids = series_volume(_series_datasets(folder, truth["series_uid"]), folder.name)
    row = {str(uid): k for k, uid in enumerate(stored["sop_uids"])}
    labels = stored["label"][[row[uid] for uid in sop_uids]].astype(np.int16)
    return hu, labels, spacing, origin, bool(truth.get("boxes_only", False))


def export_real_cases(real_dir: Path, out: Path) -> dict:
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    cases = {}
    for folder in sorted(p for p in real_dir.iterdir() if (p / "truth.json").is_file()):
        hu, labels, spacing, origin, boxes_only = real_case_arrays(folder)
        write_nifti(out / "images" / f"{folder.name}.nii.gz", hu.astype(np.int16), spacing, origin)
        write_nifti(out / "labels" / f"{folder.name}.nii.gz", labels, spacing, origin)
        cases[folder.name] = {"boxes_only": boxes_only, "shape": list(hu.shape), "spacing_mm": spacing}
        print(f"{folder.name}: {hu.shape} spacing {spacing} boxes_only={boxes_only}", flush=True)
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    return cases


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    export_real_cases(args.real, args.out)


if __name__ == "__main__":
    main()
