"""Bit packing of palette indices as constexpr_lut_to_dense (iOS16) stores them: little-endian bit stream,
element i in bits [i*nbits, (i+1)*nbits), least significant bit first."""

from __future__ import annotations

import math

import numpy as np


def pack_indices(indices: np.ndarray, nbits: int) -> np.ndarray:
    """Pack uint8 indices (each < 2**nbits) into ceil(n*nbits/8) bytes, vectorised by groups of whole bytes."""
    flat = np.ascontiguousarray(indices, dtype=np.uint8).reshape(-1)
    if nbits == 8:
        return flat.copy()
    per_group = 8 // math.gcd(nbits, 8)  # elements that fill a whole number of bytes
    group_bytes = per_group * nbits // 8
    padded = np.zeros(math.ceil(flat.size / per_group) * per_group, dtype=np.uint32)
    padded[: flat.size] = flat
    grouped = padded.reshape(-1, per_group)
    word = np.zeros(grouped.shape[0], dtype=np.uint32)
    for j in range(per_group):
        word |= grouped[:, j] << np.uint32(j * nbits)
    packed = np.empty((grouped.shape[0], group_bytes), dtype=np.uint8)
    for b in range(group_bytes):
        packed[:, b] = (word >> np.uint32(8 * b)) & np.uint32(0xFF)
    return packed.reshape(-1)[: math.ceil(flat.size * nbits / 8)]


def unpack_indices(packed: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """Inverse of pack_indices (for reading packages back), vectorised by the same whole-byte groups."""
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if nbits == 8:
        return data[:count].copy()
    per_group = 8 // math.gcd(nbits, 8)
    group_bytes = per_group * nbits // 8
    groups = math.ceil(count / per_group)
    padded = np.zeros(groups * group_bytes, dtype=np.uint8)
    padded[: min(data.size, padded.size)] = data[: padded.size]
    grouped = padded.reshape(groups, group_bytes).astype(np.uint32)
    word = np.zeros(groups, dtype=np.uint32)
    for b in range(group_bytes):
        word |= grouped[:, b] << np.uint32(8 * b)
    mask = np.uint32((1 << nbits) - 1)
    out = np.empty((groups, per_group), dtype=np.uint8)
    for j in range(per_group):
        out[:, j] = (word >> np.uint32(j * nbits)) & mask
    return out.reshape(-1)[:count]
