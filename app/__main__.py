"""python app -i DICOM_DIR -o OUT_DIR [-m MODELS_DIR] [--no-sr --no-pdf --no-png --no-report --no-seg --no-json ...]
(or HOLOSCAN_INPUT_PATH / _OUTPUT_PATH / _MODEL_PATH). The output flags (operators.report_writer) win over
app.yaml's `outputs` section; they are taken off the command line before the SDK reads it.

Exit status: 0 done; 2 the study cannot be analysed (no usable chest CT series: the reason is the
one line on stderr); 1 internal error (one line on stderr, traceback in the log). The log goes to
stdout, so stderr holds nothing but that line.
"""

import contextlib
import logging
import os
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


def main() -> int:
    error_stream = os.fdopen(os.dup(2), "w")
    os.dup2(1, 2)  # every log (Python, Holoscan) to stdout; stderr is left for the one-line verdict
    os.environ.setdefault("HOLOSCAN_LOG_LEVEL", "WARN")
    repo_models = APP_DIR.parent / "models"
    if "HOLOSCAN_MODEL_PATH" not in os.environ and repo_models.is_dir():
        os.environ["HOLOSCAN_MODEL_PATH"] = str(repo_models)  # -m still overrides it
    logging.captureWarnings(True)

    from app import LungLesionApp
    from monai.deploy.core import parse_args
    from operators.report_writer import split_output_flags
    from operators.volume import StudyError

    output_flags, sys.argv[1:] = split_output_flags(sys.argv[1:])
    with contextlib.redirect_stderr(error_stream):
        parse_args(sys.argv)  # usage errors (e.g. no such input folder) on stderr, exit status 2, before any work
    start = time.perf_counter()
    try:
        LungLesionApp(output_flags=output_flags).run()
    except StudyError as error:
        print(f"cannot analyse this study: {error}", file=error_stream)
        return EXIT_CANNOT_ANALYSE
    except Exception as error:
        logging.exception("internal error")
        print(f"internal error: {type(error).__name__}: {error}", file=error_stream)
        return EXIT_INTERNAL_ERROR
    logging.getLogger("timing").info("application: %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
