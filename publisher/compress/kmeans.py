"""Exact 1-D k-means for float16 tensors, from a histogram of bit patterns.

A float16 tensor has at most 65,536 distinct values, so the k-means problem over its elements is the same
problem over its distinct values weighted by their counts. Counting the bit patterns (no sort) gives those values
and counts in one pass; the optimal clustering of the sorted weighted points is then found exactly by dynamic
programming over prefix sums. Each DP layer is solved by divide and conquer on the optimal split point, which
is monotone in the prefix length for squared error in 1-D (the cost has the Monge property), so every layer costs
O(n log n) instead of O(n^2). Every element's index is then a table lookup by bit pattern. The kernels are
compiled with numba and release the GIL, so tensors are solved in parallel threads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numba import njit

PATTERNS = 1 << 16


@dataclass(frozen=True)
class Palette:
    lut: np.ndarray  # float16, (2**nbits,)
    indices: np.ndarray  # uint8, same shape as the tensor

    def dequantize(self) -> np.ndarray:
        return self.lut[self.indices]


@njit(cache=True, nogil=True)
def _pattern_counts(patterns: np.ndarray) -> np.ndarray:
    counts = np.zeros(PATTERNS, dtype=np.int64)
    for pattern in patterns:
        counts[pattern] += 1
    return counts


@njit(cache=True, nogil=True)
def _lookup(table: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    out = np.empty(patterns.size, dtype=np.uint8)
    for i in range(patterns.size):
        out[i] = table[patterns[i]]
    return out


@njit(cache=True, nogil=True)
def _optimal_partition(values: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:

    n = values.size
    # prefix sums of the centred values keep the squared-error differences well conditioned
    centre = (values * weights).sum() / weights.sum()
    w_sum = np.zeros(n + 1)
    x_sum = np.zeros(n + 1)
    xx_sum = np.zeros(n + 1)
    for i in range(n):
        d = values[i] - centre
        w_sum[i + 1] = w_sum[i] + weights[i]
        x_sum[i + 1] = x_sum[i] + weights[i] * d
        xx_sum[i + 1] = xx_sum[i] + weights[i] * d * d
    # previous[i]: least squared error of the first i points in (layer - 1) clusters
    previous = np.empty(n + 1)
    current = np.empty(n + 1)
    previous[0] = 0.0
    for i in range(1, n + 1):
        previous[i] = xx_sum[i] - x_sum[i] * x_sum[i] / w_sum[i]
    split = np.zeros((k + 1, n + 1), dtype=np.int32)  # split[layer, i]: first point of the last cluster
    stack = np.empty((128, 4), dtype=np.int64)  # (first i, last i, first split, last split): depth <= log2(n) + 1
    for layer in range(2, k + 1):
        # only prefixes that leave a point for each of the remaining clusters matter; the last layer needs all n
        first = n if layer == k else layer
        last = n - (k - layer)
        stack[0, 0], stack[0, 1], stack[0, 2], stack[0, 3] = first, last, layer - 1, last - 1
        top = 1
        while top > 0:
            top -= 1
            lo, hi, split_lo, split_hi = stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3]
            if lo > hi:
                continue
            mid = (lo + hi) // 2
            best = np.inf
            best_split = split_lo
            for j in range(split_lo, min(split_hi, mid - 1) + 1):
                s = x_sum[mid] - x_sum[j]
                cost = previous[j] + (xx_sum[mid] - xx_sum[j]) - s * s / (w_sum[mid] - w_sum[j])
                if cost < best:
                    best = cost
                    best_split = j
            current[mid] = best
            split[layer, mid] = best_split
            stack[top, 0], stack[top, 1], stack[top, 2], stack[top, 3] = lo, mid - 1, split_lo, best_split
            stack[top + 1, 0], stack[top + 1, 1], stack[top + 1, 2], stack[top + 1, 3] = mid + 1, hi, best_split, split_hi
            top += 2
        previous, current = current, previous
    clusters = np.empty(n, dtype=np.int64)
    centroids = np.empty(k)
    end = n
    for layer in range(k, 0, -1):
        start = split[layer, end] if layer > 1 else 0
        weight = 0.0
        total = 0.0
        for t in range(start, end):
            clusters[t] = layer - 1
            weight += weights[t]
            total += weights[t] * values[t]
        centroids[layer - 1] = total / weight
        end = start
    return clusters, centroids


def solve_weighted(values: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Optimal k-means of sorted weighted points: (cluster of each point, centroids), both of length n / k."""
    k = min(k, len(values))
    return _optimal_partition(np.ascontiguousarray(values, dtype=np.float64),
                              np.ascontiguousarray(counts, dtype=np.float64), k)


def histogram(tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct float16 bit patterns (sorted by value) and their counts; NaN and infinity are refused."""
    if tensor.dtype != np.float16:
        raise TypeError(f"expected a float16 tensor, got {tensor.dtype}")
    counts = _pattern_counts(np.ascontiguousarray(tensor).reshape(-1).view(np.uint16))
    patterns = np.flatnonzero(counts).astype(np.uint16)
    values = patterns.view(np.float16)
    if not np.isfinite(values).all():  # the squared-error DP is undefined there
        raise ValueError("tensor contains NaN or infinity")
    order = np.argsort(values.astype(np.float32), kind="stable")
    return patterns[order], counts[patterns[order]]


def _palette(tensor: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """(LUT of 2**nbits float16 entries, cluster index of every float16 bit pattern (65536 entries))."""
    patterns, counts = histogram(tensor)
    clusters, centroids = solve_weighted(patterns.view(np.float16).astype(np.float64), counts, 1 << nbits)
    lut = np.zeros(1 << nbits, dtype=np.float16)
    lut[: len(centroids)] = centroids.astype(np.float16)
    table = np.zeros(PATTERNS, dtype=np.uint8)
    # +0.0 and -0.0 are distinct patterns with one value: both are in `patterns` if present, nothing else needed
    table[patterns] = clusters.astype(np.uint8)
    return lut, table


def palettize_tensor(tensor: np.ndarray, nbits: int) -> Palette:
    """Per-tensor LUT of 2**nbits float16 entries and a uint8 index per element."""
    lut, table = _palette(tensor, nbits)
    indices = _lookup(table, np.ascontiguousarray(tensor).reshape(-1).view(np.uint16)).reshape(tensor.shape)
    return Palette(lut=lut, indices=indices)


def value_map(tensor: np.ndarray, nbits: int) -> np.ndarray:
    """The per-tensor palettization as a map from each float16 bit pattern to its LUT value (65536 float16
    entries, 128 KB): `value_map(t, n)[t.view(np.uint16)]` is the dense palettized tensor, and an analysis that
    revisits a (tensor, nbits) keeps the map instead of a dense copy."""
    lut, table = _palette(tensor, nbits)
    return lut[table]


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
