"""Mine lesion candidates for the cascade: the segmentation network's candidates on cases with truth,
each labelled true or false, with its measured and Hessian features and multiscale patches.

    python -m training.mine_candidates --seeds 4000-4039 --out runs/cascade/mined/train --workers 2
    python -m training.mine_candidates --seeds 4000-4039 --seg-model OTHER_NET --out runs/cascade/mined/train_other
    python -m training.mine_candidates --images data/phantoms/imagesTr --labels data/phantoms/labelsTr --out ...
    python -m training.mine_candidates --images data/real/images --labels data/real/labels --out runs/cascade/mined/real

Cases come from phantom seeds (training.phantom.generate_phantom, nothing written to disk) or from
NIfTI image + instance-label folders (phantom datasets, lesion-inserted backgrounds from
training.insert_lesions, the real cases from training.real_cases; a cases.json beside the images
folder may mark boxes-only truth). Per case, as the app does: thorax box (operators.thorax_crop),
lesion probability and candidates (operators.lesion_segmentation, models/lesion_seg), features and
patches (operators.cascade_fp, the `patches` spec of models/cascade_fp/model.json).

Candidate labels follow training/metrics.py: 1 = it detects a truth lesion (Dice >= 0.1; boxes-only
truth: any overlap), 0 = it touches no truth lesion (a false positive), -1 = it touches one below
Dice 0.1 (neither; left out of training). OUT/<case>.npz (compressed) holds per candidate `label`,
`match_dice`, `lesion_diameter_mm` (of the matched lesion), `feature_names` x `features`, `patches`
(float16 [N, scales, 2, size, size, size]) and, on the evaluation box (thorax box and every truth
voxel), `candidate_labels` and `truth` for training.ablation. A case whose .npz exists is skipped.
Candidates touching IGNORE voxels (training.real_backgrounds: regions of real CT that may hold an unlabelled
lesion) are -1, and near misses there are not taken.

False candidates are rare with a good network, so every case also stores its near misses (`near_misses`:
instances of probability >= NEAR_MISS_THRESHOLD that never reach the operating threshold and touch no
lesion) as `near_miss_features` and `near_miss_patches`, extra false examples that training.ablation
ignores. A second, weaker network (--seg-model) adds more and different false candidates to a training
folder; validation, held-out and real folders are mined with the shipped network, whose candidates the
app sees.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from operators.cascade_fp import thorax_region, candidate_features, hessian_features, multiscale_patches
from operators.lesion_segmentation import (Candidates, extract_candidates, load_model_config, predict_lesion_probability,
                                          prepared_network)
from operators.measurements import axial_diameters
from operators.thorax_crop import NoThoraxError, crop_thorax
from operators.volume import keep_freed_memory, return_freed_memory
from training.metrics import DETECTION_DICE
from training.nifti import read_nifti
from training.phantom import generate_phantom
from training.train import IGNORE

REPO = Path(__file__).resolve().parents[1]
SUFFIX = ".nii.gz"
NEAR_MISS_THRESHOLD = 0.2  # near misses: instances of probability >= this that never reach the operating threshold


def phantom_case(seed: int, slices: int | None = None) -> dict:
    phantom = generate_phantom(seed, slices=slices)
    return {"hu": phantom.hu.astype(np.float32), "truth": phantom.label, "spacing": phantom.spacing, "boxes_only": False,
            "source": {"seed": seed, "slices": slices}}


def nifti_case(image: Path, label: Path, boxes_only: bool) -> dict:
    hu, spacing = read_nifti(image)
    truth, _ = read_nifti(label)
    return {"hu": np.asarray(hu, np.float32), "truth": np.rint(truth).astype(np.int16), "spacing": spacing,
            "boxes_only": boxes_only, "source": {"image": str(image)}}


def match_candidates(candidates: np.ndarray, truth: np.ndarray, truth_voxels: np.ndarray, count: int,
                     boxes_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per candidate 1..count: label (1 detects a lesion, 0 touches none, -1 touches one below Dice 0.1),
    best Dice and the truth lesion it matches best (0 for none). `truth_voxels[j]` is lesion j's size."""
    both = (candidates > 0) & (truth > 0)
    stride = np.int64(len(truth_voxels))
    pairs, overlap = np.unique(candidates[both] * stride + truth[both], return_counts=True)
    candidate, lesion = pairs // stride, pairs % stride
    sizes = np.bincount(candidates.ravel(), minlength=count + 1)
    dice = 2 * overlap / (sizes[candidate] + truth_voxels[lesion])
    best_dice, best_lesion = np.zeros(count + 1), np.zeros(count + 1, np.int64)
    for c, j, d in zip(candidate, lesion, dice):
        if d > best_dice[c]:
            best_dice[c], best_lesion[c] = d, j
    touching = np.zeros(count + 1, bool)
    touching[candidate] = True
    detects = touching if boxes_only else best_dice >= DETECTION_DICE
    label = np.where(detects, 1, np.where(touching, -1, 0)).astype(np.int8)
    return label[1:], best_dice[1:].astype(np.float32), best_lesion[1:]


def _box_array(box) -> np.ndarray:
    return np.array([[s.start, s.stop] for s in box], np.int32)


def describe(candidates: Candidates, crop: np.ndarray, spacing, region: np.ndarray,
             patch_spec: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Feature names, features [N, F] (measured and Hessian) and multiscale patches of the candidates."""
    features = candidate_features(candidates, crop, spacing, region)
    patches = multiscale_patches(candidates.labels, crop, spacing, patch_spec)
    for feature, measures in zip(features, hessian_features(patches, patch_spec)):
        feature.update(measures)
    names = list(features[0]) if features else []
    values = np.array([[f[n] for n in names] for f in features], np.float32).reshape(len(features), len(names))
    return names, values, patches


def near_misses(probability: np.ndarray, truth: np.ndarray, threshold: float, near_threshold: float,
                spacing) -> Candidates:
    """Instances of `probability >= near_threshold` that stay below `threshold` and touch no truth lesion:
    what the network almost took for a lesion, extra false examples for the cascade."""
    near = extract_candidates(probability, near_threshold, spacing)
    touching = np.unique(near.labels[truth > 0])
    kept = [k for k in range(1, near.count + 1) if near.max_probability[k - 1] < threshold and k not in touching]
    renumber = np.zeros(near.count + 1, np.int32)
    renumber[kept] = np.arange(1, len(kept) + 1)
    index = np.asarray(kept, np.int64) - 1
    return Candidates(renumber[near.labels], near.max_probability[index], near.mean_probability[index])


def mine_case(name: str, case: dict, model, seg_config: dict, patch_spec: dict,
              near_threshold: float = NEAR_MISS_THRESHOLD) -> tuple[dict, dict]:
    """Everything OUT/<case>.npz stores for one case, and the step timings (s)."""
    times = {}
    hu, truth, spacing = case["hu"], case["truth"], case["spacing"]
    start = time.perf_counter()
    try:
        thorax = crop_thorax(hu, spacing)
    except NoThoraxError:
        thorax = None
    times["thorax"] = time.perf_counter() - start
    truth_box = ndimage.find_objects((truth > 0).astype(np.int8))
    boxes = ([thorax.box] if thorax else []) + [b for b in truth_box if b is not None]
    eval_box = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3)) \
        if boxes else (slice(0, 1),) * 3
    candidate_labels = np.zeros([s.stop - s.start for s in eval_box], np.int32)
    size = int(patch_spec["size"])
    no_patches = np.zeros((0, len(patch_spec["fov_mm"]), 2, size, size, size), np.float32)
    names, values, patches = [], np.zeros((0, 0), np.float32), no_patches
    near_values, near_patches = values, no_patches
    label = dice = diameter = np.zeros(0, np.float32)
    if thorax:
        start = time.perf_counter()
        crop = hu[thorax.box]
        with torch.inference_mode():
            probability = predict_lesion_probability(crop, spacing, model, seg_config)
        times["segmentation"] = time.perf_counter() - start
        start = time.perf_counter()
        threshold = seg_config["probability_threshold"]
        candidates = extract_candidates(probability, threshold, spacing)
        region = thorax_region(thorax.lungs, spacing)
        names, values, patches = describe(candidates, crop, spacing, region, patch_spec)
        near = near_misses(probability, truth[thorax.box], threshold, near_threshold, spacing)
        near_names, near_values, near_patches = describe(near, crop, spacing, region, patch_spec)
        names = names or near_names
        times["features"] = time.perf_counter() - start
        start = time.perf_counter()
        inner = tuple(slice(t.start - e.start, t.stop - e.start) for t, e in zip(thorax.box, eval_box))
        candidate_labels[inner] = candidates.labels
        truth_voxels = np.bincount(truth.ravel().astype(np.int64))
        label, dice, lesion = match_candidates(candidates.labels, truth[thorax.box], truth_voxels, candidates.count,
                                               case["boxes_only"])
        ignored = np.unique(candidates.labels[truth[thorax.box] == IGNORE])
        label[ignored[ignored > 0] - 1] = -1  # may be an unlabelled real lesion (training.real_backgrounds)
        lesion_boxes = ndimage.find_objects(truth.astype(np.int32))
        diameter = np.array([axial_diameters(truth[lesion_boxes[j - 1]] == j, spacing).long_mm if j else np.nan
                             for j in lesion], np.float32)
        times["matching"] = time.perf_counter() - start
    record = {
        "name": name, "source": json.dumps(case["source"]), "spacing": np.asarray(spacing, np.float32),
        "boxes_only": case["boxes_only"],
        "no_thorax": thorax is None, "eval_box": _box_array(eval_box),
        "thorax_box": _box_array(thorax.box) if thorax else np.zeros((3, 2), np.int32),
        "candidate_labels": candidate_labels, "truth": truth[eval_box].astype(np.int16),
        "label": np.asarray(label, np.int8), "match_dice": dice, "lesion_diameter_mm": diameter,
        "feature_names": np.array(names, str), "features": values, "patches": patches.astype(np.float16),
        "near_miss_threshold": near_threshold, "near_miss_features": near_values,
        "near_miss_patches": near_patches.astype(np.float16),
    }
    return record, times


_WORKER = {}


def _init_worker(seg_dir: str, threads: int) -> None:
    torch.set_num_threads(threads)
    keep_freed_memory()
    _WORKER["config"] = load_model_config(Path(seg_dir))
    _WORKER["model"] = prepared_network(torch.jit.load(str(Path(seg_dir) / "model.ts")), "cpu")


def _run(job: tuple) -> str:
    name, source, out, patch_spec = job
    path = out / f"{name}.npz"
    if path.exists():
        return f"{name}: done before"
    start = time.perf_counter()
    case = phantom_case(*source) if isinstance(source[0], int) else nifti_case(*source)
    load_s = time.perf_counter() - start
    record, times = mine_case(name, case, _WORKER["model"], _WORKER["config"], patch_spec)
    return_freed_memory()
    start = time.perf_counter()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, timings=json.dumps({"load": load_s, **times}), **record)
    tmp.replace(path)
    times = {"load": load_s, **times, "save": time.perf_counter() - start}
    labels = record["label"]
    lesions = np.count_nonzero(np.unique(record["truth"]))
    return (f"{name}: {case['hu'].shape} {lesions} lesions, {len(labels)} candidates "
            f"({(labels == 1).sum()} true, {(labels == 0).sum()} false, {(labels == -1).sum()} ambiguous), "
            f"{len(record['near_miss_features'])} near misses; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))


def load_mined(path: Path) -> dict:
    with np.load(path) as stored:
        return {key: stored[key] for key in stored.files}


def load_source(case: dict) -> tuple[np.ndarray, tuple]:
    """The HU volume (float32) and spacing a mined case came from: its NIfTI image, or its phantom regenerated."""
    source = json.loads(str(case["source"]))
    if "seed" in source:
        phantom = generate_phantom(source["seed"], slices=source["slices"])
        return phantom.hu.astype(np.float32), phantom.spacing
    hu, spacing = read_nifti(Path(source["image"]))
    return np.asarray(hu, np.float32), spacing


def summarize_folder(folder: Path) -> str:
    """Candidate counts of a mined folder."""
    labels = []
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as stored:
            labels.append(stored["label"])
    labels = np.concatenate(labels or [np.zeros(0)])
    return (f"{folder}: {len(labels)} candidates: {(labels == 1).sum()} true, {(labels == 0).sum()} false, "
            f"{(labels == -1).sum()} ambiguous")


def _seed_range(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def jobs(args, patch_spec: dict) -> list[tuple]:
    if args.seeds:
        return [(f"phantom_{seed:05d}", (seed, args.slices), args.out, patch_spec) for seed in _seed_range(args.seeds)]
    cases_json = args.images.parent / "cases.json"
    boxes_only = {name: case.get("boxes_only", False) for name, case in
                  (json.loads(cases_json.read_text()).items() if cases_json.is_file() else [])}
    names = sorted(p.name[:-len(SUFFIX)] for p in args.images.glob("*" + SUFFIX))[:args.limit]
    return [(name, (args.images / f"{name}{SUFFIX}", args.labels / f"{name}{SUFFIX}", boxes_only.get(name, False)),
             args.out, patch_spec) for name in names if (args.labels / f"{name}{SUFFIX}").is_file()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--seeds", help="phantom seeds, e.g. 4000-4039")
    source.add_argument("--images", type=Path, help="folder of <case>.nii.gz HU volumes (with --labels)")
    parser.add_argument("--labels", type=Path, help="folder of <case>.nii.gz truth instance labels")
    parser.add_argument("--slices", type=int, help="phantom length in slices (default: the whole thorax)")
    parser.add_argument("--limit", type=int, help="only the first LIMIT cases of --images (by name)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seg-model", type=Path, default=REPO / "models" / "lesion_seg")
    parser.add_argument("--cascade", type=Path, default=REPO / "models" / "cascade_fp", help="for its patch spec")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args(argv)
    if args.images and not args.labels:
        parser.error("--images needs --labels")
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    patch_spec = json.loads((args.cascade / "model.json").read_text())["patches"]
    todo = jobs(args, patch_spec)
    start = time.perf_counter()
    print(f"mining {len(todo)} cases with {args.seg_model} -> {args.out}", flush=True)
    with ProcessPoolExecutor(args.workers, initializer=_init_worker,
                             initargs=(str(args.seg_model), args.threads)) as pool:
        for number, line in enumerate(pool.map(_run, todo), 1):
            print(f"[{number}/{len(todo)}, {time.perf_counter() - start:.0f} s] {line}", flush=True)
    print(summarize_folder(args.out))


if __name__ == "__main__":
    main()
