"""Dense weights from a LUT and its indices, and the SNR of that approximation without building it."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

# float64 value of every float16 bit pattern: kernels index it instead of doing float16 arithmetic
_FLOAT16_VALUES = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float64)


def _groups(lut: np.ndarray) -> np.ndarray:
    """A LUT in either layout (flat per-tensor, or (groups, 1.., palette, 1)) as a (groups, palette) table."""
    palette = lut.shape[-2] if lut.ndim >= 2 else lut.size
    return np.ascontiguousarray(lut).reshape(-1, palette)


def lut_lookup(lut: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Dense weight from a LUT and indices, for both the per-tensor and the grouped LUT layout (groups of rows
    along axis 0)."""
    table = _groups(lut)
    if table.shape[0] == 1:
        return table[0][indices]
    rows = np.asarray(indices).reshape(table.shape[0], -1)
    return np.take_along_axis(table, rows.astype(np.intp), axis=1).reshape(indices.shape)


@njit(cache=True, nogil=True)
def _energies(patterns: np.ndarray, values: np.ndarray, table: np.ndarray, indices: np.ndarray) -> tuple[float, float]:
    per_group = indices.size // table.shape[0]
    signal = 0.0
    noise = 0.0
    for i in range(indices.size):
        reference = values[patterns[i]]
        difference = reference - table[i // per_group, indices[i]]
        signal += reference * reference
        noise += difference * difference
    return signal, noise


def lut_snr(reference: np.ndarray, lut: np.ndarray, indices: np.ndarray) -> float:
    """10*log10(sum(ref^2) / sum((ref - lut[indices])^2)) in dB for a float16 reference, accumulated in float64
    in one pass (the dense weight is never materialised)."""
    if reference.dtype != np.float16 or reference.size != indices.size:
        raise ValueError("reference must be float16 with one element per index")
    table = _groups(lut).astype(np.float64)
    signal, noise = _energies(np.ascontiguousarray(reference).reshape(-1).view(np.uint16), _FLOAT16_VALUES, table,
                              np.ascontiguousarray(indices, dtype=np.uint8).reshape(-1))
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)
