"""A training dataset from DICOM CT studies annotated with DICOM SEG (e.g. exported from a PACS).

    python -m training.dicom_dataset --dicom ARCHIVE --out data/mine
    python -m training.train --data data/mine --run runs/mine

Every SEG under ARCHIVE becomes one case: the CT series it references (found under ARCHIVE by
Series Instance UID) is written as imagesTr/case_NNNN.nii.gz and the segments as labelsTr/
case_NNNN.nii.gz (each segment's number as its label; every label > 0 is lesion in training), with
dataset.json listing them. Case names are numbers, never tag text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from training.insert_lesions import InputError, series_volume
from training.nifti import write_nifti

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _scan(archive: Path) -> tuple[list[Path], dict[str, list[pydicom.Dataset]]]:
    """SEG files, and image datasets grouped by Series Instance UID."""
    segs, series = [], defaultdict(list)
    for path in sorted(p for p in archive.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        if ds.get("SOPClassUID") == SEG_SOP_CLASS:
            segs.append(path)
        elif "PixelData" in ds and "ImagePositionPatient" in ds:
            series[ds.SeriesInstanceUID].append(ds)
    return segs, series


def seg_case(seg_path: Path, series: dict[str, list[pydicom.Dataset]]):
    """(HU, labels, spacing, origin) of one SEG and the CT series it references."""
    seg = hd.seg.segread(seg_path)
    referenced = {series_uid for _, series_uid, _ in seg.get_source_image_uids()}
    found = [uid for uid in referenced if uid in series]
    if not found:
        raise InputError(f"{seg_path.name}: the CT series it references is not in the archive")
    hu, spacing, origin, sop_uids = series_volume(series[found[0]], f"series of {seg_path.name}")
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop_uids, combine_segments=True,
                                              skip_overlap_checks=True, ignore_spatial_locations=True)
    return hu, labels.astype(np.int16), spacing, origin


def build_dataset(archive: Path, out: Path) -> Path:
    segs, series = _scan(archive)
    if not segs:
        raise InputError(f"no DICOM SEG under {archive}")
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    items = []
    for number, seg_path in enumerate(segs, 1):
        hu, labels, spacing, origin = seg_case(seg_path, series)
        name = f"case_{number:04d}"
        write_nifti(out / "imagesTr" / f"{name}.nii.gz", np.round(hu).astype(np.int16), spacing, origin)
        write_nifti(out / "labelsTr" / f"{name}.nii.gz", labels, spacing, origin)
        items.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
        print(f"[{number}/{len(segs)}] {name}: {hu.shape}, {len(np.unique(labels)) - 1} segment label(s)", flush=True)
    spec = {"name": "LungLesionsFromDICOM", "tensorImageSize": "3D", "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "lesion (any value > 0)"}, "numTraining": len(items),
            "training": items}
    path = out / "dataset.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom", type=Path, required=True, help="folder of CT series and DICOM SEG files")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        print(build_dataset(args.dicom, args.out))
    except InputError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
