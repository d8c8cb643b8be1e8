"""Lesion probability by the 3D network (sliding window) and candidate instances.

Plain functions, free of app state (training/evaluate imports them):
- `predict_lesion_probability(hu, spacing, model, config, device)`: float32 probability on the input
  grid, following models/lesion_seg/model.json (docs/ARCHITECTURE.md): resample to `spacing_mm`,
  `network_input` (the HU clipped to each of `intensity_windows` and scaled to [0, 1]), sliding window over
  `patch_size` with `overlap` in the device's `precision`, softmax channel 1 (averaged over the mirrors of
  `mirror_axes`, where given), trilinear back to the input grid.
- `inference_device()`: CUDA when there is a GPU, else the CPU.
- `inference_precision(config, device)`: the precision the network runs in on this device.
- `prepared_network(module, device)`: the TorchScript network on the device, frozen for inference.
- `extract_candidates(probability, threshold, spacing)`: 26-connected instances above the
  threshold with each one's maximum and mean probability.

LesionSegmentationOperator loads models/<model_name>/model.ts through the SDK's model factory and
model.json beside it; it runs on CUDA when available.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.core.models import ModelFactory

from operators.measurements import label_instances
from operators.thorax_crop import ThoraxCrop
from operators.volume import CTVolume, timed_compute

log = logging.getLogger(__name__)

MIN_CANDIDATE_MM3 = 30.0  # specks below this are noise, far below a 10 mm lesion (about 520 mm3)


@dataclass
class Candidates:
    """Instances (int32, 0 background, 1..n) and, at index k - 1, instance k's probabilities."""

    labels: np.ndarray
    max_probability: np.ndarray
    mean_probability: np.ndarray

    @property
    def count(self) -> int:
        return len(self.max_probability)


def _resize(volume: torch.Tensor, shape) -> torch.Tensor:
    return torch.nn.functional.interpolate(volume, size=tuple(int(n) for n in shape), mode="trilinear",
                                           align_corners=False)


def _mirrored(volume: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return volume.flip(dims) if dims else volume  # no copy for the unmirrored pass


def intensity_windows(config: dict) -> list[list[float]]:
    """The HU windows, one per input channel: `intensity_window_hu`, then `soft_tissue_window_hu` where given."""
    return [config[key] for key in ("intensity_window_hu", "soft_tissue_window_hu") if key in config]


def network_input(hu: torch.Tensor, config: dict) -> torch.Tensor:
    """HU with a channel axis of one at dim -4 ([1, ...] or [N, 1, ...]) -> one channel per intensity window, each
    clipped to its window and scaled to [0, 1]."""
    channels = [(hu.clamp(low, high) - low) / (high - low) for low, high in intensity_windows(config)]
    return channels[0] if len(channels) == 1 else torch.cat(channels, dim=-4)


def inference_device() -> str:
    """Where the network runs: CUDA when there is a GPU, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def inference_precision(config: dict, device) -> torch.dtype:
    """The precision of model.json's `precision` for this device type: float32 where none is given, and for
    bfloat16 on a CPU without native bfloat16 (emulated, it is slower)."""
    kind = torch.device(device).type
    name = config.get("precision", {}).get(kind, "float32")
    if kind == "cpu" and name == "bfloat16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return getattr(torch, name)


def prepared_network(module: torch.jit.ScriptModule, device) -> torch.jit.ScriptModule:
    """The network on `device`, frozen for inference (weights inlined as constants): the same float32 results,
    and about a quarter faster under bfloat16 autocast on a CPU (models/lesion_seg/README.md)."""
    return torch.jit.freeze(module.to(device).eval())


def mirrors(config: dict) -> list[tuple[int, ...]]:
    """The tensor dimensions ([N, C, z, y, x]) flipped in each pass: every combination of model.json's
    `mirror_axes` (z, y, x = 0, 1, 2), the unflipped pass first; one pass where none are given."""
    dims = [axis + 2 for axis in config.get("mirror_axes", [])]
    return [flipped for count in range(len(dims) + 1) for flipped in itertools.combinations(dims, count)]


def predict_lesion_probability(hu: np.ndarray, spacing, model, config: dict, device="cpu") -> np.ndarray:
    """Lesion probability (float32, the shape of `hu`) from a network with 2 output channels, run under autocast in
    its `inference_precision`, averaged over the `mirrors` of the image."""
    work_shape = np.maximum(np.round(np.asarray(hu.shape) * np.asarray(spacing) / config["spacing_mm"]), 1)
    precision = inference_precision(config, device)

    def network(window: torch.Tensor) -> torch.Tensor:  # windows are blended in float32
        with torch.autocast(torch.device(device).type, dtype=precision, enabled=precision != torch.float32):
            return model(window).float()

    def lesion_channel(image: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:  # one pass, mirrored along dims
        logits = sliding_window_inference(_mirrored(image, dims), config["patch_size"], config.get("sw_batch_size", 1),
                                          network, overlap=config.get("overlap", 0.5), mode="gaussian")
        return _mirrored(torch.softmax(logits, dim=1)[:, 1:2], dims)

    with torch.inference_mode():
        image = _resize(torch.as_tensor(hu, dtype=torch.float32, device=device)[None, None], work_shape)
        image = network_input(image, config)
        first, *others = mirrors(config)
        probability = lesion_channel(image, first)
        for dims in others:
            probability += lesion_channel(image, dims)
        if others:
            probability /= 1 + len(others)
        return _resize(probability, hu.shape)[0, 0].cpu().numpy()


def extract_candidates(probability: np.ndarray, threshold: float, spacing,
                       min_volume_mm3: float = MIN_CANDIDATE_MM3) -> Candidates:
    """Instances of `probability >= threshold`, specks under `min_volume_mm3` dropped, numbered 1..n."""
    mask = probability >= threshold
    corners = np.unravel_index(np.flatnonzero(mask), mask.shape)  # labelled within the mask's bounding box only
    box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in corners) if len(corners[0]) else (slice(0, 0),) * 3
    labels, count = label_instances(mask[box])
    inside = labels > 0  # instance statistics over these voxels only, not whole volumes per label
    ids, values = labels[inside], probability[box][inside]
    voxels = np.bincount(ids, minlength=count + 1)
    kept = np.flatnonzero(voxels[1:] * float(np.prod(spacing)) >= min_volume_mm3) + 1
    renumber = np.zeros(count + 1, np.int32)
    renumber[kept] = np.arange(1, len(kept) + 1)
    maximum = np.zeros(count + 1, np.float32)
    np.maximum.at(maximum, ids, values)
    total = np.bincount(ids, weights=values, minlength=count + 1)
    instances = np.zeros(probability.shape, np.int32)
    instances[box][inside] = renumber[ids]  # written at the instances' voxels only: untouched zero pages cost nothing
    return Candidates(
        labels=instances,
        max_probability=maximum[kept],
        mean_probability=(total[kept] / voxels[kept]).astype(np.float32),
    )


def load_model_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "model.json").read_text())


class LesionSegmentationOperator(Operator):
    """Ports in: "volume" (CTVolume), "thorax" (ThoraxCrop); out: the same two and "candidates"
    (Candidates in the thorax box's frame)."""

    def __init__(self, fragment: Fragment, *args, app_context, model_name: str = "lesion_seg", **kwargs):
        model_dir = Path(app_context.model_path) / model_name
        self.device = inference_device()
        self.config = load_model_config(model_dir)
        model = ModelFactory.create(model_dir / self.config.get("file", "model.ts"), model_name)
        if model is None:
            raise FileNotFoundError(f"no TorchScript model {model_name!r} in {model_dir}")
        self.network = prepared_network(model.predictor, self.device)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("volume")
        spec.input("thorax")
        for name in ("volume", "thorax", "candidates"):
            spec.output(name)

    @timed_compute
    def compute(self, op_input, op_output, context):
        volume: CTVolume = op_input.receive("volume")
        thorax: ThoraxCrop = op_input.receive("thorax")
        probability = predict_lesion_probability(volume.hu[thorax.box], volume.spacing, self.network,
                                                 self.config, self.device)
        candidates = extract_candidates(probability, self.config["probability_threshold"], volume.spacing)
        log.info("%d candidates on %s in %s (%s)", candidates.count, self.device,
                 inference_precision(self.config, self.device), self.config.get("name", "model"))
        if self.device == "cuda":
            log.info("peak GPU memory %d MiB", torch.cuda.max_memory_allocated() // 2**20)
        op_output.emit(volume, "volume")
        op_output.emit(thorax, "thorax")
        op_output.emit(candidates, "candidates")
