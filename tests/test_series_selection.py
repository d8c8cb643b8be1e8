"""Series choice on real archives: the SDK loader's gaps, selection rules, geometry checks, ranking."""

import json

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage

from monai.deploy.core import Fragment
from monai.deploy.operators import DICOMDataLoaderOperator
from operators.series_selection import (RULES_FILE, ChestCTSeriesSelectorOperator, RobustDICOMDataLoaderOperator,
                                        series_geometry)
from operators.volume import StudyError
from tests.conftest import real_case

USABLE = json.loads(RULES_FILE.read_text())["usable"]


def _slices(count=40, step=2.5, orientation=(1, 0, 0, 0, 1, 0), skip=(), tilt_deg=0.0, repeat=()):
    """Slices stacked along patient z; a gantry tilt turns the image plane about patient x."""
    tilt = np.radians(tilt_deg)
    if tilt_deg:
        orientation = (1, 0, 0, 0, np.cos(tilt), np.sin(tilt))
    slices = []
    for k in [k for k in range(count) if k not in skip] + list(repeat):
        d = Dataset()
        d.ImageOrientationPatient, d.ImagePositionPatient = list(orientation), [0.0, 0.0, k * step]
        d.PixelSpacing, d.Rows, d.Columns, d.PixelData = [0.7, 0.7], 512, 512, b""
        d.FrameOfReferenceUID, d.SOPClassUID = "1.2.3", CTImageStorage
        slices.append(d)
    return slices


@pytest.mark.parametrize("slices, reason", [
    (_slices(), None),
    (_slices(count=5), "5 slices"),
    (_slices(skip={20, 21}), "missing slices"),
    (_slices(step=10.0), "slice spacing 10.0 mm"),
    (_slices(orientation=(1, 0, 0, 0, 0, -1)), "not axial"),
    (_slices(count=12, step=1.0), "covers 12 mm"),
    (_slices(tilt_deg=15.0), "gantry tilt of 15.0 degrees (tilted series are not analysed)"),
    (_slices(tilt_deg=0.1), "gantry tilt of 0.1 degrees"),
    (_slices(repeat=(7,)), "several slices at one position"),
])
def test_series_geometry(slices, reason):
    geometry = series_geometry(slices, USABLE)
    if reason is None:
        assert geometry.slices == 40 and geometry.slice_spacing_mm == pytest.approx(2.5)
    else:
        assert reason in geometry


def test_missing_position_is_named():
    slices = _slices()
    del slices[3].ImagePositionPatient
    assert series_geometry(slices, USABLE) == "slices without ImagePositionPatient"


def _studies(case, loader_class=RobustDICOMDataLoaderOperator):
    return loader_class(Fragment()).load_data_to_studies(real_case(case) / "dicom")


def test_empty_series_number_no_longer_loses_the_series():
    stock = _studies("abdomen_negative", DICOMDataLoaderOperator)
    assert sum(len(study.get_all_series()) for study in stock) == 0  # the SDK 4.0.0 behaviour
    series = _studies("abdomen_negative")[0].get_all_series()
    assert len(series) == 1 and len(series[0].get_sop_instances()) == 20


@pytest.mark.parametrize("case, kernel, slices", [("petctdx_a0001", "B", 64), ("radiomics_lung1", "", 48),
                                                  ("lidc0001", "STANDARD", 133)])
def test_real_cases_pick_the_expected_series(case, kernel, slices):
    selector = ChestCTSeriesSelectorOperator(Fragment())
    chosen = selector.filter(selector.config, _studies(case))
    series = chosen[0].selected_series[0].series
    first = series.get_sop_instances()[0].get_native_sop_instance()
    assert len(series.get_sop_instances()) == slices and str(first.get("ConvolutionKernel", "")) == kernel


def test_no_usable_series_is_one_line():
    selector = ChestCTSeriesSelectorOperator(Fragment())
    study = _studies("radiomics_lung1")[0]
    study.get_all_series()[0].get_sop_instances()[:] = study.get_all_series()[0].get_sop_instances()[:4]
    with pytest.raises(StudyError, match=r"^no usable axial CT series: series 1 .*: 4 slices") as error:
        selector.filter(selector.config, [study])
    assert "\n" not in str(error.value)


def test_kernel_ranking():
    selector = ChestCTSeriesSelectorOperator(Fragment())
    ranks = {k: selector._kernel_rank(k) for k in ["B", "STANDARD", "B30f", "Br38f 3", "SOFT", "L", "LUNG", "B70f",
                                                 "BONE", "XYZ"]}
    assert ranks == {"B": 0, "STANDARD": 0, "B30f": 0, "Br38f 3": 0, "SOFT": 0, "L": 2, "LUNG": 2, "B70f": 2,
                     "BONE": 2, "XYZ": 1}
