"""DICOM validation with dciodvfy (dicom3tools) for tests of every DICOM output (SEG, SR, PDF).

`assert_dciodvfy_clean(path)` fails on any error, allows warnings, and skips the test with a clear
message where dciodvfy is not installed (`apt-get install dicom3tools`).
"""

from __future__ import annotations

import shutil
import subprocess
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
