"""Export a training run to models/lesion_seg: TorchScript weights and every inference setting.

    python -m training.export --run runs/lesion_seg --out models/lesion_seg
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
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.ts.tmp"
    torch.jit.save(scripted, str(tmp))
    tmp.replace(out_dir / "model.ts")
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
    return out_dir / "model.ts"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("models/lesion_seg"))
    parser.add_argument("--checkpoint", default="best.pt")
    args = parser.parse_args(argv)
    print(export(args.run, args.out, args.checkpoint))


if __name__ == "__main__":
    main()
