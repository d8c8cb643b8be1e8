"""A tiny real training run on phantoms: the loss falls, the export loads and matches the eager model."""

import json

import numpy as np
import pytest
import torch
from monai import transforms as mt
from scipy import ndimage

from operators.lesion_segmentation import network_input
from tests.conftest import REPO, real_train_case
from training.export import average_exports, export, save_scripted
from training.nifti import read_nifti
from training.phantom import Scanner, generate_phantom
from training.phantom_io import write_phantom_nifti
from training.real_backgrounds import (STATIONS_BELOW_CARINA_MM, carina_slice, make_cases, mediastinum_mask,
                                      station_fat)
from training.real_cases import real_case_arrays
from training.train import (BACKGROUND_RATIO, IGNORE, PRESETS, RandThickSlicesd, _dataset_lists, augmentation,
                            binary_target, build_network, crop_size, dice_ce_loss, learning_rate, load_widened,
                            patch_centres, train)

TINY = dict(PRESETS["cpu"], filters=[4, 8, 16], patch_size=[16, 32, 32], batch_size=4, samples_per_volume=4,
            iterations=60, validate_every=60, learning_rate=1e-2, threads=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    scanner = Scanner(pixel_mm=0.9, slice_mm=3.0, rows=512, kernel="SOFT", noise_sd=15.0,
                      contrast=False, signed_storage=True, circular_fov=False)
    items = []
    for seed in (101, 102, 103):
        phantom = generate_phantom(seed, lesion_count=4, scanner=scanner, slices=30)
        name = f"case{seed}"
        write_phantom_nifti(phantom, root / "imagesTr" / f"{name}.nii.gz", root / "labelsTr" / f"{name}.nii.gz")
        items.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": items[:2], "validation": items[2:]}))
    return root


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    state = train([dataset], run_dir, dict(TINY))
    return run_dir, state


def test_loss_falls(run):
    run_dir, state = run
    assert state["iteration"] == TINY["iterations"]
    history = json.loads((run_dir / "history.json").read_text())
    assert history[-1]["iteration"] == TINY["iterations"]
    saved = torch.load(run_dir / "last.pt", weights_only=False)
    losses = saved["state"]["losses"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_export_matches_eager(run, tmp_path):
    run_dir, _ = run
    path = export(run_dir, tmp_path / "lesion_seg", checkpoint="last.pt")
    spec = json.loads((tmp_path / "lesion_seg" / "model.json").read_text())
    assert spec["spacing_mm"] == TINY["spacing_mm"] and spec["intensity_window_hu"] == TINY["intensity_window_hu"]
    scripted = torch.jit.load(str(path))
    saved = torch.load(run_dir / "last.pt", weights_only=False)
    eager = build_network(saved["config"])
    eager.load_state_dict(saved["model"])
    eager.eval()
    x = torch.rand(1, 1, 32, 48, 64)  # another size than the training patch
    with torch.no_grad():
        assert torch.allclose(scripted(x), eager(x), atol=1e-4)


def test_average_exports_mixes_each_weight_once(run, tmp_path):
    """A model soup: DynUNet's skip layers alias its blocks, and each weight is mixed once all the same."""
    run_dir, _ = run
    first, second = tmp_path / "first", tmp_path / "second"
    export(run_dir, first, checkpoint="last.pt")
    shifted = torch.jit.load(str(first / "model.ts"))
    with torch.no_grad():
        for tensor in {t.data_ptr(): t for t in shifted.state_dict().values()}.values():
            tensor += 1.0
    save_scripted(shifted, second)
    (second / "model.json").write_text((first / "model.json").read_text())
    average_exports(first, second, tmp_path / "soup", share=0.25)
    original = torch.jit.load(str(first / "model.ts")).state_dict()
    mixed = torch.jit.load(str(tmp_path / "soup" / "model.ts")).state_dict()
    assert all(torch.allclose(mixed[name], tensor + 0.25) for name, tensor in original.items())
    average_exports(first, tmp_path / "soup", tmp_path / "back", share=4)  # 4 x soup - 3 x first: the second again
    back = torch.jit.load(str(tmp_path / "back" / "model.ts")).state_dict()
    assert all(torch.allclose(back[name], tensor + 1.0, atol=1e-5) for name, tensor in original.items())
    spec = json.loads((tmp_path / "soup" / "model.json").read_text())
    assert spec["spacing_mm"] == TINY["spacing_mm"] and spec["training"]["first"] == spec["training"]["second"]


def test_soft_tissue_channel_starts_as_the_one_channel_network():
    soft = dict(TINY, soft_tissue_window_hu=[-160, 240])
    hu = torch.tensor([-1000.0, -100.0, 40.0, 500.0]).reshape(1, 1, 1, 1, 4)
    channels = network_input(hu, soft)
    assert channels.shape == (1, 2, 1, 1, 4)
    expected = torch.tensor([[0.0, 0.6, 0.6933, 1.0], [0.0, 0.15, 0.5, 1.0]])
    assert torch.allclose(channels[0, :, 0, 0], expected, atol=1e-4)
    one, two = build_network(TINY).eval(), build_network(soft).eval()
    load_widened(two, one.state_dict())
    x = network_input(torch.rand(1, 1, 16, 32, 32) * 1500 - 1000, soft)
    with torch.no_grad():
        assert torch.allclose(two(x), one(x[:, :1]), atol=1e-5)


def test_schedule_warms_up_then_anneals_to_zero():
    config = dict(TINY, learning_rate=1.0)
    rates = [learning_rate(config, p) for p in np.linspace(0, 1, 101)]
    assert rates[0] == pytest.approx(0.1) and max(rates) == pytest.approx(1.0, abs=1e-3)
    assert rates[5] == pytest.approx(1.0, abs=1e-3) and rates[-1] == pytest.approx(0.0, abs=1e-9)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:]))


def test_wall_clock_budget_ends_training(dataset, tmp_path):
    state = train([dataset], tmp_path, dict(TINY, iterations=10_000, validate_every=10_000, max_minutes=0.4))
    assert 0 < state["iteration"] < 10_000
    assert json.loads((tmp_path / "history.json").read_text())[-1]["iteration"] == state["iteration"]


def test_thick_slice_augmentation_blurs_the_image_along_z_only_and_only_where_asked():
    image = torch.zeros(1, 12, 4, 4)
    image[:, 6] = 1.0  # one bright slice
    thick = RandThickSlicesd(keys="image", prob=1.0, slabs=(3, 3))({"image": image, "label": image})
    assert thick["label"] is image and thick["image"].shape == image.shape
    profile = thick["image"][0, :, 2, 2]
    assert profile.max() < 0.5 and profile.sum() == pytest.approx(1.0, abs=0.05) and profile[3:11].sum() == profile.sum()
    assert torch.equal(thick["image"][0, :, 0, 0], profile)  # each slice stays uniform in-plane
    def steps(preset):
        return [type(step).__name__ for step in augmentation(PRESETS[preset])]
    assert "RandThickSlicesd" in steps("finetune_scanners") and "RandThickSlicesd" not in steps("finetune")


def _one_lesion_voxel_far_from_the_body(config: dict) -> dict:
    """A case with one lesion voxel and a body corner far from it, indexed for patch sampling."""
    label = torch.zeros(1, 30, 50, 50)
    label[0, 15, 25, 25] = 1
    image = label.clone()
    image[0, :6, :10, :10] = 1.0  # the body, where background patches are centred
    return mt.Compose(patch_centres(config))({"image": image, "label": label})


def test_lesion_shift_puts_the_lesion_anywhere_near_the_patch_centre_not_at_it():
    config = dict(PRESETS["finetune_shift"], patch_size=[8, 16, 16], lesion_shift=[2, 4, 4], samples_per_volume=1)
    data = _one_lesion_voxel_far_from_the_body(config)
    crop = mt.Compose(augmentation(config)[:2])
    offsets = set()
    for seed in range(40):
        crop.set_random_state(seed)
        patch = crop(data)[0]
        assert patch["image"].shape[1:] == (8, 16, 16)
        if patch["label"].any():  # a lesion-centred patch (the others are centred on the body)
            offsets.add(tuple(int(i) for i in torch.nonzero(patch["label"][0])[0]))
    assert len(offsets) > 3 and all(2 <= z <= 6 and 4 <= y <= 12 and 4 <= x <= 12 for z, y, x in offsets)
    assert crop_size(PRESETS["finetune"]) == PRESETS["finetune"]["patch_size"]  # other presets: centred as before


def test_background_ratio_weighs_body_patches_against_each_lesion():
    config = dict(PRESETS["finetune"], patch_size=[8, 16, 16], samples_per_volume=1, background_ratio=0)
    data = _one_lesion_voxel_far_from_the_body(config)
    crop = mt.Compose(augmentation(config)[:1])
    for seed in range(20):  # no weight on the body: every patch is centred on the lesion
        crop.set_random_state(seed)
        assert crop(data)[0]["label"].any()
    assert PRESETS["nodes_negatives"]["background_ratio"] > BACKGROUND_RATIO


def test_loss_is_monai_dice_ce_and_blind_to_ignored_voxels():
    from monai.losses import DiceCELoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 6, 8, 8, generator=generator)
    label = (torch.rand(2, 1, 6, 8, 8, generator=generator) > 0.7).float()
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    assert torch.allclose(dice_ce_loss(logits, binary_target(label)), expected)
    label[:, :, :2] = IGNORE
    target = binary_target(label)
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 2, 2, 8, 8, generator=generator) * 10
    assert torch.allclose(dice_ce_loss(logits, target), dice_ce_loss(changed, target))
    assert not torch.allclose(dice_ce_loss(logits, target), expected)


def test_mediastinum_is_the_fat_between_the_lungs():
    lungs = np.zeros((2, 10, 20), bool)
    lungs[:, 2:8, 2:7] = lungs[:, 2:8, 13:18] = True
    hu = np.full(lungs.shape, -100.0)
    hu[:, :, 10] = -1000.0  # an air column (trachea) is no place for a node
    hu[:, 5:8, 11:13] = 40.0  # nor the heart, a vessel or the oesophagus
    mask = mediastinum_mask(hu, lungs)
    assert mask[:, 2:8, 7:10].all() and mask[:, 2:5, 11:13].all()
    assert mask.sum() == 2 * (6 * 3 + 3 * 2) and not mask[:, :, 10].any() and not mask[:, 5:8, 11:13].any()


def _airway_phantom(split_z: int = 29):
    """Two lung blocks (-850 HU) in soft tissue, a trachea (-1000 HU, 2 cm2) down the midline to slice split_z + 1,
    then two main bronchi diverging from it; 2 x 1 x 1 mm voxels, z ascending towards the head."""
    hu = np.zeros((60, 120, 160), np.float32)
    lungs = np.zeros(hu.shape, bool)
    lungs[:, 20:100, 20:70] = lungs[:, 20:100, 90:140] = True
    hu[lungs] = -850.0
    y, x = np.mgrid[:120, :160]
    for z in range(split_z + 1, 60):
        hu[z][(y - 40) ** 2 + (x - 80) ** 2 <= 8 ** 2] = -1000.0
    for z in range(split_z - 9, split_z + 1):
        for side in (-1, 1):
            hu[z][(y - 40) ** 2 + (x - 80 - side * (7 + 2 * (split_z - z))) ** 2 <= 5 ** 2] = -1000.0
    return hu, lungs | (hu == -1000.0), (2.0, 1.0, 1.0)


def test_the_carina_is_where_the_tracheal_lumen_splits_in_two():
    hu, lungs, spacing = _airway_phantom(split_z=29)
    assert carina_slice(hu, lungs, spacing) == 29
    assert carina_slice(np.where(hu == -1000.0, -850.0, hu), lungs, spacing) is None  # no trachea found


def test_node_stations_end_below_the_carina_and_are_all_the_fat_without_one():
    hu, lungs, spacing = _airway_phantom(split_z=29)
    fat = np.ones(hu.shape, bool)
    floor = 29 - int(STATIONS_BELOW_CARINA_MM / spacing[0])
    stations = station_fat(fat, hu, lungs, spacing)
    assert stations[floor:].all() and not stations[:floor].any()
    assert station_fat(fat, np.where(hu == -1000.0, -850.0, hu), lungs, spacing).all()


def test_real_backgrounds_keep_the_partial_truth_out_of_the_loss(tmp_path):
    folder = real_train_case("qin_lsc_0055")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / folder.name).symlink_to(folder)
    out = tmp_path / "dataset"
    items = make_cases(tmp_path / "real", out, seeds=1, count=4, seg_dir=REPO / "models" / "lesion_seg",
                       cascade_dir=REPO / "models" / "cascade_fp", cache=tmp_path / "cache", log=lambda *a, **k: None)
    assert json.loads((out / "dataset.json").read_text())["training"] == items
    labels, _ = read_nifti(out / "labelsTr" / f"{folder.name}_s0.nii.gz")
    _, truth, *_ = real_case_arrays(folder)
    assert (labels[truth > 0] == IGNORE).all()  # the outlined target is neither lesion nor background
    inserted = json.loads((out / "labelsTr" / f"{folder.name}_s0.json").read_text())["lesions"]
    assert 0 < len(inserted) <= 4
    assert sorted(np.unique(labels[(labels > 0) & (labels != IGNORE)])) == [lesion["label"] for lesion in inserted]

    # --label-target: the target is the last lesion label, its one-voxel ring IGNORE, the tissue beyond it background
    make_cases(tmp_path / "real", tmp_path / "labelled", seeds=1, count=4, label_target=True,
               seg_dir=REPO / "models" / "lesion_seg", cascade_dir=REPO / "models" / "cascade_fp",
               cache=tmp_path / "cache", log=lambda *a, **k: None)
    labels, _ = read_nifti(tmp_path / "labelled" / "labelsTr" / f"{folder.name}_s0.nii.gz")
    lesions = json.loads((tmp_path / "labelled" / "labelsTr" / f"{folder.name}_s0.json").read_text())["lesions"]
    target = lesions[-1]
    assert target["kind"] == "real target" and target["voxels"] == int((truth > 0).sum())
    assert (labels[truth > 0] == target["label"]).all() and (labels == target["label"]).sum() == target["voxels"]
    ring = ndimage.binary_dilation(truth > 0, np.ones((3, 3, 3), bool)) & (truth == 0)
    assert (labels[ring] == IGNORE).all()
    beyond = ndimage.binary_dilation(truth > 0, np.ones((3, 7, 7), bool)) & ~ring & (truth == 0)
    assert (labels[beyond] == 0).mean() > 0.5


def test_a_folder_given_twice_is_sampled_twice_and_validated_once(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "a_label.nii.gz"}],
                                                       "validation": [{"image": "v.nii.gz", "label": "v_label.nii.gz"}]}))
    training, validation = _dataset_lists([tmp_path, tmp_path], val_count=4)
    assert len(training) == 2 and training[0] == training[1]
    assert validation == [{"image": str(tmp_path / "v.nii.gz"), "label": str(tmp_path / "v_label.nii.gz")}]
