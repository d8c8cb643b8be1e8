"""Lesion outputs on the source grid: a DICOM SEG (one segment per lesion) and lesions.json.

Plain functions:
- `lesion_records(source_datasets, instance_labels, scores, hu, spacing, lungs)`: per-lesion
  measurements (operators.measurements: RECIST axial diameters, 3D diameter, HU, location).
- `build_lesion_seg(source_datasets, instance_labels, records, ...)`: the SEG dataset (highdicom, BINARY).
- `write_lesion_outputs(...)`: both into an output folder (`seg.dcm`, `lesions.json`, each optional);
  returns the lesions.json document (UIDs, records, tumour burden, the SEG's UIDs).

`source_datasets` are the CT slices in the volume's z order (slice k of every array is
`source_datasets[k]`); arrays are [z, y, x]; spacing is (z, y, x) mm. Every file is written to a
temporary name in the same folder and renamed, so a reader never sees half a file. A study with
no lesions gets `lesions.json` with an empty list and no SEG (a SEG needs at least one segment).
An output that is switched off is not written, and an earlier run's file of that name is removed.

LesionSegWriterOperator ports:
- inputs: `source_datasets` (list[pydicom.Dataset], volume z order), `hu` (float32 [z, y, x]),
  `spacing` ((z, y, x) mm), `instance_labels` (int32 [z, y, x], 0 background, 1..n lesions),
  `scores` (list[float], lesion k at index k - 1), `thorax` (ThoraxCrop: the lung mask for locations);
- outputs: `lesions` (the lesion records), `document` (the lesions.json document, also when the
  file is switched off).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset, config
from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VM
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from monai.deploy.core import ConditionType, Fragment, Operator, OperatorSpec

from operators.measurements import (LUNG_SHELL_MM, axial_diameters, instance_boxes, lesion_location, longest_diameter_3d,
                                   lung_contact, recist_burden)
from operators.thorax_crop import ThoraxCrop
from operators.volume import TILT_TOLERANCE_MM, tilt_offsets_mm, timed_compute

# highdicom's warning about a one-component person name quotes the patient's name, which must not reach the log.
warnings.filterwarnings("ignore", message="The string .* is unlikely to represent the intended person name")

SEG_FILE = "seg.dcm"
LESIONS_FILE = "lesions.json"
SEG_SERIES_NUMBER = 901
MANUFACTURER = "Lung lesion MAP"
# Type 2 patient/study attributes that derived objects copy from the first source image (highdicom requires them).
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                          "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
DEIDENTIFICATION_KEYWORDS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")
# Text whose length or characters break its VR (checked with pydicom's validation) is left out too.
MAX_CHARS = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DT": 26, "LO": 64, "LT": 10240, "SH": 16, "ST": 1024, "TM": 16,
             "UI": 64}
TEXT_VRS = tuple(MAX_CHARS)
NUMERIC_VRS = ("DS", "IS", "FL", "FD", "US", "SS", "UL", "SL", "SV", "UV")
# DeidentificationMethod where a source says PatientIdentityRemoved YES but names no method (Type 1C).
UNSTATED_DEIDENTIFICATION = "De-identified before analysis; method not stated in source"


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


def _lung_box_mm(lungs: np.ndarray, to_patient) -> tuple[float, float, float, float] | None:
    """Patient x and z extent (x_min, x_max, z_min, z_max) of the lung mask's bounding box."""
    where = [np.flatnonzero(lungs.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
    if not all(len(w) for w in where):
        return None
    corners = np.array([[z, y, x] for z in where[0][[0, -1]] for y in where[1][[0, -1]] for x in where[2][[0, -1]]])
    points = to_patient(corners)
    return points[:, 0].min(), points[:, 0].max(), points[:, 2].min(), points[:, 2].max()


def lesion_records(source_datasets: Sequence[Dataset], instance_labels: np.ndarray, scores: Sequence[float],
                   hu: np.ndarray, spacing: tuple[float, float, float], lungs: np.ndarray | None = None) -> list[dict]:
    """Measurements of lesions 1..len(scores): geometry from the source slices, sizes from `spacing`.

    Voxel coordinates in the records are (z, y, x) on the source grid; `axial_slice_*` is the
    slice of the longest axial diameter. `lungs` (bool, the labels' shape) gives each lesion's
    location; without it the location is None.
    """
    if instance_labels.shape != hu.shape or instance_labels.shape[0] != len(source_datasets):
        raise ValueError(f"labels {instance_labels.shape}, HU {hu.shape} and {len(source_datasets)} slices disagree")
    if instance_labels.max(initial=0) > len(scores):
        raise ValueError(f"{instance_labels.max()} lesion labels but {len(scores)} scores")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    to_patient = _voxel_to_patient(source_datasets)
    lung_box = None if lungs is None else _lung_box_mm(lungs, to_patient)
    pad = np.ceil(LUNG_SHELL_MM / np.asarray(spacing)).astype(int) + 1
    records = []
    for number, (box, score) in enumerate(zip(instance_boxes(instance_labels, len(scores)), scores), 1):
        if box is None:
            raise ValueError(f"lesion {number} has no voxels")
        mask = instance_labels[box] == number
        offset = np.array([s.start for s in box])
        voxels = np.argwhere(mask) + offset
        # The centroid of the voxel centres: the mean of their patient positions (exact for any slice geometry).
        centroid = to_patient(voxels).mean(axis=0)
        diameters = axial_diameters(mask, spacing)
        slice_index = diameters.slice_index + int(offset[0])
        location = None
        if lung_box is not None:
            padded = tuple(slice(max(b.start - p, 0), b.stop + p) for b, p in zip(box, pad))
            contact = lung_contact(instance_labels[padded] == number, lungs[padded], spacing)
            location = lesion_location(centroid, contact, lung_box)
        values = hu[box][mask]
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
            "longest_diameter_3d_mm": round(longest_diameter_3d(mask, spacing), 2),
            "mean_hu": round(float(values.mean()), 1),
            "sd_hu": round(float(values.std()), 1),
            "max_hu": round(float(values.max()), 1),
            "location": location,
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


def writer_source(dataset: Dataset) -> Dataset:
    """A copy of a source header that every writer (SEG, SR, PDF) can copy from; the pixel data are shared.

    - Empty elements are left out (dciodvfy rejects an empty copied Type 1 element such as
      LossyImageCompression), except the Type 2 patient/study attributes, which become present and empty.
    - Numeric elements whose text is no number (an empty or odd decimal string), text too long or with
      characters not allowed for its VR, and several values where one is allowed, are left out.
    - A Referenced Study Sequence with items that lack the macro's Type 1 attributes (seen in
      de-identified archives) is left out.
    - PatientIdentityRemoved YES without a de-identification method gets one (Type 1C in every output).
    - An unknown or missing character set where there is non-ASCII text becomes UTF-8 (`_character_set`).
    """
    header = Dataset()
    if hasattr(dataset, "file_meta"):
        header.file_meta = dataset.file_meta
    for tag in dataset.keys():
        element = dataset[tag]
        if element.is_empty or (element.VR == "UN" and not element.tag.is_private):  # UN: too long for its VR
            continue
        if element.VM > 1 and not element.tag.is_private and dictionary_VM(element.tag) == "1":
            continue
        if element.VR in NUMERIC_VRS and not all(isinstance(v, (int, float)) and math.isfinite(v)
                                                  for v in _values(element)):
            continue
        if element.VR in TEXT_VRS and not _valid_text(element):
            continue
        header.add(element)
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, "")
    _character_set(header)
    if any("ReferencedSOPClassUID" not in item or "ReferencedSOPInstanceUID" not in item
           for item in header.get("ReferencedStudySequence", [])):
        del header.ReferencedStudySequence
    if (str(header.get("PatientIdentityRemoved", "")).upper() == "YES"
            and not set(DEIDENTIFICATION_KEYWORDS[1:]) & set(header.dir())):
        header.DeidentificationMethod = UNSTATED_DEIDENTIFICATION
    return header


def _valid_text(element) -> bool:
    try:
        for value in _values(element):
            validate_value(element.VR, value, config.RAISE)
    except (ValueError, TypeError):
        return False
    return all(len(str(value)) <= MAX_CHARS.get(element.VR, len(str(value))) for value in _values(element))


def _character_set(header: Dataset) -> None:
    """Empty terms of SpecificCharacterSet are left out, and an unknown one (or a code extension alone)
    altogether; without one, non-ASCII text is declared UTF-8 (ISO_IR 192), the encoding every output is then
    written in."""
    declared = _values(header["SpecificCharacterSet"]) if "SpecificCharacterSet" in header else []
    terms = [term for term in declared if term]
    if len(terms) > 1 and all(term in python_encoding for term in terms):
        header.SpecificCharacterSet = terms
    elif len(terms) == 1 and terms[0] in python_encoding and not terms[0].startswith("ISO 2022"):
        header.SpecificCharacterSet = terms[0]
    elif "SpecificCharacterSet" in header:
        del header.SpecificCharacterSet
    if "SpecificCharacterSet" not in header and any(
            element.VR in TEXT_VRS + ("PN", "UT", "UC") and not str(element.value).isascii() for element in header):
        header.SpecificCharacterSet = "ISO_IR 192"


def _values(element) -> list:
    return list(element.value) if element.VM > 1 else [element.value]


def writer_sources(source_datasets: Sequence[Dataset]) -> list[Dataset]:
    """`writer_source` of every slice, with the geometry a SEG or an SR image library needs: SpacingBetweenSlices
    the median step between the slice positions, SliceThickness the source's or else that step.

    Raises ValueError when the slices are not stacked along their normal (gantry tilt): readers such as
    dcmqi place SEG frames on such an untilted grid.
    """
    steps, offsets = tilt_offsets_mm(source_datasets)
    if len(offsets) and offsets.max() > TILT_TOLERANCE_MM:
        raise ValueError(f"the source slices are shifted in-plane by up to {offsets.max():.2f} mm (gantry tilt)")
    step = float(np.median(steps)) if len(steps) else 1.0
    headers = [writer_source(ds) for ds in source_datasets]
    for header in headers:
        header.SpacingBetweenSlices = round(step, 6)
        if "SliceThickness" not in header:
            header.SliceThickness = round(step, 6)
    return headers


def build_lesion_seg(source_datasets: Sequence[Dataset], instance_labels: np.ndarray, records: Sequence[dict],
                     algorithm_name: str, algorithm_version: str) -> hd.seg.Segmentation:
    """A BINARY SEG on the source grid with one segment per record (frame k refers to source slice k)."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.DCM.ArtificialIntelligence)
    return hd.seg.Segmentation(
        source_images=writer_sources(source_datasets),
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


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write through `write(temporary path)` in the same folder, then rename onto `path`."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_lesion_outputs(source_datasets: Sequence[Dataset], instance_labels: np.ndarray, scores: Sequence[float],
                         hu: np.ndarray, spacing: tuple[float, float, float], out_dir: str | Path, *,
                         lungs: np.ndarray | None = None, seg: bool = True, lesions_json: bool = True,
                         algorithm_name: str = "lesion_seg", algorithm_version: str = "0.1.0") -> dict:
    """Write `seg.dcm` (when switched on and there are lesions) and `lesions.json` (when switched on)
    into `out_dir`; return the lesions.json document."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = lesion_records(source_datasets, instance_labels, scores, hu, spacing, lungs)
    first = source_datasets[0]
    document = {
        "study_instance_uid": str(first.StudyInstanceUID),
        "series_instance_uid": str(first.SeriesInstanceUID),
        "frame_of_reference_uid": str(first.FrameOfReferenceUID),
        "seg": None,
        "burden": recist_burden(records),
        "lesions": records,
    }
    seg_path = out_dir / SEG_FILE
    if seg and records:
        dataset = build_lesion_seg(source_datasets, instance_labels, records, algorithm_name, algorithm_version)
        write_atomically(seg_path, lambda p: dataset.save_as(p, enforce_file_format=True))
        document["seg"] = {"file": SEG_FILE, "sop_class_uid": str(dataset.SOPClassUID),
                           "series_instance_uid": str(dataset.SeriesInstanceUID),
                           "sop_instance_uid": str(dataset.SOPInstanceUID)}
    else:
        seg_path.unlink(missing_ok=True)  # never leave a SEG from an earlier run beside this run's list
    json_path = out_dir / LESIONS_FILE
    if lesions_json:
        write_atomically(json_path, lambda p: p.write_text(json.dumps(document, indent=1)))
    else:
        json_path.unlink(missing_ok=True)
    return document


def full_grid_lungs(thorax: ThoraxCrop, shape: tuple[int, int, int]) -> np.ndarray:
    """The thorax crop's lung mask placed on the whole series grid."""
    lungs = np.zeros(shape, bool)
    lungs[thorax.box] = thorax.lungs
    return lungs


class LesionSegWriterOperator(Operator):
    """Writes the SEG and lesions.json into `output_folder` (ports in the module docstring); `seg` and
    `lesions_json` switch the files on or off."""

    def __init__(self, fragment: Fragment, *args, output_folder: str | Path, seg: bool = True,
                 lesions_json: bool = True, algorithm_name: str = "lesion_seg", algorithm_version: str = "0.1.0",
                 **kwargs) -> None:
        self.output_folder = Path(output_folder)
        self.switches = {"seg": seg, "lesions_json": lesions_json}
        self.algorithm_name = algorithm_name
        self.algorithm_version = algorithm_version
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        for name in ("source_datasets", "hu", "spacing", "instance_labels", "scores", "thorax"):
            spec.input(name)
        for name in ("lesions", "document"):
            spec.output(name).condition(ConditionType.NONE)  # optional: may stay unconnected

    @timed_compute
    def compute(self, op_input, op_output, context) -> None:
        labels = op_input.receive("instance_labels")
        document = write_lesion_outputs(
            op_input.receive("source_datasets"), labels, op_input.receive("scores"), op_input.receive("hu"),
            tuple(op_input.receive("spacing")), self.output_folder,
            lungs=full_grid_lungs(op_input.receive("thorax"), labels.shape), **self.switches,
            algorithm_name=self.algorithm_name, algorithm_version=self.algorithm_version)
        op_output.emit(document["lesions"], "lesions")
        op_output.emit(document, "document")
