"""The MAP: its build context (deploy/package.py, `make package`) and the packaged app run as the container
runs it: `python3 /opt/holoscan/app` with app.json's environment, from a copy of the packaged folders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, read_series
from tests.test_app_e2e import _check_outputs

MODELS = ["cascade_fp", "lesion_seg"]


def _package(models: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.package", "--models", str(models), "--out", str(out),
                           "--context-only"], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def context(models_dir, tmp_path_factory) -> Path:
    """The build context `make package` writes (no image: --context-only), with the session's models."""
    out = tmp_path_factory.mktemp("map") / "context"
    result = _package(models_dir, out)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def small_study(tmp_path_factory) -> Path:
    """A small generated chest CT study as DICOM: 60 x 256 x 256, 5 mm slices; lesions of 8, 15, 28, 34 mm."""
    from training.phantom import Scanner, generate_phantom
    from training.phantom_io import write_dicom_series

    scanner = Scanner(pixel_mm=1.2, slice_mm=5.0, rows=256, kernel="STANDARD", noise_sd=15.0, contrast=False,
                      signed_storage=False, circular_fov=False)
    folder = tmp_path_factory.mktemp("study") / "series"
    write_dicom_series(generate_phantom(13, lesion_count=4, scanner=scanner, slices=60), folder)
    return folder


def test_build_context(context):
    app = json.loads((context / "map" / "app.json").read_text())
    assert json.loads(app["command"]) == ["python3", "/opt/holoscan/app"]
    assert (app["sdk"], app["sdkVersion"]) == ("monai-deploy", "4.0.0")
    assert {app["environment"][f"HOLOSCAN_{name}_PATH"] for name in ("INPUT", "OUTPUT", "MODEL")} == {
        "input/", "output/", "/opt/holoscan/models"}
    assert (app["input"]["path"], app["output"]["path"], app["workingDirectory"]) == ("input/", "output/",
                                                                                       "/var/holoscan")
    package = json.loads((context / "map" / "pkg.json").read_text())
    assert package["models"] == {name: f"/opt/holoscan/models/{name}" for name in MODELS}
    assert package["resources"] == yaml.safe_load((REPO / "app.yaml").read_text())["resources"]

    dockerfile = (context / "Dockerfile").read_text()
    for line in ("COPY ./app /opt/holoscan/app", "COPY ./models  /opt/holoscan/models",
                 'LABEL org.nvidia.holoscan="4.6.0"', "RUN pip install monai-deploy-app-sdk==4.0.0"):
        assert line in dockerfile
    assert (context / "pip" / "requirements.txt").read_text().strip() == (REPO / "requirements.txt").read_text().strip()
    assert (context / "app" / "operators" / "series_rules.json").is_file()
    assert sorted(p.name for p in (context / "models").iterdir()) == MODELS


def test_missing_model_is_refused_in_one_line(tmp_path):
    shutil.copytree(REPO / "models" / "cascade_fp", tmp_path / "models" / "cascade_fp")
    result = _package(tmp_path / "models", tmp_path / "context")
    assert result.returncode == 1 and result.stderr.startswith("package: model lesion_seg: ")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "context").exists()


def test_packaged_app_runs_as_in_the_container(context, small_study, tmp_path):
    """The container's layout under `root`: app, models and app.yaml where the Dockerfile puts them, the
    study where `monai-deploy run` mounts it; nothing from the repository (cwd, PYTHONPATH)."""
    root = tmp_path / "root"
    app = json.loads((context / "map" / "app.json").read_text())
    workdir = root / app["workingDirectory"].lstrip("/")
    shutil.copytree(context / "app", root / "opt/holoscan/app")
    shutil.copytree(context / "models", root / "opt/holoscan/models")
    shutil.copytree(small_study, workdir / "input")
    (workdir / "output").mkdir()
    shutil.copyfile(context / "app.config", workdir / "app.yaml")
    environment = {name: str(workdir / value if not value.startswith("/") else root / value.lstrip("/"))
                   for name, value in app["environment"].items()}
    environment.update(PATH=os.environ["PATH"], HOME=os.environ.get("HOME", str(tmp_path)))
    result = subprocess.run([sys.executable, environment["HOLOSCAN_APPLICATION"]], cwd=workdir, env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stdout[-3000:] + result.stderr
    lesions, _ = _check_outputs(workdir / "output", read_series(small_study))
    assert lesions, "no lesion found: the SEG went unchecked"
