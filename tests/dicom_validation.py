"""DICOM validation with dciodvfy (dicom3tools) for tests of every DICOM output (SEG, SR, PDF).

`assert_dciodvfy_clean(path)` fails on any error, allows warnings, and skips the test with a clear
message where dciodvfy is not installed (`apt-get install dicom3tools`). `assert_dcmqi_reads_exactly`
reads a SEG back with dcmqi (as 3D Slicer does) and checks every voxel's patient position.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class DciodvfyReport:
    """dciodvfy's findings: errors (including aborts) and warnings, one message per line."""

    errors: list[str]
    warnings: list[str]


def run_dciodvfy(path: str | Path) -> DciodvfyReport:
    """Run dciodvfy on one file and sort the lines of its output by severity."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace",
                            timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith(("Error", "Abort"))]
    warnings = [line for line in lines if line.startswith("Warning")]
    if result.returncode != 0 and not errors:
        errors.append(f"dciodvfy exited with status {result.returncode}")
    return DciodvfyReport(errors, warnings)


def assert_dciodvfy_clean(path: str | Path) -> DciodvfyReport:
    """Fail when dciodvfy reports an error for `path`; return the report (warnings allowed)."""
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools): DICOM validation skipped")
    report = run_dciodvfy(path)
    assert not report.errors, f"dciodvfy errors for {path}:\n" + "\n".join(report.errors)
    return report


def assert_dcmqi_reads_exactly(seg_path: str | Path, datasets, labels) -> None:
    """dcmqi (3D Slicer's SEG converter, `segimage2itkimage`) reads the SEG, and every segment's voxels land on the
    patient positions of the source voxels it labels (`labels`: [z, y, x] on `datasets` in that order).
    Skips where dcmqi is not installed (pip install dcmqi)."""
    import tempfile

    import nibabel as nib
    import numpy as np

    converter = shutil.which("segimage2itkimage") or shutil.which(
        "segimage2itkimage", path=str(Path(sys.executable).parent))
    if converter is None:
        pytest.skip("dcmqi not installed (pip install dcmqi): SEG read-back with dcmqi skipped")
    with tempfile.TemporaryDirectory() as folder:
        result = subprocess.run([converter, "--inputDICOM", str(seg_path), "--outputDirectory", folder, "-t", "nii"],
                                capture_output=True, text=True, errors="replace", timeout=120)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        meta = json.loads((Path(folder) / "meta.json").read_text())
        numbers = [segment["labelID"] for group in meta["segmentAttributes"] for segment in group]
        for index, number in enumerate(numbers, 1):
            image = nib.load(Path(folder) / f"{index}.nii.gz")
            read = nib.affines.apply_affine(image.affine, np.argwhere(np.asarray(image.dataobj) > 0)) * [-1, -1, 1]
            expected = np.array([_voxel_lps(datasets[z], y, x) for z, y, x in np.argwhere(labels == number)])
            assert read.shape == expected.shape, f"segment {number}: dcmqi reads {len(read)} voxels, not " \
                                                 f"{len(expected)}"
            order = lambda points: points[np.lexsort(np.round(points, 2).T)]  # noqa: E731
            assert np.abs(order(read) - order(expected)).max() < 0.01, f"segment {number} misplaced by dcmqi"


def _voxel_lps(dataset, row: int, column: int):
    import numpy as np

    cosines = np.asarray(dataset.ImageOrientationPatient, float)
    dy, dx = (float(v) for v in dataset.PixelSpacing)
    return np.asarray(dataset.ImagePositionPatient, float) + column * dx * cosines[:3] + row * dy * cosines[3:]
