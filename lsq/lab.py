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
from lsq.quantizers import SCALE_FLOOR, Quantizer, check_bits, fake_quantize, int_range
from lsq.reconstruct import Unit, find_units
from lsq.train import distillation_loss

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
        if self.total == 0:
            return math.inf
        return 10 * math.log10(self.power / self.total) if self.power > 0 else -math.inf


def error_split(
    x: Tensor, scale: float | Tensor, offset: float | Tensor | None, qmin: int, qmax: int
) -> ErrorSplit:
    """Split the fake-quantization MSE of ``x`` into clipping and rounding error.

    A value is clipped when (x - offset) / scale lies strictly outside [qmin, qmax]; a value on a
    bound is exactly representable, so it adds nothing to either part.
    """
    x = x.detach().reshape(-1).double()
    if x.numel() == 0:
        raise LSQError("the error split needs at least one value")
    s = torch.as_tensor(scale, dtype=torch.float64).clamp_min(SCALE_FLOOR)
    b = None if offset is None else torch.as_tensor(offset, dtype=torch.float64)
    err = (fake_quantize(x, s, b, qmin, qmax) - x).pow(2)
    v = (x - (0.0 if b is None else b)) / s
    below, above = v < qmin, v > qmax
    outside = below | above
    n = x.numel()
    clip = float(err[outside].sum()) / n
    rnd = float(err[~outside].sum()) / n
    return ErrorSplit(
        clip=clip,
        round=rnd,
        total=float(err.sum()) / n,
        clipped=float(outside.double().mean()),
        power=float(x.pow(2).mean()),
        below=float(below.double().mean()),
        above=float(above.double().mean()),
        below_near=float((below & (v >= qmin - 0.5)).double().mean()),
        above_near=float((above & (v <= qmax + 0.5)).double().mean()),
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

    def split(self, x: Tensor) -> ErrorSplit:
        """This setting's clipping and rounding error on ``x``."""
        qmin, qmax = self.qrange
        return error_split(
            x, self.scale, self.offset if self.grid == "asymmetric" else None, qmin, qmax
        )

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
class LabResult:
    """What one setting does: the split on the layer's input, the layer's output SQNR, and the
    model-level KL and top-1 agreement against float (every other layer float)."""

    setting: LabSetting | None
    split: ErrorSplit | None
    output_sqnr_db: float
    kl: float
    agreement: float
    seconds: float


class RangeLab:
    """One layer of a model to play with: its input cached on ``views``, the rest run on demand.

    Works on a private copy of ``model`` (a model wrapped by ``quantize_model``) with every
    quantizer off, so the reference is the float model. For timm models whose blocks form a chain
    (``lsq.reconstruct.find_units``) the input of the unit holding the layer is cached and only
    that unit and the ones after it run per update; otherwise every update is a full forward.
    """

    def __init__(self, model: nn.Module, layer: str, views: Tensor) -> None:
        self.model = copy.deepcopy(model).eval()
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
        views = views.to(self.device)
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

    @torch.no_grad()
    def _run(self, capture: bool = False) -> tuple[Tensor | None, Tensor, Tensor]:
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
            if self.tail is None:
                out = self.model(self.start)
            else:
                out = self.start
                for u in self.tail:
                    out = u.run(self.model, out)
        finally:
            for h in handles:
                h.remove()
        return got.get("input"), got["output"], out.float()

    @property
    def units_run(self) -> int | None:
        """How many units each update runs (None: the whole model)."""
        return None if self.tail is None else len(self.tail)

    def histogram(self, bins: int = 200) -> pd.DataFrame:
        """The cached layer input as a histogram: left, right, count."""
        return values_histogram(self.input.cpu(), bins)

    @property
    def observed(self) -> tuple[float, float]:
        """Min and max of the cached layer input."""
        return float(self.input.min()), float(self.input.max())

    def sample(self, n: int = SNAP_SAMPLE) -> Tensor:
        """A fixed uniform subsample of the cached input (for the snapping initializers)."""
        x = self.input.reshape(-1).float().cpu()
        if x.numel() <= n:
            return x
        g = torch.Generator().manual_seed(0)
        return x[torch.randint(x.numel(), (n,), generator=g)]

    def snap(self, kind: str, bits: int, grid: str) -> LabSetting:
        """``snap`` on this layer's cached input (its true min/max included)."""
        lo, hi = self.observed
        return snap(self.sample(), kind, bits, grid, lo, hi)

    def evaluate(self, setting: LabSetting | None) -> LabResult:
        """The model with this layer's input quantized by ``setting`` (None: float), the rest
        float: split, layer-output SQNR, KL(float || this) and top-1 agreement with float."""
        t0 = time.perf_counter()
        if setting is None:
            self.target.input_quant.enabled = False
            split = None
        else:
            q = setting.quantizer(self.device)
            self.target.input_quant = q
            split = setting.split(self.input)
        try:
            _, out, logits = self._run()
        finally:
            self.target.input_quant.enabled = False
        from lsq.analysis import sqnr_db  # analysis uses error_split: imported here, not on top

        kl = float(distillation_loss(logits, self.reference))
        agree = float((logits.argmax(-1) == self.reference.argmax(-1)).float().mean())
        return LabResult(
            setting=setting,
            split=split,
            output_sqnr_db=sqnr_db(self.output_float, out),
            kl=kl,
            agreement=agree,
            seconds=time.perf_counter() - t0,
        )

    def full_forward(self, setting: LabSetting | None, views: Tensor) -> Tensor:
        """Logits of a whole forward pass on ``views`` with this setting (for checking)."""
        if setting is not None:
            self.target.input_quant = setting.quantizer(self.device)
        try:
            with torch.no_grad():
                return self.model(views.to(self.device)).float()
        finally:
            self.target.input_quant.enabled = False


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
