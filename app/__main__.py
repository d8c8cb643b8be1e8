"""python app -i DICOM_DIR -o OUT_DIR [-m MODELS_DIR] [--no-sr --no-pdf --no-png --no-report --no-seg --no-json ...]
(or HOLOSCAN_INPUT_PATH / _OUTPUT_PATH / _MODEL_PATH). The output flags (operators.report_writer) win over
app.yaml's `outputs` section; they are taken off the command line before the SDK reads it.

Exit status: 0 done; 2 the study cannot be analysed (no usable chest CT series: the reason is the
one line on stderr); 1 internal error or an output folder that cannot be written (one line on stderr,
traceback in the log); 143 / 130 stopped by SIGTERM / SIGINT. The log goes to stdout, so stderr holds
nothing but that line.

All or nothing (operators.output_folder): this process runs the analysis in a child process (the same
command, with LUNG_MAP_STAGING naming a hidden staging folder inside OUT_DIR as its output folder) and
moves the outputs into OUT_DIR only when the child succeeded. On any failure, on SIGTERM or SIGINT (passed
on to the child) and when the child dies (e.g. killed for memory), the staging folder is removed.
"""

import argparse
import contextlib
import importlib.abc
import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent
# operators/ sits beside app/ in the repository; in a MAP it is packaged into the app folder (deploy/package.py),
# which is already sys.path[0]. Appended, so that `app` still names app/app.py.
if (APP_DIR.parent / "operators").is_dir():
    sys.path.append(str(APP_DIR.parent))

EXIT_CANNOT_ANALYSE = 2
EXIT_INTERNAL_ERROR = 1
STAGING_ENV = "LUNG_MAP_STAGING"
# Modules that MONAI imports at start-up wherever they are installed (its optional dependencies, MONAI 1.6.1) and
# that this app never uses. On an image that holds them (GPU images often hold transformers, pandas, scikit-image,
# tensorboard...) that costs seconds per study; the analysis process sees them as not installed (README Speed).
# Some are parts of packages the app does use: scipy.signal, scipy.optimize and scipy.sparse.linalg (MONAI's Hilbert
# transform, metrics and ultrasound confidence map) and matplotlib.pyplot (its notebook plots; the visual report draws
# on matplotlib Figures).
UNUSED_OPTIONAL_MODULES = frozenset("""
    apex batchgenerators bs4 clara clearml cucim einops fire gdown h5py huggingface_hub ignite IPython ipywidgets itk
    jsonschema kvikio lmdb lpips matplotlib.pyplot MetricsReloaded mlflow nibabel nni nrrd nvsubquadratic onnx
    onnxruntime openslide optuna pandas polygraphy pyamg pynvml pypdf pywt scipy.optimize scipy.signal
    scipy.sparse.linalg segment_anything SimpleITK skimage sklearn squeeze_and_excitation stl tensorboard tensorboardX
    tensorrt tifffile torch_tensorrt torchaudio torchio torchvision transformers trimesh zarr
""".split())


class UnusedPackageBlocker(importlib.abc.MetaPathFinder):
    """Makes UNUSED_OPTIONAL_MODULES (and their submodules) fail to import, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        parts = name.split(".")
        if any(".".join(parts[:depth]) in UNUSED_OPTIONAL_MODULES for depth in range(1, len(parts) + 1)):
            raise ModuleNotFoundError(f"No module named {name!r} (not used by this app)", name=name)
        return None


def output_folder(argv: list[str]) -> Path:
    """OUT_DIR as the SDK resolves it: -o/--output, else HOLOSCAN_OUTPUT_PATH, else ./output."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("-o", "--output")
    known, _ = parser.parse_known_args(argv)
    return Path(known.output or os.environ.get("HOLOSCAN_OUTPUT_PATH") or "output").absolute()


def main() -> int:
    """Stage, run the analysis in a child process, publish or discard (module docstring)."""
    if STAGING_ENV in os.environ:
        return analyse(Path(os.environ[STAGING_ENV]))
    from operators.output_folder import discard, publish, stage

    stopped, children = [], []

    def stop(signum, frame):
        stopped.append(signum)
        for child in children:
            child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    out_dir = output_folder(sys.argv[1:])
    try:
        staging, created = stage(out_dir)
    except OSError as error:
        return _unwritable(out_dir, error)
    status = 0
    if not stopped:
        children.append(subprocess.Popen([sys.executable, *sys.argv], env={**os.environ, STAGING_ENV: str(staging)}))
        status = children[0].wait()
    if status == 0 and not stopped:
        try:
            if not publish(staging, out_dir):  # nothing written (e.g. -h): leave no OUT_DIR of this run's making
                discard(None, out_dir, created)
            return 0
        except OSError as error:
            status = _unwritable(out_dir, error)
    discard(staging, out_dir, created)
    if stopped:
        print(f"stopped by {signal.Signals(stopped[0]).name}: nothing written", file=sys.stderr)
        return 128 + stopped[0]
    if status < 0:
        print(f"internal error: the analysis was killed by {signal.Signals(-status).name}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    return status


def _unwritable(out_dir: Path, error: OSError) -> int:
    print(f"cannot write the output folder {out_dir}: {error.strerror or error}", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def analyse(output: Path) -> int:
    """The analysis itself (the child process), writing into the staging folder `output`."""
    error_stream = os.fdopen(os.dup(2), "w", buffering=1)  # line-buffered: the process ends by os._exit
    os.dup2(1, 2)  # every log (Python, Holoscan) to stdout; stderr is left for the one-line verdict
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    # numpy asks the kernel for transparent huge pages for large arrays; where it grants them on demand (the
    # madvise setting), each new volume-sized array costs seconds more in page faults (README Speed).
    os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
    repo_models = APP_DIR.parent / "models"
    if "HOLOSCAN_MODEL_PATH" not in os.environ and repo_models.is_dir():
        os.environ["HOLOSCAN_MODEL_PATH"] = str(repo_models)  # -m still overrides it
    logging.captureWarnings(True)
    sys.meta_path.insert(0, UnusedPackageBlocker())

    from app import LungLesionApp
    from monai.deploy.core import parse_args
    from operators.report_writer import split_output_flags
    from operators.volume import StudyError, keep_freed_memory

    keep_freed_memory()

    output_flags, sys.argv[1:] = split_output_flags(sys.argv[1:])
    usage = io.StringIO()
    try:
        with contextlib.redirect_stderr(usage):
            parse_args(sys.argv)  # before any work
    except SystemExit as stop:  # -h (status 0), or a usage error: argparse's usage text, then "...: error: WHY"
        if stop.code:
            why = usage.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
            print(" ".join(f"usage error: {why}".split()), file=error_stream)
            return EXIT_CANNOT_ANALYSE
        return 0
    start = time.perf_counter()
    try:
        LungLesionApp(output_flags=output_flags, output_folder=output).run()
    except StudyError as error:
        print(f"cannot analyse this study: {error}", file=error_stream)
        return EXIT_CANNOT_ANALYSE
    except Exception as error:
        logging.exception("internal error")
        print(" ".join(f"internal error: {type(error).__name__}: {error}".split()), file=error_stream)
        return EXIT_INTERNAL_ERROR
    logging.getLogger("timing").info("application: %.1f s", time.perf_counter() - start)
    return 0


def _exit_analysis(status: int) -> None:
    """End the analysis process without the interpreter's teardown (seconds of freeing a study's arrays object by
    object, and the SDK's and torch's finalizers): its outputs are closed and this process's parent publishes them."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    status = main()
    if STAGING_ENV in os.environ:
        _exit_analysis(status)
    sys.exit(status)
