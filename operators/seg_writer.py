"""Lesion outputs on the source grid: a DICOM SEG (one segment per lesion) and lesions.json.

Plain functions:
- `lesion_records(source_datasets, instance_labels, scores, hu, spacing)`: per-lesion measurements.
- `build_lesion_seg(source_datasets, instance_labels, records, ...)`: the SEG dataset (highdicom, BINARY).
- `write_lesion_outputs(...)`: both into an output folder (`seg.dcm`, `lesions.json`).

`source_datasets` are the CT slices in the volume's z order (slice k of every array is
`source_datasets[k]`); arrays are [z, y, x]; spacing is (z, y, x) mm. Every file is written to a
temporary name in the same folder and renamed, so a reader never sees half a file. A study with
no lesions gets `lesions.json` with an empty list and no SEG (a SEG needs at least one segment).

LesionSegWriterOperator ports:
- inputs: `source_datasets` (list[pydicom.Dataset], volume z order), `hu` (float32 [z, y, x]),
  `spacing` ((z, y, x) mm), `instance_labels` (int32 [z, y, x], 0 background, 1..n lesions),
  `scores` (list[float], lesion k at index k - 1);
- output: `lesions` (the list of lesion records written to lesions.json).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from scipy import ndimage

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec

from operators.measurements import axial_diameters
from operators.volume import timed_compute

SEG_FILE = "seg.dcm"
LESIONS_FILE = "lesions.json"
SEG_SERIES_NUMBER = 901
MANUFACTURER = "Lung lesion MAP"
# Type 2 patient/study attributes that highdicom copies from the first source image and requires there.
_TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                      "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _voxel_to_patient(source_datasets: Sequence[Dataset]) -> Callable[[np.ndarray], np.ndarray]:
    """Maps (z, y, x) voxel coordinates (z an integer slice index) to LPS mm using each slice's geometry."""
    first = source_datasets[0]
    orientation = np.asarray(first.ImageOrientationPatient, float)
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (x grows), along a column (y grows)
    dy, dx = (float(v) for v in first.PixelSpacing)
    origins = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in source_datasets])

    def to_patient(zyx: np.ndarray) -> np.ndarray:
        return origins[zyx[:, 0].astype(int)] + np.outer(zyx[:, 2] * dx, row_dir) + np.outer(zyx[:, 1] * dy, col_dir)

    return to_patient


def lesion_records(source_datasets: Sequence[Dataset], instance_labels: np.ndarray, scores: Sequence[float],
                   hu: np.ndarray, spacing: tuple[float, float, float]) -> list[dict]:
    """Measurements of lesions 1..len(scores): geometry from the source slices, sizes from `spacing`.

    Voxel coordinates in the records are (z, y, x) on the source grid; `axial_slice_*` is the
    slice of the longest axial diameter.
    """
    if instance_labels.shape != hu.shape or instance_labels.shape[0] != len(source_datasets):
        raise ValueError(f"labels {instance_labels.shape}, HU {hu.shape} and {len(source_datasets)} slices disagree")
    if instance_labels.max(initial=0) > len(scores):
        raise ValueError(f"{instance_labels.max()} lesion labels but {len(scores)} scores")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    to_patient = _voxel_to_patient(source_datasets)
    records = []
    for number, (box, score) in enumerate(zip(ndimage.find_objects(instance_labels, len(scores)), scores), 1):
        if box is None:
            raise ValueError(f"lesion {number} has no voxels")
        mask = instance_labels[box] == number
        offset = np.array([s.start for s in box])
        voxels = np.argwhere(mask) + offset
        # The centroid of the voxel centres: the mean of their patient positions (exact for any slice geometry).
        centroid = to_patient(voxels).mean(axis=0)
        diameters = axial_diameters(mask, spacing)
        slice_index = diameters.slice_index + int(offset[0])
        on_grid = lambda pair: [[round(float(c), 2) for c in np.add(p, offset)] for p in pair]  # noqa: E731
        records.append({
            "segment_number": number,
            "label": f"Lesion {number}",
            "tracking_id": f"Lesion {number}",
            "tracking_uid": generate_uid(),
            "centroid_mm": [round(float(c), 2) for c in centroid],
            "volume_ml": round(len(voxels) * voxel_ml, 4),
            "long_axis_mm": round(diameters.long_mm, 2),
            "short_axis_mm": round(diameters.short_mm, 2),
            "axial_slice_index": slice_index,
            "axial_slice_sop_instance_uid": str(source_datasets[slice_index].SOPInstanceUID),
            "long_axis_endpoints_voxel": on_grid(diameters.long_endpoints),
            "short_axis_endpoints_voxel": on_grid(diameters.short_endpoints),
            "mean_hu": round(float(hu[box][mask].mean()), 1),
            "score": round(float(score), 4),
            "voxel_count": len(voxels),
        })
    return records


def _segment_description(record: dict, algorithm: hd.AlgorithmIdentificationSequence) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=record["segment_number"],
        segment_label=record["label"],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=record["tracking_uid"],
        tracking_id=record["tracking_id"],
        anatomic_regions=[codes.SCT.Thorax],  # lung, hilum or mediastinum: the finer location comes with the SR
    )


def _study_attributes_for_seg(dataset: Dataset) -> Dataset:
    """`dataset`, or a repaired copy, whose patient/study attributes a SEG may copy as they are.

    Missing Type 2 attributes become present and empty; a Referenced Study Sequence with items that
    lack the macro's Type 1 attributes (seen in de-identified archives) is left out.
    """
    missing = [keyword for keyword in _TYPE2_FROM_SOURCE if keyword not in dataset]
    incomplete_study_reference = any(
        "ReferencedSOPClassUID" not in item or "ReferencedSOPInstanceUID" not in item
        for item in dataset.get("ReferencedStudySequence", []))
    if not missing and not incomplete_study_reference:
        return dataset
    dataset = copy.deepcopy(dataset)
    for keyword in missing:
        setattr(dataset, keyword, "")
    if incomplete_study_reference:
        del dataset.ReferencedStudySequence
    return dataset


def build_lesion_seg(source_datasets: Sequence[Dataset], instance_labels: np.ndarray, records: Sequence[dict],
                     algorithm_name: str, algorithm_version: str) -> hd.seg.Segmentation:
    """A BINARY SEG on the source grid with one segment per record (frame k refers to source slice k)."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.DCM.ArtificialIntelligence)
    return hd.seg.Segmentation(
        source_images=[_study_attributes_for_seg(source_datasets[0]), *source_datasets[1:]],
        pixel_array=instance_labels.astype(np.uint16, copy=False),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(r, algorithm) for r in records],
        series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm_name,
        software_versions=algorithm_version,
        device_serial_number="0",
        series_description="Lung lesions (automatic)",
        content_label="LESIONS",
        content_description="Lung cancer lesions, one segment per lesion",
    )


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(temporary path)` in the same folder, then rename onto `path`."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_lesion_outputs(source_datasets: Sequence[Dataset], instance_labels: np.ndarray, scores: Sequence[float],
                         hu: np.ndarray, spacing: tuple[float, float, float], out_dir: str | Path, *,
                         algorithm_name: str = "lesion_seg", algorithm_version: str = "0.1.0") -> list[dict]:
    """Write `seg.dcm` (when there are lesions) and `lesions.json` into `out_dir`; return the lesion records."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = lesion_records(source_datasets, instance_labels, scores, hu, spacing)
    first = source_datasets[0]
    document = {
        "study_instance_uid": str(first.StudyInstanceUID),
        "series_instance_uid": str(first.SeriesInstanceUID),
        "frame_of_reference_uid": str(first.FrameOfReferenceUID),
        "seg": None,
        "lesions": records,
    }
    seg_path = out_dir / SEG_FILE
    if records:
        seg = build_lesion_seg(source_datasets, instance_labels, records, algorithm_name, algorithm_version)
        _write_atomically(seg_path, lambda p: seg.save_as(p, enforce_file_format=True))
        document["seg"] = {"file": SEG_FILE, "series_instance_uid": str(seg.SeriesInstanceUID),
                           "sop_instance_uid": str(seg.SOPInstanceUID)}
    else:
        seg_path.unlink(missing_ok=True)  # never leave a SEG from an earlier run beside an empty list
    _write_atomically(out_dir / LESIONS_FILE, lambda p: p.write_text(json.dumps(document, indent=1)))
    return records


class LesionSegWriterOperator(Operator):
    """Writes the SEG and lesions.json into `output_folder` (ports in the module docstring)."""

    def __init__(self, fragment: Fragment, *args, output_folder: str | Path,
                 algorithm_name: str = "lesion_seg", algorithm_version: str = "0.1.0", **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.algorithm_name = algorithm_name
        self.algorithm_version = algorithm_version
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for name in ("source_datasets", "hu", "spacing", "instance_labels", "scores"):
            spec.input(name)
        spec.output("lesions").condition(ConditionType.NONE)  # optional: may stay unconnected

    @timed_compute
    def compute(self, op_input, op_output, context) -> None:
        records = write_lesion_outputs(
            op_input.receive("source_datasets"), op_input.receive("instance_labels"), op_input.receive("scores"),
            op_input.receive("hu"), tuple(op_input.receive("spacing")), self.output_folder,
            algorithm_name=self.algorithm_name, algorithm_version=self.algorithm_version)
        op_output.emit(records, "lesions")
