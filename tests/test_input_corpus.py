"""The project's corpus of unusual and malformed input.

Each variant writes a small study into a folder and states what the app's input stage
(`operators.series_selection.read_study`: loader, series choice, volume; the app's exit status 2 and
one-line message come from its StudyError) does with it: ANALYSE (a volume with the source's HU and
geometry), REFUSE with a phrase of the one-line message, or EITHER. The base study is a 12-slice
32 x 32 CT series (operators need >= 10 slices over >= 30 mm) with one lesion.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from operators.series_selection import read_study
from operators.volume import StudyError
from tests.test_seg_writer import SPHERE, Series, make_series

ANALYSE, EITHER = "analyse", "either"


def base_series(**kwargs) -> Series:
    return make_series([SPHERE], **{"shape": (12, 32, 32), "table_step_mm": 3.0, **kwargs})


def write_series(folder: Path, datasets, edit: Callable[[Dataset], None] | None = None, prefix: str = "s") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, ds in enumerate(datasets):
        ds = pydicom.Dataset(ds)
        ds.file_meta = pydicom.dataset.FileMetaDataset(datasets[index].file_meta)
        if edit is not None:
            edit(ds)
        paths.append(folder / f"{prefix}{index:03d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _truncated_copy(folder: Path, series: Series) -> None:
    """A partial transfer: a cut copy of slice 5, read before the complete one."""
    paths = write_series(folder, series.datasets)
    data = paths[5].read_bytes()
    (folder / "a_partial.dcm").write_bytes(data[: len(data) * 2 // 3])


def _truncated_only(folder: Path, series: Series) -> None:
    paths = write_series(folder, series.datasets)
    paths[5].write_bytes(paths[5].read_bytes()[:-100])


VARIANTS: dict[str, tuple[Callable[[Path, Series], None], str]] = {
    "plain series": (lambda folder, series: write_series(folder, series.datasets), ANALYSE),
    "truncated copy of a slice beside the complete one": (_truncated_copy, ANALYSE),
    "truncated slice, no complete copy": (_truncated_only, "missing slices"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_corpus_variant(variant, tmp_path, caplog):
    build, expected = VARIANTS[variant]
    series = base_series()
    build(tmp_path / "input", series)
    caplog.set_level(logging.INFO)
    try:
        volume = read_study(tmp_path / "input")
    except StudyError as error:
        message = str(error)
        assert expected not in (ANALYSE,), f"refused: {message}"
        assert "\n" not in message
        if expected != EITHER:
            assert expected in message
        return
    assert expected in (ANALYSE, EITHER), f"analysed, expected a refusal with {expected!r}"
    assert volume.hu.shape == series.hu.shape
    assert np.array_equal(volume.hu, series.hu)
    assert [ds.SOPInstanceUID for ds in volume.source_datasets] == [ds.SOPInstanceUID for ds in series.datasets]
    if "truncated" in variant:
        assert "skipped a_partial.dcm: truncated pixel data" in caplog.text
