"""Initializers: where a quantizer's scale (and offset) start.

Each returns an ``InitResult`` with the MSE it reaches on the data it saw, so that a user can
compare initializers on the same layer. Tensor-level functions take the integer range
[qmin, qmax]; ``init_weight_quantizer`` and ``init_activation_quantizer`` apply a config's choice
to a ``Quantizer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lsq.errors import LSQError
from lsq.quantizers import SCALE_FLOOR, Quantizer, fake_quantize

#: Bins of the histogram the activation MSE search works on. Fine enough that bin-centre errors
#: stay far below a quantization step even at 8 bits; small enough that a whole grid of
#: candidates is one vectorised pass.
MSE_HIST_BINS = 8192


@dataclass
class InitResult:
    """A quantizer's initial scale, offset (None: symmetric, fixed at 0) and the MSE it reaches."""

    scale: Tensor
    offset: Tensor | None
    mse: float


def quant_mse(
    x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int, dim: int | None = None
) -> Tensor:
    """Mean squared fake-quantization error; per slice along ``dim`` if given, else overall."""
    with torch.no_grad():
        if dim is not None:
            view = (-1,) + (1,) * (x.dim() - 1)
            scale = scale.reshape(view)
            offset = None if offset is None else offset.reshape(view)
        err = (fake_quantize(x, scale.clamp_min(SCALE_FLOOR), offset, qmin, qmax) - x).pow(2)
        if dim is None:
            return err.mean()
        return err.flatten(1).mean(1)


def _rows(w: Tensor, per_channel: bool) -> Tensor:
    """``w`` as [channels, elements] when per-channel, else as one row [1, all elements]."""
    w = w.detach()
    if not per_channel:
        return w.reshape(1, -1)
    return w.flatten(1) if w.dim() > 1 else w.reshape(-1, 1)


# --- closed forms -------------------------------------------------------------------------------
def lsq_init(x: Tensor, qmin: int, qmax: int, per_channel: bool = False) -> InitResult:
    """LSQ: s = 2 mean(|x|) / sqrt(qmax), per output channel when ``per_channel``."""
    xs = _rows(x, per_channel)
    scale = 2 * xs.abs().mean(1) / math.sqrt(qmax)
    scale = scale.clamp_min(SCALE_FLOOR)
    return _result(x, scale, None, qmin, qmax, per_channel)


def lsq_plus_weight_init(w: Tensor, bits: int, per_channel: bool = True) -> InitResult:
    """LSQ+ weights: s = max(|mu - 3 sd|, |mu + 3 sd|) / 2^(b-1).

    The divisor 2^(b-1) follows the paper (public code also uses 2^b - 1 or 2^b). mu and sd are
    over the layer (per output channel when ``per_channel``); sd is the population deviation.
    """
    ws = _rows(w, per_channel)
    mu = ws.mean(1)
    sd = ws.std(1, correction=0)
    scale = torch.maximum((mu - 3 * sd).abs(), (mu + 3 * sd).abs()) / 2 ** (bits - 1)
    scale = scale.clamp_min(SCALE_FLOOR)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return _result(w, scale, None, qmin, qmax, per_channel)


def maxabs_init(w: Tensor, qmin: int, qmax: int, per_channel: bool = True) -> InitResult:
    """Symmetric min/max: s = max|w| / qmax, so nothing is clipped above (8-bit weights)."""
    ws = _rows(w, per_channel)
    scale = (ws.abs().amax(1) / qmax).clamp_min(SCALE_FLOOR)
    return _result(w, scale, None, qmin, qmax, per_channel)


def minmax_init(
    x: Tensor,
    qmin: int,
    qmax: int,
    asymmetric: bool,
    lo: float | None = None,
    hi: float | None = None,
) -> InitResult:
    """Min/max for a per-tensor activation quantizer.

    Asymmetric: s = (max - min) / (qmax - qmin), offset = min - qmin * s (the grid spans exactly
    [min, max]). Symmetric: the smallest scale that clips nothing on the grid's side(s).
    ``lo``/``hi`` give the observed min/max when ``x`` is only a sample of the data.
    """
    lo = float(x.min()) if lo is None else float(lo)
    hi = float(x.max()) if hi is None else float(hi)
    if asymmetric:
        s = max((hi - lo) / (qmax - qmin), SCALE_FLOOR)
        scale, offset = torch.tensor(s), torch.tensor(lo - qmin * s)
    else:
        s = hi / qmax if qmax > 0 else 0.0
        if qmin < 0:
            s = max(s, lo / qmin)
        scale, offset = torch.tensor(max(s, SCALE_FLOOR)), None
    return _result(x, scale, offset, qmin, qmax, False)


def _result(
    x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int, per_channel: bool
) -> InitResult:
    x = x.detach()
    if not per_channel:
        scale = scale.reshape(())  # a per-tensor search over one row returns shape [1]
    mse = quant_mse(x, scale, offset, qmin, qmax, dim=0 if per_channel else None)
    return InitResult(scale.float(), None if offset is None else offset.float(), float(mse.mean()))


# --- MSE search for activations -----------------------------------------------------------------
def _hist_mse(
    centers: Tensor, counts: Tensor, s: Tensor, b: Tensor, qmin: int, qmax: int
) -> Tensor:
    """Histogram estimate of the quantization MSE for K candidate (s, b) pairs at once."""
    total = counts.sum()
    out = torch.empty_like(s)
    chunk = max(1, 2**22 // centers.numel())
    for i in range(0, s.numel(), chunk):
        sk, bk = s[i : i + chunk, None], b[i : i + chunk, None]
        q = ((centers - bk) / sk).clamp(qmin, qmax).round() * sk + bk
        out[i : i + chunk] = ((q - centers) ** 2 * counts).sum(1) / total
    return out


def _grid(lo: float, hi: float, n: int, dtype: torch.dtype) -> Tensor:
    return torch.linspace(lo, hi, n, dtype=dtype)


def mse_init(
    x: Tensor,
    qmin: int,
    qmax: int,
    asymmetric: bool,
    lo: float | None = None,
    hi: float | None = None,
    refine_steps: int = 0,
    bins: int = MSE_HIST_BINS,
) -> InitResult:
    """LSQ+ activation init: (scale, offset) minimising ||x_hat - x||^2.

    A vectorised search over clipping ranges on a fine histogram of ``x``: a coarse grid, then
    three rounds of zooming in on the best cell. Asymmetric quantizers search (low, high); symmetric
    ones search the scale alone. ``refine_steps`` > 0 continues with Adam on (scale, offset) over
    ``x`` itself, the paper's gradient-descent variant, keeping the better of the two. ``x`` may be
    a sample of the data; ``lo``/``hi`` give the true min/max then.
    """
    x = x.detach().reshape(-1).double()
    if x.numel() == 0:
        raise LSQError("MSE init needs at least one value")
    lo = float(x.min()) if lo is None else min(float(lo), float(x.min()))
    hi = float(x.max()) if hi is None else max(float(hi), float(x.max()))
    width = hi - lo
    if width <= 0 or not math.isfinite(width):
        return minmax_init(x.float(), qmin, qmax, asymmetric, lo, hi)
    # Each bin is represented by the mean of its values (not its centre): a spike of exact
    # values, such as ReLU's zeros or ReLU6's sixes, then sits where it really is.
    idx = ((x - lo) * (bins / width)).long().clamp_(0, bins - 1)
    fine = (torch.bincount(idx, minlength=bins).double(), torch.bincount(idx, x, minlength=bins))
    # The coarse grid of candidates scores on a coarser histogram (8x fewer bins); the zoom
    # rounds, where the candidates are close together, on the fine one.
    coarse = tuple(t.view(-1, 8).sum(1) for t in fine) if bins % 8 == 0 else fine

    def occupied(hist: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        counts, sums = hist
        keep = counts > 0
        return (sums[keep] / counts[keep]).float(), counts[keep].float()

    hist_coarse, hist_fine = occupied(coarse), occupied(fine)
    levels = qmax - qmin

    if asymmetric:
        # Candidates: clip a fraction a of the range below and b above (a + b < 1).
        def evaluate(a: Tensor, b: Tensor, hist: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
            aa, bb = torch.meshgrid(a, b, indexing="ij")
            aa, bb = aa.reshape(-1), bb.reshape(-1)
            ok = aa + bb < 0.999
            aa, bb = aa[ok], bb[ok]
            s = (width * (1 - aa - bb)) / levels
            off = lo + aa * width - qmin * s
            return s, off, _hist_mse(*hist, s.float(), off.float(), qmin, qmax)

        a = b = _grid(0, 1, 48, x.dtype) ** 2 * 0.98
        step = 0.98 / 47
        s, off, err = evaluate(a, b, hist_coarse)
        best = int(err.argmin())
        for _ in range(4):
            a0 = float((off[best] + qmin * s[best] - lo) / width)
            b0 = float(1 - a0 - s[best] * levels / width)
            a = (a0 + _grid(-step, step, 13, x.dtype)).clamp(0, 0.999)
            b = (b0 + _grid(-step, step, 13, x.dtype)).clamp(0, 0.999)
            s, off, err = evaluate(a, b, hist_fine)
            best = int(err.argmin())
            step /= 6
        scale, offset = s[best], off[best]
    else:
        # Candidates: a fraction t of the scale that clips nothing.
        s_max = hi / qmax if hi > 0 else 0.0
        if qmin < 0:
            s_max = max(s_max, lo / qmin)
        if s_max <= 0:  # unsigned grid, all values <= 0: everything maps to 0
            return minmax_init(x.float(), qmin, qmax, False, lo, hi)

        def evaluate_t(t: Tensor, hist: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            s = t * s_max
            return s, _hist_mse(*hist, s.float(), torch.zeros_like(s).float(), qmin, qmax)

        t = _grid(1 / 512, 1, 512, x.dtype)
        step = 1 / 512
        s, err = evaluate_t(t, hist_coarse)
        best = int(err.argmin())
        for _ in range(3):
            t0 = float(s[best] / s_max)
            s, err = evaluate_t((t0 + _grid(-step, step, 17, x.dtype)).clamp_min(1e-6), hist_fine)
            best = int(err.argmin())
            step /= 8
        scale, offset = s[best], None

    result = _result(
        x.float(), scale.float(), None if offset is None else offset.float(), qmin, qmax, False
    )
    if refine_steps > 0:
        refined = _refine(x.float(), result, qmin, qmax, refine_steps)
        if refined.mse < result.mse:
            result = refined
    return result


def _refine(x: Tensor, start: InitResult, qmin: int, qmax: int, steps: int) -> InitResult:
    """Adam on (scale, offset) against the MSE, with LSQ's gradients; keeps the best step."""
    s = start.scale.clone().requires_grad_(True)
    params = [s]
    b = None
    if start.offset is not None:
        b = start.offset.clone().requires_grad_(True)
        params.append(b)
    opt = torch.optim.Adam(params, lr=float(start.scale) * 0.01)
    best = start
    for _ in range(steps):
        opt.zero_grad()
        loss = (fake_quantize(x, s.clamp_min(SCALE_FLOOR), b, qmin, qmax) - x).pow(2).mean()
        loss.backward()
        opt.step()
        cand = _result(
            x,
            s.detach().clamp_min(SCALE_FLOOR).clone(),
            None if b is None else b.detach().clone(),
            qmin,
            qmax,
            False,
        )
        if cand.mse < best.mse:
            best = cand
    return best


# --- MSE search for weights ---------------------------------------------------------------------
def mse_weight_init(
    w: Tensor, qmin: int, qmax: int, per_channel: bool = True, candidates: int = 100
) -> InitResult:
    """Per-channel search of the symmetric clipping range minimising the weight MSE.

    Tries scales t * max|w| / qmax for t on a grid in (0, 1], then zooms in once, per channel.
    """
    ws = _rows(w, per_channel).float()
    s_max = (ws.abs().amax(1) / qmax).clamp_min(SCALE_FLOOR)

    def errors(t: Tensor) -> Tensor:  # t: [C, T] -> err [C, T]
        out = torch.empty_like(t)
        for j in range(t.shape[1]):
            s = (t[:, j] * s_max)[:, None]
            out[:, j] = ((ws / s).clamp(qmin, qmax).round() * s - ws).pow(2).mean(1)
        return out

    t = _grid(0.05, 1.0, candidates, ws.dtype).expand(ws.shape[0], -1)
    err = errors(t)
    t0 = t.gather(1, err.argmin(1, keepdim=True))
    step = 0.95 / (candidates - 1)
    t = (t0 + _grid(-step, step, 21, ws.dtype)).clamp(1e-3, 1.0)
    err = errors(t)
    best_t = t.gather(1, err.argmin(1, keepdim=True)).squeeze(1)
    scale = (best_t * s_max).clamp_min(SCALE_FLOOR)
    return _result(w, scale, None, qmin, qmax, per_channel)


# --- applying a config's choice to a quantizer ----------------------------------------------------
def init_weight_quantizer(q: Quantizer, weight: Tensor, method: str) -> InitResult:
    """Initialise a weight quantizer from its weight with ``method`` (see config.WEIGHT_INITS)."""
    if method == "3sigma":
        r = lsq_plus_weight_init(weight, q.bits, q.per_channel)
    elif method == "lsq":
        r = lsq_init(weight, q.qmin, q.qmax, q.per_channel)
    elif method == "maxabs":
        r = maxabs_init(weight, q.qmin, q.qmax, q.per_channel)
    elif method == "mse":
        r = mse_weight_init(weight, q.qmin, q.qmax, q.per_channel)
    else:
        raise LSQError(f"unknown weight init {method!r}")
    q.set_range(r.scale, r.offset)
    return r


def init_activation_quantizer(
    q: Quantizer,
    sample: Tensor,
    method: str,
    lo: float | None = None,
    hi: float | None = None,
    refine_steps: int = 0,
) -> InitResult:
    """Initialise an activation quantizer from a sample of its inputs (see config.ACT_INITS).

    ``lo``/``hi`` are the observed min/max over all calibration data (the sample may miss them).
    """
    if sample.numel() == 0:
        raise LSQError("no calibration values reached this layer")
    if method == "mse":
        r = mse_init(sample, q.qmin, q.qmax, q.asymmetric, lo, hi, refine_steps=refine_steps)
    elif method == "lsq":
        r = lsq_init(sample, q.qmin, q.qmax, per_channel=False)
        if q.asymmetric:
            r = InitResult(r.scale, torch.zeros(()), r.mse)
    elif method == "minmax":
        r = minmax_init(sample, q.qmin, q.qmax, q.asymmetric, lo, hi)
    else:
        raise LSQError(f"unknown activation init {method!r}")
    q.set_range(r.scale, r.offset)
    return r
