"""Train the lesion segmentation network (MONAI DynUNet) on a Decathlon-style dataset.

    python -m training.train --data data/phantoms --run runs/lesion_seg             # CPU preset
    python -m training.train --data data/phantoms --run runs/lesion_seg --preset gpu
    python -m training.train ... --resume                                            # continue

dataset.json lists {"image", "label"} pairs under "training" (and optionally "validation");
labels may be instance labels (any value > 0 is lesion). Every setting of the run is stored in
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
from monai.losses import DiceCELoss
from monai.networks.nets import DynUNet

log = logging.getLogger("train")

PRESETS = {
    # Working grid (z, y, x) mm and window are part of the model: they go to model.json on export.
    "cpu": dict(spacing_mm=[2.0, 1.5, 1.5], intensity_window_hu=[-1000, 500], patch_size=[48, 64, 64],
                filters=[16, 32, 64, 128, 160], batch_size=2, samples_per_volume=2, iterations=1400,
                learning_rate=2e-3, validate_every=350, threads=2),
    "gpu": dict(spacing_mm=[2.0, 1.5, 1.5], intensity_window_hu=[-1000, 500], patch_size=[64, 96, 96],
                filters=[32, 64, 128, 256, 320], batch_size=8, samples_per_volume=4, iterations=20000,
                learning_rate=2e-3, validate_every=1000, threads=8),
}


def build_network(config: dict) -> DynUNet:
    levels = len(config["filters"])
    return DynUNet(
        spatial_dims=3, in_channels=1, out_channels=2, kernel_size=[3] * levels, strides=[1] + [2] * (levels - 1),
        upsample_kernel_size=[2] * (levels - 1), filters=config["filters"], norm_name="instance", res_block=True,
    )


def _xyz(zyx):
    """MONAI's spatial transforms see NIfTI arrays as (x, y, z)."""
    return tuple(reversed(zyx))


def preprocessing(config: dict) -> list:
    """Deterministic steps: load, orient like the app's volumes (LPS), resample, window, binarise labels.

    The result is [channel, z, y, x], the app's axis order.
    """
    low, high = config["intensity_window_hu"]
    return [
        mt.LoadImaged(keys=["image", "label"], image_only=False),
        mt.EnsureChannelFirstd(keys=["image", "label"]),
        mt.Orientationd(keys=["image", "label"], axcodes="LPS"),
        mt.Spacingd(keys=["image", "label"], pixdim=_xyz(config["spacing_mm"]), mode=("bilinear", "nearest")),
        mt.ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        mt.Lambdad(keys="label", func=lambda label: (label > 0).float()),
        mt.CropForegroundd(keys=["image", "label"], source_key="image", select_fn=lambda image: image > 0.05, margin=8),
        mt.EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
        mt.Transposed(keys=["image", "label"], indices=(0, 3, 2, 1)),
    ]


def augmentation(config: dict) -> list:
    """Random patches (half centred on lesion, half on body), flips and intensity jitter."""
    return [
        mt.SpatialPadd(keys=["image", "label"], spatial_size=config["patch_size"]),
        mt.RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=config["patch_size"],
                                  pos=1, neg=1, num_samples=config["samples_per_volume"],
                                  image_key="image", image_threshold=0.05),
        mt.RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),  # left-right
        mt.RandScaleIntensityd(keys="image", factors=0.05, prob=0.3),
        mt.RandShiftIntensityd(keys="image", offsets=0.02, prob=0.3),
        mt.RandGaussianNoised(keys="image", prob=0.2, std=0.01),
        mt.RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.3, 0.8), sigma_y=(0.3, 0.8), sigma_z=(0.3, 0.8)),
    ]


def _dataset_lists(data_dir: Path, val_count: int):
    spec = json.loads((data_dir / "dataset.json").read_text())
    items = [{k: str(data_dir / v) for k, v in item.items() if k in ("image", "label")} for item in spec["training"]]
    validation = [{k: str(data_dir / v) for k, v in item.items()} for item in spec.get("validation", [])]
    if not validation:
        items, validation = items[val_count:], items[:val_count]
    return items, validation


def _dice(model, batch, config) -> float:
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        logits = sliding_window_inference(batch["image"], config["patch_size"], 4, model, overlap=0.25)
    pred = logits.argmax(1, keepdim=True).float()
    truth = batch["label"]
    denominator = float(pred.sum() + truth.sum())
    return 1.0 if denominator == 0 else float(2 * (pred * truth).sum()) / denominator


def train(data_dir: Path, run_dir: Path, config: dict, resume: bool = False, val_count: int = 4) -> dict:
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config.get("seed", 0))
    np.random.seed(config.get("seed", 0))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=1))
    train_items, val_items = _dataset_lists(data_dir, val_count)
    log.info("%d training and %d validation volumes; caching preprocessed volumes", len(train_items), len(val_items))
    t0 = time.perf_counter()
    prep = preprocessing(config)
    train_ds = CacheDataset(train_items, mt.Compose(prep + augmentation(config)), num_workers=config["threads"])
    val_ds = CacheDataset(val_items, mt.Compose(prep), num_workers=config["threads"])
    log.info("cached in %.0f s", time.perf_counter() - t0)
    loader = DataLoader(train_ds, batch_size=max(config["batch_size"] // config["samples_per_volume"], 1),
                        shuffle=True, num_workers=0 if device.type == "cpu" else 4)

    model = build_network(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config["learning_rate"],
                                                    total_steps=config["iterations"], pct_start=0.05)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    state = {"iteration": 0, "best_dice": -1.0, "history": [], "losses": []}
    checkpoint = run_dir / "last.pt"
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        log.info("resumed at iteration %d", state["iteration"])

    t_start, start_iteration, losses = time.perf_counter(), state["iteration"], state["losses"]
    while state["iteration"] < config["iterations"]:
        for batch in loader:
            model.train()
            image, label = batch["image"].to(device), batch["label"].to(device)
            loss = loss_fn(model(image), label)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss))
            state["iteration"] += 1
            it = state["iteration"]
            if it % 20 == 0:
                elapsed = time.perf_counter() - t_start
                log.info("iteration %d/%d loss %.4f lr %.2e (%.2f s/it)", it, config["iterations"],
                         np.mean(losses[-20:]), scheduler.get_last_lr()[0], elapsed / (it - start_iteration))
            if it % config["validate_every"] == 0 or it == config["iterations"]:
                _validate_and_save(model, val_ds, config, state, optimizer, scheduler, run_dir, losses, device)
            if it >= config["iterations"]:
                break
    return state


def _validate_and_save(model, val_ds, config, state, optimizer, scheduler, run_dir, losses, device):
    model.eval()
    t0 = time.perf_counter()
    dice = float(np.mean([_dice(model, {k: v[None].to(device) for k, v in item.items() if k in ("image", "label")}, config)
                          for item in val_ds])) if len(val_ds) else float("nan")
    record = {"iteration": state["iteration"], "train_loss": float(np.mean(losses[-100:])), "val_dice": dice}
    state["history"].append(record)
    log.info("validation at %d: Dice %.4f (%.0f s)", state["iteration"], dice, time.perf_counter() - t0)
    saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "state": state, "config": config}
    if dice >= state["best_dice"] or np.isnan(dice):
        state["best_dice"] = dice
        torch.save(saved, run_dir / "best.pt.tmp")
        (run_dir / "best.pt.tmp").replace(run_dir / "best.pt")
    torch.save(saved, run_dir / "last.pt.tmp")
    (run_dir / "last.pt.tmp").replace(run_dir / "last.pt")
    (run_dir / "history.json").write_text(json.dumps(state["history"], indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with dataset.json")
    parser.add_argument("--run", type=Path, required=True, help="output folder for checkpoints and logs")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--iterations", type=int, help="override the preset's iteration count")
    parser.add_argument("--val-count", type=int, default=4, help="cases held out for validation without a list")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = dict(PRESETS[args.preset], preset=args.preset)
    if args.iterations:
        config["iterations"] = args.iterations
        config["validate_every"] = min(config["validate_every"], args.iterations)
    state = train(args.data, args.run, config, resume=args.resume, val_count=args.val_count)
    print(f"done: {state['iteration']} iterations, best validation Dice {state['best_dice']:.4f} -> {args.run}")


if __name__ == "__main__":
    main()
