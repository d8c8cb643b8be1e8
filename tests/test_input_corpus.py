"""The project's corpus of unusual and malformed input.

Each variant writes a small study into a folder and states what the app's input stage
(`operators.series_selection.read_study`: loader, series choice, volume; its StudyError is the app's exit
status 2 and one-line message) does with it: ANALYSE (a volume with the expected HU on the source grid)
or refuse with the given phrase in its one-line message (none is left undecided). Variants marked WRITERS
also go through the SEG, SR and PDF writers: each output passes dciodvfy, the SEG reads back exactly on the
source slices (highdicom and dcmqi) and its frames lie on an untilted grid. The base study is a 12-slice
32 x 32 CT series, 3 mm apart, one lesion. The app-level variants (unwritable or full output folder, SIGTERM) are in tests/test_output_folder.py.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (HTJ2K, UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian,
                         JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, MPEG2MPML, RLELossless, generate_uid)

from operators.report_writer import PDF_DICOM_FILE, write_reports
from operators.seg_writer import LESIONS_FILE, SEG_FILE, write_lesion_outputs
from operators.series_selection import read_study
from operators.sr_report import SR_FILE
from operators.volume import StudyError
from tests.dicom_validation import assert_dciodvfy_clean
from tests.exit_status import assert_documented_refusal
from tests.test_seg_writer import SPHERE, Series, _check_seg, make_series

ANALYSE = "analyse"
STEP_MM = 3.0


def base_series(**kwargs) -> Series:
    return make_series([SPHERE], **{"shape": (12, 32, 32), "table_step_mm": STEP_MM, **kwargs})


def write_series(folder: Path, datasets, edit: Callable[[Dataset], None] | None = None, prefix: str = "s",
                 **save) -> list[Path]:
    """Each dataset (a copy, edited) as a DICOM file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, source in enumerate(datasets):
        ds = copy.deepcopy(source)
        if edit is not None:
            edit(ds)
        paths.append(folder / f"{prefix}{index:03d}.dcm")
        ds.save_as(paths[-1], **({"enforce_file_format": True} | save))
    return paths


@dataclass(frozen=True)
class Variant:
    build: Callable[[Path, Series], object]  # writes the study; returns the expected HU (an array) if not the series'
    outcome: str = ANALYSE  # ANALYSE or a phrase of the refusal
    tolerance_hu: float = 0.0  # lossy compression
    writers: bool = False
    series: dict | None = None  # make_series arguments over the base study's


def plain(folder, series):
    write_series(folder, series.datasets)


def edited(edit: Callable[[Dataset], None]):
    return lambda folder, series: write_series(folder, series.datasets, edit)


def setting(**values):
    def edit(ds):
        for keyword, value in values.items():
            if value is DELETE:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
    return edited(edit)


DELETE = object()


# Transfer syntaxes -------------------------------------------------------------------------------------------

def encoded(syntax: UID, **options):
    def edit(ds):
        ds.compress(syntax, generate_instance_uid=False, **options)
    return edited(edit)


def relabelled(encoded_as: UID, syntax: UID):
    """Encoded in one syntax, declared as another that carries the same codestream."""
    def edit(ds):
        ds.compress(encoded_as, generate_instance_uid=False)
        ds.file_meta.TransferSyntaxUID = syntax
    return edited(edit)


def native(syntax: UID):
    def edit(ds):
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax == ExplicitVRBigEndian:  # pydicom writes pixel bytes as they are
            ds.PixelData = np.frombuffer(ds.PixelData, "<i2").astype(">i2").tobytes()
    return edited(edit)


def eight_bit(signed: bool, jpeg: UID | None = None):
    """Stored in 8 bits with a rescale slope of 8 HU; JPEG (Pillow, 8-bit) when `jpeg` names its syntax."""
    def build(folder, series):
        stored = np.round(series.hu / 8) if signed else np.round((series.hu + 1024) / 8)
        stored = stored.astype(np.int8 if signed else np.uint8)

        def edit(ds):
            k = next(i for i, d in enumerate(series.datasets) if d.SOPInstanceUID == ds.SOPInstanceUID)
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, int(signed)
            ds.RescaleSlope, ds.RescaleIntercept = 8, 0 if signed else -1024
            ds.PixelData = stored[k].tobytes()
            if jpeg is not None:
                buffer = io.BytesIO()
                Image.fromarray(stored[k]).save(buffer, format="JPEG", quality=100)
                ds.PixelData = encapsulate([buffer.getvalue()])
                ds.file_meta.TransferSyntaxUID = jpeg
                ds["PixelData"].VR = "OB"
                ds.LossyImageCompression = "01"
        write_series(folder, series.datasets, edit)
        return stored.astype(np.float32) * 8 + (0 if signed else -1024)
    return build


def jpeg_lossless(image: np.ndarray) -> bytes:
    """A minimal JPEG lossless codestream (process 14, selection value 1: the left neighbour predicts) of 16-bit
    unsigned samples; every difference category has a 5-bit Huffman code (pydicom has no such encoder)."""
    x = image.astype(np.int64)
    prediction = np.empty_like(x)
    prediction[0, 0] = 1 << 15
    prediction[0, 1:], prediction[1:, 0], prediction[1:, 1:] = x[0, :-1], x[:-1, 0], x[1:, :-1]
    difference = (x - prediction + 32768) % 65536 - 32768
    bits = []
    for d in difference.ravel().tolist():
        category = 16 if d == -32768 else abs(d).bit_length()
        bits.append(f"{category:05b}")
        if 0 < category < 16:
            bits.append(f"{d if d > 0 else d + (1 << category) - 1:0{category}b}")
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    data = bytes(int(stream[i:i + 8], 2) for i in range(0, len(stream), 8)).replace(b"\xff", b"\xff\x00")
    rows, columns = image.shape
    frame = b"\xff\xc3\x00\x0b\x10" + rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    table = b"\xff\xc4\x00\x24\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    scan = b"\xff\xda\x00\x08\x01\x01\x00\x01\x00\x00"
    return b"\xff\xd8" + frame + table + scan + data + b"\xff\xd9"


def lossless_jpeg(syntax: UID):
    def edit(ds):
        ds.PixelData = encapsulate([jpeg_lossless(ds.pixel_array)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax
    return edited(edit)


def undecodable(folder, series):
    def edit(ds):
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(64)])  # an MPEG-2 sequence header, no decoder here
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
    write_series(folder, series.datasets, edit)


# Stored values -----------------------------------------------------------------------------------------------

def twelve_bit(signed: bool, high_bits: int = 0):
    """BitsStored 12; `high_bits` set above bit 11 (e.g. an old overlay) in unsigned data."""
    def build(folder, series):
        stored = series.hu.astype(np.int16) if signed else (series.hu + 1024).astype(np.uint16) | high_bits

        def edit(ds):
            k = next(i for i, d in enumerate(series.datasets) if d.SOPInstanceUID == ds.SOPInstanceUID)
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
            ds.RescaleIntercept = 0 if signed else -1024
            ds.PixelData = stored[k].tobytes()
        write_series(folder, series.datasets, edit)
    return build


def padded(folder, series):
    """PixelPaddingValue -2000 outside a circular field of view."""
    yy, xx = np.mgrid[:32, :32]
    outside = np.hypot(yy - 15.5, xx - 15.5) > 15

    def edit(ds):
        ds.PixelPaddingValue = -2000
        pixels = ds.pixel_array.copy()
        pixels[outside] = -2000
        ds.PixelData = pixels.tobytes()
    write_series(folder, series.datasets, edit)
    return np.where(outside, -2000.0, series.hu).astype(np.float32)


def half_slope(folder, series):
    def edit(ds):
        ds.RescaleSlope = 0.5
        ds.PixelData = (ds.pixel_array * 2).astype(np.int16).tobytes()
    write_series(folder, series.datasets, edit)


def raw_value(tag: int, vr: str, value: bytes):
    """An element as a file would carry it, unchecked (pydicom keeps odd numbers as text)."""
    def edit(ds):
        ds[tag] = pydicom.dataelem.RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, False, True)
    return edited(edit)


# Files and folders -------------------------------------------------------------------------------------------

def truncated_copy(folder, series):
    """A partial transfer: a cut copy of slice 5, read before the complete one."""
    paths = write_series(folder, series.datasets)
    data = paths[5].read_bytes()
    (folder / "a_partial.dcm").write_bytes(data[: len(data) * 2 // 3])


def truncated_compressed_copy(folder, series):
    paths = write_series(folder, series.datasets, lambda ds: ds.compress(JPEGLSLossless, generate_instance_uid=False))
    data = paths[5].read_bytes()
    (folder / "a_partial.dcm").write_bytes(data[:-20])


def truncated_only(folder, series):
    paths = write_series(folder, series.datasets)
    paths[5].write_bytes(paths[5].read_bytes()[:-100])


def without_preamble(folder, series):
    write_series(folder, series.datasets, enforce_file_format=False, write_like_original=True)
    for path in folder.iterdir():  # pydicom keeps the preamble of a dataset read from a file: cut it off
        data = path.read_bytes()
        if data[128:132] == b"DICM":
            path.write_bytes(data[132:])


def with_dicomdir(folder, series):
    paths = write_series(folder / "DATA", series.datasets)
    fileset = pydicom.fileset.FileSet()
    for path in paths:
        fileset.add(pydicom.dcmread(path))
    fileset.write(folder / "media")


def duplicate_uid(different: bool):
    def build(folder, series):
        paths = write_series(folder, series.datasets)
        ds = pydicom.dcmread(paths[4])
        if different:
            ds.PixelData = (ds.pixel_array + 100).astype(np.int16).tobytes()
        ds.save_as(folder / "copy.dcm", enforce_file_format=True)
    return build


def same_position_other_uid(folder, series):
    paths = write_series(folder, series.datasets)
    ds = pydicom.dcmread(paths[4])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(folder / "z_second_acquisition.dcm", enforce_file_format=True)


def also(extra: Callable[[Path, Series], None], main=plain):
    """The base study and another one beside it."""
    def build(folder, series):
        main(folder / "ct", series)
        extra(folder / "other", series)
    return build


def mr_series(folder, series):
    write_series(folder, make_series([], shape=(12, 32, 32), table_step_mm=STEP_MM).datasets,
                 lambda ds: setattr(ds, "Modality", "MR"))


def thicker_series_same_study(folder, series):
    def edit(ds):
        ds.SeriesInstanceUID, ds.SeriesNumber = SECOND_SERIES, 9
    other = make_series([], shape=(8, 32, 32), table_step_mm=5.0)
    for ds in other.datasets:
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = series.datasets[0].StudyInstanceUID, "1.2.3.4"
    write_series(folder, other.datasets, edit)


SECOND_SERIES = generate_uid()


def other_study(folder, series):
    write_series(folder, make_series([], shape=(12, 32, 32), table_step_mm=4.0).datasets)


def localizer(folder, series):
    def edit(ds):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.SeriesInstanceUID = SECOND_SERIES
    write_series(folder, series.datasets[:1], edit)


def short_ct(folder, series):
    write_series(folder, make_series([], shape=(5, 32, 32), table_step_mm=1.0).datasets)


def previous_outputs(folder, series):
    """An earlier run's SEG and SR among the input."""
    folder.mkdir(parents=True)
    document = write_lesion_outputs(series.datasets, series.labels, [0.9], series.hu, series.spacing, folder)
    write_reports(series.datasets, series.hu, series.labels, document, folder, pdf=False, png=False)
    (folder / LESIONS_FILE).unlink()


def linked_files(folder, series):
    write_series(folder.parent / "store", series.datasets)
    folder.mkdir()
    for path in sorted((folder.parent / "store").iterdir()):
        (folder / path.name).symlink_to(path)


def dangling_and_loop(folder, series):
    write_series(folder, series.datasets)
    (folder / "gone.dcm").symlink_to(folder / "nowhere.dcm")
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    os.mkfifo(folder / "pipe.dcm")


def unreadable_copy(folder, series):
    paths = write_series(folder, series.datasets)
    copy_path = folder / "a_copy.dcm"
    copy_path.write_bytes(paths[3].read_bytes())
    copy_path.chmod(0)  # root reads it anyway; others skip it with a warning


def many_files(folder, series):
    """10,000 files: the series and 9,988 others (notes, thumbnails) in 100 folders."""
    write_series(folder / "ct", series.datasets)
    for index in range(10_000 - len(series.datasets)):
        sub = folder / f"misc{index % 100:03d}"
        sub.mkdir(exist_ok=True)
        (sub / f"note{index}.txt").write_bytes(b"not DICOM %d\n" % index)


def enhanced_ct(folder, series):
    """All slices as one multi-frame Enhanced CT Image (headers reduced to what the loader reads)."""
    first = series.datasets[0]
    ds = copy.deepcopy(first)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.NumberOfFrames = len(series.datasets)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        delattr(ds, keyword)
    ds.PixelData = b"".join(d.PixelData for d in series.datasets)
    folder.mkdir()
    ds.save_as(folder / "enhanced.dcm", enforce_file_format=True)


# Orientations ------------------------------------------------------------------------------------------------

def rotated(degrees: float):
    """Image plane turned about the patient axis (degrees) given in the variant's name, stacked along its normal."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {"z": ((c, s, 0), (-s, c, 0)), "x": ((1, 0, 0), (0, c, s)), "y": ((c, 0, -s), (0, 1, 0))}


ORIENTATIONS = {
    "flipped columns (row direction -x)": ((-1, 0, 0), (0, 1, 0)),
    "flipped rows (column direction -y)": ((1, 0, 0), (0, -1, 0)),
    "flipped rows and columns": ((-1, 0, 0), (0, -1, 0)),
    "oblique: in-plane rotation 30 degrees": rotated(30)["z"],
    "oblique: plane turned 20 degrees about x, stacked along its normal": rotated(20)["x"],
    "oblique: plane turned 15 degrees about y, stacked along its normal": rotated(15)["y"],
}

NAMES = {
    "Latin-1 name (ISO_IR 100)": ("ISO_IR 100", "Müller^Jürgen"),
    "UTF-8 names (ISO_IR 192)": ("ISO_IR 192", "Łukasz^Żółć=张^伟"),
    "Japanese name (ISO 2022 IR 13 / IR 87)": (["ISO 2022 IR 13", "ISO 2022 IR 87"],
                                               "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"),
    "Cyrillic name (ISO_IR 144)": ("ISO_IR 144", "Иванов^Иван"),
}


def named(charset, name):
    def edit(ds):
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.StudyDescription = name.split("^")[0]
    return edited(edit)


def undeclared_latin1(folder, series):
    """Latin-1 bytes in the name without a SpecificCharacterSet."""
    write_series(folder, series.datasets)
    for path in folder.iterdir():
        data = path.read_bytes()
        path.write_bytes(data.replace(b"Test^Lesion", b"T\xe9st^L\xe9sion"))


VARIANTS: dict[str, Variant] = {
    "plain series": Variant(plain, writers=True),
    # transfer syntaxes: every one pydicom can encode here, JPEG baseline through Pillow, JPEG lossless through
    # jpeg_lossless, and one without a decoder
    "Implicit VR Little Endian": Variant(native(ImplicitVRLittleEndian)),
    "Explicit VR Big Endian (retired)": Variant(native(ExplicitVRBigEndian)),
    "Deflated Explicit VR Little Endian": Variant(native(DeflatedExplicitVRLittleEndian)),
    "RLE Lossless": Variant(encoded(RLELossless)),
    "JPEG-LS Lossless": Variant(encoded(JPEGLSLossless), writers=True),
    "JPEG-LS near-lossless (error 2)": Variant(encoded(JPEGLSNearLossless, jls_error=2), tolerance_hu=2),
    "JPEG 2000 Lossless": Variant(encoded(JPEG2000Lossless)),
    "JPEG 2000 lossy (ratio 5)": Variant(encoded(JPEG2000, j2k_cr=[5]), tolerance_hu=200),
    "HTJ2K carrying a JPEG 2000 Part 1 codestream (no HT encoder here)": Variant(relabelled(JPEG2000Lossless, HTJ2K)),
    "JPEG Baseline 8-bit (Pillow)": Variant(eight_bit(False, JPEGBaseline8Bit), tolerance_hu=64, writers=True),
    "JPEG Extended, 8-bit data (Pillow)": Variant(eight_bit(False, JPEGExtended12Bit), tolerance_hu=64),
    "JPEG Lossless, first-order prediction (SV1)": Variant(lossless_jpeg(JPEGLosslessSV1), series={"signed": False}),
    "JPEG Lossless (process 14)": Variant(lossless_jpeg(JPEGLossless), series={"signed": False}),
    "MPEG-2 video: no decoder here": Variant(undecodable, "transfer syntax that cannot be decoded here"),
    # stored values
    "8-bit unsigned, slope 8": Variant(eight_bit(False)),
    "8-bit signed, slope 8": Variant(eight_bit(True)),
    "12-bit unsigned": Variant(twelve_bit(False)),
    "12-bit signed": Variant(twelve_bit(True)),
    "12-bit unsigned, garbage above bit 11": Variant(twelve_bit(False, high_bits=0x8000)),
    "16-bit unsigned": Variant(plain, series={"signed": False}),
    "16-bit signed": Variant(plain),
    "PixelPaddingValue outside the field of view": Variant(padded),
    "RescaleSlope 0.5": Variant(half_slope),
    "RescaleType HU": Variant(setting(RescaleType="HU")),
    "RescaleType US": Variant(setting(RescaleType="US")),
    "RescaleType empty": Variant(setting(RescaleType="")),
    # slice thickness and spacing
    "no SliceThickness": Variant(setting(SliceThickness=DELETE), writers=True),
    "empty SliceThickness": Variant(setting(SliceThickness=None), writers=True),
    "odd SliceThickness": Variant(raw_value(0x00180050, "DS", b"thin"), writers=True),
    "empty SpacingBetweenSlices": Variant(setting(SpacingBetweenSlices=None), writers=True),
    "odd SpacingBetweenSlices": Variant(raw_value(0x00180088, "DS", b"n/a "), writers=True),
    "SpacingBetweenSlices contradicting the positions": Variant(setting(SpacingBetweenSlices=7.5), writers=True),
    "negative SpacingBetweenSlices": Variant(setting(SpacingBetweenSlices=-3.0), writers=True),
    # orientations
    **{name: Variant(plain, writers=True, series={"orientation": o}) for name, o in ORIENTATIONS.items()},
    "feet-first order in the files": Variant(lambda f, s: write_series(f, s.datasets[::-1]), writers=True),
    "sagittal": Variant(plain, "not axial", series={"orientation": ((0, 1, 0), (0, 0, -1))}),
    "coronal": Variant(plain, "not axial", series={"orientation": ((1, 0, 0), (0, 0, -1))}),
    "gantry tilt 10 degrees": Variant(plain, "gantry tilt of 10.0 degrees", series={"tilt_deg": 10.0}),
    "multi-frame Enhanced CT": Variant(enhanced_ct, "multi-frame images"),
    # files and folders
    "truncated copy of a slice beside the complete one": Variant(truncated_copy),
    "truncated JPEG-LS copy beside the complete one": Variant(truncated_compressed_copy),
    "truncated slice, no complete copy": Variant(truncated_only, "missing slices"),
    "files without the preamble (not read)": Variant(without_preamble, "no DICOM files"),
    "a DICOMDIR with its file set": Variant(with_dicomdir),
    "identical copy of a slice": Variant(duplicate_uid(different=False)),
    "one SOP Instance UID, different pixels": Variant(duplicate_uid(different=True),
                                                      "two files with different images have one SOP Instance UID"),
    "two slices at one position (SDK keeps the first)": Variant(same_position_other_uid),
    "CT and MR series": Variant(also(mr_series)),
    "thinner and thicker CT series of one study": Variant(also(thicker_series_same_study)),
    "two studies (the thinner slices win)": Variant(also(other_study)),
    "a localizer beside the series": Variant(also(localizer)),
    "a 5-slice CT series beside the series": Variant(also(short_ct)),
    "an earlier run's SEG and SR in the input": Variant(also(previous_outputs)),
    "symbolic links to the slices": Variant(linked_files),
    "dangling link, link loop, named pipe": Variant(dangling_and_loop),
    "an unreadable copy of a slice": Variant(unreadable_copy),
    "10,000 files": Variant(many_files),
    # header values
    "huge ImageComments (1 MB) and PatientComments (100 kB)": Variant(
        setting(ImageComments="x" * 1_000_000, PatientComments="y" * 100_000), writers=True),
    "empty PatientName, PatientID, StudyDate, AccessionNumber": Variant(
        setting(PatientName="", PatientID="", StudyDate="", AccessionNumber=""), writers=True),
    "empty SeriesNumber and Modality": Variant(setting(SeriesNumber=None, Modality=""), "not a CT image series"),
    "empty ImagePositionPatient": Variant(setting(ImagePositionPatient=None), "slices without ImagePositionPatient"),
    "empty StudyInstanceUID (the SDK drops such files)": Variant(setting(StudyInstanceUID=""), "no DICOM files"),
    "identity removed, no method named": Variant(setting(PatientIdentityRemoved="YES"), writers=True),
    **{name: Variant(named(*value), writers=True) for name, value in NAMES.items()},
    "Latin-1 bytes without SpecificCharacterSet": Variant(undeclared_latin1, writers=True),
    "unknown SpecificCharacterSet": Variant(raw_value(0x00080005, "CS", b"ISO_IR 999"), writers=True),
}


def _run_writers(volume, series: Series, out: Path) -> None:
    order = {ds.SOPInstanceUID: k for k, ds in enumerate(series.datasets)}
    perm = [order[ds.SOPInstanceUID] for ds in volume.source_datasets]
    labels = series.labels[perm]
    document = write_lesion_outputs(volume.source_datasets, labels, [0.9], volume.hu, volume.spacing, out)
    write_reports(volume.source_datasets, volume.hu, labels, document, out, png=False)
    _check_seg(out / SEG_FILE, volume.source_datasets, labels, json.loads((out / LESIONS_FILE).read_text()))
    for name in (SR_FILE, PDF_DICOM_FILE):
        assert_dciodvfy_clean(out / name)


@pytest.mark.parametrize("name", VARIANTS)
def test_corpus_variant(name, tmp_path, caplog):
    variant = VARIANTS[name]
    series = base_series(**(variant.series or {}))
    expected_hu = variant.build(tmp_path / "input", series)
    caplog.set_level(logging.INFO)
    start = time.perf_counter()
    try:
        volume = read_study(tmp_path / "input")
    except StudyError as error:
        message = str(error)
        assert variant.outcome != ANALYSE, f"refused: {message}"
        assert "\n" not in message and variant.outcome in message
        assert_documented_refusal(message)
        return
    finally:
        assert time.perf_counter() - start < 60
    assert variant.outcome == ANALYSE, f"analysed, but expected a refusal with {variant.outcome!r}"
    ascending = sorted(series.datasets, key=lambda ds: float(np.dot(ds.ImagePositionPatient, _normal(ds))))
    assert [ds.SOPInstanceUID for ds in volume.source_datasets] == [ds.SOPInstanceUID for ds in ascending]
    order = {ds.SOPInstanceUID: k for k, ds in enumerate(series.datasets)}
    expected = expected_hu if isinstance(expected_hu, np.ndarray) else series.hu
    expected = expected[[order[ds.SOPInstanceUID] for ds in ascending]]
    assert np.abs(volume.hu - expected).max() <= variant.tolerance_hu
    assert volume.spacing[0] == pytest.approx(STEP_MM)
    if variant.writers:
        _run_writers(volume, series, tmp_path / "out")
    assert "Müller" not in caplog.text and "山田" not in caplog.text and "Test^Lesion" not in caplog.text
    if "truncated" in name and "copy" in name:
        assert "skipped a_partial.dcm: truncated" in caplog.text


def _normal(ds) -> np.ndarray:
    cosines = np.asarray(ds.ImageOrientationPatient, float)
    return np.cross(cosines[:3], cosines[3:])


def test_corpus_size():
    assert len(VARIANTS) >= 60
