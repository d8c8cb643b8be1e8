"""NIfTI reading and writing for arrays indexed [z, y, x] with (z, y, x) spacing in mm.

On disk the array is stored as (x, y, z) with an LPS->RAS affine, so viewers show it upright
and MONAI's LoadImage (which keeps the file's axis order) sees x, y, z.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def write_nifti(path: Path, array_zyx: np.ndarray, spacing_zyx, origin_lps=(0.0, 0.0, 0.0)) -> None:
    """Write an axial [z, y, x] array (rows run anterior->posterior, columns right->left) as NIfTI."""
    sz, sy, sx = (float(s) for s in spacing_zyx)
    affine = np.diag([-sx, -sy, sz, 1.0])  # x: R->L is -RAS x, y: A->P is -RAS y, z: up
    affine[:3, 3] = [-origin_lps[0], -origin_lps[1], origin_lps[2]]
    _save(path, array_zyx, affine)


def write_nifti_like(path: Path, array_zyx: np.ndarray, reference: Path) -> None:
    """Write `array_zyx` on the grid (affine) of the NIfTI file `reference`, e.g. labels for an image."""
    _save(path, array_zyx, nib.load(str(reference)).affine)


def _save(path: Path, array_zyx: np.ndarray, affine: np.ndarray) -> None:
    image = nib.Nifti1Image(np.ascontiguousarray(array_zyx.transpose(2, 1, 0)), affine)
    image.header.set_xyzt_units("mm")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.nii.gz")
    nib.save(image, tmp)
    tmp.replace(path)


def read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI written by write_nifti (or any axial one): ([z, y, x] array, (z, y, x) spacing)."""
    image = nib.load(str(path))
    spacing_xyz = image.header.get_zooms()[:3]
    array = np.asanyarray(image.dataobj).transpose(2, 1, 0)
    return array, (float(spacing_xyz[2]), float(spacing_xyz[1]), float(spacing_xyz[0]))
