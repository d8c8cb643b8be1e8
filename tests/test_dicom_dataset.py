"""A DICOM archive of CT + SEG becomes a training dataset whose labels are the SEG's segments."""

import json

import numpy as np
import pydicom

from operators.seg_writer import write_lesion_outputs
from training.dicom_dataset import build_dataset
from training.nifti import read_nifti
from training.phantom import Scanner, generate_phantom
from training.phantom_io import write_dicom_series

SCANNER = Scanner(pixel_mm=0.8, slice_mm=2.5, rows=512, kernel="STANDARD", noise_sd=20.0,
                  contrast=False, signed_storage=False, circular_fov=True)


def test_ct_with_seg_becomes_a_case(tmp_path):
    phantom = generate_phantom(21, lesion_count=3, scanner=SCANNER, slices=64)
    assert phantom.label.max() > 0
    files = write_dicom_series(phantom, tmp_path / "archive" / "ct")
    source = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    count = int(phantom.label.max())
    write_lesion_outputs(source, phantom.label, [0.9] * count, phantom.hu, phantom.spacing, tmp_path / "archive" / "seg")
    (tmp_path / "archive" / "notes.txt").write_text("not DICOM")

    spec = json.loads(build_dataset(tmp_path / "archive", tmp_path / "dataset").read_text())
    assert spec["numTraining"] == 1
    image, spacing = read_nifti(tmp_path / "dataset" / spec["training"][0]["image"])
    labels, _ = read_nifti(tmp_path / "dataset" / spec["training"][0]["label"])
    assert np.allclose(spacing, phantom.spacing)
    assert np.array_equal(image, np.maximum(phantom.hu, -1024))
    assert np.array_equal(labels > 0, phantom.label > 0)
