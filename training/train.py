"""Train the lesion segmentation network (MONAI DynUNet) on a Decathlon-style dataset.

    python -m training.train --data data/phantoms --run runs/lesion_seg             # CPU preset
    python -m training.train --data data/phantoms --run runs/lesion_seg --preset gpu
    python -m training.train ... --max-minutes 6                                     # wall-clock budget
    python -m training.train ... --resume                                            # continue
    python -m training.train --data data/phantoms --data data/real_backgrounds --run runs/finetune --preset finetune

dataset.json lists {"image", "label"} pairs under "training" (and optionally "validation");
labels may be instance labels (any value > 0 is lesion) with IGNORE (255) where the loss must not look
(training.real_backgrounds: real CT whose other lesions are not outlined). --data may be repeated; the
"finetune" preset starts from the shipped weights (`init`). Every setting of the run is stored in
RUN/config.json, and training.export turns RUN/best.pt into models/lesion_seg.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader
from monai.networks.nets import DynUNet

from operators.lesion_segmentation import intensity_windows, network_input
from operators.volume import keep_freed_memory

log = logging.getLogger("train")

# Working grid (z, y, x) mm, window and network are part of the model: they go to model.json on export.
# Both presets train the same network, sized so that inference meets its time budget on a 2-core CPU;
# the GPU preset sees far more (and larger) patches.
MODEL = dict(spacing_mm=[2.0, 1.5, 1.5], intensity_window_hu=[-1000, 500], filters=[16, 32, 64, 128, 160])
PRESETS = {
    "cpu": dict(MODEL, patch_size=[48, 64, 64], batch_size=2, samples_per_volume=2, iterations=1400,
                learning_rate=2e-3, validate_every=350, threads=2, loader_workers=0),
    "gpu": dict(MODEL, patch_size=[64, 128, 128], batch_size=8, samples_per_volume=2, iterations=20000,
                learning_rate=2e-3, validate_every=250, threads=16, loader_workers=12),
    "finetune": dict(MODEL, patch_size=[48, 96, 96], batch_size=2, samples_per_volume=2, iterations=600,
                     learning_rate=3e-4, validate_every=600, threads=2, loader_workers=0, init="models/lesion_seg"),
}
# Other scanners on the same cases: slices up to 8 mm thick, up to 45 HU more noise (training.scanner_variants).
SCANNER_AUGMENTATION = dict(thick_slices_prob=0.3, thick_slices_work=[2, 4], noise_std=0.03)
PRESETS["finetune_scanners"] = dict(PRESETS["finetune"], **SCANNER_AUGMENTATION)
# Lesions anywhere within a quarter patch of the patch centre, not at it: the sliding window sees them anywhere
# (mediastinal nodes were found only where the patch placed them as training did; tried, not shipped: model card).
PRESETS["finetune_shift"] = dict(PRESETS["finetune"], lesion_shift=[12, 24, 24])
# A second input channel, the HU in a soft-tissue window: mediastinal nodes differ from the fat around them by about
# 0.07 of the lung window's range and by 0.28 of this one. Starts from the one-channel weights (tried, not shipped:
# model card).
SOFT_TISSUE_WINDOW_HU = [-160, 240]
PRESETS["finetune_soft_tissue"] = dict(PRESETS["finetune_shift"], soft_tissue_window_hu=SOFT_TISSUE_WINDOW_HU)
# A node-only network, trained from scratch: the soft-tissue window as its only input, small patches around nodes in
# mediastinal fat (tried, not shipped: model card).
PRESETS["nodes"] = dict(MODEL, intensity_window_hu=SOFT_TISSUE_WINDOW_HU, patch_size=[32, 64, 64], batch_size=4,
                        samples_per_volume=4, iterations=1500, learning_rate=2e-3, validate_every=500, threads=2,
                        loader_workers=0, lesion_shift=[6, 12, 12])
# The node network trained on: four times as many background patches (its false components were pericardial and
# mediastinal soft tissue), at half the learning rate (tried, not shipped: model card).
PRESETS["nodes_negatives"] = dict(PRESETS["nodes"], background_ratio=20, iterations=700, learning_rate=1e-3)
# Fine-tuning with 2.4 times the background patch weight: the ground-glass fine-tuning's new false findings were
# upper-abdominal and para-aortic structures of real scans (tried: model card).
PRESETS["finetune_negatives"] = dict(PRESETS["finetune"], background_ratio=12)
# The ground-glass network fine-tuned on with finetune_scanners' thick slices and noise: its extra findings were
# partial-volumed vessels on 9 mm slices (half of the shipped weights: model card).
PRESETS["finetune_negatives_scanners"] = dict(PRESETS["finetune_negatives"], **SCANNER_AUGMENTATION)
IGNORE = 255  # label value outside the loss (and outside mined candidates: training.mine_candidates)
MAX_LESIONS = 10  # instance values above this are not sampled as patch centres (the phantoms hold 0-10)
BACKGROUND_RATIO = 5  # patch centres: background (body) weighs this much against each lesion (or `background_ratio`)


def build_network(config: dict) -> DynUNet:
    levels = len(config["filters"])
    return DynUNet(
        spatial_dims=3, in_channels=len(intensity_windows(config)), out_channels=2, kernel_size=[3] * levels,
        strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1), filters=config["filters"],
        norm_name="instance", res_block=True,
    )


def load_widened(model: torch.nn.Module, weights: dict) -> None:
    """Load `weights` into `model`; a weight that sees fewer input channels than the model's (a one-channel network
    started as a two-channel one) gets zeros for the new channels, so the network's output is unchanged at first."""
    def widened(weight: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        if weight.ndim < 2 or weight.shape[1] >= own.shape[1]:
            return weight
        padded = torch.zeros_like(own)
        padded[:, :weight.shape[1]] = weight
        return padded

    own = model.state_dict()
    model.load_state_dict({name: widened(weight, own[name]) for name, weight in weights.items()})


def _xyz(zyx):
    """MONAI's spatial transforms see NIfTI arrays as (x, y, z)."""
    return tuple(reversed(zyx))


def preprocessing(config: dict) -> list:
    """Deterministic steps: load, orient like the app's volumes (LPS), resample, window, crop to the body.

    The result is [channel, z, y, x], the app's axis order (channels: `network_input`); labels stay instance labels.
    """
    return [
        mt.LoadImaged(keys=["image", "label"], image_only=False),
        mt.EnsureChannelFirstd(keys=["image", "label"]),
        mt.Orientationd(keys=["image", "label"], axcodes="LPS"),
        mt.Spacingd(keys=["image", "label"], pixdim=_xyz(config["spacing_mm"]), mode=("bilinear", "nearest")),
        mt.Lambdad(keys="image", func=lambda hu: network_input(hu, config)),
        mt.CropForegroundd(keys=["image", "label"], source_key="image", select_fn=lambda image: image[:1] > 0.05,
                           margin=8),  # the body, as the lung window shows it
        mt.EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
        mt.Transposed(keys=["image", "label"], indices=(0, 3, 2, 1)),
    ]


def crop_size(config: dict) -> list[int]:
    """The crop around a sampled centre: the patch, grown by `lesion_shift` (working voxels) on each side."""
    return [size + 2 * shift for size, shift in zip(config["patch_size"], config.get("lesion_shift", [0, 0, 0]))]


def patch_centres(config: dict) -> list:
    """Training only: pad to a crop and index candidate patch centres per lesion instance and body."""
    return [
        mt.SpatialPadd(keys=["image", "label"], spatial_size=crop_size(config)),
        mt.ClassesToIndicesd(keys="label", num_classes=MAX_LESIONS + 1, image_key="image", image_threshold=0.05),
    ]


class RandThickSlicesd(mt.RandomizableTransform, mt.MapTransform):
    """A thicker slice reconstruction of the image ([channel, z, y, x] on the working grid): the mean over slabs of
    `slabs` (low, high) working slices, interpolated back to every slice. Labels are left as they are."""

    def __init__(self, keys, prob: float, slabs: tuple[int, int]):
        mt.RandomizableTransform.__init__(self, prob)
        mt.MapTransform.__init__(self, keys)
        self.slabs = slabs
        self.slab = slabs[0]

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self.slab = int(self.R.randint(self.slabs[0], self.slabs[1] + 1))

    def __call__(self, data):
        result = dict(data)
        self.randomize()
        if not self._do_transform:
            return result
        for key in self.key_iterator(result):
            image = torch.as_tensor(result[key])[None]
            slabs = torch.nn.functional.avg_pool3d(image, (self.slab, 1, 1), ceil_mode=True)
            result[key] = torch.nn.functional.interpolate(slabs, size=image.shape[2:], mode="trilinear")[0]
        return result


def augmentation(config: dict) -> list:
    """Random patches centred on each lesion equally often (small ones as often as large ones) or on body (with
    `lesion_shift`: a patch anywhere within that of the centre), then binary labels, thicker slices (where the
    config asks), flips and intensity jitter."""
    thick_slices = [RandThickSlicesd(keys="image", prob=config["thick_slices_prob"],
                                     slabs=tuple(config["thick_slices_work"]))] if "thick_slices_prob" in config else []
    off_centre = [mt.RandSpatialCropd(keys=["image", "label"], roi_size=config["patch_size"], random_size=False)
                  ] if "lesion_shift" in config else []
    return [
        mt.RandCropByLabelClassesd(keys=["image", "label"], label_key="label", spatial_size=crop_size(config),
                                   ratios=[config.get("background_ratio", BACKGROUND_RATIO)] + [1] * MAX_LESIONS,
                                   num_classes=MAX_LESIONS + 1,
                                   num_samples=config["samples_per_volume"], indices_key="label_cls_indices",
                                   warn=False),
        *off_centre,
        mt.Lambdad(keys="label", func=binary_target),
        *thick_slices,
        mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),  # left-right
        mt.RandScaleIntensityd(keys="image", factors=0.05, prob=0.3),
        mt.RandShiftIntensityd(keys="image", offsets=0.02, prob=0.3),
        mt.RandGaussianNoised(keys="image", prob=0.2, std=config.get("noise_std", 0.01)),
        mt.RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.3, 0.8), sigma_y=(0.3, 0.8), sigma_z=(0.3, 0.8)),
    ]


def binary_target(label: torch.Tensor) -> torch.Tensor:
    """1 lesion, 0 background, -1 IGNORE."""
    return torch.where(label == IGNORE, -1.0, (label > 0).float())


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI's DiceCELoss (softmax, one-hot, both channels, smoothing 1e-5) over the voxels whose target is
    not -1 (`binary_target`); with no such voxel it equals DiceCELoss(to_onehot_y=True, softmax=True)."""
    valid = (target >= 0).float()
    lesion = target.clamp(min=0)
    cross_entropy = torch.nn.functional.cross_entropy(logits, lesion[:, 0].long(), reduction="none")
    cross_entropy = (cross_entropy * valid[:, 0]).sum() / valid.sum().clamp(min=1)
    probability = torch.softmax(logits, dim=1) * valid
    onehot = torch.cat([1 - lesion, lesion], dim=1) * valid
    axes = tuple(range(2, logits.ndim))
    dice = 1 - (2 * (probability * onehot).sum(axes) + 1e-5) / (probability.sum(axes) + onehot.sum(axes) + 1e-5)
    return dice.mean() + cross_entropy


def _case_paths(data_dir: Path, item: dict) -> dict:
    """A dataset.json entry's image and label, as paths under its folder."""
    return {key: str(data_dir / item[key]) for key in ("image", "label")}


def _dataset_lists(data_dirs: list[Path], val_count: int):
    items, validation = [], []
    for data_dir in data_dirs:
        spec = json.loads((data_dir / "dataset.json").read_text())
        items += [_case_paths(data_dir, item) for item in spec["training"]]
        for item in spec.get("validation", []):  # a folder given twice (more weight in training) validates once
            case = _case_paths(data_dir, item)
            if case not in validation:
                validation.append(case)
    if not validation:
        items, validation = items[val_count:], items[:val_count]
    return items, validation


def _dice(model, batch, config) -> float:
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        logits = sliding_window_inference(batch["image"], config["patch_size"], 4, model, overlap=0.25)
    pred = logits.argmax(1, keepdim=True).float()
    truth = (batch["label"] > 0).float() * (batch["label"] != IGNORE)
    denominator = float(pred.sum() + truth.sum())
    return 1.0 if denominator == 0 else float(2 * (pred * truth).sum()) / denominator


def learning_rate(config: dict, progress: float) -> float:
    """Linear warm-up over the first 5 % of training, then cosine decay to zero at progress 1."""
    warmup = 0.05
    if progress < warmup:
        return config["learning_rate"] * (0.1 + 0.9 * progress / warmup)
    return config["learning_rate"] * 0.5 * (1 + np.cos(np.pi * min((progress - warmup) / (1 - warmup), 1.0)))


def train(data_dirs: list[Path], run_dir: Path, config: dict, resume: bool = False, val_count: int = 4) -> dict:
    """Train until config["iterations"], or until config["max_minutes"] of wall time (caching included)
    when that is set; the learning-rate schedule follows whichever is further along."""
    t_begin = time.perf_counter()
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config.get("seed", 0))
    np.random.seed(config.get("seed", 0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=1))
    train_items, val_items = _dataset_lists(data_dirs, val_count)
    log.info("%d training and %d validation volumes on %s; caching preprocessed volumes",
             len(train_items), len(val_items), device)
    prep = preprocessing(config)
    train_ds = CacheDataset(train_items, mt.Compose(prep + patch_centres(config) + augmentation(config)),
                            num_workers=config["threads"])
    val_ds = CacheDataset(val_items, mt.Compose(prep), num_workers=config["threads"])
    log.info("cached in %.0f s", time.perf_counter() - t_begin)
    workers = config["loader_workers"]
    loader = DataLoader(train_ds, batch_size=max(config["batch_size"] // config["samples_per_volume"], 1),
                        shuffle=True, num_workers=workers, persistent_workers=workers > 0)

    model = build_network(config).to(device)
    if config.get("init"):
        init = Path(__file__).resolve().parents[1] / config["init"]  # relative to the repository
        load_widened(model, torch.jit.load(str(init / "model.ts"), map_location=device).state_dict())
        log.info("starting from the weights in %s", init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=1e-4)
    state = {"iteration": 0, "train_seconds": 0.0, "best_dice": -1.0, "history": [], "losses": []}
    checkpoint = run_dir / "last.pt"
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        log.info("resumed at iteration %d", state["iteration"])

    budget_s = None  # training seconds that the wall-clock budget leaves after caching
    if config.get("max_minutes"):
        budget_s = config["max_minutes"] * 60 - (time.perf_counter() - t_begin)
        if budget_s <= 0:
            raise SystemExit("no time left to train after caching; raise --max-minutes")

    def progress() -> float:
        by_time = state["train_seconds"] / budget_s if budget_s else 0.0
        return max(state["iteration"] / config["iterations"], by_time)

    t_start, start_seconds, start_iteration, losses = time.perf_counter(), state["train_seconds"], state["iteration"], state["losses"]
    while progress() < 1:
        for batch in loader:
            model.train()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, progress())
            image, label = batch["image"].to(device), batch["label"].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(image)
            loss = dice_ce_loss(logits.float(), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            state["iteration"] += 1
            state["train_seconds"] = start_seconds + time.perf_counter() - t_start
            it, progressed = state["iteration"], progress()
            done = progressed >= 1
            if it % 20 == 0:
                log.info("iteration %d (%.0f %%) loss %.4f lr %.2e (%.3f s/it)", it, 100 * min(progressed, 1),
                         np.mean(losses[-20:]), optimizer.param_groups[0]["lr"],
                         (state["train_seconds"] - start_seconds) / (it - start_iteration))
            if it % config["validate_every"] == 0 or done:
                _validate_and_save(model, val_ds, config, state, optimizer, run_dir, losses, device)
            if done:
                break
    return state


def _validate_and_save(model, val_ds, config, state, optimizer, run_dir, losses, device):
    model.eval()
    t0 = time.perf_counter()
    dice = float(np.mean([_dice(model, {k: v[None].to(device) for k, v in item.items() if k in ("image", "label")}, config)
                          for item in val_ds])) if len(val_ds) else float("nan")
    record = {"iteration": state["iteration"], "train_loss": float(np.mean(losses[-100:])), "val_dice": dice}
    state["history"].append(record)
    log.info("validation at %d: Dice %.4f (%.0f s)", state["iteration"], dice, time.perf_counter() - t0)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state, "config": config}
    if dice >= state["best_dice"] or np.isnan(dice):
        state["best_dice"] = dice
        torch.save(saved, run_dir / "best.pt.tmp")
        (run_dir / "best.pt.tmp").replace(run_dir / "best.pt")
    torch.save(saved, run_dir / "last.pt.tmp")
    (run_dir / "last.pt.tmp").replace(run_dir / "last.pt")
    (run_dir / "history.json").write_text(json.dumps(state["history"], indent=1))


def preset_config(preset: str, iterations: int | None = None, init: Path | None = None) -> dict:
    """A preset's settings, with its iteration count and its starting weights (an exported model folder) replaced
    where given."""
    config = dict(PRESETS[preset], preset=preset)
    if iterations:
        config["iterations"] = iterations
        config["validate_every"] = min(config["validate_every"], iterations)
    if init:
        config["init"] = str(Path(init).resolve())  # the preset's own init is relative to the repository
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, action="append", required=True,
                        help="folder with dataset.json (repeat to train on several)")
    parser.add_argument("--run", type=Path, required=True, help="output folder for checkpoints and logs")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--iterations", type=int, help="override the preset's iteration count")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget; the schedule anneals to fit it")
    parser.add_argument("--learning-rate", type=float, help="override the preset's learning rate")
    parser.add_argument("--init", type=Path, help="start from the weights of this exported model folder (default: the preset's)")
    parser.add_argument("--val-count", type=int, default=4, help="cases held out for validation without a list")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    keep_freed_memory()
    if args.init and not (args.init / "model.ts").is_file():
        parser.error(f"--init: no model.ts in {args.init}")
    config = preset_config(args.preset, args.iterations, args.init)
    if args.max_minutes:
        config["max_minutes"] = args.max_minutes
    if args.learning_rate:
        config["learning_rate"] = args.learning_rate
    state = train(args.data, args.run, config, resume=args.resume, val_count=args.val_count)
    print(f"done: {state['iteration']} iterations, best validation Dice {state['best_dice']:.4f} -> {args.run}")


if __name__ == "__main__":
    main()
