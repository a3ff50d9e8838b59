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
        scale, offset = torch.tensor(max(_no_clip_scale(lo, hi, qmin, qmax), SCALE_FLOOR)), None
    return _result(x, scale, offset, qmin, qmax, False)


def _no_clip_scale(lo: float, hi: float, qmin: int, qmax: int) -> float:
    """The smallest scale of a symmetric grid [qmin, qmax] * s that clips nothing of [lo, hi] on
    the side(s) the grid has (0 when no side can hold the data)."""
    above = hi / qmax if qmax > 0 and hi > 0 else 0.0
    below = lo / qmin if qmin < 0 and lo < 0 else 0.0
    return max(above, below)


def _result(
    x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int, per_channel: bool
) -> InitResult:
    x = x.detach()
    if not per_channel:
        scale = scale.reshape(())  # a per-tensor search over one row returns shape [1]
    mse = quant_mse(x, scale, offset, qmin, qmax, dim=0 if per_channel else None)
    return InitResult(scale.float(), None if offset is None else offset.float(), float(mse.mean()))


# --- MSE search for activations -----------------------------------------------------------------
# The search scores candidate grids on a histogram of x: first a coarse grid of candidates on
# a histogram with COARSE_BIN_FACTOR times fewer bins, then rounds that zoom in on the best one,
# on the fine histogram.
COARSE_BIN_FACTOR = 8
#: Asymmetric grids: clip a share a of the range below and b above. The coarse candidates are
#: a, b = MAX_CLIP * u^2 for ASYM_POINTS values of u in [0, 1] (dense near 0, where the optimum
#: usually is); each zoom round tries ASYM_ZOOM_POINTS values of a and of b within one step of the
#: best, then narrows the step ASYM_ZOOM_SHRINK times.
ASYM_POINTS = 48
MAX_CLIP = 0.98
MAX_CLIP_SUM = 0.999  # a + b below this: the grid keeps some width
ASYM_ZOOM_ROUNDS = 4
ASYM_ZOOM_POINTS = 13
ASYM_ZOOM_SHRINK = 6
#: Symmetric grids: the scale is a share t of the scale that clips nothing, t in
#: (0, 1] on SYM_POINTS values, then SYM_ZOOM_ROUNDS rounds of SYM_ZOOM_POINTS around the best.
SYM_POINTS = 512
SYM_ZOOM_ROUNDS = 3
SYM_ZOOM_POINTS = 17
SYM_ZOOM_SHRINK = 8
SYM_MIN_SHARE = 1e-6

_Hist = tuple[Tensor, Tensor]  # (value of each occupied bin, its count), float32


def _hist_mse(hist: _Hist, s: Tensor, b: Tensor, qmin: int, qmax: int) -> Tensor:
    """Histogram estimate of the quantization MSE for K candidate (s, b) pairs at once."""
    centers, counts = hist
    total = counts.sum()
    out = torch.empty_like(s)
    chunk = max(1, 2**22 // centers.numel())
    for i in range(0, s.numel(), chunk):
        sk, bk = s[i : i + chunk, None], b[i : i + chunk, None]
        q = ((centers - bk) / sk).clamp(qmin, qmax).round() * sk + bk
        out[i : i + chunk] = ((q - centers) ** 2 * counts).sum(1) / total
    return out


def _grid(lo: float, hi: float, n: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``n`` points from ``lo`` to ``hi`` on ``like``'s device (in its dtype unless given)."""
    return torch.linspace(lo, hi, n, dtype=dtype or like.dtype, device=like.device)


def _histograms(x: Tensor, lo: float, width: float, bins: int) -> tuple[_Hist, _Hist]:
    """(coarse, fine) histograms of x over [lo, lo + width], keeping only occupied bins.

    Each bin is represented by the mean of its values (not its centre): a spike of exact values,
    such as ReLU's zeros or ReLU6's sixes, then sits where it really is.
    """
    idx = ((x - lo) * (bins / width)).long().clamp_(0, bins - 1)
    fine = (torch.bincount(idx, minlength=bins).double(), torch.bincount(idx, x, minlength=bins))
    coarse = (
        tuple(t.view(-1, COARSE_BIN_FACTOR).sum(1) for t in fine)
        if bins % COARSE_BIN_FACTOR == 0
        else fine
    )

    def occupied(counts: Tensor, sums: Tensor) -> _Hist:
        keep = counts > 0
        return (sums[keep] / counts[keep]).float(), counts[keep].float()

    return occupied(*coarse), occupied(*fine)


def _search_asymmetric(
    coarse: _Hist, fine: _Hist, lo: float, width: float, qmin: int, qmax: int
) -> tuple[Tensor, Tensor]:
    """(scale, offset) of the asymmetric grid with the least histogram MSE."""
    levels = qmax - qmin
    dtype = torch.float64

    def evaluate(a: Tensor, b: Tensor, hist: _Hist) -> tuple[Tensor, Tensor, Tensor]:
        aa, bb = (t.reshape(-1) for t in torch.meshgrid(a, b, indexing="ij"))
        keep = aa + bb < MAX_CLIP_SUM
        aa, bb = aa[keep], bb[keep]
        s = width * (1 - aa - bb) / levels
        off = lo + aa * width - qmin * s
        return s, off, _hist_mse(hist, s.float(), off.float(), qmin, qmax)

    shares = _grid(0, 1, ASYM_POINTS, coarse[0], dtype) ** 2 * MAX_CLIP
    s, off, err = evaluate(shares, shares, coarse)
    step = MAX_CLIP / (ASYM_POINTS - 1)
    for _ in range(ASYM_ZOOM_ROUNDS):
        best = int(err.argmin())
        a0 = float((off[best] + qmin * s[best] - lo) / width)
        b0 = float(1 - a0 - s[best] * levels / width)
        around = _grid(-step, step, ASYM_ZOOM_POINTS, coarse[0], dtype)
        a = (a0 + around).clamp(0, MAX_CLIP_SUM)
        b = (b0 + around).clamp(0, MAX_CLIP_SUM)
        s, off, err = evaluate(a, b, fine)
        step /= ASYM_ZOOM_SHRINK
    best = int(err.argmin())
    return s[best], off[best]


def _search_symmetric(coarse: _Hist, fine: _Hist, s_max: float, qmin: int, qmax: int) -> Tensor:
    """The scale of the symmetric grid (offset 0) with the least histogram MSE."""
    dtype = torch.float64

    def evaluate(t: Tensor, hist: _Hist) -> tuple[Tensor, Tensor]:
        s = t * s_max
        return s, _hist_mse(hist, s.float(), torch.zeros_like(s).float(), qmin, qmax)

    step = 1 / SYM_POINTS
    s, err = evaluate(_grid(step, 1, SYM_POINTS, coarse[0], dtype), coarse)
    for _ in range(SYM_ZOOM_ROUNDS):
        t0 = float(s[int(err.argmin())] / s_max)
        around = _grid(-step, step, SYM_ZOOM_POINTS, coarse[0], dtype)
        s, err = evaluate((t0 + around).clamp_min(SYM_MIN_SHARE), fine)
        step /= SYM_ZOOM_SHRINK
    return s[int(err.argmin())]


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
    rounds of zooming in on the best candidate. Asymmetric quantizers search (low, high);
    symmetric ones search the scale alone. ``refine_steps`` > 0 continues with ``refine_init``
    (the paper's gradient-descent variant), keeping the better of the two. ``x`` may be a sample
    of the data; ``lo``/``hi`` give the true min/max then.
    """
    x = x.detach().reshape(-1).double()
    if x.numel() == 0:
        raise LSQError("MSE init needs at least one value")
    lo = float(x.min()) if lo is None else min(float(lo), float(x.min()))
    hi = float(x.max()) if hi is None else max(float(hi), float(x.max()))
    width = hi - lo
    if width <= 0 or not math.isfinite(width):
        return minmax_init(x.float(), qmin, qmax, asymmetric, lo, hi)
    s_max = _no_clip_scale(lo, hi, qmin, qmax)
    if not asymmetric and s_max <= 0:  # unsigned grid, all values <= 0: everything maps to 0
        return minmax_init(x.float(), qmin, qmax, False, lo, hi)

    coarse, fine = _histograms(x, lo, width, bins)
    if asymmetric:
        scale, offset = _search_asymmetric(coarse, fine, lo, width, qmin, qmax)
        offset = offset.float()
    else:
        scale, offset = _search_symmetric(coarse, fine, s_max, qmin, qmax), None
    result = _result(x.float(), scale.float(), offset, qmin, qmax, False)
    if refine_steps > 0:
        refined = refine_init(x.float(), result, qmin, qmax, refine_steps)
        if refined.mse < result.mse:
            result = refined
    return result


def refine_init(x: Tensor, start: InitResult, qmin: int, qmax: int, steps: int) -> InitResult:
    """The paper's MSE init by gradient descent: Adam on (scale, offset) from ``start``.

    The gradients are LSQ's (straight-through round); returns the step with the least MSE.
    """
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
    """Per-channel search of the symmetric clipping range minimising the weight MSE
    (``mse_weight_scale``), with the MSE it reaches."""
    scale = mse_weight_scale(_rows(w, per_channel).float(), qmin, qmax, candidates)
    return _result(w, scale, None, qmin, qmax, per_channel)


def mse_weight_scale(ws: Tensor, qmin: int, qmax: int, candidates: int = 100) -> Tensor:
    """The scale of each row of ``ws`` [rows, elements] minimising its quantization MSE.

    Tries scales t * max|w| / qmax for t on a grid in (0, 1], then zooms in once, per row. All on
    ``ws``'s device, with no number read back on the host.
    """
    s_max = (ws.abs().amax(1) / qmax).clamp_min(SCALE_FLOOR)

    def errors(t: Tensor) -> Tensor:  # t: [C, T] -> err [C, T]
        out = torch.empty_like(t)
        for j in range(t.shape[1]):
            s = (t[:, j] * s_max)[:, None]
            out[:, j] = ((ws / s).clamp(qmin, qmax).round() * s - ws).pow(2).mean(1)
        return out

    t = _grid(0.05, 1.0, candidates, ws).expand(ws.shape[0], -1)
    err = errors(t)
    t0 = t.gather(1, err.argmin(1, keepdim=True))
    step = 0.95 / (candidates - 1)
    t = (t0 + _grid(-step, step, 21, ws)).clamp(1e-3, 1.0)
    err = errors(t)
    best_t = t.gather(1, err.argmin(1, keepdim=True)).squeeze(1)
    return (best_t * s_max).clamp_min(SCALE_FLOOR)


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
