"""How far a quantized model is from its float model, written once: signal-to-noise in decibels
(layer tables, the Range lab, export), the distillation KL and top-1 agreement on logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher || student) on the softmax of the logits, averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


@torch.no_grad()
def logits(model: nn.Module, views: Tensor, batch: int = 32) -> Tensor:
    """The model's logits (fp32) on ``views``, in batches, on the model's device, in eval mode."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat(
        [model(views[i : i + batch].to(device)).float() for i in range(0, len(views), batch)]
    )


@torch.no_grad()
def agreement_and_kl(model: nn.Module, views: Tensor, teacher_logits: Tensor, batch: int = 32):
    """Top-1 agreement with the teacher and mean KL(teacher || model) on ``views``."""
    out = logits(model, views, batch)
    t = teacher_logits.to(out.device)
    return float((out.argmax(-1) == t.argmax(-1)).float().mean()), float(distillation_loss(out, t))
