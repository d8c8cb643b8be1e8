"""Shared fixtures: the real cases, a models folder, and running the app as a user would."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pydicom.misc
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("LUNG_MAP_REAL_DATA", REPO.parent / "shared" / "data" / "real"))
REAL_CASES = ["lidc0001", "radiomics_lung1", "petctdx_a0001", "abdomen_negative"]
REAL_TRAIN = Path(os.environ.get("LUNG_MAP_REAL_TRAIN_DATA", REPO.parent / "shared" / "data" / "real-train"))


def real_case(name: str) -> Path:
    """The folder of one real case; skip the test where the shared data are absent."""
    folder = REAL_DATA / name
    if not (folder / "dicom").is_dir():
        pytest.skip(f"real case {name} not found in {REAL_DATA} (set LUNG_MAP_REAL_DATA to a copy of shared/data/real)")
    return folder


def real_train_case(name: str) -> Path:
    """The folder of one real-train case; skip the test where the shared data are absent."""
    folder = REAL_TRAIN / name
    if not (folder / "dicom").is_dir():
        pytest.skip(f"real-train case {name} not found in {REAL_TRAIN} (set LUNG_MAP_REAL_TRAIN_DATA to shared/data/real-train)")
    return folder


def shipped_feature_stage(**thresholds) -> dict:
    """The shipped cascade's feature stage (models/cascade_fp/model.json), `thresholds` overriding its own."""
    spec = json.loads((REPO / "models" / "cascade_fp" / "model.json").read_text())
    stage = next(s for s in spec["stages"] if s["type"] == "features")
    return {**stage, "thresholds": {**stage["thresholds"], **thresholds}}


def read_series(folder: Path, series_uid: str | None = None) -> list[pydicom.Dataset]:
    """The CT slices of one series under `folder`, sorted feet first (ascending z)."""
    datasets = [pydicom.dcmread(p) for p in sorted(folder.rglob("*")) if p.is_file() and pydicom.misc.is_dicom(p)]
    datasets = [d for d in datasets if series_uid is None or d.SeriesInstanceUID == series_uid]
    return sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))


def hu_volume(datasets) -> np.ndarray:
    return np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]).astype(
        np.float32)


class WindowedSoftTissue(torch.nn.Module):
    """A stand-in network (no training): lesion logit rises with soft-tissue intensity surrounded by lung."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        surround = torch.nn.functional.avg_pool3d(x, kernel_size=(5, 9, 9), stride=1, padding=(2, 4, 4))
        lesion = 30.0 * (x - 0.55) + 30.0 * (0.45 - surround)
        return torch.cat([torch.zeros_like(lesion), lesion], dim=1)


def write_test_models(folder: Path) -> Path:
    """A models folder like the repository's, with the stand-in lesion_seg network."""
    (folder / "lesion_seg").mkdir(parents=True)
    torch.jit.save(torch.jit.script(WindowedSoftTissue()), str(folder / "lesion_seg" / "model.ts"))
    (folder / "lesion_seg" / "model.json").write_text(json.dumps({
        "name": "lesion_seg", "file": "model.ts", "spacing_mm": [2.0, 1.5, 1.5], "intensity_window_hu": [-1000, 500],
        "patch_size": [32, 64, 64], "overlap": 0.25, "sw_batch_size": 1, "probability_threshold": 0.5}))
    shutil.copytree(REPO / "models" / "cascade_fp", folder / "cascade_fp")
    return folder


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    """The repository's models once models/lesion_seg/model.ts exists, else the stand-in network."""
    if (REPO / "models" / "lesion_seg" / "model.ts").is_file():
        return REPO / "models"
    return write_test_models(tmp_path_factory.mktemp("models"))


def run_app(input_dir: Path, output_dir: Path, models: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python app -i -o -m` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "app", "-i", str(input_dir), "-o", str(output_dir), "-m", str(models)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


PHANTOM_SEED = 3  # 298 x 512 x 512 at 1 mm: the size of the speed target


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory):
    """A generated 512 x 512 x ~300 chest CT study (training.phantom) with non-DICOM files mixed in: (folder, phantom)."""
    from training.phantom import generate_phantom
    from training.phantom_io import write_dicom_series

    phantom = generate_phantom(PHANTOM_SEED, lesion_count=4)
    folder = tmp_path_factory.mktemp("phantom") / "study"
    write_dicom_series(phantom, folder / "series")
    (folder / "README.txt").write_text("not DICOM\n")
    (folder / "series" / "thumbnail.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (folder / "empty.dcm").write_bytes(b"")
    return folder, phantom


def seg_labels(seg_path: Path, source_sop_uids: list[str]) -> np.ndarray:
    """The SEG read back with highdicom as instance labels on the source slices (in `source_sop_uids` order)."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_sop_uids, combine_segments=True,
                                              ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    return labels.astype(np.int32)
