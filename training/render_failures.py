"""Render a model's misses and false positives: one PNG per failure, axial slice, lung window, outlines.

    python -m training.render_failures --images data/real/images --truth data/real/labels \
        --pred runs/pred/real --out runs/failures/real

Truth outlines are green, predicted instances red. A miss is a measurable truth lesion that no
instance detects (Dice >= 0.1); a false positive is an instance that touches no truth lesion
(the definitions of training/metrics.py). Each PNG shows the slice through the object's centre
with a 100 mm field of view around it beside the whole slice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from training.metrics import evaluate_case  # noqa: E402
from training.nifti import read_nifti  # noqa: E402

LUNG_WINDOW = (-1350, 150)  # level -600, width 1500
FIELD_MM = 100.0
SUFFIX = ".nii.gz"


def _render(path: Path, hu_slice, truth_slice, pred_slice, centre_yx, spacing_yx, title: str) -> None:
    half = np.round(FIELD_MM / 2 / np.asarray(spacing_yx)).astype(int)
    y0, x0 = np.maximum(np.asarray(centre_yx, int) - half, 0)
    y1, x1 = np.asarray(centre_yx, int) + half
    figure, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    for axis, window in zip(axes, [(slice(None), slice(None)), (slice(y0, y1), slice(x0, x1))]):
        axis.imshow(hu_slice[window], cmap="gray", vmin=LUNG_WINDOW[0], vmax=LUNG_WINDOW[1],
                    aspect=spacing_yx[0] / spacing_yx[1])
        for mask, colour in ((truth_slice[window] > 0, "lime"), (pred_slice[window] > 0, "red")):
            if mask.any():
                axis.contour(mask, levels=[0.5], colors=colour, linewidths=0.8)
        axis.set_axis_off()
    axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=0.6))
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def render_case(case: str, hu, truth, pred, spacing, out: Path, boxes_only: bool = False) -> int:
    """Write one PNG per miss and false positive of one case; return how many."""
    result = evaluate_case(pred, truth, spacing, boxes_only=boxes_only, name=case)
    voxel_ml = float(np.prod(spacing)) / 1000
    failures = [("miss", lesion.label, truth, f"truth {lesion.label}: {lesion.diameter_mm:.0f} mm")
                for lesion in result.lesions if lesion.measurable and not lesion.detected]
    failures += [("fp", instance.label, pred, f"instance {instance.label}: {instance.voxels * voxel_ml:.2f} ml, "
                  f"score {instance.score:.2f}") for instance in result.instances if instance.false_positive]
    for kind, label, labels, text in failures:
        z, y, x = (int(round(c)) for c in ndimage.center_of_mass(labels == label))
        _render(out / f"{case}_{kind}_{label}.png", hu[z], truth[z], pred[z], (y, x), spacing[1:],
                f"{case} {kind.upper()} slice {z}: {text}")
    return len(failures)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--truth", type=Path, required=True)
    parser.add_argument("--pred", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--boxes-only", nargs="*", default=["petctdx_a0001"], help="cases whose truth is boxes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted(args.pred.glob("*" + SUFFIX)):
        case = path.name[: -len(SUFFIX)]
        hu, spacing = read_nifti(args.images / path.name)
        truth, _ = read_nifti(args.truth / path.name)
        pred, _ = read_nifti(path)
        count = render_case(case, hu, np.rint(truth).astype(np.int32), np.rint(pred).astype(np.int32), spacing,
                            args.out, case in args.boxes_only)
        print(f"{case}: {count} failures rendered", flush=True)


if __name__ == "__main__":
    main()
