"""What the operators pass along: the CT volume, the "study cannot be analysed" error, timing.

CTVolume follows docs/ARCHITECTURE.md: HU float32 [z, y, x], spacing (z, y, x) mm, slices sorted
ascending along the slice normal, the pydicom datasets in that z order, and the affine that maps a
voxel index (z, y, x, 1) to DICOM patient coordinates (LPS, mm).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

log = logging.getLogger("timing")


class StudyError(Exception):
    """The input cannot be analysed (no usable chest CT series); the message is one line for the user."""


@dataclass
class CTVolume:
    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source_datasets: list[Dataset]
    series_uid: str


def timed_compute(compute):
    """Decorator for Operator.compute: log the operator's wall time."""

    @functools.wraps(compute)
    def wrapper(self, op_input, op_output, context):
        start = time.perf_counter()
        compute(self, op_input, op_output, context)
        log.info("%s: %.2f s", self.name, time.perf_counter() - start)

    return wrapper
