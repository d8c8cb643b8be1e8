"""A PACS round trip: `python -m deploy.pacs --url URL (--study UID ... | --query KEY=VALUE ...) [options]`.

For each study: QIDO-RS lists its series; WADO-RS retrieves the study into a work folder; `python app -i
-o -m` analyses it; STOW-RS stores its SEG, SR and Encapsulated PDF into the same study in one request
(or, with --cstore AE@HOST:PORT, DIMSE C-STORE sends them to that AE instead).

Running twice stores nothing twice: a study that already holds one of this app's output series (found
by QIDO, by their series descriptions) is skipped, nothing retrieved, analysed or stored. To analyse it
again, delete those series in the PACS first.

Credentials come from the environment only, never from the command line: DICOMWEB_TOKEN (bearer
token), or DICOMWEB_USER and DICOMWEB_PASSWORD (basic auth). They are not logged and not passed to the app.

Exit status: 0 every study done or skipped; 2 a study cannot be analysed (the app's reason), or a
usage error; 1 internal error (the app's or this command's); 3 the PACS failed (unreachable, study
not found, refused request or store). One line on stderr per failed study; the log (progress and
timings of retrieve, analyse, store; the app's log) on stdout.
"""

import argparse
import contextlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import pydicom
import requests
import retrying
from dicomweb_client import DICOMwebClient

REPO = Path(__file__).resolve().parents[1]
EXIT_CANNOT_ANALYSE, EXIT_INTERNAL_ERROR, EXIT_PACS = 2, 1, 3
CREDENTIALS = ("DICOMWEB_TOKEN", "DICOMWEB_USER", "DICOMWEB_PASSWORD")
OUTPUTS = ("seg.dcm", "sr.dcm", "report_pdf.dcm")  # what goes back to the PACS (seg.dcm absent without lesions)
APP_SERIES = {"Lung lesions (automatic)", "Lung lesion measurements (automatic)", "Lung lesion report (automatic)"}
UID = re.compile(r"[0-9]+(\.[0-9]+)*")
SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # C-STORE success and its warnings
log = logging.getLogger("pacs")


class RoundTripError(Exception):
    """One study's round trip failed: exit status and the reason in one line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@contextlib.contextmanager
def pacs_errors(action: str, url: str):
    """Turn what the HTTP layer raises into one line (never the credentials: they are not in the URL)."""
    try:
        yield
    except requests.HTTPError as error:
        response = error.response
        raise RoundTripError(EXIT_PACS, f"{action}: {url} answered HTTP {response.status_code} {response.reason}"
                             ) from None
    except retrying.RetryError as error:
        raise RoundTripError(EXIT_PACS, f"{action}: {url} kept answering HTTP "
                             f"{error.last_attempt.value.status_code} (busy or unavailable)") from None
    except requests.Timeout:
        raise RoundTripError(EXIT_PACS, f"{action}: no answer from {url} in time") from None
    except requests.RequestException as error:
        raise RoundTripError(EXIT_PACS, f"{action}: cannot reach {url} ({type(error).__name__})") from None


def connect(url: str, timeout: float) -> DICOMwebClient:
    """A DICOMweb client of `url`, authenticated from the environment (DICOMWEB_TOKEN or DICOMWEB_USER/_PASSWORD)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RoundTripError(EXIT_CANNOT_ANALYSE, f"--url {url!r}: not an http(s) URL")
    if parts.username or parts.password:
        raise RoundTripError(EXIT_CANNOT_ANALYSE, "--url: credentials in the URL are refused; "
                             "set DICOMWEB_USER and DICOMWEB_PASSWORD (or DICOMWEB_TOKEN)")
    session = requests.Session()
    if os.environ.get("DICOMWEB_TOKEN"):
        session.headers["Authorization"] = f"Bearer {os.environ['DICOMWEB_TOKEN']}"
    elif os.environ.get("DICOMWEB_USER"):
        session.auth = (os.environ["DICOMWEB_USER"], os.environ.get("DICOMWEB_PASSWORD", ""))
    client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
    client.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=500)  # retried after 1 s and 2 s
    return client


def find_studies(client: DICOMwebClient, filters: dict[str, str]) -> list[str]:
    """StudyInstanceUIDs of the studies a QIDO-RS query finds (e.g. ModalitiesInStudy=CT, StudyDate=20260101-20260131)."""
    with pacs_errors("query", client.base_url):
        studies = client.search_for_studies(search_filters=filters, get_remaining=True)
    return [study["0020000D"]["Value"][0] for study in studies]


def study_series(client: DICOMwebClient, study_uid: str) -> list[dict]:
    """The study's series (QIDO-RS); a study that the PACS does not hold is an error."""
    with pacs_errors(f"study {study_uid}", client.base_url):
        series = client.search_for_series(study_uid)
    if not series:
        raise RoundTripError(EXIT_PACS, f"study {study_uid}: not found in {client.base_url}")
    return series


def retrieve_study(client: DICOMwebClient, study_uid: str, folder: Path) -> tuple[int, int]:
    """Every instance of the study (WADO-RS, in its stored transfer syntax) as numbered files in `folder`:
    (instances, bytes)."""
    folder.mkdir(parents=True)
    count = size = 0
    with pacs_errors(f"retrieve {study_uid}", client.base_url):
        for count, dataset in enumerate(client.iter_study(study_uid, media_types=(("application/dicom", "*"),)), 1):
            path = folder / f"{count:06d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            size += path.stat().st_size
    return count, size


def run_app(input_dir: Path, output_dir: Path, models: Path | None) -> subprocess.CompletedProcess:
    """`python app -i -o [-m]` (its log to our stdout), without the PACS credentials in its environment."""
    command = [sys.executable, str(REPO / "app"), "-i", str(input_dir), "-o", str(output_dir), "--no-png"]
    command += ["-m", str(models)] if models else []
    environment = {name: value for name, value in os.environ.items() if name not in CREDENTIALS}
    sys.stdout.flush()
    return subprocess.run(command, cwd=REPO, env=environment, stderr=subprocess.PIPE, text=True)


def output_datasets(output_dir: Path, study_uid: str) -> list[pydicom.Dataset]:
    """The app's DICOM outputs (SEG, SR, Encapsulated PDF; no SEG without lesions), checked to be in the study."""
    datasets = [pydicom.dcmread(output_dir / name) for name in OUTPUTS if (output_dir / name).is_file()]
    if not datasets or any(dataset.StudyInstanceUID != study_uid for dataset in datasets):
        raise RoundTripError(EXIT_INTERNAL_ERROR, f"internal error: the app's outputs in {output_dir} are not "
                             f"{', '.join(OUTPUTS)} of study {study_uid}")
    return datasets


def store_outputs(client: DICOMwebClient, study_uid: str, datasets: list[pydicom.Dataset]) -> None:
    """STOW-RS of all outputs in one request, then QIDO-RS for what the PACS kept. Where it kept only some
    (refused the others, or dropped them silently), those are deleted again (DICOMweb DELETE) so that the
    study holds no half result; where the PACS cannot delete, the error names the series to delete."""
    with pacs_errors(f"store into {study_uid}", client.base_url):
        client.store_instances(datasets, study_instance_uid=study_uid)
        kept = [dataset for dataset in datasets if client.search_for_instances(
            study_uid, str(dataset.SeriesInstanceUID), search_filters={"SOPInstanceUID": str(dataset.SOPInstanceUID)})]
    if len(kept) == len(datasets):
        return
    message = f"store into {study_uid}: {client.base_url} kept {len(kept)} of {len(datasets)} outputs"
    if not kept:
        raise RoundTripError(EXIT_PACS, message)
    try:
        with pacs_errors("delete", client.base_url):
            for dataset in kept:
                client.delete_instance(study_uid, str(dataset.SeriesInstanceUID), str(dataset.SOPInstanceUID))
    except RoundTripError as error:
        series = ", ".join(str(dataset.SeriesInstanceUID) for dataset in kept)
        raise RoundTripError(EXIT_PACS, f"{message} and could not delete them ({error}): delete series {series}"
                             ) from None
    raise RoundTripError(EXIT_PACS, f"{message}; deleted them again")


def cstore_outputs(datasets: list[pydicom.Dataset], destination: str, calling_ae: str, timeout: float) -> None:
    """DIMSE C-STORE to `destination` (AE@HOST:PORT). Nothing is sent unless the AE accepts every output's SOP class."""
    from pynetdicom import AE

    match = re.fullmatch(r"([^@]{1,16})@(.+):([0-9]+)", destination)
    if not match:
        raise RoundTripError(EXIT_CANNOT_ANALYSE, f"--cstore {destination!r}: not AE@HOST:PORT")
    called_ae, host, port = match.groups()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for dataset in datasets:
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    association = ae.associate(host, int(port), ae_title=called_ae)
    if not association.is_established:
        raise RoundTripError(EXIT_PACS, f"C-STORE: no association with {destination} (refused, aborted or unreachable)")
    try:
        accepted = {context.abstract_syntax for context in association.accepted_contexts}
        refused = sorted({dataset.SOPClassUID.name for dataset in datasets if dataset.SOPClassUID not in accepted})
        if refused:
            raise RoundTripError(EXIT_PACS, f"C-STORE: {destination} does not accept {', '.join(refused)}; nothing sent")
        for number, dataset in enumerate(datasets):
            status = association.send_c_store(dataset)
            if status.get("Status") not in SUCCESS_STATUSES:
                code = f"0x{status.Status:04X}" if "Status" in status else "no answer"
                raise RoundTripError(EXIT_PACS, f"C-STORE: {destination} refused {dataset.SOPClassUID.name} "
                                     f"(status {code}) after {number} of {len(datasets)} outputs")
    finally:
        association.release()


def round_trip(client: DICOMwebClient, study_uid: str, work: Path, models: Path | None,
               cstore: str | None = None, calling_ae: str = "LUNGMAP", timeout: float = 60) -> None:
    """Retrieve, analyse and store one study (see the module's docstring); raises RoundTripError."""
    ours = [series for series in study_series(client, study_uid)
            if series.get("0008103E", {}).get("Value", [None])[0] in APP_SERIES]
    if ours:
        log.info("study %s: skipped, it already holds %d output series of this app", study_uid, len(ours))
        return
    for folder in (work / "input", work / "output"):
        shutil.rmtree(folder, ignore_errors=True)  # an earlier run's files in --work
    start = time.perf_counter()
    count, size = retrieve_study(client, study_uid, work / "input")
    retrieved = time.perf_counter()
    log.info("study %s: retrieve: %d instances, %.1f MB in %.2f s", study_uid, count, size / 1e6, retrieved - start)
    result = run_app(work / "input", work / "output", models)
    analysed = time.perf_counter()
    log.info("study %s: analyse: app exit status %d in %.2f s", study_uid, result.returncode, analysed - retrieved)
    if result.returncode:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no message"
        raise RoundTripError(result.returncode if result.returncode in (1, 2) else EXIT_INTERNAL_ERROR, reason)
    datasets = output_datasets(work / "output", study_uid)
    if cstore:
        cstore_outputs(datasets, cstore, calling_ae, timeout)
    else:
        store_outputs(client, study_uid, datasets)
    stored = time.perf_counter()
    log.info("study %s: store: %s by %s in %.2f s; retrieve + store %.2f s, app %.2f s", study_uid,
             ", ".join(str(dataset.Modality) for dataset in datasets), "C-STORE" if cstore else "STOW-RS",
             stored - analysed, (retrieved - start) + (stored - analysed), analysed - retrieved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="DICOMweb base URL (e.g. http://pacs:8042/dicom-web)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--study", action="append", metavar="UID", help="StudyInstanceUID (repeatable)")
    target.add_argument("--query", action="append", metavar="KEY=VALUE",
                        help="QIDO-RS study filter (repeatable), e.g. ModalitiesInStudy=CT StudyDate=20260101-20260131")
    parser.add_argument("--cstore", metavar="AE@HOST:PORT", help="store by DIMSE C-STORE to this AE instead of STOW-RS")
    parser.add_argument("--calling-ae", default="LUNGMAP", help="own AE title for C-STORE (default LUNGMAP)")
    parser.add_argument("-m", "--models", type=Path, help="models folder for the app (default: the app's)")
    parser.add_argument("--work", type=Path, help="keep each study's input and outputs in WORK/<n>/ "
                        "(default: a temporary folder, removed)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for the PACS (default 60)")
    args = parser.parse_args()
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s pacs: %(message)s")
    for name in ("dicomweb_client", "pynetdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)
    bad = [f"--study {uid!r}: not a UID" for uid in args.study or [] if not (UID.fullmatch(uid) and len(uid) <= 64)]
    bad += [f"--query {item!r}: not KEY=VALUE" for item in args.query or [] if not re.fullmatch(r"\w+=.+", item)]
    if bad:
        print(bad[0], file=sys.stderr)
        return EXIT_CANNOT_ANALYSE
    filters = dict(item.split("=", 1) for item in args.query or [])
    try:
        client = connect(args.url, args.timeout)
        studies = args.study or find_studies(client, filters)
    except RoundTripError as error:
        print(error, file=sys.stderr)
        return error.status
    log.info("studies to analyse: %d", len(studies))
    statuses = []
    for number, study_uid in enumerate(studies, 1):
        with (contextlib.nullcontext(args.work / str(number)) if args.work else
              tempfile.TemporaryDirectory(prefix="lung-map-pacs-")) as work:
            try:
                round_trip(client, study_uid, Path(work), args.models, args.cstore, args.calling_ae, args.timeout)
            except RoundTripError as error:
                statuses.append(error.status)
                print(f"study {study_uid}: {error}" if len(studies) > 1 else error, file=sys.stderr)
            except Exception as error:
                log.exception("internal error")
                statuses.append(EXIT_INTERNAL_ERROR)
                print(f"internal error: {type(error).__name__}: {error}", file=sys.stderr)
    return statuses[0] if statuses else 0

if __name__ == "__main__":
    sys.exit(main())
