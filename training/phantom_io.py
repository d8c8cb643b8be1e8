"""Writing phantoms as a DICOM CT series (what the app reads) and NIfTI (what training reads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from training.nifti import write_nifti


def _uid(seed: int, *parts) -> str:
    """A UID that depends only on the phantom's seed and the parts given."""
    return generate_uid(entropy_srcs=["lung-lesion-phantom", str(seed), *map(str, parts)])


def write_dicom_series(phantom, folder: Path) -> list[Path]:
    """Write one CT Image Storage file per slice, head first in file order like most archives.

    The stored values follow the phantom's convention: signed with intercept 0, or unsigned
    with intercept -1024.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    scanner = phantom.scanner
    nz = phantom.hu.shape[0]
    study, series, frame = (_uid(phantom.seed, kind) for kind in ("study", "series", "frame"))
    if scanner.signed_storage:
        stored, intercept, representation = phantom.hu, 0.0, 1
    else:
        stored, intercept, representation = (phantom.hu.astype(np.int32) + 1024).clip(0, 4095).astype(np.uint16), -1024.0, 0
    x0, y0, z0 = phantom.origin
    paths = []
    for k in range(nz):
        sop = _uid(phantom.seed, "sop", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = f"Phantom^{phantom.seed}", f"PHANTOM{phantom.seed:05d}"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.Manufacturer = "CT", "Synthetic phantom"
        ds.SeriesNumber, ds.InstanceNumber = 2, nz - k
        ds.SeriesDescription = f"Chest {'contrast' if scanner.contrast else 'non-contrast'} {scanner.slice_mm:g} mm {scanner.kernel}"
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ConvolutionKernel = scanner.kernel
        ds.KVP, ds.SliceThickness, ds.SpacingBetweenSlices = 120, scanner.slice_mm, scanner.slice_mm
        ds.PatientPosition = "FFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z0 + k * scanner.slice_mm, 4)]
        ds.SliceLocation = round(z0 + k * scanner.slice_mm, 4)
        ds.PixelSpacing = [round(scanner.pixel_mm, 6)] * 2
        ds.Rows, ds.Columns = phantom.hu.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, representation
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = tmp / f"slice_{nz - 1 - k:04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(folder / path.name)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return paths


def write_phantom_nifti(phantom, image_path: Path, label_path: Path) -> None:
    write_nifti(image_path, phantom.hu, phantom.spacing, phantom.origin)
    write_nifti(label_path, phantom.label, phantom.spacing, phantom.origin)
