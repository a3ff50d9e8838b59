"""Calibration: record what reaches every quantized layer, then initialise its input quantizer.

Statistics are gathered with all quantizers off, so they describe the float model and do not
depend on the method: collect once, then initialise any number of methods from the same
``ActStats`` (``init_from_stats``). Memory stays bounded whatever the data size: exact min, max,
mean and negative fraction, a histogram whose range grows by merging bins, and a uniform random
sample of at most ``sample_size`` values per layer for the MSE search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lsq.config import QuantConfig
from lsq.convert import float_mode, quant_layers, switched
from lsq.device import generator
from lsq.errors import LSQError
from lsq.init import init_activation_quantizer

HIST_BINS = 512
SAMPLE_SIZE = 1 << 20


@dataclass
class ActStats:
    """Running statistics of one layer's input."""

    count: int = 0
    min: float = math.inf
    max: float = -math.inf
    sum: float = 0.0
    negatives: int = 0
    hist: Tensor | None = None  # HIST_BINS counts over [hist_lo, hist_lo + hist_width]
    hist_lo: float = 0.0
    hist_width: float = 0.0
    sample: Tensor = field(default_factory=lambda: torch.empty(0))
    sample_size: int = SAMPLE_SIZE

    @property
    def negative_fraction(self) -> float:
        return self.negatives / self.count if self.count else 0.0

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def hist_edges(self) -> Tensor:
        return (
            self.hist_lo
            + torch.linspace(0, 1, HIST_BINS + 1, dtype=torch.float64) * self.hist_width
        )

    def update(
        self, x: Tensor, generator: torch.Generator, sample_generator: torch.Generator | None = None
    ) -> None:
        """Add a batch of values. ``generator`` (on ``x``'s device) picks the new sample values;
        ``sample_generator`` (on the CPU, where the sample lives; default: ``generator`` when it
        is a CPU one) picks which old ones stay."""
        x = x.detach().reshape(-1).float()
        n = x.numel()
        if n == 0:
            return
        if not torch.isfinite(x).all():
            raise LSQError("calibration saw NaN or infinite activations; check the input data")
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.sum += float(x.double().sum())
        self.negatives += int((x < 0).sum())
        self._update_hist(x, lo, hi)
        self._update_sample(x, n, generator, sample_generator)
        self.count += n

    def _update_hist(self, x: Tensor, lo: float, hi: float) -> None:
        if self.hist is None:
            width = hi - lo if hi > lo else max(abs(lo), 1e-6)
            self.hist_lo, self.hist_width = lo, width
            self.hist = torch.zeros(HIST_BINS, dtype=torch.float64)
        # Grow the range by doubling until the batch fits; merging bin pairs keeps counts exact.
        while lo < self.hist_lo or hi > self.hist_lo + self.hist_width:
            merged = self.hist.view(-1, 2).sum(1)
            pad = torch.zeros(HIST_BINS // 2, dtype=torch.float64)
            if lo < self.hist_lo:  # extend downwards
                self.hist = torch.cat([pad, merged])
                self.hist_lo -= self.hist_width
            else:
                self.hist = torch.cat([merged, pad])
            self.hist_width *= 2
        counts = torch.histc(
            x, bins=HIST_BINS, min=self.hist_lo, max=self.hist_lo + self.hist_width
        )
        self.hist += counts.double().cpu()

    def _update_sample(
        self, x: Tensor, n: int, generator: torch.Generator, cpu: torch.Generator | None
    ) -> None:
        # Keep a uniform sample of everything seen: old and new values in proportion to counts.
        total = self.count + n
        keep_new = min(n, max(1, round(self.sample_size * n / total)))
        keep_old = min(self.sample.numel(), self.sample_size - keep_new)
        idx = torch.randint(n, (keep_new,), generator=generator, device=x.device)
        new = x[idx].cpu()
        if keep_old < self.sample.numel():
            if cpu is None:
                if generator.device.type != "cpu":
                    raise LSQError("a sample generator on the CPU is needed with a CUDA one")
                cpu = generator
            sel = torch.randperm(self.sample.numel(), generator=cpu)[:keep_old]
            old = self.sample[sel]
        else:
            old = self.sample
        self.sample = torch.cat([old, new])


def collect_stats(
    model: nn.Module,
    batches: Iterable[Tensor],
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, ActStats]:
    """Run ``batches`` through the model in float and record every quantized layer's input."""
    layers = quant_layers(model)
    if not layers:
        raise LSQError("model has no quantized layers; call quantize_model first")
    stats = {name: ActStats(sample_size=sample_size) for name in layers}
    device = next(model.parameters()).device
    gen = generator(device, seed)
    # On the CPU one generator draws both, as it always has; with CUDA the sample's own
    # bookkeeping (on the CPU) gets a CPU generator of the same seed, not the global one.
    cpu_gen = gen if device.type == "cpu" else generator("cpu", seed)

    def hook(name: str) -> Callable:
        def pre(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            stats[name].update(inputs[0], gen, cpu_gen)

        return pre

    hooks = [(layer, hook(name), True) for name, layer in layers.items()]
    seen = 0
    with torch.no_grad(), float_mode(model), switched(hooks=hooks):
        was_training = model.training
        model.eval()
        for i, batch in enumerate(batches):
            model(batch.to(device))
            seen += batch.shape[0]
            if progress is not None:
                progress(i + 1)
        model.train(was_training)
    if seen == 0:
        raise LSQError("calibration needs at least one image")
    return stats


@dataclass
class LayerInit:
    """What calibration did to one layer's input quantizer."""

    name: str
    kind: str
    bits: int
    signed: bool
    asymmetric: bool
    lo: float  # initialised clipping range
    hi: float
    observed_min: float
    observed_max: float
    negative_fraction: float
    mse: float


def init_from_stats(
    model: nn.Module, stats: dict[str, ActStats], config: QuantConfig
) -> list[LayerInit]:
    """Initialise every input quantizer from recorded statistics with the config's method."""
    report = []
    for name, layer in quant_layers(model).items():
        if name not in stats:
            raise LSQError(f"no calibration statistics for layer {name}")
        st = stats[name]
        q = layer.input_quant
        if config.act_mode == "auto":
            q.signed = st.min < 0
        r = init_activation_quantizer(
            q, st.sample, config.act_init, st.min, st.max, refine_steps=config.mse_refine_steps
        )
        lo, hi = q.clip_range()
        report.append(
            LayerInit(
                name=name,
                kind=layer.kind,
                bits=q.bits,
                signed=q.signed,
                asymmetric=q.asymmetric,
                lo=float(lo),
                hi=float(hi),
                observed_min=st.min,
                observed_max=st.max,
                negative_fraction=st.negative_fraction,
                mse=r.mse,
            )
        )
    return report


def calibrate(
    model: nn.Module,
    batches: Iterable[Tensor],
    config: QuantConfig,
    sample_size: int = SAMPLE_SIZE,
    seed: int = 0,
) -> tuple[dict[str, ActStats], list[LayerInit]]:
    """collect_stats then init_from_stats: the one call for a single method."""
    stats = collect_stats(model, batches, sample_size=sample_size, seed=seed)
    return stats, init_from_stats(model, stats, config)
