"""Run the lesion segmentation model alone (no false-positive reduction) over NIfTI CT images.

    python -m training.predict --images data/heldout/imagesTr --model models/lesion_seg --out runs/pred/heldout
    python -m training.evaluate --pred runs/pred/heldout --truth data/heldout/labelsTr --out runs/eval/heldout

As in the app: thoracic box, sliding-window probability, candidate instances above the model's
threshold. Writes OUT/<case>.nii.gz (instance labels on the image grid), OUT/<case>.json
({"scores": {label: max probability}, "seconds": ...}) and resumes where OUT already has a case.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from operators.lesion_segmentation import (extract_candidates, load_model_config, predict_lesion_probability,
                                          prepared_network)
from operators.thorax_crop import NoThoraxError, crop_thorax
from training.nifti import read_nifti, write_nifti_like

log = logging.getLogger("predict")
SUFFIX = ".nii.gz"


def predict_case(hu: np.ndarray, spacing, model, config: dict) -> tuple[np.ndarray, dict[int, float]]:
    """Instance labels on the grid of `hu` and each instance's score (its maximum probability)."""
    labels = np.zeros(hu.shape, np.int16)
    try:
        thorax = crop_thorax(hu, spacing)
    except NoThoraxError:
        return labels, {}
    probability = predict_lesion_probability(hu[thorax.box], spacing, model, config)
    candidates = extract_candidates(probability, config["probability_threshold"], spacing)
    labels[thorax.box] = candidates.labels
    return labels, {k: float(p) for k, p in enumerate(candidates.max_probability, 1)}


def predict_folder(images: Path, model_dir: Path, out: Path) -> None:
    config = load_model_config(model_dir)
    model = prepared_network(torch.jit.load(str(model_dir / config.get("file", "model.ts"))), "cpu")
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(images.glob("*" + SUFFIX))
    start = time.perf_counter()
    for number, path in enumerate(paths, 1):
        case = path.name[: -len(SUFFIX)]
        if (out / f"{case}.json").exists():
            continue
        t0 = time.perf_counter()
        image, spacing = read_nifti(path)
        labels, scores = predict_case(image.astype(np.float32), spacing, model, config)
        seconds = time.perf_counter() - t0
        write_nifti_like(out / f"{case}{SUFFIX}", labels, path)
        (out / f"{case}.json").write_text(json.dumps({"scores": scores, "seconds": seconds}))
        log.info("%s: %d instances, %.1f s [%d/%d, %.0f s]", case, len(scores), seconds, number, len(paths),
                 time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of <case>.nii.gz CT images (HU)")
    parser.add_argument("--model", type=Path, default=Path("models/lesion_seg"), help="folder with model.ts + model.json")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    predict_folder(args.images, args.model, args.out)


if __name__ == "__main__":
    main()
