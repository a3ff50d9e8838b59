"""Where the quantization error comes from: model-level metrics, per-layer tables, sensitivity.

Everything returns plain numbers or pandas DataFrames; plots.py draws them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import pandas as pd
import torch
from torch import Tensor, nn

from lsq.calibrate import ActStats
from lsq.convert import QuantLayer, float_mode, quant_layers, switched
from lsq.errors import LSQError
from lsq.lab import error_split
from lsq.metrics import distillation_loss, logits, sqnr_db

GROUPS = ("stem", "depthwise", "expansion", "projection", "conv", "head", "classifier")


@torch.no_grad()
def model_metrics(
    model: nn.Module, views: Tensor, teacher_logits: Tensor, labels: Tensor | None = None
) -> dict[str, float]:
    """Top-1 agreement and mean KL against the float model, logit SQNR; top-1 with labels.

    ``confident_agreement`` counts only views where the float model's top probability is >= 0.5:
    on unsure views a tiny change flips the top-1, so agreement there is mostly noise.
    """
    out = logits(model, views).cpu()
    t = teacher_logits.float().cpu()
    agree = out.argmax(-1) == t.argmax(-1)
    confident = t.softmax(-1).amax(-1) >= 0.5
    metrics = {
        "agreement": float(agree.float().mean()),
        "confident_agreement": float(agree[confident].float().mean())
        if confident.any()
        else math.nan,
        "kl": float(distillation_loss(out, t)),
        "logit_sqnr_db": sqnr_db(t, out),
        "views": float(len(views)),
        "confident_views": float(confident.sum()),
    }
    if labels is not None:
        metrics["top1"] = float((out.argmax(-1) == labels.cpu()).float().mean())
    return metrics


def layer_group(layer: QuantLayer, name: str) -> str:
    """Which part of an EfficientNet/MobileNet-style network a layer belongs to."""
    if layer.first_or_last:
        return "classifier" if layer.kind == "linear" else "stem"
    if layer.kind == "linear":
        return "classifier"
    if layer.kind in ("depthwise", "grouped"):
        return "depthwise"
    if "head" in name.split(".")[-1]:
        return "head"
    conv = layer.layer
    if conv.kernel_size == (1, 1):
        return "expansion" if conv.out_channels > conv.in_channels else "projection"
    return "conv"


@torch.no_grad()
def _layer_outputs(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    outs: dict[str, Tensor] = {}
    hooks = [
        (layer, lambda m, i, o, n=name: outs.__setitem__(n, o.detach().cpu()), False)
        for name, layer in quant_layers(model).items()
    ]
    with switched(hooks=hooks):
        model(x.to(next(model.parameters()).device))
    return outs


def _both_outputs(model: nn.Module, views: Tensor | None) -> tuple[dict, dict]:
    """Every quantized layer's output on ``views`` in float and quantized (empty: no views)."""
    if views is None:
        return {}, {}
    model.eval()
    with float_mode(model):
        outputs_f = _layer_outputs(model, views)
    return outputs_f, _layer_outputs(model, views)


@torch.no_grad()
def layer_table(
    model: nn.Module,
    stats: dict[str, ActStats] | None = None,
    views: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    calib_views: Tensor | None = None,
) -> pd.DataFrame:
    """One row per quantized layer: bits, ranges, clipping, three SQNRs (dB), and the input
    quantization MSE split into clip_error and round_error (``lsq.lab.error_split``; their sum is
    the MSE behind input_sqnr_db, input_power its signal).

    ``progress(done, total)`` is called after each layer.

    weight_sqnr: the weight against its fake-quantized self. input_sqnr: the calibration sample
    of the layer's input against its fake-quantized self (needs ``stats``). output_sqnr: the
    layer's output in the quantized model against the float model on ``views`` (errors of
    earlier layers included, as they reach this layer); calib_output_sqnr: the same on
    ``calib_views`` (the views the ranges were fitted to), when given.
    """
    outputs = {k: _both_outputs(model, v) for k, v in (("", views), ("calib_", calib_views))}
    rows = []
    layers = quant_layers(model)
    for i, (name, layer) in enumerate(layers.items()):
        if progress is not None:
            progress(i, len(layers))
        aq, wq = layer.input_quant, layer.weight_quant
        lo, hi = (float(v) for v in aq.clip_range()) if aq.ready else (math.nan,) * 2
        w = layer.layer.weight
        with switched([wq], True):
            w_sqnr = sqnr_db(w, wq(w))
        row = {
            "index": i,
            "layer": name,
            "kind": layer.kind,
            "group": layer_group(layer, name),
            "w_bits": wq.bits,
            "a_bits": aq.bits,
            "grid": "asymmetric" if aq.asymmetric else ("signed" if aq.signed else "unsigned"),
            "range_lo": lo,
            "range_hi": hi,
            "weight_sqnr_db": w_sqnr,
            "weights_on": wq.enabled,
            "acts_on": aq.enabled,
        }
        if stats is not None and name in stats:
            st = stats[name]
            sample = st.sample
            row.update(
                observed_min=st.min,
                observed_max=st.max,
                negative_fraction=st.negative_fraction,
                clipped_below=float((sample < lo).float().mean()) if sample.numel() else math.nan,
                clipped_above=float((sample > hi).float().mean()) if sample.numel() else math.nan,
            )
            if aq.ready and sample.numel():
                with switched([aq], True):
                    row["input_sqnr_db"] = sqnr_db(sample, aq(sample.to(aq.scale.device)).cpu())
                off = aq.offset.detach().cpu() if aq.offset is not None else None
                split = error_split(
                    sample, aq.effective_scale().detach().cpu(), off, aq.qmin, aq.qmax
                )
                row.update(clip_error=split.clip, round_error=split.round, input_power=split.power)
        for prefix, (outputs_f, outputs_q) in outputs.items():
            if name in outputs_f:
                row[f"{prefix}output_sqnr_db"] = sqnr_db(outputs_f[name], outputs_q[name])
        rows.append(row)
    return pd.DataFrame(rows)


@torch.no_grad()
def sensitivity(
    model: nn.Module,
    views: Tensor,
    teacher_logits: Tensor,
    by: str = "group",
    parts: Iterable[str] = ("weights", "activations"),
) -> pd.DataFrame:
    """Quantize one group (or one layer) at a time, weights or activations only; model-level KL.

    The rest of the model runs in float, so each row isolates one source of error. Every
    quantizer's switch is restored afterwards.
    """
    layers = quant_layers(model)
    if by == "group":
        units: dict[str, list[QuantLayer]] = {}
        for name, layer in layers.items():
            units.setdefault(layer_group(layer, name), []).append(layer)
    elif by == "layer":
        units = {name: [layer] for name, layer in layers.items()}
    else:
        raise ValueError(f"by must be 'group' or 'layer', got {by!r}")
    rows = []
    for unit, members in units.items():
        for part in parts:
            chosen = [q.weight_quant if part == "weights" else q.input_quant for q in members]
            with float_mode(model), switched(chosen, True):
                m = model_metrics(model, views, teacher_logits)
            rows.append(
                {
                    "unit": unit,
                    "part": part,
                    "layers": len(members),
                    "kl": m["kl"],
                    "agreement": m["agreement"],
                    "logit_sqnr_db": m["logit_sqnr_db"],
                }
            )
    return pd.DataFrame(rows)


def grid_levels(layer: QuantLayer) -> Tensor:
    """The values an input quantizer can output: offset + k * scale, k = qmin..qmax."""
    q = layer.input_quant
    s = float(q.effective_scale().detach().mean())
    b = float(q.offset.detach().mean()) if q.offset is not None else 0.0
    return b + torch.arange(q.qmin, q.qmax + 1, dtype=torch.float64) * s


def grid_at_step(traj: pd.DataFrame, layer: str, step: int, qmin: int, qmax: int) -> dict:
    """A layer's input grid at one training step, from its recorded trajectory (columns step,
    layer, scale, offset: ``pipeline.history_frames``): the levels offset + k * scale for
    k = qmin..qmax and the range [lo, hi], as ``explorer.layer_view`` gives them. The latest
    step recorded at or before ``step`` counts; before the first, the first."""
    rows = traj[traj["layer"].astype(str) == str(layer)].dropna(subset=["step", "scale"])
    if rows.empty:
        raise LSQError(f"no trajectory recorded for layer {layer!r}")
    rows = rows.sort_values("step")
    upto = rows[rows["step"] <= step]
    row = upto.iloc[-1] if len(upto) else rows.iloc[0]
    s = float(row["scale"])
    b = float(row["offset"]) if "offset" in row and pd.notna(row["offset"]) else 0.0
    levels = b + torch.arange(qmin, qmax + 1, dtype=torch.float64) * s
    return {"levels": levels.tolist(), "lo": b + qmin * s, "hi": b + qmax * s}


def histogram_frame(stats: ActStats) -> pd.DataFrame:
    """A layer's input histogram: left edge, right edge and count of each bin.

    Empty bins at either end are dropped: the recorded range grows by doubling, so it can reach
    well past the data.
    """
    edges = stats.hist_edges()
    counts = stats.hist if stats.hist is not None else torch.zeros(len(edges) - 1)
    nonzero = torch.nonzero(counts).flatten()
    if len(nonzero):
        first, last = int(nonzero[0]), int(nonzero[-1])
        counts, edges = counts[first : last + 1], edges[first : last + 2]
    return pd.DataFrame(
        {"left": edges[:-1].numpy(), "right": edges[1:].numpy(), "count": counts.numpy()}
    )
