"""The PACS round trip (deploy/pacs.py) against a real Orthanc with its DICOMweb plugin (Debian packages
`orthanc`, `orthanc-dicomweb`; `make test` installs them), each started on free loopback ports with its own
storage and configuration, and stopped after. Skipped with a message where Orthanc is not installed."""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
import torch
from dicomweb_client import DICOMwebClient

from deploy.pacs import RoundTripError, cstore_outputs, output_datasets
from tests.conftest import REPO, write_test_models
from tests.dicom_validation import assert_dciodvfy_clean

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "lungmap", "pacs-test-password"  # the command's account; "admin" loads the studies
READER = ("reader", "reader-test-password")
ADMIN = ("admin", "admin-test-password")
# A strict PACS: "reader" may not write (the store is refused, HTTP 403), and SRs are dropped on arrival
# (Orthanc still answers that the store succeeded).
STRICT = f"""function IncomingHttpRequestFilter(method, uri, ip, username, headers)
  return method == 'GET' or username ~= '{READER[0]}'
end
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.Modality ~= 'SR'
end"""


@dataclass
class Pacs:
    url: str
    dicom_port: int
    aet: str = "ORTHANC"

    def client(self, auth=ADMIN) -> DICOMwebClient:
        session = requests.Session()
        session.auth = auth
        return DICOMwebClient(self.url, session=session)

    def series(self, study_uid: str) -> dict[str, str]:
        """The study's series (QIDO-RS): {SeriesInstanceUID: Modality}."""
        return {s["0020000E"]["Value"][0]: s["00080060"]["Value"][0] for s in self.client().search_for_series(study_uid)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def orthanc(folder: Path, lua: str | None = None):
    """An Orthanc of its own in `folder`: HTTP (DICOMweb) and DICOM on free ports, answering loopback only."""
    if ORTHANC is None or not DICOMWEB_PLUGIN.is_file():
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
                    "make test installs them)")
    http_port, dicom_port = _free_port(), _free_port()
    config = {"Name": "lung-map-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "DicomCheckCalledAet": True,
              "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
              "RegisteredUsers": dict([(USER, PASSWORD), READER, ADMIN]),
              "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,  # C-STORE from 127.0.0.1 only
              "DicomModalities": {"lungmap": ["LUNGMAP", "127.0.0.1", 104]},
              "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    if lua:
        (folder / "filter.lua").write_text(lua)
        config["LuaScripts"] = [str(folder / "filter.lua")]
    (folder / "orthanc.json").write_text(json.dumps(config))
    with open(folder / "orthanc.log", "w") as log_file:
        process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        pacs = Pacs(f"http://127.0.0.1:{http_port}/dicom-web", dicom_port)
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{pacs.url}/studies", auth=ADMIN, timeout=5).ok:
                    break
            assert process.poll() is None and time.monotonic() < deadline, (folder / "orthanc.log").read_text()[-2000:]
            time.sleep(0.2)
        yield pacs
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _study(folder: Path, seed: int, lesions: int, slices: int = 60) -> str:
    """A small generated chest CT study (256 x 256, 5 mm slices) as DICOM in `folder`: its StudyInstanceUID."""
    from training.phantom import Scanner, generate_phantom
    from training.phantom_io import write_dicom_series

    scanner = Scanner(pixel_mm=1.2, slice_mm=5.0, rows=256, kernel="STANDARD", noise_sd=15.0, contrast=False,
                      signed_storage=False, circular_fov=False)
    write_dicom_series(generate_phantom(seed, lesion_count=lesions, scanner=scanner, slices=slices), folder)
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _load(pacs: Pacs, folder: Path) -> None:
    pacs.client().store_instances([pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))])


def _round_trip(pacs_url: str, *arguments: str, models: Path | None = None, auth=(USER, PASSWORD)):
    """`python -m deploy.pacs` as a user runs it, credentials in the environment."""
    environment = {**os.environ, "DICOMWEB_USER": auth[0], "DICOMWEB_PASSWORD": auth[1]}
    command = [sys.executable, "-m", "deploy.pacs", "--url", pacs_url, "--timeout", "10", *arguments]
    command += ["-m", str(models)] if models else []
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    assert auth[1] not in result.stdout + result.stderr
    return result


def _one_line(result, status: int, phrase: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status and len(lines) == 1 and phrase in lines[0], result.stdout[-3000:] + result.stderr


class NoLesion(torch.nn.Module):
    """A stand-in network that finds nothing, whatever the study."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x), torch.full_like(x, -10.0)], dim=1)


@pytest.fixture(scope="module")
def stand_in_models(tmp_path_factory) -> Path:
    """The tests' quick stand-in network (tests/conftest.py): the round trip, not the model, is under test here."""
    return write_test_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def no_lesion_models(tmp_path_factory) -> Path:
    folder = write_test_models(tmp_path_factory.mktemp("models"))
    torch.jit.save(torch.jit.script(NoLesion()), str(folder / "lesion_seg" / "model.ts"))
    return folder


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Generated studies: with lesions, without, and one too short to analyse (5 slices): {name: (folder, UID)}."""
    root = tmp_path_factory.mktemp("pacs_studies")
    specs = {"lesions": (13, 4, 60), "no lesions": (14, 0, 60), "too short": (15, 0, 5)}
    return {name: (root / name, _study(root / name, *spec)) for name, spec in specs.items()}


@pytest.fixture(scope="module")
def pacs(studies, tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        for folder, _ in studies.values():
            _load(server, folder)
        yield server


@pytest.fixture(scope="module")
def round_trip(pacs, studies, stand_in_models, tmp_path_factory):
    """The study with lesions through the command once: (result, work folder)."""
    work = tmp_path_factory.mktemp("work")
    return _round_trip(pacs.url, "--study", studies["lesions"][1], "--work", str(work), models=stand_in_models), work


def test_outputs_come_back_into_the_study(pacs, studies, round_trip, tmp_path):
    result, work = round_trip
    assert result.returncode == 0 and result.stderr == "", result.stdout[-3000:] + result.stderr
    for step in ("retrieve: 60 instances", "analyse: app exit status 0", "store: SEG, SR, DOC by STOW-RS"):
        assert step in result.stdout
    study_uid = studies["lesions"][1]
    series = pacs.series(study_uid)
    assert sorted(series.values()) == ["CT", "DOC", "SEG", "SR"]
    local = {str(d.SOPInstanceUID): d for d in output_datasets(work / "1" / "output", study_uid)}
    client = pacs.client()
    for series_uid, modality in series.items():
        if modality == "CT":
            continue
        [stored] = client.retrieve_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
        assert stored == local[str(stored.SOPInstanceUID)]
        stored.save_as(tmp_path / f"{modality}.dcm", enforce_file_format=True)
        assert_dciodvfy_clean(tmp_path / f"{modality}.dcm")
    [seg] = [d for d in local.values() if d.Modality == "SEG"]
    in_pacs = {i["00080018"]["Value"][0] for i in client.search_for_instances(study_uid, search_filters={"Modality": "CT"})}
    referenced = {item.ReferencedSOPInstanceUID for series_item in seg.ReferencedSeriesSequence
                  for item in series_item.ReferencedInstanceSequence}
    assert referenced and referenced <= in_pacs


def test_second_run_stores_nothing(pacs, studies, round_trip):
    study_uid = studies["lesions"][1]
    before = pacs.series(study_uid)
    result = _round_trip(pacs.url, "--study", study_uid)
    assert result.returncode == 0 and "skipped, it already holds 3 output series" in result.stdout, result.stderr
    assert "retrieve:" not in result.stdout and pacs.series(study_uid) == before


def test_study_without_lesions(pacs, studies, no_lesion_models):
    study_uid = studies["no lesions"][1]
    result = _round_trip(pacs.url, "--query", f"StudyInstanceUID={study_uid}", models=no_lesion_models)
    assert result.returncode == 0 and result.stderr == "", result.stdout[-3000:] + result.stderr
    assert sorted(pacs.series(study_uid).values()) == ["CT", "DOC", "SR"]


def test_study_that_cannot_be_analysed(pacs, studies, no_lesion_models):
    study_uid = studies["too short"][1]
    _one_line(_round_trip(pacs.url, "--study", study_uid, models=no_lesion_models), 2, "cannot analyse this study: no usable axial CT series: ")
    assert list(pacs.series(study_uid).values()) == ["CT"]


def test_pacs_failures(pacs, studies):
    _one_line(_round_trip(pacs.url, "--study", "1.2.3.4"), 3, "study 1.2.3.4: not found in")
    _one_line(_round_trip(f"http://127.0.0.1:{_free_port()}/dicom-web", "--study", "1.2.3.4"), 3,
              "cannot reach http://127.0.0.1:")
    _one_line(_round_trip(pacs.url, "--study", "1.2.3.4", auth=(USER, "wrong")), 3, "answered HTTP 401")
    _one_line(_round_trip(pacs.url, "--study", "1.2.3.4/../x"), 2, "not a UID")


@pytest.fixture(scope="module")
def strict_pacs(studies, tmp_path_factory):
    with orthanc(tmp_path_factory.mktemp("strict"), STRICT) as server:
        _load(server, studies["no lesions"][0])
        yield server


def test_store_refused_or_kept_in_part(strict_pacs, studies, no_lesion_models):
    """A PACS that lets the command read but not write: one line, exit status 3, nothing stored. One that keeps
    the PDF but drops the SR and cannot delete (Orthanc): exit status 3, the line names the series to delete."""
    study_uid = studies["no lesions"][1]
    result = _round_trip(strict_pacs.url, "--study", study_uid, models=no_lesion_models, auth=READER)
    _one_line(result, 3, f"store into {study_uid}: {strict_pacs.url} answered HTTP 403")
    assert list(strict_pacs.series(study_uid).values()) == ["CT"]

    result = _round_trip(strict_pacs.url, "--study", study_uid, models=no_lesion_models)
    [kept] = [uid for uid, modality in strict_pacs.series(study_uid).items() if modality == "DOC"]
    _one_line(result, 3, f"kept 1 of 2 outputs and could not delete them (delete: {strict_pacs.url} answered HTTP "
                         f"405 Method Not Allowed): delete series {kept}")


def test_cstore(studies, round_trip, tmp_path):
    """The outputs by DIMSE C-STORE to a fresh Orthanc; an AE title it does not answer to: nothing sent."""
    study_uid = studies["lesions"][1]
    datasets = output_datasets(round_trip[1] / "1" / "output", study_uid)
    with orthanc(tmp_path) as archive:
        with pytest.raises(RoundTripError, match="no association with WRONG@"):
            cstore_outputs(datasets, f"WRONG@127.0.0.1:{archive.dicom_port}", "LUNGMAP", 10)
        assert archive.client().search_for_studies() == []
        cstore_outputs(datasets, f"{archive.aet}@127.0.0.1:{archive.dicom_port}", "LUNGMAP", 10)
        assert sorted(archive.series(study_uid).values()) == ["DOC", "SEG", "SR"]
