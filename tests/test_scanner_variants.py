"""Real CT as other scanners would image it (training.scanner_variants), read back by training.evaluate_real."""

import json

import numpy as np
import torch

from operators.thorax_crop import ThoraxCrop
from tests.conftest import WindowedSoftTissue
from training.evaluate_real import cached_probabilities, case_probability, load_case
from training.nifti import read_nifti, write_nifti
from training.scanner_variants import (low_dose, non_contrast, sharp_kernel, short_field, thicker_slices,
                                      write_dataset_variants)
from training.train import IGNORE


def _case():
    hu = np.full((9, 32, 32), -850.0, np.float32)
    labels = np.zeros(hu.shape, np.int16)
    hu[2:6, 10:20, 10:20], labels[2:6, 10:20, 10:20] = 30.0, 2  # a lesion on slices 2-5
    return hu, labels, (3.0, 0.7, 0.7)


def test_thicker_slices_average_slabs_and_keep_each_lesion_where_it_fills_half_the_slab():
    hu, labels, spacing = _case()
    image, truth, thick_spacing = thicker_slices(hu, labels, spacing, 3)
    assert image.shape == (3, 32, 32) and thick_spacing == (9.0, 0.7, 0.7)
    assert np.allclose(image[:, 15, 15], [(-850 - 850 + 30) / 3, 30.0, -850.0])
    assert truth[:, 15, 15].tolist() == [0, 2, 0]  # the slabs hold the lesion in 1, 3 and 0 of their 3 slices
    assert set(np.unique(truth)) == {0, 2}


def test_a_training_set_keeps_its_ignore_regions_wherever_a_thick_slab_touches_one(tmp_path):
    hu, labels, spacing = _case()
    labels[8, 0:4, 0:4] = IGNORE  # one slice of the last slab: IGNORE all the same
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    write_nifti(tmp_path / "imagesTr" / "case_s0.nii.gz", hu, spacing)
    write_nifti(tmp_path / "labelsTr" / "case_s0.nii.gz", labels, spacing)
    (tmp_path / "labelsTr" / "case_s0.json").write_text(json.dumps({"ignore_label": IGNORE, "lesions": []}))
    write_dataset_variants(tmp_path / "imagesTr", tmp_path / "labelsTr", tmp_path / "out", log=lambda *a, **k: None)
    truth, thick_spacing = read_nifti(tmp_path / "out" / "slices_9mm" / "labelsTr" / "case_s0.nii.gz")
    assert thick_spacing[0] == 9.0 and truth[2, 0, 0] == IGNORE and truth[1, 15, 15] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["low_dose", "non_contrast", "sharp_kernel",
                                                                    "short_field", "slices_6mm", "slices_9mm"]
    assert (tmp_path / "out" / "low_dose" / "labelsTr" / "case_s0.json").is_file()


def test_low_dose_adds_noise_and_the_sharp_kernel_only_changes_edges():
    hu, labels, spacing = _case()
    noisy, same_labels, same_spacing = low_dose(hu, labels, spacing)
    assert same_labels is labels and same_spacing == spacing
    assert 45 < float((noisy - hu).std()) < 55
    sharp, _, _ = sharp_kernel(hu, labels, spacing)
    assert np.allclose(sharp[:, 0, 0], hu[:, 0, 0]) and np.allclose(sharp[3, 15, 15], hu[3, 15, 15], atol=1e-3)
    assert sharp[3, 10, 10] > hu[3, 10, 10]  # the lesion's edge overshoots


def test_non_contrast_brings_iodinated_blood_to_unenhanced_blood_and_leaves_bone_and_lesions():
    hu = np.full((12, 64, 64), -100.0, np.float32)  # fat
    spacing = (3.0, 0.7, 0.7)
    labels = np.zeros(hu.shape, np.int16)
    hu[:, 10:20, 10:20] = 250.0  # an enhanced vessel along z
    hu[:, 36:56, 36:56] = 900.0  # a vertebral body: cortex...
    hu[:, 39:53, 39:53] = 250.0  # ...around marrow as bright as the blood
    hu[4:8, 10:20, 30:40], labels[4:8, 10:20, 30:40] = 45.0, 1  # a lesion beside the vessel
    image, same_labels, same_spacing = non_contrast(hu, labels, spacing)
    assert same_labels is labels and same_spacing == spacing
    assert abs(float(image[6, 15, 15]) - 40.0) < 5.0  # the vessel's centre
    assert np.allclose(image[:, 39:53, 39:53], 250.0) and np.allclose(image[:, 36, 36:56], 900.0)
    assert np.allclose(image[6, 12:18, 32:38], 45.0)  # the lesion's inside
    assert float(image[6, 15, 21]) < float(hu[6, 15, 21]) + 1e-3  # fat beside the vessel: its partial volume goes too


def test_a_short_field_ends_where_the_lungs_narrow_towards_the_liver_dome_and_never_cuts_a_lesion():
    hu = np.full((40, 96, 96), -1000.0, np.float32)
    z, y, x = np.mgrid[:40, :96, :96]
    hu[(y - 48) ** 2 + (x - 48) ** 2 < 44 ** 2] = 40.0  # the body; slices ascend from the abdomen
    radius = np.clip((z - 10) * 1.5, 0, 15)  # the lung bases widen over slices 10-20
    for centre in (28, 68):
        hu[(y - 48) ** 2 + (x - centre) ** 2 < radius ** 2] = -850.0
    labels = np.zeros(hu.shape, np.int16)
    image, same_labels, spacing = short_field(hu, labels, (3.0, 2.0, 2.0))
    assert spacing == (3.0, 2.0, 2.0) and same_labels.shape == image.shape
    assert 17 <= hu.shape[0] - image.shape[0] <= 20  # lung radius 12.5 of 15: 0.7 of the largest area
    assert np.array_equal(image, hu[hu.shape[0] - image.shape[0]:])
    labels[14:17, 46:51, 24:29] = 1  # a lesion in the narrow base
    image, kept_labels, _ = short_field(hu, labels, (3.0, 2.0, 2.0))
    assert image.shape[0] == 40 - 14 and kept_labels.sum() == labels.sum()


def test_a_variant_case_keeps_its_partial_truth(tmp_path):
    hu, labels, spacing = _case()
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / folder).mkdir()
    write_nifti(tmp_path / "imagesTr" / "case.nii.gz", hu, spacing)
    write_nifti(tmp_path / "labelsTr" / "case.nii.gz", labels, spacing)
    (tmp_path / "labelsTr" / "case.json").write_text(json.dumps(
        {"partial_truth": True, "lesions": [{"label": 2, "kind": "target"}]}))
    name, _, truth, _, described = load_case(tmp_path / "imagesTr" / "case.nii.gz")
    assert name == "case" and described["partial_truth"] and described["lesions"] == [{"id": 2, "kind": "target"}]
    assert np.array_equal(truth, labels)


def test_a_variant_never_reuses_the_cached_probability_of_its_case(tmp_path):
    hu, _, spacing = _case()
    whole = np.ones(hu.shape, bool)
    thorax = ThoraxCrop(box=(slice(0, 9), slice(0, 32), slice(0, 32)), body=whole, lungs=whole, lung_volume_ml=1.0)
    network = torch.jit.script(WindowedSoftTissue())
    config = {"spacing_mm": [3.0, 1.4, 1.4], "intensity_window_hu": [-1000, 500], "patch_size": [16, 32, 32],
              "overlap": 0.25, "precision": {}}
    first = case_probability("case", hu, spacing, thorax, network, config, tmp_path)
    cached = first.astype(np.float16).astype(np.float32)  # the cache keeps float16
    assert np.array_equal(case_probability("case", hu, spacing, thorax, network, config, tmp_path), cached)
    sharper, _, _ = sharp_kernel(hu, None, spacing)
    assert not np.allclose(case_probability("case", sharper, spacing, thorax, network, config, tmp_path), cached)
    assert len(cached_probabilities(tmp_path, "case")) == 2  # the case keeps its own beside its variant's
