"""Build a Decathlon-style phantom dataset: imagesTr/, labelsTr/ (instance labels), dataset.json.

    python -m training.make_dataset --out data/phantoms --count 100 --first-seed 1000 --workers 2
    python -m training.make_dataset --out data/phantoms_wide --count 12 --first-seed 1100 \
        --kinds solid lobulated spiculated part_solid ggo cavitating juxtapleural juxtavascular perihilar node mass faint_ggo \
        --max-lesion-mm 100

Seeds are disjoint by purpose: training 1000+, validation 2000+, held-out evaluation 3000+.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from training.lesions import KIND_WEIGHTS

log = logging.getLogger("make_dataset")


def _make_case(out: Path, seed: int, kinds: list[str] | None, max_lesion_mm: float) -> dict:
    import torch

    from training.phantom import generate_phantom
    from training.phantom_io import write_phantom_nifti

    torch.set_num_threads(1)
    name = f"phantom_{seed:05d}"
    image, label = out / "imagesTr" / f"{name}.nii.gz", out / "labelsTr" / f"{name}.nii.gz"
    meta = out / "labelsTr" / f"{name}.json"
    if not meta.exists():  # resumable: a case is complete once its description is written
        phantom = generate_phantom(seed, kinds=kinds, max_lesion_mm=max_lesion_mm)
        write_phantom_nifti(phantom, image, label)
        description = {"seed": seed, "spacing_mm": phantom.spacing, "scanner": vars(phantom.scanner),
                       "lesions": phantom.lesions}
        meta.write_text(json.dumps(description, indent=1, default=float))
    return {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}


def make_dataset(out: Path, count: int, first_seed: int, workers: int = 2, kinds: list[str] | None = None,
                 max_lesion_mm: float = 60.0) -> Path:
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    seeds = list(range(first_seed, first_seed + count))
    t0 = time.perf_counter()
    items = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for k, item in enumerate(pool.map(_make_case, [out] * count, seeds, [kinds] * count, [max_lesion_mm] * count), 1):
            items.append(item)
            log.info("%d/%d cases (%.0f s)", k, count, time.perf_counter() - t0)
    spec = {
        "name": "LungLesionPhantoms",
        "description": "Synthetic thoracic CT with lung lesion instance labels (training.phantom)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "lesion (instance labels: each value > 0 is one lesion)"},
        "numTraining": len(items),
        "seeds": [first_seed, first_seed + count - 1],
        "training": items,
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kinds", nargs="+", choices=sorted(KIND_WEIGHTS), help="lesion kinds (default: DEFAULT_KINDS)")
    parser.add_argument("--max-lesion-mm", type=float, default=60.0, help="largest lesion diameter drawn")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(make_dataset(args.out, args.count, args.first_seed, args.workers, args.kinds, args.max_lesion_mm))


if __name__ == "__main__":
    main()
