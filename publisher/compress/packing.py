"""Bit packing of palette indices as constexpr_lut_to_dense (iOS16) stores them: little-endian bit stream,
element i in bits [i*nbits, (i+1)*nbits), least significant bit first. Compiled with numba (one pass, no
intermediate arrays), releasing the GIL so that packing runs beside the solver."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _pack(indices: np.ndarray, nbits: int, out: np.ndarray) -> None:
    pending: Any = 0  # bits not yet written, least significant first (an int64 in the compiled kernel)
    filled = 0
    position = 0
    for value in indices:
        pending |= np.int64(value) << filled
        filled += nbits
        while filled >= 8:
            out[position] = pending & 0xFF
            pending >>= 8
            filled -= 8
            position += 1
    if filled > 0:
        out[position] = pending & 0xFF


@njit(cache=True, nogil=True)
def _unpack(packed: np.ndarray, nbits: int, out: np.ndarray) -> None:
    mask = (1 << nbits) - 1
    pending: Any = 0  # an int64 in the compiled kernel
    filled = 0
    position = 0
    for i in range(out.size):
        while filled < nbits:
            pending |= np.int64(packed[position]) << filled
            position += 1
            filled += 8
        out[i] = pending & mask
        pending >>= nbits
        filled -= nbits


def pack_indices(indices: np.ndarray, nbits: int) -> np.ndarray:
    """Pack uint8 indices (each < 2**nbits) into ceil(n*nbits/8) bytes."""
    flat = np.ascontiguousarray(indices, dtype=np.uint8).reshape(-1)
    if nbits == 8:
        return flat.copy()
    out = np.empty(math.ceil(flat.size * nbits / 8), dtype=np.uint8)
    _pack(flat, nbits, out)
    return out


def unpack_indices(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Inverse of pack_indices (for reading packages back)."""
    data = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    if nbits == 8:
        return data[:count].copy()
    if data.size * 8 < count * nbits:
        raise ValueError(f"{data.size} packed bytes hold fewer than {count} {nbits}-bit indices")
    out = np.empty(count, dtype=np.uint8)
    _unpack(data, nbits, out)
    return out
