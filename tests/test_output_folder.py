"""All or nothing in the output folder (operators.output_folder, app/__main__.py): an analysed study's outputs
appear together; a refusal, an internal error, a full disk or SIGTERM leave the folder as it was."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from operators.output_folder import STAGING_PREFIX, discard, publish, stage
from tests.conftest import REPO, run_app
from tests.exit_status import assert_documented_status, status_table


def _one_line(result, status: int, prefix: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status and len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    assert_documented_status(status, lines[0])
    assert "Traceback" not in result.stderr


def test_readme_table_has_every_exit_status():
    assert set(status_table()) == {"0", "1", "2", str(128 + signal.SIGTERM), str(128 + signal.SIGINT)}


def test_publish_replaces_this_apps_outputs_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("seg.dcm", "report_lesion_3.png", "notes.txt"):
        (out / name).write_text("earlier run")
    staging, created = stage(out)
    assert not created and staging.parent == out and staging.name.startswith(STAGING_PREFIX)
    (staging / "lesions.json").write_text("{}")
    (staging / "report_lesion_1.png").write_text("new")

    assert publish(staging, out) == ["lesions.json", "report_lesion_1.png"]

    assert sorted(p.name for p in out.iterdir()) == ["lesions.json", "notes.txt", "report_lesion_1.png"]


def test_discard_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "out"
    staging, created = stage(out)
    (staging / "seg.dcm").write_text("half")
    discard(staging, out, created)
    assert created and not out.exists()


def test_output_folder_that_cannot_be_made(tmp_path, models_dir):
    (tmp_path / "file").write_text("")
    result = run_app(tmp_path, tmp_path / "file" / "out", models_dir)
    _one_line(result, 1, "cannot write the output folder ")


def _app(input_dir: Path, output: Path, models: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "app", "-i", str(input_dir), "-o", str(output), "-m", str(models)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_sigterm_mid_run_leaves_nothing(phantom_study, models_dir, tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    (output / "lesions.json").write_text("earlier run")
    process = _app(phantom_study[0], output, models_dir)
    time.sleep(8)  # loading or segmenting the 300-slice study
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    _one_line(subprocess.CompletedProcess([], process.returncode, "", stderr), 128 + signal.SIGTERM,
              "stopped by SIGTERM")
    assert [p.name for p in output.iterdir()] == ["lesions.json"]
    assert (output / "lesions.json").read_text() == "earlier run"


def test_full_disk_leaves_nothing(phantom_study, models_dir, tmp_path):
    """Files may not grow past 64 KiB (RLIMIT_FSIZE: writes fail with EFBIG like on a full disk): the SEG cannot be
    written, and nothing of the run reaches the output folder."""
    output = tmp_path / "output"
    limit = 64 * 1024
    process = _app(phantom_study[0], output, models_dir,
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    stdout, stderr = process.communicate(timeout=600)
    _one_line(subprocess.CompletedProcess([], process.returncode, stdout, stderr), 1, "internal error: ")
    assert "File too large" in stderr
    assert not output.exists()
