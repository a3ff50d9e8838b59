"""Signal-to-noise in decibels, written once: layer tables, the Range lab and export use it."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): inf when the noise is 0, -inf when the signal is."""
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def signal_power(x: Tensor) -> float:
    """The sum of squares of ``x``, accumulated in float64 (the numerator of ``sqnr_db``)."""
    return float(torch.linalg.vector_norm(x.detach(), dtype=torch.float64)) ** 2


def sqnr_db(reference: Tensor, approx: Tensor, signal: float | None = None) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference`` in dB; inf when
    exact. ``signal``: ``signal_power(reference)`` when the caller keeps it (the Range lab does)."""
    # the difference in the inputs' dtype, its squares summed in float64 without a float64 copy
    noise = signal_power(reference.detach() - approx.detach())
    return db(signal_power(reference) if signal is None else signal, noise)
