"""Export a training run to models/lesion_seg: TorchScript weights and every inference setting.

    python -m training.export --run runs/lesion_seg --out models/lesion_seg
    python -m training.export --average FIRST_MODEL_DIR SECOND_MODEL_DIR --out models/lesion_seg
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from operators.lesion_segmentation import intensity_windows
from training.train import build_network

INFERENCE = {
    # Sliding window settings for the app; the window may be larger than the training patch.
    "patch_size": [64, 128, 128],
    "overlap": 0.25,
    "sw_batch_size": 1,
    "precision": {"cpu": "bfloat16", "cuda": "float16"},  # autocast where it leaves detection unchanged (README Speed)
    "probability_threshold": 0.5,
}


def save_scripted(module: torch.jit.ScriptModule, out_dir: Path) -> Path:
    """out_dir/model.ts, written under a temporary name first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.ts.tmp"
    torch.jit.save(module, str(tmp))
    return tmp.replace(out_dir / "model.ts")


def export(run_dir: Path, out_dir: Path, checkpoint: str = "best.pt") -> Path:
    saved = torch.load(run_dir / checkpoint, map_location="cpu", weights_only=False)
    config = saved["config"]
    model = build_network(config)
    model.load_state_dict(saved["model"])
    model.eval()
    example = torch.zeros(1, len(intensity_windows(config)), *config["patch_size"])
    with torch.no_grad():
        scripted = torch.jit.trace(model, example)
        eager_out, scripted_out = model(example), scripted(example)
    if not torch.allclose(eager_out, scripted_out, atol=1e-4):
        raise RuntimeError("TorchScript output differs from the eager model")
    path = save_scripted(scripted, out_dir)
    spec = {
        "name": "lesion_seg",
        "file": "model.ts",
        "architecture": f"MONAI DynUNet, residual blocks, instance norm, filters {config['filters']}",
        "input": f"[N, {len(intensity_windows(config))}, z, y, x] float32: HU clipped to each intensity window "
                 "(intensity_window_hu, then soft_tissue_window_hu where given), scaled linearly to [0, 1]",
        "output": "[N, 2, z, y, x] logits; softmax channel 1 is the lesion probability",
        "axes": "z, y, x = slice (ascending along the slice normal), row (anterior->posterior), column (right->left)",
        "spacing_mm": config["spacing_mm"],
        **{key: config[key] for key in ("intensity_window_hu", "soft_tissue_window_hu") if key in config},
        **INFERENCE,
        "training": {
            "preset": config.get("preset"),
            "iterations": saved["state"]["iteration"],
            "training_patch_size": config["patch_size"],
            "best_validation_dice": saved["state"]["best_dice"],
        },
    }
    (out_dir / "model.json").write_text(json.dumps(spec, indent=1) + "\n")
    return path


def average_exports(first: Path, second: Path, out_dir: Path, share: float = 0.5) -> Path:
    """A network whose weights are (1 - share) x the first exported network's plus share x the second's (a "model
    soup": both must be fine-tunings of one network, same architecture), with the first's inference settings."""
    model = torch.jit.load(str(first / "model.ts"))
    other = torch.jit.load(str(second / "model.ts")).state_dict()
    mixed = set()  # DynUNet's skip layers alias its blocks: each tensor is mixed once
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and tensor.data_ptr() not in mixed:
                mixed.add(tensor.data_ptr())
                tensor.copy_((1 - share) * tensor + share * other[name])
    path = save_scripted(model, out_dir)
    spec, second_spec = (json.loads((folder / "model.json").read_text()) for folder in (first, second))
    spec["training"] = {"weights": f"{1 - share:g} x the first network's + {share:g} x the second's",
                        "first": spec["training"], "second": second_spec["training"]}
    (out_dir / "model.json").write_text(json.dumps(spec, indent=1) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path)
    source.add_argument("--average", type=Path, nargs=2, metavar=("FIRST", "SECOND"),
                        help="two exported networks (model folders) whose weights are mixed instead")
    parser.add_argument("--share", type=float, default=0.5,
                        help="with --average: the second network's share (2, with a mean of two networks second and "
                             "one of the two first, gives back the other)")
    parser.add_argument("--out", type=Path, default=Path("models/lesion_seg"))
    parser.add_argument("--checkpoint", default="best.pt")
    args = parser.parse_args(argv)
    if args.average:
        print(average_exports(*args.average, args.out, args.share))
    else:
        print(export(args.run, args.out, args.checkpoint))


if __name__ == "__main__":
    main()
