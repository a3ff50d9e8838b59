"""Play with one range: clipping vs rounding error, and the whole model's answer to one layer.

Three pieces, all pure (no Streamlit):

- ``error_split``: a quantizer's MSE on some values, split into the part from values outside the
  range (clipping) and the part from rounding the values inside it. The two add up to the total.
- ``RangeLab``: one layer of a model, its input cached on a few views, and the rest of the
  network run from the unit holding that layer onwards. Each ``evaluate`` sets that layer's input
  range and reports the split, the layer-output SQNR and the model-level KL and top-1 agreement
  against float, with every other layer float ("only that layer changed").
- ``intro_grids``: the paper's opening picture, computed: a Swish-like skewed sample with the best
  unsigned LSQ, signed LSQ and LSQ+ grids at a bit width, each with its MSE.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from lsq.convert import quant_layers, quantizers
from lsq.errors import LSQError
from lsq.init import lsq_init, minmax_init, mse_init
from lsq.metrics import db, distillation_loss, signal_power, sqnr_db
from lsq.quantizers import SCALE_FLOOR, Quantizer, check_bits, fake_quantize, int_range
from lsq.reconstruct import Unit, find_units

#: The grids a layer input can have: LSQ+ (unsigned grid + continuous offset), unsigned, signed.
GRIDS = ("asymmetric", "unsigned", "signed")
#: Values the snapping initializers look at, at most (a uniform subsample of the cached input).
SNAP_SAMPLE = 1 << 18


# ------------------------------------------------------------------------------ error split


@dataclass(frozen=True)
class ErrorSplit:
    """A quantizer's mean squared error on some values, by where it comes from.

    ``clip``: from values outside the range (each is mapped to the nearest bound);
    ``round``: from values inside it, rounded to the nearest level. ``clip + round == total``.
    ``clipped`` is the share of values outside; ``power`` the values' mean square (signal).
    """

    clip: float
    round: float
    total: float
    clipped: float
    power: float
    #: Shares of the values below and above the range, and of those within half a step of it
    #: (mapped onto the end level just as rounding would map them): ``plots.clip_text``'s words.
    below: float = 0.0
    above: float = 0.0
    below_near: float = 0.0
    above_near: float = 0.0

    def clip_summary(self) -> dict[str, float]:
        """The exact shares outside the range, as ``plots.clip_summary`` estimates them from a
        histogram: the caption and the chart say the same numbers."""
        return {
            "below": self.below,
            "above": self.above,
            "below_near": self.below_near,
            "above_near": self.above_near,
        }

    @property
    def sqnr_db(self) -> float:
        return db(self.power, self.total)


def error_split(
    x: Tensor,
    scale: float | Tensor,
    offset: float | Tensor | None,
    qmin: int,
    qmax: int,
    power: float | None = None,
) -> ErrorSplit:
    """Split the fake-quantization MSE of ``x`` into clipping and rounding error.

    A value is clipped when (x - offset) / scale lies strictly outside [qmin, qmax]; a value on a
    bound is exactly representable, so it adds nothing to either part. ``power``: the mean square
    of ``x`` when the caller already has it. Computed in float64 (a float64 ``x`` is used as is).
    """
    x = x.detach().reshape(-1).double()
    n = x.numel()
    if n == 0:
        raise LSQError("the error split needs at least one value")
    s = torch.as_tensor(scale, dtype=torch.float64).clamp_min(SCALE_FLOOR)
    b = None if offset is None else torch.as_tensor(offset, dtype=torch.float64)
    err = (fake_quantize(x, s, b, qmin, qmax) - x).square_()
    v = x / s if b is None else (x - b).div_(s)
    below, above = v < qmin, v > qmax
    total = float(err.sum()) / n
    clip = float(err.masked_fill_(~(below | above), 0).sum()) / n

    def share(mask: Tensor) -> float:
        return int(torch.count_nonzero(mask)) / n

    return ErrorSplit(
        clip=clip,
        round=max(total - clip, 0.0),  # the inside's share, never below 0 by a rounding slip
        total=max(total, clip),
        clipped=share(below) + share(above),
        power=float(x.square().mean()) if power is None else power,
        below=share(below),
        above=share(above),
        below_near=share(below & (v >= qmin - 0.5)),
        above_near=share(above & (v <= qmax + 0.5)),
    )


# ---------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LabSetting:
    """One layer-input quantizer: bits, grid (see GRIDS), scale and offset (0 unless LSQ+)."""

    bits: int
    grid: str
    scale: float
    offset: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits))
        if self.grid not in GRIDS:
            raise LSQError(f"grid must be one of {', '.join(GRIDS)}, got {self.grid!r}")
        if not (math.isfinite(self.scale) and math.isfinite(self.offset)):
            raise LSQError("scale and offset must be finite numbers")
        object.__setattr__(self, "scale", max(float(self.scale), SCALE_FLOOR))
        if self.grid != "asymmetric":
            object.__setattr__(self, "offset", 0.0)

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.grid == "signed")

    @property
    def lo(self) -> float:
        return self.offset + self.qrange[0] * self.scale

    @property
    def hi(self) -> float:
        return self.offset + self.qrange[1] * self.scale

    @property
    def levels(self) -> list[float]:
        qmin, qmax = self.qrange
        return [self.offset + k * self.scale for k in range(qmin, qmax + 1)]

    @classmethod
    def from_range(cls, bits: int, grid: str, lo: float, hi: float) -> LabSetting:
        """The grid spanning [lo, hi]: LSQ+ exactly; a symmetric grid by its upper bound ``hi``
        (its lower bound follows from the integer range, so ``lo`` is ignored there)."""
        bits = check_bits(bits)
        qmin, qmax = int_range(bits, grid == "signed")
        if grid == "asymmetric":
            if not hi > lo:
                raise LSQError(f"the range's high end must be above its low end, got [{lo}, {hi}]")
            s = (hi - lo) / (qmax - qmin)
            return cls(bits, grid, s, lo - qmin * s)
        if not hi > 0:
            raise LSQError(f"a {grid} grid needs a positive upper bound, got {hi}")
        return cls(bits, grid, hi / qmax)

    def split(self, x: Tensor, power: float | None = None) -> ErrorSplit:
        """This setting's clipping and rounding error on ``x`` (``power``: its mean square)."""
        qmin, qmax = self.qrange
        offset = self.offset if self.grid == "asymmetric" else None
        return error_split(x, self.scale, offset, qmin, qmax, power)

    def quantizer(self, device: torch.device | str = "cpu") -> Quantizer:
        """A ready (initialised) quantizer with this setting."""
        q = Quantizer(
            self.bits,
            signed=self.grid == "signed",
            asymmetric=self.grid == "asymmetric",
            learnable=False,
        ).to(device)
        q.set_range(torch.tensor(self.scale), torch.tensor(self.offset))
        return q


def snap(
    x: Tensor,
    kind: str,
    bits: int,
    grid: str,
    lo: float | None = None,
    hi: float | None = None,
) -> LabSetting:
    """The setting an initializer of ``lsq.init`` picks from values ``x``.

    ``kind``: "minmax" (the observed range), "lsq" (2 mean|x| / sqrt(qmax); offset 0 on the LSQ+
    grid) or "mse" (LSQ+'s MSE search). ``lo``/``hi``: the true min/max when ``x`` is a sample.
    """
    qmin, qmax = int_range(check_bits(bits), grid == "signed")
    asym = grid == "asymmetric"
    if kind == "minmax":
        r = minmax_init(x, qmin, qmax, asym, lo, hi)
    elif kind == "lsq":
        r = lsq_init(x, qmin, qmax)
    elif kind == "mse":
        r = mse_init(x, qmin, qmax, asym, lo, hi)
    else:
        raise LSQError(f"snap to minmax, lsq or mse, not {kind!r}")
    off = float(r.offset) if (asym and r.offset is not None) else 0.0
    return LabSetting(bits, grid, float(r.scale), off)


def setting_of(q: Quantizer) -> LabSetting:
    """The setting of an existing per-tensor input quantizer (a method's, or a saved run's)."""
    grid = "asymmetric" if q.asymmetric else ("signed" if q.signed else "unsigned")
    off = float(q.offset.detach().mean()) if q.offset is not None else 0.0
    return LabSetting(q.bits, grid, float(q.effective_scale().detach().mean()), off)


def setting_from_state(
    state: Mapping[str, Tensor], layer: str, bits: int, asymmetric: bool
) -> LabSetting:
    """A layer's learned input setting from a saved state dict (``Run.write_state``)."""
    key = f"{layer}.input_quant"
    if f"{key}.scale" not in state:
        raise LSQError(f"the saved state has no input quantizer for layer {layer!r}")
    scale = float(state[f"{key}.scale"].float().mean())
    if asymmetric:
        return LabSetting(bits, "asymmetric", scale, float(state[f"{key}.offset"].float().mean()))
    signed = bool(state[f"{key}.signed_grid"]) if f"{key}.signed_grid" in state else False
    return LabSetting(bits, "signed" if signed else "unsigned", scale)


# --------------------------------------------------------------------------------------- lab


@dataclass(frozen=True)
class LocalResult:
    """What one setting does to its own layer (one layer's work, so shown first): the split on
    the layer's input and the SQNR of the layer's output against float."""

    setting: LabSetting | None
    split: ErrorSplit | None
    output_sqnr_db: float
    seconds: float


@dataclass(frozen=True)
class ModelResult:
    """What one setting does to the whole model (every other layer float): KL(float || this)
    and top-1 agreement with float on the lab's views."""

    kl: float
    agreement: float
    seconds: float


@dataclass(frozen=True)
class LabResult:
    """Both parts of ``RangeLab.evaluate``: the layer's own numbers and the model's."""

    setting: LabSetting | None
    split: ErrorSplit | None
    output_sqnr_db: float
    kl: float
    agreement: float
    seconds: float


class RangeLab:
    """One layer of a model to play with: its input cached on ``views``, the rest run on demand.

    Works on a private copy of ``model`` (a model wrapped by ``quantize_model``) with every
    quantizer off, so the reference is the float model; the copy and the cached tensors are in
    channels-last memory order (the same arithmetic, about a third faster on the CPU). For timm
    models whose blocks form a chain (``lsq.reconstruct.find_units``) the input of the unit
    holding the layer is cached and only that unit and the ones after it run per update;
    otherwise every update is a full forward. What does not change while the range moves is kept:
    the layer's input (also flattened in float64 with its mean square, for the split), its float
    output and that output's power, and the float model's logits.
    """

    def __init__(self, model: nn.Module, layer: str, views: Tensor) -> None:
        self.model = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        layers = quant_layers(self.model)
        if layer not in layers:
            raise LSQError(f"no quantized layer {layer!r}; choose one of the model's layers")
        if len(views) == 0:
            raise LSQError("the range lab needs at least one view")
        for q in quantizers(self.model):
            q.enabled = False
        self.layer = layer
        self.target = layers[layer]
        self.device = next(self.model.parameters()).device
        views = _channels_last(views.to(self.device))
        units = find_units(self.model, views[:1])
        chain = next((i for i, u in enumerate(units) if layer in u.layers), None)
        if chain is not None and all(u.paths != (layer,) for u in units):
            self.tail: list[Unit] | None = units[chain:]
            with torch.no_grad():
                x = views
                for u in units[:chain]:
                    x = u.run(self.model, x)
            self.start = x
        else:  # no chain: every update runs the whole model
            self.tail, self.start = None, views
        self.input, self.output_float, self.reference = self._run(capture=True)
        self._values = self.input.reshape(-1).double()
        self._power = float(self._values.square().mean())
        self._signal = signal_power(self.output_float)
        self._histograms: dict[int, pd.DataFrame] = {}

    @torch.no_grad()
    def _run(self, capture: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The network from ``start``: the layer's input (``capture``) and output, and logits."""
        got: dict[str, Tensor] = {}

        def pre(mod, inputs):
            if capture:
                got["input"] = inputs[0].detach()

        def post(mod, inputs, output):
            got["output"] = output.detach()

        handles = [
            self.target.register_forward_pre_hook(pre),
            self.target.register_forward_hook(post),
        ]
        try:
            out = self._logits()
        finally:
            for h in handles:
                h.remove()
        return got.get("input", self.start), got["output"], out

    @torch.no_grad()
    def _logits(self) -> Tensor:
        if self.tail is None:
            return self.model(self.start).float()
        out = self.start
        for u in self.tail:
            out = u.run(self.model, out)
        return out.float()

    @property
    def units_run(self) -> int | None:
        """How many units each update runs (None: the whole model)."""
        return None if self.tail is None else len(self.tail)

    def histogram(self, bins: int = 200) -> pd.DataFrame:
        """The cached layer input as a histogram: left, right, count (made once per ``bins``)."""
        if bins not in self._histograms:
            self._histograms[bins] = values_histogram(self.input.cpu(), bins)
        return self._histograms[bins]

    @property
    def observed(self) -> tuple[float, float]:
        """Min and max of the cached layer input."""
        return float(self.input.min()), float(self.input.max())

    def sample(self, n: int = SNAP_SAMPLE) -> Tensor:
        """A fixed uniform subsample of the cached input (for the snapping initializers)."""
        x = self.input.contiguous().reshape(-1).float().cpu()
        if x.numel() <= n:
            return x
        g = torch.Generator().manual_seed(0)
        return x[torch.randint(x.numel(), (n,), generator=g)]

    def snap(self, kind: str, bits: int, grid: str) -> LabSetting:
        """``snap`` on this layer's cached input (its true min/max included)."""
        lo, hi = self.observed
        return snap(self.sample(), kind, bits, grid, lo, hi)

    def _quantized(self, setting: LabSetting | None) -> None:
        """This layer's input quantizer set to ``setting`` (None: off)."""
        if setting is None:
            self.target.input_quant.enabled = False
        else:
            self.target.input_quant = setting.quantizer(self.device)

    def local(self, setting: LabSetting | None) -> LocalResult:
        """The layer's own numbers for ``setting``: the split of its input error and its output
        SQNR (the layer run alone on the cached input)."""
        t0 = time.perf_counter()
        if setting is None:
            return LocalResult(None, None, math.inf, time.perf_counter() - t0)
        self._quantized(setting)
        try:
            with torch.no_grad():
                out = self.target(self.input)
        finally:
            self.target.input_quant.enabled = False
        return LocalResult(
            setting=setting,
            split=setting.split(self._values, self._power),
            output_sqnr_db=sqnr_db(self.output_float, out, self._signal),
            seconds=time.perf_counter() - t0,
        )

    def model_answer(self, setting: LabSetting | None) -> ModelResult:
        """The whole model's answer to ``setting`` (every other layer float): KL(float || this)
        and top-1 agreement with float, from the layer's unit onwards."""
        t0 = time.perf_counter()
        self._quantized(setting)
        try:
            logits = self._logits()
        finally:
            self.target.input_quant.enabled = False
        return ModelResult(
            kl=float(distillation_loss(logits, self.reference)),
            agreement=float((logits.argmax(-1) == self.reference.argmax(-1)).float().mean()),
            seconds=time.perf_counter() - t0,
        )

    def evaluate(self, setting: LabSetting | None) -> LabResult:
        """Both parts for ``setting``: ``local`` then ``model_answer``."""
        here, whole = self.local(setting), self.model_answer(setting)
        return LabResult(
            setting=setting,
            split=here.split,
            output_sqnr_db=here.output_sqnr_db,
            kl=whole.kl,
            agreement=whole.agreement,
            seconds=here.seconds + whole.seconds,
        )

    def full_forward(self, setting: LabSetting | None, views: Tensor) -> Tensor:
        """Logits of a whole forward pass on ``views`` with this setting (for checking)."""
        self._quantized(setting)
        try:
            with torch.no_grad():
                return self.model(_channels_last(views.to(self.device))).float()
        finally:
            self.target.input_quant.enabled = False


def _channels_last(x: Tensor) -> Tensor:
    """A batch of images in channels-last order (other tensors as they are)."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


# ------------------------------------------------------------------------------ intro figure

#: The intro picture's three grids, in the order they are drawn, with what each stands for.
INTRO_GRIDS: dict[str, str] = {
    "lsq": "LSQ, unsigned grid: negatives clipped to 0",
    "lsq-signed": "LSQ, signed grid: a bit spent on the sign",
    "lsq+": "LSQ+: unsigned grid with a learned offset",
}
_INTRO_GRID_KIND = {"lsq": "unsigned", "lsq-signed": "signed", "lsq+": "asymmetric"}


def swish_sample(n: int = 50_000, seed: int = 0) -> Tensor:
    """Values of Swish, x * sigmoid(x), on Gaussian pre-activations: skewed, with a short
    negative tail down to about -0.28 (what LSQ+ is about)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64) * 1.5 + 0.5
    return z * torch.sigmoid(z)


@dataclass(frozen=True)
class IntroGrid:
    """One grid of the intro picture at its best (MSE-optimal) range, with its error split."""

    name: str
    label: str
    setting: LabSetting
    split: ErrorSplit


def intro_grids(bits: int, x: Tensor | None = None) -> list[IntroGrid]:
    """The unsigned LSQ, signed LSQ and LSQ+ grids at ``bits`` on a Swish-like sample, each at
    the range that minimises its own MSE, so the comparison is of the grids, not of inits."""
    x = swish_sample() if x is None else x
    out = []
    for name, label in INTRO_GRIDS.items():
        setting = snap(x.float(), "mse", bits, _INTRO_GRID_KIND[name])
        out.append(IntroGrid(name, label, setting, setting.split(x)))
    return out


def values_histogram(x: Tensor, bins: int = 120) -> pd.DataFrame:
    """A histogram of values as a frame: left, right, count."""
    x = x.reshape(-1).float()
    lo, hi = float(x.min()), float(x.max())
    hi = hi if hi > lo else lo + 1e-6
    counts = torch.histc(x, bins=bins, min=lo, max=hi)
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    return pd.DataFrame(
        {"left": edges[:-1].numpy(), "right": edges[1:].numpy(), "count": counts.numpy()}
    )
