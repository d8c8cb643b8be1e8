"""The cohort command (deploy/cohort.py) on a real local Ray instance, with the quick stand-in network and small
generated studies (160 x 160 pixels of 2.2 mm, 40 slices of 5 mm): a study with lesions, one without, one that
cannot be analysed; a worker killed mid-run; a killed run resumed."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from deploy.cohort import STATUS_FILE, Study, find_studies, run_study, study_key
from tests.conftest import REPO, write_test_models

ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}


def _study(folder: Path, seed: int, lesions: int) -> None:
    """A small generated chest CT study as DICOM in `folder`; without lesions its lungs are plain air-filled
    parenchyma (no vessels, which the stand-in network would take for lesions)."""
    from training.phantom import Scanner, generate_phantom
    from training.phantom_io import write_dicom_series

    scanner = Scanner(pixel_mm=2.2, slice_mm=5.0, rows=160, kernel="STANDARD", noise_sd=15.0, contrast=False,
                      signed_storage=False, circular_fov=False)
    phantom = generate_phantom(seed, lesion_count=lesions, scanner=scanner, slices=40)
    if not lesions:
        phantom.hu[phantom.lungs] = -850
    write_dicom_series(phantom, folder)


@pytest.fixture(scope="module")
def cohort_input(tmp_path_factory) -> tuple[Path, Path]:
    """(a tree of three studies and a non-DICOM file, a models folder with the stand-in network)."""
    root = tmp_path_factory.mktemp("cohort")
    tree = root / "tree"
    _study(tree / "ward 1" / "Doe^Jane", 5, 2)
    _study(tree / "ward 1" / "lesion free", 7, 0)  # the stand-in network finds nothing the cascade keeps here
    (tree / "ward 2" / "broken").mkdir(parents=True)
    for path in sorted((tree / "ward 1" / "Doe^Jane").glob("*.dcm"))[:3]:  # 3 slices: too few
        (tree / "ward 2" / "broken" / path.name).write_bytes(path.read_bytes())
    (tree / "ward 2" / "notes.txt").write_text("not DICOM\n")
    return tree, write_test_models(root / "models")


def _command(source: Path, out: Path, models: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cohort", "--input", str(source), "--out", str(out), "-m", str(models),
            *options, "--", "--no-report"]


def _table(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _finished(out: Path) -> dict[str, float]:
    """{study folder name: modification time of its cohort.json}; every folder but the failed logs is complete."""
    folders = [path for path in out.iterdir() if path.is_dir() and path.name not in ("failed", ".work")]
    assert all((folder / STATUS_FILE).is_file() for folder in folders), "a partial study folder"
    return {folder.name: (folder / STATUS_FILE).stat().st_mtime for folder in folders}


def _killed_when(process: subprocess.Popen, found, victim) -> list[psutil.Process]:
    """Kill (SIGKILL) `victim(process)` as soon as `found()` holds: the command's processes (Ray's) just before.
    The command is killed on failure."""
    deadline = time.monotonic() + 120
    try:
        while not found():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        descendants = psutil.Process(process.pid).children(recursive=True)
        victim(process).send_signal(signal.SIGKILL)
        return descendants
    except BaseException:
        process.kill()
        process.communicate()
        raise


def test_find_studies(cohort_input, tmp_path):
    tree, _ = cohort_input
    studies = find_studies(tree)
    assert [study.folder for study in studies] == [tree / "ward 1" / "Doe^Jane", tree / "ward 1" / "lesion free",
                                                   tree / "ward 2" / "broken"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+-[0-9a-f]{8}", study.key) for study in studies)
    assert study_key("ward 1/Doe^Jane").startswith("ward_1_Doe_Jane-") and study_key("a/b") != study_key("a_b")
    listing = tmp_path / "studies.txt"
    listing.write_text(f"# studies\n{tree / 'ward 2' / 'broken'}\n\nrelative/study\n")
    assert [study.folder for study in find_studies(listing)] == [tree / "ward 2" / "broken",
                                                                tmp_path / "relative" / "study"]


def test_usage_errors(cohort_input, tmp_path):
    tree, models = cohort_input
    (tmp_path / "empty").mkdir()
    for source, out, message in ((tmp_path / "none", tmp_path / "out", "not found"),
                                 (tree, tree / "out", "inside --input"),
                                 (tmp_path / "empty", tmp_path / "out", "no study folders")):
        result = subprocess.run(_command(source, out, models), cwd=REPO, env=ENVIRONMENT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.splitlines()) == 1


def test_timeout_and_crash_leave_no_study_folder(cohort_input, tmp_path):
    tree, models = cohort_input
    study = Study("doe", tree / "ward 1" / "Doe^Jane")
    row = run_study(study, tmp_path, models, timeout=1)
    assert (row["status"], row["exit_status"], row["reason"]) == ("timeout", None, "no result in 1 s")
    broken_models = shutil.copytree(models, tmp_path / "broken models")
    (broken_models / "lesion_seg" / "model.ts").write_bytes(b"not a model")
    row = run_study(study, tmp_path, broken_models)
    assert row["status"] == "crashed" and row["exit_status"] == 1 and row["reason"].startswith("internal error")
    assert not (tmp_path / "doe").exists() and not list((tmp_path / ".work").iterdir())
    assert "internal error" in (tmp_path / "failed" / "doe.log").read_text()


def test_cohort_table_and_second_run(cohort_input, tmp_path):
    tree, models = cohort_input
    out = tmp_path / "out"
    result = subprocess.run(_command(tree, out, models, "--workers", "2"), cwd=REPO, env=ENVIRONMENT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr  # one study cannot be analysed
    assert "3/3 done 2 refused 1 failed 0" in result.stderr
    assert "cohort: 3 studies: 2 done, 1 refused, 0 failed" in result.stdout
    studies, lesions = _table(out / "studies.csv"), _table(out / "lesions.csv")
    keys = {study.folder.name: study.key for study in find_studies(tree)}
    assert {row["key"]: row["status"] for row in studies} == {
        keys["Doe^Jane"]: "done", keys["lesion free"]: "done", keys["broken"]: "refused"}
    broken = next(row for row in studies if row["status"] == "refused")
    assert broken["exit_status"] == "2" and broken["reason"].startswith("cannot analyse this study: no usable axial")
    assert sorted(path.name for path in (out / broken["key"]).iterdir()) == ["app.log", STATUS_FILE]
    for row in studies[:2]:
        document = json.loads((out / row["key"] / "lesions.json").read_text())
        assert int(row["lesion_count"]) == len(document["lesions"]) == document["burden"]["lesion_count"]
        assert float(row["total_volume_ml"]) == document["burden"]["total_volume_ml"]
        assert float(row["recist_sum_mm"]) == document["burden"]["recist_sum_mm"]
        assert [(int(lesion["segment_number"]), float(lesion["volume_ml"]), float(lesion["long_axis_mm"]))
                for lesion in lesions if lesion["key"] == row["key"]] == [
            (lesion["segment_number"], lesion["volume_ml"], lesion["long_axis_mm"]) for lesion in document["lesions"]]
    assert int(studies[0]["lesion_count"]) > 0 and studies[1]["lesion_count"] == "0"
    assert not (out / keys["lesion free"] / "seg.dcm").exists() and not (out / ".work").exists()
    finished = _finished(out)

    again = subprocess.run(_command(tree, out, models), cwd=REPO, env=ENVIRONMENT, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 2 and "finished before: 3, to analyse: 0" in again.stdout
    assert _finished(out) == finished and _table(out / "studies.csv") == studies


def test_worker_killed_mid_run(cohort_input, tmp_path):
    """The Ray worker running the study is killed while the app runs: the study is tried again and finishes."""
    tree, models = cohort_input
    listing = tmp_path / "studies.txt"
    listing.write_text(f"{tree / 'ward 1' / 'lesion free'}\n")
    process = subprocess.Popen(_command(listing, tmp_path / "out", models), cwd=REPO, env=ENVIRONMENT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    apps = []

    def app_running():
        apps[:] = [child for child in psutil.Process(process.pid).children(recursive=True)
                   if str(REPO / "app") in child.cmdline()]
        return apps

    _killed_when(process, app_running, lambda _: apps[0].parent())
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "crashed (worker lost: WorkerCrashedError" in stdout and "retried" in stdout
    [row] = _table(tmp_path / "out" / "studies.csv")
    assert (row["status"], row["attempts"]) == ("done", "2")
    assert not apps[0].is_running()  # the killed worker's app went with it


def test_killed_run_resumes(cohort_input, tmp_path):
    """The command is killed after its first study: the next run does the others, none twice, and no study
    folder is ever partial."""
    tree, models = cohort_input
    out = tmp_path / "out"
    process = subprocess.Popen(_command(tree, out, models, "--workers", "1"), cwd=REPO, env=ENVIRONMENT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ray_processes = _killed_when(process, lambda: out.is_dir() and _finished(out), lambda process: process)
    process.communicate(timeout=60)
    for survivor in psutil.wait_procs(ray_processes, timeout=10)[1]:  # Ray's agents outlive it for a minute
        survivor.kill()
    finished = _finished(out)
    assert len(finished) == 1

    result = subprocess.run(_command(tree, out, models, "--workers", "1"), cwd=REPO, env=ENVIRONMENT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "finished before: 1, to analyse: 2" in result.stdout
    assert _finished(out).items() >= finished.items() and len(_finished(out)) == 3
    assert len(_table(out / "studies.csv")) == 3 and not (out / ".work").exists()
