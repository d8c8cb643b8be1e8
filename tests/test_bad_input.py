"""Input the app must refuse in one line on stderr, exit status 2, nothing written (and input it must survive)."""

import shutil

import numpy as np
import pydicom
import pytest

from tests.conftest import run_app
from tests.exit_status import assert_documented_status


def _copy_slices(phantom_study, tmp_path, keep=lambda index: True, edit=None):
    """Some slices of the phantom series (optionally edited) in a new folder."""
    source = sorted((phantom_study[0] / "series").glob("*.dcm"))
    folder = tmp_path / "input"
    folder.mkdir()
    for index, path in enumerate(source):
        if keep(index):
            if edit is None:
                shutil.copy(path, folder / path.name)
            else:
                dataset = pydicom.dcmread(path)
                edit(dataset)
                dataset.save_as(folder / path.name, enforce_file_format=True)
    return folder


def _assert_refused(result, output, phrase):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr
    assert len(lines) == 1 and phrase in lines[0], result.stderr
    assert_documented_status(result.returncode, lines[0])
    assert "Traceback" not in result.stderr
    assert not output.exists() or not any(output.iterdir())


def _to_mr(dataset):
    dataset.Modality = "MR"


def _water_only(dataset):
    """Every pixel soft tissue (0 HU): a body without lungs."""
    value = -dataset.RescaleIntercept
    dataset.PixelData = np.full((dataset.Rows, dataset.Columns), value, dataset.pixel_array.dtype).tobytes()


CASES = {
    "empty folder": (None, None, "no DICOM files"),
    "no CT series": (lambda i: i < 40, _to_mr, "not a CT image series"),
    "series too short": (lambda i: i < 5, None, "5 slices"),
    "missing slices": (lambda i: not 150 <= i < 155, None, "missing slices"),
    "non-thoracic": (lambda i: i < 60, _water_only, "no thorax in this series"),
}


@pytest.mark.parametrize("case", CASES)
def test_refused_in_one_line(case, phantom_study, models_dir, tmp_path):
    keep, edit, phrase = CASES[case]
    if keep is None:
        folder = tmp_path / "input"
        folder.mkdir()
    else:
        folder = _copy_slices(phantom_study, tmp_path, keep, edit)
    output = tmp_path / "output"
    _assert_refused(run_app(folder, output, models_dir), output, phrase)


def test_usage_error_is_one_line(tmp_path, models_dir):
    result = run_app(tmp_path / "no such folder", tmp_path / "output", models_dir)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("usage error: "), result.stderr
    assert "No such file/folder" in lines[0]
    assert_documented_status(result.returncode, lines[0])
    assert not (tmp_path / "output").exists()


def test_missing_model_is_an_internal_error(phantom_study, tmp_path):
    output = tmp_path / "output"
    result = run_app(phantom_study[0], output, tmp_path)  # a models folder without lesion_seg
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("internal error:"), result.stderr
    assert_documented_status(result.returncode, lines[0])
    assert not output.exists() or not any(output.iterdir())
