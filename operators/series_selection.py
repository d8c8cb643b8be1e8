"""Choosing and reading the chest CT series: the SDK's loader, selector and volume operators, made robust.

What the stock SDK path (monai-deploy-app-sdk 4.0.0) does on real archives, and the fix here:
- Loader: one empty attribute (e.g. SeriesNumber) makes `populate_series_attributes` raise, and the
  series is then never attached to its study: every file of that series is silently lost.
  -> `populate_series_attributes` sees the instance without its empty elements.
- Loader: only files with the DICOM "DICM" marker are read; other files are ignored with a count
  in the log. Unreadable and truncated files (a partial transfer) are skipped with a warning each; of
  two files at one position the SDK keeps the first it reads, so a truncated copy must never get there.
  Folders are read in sorted order, links followed once. An empty folder or a folder without DICOM
  files is a one-line StudyError.
- Selector: the rules match AND-only, the first match wins in folder order, and a study without a
  match yields an empty list that makes the next operator fail with an opaque scheduler error;
  the "Axial" orientation rule raises when PatientPosition is absent.
  -> All series matching the SDK conditions are checked for a usable geometry (slice count,
  coverage, spacing, no missing slices) and ranked (thin slices, soft-tissue kernel, slice count);
  orientation is read from the slice normal; no usable series is a one-line StudyError naming why.
- Volume: the SDK's conversion (sorting along the normal, rescale) is kept; its Image is turned
  into a CTVolume with the source datasets in the same z order and the (z, y, x) affine.
  A series that the analysis could not fit into the memory this process may use (`memory_needed`, measured;
  `available_memory`: the container's limit, i.e. the MAP's memory request, or what the system has free)
  is refused with a StudyError before its pixels are read, instead of the analysis being killed for memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, CTImageStorage

from monai.deploy.core import Fragment
from monai.deploy.core.domain.dicom_series import DICOMSeries
from monai.deploy.core.domain.dicom_study import DICOMStudy
from monai.deploy.core.domain.dicom_series_selection import SelectedSeries, StudySelectedSeries
from monai.deploy.exceptions import ItemNotExistsError
from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesSelectorOperator, DICOMSeriesToVolumeOperator

from operators.volume import (TILT_TOLERANCE_MM, CTVolume, StudyError, return_freed_memory, tilt_offsets_mm,
                              timed_compute)

log = logging.getLogger(__name__)

RULES_FILE = Path(__file__).with_name("series_rules.json")
ORIENTATION_KEY = "ImageOrientationPatient"
SAME_POSITION_MM = 0.01  # slices closer than this along the normal are at one position
NO_MARKER = "no DICOM marker"
# What every file must carry valid for the SDK loader and the outputs' references, and geometry the SDK parses.
IDENTIFYING_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
GEOMETRY_VALUES = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0: the end of encapsulated pixel data
# The analysis' peak RSS: a base plus bytes per voxel of the series, a line through the app's peaks on 512 x 512 studies
# of 300 x 1 mm (1848 MiB) and 900 x 0.5 mm (3261 MiB) (README "Resources"), rounded up by about 5 %.
MEMORY_BASE_BYTES = 1200 * 2**20
MEMORY_BYTES_PER_VOXEL = 10.0
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")  # v2, v1


def read_instance(path: str) -> Dataset | str:
    """The DICOM instance in a file, or why it cannot be used (a short phrase; NO_MARKER for other files).

    A partial transfer is caught here: pydicom reads a cut encapsulated file as an empty dataset or without the
    delimiter that ends its pixel data, a cut native one with less pixel data than its header promises.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "not a regular file"
        with open(path, "rb") as file:
            if file.read(132)[128:] != b"DICM":
                return NO_MARKER
        dataset = pydicom.dcmread(path)
        if len(dataset) == 0:
            return "truncated or unreadable"
        invalid = [keyword for keyword in IDENTIFYING_UIDS if not _valid_uid(dataset.get(keyword))]
        if dataset.get("FrameOfReferenceUID") and not _valid_uid(dataset.FrameOfReferenceUID):
            invalid.append("FrameOfReferenceUID")
        invalid += [keyword for keyword, count in GEOMETRY_VALUES.items()
                    if keyword in dataset and not _numbers(dataset[keyword], count)]
        if invalid:
            return f"invalid or missing {', '.join(invalid)}"
        if "PixelData" not in dataset:
            return dataset
        if dataset["PixelData"].is_undefined_length:  # encapsulated (compressed)
            with open(path, "rb") as file:
                file.seek(-len(SEQUENCE_DELIMITER), os.SEEK_END)
                complete = file.read() == SEQUENCE_DELIMITER
        else:
            complete = len(dataset.PixelData) >= get_expected_length(dataset)
    except Exception as error:  # noqa: BLE001 (any unreadable file is skipped, not fatal)
        return f"unreadable ({type(error).__name__})"
    return dataset if complete else "truncated pixel data"


def _valid_uid(value) -> bool:
    return isinstance(value, str) and UID(value).is_valid


def _numbers(element, count: int) -> bool:
    """Whether an element holds `count` finite numbers (an empty one counts as absent)."""
    if element.is_empty:
        return True
    values = list(element.value) if element.VM > 1 else [element.value]
    try:
        return len(values) == count and all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _same_image(path: str, dataset: Dataset) -> bool:
    """Whether the file `path` holds the pixel data of `dataset`."""
    first = read_instance(path)
    return isinstance(first, Dataset) and (first.get("PixelData") or b"") == (dataset.get("PixelData") or b"")


class RobustDICOMDataLoaderOperator(DICOMDataLoaderOperator):
    """The SDK loader that skips non-DICOM, unreadable, truncated and duplicate files, refuses two different
    files with one SOP Instance UID, and tolerates empty series attributes."""

    def _list_files(self, path, files: list[str]):
        found, visited = [], set()
        for folder, subfolders, names in os.walk(path, followlinks=True):
            if os.path.realpath(folder) in visited:  # a link back up the tree
                subfolders.clear()
                continue
            visited.add(os.path.realpath(folder))
            subfolders.sort()
            found += [os.path.join(folder, name) for name in sorted(names)]
        others, first_of_uid = 0, {}
        for item in found:
            instance = read_instance(item)
            if instance == NO_MARKER:
                others += 1
            elif isinstance(instance, str):
                log.warning("skipped %s: %s", os.path.relpath(item, path), instance)
            else:
                uid = str(instance.get("SOPInstanceUID", ""))
                if uid not in first_of_uid:  # the file, not its dataset: its pixel data is read again on a repeat only
                    first_of_uid[uid] = item
                    files.append(item)
                elif not _same_image(first_of_uid[uid], instance):
                    raise StudyError(f"two files with different images have one SOP Instance UID ({uid})")
        if others:
            log.info("ignored %d of %d files without the DICOM marker", others, len(found))

    def populate_series_attributes(self, series, sop_instance):
        present = Dataset()
        present.update({element.tag: element for element in sop_instance if not element.is_empty})
        super().populate_series_attributes(series, present)

    def load_data_to_studies(self, input_path: Path):
        if not Path(input_path).is_dir():
            raise StudyError(f"input folder {input_path} does not exist")
        try:
            return super().load_data_to_studies(Path(input_path))
        except ItemNotExistsError:
            raise StudyError(f"no DICOM files in {input_path}") from None

    compute = timed_compute(DICOMDataLoaderOperator.compute)


@dataclass
class SeriesGeometry:
    """Slice geometry of one series, read from its headers."""

    slices: int
    slice_spacing_mm: float
    coverage_mm: float
    kernel: str


def _decodable(dataset: Dataset) -> bool:
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if syntax is None or not syntax.is_compressed:
            return True
        return get_decoder(syntax).is_available
    except (NotImplementedError, ValueError):  # no decoder, or no transfer syntax pydicom knows
        return False


def _kernel(dataset: Dataset) -> str:
    kernel = dataset.get("ConvolutionKernel", "")
    return " ".join(map(str, kernel)) if isinstance(kernel, MultiValue) else str(kernel or "")


def _slice_normal(dataset: Dataset) -> np.ndarray:
    cosines = np.asarray(dataset.ImageOrientationPatient, float)
    return np.cross(cosines[:3], cosines[3:])


def series_geometry(datasets: list[Dataset], usable: dict) -> SeriesGeometry | str:
    """The geometry of a series, or why it cannot be read as one axial volume (a short phrase)."""
    images = [d for d in datasets if "PixelData" in d]
    if any(int(d.get("NumberOfFrames") or 1) > 1 for d in images):
        return "multi-frame images (enhanced CT is not analysed)"
    if any(d.get("SOPClassUID") != CTImageStorage for d in images):
        return "images of another SOP class than CT Image Storage"
    undecodable = sorted({str(d.file_meta.TransferSyntaxUID) for d in images if not _decodable(d)})
    if undecodable:
        return f"pixel data in a transfer syntax that cannot be decoded here ({', '.join(undecodable)})"
    needed = ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing", "Rows", "Columns",
              "FrameOfReferenceUID")
    lacking = sorted({key for d in images for key in needed if d.get(key) in (None, "", [])})
    if lacking:
        return f"slices without {', '.join(lacking)}"
    if len(images) < usable["min_slices"]:
        return f"{len(images)} slices (at least {usable['min_slices']} needed)"
    if len({(tuple(map(float, d.ImageOrientationPatient)), int(d.Rows), int(d.Columns), d.FrameOfReferenceUID)
            for d in images}) > 1:
        return "slices differ in orientation, size or frame of reference"
    if int(np.argmax(np.abs(_slice_normal(images[0])))) != 2:
        return "not axial"
    steps, offsets = tilt_offsets_mm(images)
    if offsets.max() > TILT_TOLERANCE_MM:
        tilt = np.degrees(np.arctan2(offsets[-1], steps.sum()))
        return f"gantry tilt of {tilt:.1f} degrees (tilted series are not analysed)"
    if steps.min() < SAME_POSITION_MM:
        return "several slices at one position"
    spacing = float(np.median(steps))
    coverage = float(steps.sum() + spacing)
    if spacing > usable["max_slice_spacing_mm"]:
        return f"slice spacing {spacing:.1f} mm (at most {usable['max_slice_spacing_mm']} mm)"
    if steps.max() > usable["max_gap_ratio"] * spacing:
        return f"missing slices (a gap of {steps.max():.1f} mm where slices are {spacing:.1f} mm apart)"
    if coverage < usable["min_coverage_mm"]:
        return f"covers {coverage:.0f} mm (at least {usable['min_coverage_mm']:.0f} mm needed)"
    return SeriesGeometry(len(images), spacing, coverage, _kernel(images[0]))


def _describe(series: DICOMSeries) -> str:
    first = series.get_sop_instances()[0].get_native_sop_instance()
    name = " ".join(str(first.get(key) or "") for key in ("SeriesNumber", "SeriesDescription")).strip()
    modality, count = first.get("Modality") or "?", len(series.get_sop_instances())
    return f"series {name or series.SeriesInstanceUID} ({modality}, {count} files)"


class ChestCTSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """Picks the best usable axial CT series of all studies in the folder (see the module docstring)."""

    def __init__(self, fragment: Fragment, *args, rules_path: Path = RULES_FILE, **kwargs):
        self.config = json.loads(Path(rules_path).read_text())
        super().__init__(fragment, *args, rules=json.dumps(self.config), all_matched=True, **kwargs)

    def _kernel_rank(self, kernel: str) -> int:
        prefer = self.config["prefer"]
        if re.search(prefer["soft_tissue_kernels"], kernel):
            return 0
        return 2 if re.search(prefer["sharp_kernels"], kernel) else 1

    def _sdk_match(self, sdk_rules: dict, study: DICOMStudy, series: DICOMSeries) -> str | None:
        """The name of the SDK selection that `series` matches, or None (also where its headers break the SDK)."""
        alone = DICOMStudy(study.StudyInstanceUID)
        alone.add_series(series)
        try:
            selected = super().filter(sdk_rules, [alone], all_matched=True)
        except Exception as error:  # noqa: BLE001 (e.g. a single-valued ImageType)
            log.warning("%s: the series rules cannot read its headers (%s)", _describe(series), type(error).__name__)
            return None
        return next((item.selection_name for chosen in selected for item in chosen.selected_series), None)

    def filter(self, selection_rules, dicom_study_list, all_matched=True, sort_by_sop_instance_count=False):
        sdk_rules = {"selections": [
            {**s, "conditions": {k: v for k, v in s["conditions"].items() if k != ORIENTATION_KEY}}
            for s in selection_rules["selections"]]}
        usable, reasons, matched = [], [], {}
        for study in dicom_study_list:
            for series in study.get_all_series():
                if not series.get_sop_instances():  # the SDK loader could parse none of its files
                    continue
                name = self._sdk_match(sdk_rules, study, series)
                if name is None:
                    reasons.append(f"{_describe(series)}: not a CT image series")
                    continue
                matched[series.SeriesInstanceUID] = (study, name)
                datasets = [sop.get_native_sop_instance() for sop in series.get_sop_instances()]
                geometry = series_geometry(datasets, self.config["usable"])
                if isinstance(geometry, str):
                    reasons.append(f"{_describe(series)}: {geometry}")
                else:
                    usable.append((geometry, series))
                    log.info("usable %s: %d slices, %.2f mm apart, kernel %r", _describe(series), geometry.slices,
                             geometry.slice_spacing_mm, geometry.kernel)
        if not usable:
            raise StudyError("no usable axial CT series: " + ("; ".join(reasons) or "no series could be read"))
        geometry, best = min(usable, key=lambda item: (round(item[0].slice_spacing_mm * 2) / 2,
                                                       self._kernel_rank(item[0].kernel), -item[0].slices))
        study, name = matched[best.SeriesInstanceUID]
        log.info("selected %s of %d usable: %d slices, %.2f mm, kernel %r", _describe(best), len(usable),
                 geometry.slices, geometry.slice_spacing_mm, geometry.kernel)
        chosen = StudySelectedSeries(study)
        chosen.add_selected_series(SelectedSeries(name, best, None))
        return [chosen]

    compute = timed_compute(DICOMSeriesSelectorOperator.compute)


def _affine_zyx(first: Dataset, last: Dataset, count: int) -> np.ndarray:
    """4x4 matrix mapping a voxel index (z, y, x, 1) to LPS mm."""
    cosines = np.asarray(first.ImageOrientationPatient, float)
    row_mm, column_mm = (float(v) for v in first.PixelSpacing)
    origin = np.asarray(first.ImagePositionPatient, float)
    step = (np.asarray(last.ImagePositionPatient, float) - origin) / max(count - 1, 1)
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = step, cosines[3:] * row_mm, cosines[:3] * column_mm, origin
    return affine


class CTVolumeOperator(DICOMSeriesToVolumeOperator):
    """The SDK's series-to-volume conversion, emitted as a CTVolume on port "volume"."""

    def setup(self, spec):
        spec.input(self.input_name_series)
        spec.output("volume")

    @timed_compute
    def compute(self, op_input, op_output, context):
        op_output.emit(self.volume(op_input.receive(self.input_name_series)), "volume")

    def volume(self, study_selected_series_list) -> CTVolume:
        """The CTVolume of the first selected series."""
        series = study_selected_series_list[0].selected_series[0].series
        first = series.get_sop_instances()[0].get_native_sop_instance()
        check_memory(len(series.get_sop_instances()), int(first.Rows), int(first.Columns), available_memory())
        try:
            image = self.convert_to_image(study_selected_series_list)
        except Exception as error:  # noqa: BLE001 (any failure to decode or rescale this series' pixel data)
            raise StudyError(f"pixel data of {_describe(series)} cannot be read: {error.__cause__ or error}") from error
        datasets = [sop.get_native_sop_instance() for sop in series.get_sop_instances()]  # sorted by the SDK
        normal = _slice_normal(datasets[0])
        positions = [float(np.dot(normal, np.asarray(d.ImagePositionPatient, float))) for d in datasets]
        row_mm, column_mm = (float(v) for v in datasets[0].PixelSpacing)
        volume = CTVolume(
            hu=np.asarray(image.asnumpy(), dtype=np.float32),
            spacing=(float(np.median(np.diff(positions))), row_mm, column_mm),
            affine=_affine_zyx(datasets[0], datasets[-1], len(datasets)),
            source_datasets=datasets,
            series_uid=str(datasets[0].SeriesInstanceUID),
        )
        for dataset in datasets:  # the volume holds the pixels now: the headers alone go on
            del dataset.PixelData
        return_freed_memory()
        log.info("volume %s, spacing %s mm", volume.hu.shape, tuple(round(s, 3) for s in volume.spacing))
        return volume


def memory_needed(slices: int, rows: int, columns: int) -> int:
    """Bytes the analysis of a series of this size needs at its peak (the MEMORY_ constants)."""
    return int(MEMORY_BASE_BYTES + MEMORY_BYTES_PER_VOXEL * slices * rows * columns)


def available_memory() -> int:
    """Bytes this process may use: the least of the container's memory limit (cgroup v2 or v1) and what the
    system has available now."""
    with open("/proc/meminfo") as meminfo:
        limits = [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    for path in CGROUP_MEMORY_LIMITS:
        with contextlib.suppress(OSError, ValueError):
            limits.append(int(Path(path).read_text()))  # "max" (no limit) is no number
    return min(limits)


def check_memory(slices: int, rows: int, columns: int, available: int) -> None:
    """StudyError when a series of this size would not fit into `available` bytes."""
    needed = memory_needed(slices, rows, columns)
    if needed > available:
        raise StudyError(f"the series is too large for the memory available: {slices} slices of {rows} x {columns} "
                         f"need about {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB are available "
                         f"(the container's memory limit, or the system's free memory)")


def read_study(input_folder: Path) -> CTVolume:
    """The app's input stage as a plain function: load the folder, choose the series, read its volume.
    Raises StudyError with the app's one-line reason when the study cannot be analysed."""
    fragment = Fragment()
    studies = RobustDICOMDataLoaderOperator(fragment).load_data_to_studies(Path(input_folder))
    selector = ChestCTSeriesSelectorOperator(fragment)
    return CTVolumeOperator(fragment).volume(selector.filter(selector.config, studies))
