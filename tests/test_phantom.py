"""Phantom generator invariants: anatomy present, labels where lesions belong, determinism, I/O."""

import numpy as np
import pydicom
import pytest

from training.nifti import read_nifti
from training.phantom import Scanner, generate_phantom
from training.phantom_io import write_dicom_series, write_phantom_nifti

SMALL = Scanner(pixel_mm=0.8, slice_mm=2.5, rows=512, kernel="STANDARD", noise_sd=20.0,
                contrast=True, signed_storage=False, circular_fov=True)


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(11, lesion_count=6, scanner=SMALL)


def test_anatomy_present(phantom):
    hu = phantom.hu
    lungs = phantom.lungs
    assert 0.05 < lungs.mean() < 0.5, "lungs fill a plausible share of the field of view"
    assert np.median(hu[lungs]) < -700, "lung parenchyma is air-filled"
    assert (hu > 400).sum() > 10_000, "bone (spine, ribs) is present"
    body = hu > -300
    assert body.mean() > 0.2, "body soft tissue is present"
    z_mid = hu.shape[0] // 2
    row = hu[z_mid, :, hu.shape[2] // 2]
    assert (row > -500).any() and (row < -900).any()
    # Vessels inside the lungs: dense voxels surrounded by parenchyma.
    assert ((hu > -300) & lungs).sum() > 2_000


def test_lesion_labels_inside_thorax(phantom):
    label = phantom.label
    assert label.shape == phantom.hu.shape
    ids = set(np.unique(label)) - {0}
    assert 1 <= len(ids) <= 6
    assert len(phantom.lesions) == len(ids)
    # Each lesion sits mostly in lung or in the mediastinum (never outside the body).
    body = phantom.hu > -500
    for i in ids:
        lesion = label == i
        assert (phantom.lungs[lesion].mean() > 0.3) or (body[lesion].mean() > 0.9)
    assert np.median(phantom.hu[label > 0]) > -500, "lesions are denser than lung"


def test_deterministic_by_seed():
    a = generate_phantom(3, lesion_count=2, scanner=SMALL, slices=24)
    b = generate_phantom(3, lesion_count=2, scanner=SMALL, slices=24)
    c = generate_phantom(4, lesion_count=2, scanner=SMALL, slices=24)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.label, b.label)
    assert not np.array_equal(a.hu, c.hu)


def test_named_kinds_and_largest_size():
    phantom = generate_phantom(6, lesion_count=3, scanner=SMALL, slices=64, kinds=["mass"], max_lesion_mm=100)
    assert phantom.lesions and {lesion["kind"] for lesion in phantom.lesions} == {"mass"}
    assert all(30 <= lesion["diameter_mm"] <= 100 for lesion in phantom.lesions)


@pytest.mark.parametrize("signed", [True, False])
def test_dicom_and_nifti_round_trip(tmp_path, signed):
    scanner = Scanner(**{**vars(SMALL), "signed_storage": signed})
    phantom = generate_phantom(5, lesion_count=1, scanner=scanner, slices=12)
    write_dicom_series(phantom, tmp_path / "dicom")
    files = sorted((tmp_path / "dicom").iterdir())
    assert len(files) == phantom.hu.shape[0]
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert (slices[0].PixelRepresentation == 1) == signed
    assert float(slices[0].RescaleIntercept) == (0.0 if signed else -1024.0)
    hu = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])
    expected = phantom.hu if signed else np.maximum(phantom.hu, -1024)
    assert np.array_equal(hu, expected)
    write_phantom_nifti(phantom, tmp_path / "image.nii.gz", tmp_path / "label.nii.gz")
    image, spacing = read_nifti(tmp_path / "image.nii.gz")
    label, _ = read_nifti(tmp_path / "label.nii.gz")
    assert np.array_equal(image, phantom.hu) and np.array_equal(label, phantom.label)
    assert np.allclose(spacing, phantom.spacing)
