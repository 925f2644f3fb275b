"""Exact 1-D k-means for float16 tensors, from a histogram of bit patterns.

A float16 tensor has at most 65,536 distinct values, so the k-means problem over its elements is the same
problem over its distinct values weighted by their counts. Counting the bit patterns (bincount, no sort) gives
those values and counts in one pass; the optimal clustering of sorted weighted points is then found exactly by
the dynamic programme of coremltools' bundled 1-D solver (its C library is called directly on numpy buffers,
without coremltools' Python-side sort and list conversions). Every element's index is then a table lookup by
bit pattern.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import numpy as np

PATTERNS = 1 << 16


@dataclass(frozen=True)
class Palette:
    lut: np.ndarray  # float16, (2**nbits,)
    indices: np.ndarray  # uint8, same shape as the tensor

    def dequantize(self) -> np.ndarray:
        return self.lut[self.indices]


@cache
def _solver() -> ctypes.CDLL:
    from publisher.convert.coreml import import_coremltools

    import_coremltools()
    from coremltools._deps import kmeans1d

    library = ctypes.cdll.LoadLibrary(kmeans1d._core.__file__)
    library.cluster_with_weights.restype = None
    library.cluster_with_weights.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong,
                                             ctypes.c_void_p, ctypes.c_void_p]
    return library


def solve_weighted(values: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal k-means of sorted weighted points: (cluster of each point, centroids), both of length n / k."""
    n = len(values)
    k = min(k, n)
    points = np.ascontiguousarray(values, dtype=np.float64)
    weights = np.ascontiguousarray(counts, dtype=np.float64)
    clusters = np.zeros(n, dtype=np.uint64)  # C `unsigned long` on LP64
    centroids = np.zeros(k, dtype=np.float64)
    _solver().cluster_with_weights(points.ctypes.data, weights.ctypes.data, n, k, clusters.ctypes.data,
                                   centroids.ctypes.data)
    return clusters.astype(np.int64), centroids


def histogram(tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct float16 values (sorted by value) and their counts; NaN patterns are refused."""
    if tensor.dtype != np.float16:
        raise TypeError(f"expected a float16 tensor, got {tensor.dtype}")
    counts = np.bincount(np.ascontiguousarray(tensor).reshape(-1).view(np.uint16), minlength=PATTERNS)
    patterns = np.flatnonzero(counts).astype(np.uint16)
    values = patterns.view(np.float16)
    if np.isnan(values).any():
        raise ValueError("tensor contains NaN")
    order = np.argsort(values.astype(np.float32), kind="stable")
    return patterns[order], counts[patterns[order]]


def palettize_tensor(tensor: np.ndarray, nbits: int) -> Palette:
    """Per-tensor LUT of 2**nbits float16 entries and a uint8 index per element."""
    patterns, counts = histogram(tensor)
    values = patterns.view(np.float16).astype(np.float64)
    clusters, centroids = solve_weighted(values, counts, 1 << nbits)
    lut = np.zeros(1 << nbits, dtype=np.float16)
    lut[: len(centroids)] = centroids.astype(np.float16)
    table = np.zeros(PATTERNS, dtype=np.uint8)
    table[patterns] = clusters.astype(np.uint8)
    # +0.0 and -0.0 are distinct patterns with one value: both are in `patterns` if present, nothing else needed
    indices = table[np.ascontiguousarray(tensor).view(np.uint16)]
    return Palette(lut=lut, indices=indices)


def palettize_grouped(tensor: np.ndarray, nbits: int, group_size: int, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One LUT per group of `group_size` channels along `axis`: returns (luts (groups, 2**nbits), indices)."""
    moved = np.moveaxis(tensor, axis, 0)
    channels = moved.shape[0]
    if channels % group_size:
        raise ValueError(f"{channels} channels are not a multiple of the group size {group_size}")
    groups = channels // group_size
    luts = np.zeros((groups, 1 << nbits), dtype=np.float16)
    indices = np.empty(moved.shape, dtype=np.uint8)
    for group in range(groups):
        part = moved[group * group_size:(group + 1) * group_size]
        palette = palettize_tensor(part, nbits)
        luts[group] = palette.lut
        indices[group * group_size:(group + 1) * group_size] = palette.indices
    return luts, np.moveaxis(indices, 0, axis)
