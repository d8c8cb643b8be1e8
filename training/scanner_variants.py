"""Real CT as other scanners would image it: validation sets for robustness on real anatomy.

    python -m training.scanner_variants --real ../shared/data/real-train --out data/scanner_variants
    python -m training.scanner_variants --images data/real_backgrounds/imagesTr --labels data/real_backgrounds/labelsTr \
        --out data/real_backgrounds_variants

Each case folder of --real (real_cases layout: dicom/, truth.json, truth.npz) is written once per variant, as a
Decathlon-style set OUT/<variant>/ (imagesTr, labelsTr with each case's lesion list, partial truth kept) that
training.evaluate_real reads. A Decathlon-style training set (--images, --labels: training.real_backgrounds) is
written the same way, for mining the cascade's candidates (training.mine_candidates); its IGNORE regions are kept,
on thick slices wherever a slab holds any IGNORE voxel. The variants:
- `slices_6mm`, `slices_9mm`: thicker slices, the mean over slabs of 2 or 3 slices (from 3 mm slices: 6 and 9 mm,
  the range of older and low-dose protocols); a voxel of the truth is lesion where at least half its slab was;
- `low_dose`: 50 HU more noise, slightly correlated in-plane like reconstructed CT noise;
- `sharp_kernel`: a lung (edge-enhancing) kernel, the image plus 1.5 times its detail above a 1-voxel blur;
- `non_contrast`: iodinated blood (vessels, heart chambers) back to unenhanced blood, as on a scan without contrast
  (hilar vessels then look like soft tissue, as nodes and tumours do);
- `short_field`: a field of view that ends in the liver dome, as a scan planned tight on the lungs can: the slices
  below the lowest one where the aerated lung covers SHORT_FIELD_LUNG_SHARE of its largest axial area are dropped,
  so the dome's top lies on the last slice as an island of soft tissue in the lung (never a lesion's slices; the
  NIfTI keeps the scan's origin, which nothing here reads).
Only real-train may be varied for validation; the test-only cases stay untouched.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from operators.thorax_crop import body_and_lung_masks
from training.nifti import read_nifti, write_nifti
from training.real_cases import real_case_arrays
from training.train import IGNORE

SUFFIX = ".nii.gz"
LOW_DOSE_NOISE_HU = 50.0
SHARP_KERNEL_GAIN = 1.5
ENHANCED_BLOOD_HU = (130.0, 500.0)  # iodinated blood and bone marrow; cortex lies above
NEAR_CORTEX_MM = 3.0
MARROW_NEAR_CORTEX_SHARE = 0.08  # bone regions: 0.15-0.65 of their voxels near cortex, vessels under 0.05 (real-train)
UNENHANCED_BLOOD_HU = 40.0
SHORT_FIELD_LUNG_SHARE = 0.7  # on real-train, the liver dome then shows as an island in the right lower lung


def thicker_slices(hu: np.ndarray, labels: np.ndarray, spacing, slab: int):
    """Slabs of `slab` slices averaged (labels: each lesion where it filled at least half the slab, IGNORE where the
    slab holds any); a partial last slab is dropped."""
    count = hu.shape[0] // slab * slab
    image = hu[:count].reshape(-1, slab, *hu.shape[1:]).mean(axis=1)
    slabs = labels[:count].reshape(-1, slab, *labels.shape[1:])
    thick = np.zeros(image.shape, np.int16)
    for lesion in np.unique(slabs[(slabs > 0) & (slabs != IGNORE)]):
        thick[2 * (slabs == lesion).sum(axis=1) >= slab] = lesion
    thick[(slabs == IGNORE).any(axis=1)] = IGNORE
    return image, thick, (spacing[0] * slab, spacing[1], spacing[2])


def low_dose(hu: np.ndarray, labels: np.ndarray, spacing, seed: int = 0):
    noise = np.random.default_rng(seed).normal(0.0, 1.0, hu.shape).astype(np.float32)
    noise = ndimage.gaussian_filter(noise, (0, 0.7, 0.7))
    return hu + noise * (LOW_DOSE_NOISE_HU / noise.std()), labels, spacing


def sharp_kernel(hu: np.ndarray, labels: np.ndarray, spacing):
    return hu + SHARP_KERNEL_GAIN * (hu - ndimage.gaussian_filter(hu, (0, 1.0, 1.0))), labels, spacing


def enhanced_blood(hu: np.ndarray, spacing) -> np.ndarray:
    """Iodinated blood: the regions in the enhanced range (ENHANCED_BLOOD_HU), cut apart where they touch by a
    one-voxel erosion, that lie mostly away from cortex (marrow lies within NEAR_CORTEX_MM of it), grown back by that
    voxel. A vessel merged with bone stays out, as do vessels thinner than three voxels."""
    enhanced = (hu >= ENHANCED_BLOOD_HU[0]) & (hu <= ENHANCED_BLOOD_HU[1])
    regions, count = ndimage.label(ndimage.binary_erosion(enhanced))
    near_cortex = ndimage.distance_transform_edt(hu <= ENHANCED_BLOOD_HU[1], sampling=spacing) <= NEAR_CORTEX_MM
    share = (np.bincount(regions.ravel(), weights=near_cortex.ravel(), minlength=count + 1)
             / np.maximum(np.bincount(regions.ravel(), minlength=count + 1), 1))
    blood = np.concatenate([[False], share[1:] < MARROW_NEAR_CORTEX_SHARE])[regions]
    return ndimage.binary_dilation(blood) & enhanced


def non_contrast(hu: np.ndarray, labels: np.ndarray, spacing):
    """Iodinated blood (enhanced_blood) at unenhanced blood's HU: it loses its excess over UNENHANCED_BLOOD_HU,
    blurred by about a voxel so that partial-volume edges lose it too and the scan's own noise stays."""
    excess = np.where(enhanced_blood(hu, spacing), hu - UNENHANCED_BLOOD_HU, 0.0).astype(np.float32)
    return hu - ndimage.gaussian_filter(excess, (0.5, 0.8, 0.8)), labels, spacing


def short_field(hu: np.ndarray, labels: np.ndarray, spacing):
    """The scan cut at the lung base (slices ascending, feet first): it starts at the lowest slice whose aerated lung
    covers SHORT_FIELD_LUNG_SHARE of the largest axial lung area, or at the lowest lesion slice where that is lower."""
    _, lungs = body_and_lung_masks(hu, spacing)
    area = lungs.sum(axis=(1, 2))
    cut = int(np.argmax(area >= SHORT_FIELD_LUNG_SHARE * area.max()))
    lesion_slices = np.flatnonzero(((labels > 0) & (labels != IGNORE)).any(axis=(1, 2)))
    if len(lesion_slices):
        cut = min(cut, int(lesion_slices[0]))
    return hu[cut:], labels[cut:], spacing


VARIANTS = {
    "slices_6mm": lambda hu, labels, spacing: thicker_slices(hu, labels, spacing, 2),
    "slices_9mm": lambda hu, labels, spacing: thicker_slices(hu, labels, spacing, 3),
    "low_dose": low_dose,
    "sharp_kernel": sharp_kernel,
    "non_contrast": non_contrast,
    "short_field": short_field,
}


def write_case_variants(name: str, hu: np.ndarray, labels: np.ndarray, spacing, origin, described: dict,
                        out: Path) -> None:
    """One case in every variant: OUT/<variant>/imagesTr/<name>.nii.gz, labelsTr/<name>.nii.gz and .json."""
    hu = hu.astype(np.float32)
    for variant_name, variant in VARIANTS.items():
        image, truth_labels, variant_spacing = variant(hu, labels, spacing)
        folder = Path(out) / variant_name
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        write_nifti(folder / "imagesTr" / f"{name}{SUFFIX}", image, variant_spacing, origin)
        write_nifti(folder / "labelsTr" / f"{name}{SUFFIX}", truth_labels, variant_spacing, origin)
        (folder / "labelsTr" / f"{name}.json").write_text(json.dumps(described))


def write_variants(real_dir: Path, out: Path, log=print) -> None:
    """Every case of `real_dir` (real_cases layout) in every variant under `out`."""
    for case in sorted(p for p in Path(real_dir).iterdir() if (p / "truth.json").is_file()):
        hu, labels, spacing, origin, _ = real_case_arrays(case)
        truth = json.loads((case / "truth.json").read_text())
        described = {"partial_truth": bool(truth.get("partial_truth")),
                     "lesions": [{"label": int(lesion["id"]), "kind": lesion.get("kind", "")} for lesion in truth["lesions"]]}
        write_case_variants(case.name, hu, labels, spacing, origin, described, out)
        log(f"{case.name}: {len(VARIANTS)} variants", flush=True)


def write_dataset_variants(images: Path, labels: Path, out: Path, log=print) -> None:
    """Every case of a Decathlon-style set (images, instance labels with IGNORE, each case's .json) under `out`."""
    for image_path in sorted(Path(images).glob(f"*{SUFFIX}")):
        name = image_path.name[:-len(SUFFIX)]
        hu, spacing = read_nifti(image_path)
        truth, _ = read_nifti(Path(labels) / image_path.name)
        described = json.loads((Path(labels) / f"{name}.json").read_text())
        write_case_variants(name, hu, truth.astype(np.int16), spacing, (0.0, 0.0, 0.0), described, out)
        log(f"{name}: {len(VARIANTS)} variants", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--real", type=Path, help="real case folders (real-train, never the test set)")
    source.add_argument("--images", type=Path, help="a Decathlon-style training set's images (with --labels)")
    parser.add_argument("--labels", type=Path, help="its instance labels and per-case .json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.real:
        write_variants(args.real, args.out)
    elif args.labels:
        write_dataset_variants(args.images, args.labels, args.out)
    else:
        parser.error("--images needs --labels")


if __name__ == "__main__":
    main()
