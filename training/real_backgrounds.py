"""Training cases from real chest CT with partial truth: synthetic lesions inserted into real anatomy.

    python -m training.real_backgrounds --real-train ../shared/data/real-train --out data/real_backgrounds \
        --seeds 3 [--count 6] [--kinds node perihilar] [--node-stations]

For each case of --real-train (one outlined target lesion per patient, others possibly unlabelled) and each
seed, lesions (training.lesions: its default kinds, or --kinds; 5-90 mm, nodes anywhere in the mediastinal fat, or with
--node-stations only in that of the node stations, down to STATIONS_BELOW_CARINA_MM below the carina) are inserted away from
the regions that may hold a real lesion, and the case is written as a Decathlon-style dataset:
imagesTr/<case>_s<seed>.nii.gz, labelsTr/<same> (inserted lesions 1..n, IGNORE where the loss must not
look) and dataset.json. The real anatomy around the inserted lesions (hila, mediastinum, vessels, upper
abdomen) is learned as background.

Partial truth: the outlined target and every instance that the shipped app keeps elsewhere (unlabelled
findings, possibly real lesions), each grown by IGNORE_MARGIN_MM, are IGNORE: neither lesion nor background
in training. The targets are thus never shown to the network, and finding them stays a fair validation.
With --label-target the target is a lesion instance instead (the last label; a one-voxel ring around its outline
stays IGNORE, since the outline is the majority of nine algorithms' segmentations): a network trained on such cases is
validated on real-train only patient by patient (training.cross_validate_network).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from operators.cascade_fp import filter_candidates, load_cascade
from operators.lesion_segmentation import extract_candidates, prepared_network
from operators.thorax_crop import crop_thorax
from training.evaluate_real import REPO, case_probability, list_cases, network_config, network_key
from training.lesions import KIND_WEIGHTS, estimate_noise_and_blur, insert_lesions
from training.nifti import write_nifti
from training.real_cases import real_case_arrays
from training.train import IGNORE
IGNORE_MARGIN_MM = 5.0
SIZE_RANGE_MM = (5.0, 90.0)
# Mediastinal fat, where nodes lie and are placed (as in training.phantom); not the heart, vessels or oesophagus
MEDIASTINAL_FAT_HU = (-200.0, -30.0)


def mediastinum_mask(hu: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """Mediastinal fat between the two lungs, row by row of each axial slice (no lung on one side: none)."""
    mask = np.zeros(lungs.shape, bool)
    columns = np.arange(lungs.shape[2])
    for z in np.flatnonzero(lungs.any(axis=(1, 2))):
        xs = np.flatnonzero(lungs[z].any(axis=0))
        midline = (xs[0] + xs[-1]) / 2
        for y in np.flatnonzero(lungs[z].any(axis=1)):
            row = np.flatnonzero(lungs[z, y])
            right, left = row[row < midline], row[row > midline]
            if len(right) and len(left):
                mask[z, y] = (columns > right.max()) & (columns < left.min())
    return mask & (hu >= MEDIASTINAL_FAT_HU[0]) & (hu <= MEDIASTINAL_FAT_HU[1])


# The carina, where the trachea's lumen splits into the main bronchi: the lumen is air, denser lung is not
AIRWAY_HU = -900.0
TRACHEA_CM2 = (0.8, 8.0)  # the tracheal lumen's cross-section
BRONCHUS_MIN_CM2 = 0.4  # each main bronchus's lumen just below the split
TRACHEA_FROM_MIDLINE_MM = 25.0
# Node stations: the paratracheal, aortopulmonary, subcarinal and hilar nodes lie above this far below the carina;
# the fat further down borders the heart (pericardial fat, not a lung-cancer node station)
STATIONS_BELOW_CARINA_MM = 30.0


def carina_slice(hu: np.ndarray, lungs: np.ndarray, spacing) -> int | None:
    """The axial slice (z ascending towards the head) where the trachea's lumen splits in two, or None where no
    trachea is found: the trachea is the largest air column of tracheal size near the lungs' midline in the highest
    slice that has one, followed down slice by slice."""
    pixel_cm2 = spacing[1] * spacing[2] / 100.0
    columns = np.flatnonzero(lungs.any(axis=(0, 1)))
    if not len(columns):
        return None
    midline = (columns[0] + columns[-1]) / 2
    lumen = None
    for z in np.flatnonzero(lungs.any(axis=(1, 2)))[::-1]:
        labels, count = ndimage.label((hu[z] < AIRWAY_HU) & lungs[z])
        areas = np.bincount(labels.ravel(), minlength=count + 1) * pixel_cm2
        if lumen is None:  # looking for the trachea
            centres = ndimage.center_of_mass(labels > 0, labels, range(1, count + 1))
            tracheal = [k for k, (_, x) in enumerate(centres, 1) if TRACHEA_CM2[0] <= areas[k] <= TRACHEA_CM2[1]
                        and abs(x - midline) * spacing[2] <= TRACHEA_FROM_MIDLINE_MM]
            if tracheal:
                lumen = labels == max(tracheal, key=lambda k: areas[k])
            continue
        below = sorted((k for k in np.unique(labels[lumen]) if k and areas[k] >= BRONCHUS_MIN_CM2),
                       key=lambda k: -areas[k])  # the largest first
        if len(below) >= 2:
            return int(z)
        if not below or areas[below[0]] > TRACHEA_CM2[1]:  # lost, or run into lung: no split seen
            return None
        lumen = labels == below[0]
    return None


def station_fat(mediastinum: np.ndarray, hu: np.ndarray, lungs: np.ndarray, spacing) -> np.ndarray:
    """The mediastinal fat of the node stations: at most STATIONS_BELOW_CARINA_MM below the carina (all of it where no
    carina is found)."""
    carina = carina_slice(hu, lungs, spacing)
    if carina is None:
        return mediastinum
    floor = carina - int(round(STATIONS_BELOW_CARINA_MM / spacing[0]))
    stations = mediastinum.copy()
    stations[:max(floor, 0)] = False
    return stations


def possible_lesions(hu, truth, spacing, thorax, model, seg_config, cascade, cache: Path, name: str,
                     label_target: bool = False) -> np.ndarray:
    """The regions that may hold a real lesion: the outlined truth and the app's kept instances elsewhere, grown by
    IGNORE_MARGIN_MM; with `label_target` (the truth becomes a label), the truth grown by one voxel only."""
    probability = case_probability(name, hu, spacing, thorax, model, seg_config, cache)
    candidates = extract_candidates(probability, seg_config["probability_threshold"], spacing)
    kept = np.zeros(hu.shape, bool)
    kept[thorax.box] = filter_candidates(candidates, hu[thorax.box], spacing, thorax, cascade).labels > 0
    reach = np.maximum(np.round(IGNORE_MARGIN_MM / np.asarray(spacing)).astype(int), 1)
    grow = np.ones(tuple(2 * r + 1 for r in reach), bool)
    if not label_target:
        return ndimage.binary_dilation((truth > 0) | kept, grow)
    kept_labels, _ = ndimage.label(kept)
    elsewhere = kept & ~np.isin(kept_labels, np.unique(kept_labels[truth > 0]))
    return ndimage.binary_dilation(elsewhere, grow) | ndimage.binary_dilation(truth > 0, np.ones((3, 3, 3), bool))


def make_cases(real_train: Path, out: Path, seeds: int, count: int, seg_dir: Path, cascade_dir: Path,
               cache: Path, kinds: list[str] | None = None, node_stations: bool = False, label_target: bool = False,
               log=print) -> list[dict]:
    seg_config = network_config(seg_dir)
    model = prepared_network(torch.jit.load(str(seg_dir / seg_config.get("file", "model.ts"))), "cpu")
    cascade = load_cascade(cascade_dir)
    cache = cache / network_key(seg_dir, seg_config)
    for folder in ("imagesTr", "labelsTr"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    items, start = [], time.perf_counter()
    for folder in list_cases(real_train):
        hu, truth, spacing, origin, _ = real_case_arrays(folder)
        hu = hu.astype(np.float32)
        thorax = crop_thorax(hu, spacing)
        lungs = np.zeros(hu.shape, bool)
        lungs[thorax.box] = thorax.lungs
        ignore = possible_lesions(hu, truth, spacing, thorax, model, seg_config, cascade, cache, folder.name,
                                  label_target)
        mediastinum = mediastinum_mask(hu, lungs) & ~ignore
        if node_stations:
            mediastinum = station_fat(mediastinum, hu, lungs, spacing)
        noise_sd, blur = estimate_noise_and_blur(hu, spacing, lungs)
        for seed in range(seeds):
            rng = np.random.default_rng([seed, len(items)])
            image, labels, lesions = insert_lesions(hu, spacing, lungs & ~ignore, mediastinum, rng, count,
                                                    blur_sigma_mm=blur, noise_sd_hu=noise_sd, size_range_mm=SIZE_RANGE_MM,
                                                    kinds=kinds, node_sites="fat")
            labels[ignore & (labels == 0)] = IGNORE
            if label_target:  # the target instead of IGNORE
                labels[truth > 0] = len(lesions) + 1
                lesions.append({"label": len(lesions) + 1, "kind": "real target", "voxels": int((truth > 0).sum())})
            case = f"{folder.name}_s{seed}"
            write_nifti(out / "imagesTr" / f"{case}.nii.gz", np.clip(np.rint(image), -1024, 3071).astype(np.int16),
                        spacing, origin)
            write_nifti(out / "labelsTr" / f"{case}.nii.gz", labels, spacing, origin)
            (out / "labelsTr" / f"{case}.json").write_text(json.dumps(
                {"background": folder.name, "seed": seed, "ignore_label": IGNORE, "lesions": lesions}, indent=1))
            items.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
            log(f"{case}: {len(lesions)} lesions ({', '.join(sorted({l['kind'] for l in lesions}))}), "
                f"{time.perf_counter() - start:.0f} s", flush=True)
    (out / "dataset.json").write_text(json.dumps({
        "name": "RealBackgrounds", "description": __doc__.splitlines()[0], "labels": {
            "0": "background", "1": "lesion (instance labels 1..n)", str(IGNORE): "ignored by the loss"},
        "training": items}, indent=1))
    return items


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-train", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3, help="cases per real background")
    parser.add_argument("--count", type=int, default=6, help="lesions inserted per case (fewer where room lacks)")
    parser.add_argument("--kinds", nargs="+", choices=sorted(KIND_WEIGHTS), help="these kinds (default: training.lesions.DEFAULT_KINDS)")
    parser.add_argument("--node-stations", action="store_true",
                        help="nodes only in the fat of the node stations, not further than "
                             f"{STATIONS_BELOW_CARINA_MM:.0f} mm below the carina (not beside the heart)")
    parser.add_argument("--label-target", action="store_true",
                        help="the outlined target as a lesion label, not IGNORE (validate patient by patient)")
    parser.add_argument("--seg-model", type=Path, default=REPO / "models" / "lesion_seg")
    parser.add_argument("--cascade", type=Path, default=REPO / "models" / "cascade_fp")
    parser.add_argument("--cache", type=Path, default=REPO / "runs" / "probability_cache")
    args = parser.parse_args(argv)
    make_cases(args.real_train, args.out, args.seeds, args.count, args.seg_model, args.cascade, args.cache, args.kinds,
               args.node_stations, args.label_target)


if __name__ == "__main__":
    main()
