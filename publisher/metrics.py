"""Fidelity measures shared by conversion tests, palettization reports and verification."""

from __future__ import annotations

import math

import numpy as np


def psnr(reference: np.ndarray, output: np.ndarray) -> float:
    """Apple's bar: 20*log10((max|ref| + 1e-5) / (RMSE(out - ref) + 1e-10)), in dB."""
    reference = np.asarray(reference, dtype=np.float64)
    output = np.asarray(output, dtype=np.float64)
    if reference.shape != output.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {output.shape}")
    rmse = math.sqrt(float(np.mean((output - reference) ** 2))) if reference.size else 0.0
    peak = float(np.max(np.abs(reference))) if reference.size else 0.0
    return 20 * math.log10((peak + 1e-5) / (rmse + 1e-10))


def snr(reference: np.ndarray, approximation: np.ndarray) -> float:
    """Signal-to-noise ratio of a weight approximation in dB: 10*log10(sum(ref^2) / sum((ref - approx)^2)).

    float32 vectors and BLAS dot products: weights are float16, so float32 loses nothing that matters here, and the
    whole of a full-size UNet is measured in seconds."""
    reference = np.asarray(reference, dtype=np.float32).reshape(-1)
    difference = reference - np.asarray(approximation, dtype=np.float32).reshape(-1)
    noise = float(np.dot(difference.astype(np.float64), difference.astype(np.float64))) \
        if difference.size < 1_000_000 else float(np.dot(difference, difference))
    signal = float(np.dot(reference, reference))
    if noise == 0.0:
        return math.inf
    return 10 * math.log10(max(signal, 1e-300) / noise)
