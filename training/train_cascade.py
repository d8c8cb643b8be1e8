"""Train the cascade's learned stages on mined candidates and export them to models/cascade_fp.

    python -m training.train_cascade --train runs/cascade/mined/train runs/cascade/mined/train_cpu_model \
        --val runs/cascade/mined/val --out models/cascade_fp [--retention 0.99] [--seeds 0 1 2 3 4]

Input: folders of training.mine_candidates .npz files (never the held-out seeds 3000+ or the real cases),
their candidates and near misses (false). Stage 1, the hand-set feature stage, comes from
OUT/model.json unchanged (where OUT has none yet: from the --init folder's, else from models/cascade_fp).
Every learned stage learns from all training candidates that stage 1 keeps (more examples than its own input),
and its threshold is set on the validation candidates that all earlier stages keep; candidates of label -1
(touching a lesion below Dice 0.1) are left out. Learned stages (--stages), in order of cost:
- `feature_classifier` (optional; not shipped, it removed no validation false positive): a small MLP
  over measured size, shape, HU and location and the multiscale Hessian blob/tube measures
  (standardisation inside the exported module);
- `multiscale_cnn` (the default): one small 3D CNN stream per patch scale (image + candidate mask
  channels), the streams' pooled features joined by a small head; augmentation by flips, in-plane
  transposes, centre jitter and partial outlines (`augment`), since on unfamiliar scans the network
  often outlines only part of a lesion.
Both use class-balanced BCE (positive weight = false / true). The CNN stage is the mean probability of
one network per seed (`--seeds`), each trained for `--epochs` with a cosine learning-rate decay and
taken at its last epoch: validation never picks weights, it only sets thresholds. With --init DIR the CNN
members start from the ensemble exported in DIR (fine-tuning, e.g. on candidates mined from real backgrounds).
Each stage's `max_equivalent_diameter_mm` is the largest size at which it saw both classes: the smaller of the
largest true and the largest false training candidate (equivalent diameter). Larger candidates pass it
unjudged in the app: a stage that never saw a false candidate that large has learned nothing that tells
such a mass from a lesion. Its threshold is the highest that keeps >= `retention` of the true validation
candidates that reach it and that it judges.
Writes OUT/<stage>.ts (TorchScript, probability [N]) and OUT/model.json (stages, thresholds, the
training record).

    python -m training.train_cascade --thresholds-only --init models/cascade_fp --val MINED ... --out OUT \
        --retention 0.99

sets the thresholds of the learned stages exported in --init again on the --val folders, by the same rule, and
keeps their weights and size limits: more validation candidates than a stage was first set on give a threshold
that depends less on its single lowest true score.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from operators.cascade_fp import (cell_centres, equivalent_diameter_mm, load_cascade, run_stages, stage_judges,
                                  stage_probability)

SHIPPED_CASCADE = Path(__file__).resolve().parents[1] / "models" / "cascade_fp"

# + every hessian_* measure of the patch spec; not the network's probabilities, which differ between the
# mining networks and are below the operating threshold for every near miss by construction
FEATURE_STAGE_INPUTS = ["long_axis_mm", "short_axis_mm", "elongation", "mean_hu", "thorax_fraction"]


class Standardized(nn.Module):
    """Lesion probability [N] from features [N, F]: standardise, then a small MLP."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int = 16):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.net = nn.Sequential(nn.Linear(len(mean), hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


def _stream(channels: int, width: int) -> nn.Sequential:
    layers, inputs = [], channels
    for k, outputs in enumerate((width, 2 * width, 4 * width)):
        layers += [nn.Conv3d(inputs, outputs, 3, stride=2 if k == 0 else 1, padding=1), nn.BatchNorm3d(outputs),
                   nn.ReLU(inplace=True)]
        layers += [nn.MaxPool3d(2)] if k < 2 else [nn.AdaptiveAvgPool3d(1), nn.Flatten()]
        inputs = outputs
    return nn.Sequential(*layers)


class MultiscaleCNN(nn.Module):
    """Lesion probability [N] from patches [N, scales, channels, P, P, P]: one 3D CNN stream per scale."""

    def __init__(self, scales: int = 3, channels: int = 2, width: int = 8):
        super().__init__()
        self.streams = nn.ModuleList([_stream(channels, width) for _ in range(scales)])
        self.head = nn.Sequential(nn.Linear(scales * 4 * width, 32), nn.ReLU(inplace=True), nn.Dropout(0.3),
                                  nn.Linear(32, 1))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([stream(x[:, s]) for s, stream in enumerate(self.streams)], dim=1))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(x))


class MeanProbability(nn.Module):
    """The mean of its members' probabilities [N]: an ensemble exported as one module."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def load_folders(folders: list[Path]) -> dict:
    """All candidates of the mined .npz files in `folders`: features (dicts), patches (float16), labels, and
    whether each is a near miss (mine_candidates.near_misses, label 0)."""
    features, patches, labels, near_miss, cases = [], [], [], [], []
    for folder in folders:
        for path in sorted(folder.glob("*.npz")):
            with np.load(path) as stored:
                names = [str(n) for n in stored["feature_names"]]
                for rows, stored_patches, stored_labels in (
                        (stored["features"], stored["patches"], stored["label"]),
                        (stored["near_miss_features"], stored["near_miss_patches"],
                         np.zeros(len(stored["near_miss_features"]), np.int8))):
                    features += [dict(zip(names, map(float, row))) for row in rows]
                    patches.append(stored_patches)
                    labels.append(stored_labels)
                near_miss += [False] * len(stored["label"]) + [True] * len(stored["near_miss_features"])
                cases.append(path.stem)
    return {"features": features, "patches": np.concatenate(patches), "labels": np.concatenate(labels),
            "near_miss": np.array(near_miss, bool), "cases": cases}


def threshold_for_retention(probabilities: np.ndarray, retention: float) -> float:
    """The highest threshold (keep p >= threshold) that keeps >= `retention` of these true candidates."""
    ordered = np.sort(probabilities)
    return float(ordered[int(math.floor((1 - retention) * len(ordered) + 1e-9))]) if len(ordered) else 0.0


def _balanced_loss(labels: np.ndarray) -> nn.BCEWithLogitsLoss:
    positives = max(int(labels.sum()), 1)
    return nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(labels) - positives) / positives, dtype=torch.float32))


def train_feature_classifier(x: np.ndarray, y: np.ndarray, steps: int = 600,
                             seed: int = 0) -> tuple[Standardized, list]:
    """Full-batch Adam on standardised features; returns the model and its loss per step."""
    torch.manual_seed(seed)
    model = Standardized(x.mean(axis=0), x.std(axis=0) + 1e-6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    loss_fn, inputs, targets = _balanced_loss(y), torch.as_tensor(x), torch.as_tensor(y, dtype=torch.float32)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model.logits(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model.eval(), losses


def augment(batch: np.ndarray, rng: np.random.Generator, fov_mm, partial: float = 0.5,
            jitter_mm: float = 2.0) -> np.ndarray:
    """Per patch, the same for every scale and channel: random flips (z, y, x) and in-plane transpose;
    with probability `partial` a partial outline (the mask cut by a random plane through it and the patch
    re-centred on what is left, as the network's outline of part of a lesion is centred); and a random
    shift of the centre by up to `jitter_mm` per axis."""
    out = batch.astype(np.float32)
    size = out.shape[-1]
    steps = cell_centres(size)
    grids = [np.stack(np.meshgrid(*[steps * fov] * 3, indexing="ij")) for fov in fov_mm]  # mm, [3, P, P, P]
    for n in range(len(out)):
        for axis in (-3, -2, -1):
            if rng.random() < 0.5:
                out[n] = np.flip(out[n], axis)
        if rng.random() < 0.5:
            out[n] = np.swapaxes(out[n], -2, -1)
        centre = rng.uniform(-jitter_mm, jitter_mm, 3)
        if rng.random() < partial:
            centre += _cut_mask(out[n], grids, rng)
        for s, fov in enumerate(fov_mm):
            shift = -centre * size / fov  # voxels
            out[n, s, 0] = ndimage.shift(out[n, s, 0], shift, order=1, mode="nearest")
            out[n, s, 1] = ndimage.shift(out[n, s, 1], shift, order=0, mode="nearest")
    return out


def _cut_mask(patch: np.ndarray, grids: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Cut the candidate mask of every scale of `patch` (in place) by one random plane, keeping 20-90 % of
    it at the finest scale; `grids` are each scale's cell positions (mm from the patch centre, z y x).
    Returns the centroid (mm) of what is left."""
    inside = patch[0, 1] > 0.5
    if inside.sum() < 8:
        return np.zeros(3)
    normal = rng.normal(size=3)
    normal /= np.linalg.norm(normal)
    offset = np.quantile(np.tensordot(normal, grids[0], 1)[inside], rng.uniform(0.2, 0.9))
    for s, grid in enumerate(grids):
        patch[s, 1] *= np.tensordot(normal, grid, 1) <= offset
    left = patch[0, 1] > 0.5
    return grids[0][:, left].mean(axis=1) if left.any() else np.zeros(3)


def predict(model: nn.Module, patches: np.ndarray, batch: int = 64) -> np.ndarray:
    model.eval()
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(patches[i:i + batch].astype(np.float32))).numpy()
                               for i in range(0, len(patches), batch)] or [np.zeros(0, np.float32)])


def false_kept(probabilities: np.ndarray, labels: np.ndarray, retention: float) -> float:
    """Share of false candidates kept at the threshold that keeps `retention` of the true ones."""
    threshold = threshold_for_retention(probabilities[labels == 1], retention)
    return float((probabilities[labels == 0] >= threshold).mean()) if (labels == 0).any() else 0.0


def train_cnn(patches: np.ndarray, y: np.ndarray, val_patches: np.ndarray, val_y: np.ndarray, retention: float,
              fov_mm, epochs: int = 40, batch: int = 32, seed: int = 0, log=print, init: nn.Module | None = None,
              learning_rate: float = 2e-3) -> tuple[MultiscaleCNN, list]:
    """Train the multiscale CNN (from `init`'s weights when given) for `epochs` with a cosine learning-rate decay
    and return its final weights; the validation candidates are only watched (share of false kept at
    `retention`), never used to pick."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = MultiscaleCNN(scales=patches.shape[1], channels=patches.shape[2])
    if init is not None:
        model.load_state_dict(init.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    loss_fn = _balanced_loss(y)
    history, start = [], time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order, losses = rng.permutation(len(y)), []
        for i in range(0, len(order), batch):
            index = np.sort(order[i:i + batch])
            if len(index) < 2:  # batch norm needs two samples
                continue
            inputs = torch.from_numpy(augment(patches[index], rng, fov_mm))
            optimizer.zero_grad()
            loss = loss_fn(model.logits(inputs), torch.as_tensor(y[index], dtype=torch.float32))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        schedule.step()
        kept = false_kept(predict(model, val_patches), val_y, retention) if len(val_y) else 0.0
        history.append({"epoch": epoch, "loss": float(np.mean(losses)), "val_false_kept": kept})
        log(f"  seed {seed} epoch {epoch}/{epochs}: loss {np.mean(losses):.4f}, validation false kept {kept:.3f} "
            f"({time.perf_counter() - start:.0f} s)")
    return model.eval(), history


def export_stage(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """TorchScript (traced) next to model.json; refuses an export that differs from the eager model."""
    model.eval()
    with torch.no_grad():
        scripted = torch.jit.trace(model, example)
        if not torch.allclose(model(example), scripted(example), atol=1e-5):
            raise RuntimeError(f"TorchScript output of {path.name} differs from the eager model")
    tmp = path.with_name(path.name + ".tmp")
    torch.jit.save(scripted, str(tmp))
    tmp.replace(path)


def _survivors(data: dict, stages: list[dict]) -> np.ndarray:
    """Indices of the candidates that `stages` keep (features get "dropped_by" on fresh copies)."""
    features = [{k: v for k, v in f.items() if k != "dropped_by"} for f in data["features"]]
    run_stages(features, stages, lambda index: data["patches"][index])
    return np.array([i for i, f in enumerate(features) if "dropped_by" not in f], np.int64)


def _counts(data: dict) -> dict:
    labels = data["labels"]
    return {"true": int((labels == 1).sum()), "false": int((labels == 0).sum()), "ambiguous": int((labels == -1).sum()),
            "near_misses": int(data["near_miss"].sum())}


LEARNED_STAGES = ("feature_classifier", "multiscale_cnn")


def judged_size_limit(features: list[dict], labels: np.ndarray) -> float:
    """The largest equivalent diameter (mm) at which these training candidates hold both true and false ones."""
    sizes = np.array([equivalent_diameter_mm(f["volume_ml"]) for f in features])
    return float(min(sizes[labels == 1].max(), sizes[labels == 0].max()))


def shipped_members(init_dir: Path, count: int) -> list[MultiscaleCNN]:
    """The members of the multiscale CNN ensemble exported in `init_dir` (its .ts weights, as eager modules)."""
    ensemble = MeanProbability([MultiscaleCNN() for _ in range(count)])
    ensemble.load_state_dict(torch.jit.load(str(init_dir / "multiscale_cnn.ts")).state_dict())
    return list(ensemble.members)


def cascade_spec(out: Path, init_dir: Path | None) -> dict:
    """The cascade that the learned stages are trained into: OUT's model.json, else that of `init_dir`, else the
    shipped one (its hand-set stage is kept unchanged)."""
    sources = [d / "model.json" for d in (out, init_dir, SHIPPED_CASCADE) if d]
    return json.loads(next(path for path in sources if path.exists()).read_text())


def train_cascade(train_dirs: list[Path], val_dirs: list[Path], out: Path, retention: float = 0.98,
                  epochs: int = 40, learned=LEARNED_STAGES, seeds=(0,), log=print, init_dir: Path | None = None,
                  learning_rate: float = 2e-3) -> dict:
    cascade = cascade_spec(out, init_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = [s for s in cascade["stages"] if s["type"] == "features"]
    start = time.perf_counter()
    train, val = load_folders(train_dirs), load_folders(val_dirs)
    log(f"loaded {len(train['labels'])} training candidates {_counts(train)} from {len(train['cases'])} "
        f"cases, {len(val['labels'])} validation {_counts(val)} from {len(val['cases'])} cases "
        f"({time.perf_counter() - start:.0f} s)")
    inputs = FEATURE_STAGE_INPUTS + sorted(k for k in train["features"][0] if k.startswith("hessian_"))
    record = {"retention_target": retention, "epochs": epochs, "seeds": list(seeds), "learning_rate": learning_rate,
              "init": str(init_dir) if init_dir else None,
              "train": {"folders": [str(d) for d in train_dirs], "cases": len(train["cases"]),
                        "candidates": _counts(train)},
              "validation": {"folders": [str(d) for d in val_dirs], "cases": len(val["cases"]),
                             "candidates": _counts(val)}, "stages": {}}
    next_order = max(s["order"] for s in stages) + 1
    train_index = _survivors(train, stages)  # every learned stage learns from all that the feature stage keeps
    for name in learned:
        stage_start = time.perf_counter()
        index = [i for i in train_index if train["labels"][i] >= 0]
        val_index = np.array([i for i in _survivors(val, stages) if val["labels"][i] >= 0], np.int64)
        y, val_y = train["labels"][index].astype(np.float32), val["labels"][val_index]
        log(f"{name}: {len(index)} training candidates ({int(y.sum())} true), {len(val_index)} validation "
            f"({int((val_y == 1).sum())} true)")
        if min(y.sum(), len(y) - y.sum(), (val_y == 1).sum(), (val_y == 0).sum()) < 2:
            raise ValueError(f"{name}: too few true or false candidates to train and set a threshold; mine more cases")
        if name == "feature_classifier":
            x = np.array([[train["features"][i][k] for k in inputs] for i in index], np.float32)
            model, losses = train_feature_classifier(x, y)
            val_x = np.array([[val["features"][i][k] for k in inputs] for i in val_index], np.float32)
            with torch.inference_mode():
                val_p = model(torch.as_tensor(val_x)).numpy()
            example, history = torch.as_tensor(val_x[:4] if len(val_x) >= 4 else x[:4]), {"loss_first": losses[0],
                                                                                             "loss_last": losses[-1]}
            stage = {"input": "features", "feature_names": inputs}
        else:
            inits = shipped_members(init_dir, len(seeds)) if init_dir else [None] * len(seeds)
            members = [train_cnn(train["patches"][index], y, val["patches"][val_index], val_y, retention,
                                 cascade["patches"]["fov_mm"], epochs=epochs, seed=seed, log=log, init=init,
                                 learning_rate=learning_rate) for seed, init in zip(seeds, inits)]
            model, history = MeanProbability([m for m, _ in members]), [h for _, h in members]
            val_p = predict(model, val["patches"][val_index])
            example = torch.from_numpy(train["patches"][index[:4]].astype(np.float32))
            stage = {"input": "patches"}
        largest = judged_size_limit([train["features"][i] for i in index], y)
        size_limit = {"max_equivalent_diameter_mm": round(largest, 1)}
        judged = np.array([stage_judges(size_limit, val["features"][i]) for i in val_index], bool)
        val_p, val_y = val_p[judged], val_y[judged]
        summary = threshold_summary(val_p, val_y, retention)
        export_stage(model, example, out / f"{name}.ts")
        stage = {"order": next_order, "name": name, "type": "torchscript", "file": f"{name}.ts", **stage,
                 "threshold": summary["threshold"], **size_limit}
        next_order += 1
        stages.append({**stage, "module": torch.jit.load(str(out / f"{name}.ts"))})
        record["stages"][name] = {**summary, "history": history, "seconds": time.perf_counter() - stage_start}
        log(f"{name}: judges candidates up to {size_limit['max_equivalent_diameter_mm']:.1f} mm (equivalent diameter); "
            f"{_kept_text(summary)} ({time.perf_counter() - stage_start:.0f} s)")
    cascade["stages"] = [{k: v for k, v in s.items() if k != "module"} for s in stages]
    cascade["training"] = record
    (out / "model.json").write_text(json.dumps(cascade, indent=2) + "\n")
    return record


def threshold_summary(p: np.ndarray, labels: np.ndarray, retention: float) -> dict:
    """A stage's threshold on the validation scores `p` of the candidates it judges (labels 1 true, 0 false), and
    the share of each class it keeps."""
    threshold = threshold_for_retention(p[labels == 1], retention)
    kept = p >= threshold
    return {"threshold": threshold, "validation_true_kept": float(kept[labels == 1].mean()),
            "validation_false_kept": float(kept[labels == 0].mean()),
            "validation_judged": {"true": int((labels == 1).sum()), "false": int((labels == 0).sum())}}


def _kept_text(summary: dict) -> str:
    judged = summary["validation_judged"]
    return (f"threshold {summary['threshold']:.4f} keeps {summary['validation_true_kept']:.3f} of the {judged['true']} "
            f"true and {summary['validation_false_kept']:.3f} of the {judged['false']} false validation candidates "
            f"it judges")


def set_thresholds(cascade_dir: Path, val_dirs: list[Path], out: Path, retention: float, log=print) -> dict:
    """Set the threshold of every learned stage of the cascade in `cascade_dir` on `val_dirs` (module docstring);
    write OUT/model.json with its stage files. Returns the record of the new thresholds."""
    cascade = load_cascade(cascade_dir)
    val = load_folders(val_dirs)
    log(f"loaded {len(val['labels'])} validation candidates {_counts(val)} from {len(val['cases'])} cases")
    out.mkdir(parents=True, exist_ok=True)
    stages, record = [], {"retention_target": retention, "folders": [str(d) for d in val_dirs], "stages": {}}
    for stage in sorted(cascade["stages"], key=lambda s: s["order"]):
        if stage["type"] != "features":
            index = [i for i in _survivors(val, stages)
                     if val["labels"][i] >= 0 and stage_judges(stage, val["features"][i])]
            p = stage_probability(stage, [val["features"][i] for i in index], val["patches"][index])
            summary = threshold_summary(p, val["labels"][index], retention)
            record["stages"][stage["name"]] = {"previous_threshold": stage["threshold"], **summary}
            log(f"{stage['name']}: previous threshold {stage['threshold']:.4f}; {_kept_text(summary)}")
            stage["threshold"] = summary["threshold"]
            if out.resolve() != cascade_dir.resolve():
                shutil.copyfile(cascade_dir / stage["file"], out / stage["file"])
        stages.append(stage)
    cascade["stages"] = [{k: v for k, v in s.items() if k != "module"} for s in stages]
    cascade.setdefault("training", {})["thresholds_set_again"] = record
    (out / "model.json").write_text(json.dumps(cascade, indent=2) + "\n")
    return record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, nargs="+", help="mined candidate folders")
    parser.add_argument("--val", type=Path, nargs="+", required=True, help="mined folders for thresholds")
    parser.add_argument("--out", type=Path, default=Path("models/cascade_fp"))
    parser.add_argument("--retention", type=float, default=0.98, help="share of true candidates each stage keeps")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one CNN per seed (initialisation, order, augmentation); the stage is their mean")
    parser.add_argument("--stages", nargs="+", choices=LEARNED_STAGES, default=["multiscale_cnn"],
                        help="learned stages to train, in cascade order")
    parser.add_argument("--init", type=Path, help="fine-tune the multiscale CNN ensemble exported in this folder "
                        "(one member per seed)")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--thresholds-only", action="store_true",
                        help="only set the thresholds of the cascade in --init again on --val (no training)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.thresholds_only:
        if not args.init:
            parser.error("--thresholds-only needs --init (the cascade whose thresholds are set)")
        set_thresholds(args.init, args.val, args.out, args.retention, log=lambda line: print(line, flush=True))
        return
    if not args.train:
        parser.error("--train is required (unless --thresholds-only)")
    train_cascade(args.train, args.val, args.out, args.retention, args.epochs, args.stages, args.seeds,
                  log=lambda line: print(line, flush=True), init_dir=args.init, learning_rate=args.learning_rate)


if __name__ == "__main__":
    main()
