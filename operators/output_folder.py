"""All or nothing in the output folder: the outputs of a run are written into a hidden staging folder inside
it and moved in only when the whole run succeeded.

- `stage(out_dir) -> Path`: creates OUT_DIR (when missing) and the staging folder `.lung-map-*` in it; an
  OSError here means that the output folder cannot be written.
- `publish(staging, out_dir)`: moves every staged file into OUT_DIR (each move atomic, SIGTERM and SIGINT
  held back until all are done), removes an earlier run's outputs that this run did not write, and
  removes the staging folder.
- `discard(staging, out_dir, created)`: removes the staging folder, and OUT_DIR when this run created it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

STAGING_PREFIX = ".lung-map-"
# The file names this app writes (operators.seg_writer, operators.report_writer); only these are ever replaced
# or removed in OUT_DIR.
OUTPUT_NAMES = re.compile(r"(seg\.dcm|lesions\.json|sr\.dcm|report\.pdf|report_pdf\.dcm|report_[a-z0-9_]+\.png)")


def stage(out_dir: Path) -> tuple[Path, bool]:
    """(the new staging folder, whether OUT_DIR was created for it)."""
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir)), created
    except OSError:
        discard(None, out_dir, created)
        raise


def publish(staging: Path, out_dir: Path) -> list[str]:
    """Move the staged outputs into OUT_DIR; return their names."""
    names = sorted(path.name for path in staging.iterdir())
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        for stale in out_dir.iterdir():
            if OUTPUT_NAMES.fullmatch(stale.name) and stale.name not in names and stale.is_file():
                stale.unlink()
        for name in names:
            os.replace(staging / name, out_dir / name)
        staging.rmdir()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return names


def discard(staging: Path | None, out_dir: Path, created: bool) -> None:
    if staging is not None:
        shutil.rmtree(staging, ignore_errors=True)
    if created:
        with contextlib.suppress(OSError):  # not empty: someone else wrote there meanwhile
            out_dir.rmdir()
