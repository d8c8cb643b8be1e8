"""Package the app as a MAP: `python -m deploy.package [--models DIR] [--out DIR] [--tag NAME:VERSION]`.

Runs holoscan-cli 4.2's packager (`monai-deploy package`, requirements-package.txt) step by step so
that its build context stays on disk: manifests (map/app.json, map/pkg.json), Dockerfile, the app
folder, models, pip requirements. The context is checked, then built with `docker buildx` where
Docker is usable; elsewhere (or with --context-only) the checked context is the result.

What the plain `monai-deploy package` would not do here:
- operators/ and the runtime requirements.txt go into the packaged app folder. The packager takes
  requirements only from the app folder, and `--add operators` would flatten the package into
  /opt/holoscan/lib, where `import operators` fails.
- Its artifact manifest (base image per Holoscan version) is downloaded from the CLI's repository and
  lists Holoscan 4.2.0 only. A local one (--source) is generated for the installed holoscan-cu13:
  wheel version = that version; base image = the CUDA 13 runtime on Ubuntu 24.04 that the 4.2.0
  manifest names and the Dockerfile template expects (python3.12 pins, ubuntu2404 keyring). Build
  images (C++ apps only) and the Debian version are left empty: a Python app does not use them.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "nvcr.io/nvidia/cuda:13.0.0-runtime-ubuntu24.04"
PLATFORM = "x86_64"
MODELS = ("lesion_seg", "cascade_fp")
MAP_ROOT = Path("/opt/holoscan")  # the packager's app, models and lib folders live under it
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


class PackageError(Exception):
    """Packaging cannot go on: the reason in one line."""


def model_files(model_dir: Path) -> list[Path]:
    """model.json and every file it names (the network's `file`, learned cascade stages' `file`)."""
    config_path = model_dir / "model.json"
    if not config_path.is_file():
        return [config_path]
    config = json.loads(config_path.read_text())
    names = [config.get("file", "model.ts")] if model_dir.name == "lesion_seg" else []
    names += [stage["file"] for stage in config.get("stages", []) if "file" in stage]
    return [config_path] + [model_dir / name for name in names]


def check_models(models: Path) -> None:
    for name in MODELS:
        missing = [path for path in model_files(models / name) if not path.is_file()]
        if missing:
            raise PackageError(f"model {name}: {missing[0]} missing (train and export it, or pass --models DIR)")


def stage(folder: Path, models: Path) -> tuple[Path, Path]:
    """The app folder as packaged (app/ + operators/ + the runtime requirements.txt) and a models root
    with just the app's models; returns both."""
    app = folder / "app"
    shutil.copytree(REPO / "app", app, ignore=IGNORE)
    shutil.copytree(REPO / "operators", app / "operators", ignore=IGNORE)
    shutil.copyfile(REPO / "requirements.txt", app / "requirements.txt")
    for name in MODELS:
        shutil.copytree(models / name, folder / "models" / name, ignore=IGNORE)
    return app, folder / "models"


def write_artifact_manifest(path: Path, holoscan_version: str) -> Path:
    """The packager's --source file for one Holoscan version (see the module docstring)."""
    path.write_text(json.dumps({holoscan_version: {"holoscan": {
        "wheel-version": holoscan_version, "debian-version": None, "base-images": {"dgpu": BASE_IMAGE},
        "build-images": {"igpu": {}, "dgpu": {}, "cpu": {}}}}}, indent=2))
    return path


def write_context(context: Path, models: Path, tag: str):
    """Everything `monai-deploy package` writes before `docker buildx`; returns the packager's builder, the
    platform and the Dockerfile's name."""
    try:
        from holoscan_cli.__main__ import parse_args, set_up_logging
        from holoscan_cli.common.exceptions import HoloscanSdkError
        from holoscan_cli.common.sdk_utils import detect_holoscan_version
        from holoscan_cli.packager.arguments import PackagingArguments
        from holoscan_cli.packager.container_builder import PythonAppBuilder
        from holoscan_cli.packager.packager import _create_app_manifest, _create_package_manifest
    except ImportError as error:
        raise PackageError(f"holoscan-cli 4.2.0 needed (pip install -r requirements-package.txt): {error}") from error

    with tempfile.TemporaryDirectory(prefix="map-stage-") as folder:
        app, models = stage(Path(folder), models)
        manifest = write_artifact_manifest(Path(folder) / "artifacts.json", detect_holoscan_version())
        args = parse_args(["monai-deploy", "package", str(app), "--config", str(REPO / "app.yaml"),
                           "--models", str(models), "--platform", PLATFORM, "--tag", tag, "--source", str(manifest),
                           "--sdk", "monai-deploy"])
        set_up_logging(None)
        try:
            packaging = PackagingArguments(args, str(context))
        except HoloscanSdkError as error:
            raise PackageError(f"monai-deploy package: {error}") from error
        _create_app_manifest(packaging.application_manifest, str(context))
        _create_package_manifest(packaging.package_manifest, str(context))
        builder = PythonAppBuilder(packaging.build_parameters, str(context))
        (platform,) = packaging.platforms
        builder._copy_supporting_files(platform)
        return builder, platform, Path(builder._write_dockerfile(platform)).name


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def check_context(context: Path) -> None:
    """The build context holds what the MAP needs, with the paths and resources the runtime expects."""
    dockerfile = (context / "Dockerfile").read_text()
    for line in ("COPY ./app /opt/holoscan/app", "COPY ./models  /opt/holoscan/models", "COPY ./map/app.json",
                 "COPY ./map/pkg.json", "COPY ./pip/requirements.txt", f"FROM {BASE_IMAGE}"):
        if line not in dockerfile:
            raise PackageError(f"Dockerfile: no '{line}'")
    for path in ["app/__main__.py", "app/app.py", "app/requirements.txt"] + [
            f"app/operators/{p.relative_to(REPO / 'operators')}" for p in (REPO / "operators").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]:
        if not (context / path).is_file():
            raise PackageError(f"build context: {path} missing")
    requirements = _requirements(context / "pip" / "requirements.txt")
    if requirements != _requirements(REPO / "requirements.txt") or not all("==" in r for r in requirements):
        raise PackageError("pip/requirements.txt: not the pinned runtime requirements.txt")
    for name in MODELS:
        missing = [p for p in model_files(context / "models" / name) if not p.is_file()]
        if missing:
            raise PackageError(f"build context: {missing[0].relative_to(context)} missing")

    app = json.loads((context / "map" / "app.json").read_text())
    expected = {"command": json.dumps(["python3", str(MAP_ROOT / "app")]), "sdk": "monai-deploy"}
    for key, value in expected.items():
        if app.get(key) != value:
            raise PackageError(f"app.json: {key} is {app.get(key)!r}, not {value!r}")
    environment = app["environment"]
    if (environment["HOLOSCAN_MODEL_PATH"], app["input"]["path"], app["output"]["path"]) != (
            str(MAP_ROOT / "models"), "input/", "output/"):
        raise PackageError("app.json: models, input or output path differ from /opt/holoscan/models, input/, output/")
    package = json.loads((context / "map" / "pkg.json").read_text())
    if package["models"] != {name: str(MAP_ROOT / "models" / name) for name in MODELS}:
        raise PackageError(f"pkg.json: models {package['models']}, not {list(MODELS)} under {MAP_ROOT / 'models'}")
    resources = yaml.safe_load((REPO / "app.yaml").read_text())["resources"]
    if package["resources"] != resources:
        raise PackageError(f"pkg.json: resources {package['resources']}, not app.yaml's {resources}")


def docker_usable() -> bool:
    """A Docker engine answers and buildx is installed."""
    if shutil.which("docker") is None:
        return False
    try:
        return all(subprocess.run(["docker", *command], capture_output=True, timeout=60).returncode == 0
                   for command in (["info"], ["buildx", "version"]))
    except subprocess.TimeoutExpired:
        return False


def package(models: Path, out: Path, tag: str, context_only: bool = False) -> bool:
    """Write and check the build context in `out` (replaced as a whole); build the image where Docker is
    usable. Returns whether an image was built."""
    check_models(models)
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    context = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        builder, platform, dockerfile = write_context(context, models.resolve(), tag)
        check_context(context)
        if out.exists():
            shutil.rmtree(out)
        os.replace(context, out)
    finally:
        shutil.rmtree(context, ignore_errors=True)
    if context_only or not docker_usable():
        return False
    builder._temp_dir = str(out)  # the context moved
    result = builder._build_internal(str(out / dockerfile), platform)
    if not result.succeeded:
        raise PackageError(f"docker build of {tag} failed: {result.error}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=REPO / "models", help="models root (<name>/model.json ...)")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "map", help="build context folder (replaced)")
    parser.add_argument("--tag", default=None, help="image name:tag (default lung-lesion-map:<app.yaml version>)")
    parser.add_argument("--context-only", action="store_true", help="write and check the context, build no image")
    args = parser.parse_args()
    version = yaml.safe_load((REPO / "app.yaml").read_text())["application"]["version"]
    tag = args.tag or f"lung-lesion-map:{version}"
    try:
        built = package(args.models, args.out, tag, args.context_only)
    except PackageError as error:
        print(f"package: {error}", file=sys.stderr)
        return 1
    if built:
        print(f"built {tag}; run it: monai-deploy run {tag} -i DICOM_DIR -o OUT_DIR")
    else:
        reason = "--context-only" if args.context_only else "no Docker engine with buildx here"
        print(f"build context checked in {args.out}; no image built ({reason}): "
              "run `make package` on a machine with Docker and access to nvcr.io")
    return 0


if __name__ == "__main__":
    sys.exit(main())
