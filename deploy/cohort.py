"""A cohort on Ray: `python -m deploy.cohort --input TREE_OR_LIST --out DIR [options] [-- APP_OPTIONS]`.

Every study (a folder holding DICOM files in the tree, or a folder listed in a text file) is analysed by
`python app -i STUDY -o ... -m MODELS APP_OPTIONS` in a Ray task, into a temporary folder OUT/.work/<key>-<n>
that is renamed to OUT/<key> once the app is done or refuses the study: a study folder is complete or absent.
<key> is the study folder's path relative to the tree (or as listed), sanitised, plus a short hash of it.
A study whose folder exists is finished and not run again, so a killed or interrupted run resumes where it
stopped. Crashes (exit 1, a signal, a lost worker) and timeouts are retried --retries times; refusals (exit 2)
are recorded, not retried. The tables OUT/studies.csv (one row per study) and OUT/lesions.csv (one row per
lesion) are written at the end from the study folders (and this run's failures, whose app log is kept in
OUT/failed/<key>.log).

Exit status: 0 every study done; 2 some study cannot be analysed (refused, none failed), or a usage error;
1 some study failed after its retries, or an internal error of this command. Progress on stderr, the log and
the summary on stdout.
"""

import argparse
import csv
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pydicom.misc

REPO = Path(__file__).resolve().parents[1]
EXIT_CANNOT_ANALYSE, EXIT_INTERNAL_ERROR = 2, 1
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
STATUS_FILE, WORK, FAILED = "cohort.json", ".work", "failed"
RETRIED = ("crashed", "timeout")
STUDY_COLUMNS = ("key", "folder", "status", "exit_status", "reason", "lesion_count", "total_volume_ml",
                 "recist_sum_mm", "seconds", "attempts")
LESION_COLUMNS = ("key", "segment_number", "volume_ml", "long_axis_mm", "short_axis_mm", "longest_diameter_3d_mm",
                  "centroid_x_mm", "centroid_y_mm", "centroid_z_mm", "location", "mean_hu", "score")
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
log = logging.getLogger("cohort")


class CohortError(Exception):
    """A usage error, in one line."""


@dataclass(frozen=True)
class Study:
    key: str
    folder: Path


def study_key(relative: str) -> str:
    """A file name for a study path: its safe characters (others as '_', at most 80) and 8 hex of its SHA-1."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", relative).strip("._-")[:80] or "study"
    return f"{name}-{hashlib.sha1(relative.encode()).hexdigest()[:8]}"


def find_studies(source: Path) -> list[Study]:
    """A folder tree: one study per folder holding DICOM files (keyed by its path relative to the tree).
    A text file: one study folder per line (relative to the file's folder; blank and '#' lines skipped)."""
    if source.is_file():
        lines = [line.strip() for line in source.read_text().splitlines()]
        studies = [Study(study_key(line), source.parent / line) for line in lines if line and not line.startswith("#")]
    else:
        folders = sorted(Path(root) for root, _, files in os.walk(source)
                         if any(pydicom.misc.is_dicom(Path(root, name)) for name in files))
        studies = [Study(study_key(str(folder.relative_to(source))), folder) for folder in folders]
    return list({study.key: study for study in studies}.values())


def _child_limits(memory_bytes: int | None) -> None:
    """In the app's process before exec: its data memory bounded, and killed when its worker dies."""
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_DATA, (memory_bytes, memory_bytes))
    LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_study(study: Study, out: Path, models: Path | None = None, threads: int = 1, timeout: float | None = None,
              memory_bytes: int | None = None, app_args: tuple[str, ...] = (), attempt: int = 1) -> dict:
    """`python app` on one study into OUT/.work/<key>-<n>, renamed to OUT/<key> when done or refused (with
    cohort.json, its row, and app.log); otherwise removed, its log kept as OUT/failed/<key>.log.
    Returns the study's row: status done, refused, crashed or timeout, exit status, reason, seconds."""
    work = out / WORK / f"{study.key}-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True)
    command = [sys.executable, str(REPO / "app"), "-i", str(study.folder), "-o", str(work), *app_args]
    command += ["-m", str(models)] if models else []
    environment = {**os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads))}
    start = time.perf_counter()
    with open(work / "app.log", "w") as app_log:
        # Its own process group, so that a timeout also ends the analysis process the app starts.
        app = subprocess.Popen(command, cwd=REPO, env=environment, stdout=app_log, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=partial(_child_limits, memory_bytes))
        try:
            errors = app.communicate(timeout=timeout)[1]
            lines = errors.strip().splitlines()
            app_log.write(errors)
            status = {0: "done", EXIT_CANNOT_ANALYSE: "refused"}.get(app.returncode, "crashed")
            exit_status = app.returncode
            reason = (f"killed by signal {-app.returncode}" if app.returncode < 0 else
                      lines[-1] if lines and app.returncode else "")
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()
            status, exit_status, reason = "timeout", None, f"no result in {timeout:g} s"
    row = {"key": study.key, "folder": str(study.folder), "status": status, "exit_status": exit_status,
           "reason": reason, "seconds": round(time.perf_counter() - start, 1), "attempts": attempt}
    if status in RETRIED:
        (out / FAILED).mkdir(exist_ok=True)
        shutil.move(work / "app.log", out / FAILED / f"{study.key}.log")
        shutil.rmtree(work)
    else:
        (work / STATUS_FILE).write_text(json.dumps(row))
        work.rename(out / study.key)
        (out / FAILED / f"{study.key}.log").unlink(missing_ok=True)
    return row


class Progress:
    """One line on stderr per finished study: a bar, done / refused / failed, studies per minute, time left."""

    def __init__(self, total: int):
        self.total, self.counts, self.start = total, Counter(), time.monotonic()

    def update(self, status: str) -> None:
        self.counts[status] += 1
        finished = sum(self.counts.values())
        rate = finished / max(time.monotonic() - self.start, 1e-6) * 60
        left = round((self.total - finished) / rate * 60)
        bar = "#" * (20 * finished // self.total)
        print(f"[{bar:-<20}] {finished}/{self.total} done {self.counts['done']} refused {self.counts['refused']} "
              f"failed {self.counts['failed']} | {rate:.2f} studies/min | left {left // 3600}:{left // 60 % 60:02d}:"
              f"{left % 60:02d}", file=sys.stderr, flush=True)


def run_cohort(studies: list[Study], out: Path, workers: int | None = None, threads: int = 1,
               gpus: float | None = None, memory_gb: float = 4.0, timeout: float | None = None, retries: int = 2,
               models: Path | None = None, app_args: tuple[str, ...] = ()) -> dict[str, dict]:
    """Run the unfinished studies on the connected Ray cluster, at most `workers` at a time, each with `threads`
    CPUs (and `gpus` GPUs: default 1 where the cluster has GPUs) and `memory_gb` of memory. Returns the rows of
    the studies that failed after their retries, by key."""
    import ray

    todo = deque((study, 1) for study in studies if not (out / study.key / STATUS_FILE).is_file())
    log.info("studies: %d, finished before: %d, to analyse: %d", len(studies), len(studies) - len(todo), len(todo))
    if not todo:
        return {}
    resources = ray.cluster_resources()
    gpus = (1 if resources.get("GPU") else 0) if gpus is None else gpus
    memory_bytes = int(memory_gb * 2**30)
    fitting = [resources.get("CPU", 0) // threads, resources.get("memory", 0) // memory_bytes]
    fitting += [resources.get("GPU", 0) // gpus] if gpus else []
    workers = int(min(fitting + ([workers] if workers else [])))
    if workers < 1:
        raise CohortError(f"no worker fits in the cluster ({resources.get('CPU', 0):g} CPUs, "
                          f"{resources.get('GPU', 0):g} GPUs, {resources.get('memory', 0) / 2**30:.1f} GB memory) "
                          f"with {threads} CPUs, {gpus:g} GPUs and {memory_gb:g} GB per worker")
    log.info("workers: %d, each %d threads, %g GPUs, %g GB", workers, threads, gpus, memory_gb)
    task = ray.remote(run_study).options(num_cpus=threads, num_gpus=gpus, memory=memory_bytes, max_retries=0)
    pending, failures, progress = {}, {}, Progress(len(todo))
    while todo or pending:
        while todo and len(pending) < workers:
            study, attempt = todo.popleft()
            pending[task.remote(study, out, models, threads, timeout, memory_bytes, app_args, attempt)] = study, attempt
        [ready], _ = ray.wait(list(pending))
        study, attempt = pending.pop(ready)
        try:
            row = ray.get(ready)
        except ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None) or error
            reason = f"worker lost: {type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0][:200]}"
            row = {"key": study.key, "folder": str(study.folder), "status": "crashed", "exit_status": None,
                   "reason": reason, "attempts": attempt}
        if row["status"] in RETRIED and attempt <= retries:
            log.info("%s: %s (%s); retried", study.key, row["status"], row["reason"])
            todo.append((study, attempt + 1))
            continue
        if row["status"] in RETRIED:
            failures[study.key] = row = {**row, "status": "failed"}
        log.info("%s: %s in %s s after %d attempt(s)%s", study.key, row["status"], row.get("seconds"), attempt,
                 f": {row['reason']}" if row["reason"] else "")
        progress.update(row["status"])
    return failures


def cohort_tables(studies: list[Study], out: Path, failures: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """The study rows (finished studies from their folders, with lesions.json's burden; this run's failures) and
    the lesion rows."""
    study_rows, lesion_rows = [], []
    for study in studies:
        status_file, lesions_file = out / study.key / STATUS_FILE, out / study.key / "lesions.json"
        row = json.loads(status_file.read_text()) if status_file.is_file() else failures.get(study.key)
        if row is None:
            continue
        if lesions_file.is_file():
            document = json.loads(lesions_file.read_text())
            row |= {name: document["burden"][name] for name in ("lesion_count", "total_volume_ml", "recist_sum_mm")}
            lesion_rows += [{"key": study.key, **lesion, "location": lesion["location"]["text"],
                             **dict(zip(("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"), lesion["centroid_mm"]))}
                            for lesion in document["lesions"]]
        study_rows.append(row)
    return study_rows, lesion_rows


def write_table(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    """A CSV file of `columns`, replaced in one step."""
    partial_path = path.with_name(path.name + ".partial")
    with open(partial_path, "w", newline="") as file:
        writer = csv.DictWriter(file, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    partial_path.replace(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    app_args = tuple(argv[argv.index("--") + 1:]) if "--" in argv else ()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="APP_OPTIONS after '--' go to "
                                     "`python app`, e.g. -- --no-png --no-report")
    parser.add_argument("--input", type=Path, required=True, help="a folder tree of studies, or a text file listing "
                        "study folders (one per line)")
    parser.add_argument("--out", type=Path, required=True, help="one folder per study, studies.csv, lesions.csv")
    parser.add_argument("--address", help="Ray cluster to use (auto, HOST:PORT or ray://HOST:10001); "
                        "default: a local Ray instance with this machine's cores")
    parser.add_argument("--workers", type=int, help="studies at a time (default: as many as the cluster fits)")
    parser.add_argument("--threads-per-worker", type=int, default=1, help="CPU threads per study (default 1)")
    parser.add_argument("--gpus-per-worker", type=float, help="default: 1 where the cluster has GPUs, else 0")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="memory per study (default 4)")
    parser.add_argument("--timeout", type=float, help="seconds per study before it is killed and retried")
    parser.add_argument("--retries", type=int, default=2, help="tries more after a crash or timeout (default 2)")
    parser.add_argument("-m", "--models", type=Path, help="models folder for the app (default: the app's)")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s cohort: %(message)s")
    import ray

    start = time.monotonic()
    try:
        if "--no-json" in app_args:
            raise CohortError("--no-json: the cohort table is made from each study's lesions.json")
        if not args.input.exists():
            raise CohortError(f"--input {args.input}: not found")
        out = args.out.resolve()
        if out.is_relative_to(args.input.resolve()) and args.input.is_dir():
            raise CohortError(f"--out {args.out}: inside --input (its outputs would be taken for studies)")
        studies = find_studies(args.input.resolve())
        if not studies:
            raise CohortError(f"--input {args.input}: no study folders (folders holding DICOM files)")
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CohortError(f"--out {args.out}: another cohort run is writing there") from None
        shutil.rmtree(out / WORK, ignore_errors=True)  # an interrupted run's unfinished studies
        if any(not (out / study.key / STATUS_FILE).is_file() for study in studies):
            ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        failures = run_cohort(studies, out, args.workers, args.threads_per_worker, args.gpus_per_worker,
                              args.memory_gb, args.timeout, args.retries, args.models and args.models.resolve(),
                              app_args)
        study_rows, lesion_rows = cohort_tables(studies, out, failures)
        write_table(out / "studies.csv", study_rows, STUDY_COLUMNS)
        write_table(out / "lesions.csv", lesion_rows, LESION_COLUMNS)
        shutil.rmtree(out / WORK, ignore_errors=True)
    except CohortError as error:
        print(error, file=sys.stderr)
        return EXIT_CANNOT_ANALYSE
    except KeyboardInterrupt:
        print(f"interrupted: finished studies are kept in {args.out}; run again to do the others", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    except Exception as error:
        log.exception("internal error")
        print(f"internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
    finally:
        ray.shutdown()
    counts = Counter(row["status"] for row in study_rows)
    print(f"cohort: {len(studies)} studies: {counts['done']} done, {counts['refused']} refused, {counts['failed']} "
          f"failed; {len(lesion_rows)} lesions, {sum(row.get('total_volume_ml') or 0 for row in study_rows):.1f} ml "
          f"in all; {time.monotonic() - start:.0f} s; tables {out / 'studies.csv'}, {out / 'lesions.csv'}")
    return EXIT_INTERNAL_ERROR if counts["failed"] else EXIT_CANNOT_ANALYSE if counts["refused"] else 0


if __name__ == "__main__":
    from deploy.cohort import main  # Ray workers import the tasks from deploy.cohort, not from __main__

    sys.exit(main())
