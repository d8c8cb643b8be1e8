"""Insert synthetic lesions into a lesion-free chest CT: a training case from a normal scan.

    python -m training.insert_lesions --input CT_FOLDER_OR_NIFTI --out DATASET --seed 3 [--count 6]

Reads one CT series (a DICOM folder holding a single series, or a NIfTI file), finds the body and
lungs (operators.thorax_crop.body_and_lung_masks), estimates the scan's noise and blur, inserts
lesions in lung, against the pleura, beside vessels and at the hila (training.lesions), and writes
<out>/imagesTr/<case>.nii.gz, <out>/labelsTr/<case>.nii.gz (instance labels) and <out>/<case>.json.
The case name comes from the input path (or --case), never from DICOM tag text.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from training.lesions import estimate_noise_and_blur, insert_lesions
from training.nifti import read_nifti, write_nifti


class InputError(Exception):
    """A problem with the input that the user can fix; its message is one line."""


def read_dicom_series(folder: Path):
    """(HU float32 [z, y, x], spacing (z, y, x) mm, origin LPS of voxel [0, 0, 0]) of the one series under folder."""
    slices = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        if "PixelData" in ds and "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
            slices.append(ds)
    if not slices:
        raise InputError(f"no DICOM images with position and orientation under {folder}")
    series = {ds.SeriesInstanceUID for ds in slices}
    if len(series) > 1:
        raise InputError(f"{folder} holds {len(series)} image series; point --input at a folder with one")
    hu, spacing, origin, _ = series_volume(slices, str(folder))
    return hu, spacing, origin


def series_volume(slices: list, where: str):
    """(HU float32 [z, y, x], spacing (z, y, x), origin LPS, SOP Instance UIDs in slice order) of one
    series' image datasets, sorted along the slice normal."""
    orientation = np.asarray(slices[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    slices = sorted(slices, key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, float))))
    positions = np.array([np.dot(normal, np.asarray(ds.ImagePositionPatient, float)) for ds in slices])
    if len({(ds.Rows, ds.Columns) for ds in slices}) > 1:
        raise InputError(f"slices of different sizes in {where}")
    if len(slices) < 2 or np.min(np.diff(positions)) <= 0:
        raise InputError(f"{where}: need at least two slices at distinct positions")
    try:
        hu = np.stack([ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1))
                       + float(getattr(ds, "RescaleIntercept", 0)) for ds in slices])
    except (ValueError, RuntimeError, NotImplementedError) as error:
        raise InputError(f"cannot decode the pixel data in {where}: {error}".splitlines()[0])
    row_mm, col_mm = (float(v) for v in slices[0].PixelSpacing)
    spacing = (float(np.median(np.diff(positions))), row_mm, col_mm)
    origin = tuple(float(v) for v in slices[0].ImagePositionPatient)
    return hu, spacing, origin, [str(ds.SOPInstanceUID) for ds in slices]


def read_ct(path: Path):
    """(HU float32 [z, y, x], spacing (z, y, x), origin LPS) from a DICOM folder or a NIfTI file."""
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if path.is_dir():
        return read_dicom_series(path)
    if path.name.endswith((".nii", ".nii.gz")):
        hu, spacing = read_nifti(path)
        if hu.ndim != 3:
            raise InputError(f"{path} is not a 3D volume (shape {hu.shape})")
        return hu.astype(np.float32), spacing, (0.0, 0.0, 0.0)
    raise InputError(f"{path} is neither a DICOM folder nor a .nii/.nii.gz file")


def case_name(path: Path) -> str:
    name = re.sub(r"\.nii(\.gz)?$", "", path.resolve().name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "case"


def insert_into_ct(hu: np.ndarray, spacing, seed: int, count: int):
    """(HU with lesions, instance labels, lesion dicts, noise SD, blur sigma mm) for one background."""
    from operators.thorax_crop import body_and_lung_masks

    _, lungs = body_and_lung_masks(hu, spacing)
    if lungs.sum() * np.prod(spacing) < 200_000:  # < 0.2 l of lung: not a chest CT
        raise InputError("found too little lung in the input; is it a chest CT?")
    noise_sd, blur = estimate_noise_and_blur(hu, spacing, lungs)
    out, labels, lesions = insert_lesions(hu, spacing, lungs, None, np.random.default_rng(seed), count,
                                          blur_sigma_mm=blur, noise_sd_hu=noise_sd)
    return out, labels, lesions, noise_sd, blur


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="DICOM series folder or NIfTI file")
    parser.add_argument("--out", type=Path, required=True, help="dataset folder (imagesTr/, labelsTr/)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, default=6, help="lesions to insert (fewer where room lacks)")
    parser.add_argument("--case", default=None, help="case name (default: from the input path)")
    args = parser.parse_args(argv)
    if args.count < 0:
        parser.error("--count must be >= 0")
    try:
        hu, spacing, origin = read_ct(args.input)
        case = case_name(Path(args.case)) if args.case else case_name(args.input)
        out, labels, lesions, noise_sd, blur = insert_into_ct(hu, spacing, args.seed, args.count)
    except InputError as error:
        raise SystemExit(f"insert_lesions: {error}")
    for folder in ("imagesTr", "labelsTr"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    write_nifti(args.out / "imagesTr" / f"{case}.nii.gz", np.clip(np.rint(out), -1024, 3071).astype(np.int16), spacing, origin)
    write_nifti(args.out / "labelsTr" / f"{case}.nii.gz", labels, spacing, origin)
    record = {"case": case, "input": str(args.input), "seed": args.seed, "spacing_zyx_mm": list(spacing),
              "noise_sd_hu": round(noise_sd, 2), "blur_sigma_zyx_mm": [round(float(b), 3) for b in blur], "lesions": lesions}
    (args.out / f"{case}.json").write_text(json.dumps(record, indent=1))
    print(f"{case}: {len(lesions)} lesions inserted (noise {noise_sd:.1f} HU, blur {blur[2]:.2f} mm) -> {args.out}")


if __name__ == "__main__":
    main()
