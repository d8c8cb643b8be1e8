"""What the operators pass along: the CT volume, the "study cannot be analysed" error, timing and memory, slice
geometry.

CTVolume follows docs/ARCHITECTURE.md: HU float32 [z, y, x], spacing (z, y, x) mm, slices sorted
ascending along the slice normal, the pydicom datasets in that z order (headers only: CTVolumeOperator drops
their pixel data once they are in `hu`), and the affine that maps a
voxel index (z, y, x, 1) to DICOM patient coordinates (LPS, mm).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom import Dataset

log = logging.getLogger("timing")

# How far (mm) a slice's position may lie off the normal through the first slice's (a gantry tilt shifts it).
TILT_TOLERANCE_MM = 0.05


class StudyError(Exception):
    """The input cannot be analysed (no usable chest CT series); the message is one line for the user (line breaks
    in it, e.g. from a header value quoted in a decoder's error, become spaces)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class CTVolume:
    hu: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    source_datasets: list[Dataset]
    series_uid: str


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters (malloc.h)
MALLOC_THRESHOLD_MAX = 2**31 - 1  # mallopt takes an int


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"))  # find_library runs ldconfig: once per process


def _libc_function(name: str):
    return getattr(_libc(), name, None)  # None without glibc


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed memory for reuse within the process (the analysis process, training and evaluation
    set this at their start).
    By default each block over its mmap threshold (at most 32 MB), and on threads other than the main one each block
    over their heaps' 64 MB, is a mapping of its own, unmapped when freed, so every new array of that size faults its
    pages in again: the network's sliding window spent most of its system time there (README Speed). `timed_compute`
    hands what an operator freed back after each operator."""
    mallopt = _libc_function("mallopt")
    if mallopt:
        for parameter in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD):
            mallopt(parameter, MALLOC_THRESHOLD_MAX)
        mallopt(M_ARENA_MAX, 1)  # the operators run on the scheduler's threads: their blocks, too, in the main heap


def return_freed_memory() -> None:
    """Hand the freed heap back to the system (glibc keeps freed blocks, such as one slice's pixels, for reuse:
    without this, dropping a series' pixel data would not lower the peak that follows)."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim:
        malloc_trim(0)


def timed_compute(compute):
    """Decorator for Operator.compute: log the operator's wall time and the process's peak RSS so far, then hand the
    memory it freed back to the system."""

    @functools.wraps(compute)
    def wrapper(self, op_input, op_output, context):
        start = time.perf_counter()
        compute(self, op_input, op_output, context)
        return_freed_memory()
        log.info("%s: %.2f s (peak RSS so far %d MiB)", self.name, time.perf_counter() - start,
                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)

    return wrapper


def tilt_offsets_mm(datasets: Sequence[Dataset]) -> tuple[np.ndarray, np.ndarray]:
    """(steps between neighbouring slices along the normal, each slice's in-plane offset (mm) from the normal
    through the first), slices sorted along the normal of the first slice's plane; the offsets are zero unless
    the gantry was tilted."""
    cosines = np.asarray(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(cosines[:3], cosines[3:])
    normal /= np.linalg.norm(normal)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    positions = positions[np.argsort(positions @ normal)]
    from_first = positions - positions[0]
    return np.diff(positions @ normal), np.linalg.norm(from_first - np.outer(from_first @ normal, normal), axis=1)
