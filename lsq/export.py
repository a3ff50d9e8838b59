"""Export: what a deployed integer model computes, as ONNX (QDQ) and as integer safetensors.

The inverse of ``quantize_model``. Each quantized layer becomes an ``ExportLayer`` holding integer
weight codes, per-output-channel scales, a bias, and its input's scale and integer zero point;
BatchNorm after a conv is folded in, and LSQ+'s continuous offset is turned into something an
integer runtime can do. ``export_onnx`` writes that model as ONNX with QuantizeLinear /
DequantizeLinear pairs (opset 17, run by ONNX Runtime on the CPU); ``export_safetensors`` writes
its tensors with the layer list in the header; ``onnx_parity`` measures the ONNX Runtime model
against the fake-quant model, and ``onnx_layer_table`` recomputes the per-layer table from the
exported graph's intermediate tensors.

docs/EXPORT.md is the specification: one layer's arithmetic, the stored tensors and header, the
routes for LSQ+'s offset (``fold``, ``snap-padded``, ``snap``, ``restore``), why every bias is
its own Add after the conv, BatchNorm folding, and the parity bar.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, conv2d_same
from timm.layers.padding import get_same_padding
from torch import Tensor, nn

from lsq.convert import (
    QuantLayer,
    bn_replacement,
    conv_bn_pairs,
    float_mode,
    quant_layers,
    set_submodule,
    switched,
)
from lsq.errors import LSQError
from lsq.metrics import db, sqnr_db

#: The parity an export must reach against the fake-quant model (``onnx_parity``): top-1
#: agreement at least ``PARITY_MIN_AGREEMENT`` (or the fake-quant model's own float64-vs-float32
#: agreement, when lower) and KL(fake-quant || ONNX) at most
#: ``PARITY_KL_FACTOR`` times the fake-quant model's own float64-vs-float32 KL, with
#: ``PARITY_KL_ABS_FLOOR`` standing in for a floor below it (``parity_tolerance``): float64 often
#: flips no code at all where another float32 order flips a few (measured on the bundled model
#: at 96 px, LSQ+ W4A4 reconstructed: KL 1e-6 against float64, 3e-2 against the exported graph,
#: every layer exact on its own input; the bias that ONNX Runtime quantized gave 0.04 to 2.1).
PARITY_MIN_AGREEMENT = 0.95
PARITY_KL_FACTOR = 10.0
PARITY_KL_ABS_FLOOR = 1e-3
#: A layer's exported output, fed the same input as the fake-quant layer, is within float
#: rounding of it: 100 to 140 dB SQNR on the bundled model. It diverges when it is below
#: ``LAYER_DIVERGENCE_DB``, or ``LAYER_DIVERGENCE_GAP_DB`` below the best tenth of the layers
#: (a bias that ONNX Runtime quantized at W8A8: 68 to 89 dB; at W4A4: 17 to 29 dB).
LAYER_DIVERGENCE_DB = 40.0
LAYER_DIVERGENCE_GAP_DB = 40.0
#: ONNX opset of the exported graph: per-channel DequantizeLinear needs 13; ORT runs 17 on CPU.
OPSET = 17
#: How LSQ+'s continuous offset is exported (see the module docstring).
OFFSET_ROUTES = ("fold", "snap-padded", "snap", "restore")
#: The route an export takes unless told otherwise: exact, and integer codes throughout.
DEFAULT_OFFSET = "fold"
FORMATS = ("onnx", "safetensors")
#: Version of the integer safetensors layout (``__metadata__["lsq_export"]["format"]``); 2 added
#: the border bias of padded convs (``offset_kernel``, ``border_bias`` and its geometry).
FORMAT_VERSION = 2
_CONTAINERS = {"uint8": (torch.uint8, 0, 255), "int8": (torch.int8, -128, 127)}


# --------------------------------------------------------------------------- QDQ as ONNX sees it
class _QuantDequant(torch.autograd.Function):
    """Quantize to integer codes and back, exactly as ONNX Runtime's QDQ pair does it.

    Exported as [Sub] -> QuantizeLinear -> [Clip] -> DequantizeLinear -> [Add].
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, shift, qmin, qmax, container, use_shift, restore):  # noqa: D102
        _, cmin, cmax = _CONTAINERS[container]
        v = x - shift if use_shift else x
        q = (torch.round(v / scale) + zero_point.float()).clamp(cmin, cmax).clamp(qmin, qmax)
        out = (q - zero_point.float()) * scale
        return out + shift if restore else out

    @staticmethod
    def symbolic(g, x, scale, zero_point, shift, qmin, qmax, container, use_shift, restore):  # noqa: D102
        dtype, cmin, cmax = _CONTAINERS[container]
        if use_shift:
            x = g.op("Sub", x, shift)
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if (qmin, qmax) != (cmin, cmax):
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        out = g.op("DequantizeLinear", q, scale, zero_point)
        return g.op("Add", out, shift) if restore else out


class _Dequant(torch.autograd.Function):
    """Integer weight codes times per-output-channel scales: DequantizeLinear(axis=0)."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point):  # noqa: D102
        shape = (-1,) + (1,) * (codes.dim() - 1)
        return (codes.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point):  # noqa: D102
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=0)


# --------------------------------------------------------------------------- one exported layer
@dataclass(frozen=True)
class LayerExport:
    """What the export did with one quantized layer (a row of ``ExportReport.frame()``)."""

    layer: str
    kind: str
    w_bits: int | None  # None: float weights
    a_bits: int | None  # None: float input
    container: str  # uint8 / int8 for the input codes; "" for a float input
    route: str  # fold / snap / restore / none (no offset) / "" (float input)
    scale: float = math.nan
    zero_point: int = 0
    #: LSQ+'s continuous offset beta (0 without one).
    offset: float = 0.0
    #: |beta + z s| / s: how far snapping moved the grid, in steps (0 when folded or no offset).
    snap_error_steps: float = 0.0
    #: Whether a per-channel bias takes the offset exactly (the layer sees no padding).
    foldable: bool = False
    #: Whether the folded offset needed a bias per output position (a padded conv's borders).
    border_bias: bool = False
    bn_folded: str = ""


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    if layer.groups == 1:
        return "conv"
    return "depthwise" if layer.groups == layer.in_channels else "grouped"


def _op(layer: nn.Module) -> str:
    if type(layer) is nn.Linear:
        return "linear"
    if type(layer) is nn.Conv2d:
        return "conv"
    if type(layer) is Conv2dSame:
        return "conv_same"
    return "generic"


def offset_foldable(layer: nn.Module) -> bool:
    """Whether an input offset folds into a per-channel bias exactly: the layer sees no zero
    padding (a padded conv's borders need a bias per output position, see ``_OffsetBias``)."""
    op = _op(layer)
    if op == "linear":
        return True
    if op == "conv_same":  # TF "same" padding: none for a 1x1 kernel at any stride and size
        return all(k == 1 for k in layer.kernel_size)
    if op == "conv":
        if layer.padding == "valid" or layer.padding_mode != "zeros":
            return True  # reflect/replicate/circular padding repeats the offset too
        if layer.padding == "same":
            return all(k == 1 for k in layer.kernel_size)
        return all(p == 0 for p in layer.padding)
    return False


def _border_pads(layer: nn.Module, op: str, height: int, width: int) -> tuple[int, ...]:
    """The zero padding a conv adds to an input of ``height`` x ``width``: (left, right, top,
    bottom), as ``F.pad`` takes it."""
    k, st, d = layer.kernel_size, layer.stride, layer.dilation
    if op == "conv_same":  # timm's pad_same
        ph = get_same_padding(height, k[0], st[0], d[0])
        pw = get_same_padding(width, k[1], st[1], d[1])
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2
    if layer.padding == "same":  # PyTorch puts the odd one on the right/bottom
        th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
        return tw // 2, tw - tw // 2, th // 2, th - th // 2
    ph, pw = layer.padding
    return pw, pw, ph, ph


class _OffsetBias(torch.autograd.Function):
    """A folded offset's bias in a padded conv, one value per output position.

    The fake-quant conv sees ``s q + beta`` inside the image and padded zeros outside:
    ``W * pad0(s q + beta) = W * pad0(s q) + beta * (W * pad0(1))``. The last term is
    ``conv(pad0(ones[H, W]), K)`` with ``K[c] = beta * sum over input channels of W[c]`` (one
    channel in, since every input channel is the same ones): ``beta * sum(W[c])`` inside,
    less at the borders, where taps fall on padding. Exported as Conv over ConstantOfShape,
    which ONNX Runtime folds into a constant when it loads the model (the file stores only K).
    """

    @staticmethod
    def forward(ctx, kernel, bias, size, pads, stride, dilation):  # noqa: D102
        ones = F.pad(torch.ones((1, 1, *size), dtype=kernel.dtype), pads)
        return F.conv2d(ones, kernel, bias, stride, 0, dilation)

    @staticmethod
    def symbolic(g, kernel, bias, size, pads, stride, dilation):  # noqa: D102
        shape = g.op("Constant", value_t=torch.tensor([1, 1, *size], dtype=torch.int64))
        ones = g.op("ConstantOfShape", shape, value_t=torch.tensor([1.0]))
        left, right, top, bottom = pads
        return g.op(
            "Conv",
            ones,
            kernel,
            bias,
            pads_i=[top, left, bottom, right],
            strides_i=list(stride),
            dilations_i=list(dilation),
        )


def _input_plan(aq, offset: str, foldable: bool, border_ok: bool) -> dict[str, Any]:
    """How one input quantizer is exported: container, zero point, shift, route."""
    s = float(aq.effective_scale().detach())
    qmin, qmax = aq.qmin, aq.qmax
    plan = {"scale": s, "qmin": qmin, "qmax": qmax, "zero_point": 0, "shift": 0.0}
    plan.update(restore=False, offset=0.0, snap_error_steps=0.0)
    plan["container"] = "int8" if qmin < 0 else "uint8"
    if aq.offset is None:
        return {**plan, "route": "none"}
    beta = float(aq.offset.detach())
    plan["offset"] = beta
    if offset == "restore":
        return {**plan, "route": "restore", "shift": beta, "restore": True}
    if offset != "snap" and (foldable or (offset == "fold" and border_ok)):
        return {**plan, "route": "fold", "shift": beta, "border": not foldable}
    z = round(-beta / s)
    plan.update(route="snap", snap_error_steps=abs(beta + z * s) / s)
    if 0 <= z <= 255:
        return {**plan, "zero_point": z}
    return {**plan, "shift": -z * s, "restore": True}  # the range holds no 0: move it, not z


class ExportLayer(nn.Module):
    """A conv or linear layer as an integer runtime computes it (see the module docstring).

    Built from a ``QuantLayer`` (and the BatchNorm that follows it, if any) by ``from_quant_layer``;
    its forward computes in PyTorch what the exported QDQ graph computes in ONNX Runtime.
    """

    def __init__(self, layer: nn.Module, record: LayerExport, plan: dict | None) -> None:
        super().__init__()
        self.record = record
        self.op = _op(layer)
        self.plan = plan
        # The layer without its tensors: only its stride, padding, ... are used.
        self.template = layer

    @classmethod
    @torch.no_grad()
    def from_quant_layer(
        cls,
        name: str,
        ql: QuantLayer,
        bn: nn.Module | None = None,
        offset: str = DEFAULT_OFFSET,
        input_shape: tuple[int, ...] | None = None,
    ) -> ExportLayer:
        layer = copy.deepcopy(ql.layer).cpu().float()
        op = _op(layer)
        if op == "generic":
            bn = None  # a layer with its own forward: BN cannot be assumed to scale its output
        w = layer.weight.detach().float()
        channels = w.shape[0]
        shape = (-1,) + (1,) * (w.dim() - 1)
        bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(channels)
        factor = torch.ones(channels)
        if bn is not None:
            inv = 1 / torch.sqrt(bn.running_var.float() + bn.eps)
            factor = bn.weight.detach().float() * inv if bn.affine else inv
            shift_bn = bn.bias.detach().float() if bn.affine else torch.zeros(channels)
            bias = (bias - bn.running_mean.float()) * factor + shift_bn
        wq, aq = ql.weight_quant, ql.input_quant
        foldable = offset_foldable(layer) and op != "generic"
        # A padded conv takes its folded offset as a bias per output position (_OffsetBias),
        # which needs the input's size; a layer with its own forward snaps instead.
        border_ok = op in ("conv", "conv_same") and input_shape is not None
        tensors: dict[str, Tensor] = {}
        if wq.enabled:
            s = wq.effective_scale().detach().float().cpu().expand(channels).clone()
            codes = wq.codes(w.to(wq.scale.device)).cpu()
            tensors["weight_q"] = codes.to(torch.int8)
            tensors["weight_scale"] = s * factor
            tensors["weight_zero_point"] = torch.zeros(channels, dtype=torch.int8)
            w_eff = codes * tensors["weight_scale"].view(shape)
        else:
            w_eff = w * factor.view(shape)
            tensors["weight"] = w_eff
        plan = None
        if aq.enabled:
            if not aq.ready:
                raise LSQError(
                    f"layer {name}: its input quantizer was never initialised; calibrate the "
                    "model (lsq.calibrate.calibrate) before exporting it"
                )
            plan = _input_plan(aq, offset, foldable, border_ok)
            tensors["input_scale"] = torch.tensor(plan["scale"], dtype=torch.float32)
            dtype = _CONTAINERS[plan["container"]][0]
            tensors["input_zero_point"] = torch.tensor(plan["zero_point"], dtype=dtype)
            tensors["input_shift"] = torch.tensor(plan["shift"], dtype=torch.float32)
            if plan.get("border"):
                plan.update(_border_geometry(layer, op, input_shape))
                kernel = plan["offset"] * w_eff.double().sum(1, keepdim=True)
                _check_border_bias(name, layer, op, w_eff, kernel, plan, input_shape)
                tensors["offset_kernel"] = kernel.float()
            elif plan["route"] == "fold" and plan["offset"] != 0.0:
                dims = tuple(range(1, w_eff.dim()))
                bias = (bias.double() + plan["offset"] * w_eff.double().sum(dims)).float()
        if op == "generic":
            # Keeps its own bias (BN was not folded into it); the weight is substituted.
            extra = None
        else:
            extra = bias
        record = LayerExport(
            layer=name,
            kind=_kind(layer),
            w_bits=wq.bits if wq.enabled else None,
            a_bits=aq.bits if aq.enabled else None,
            container=plan["container"] if plan else "",
            route=plan["route"] if plan else "",
            scale=plan["scale"] if plan else math.nan,
            zero_point=plan["zero_point"] if plan else 0,
            offset=plan["offset"] if plan else 0.0,
            snap_error_steps=plan["snap_error_steps"] if plan else 0.0,
            foldable=foldable,
            border_bias=bool(plan and plan.get("border")),
            bn_folded="" if bn is None else "yes",
        )
        if op != "generic":
            layer.weight = None
            layer.bias = None
        else:
            layer.requires_grad_(False)
        out = cls(layer, record, plan)
        for key, t in tensors.items():
            out.register_buffer(key, t.contiguous())
        if extra is not None:
            out.register_buffer("bias", extra.contiguous())
        return out

    def quantized_input(self, x: Tensor) -> Tensor:
        p = self.plan
        if p is None:
            return x
        return _QuantDequant.apply(
            x,
            self.input_scale,
            self.input_zero_point,
            self.input_shift,
            p["qmin"],
            p["qmax"],
            p["container"],
            p["shift"] != 0.0,
            p["restore"],
        )

    def dequantized_weight(self) -> Tensor:
        if hasattr(self, "weight_q"):
            return _Dequant.apply(self.weight_q, self.weight_scale, self.weight_zero_point)
        return self.weight

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        x = self.quantized_input(x)
        w = self.dequantized_weight()
        t = self.template
        if self.op == "generic":
            return torch.func.functional_call(t, {"weight": w}, (x,))
        # The bias is added after the conv/matmul, never passed to it: ONNX Runtime quantizes
        # a Conv's float bias to int32 at s_x * s_w[c] (see the module docstring).
        if self.op == "linear":
            return F.linear(x, w, None) + self.bias
        if hasattr(self, "offset_kernel"):  # the folded offset's bias, per output position
            p = self.plan
            bias = _OffsetBias.apply(
                self.offset_kernel, self.bias, p["size"], p["pads"], p["stride"], p["dilation"]
            )
        else:
            bias = self.bias.view(-1, 1, 1)
        if self.op == "conv":
            return t._conv_forward(x, w, None) + bias
        return conv2d_same(x, w, None, t.stride, t.padding, t.dilation, t.groups) + bias

    def extra_repr(self) -> str:
        r = self.record
        return f"{r.layer}, {r.kind}, W{r.w_bits}A{r.a_bits}, route={r.route or 'float'}"


def _border_geometry(layer: nn.Module, op: str, input_shape: tuple[int, ...]) -> dict:
    size = tuple(int(v) for v in input_shape[-2:])
    return {
        "size": size,
        "pads": tuple(_border_pads(layer, op, *size)),
        "stride": tuple(layer.stride),
        "dilation": tuple(layer.dilation),
    }


def _check_border_bias(
    name: str, layer: nn.Module, op: str, w_eff: Tensor, kernel: Tensor, plan: dict, input_shape
) -> None:
    """The border bias must equal the layer's own conv of a constant offset (float64)."""
    beta = plan["offset"]
    field = torch.full((1, *input_shape[1:]), beta, dtype=torch.float64)
    w64 = w_eff.double()
    conv = F.conv2d if op == "conv" else conv2d_same
    want = conv(field, w64, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    got = _OffsetBias.forward(
        None, kernel, None, plan["size"], plan["pads"], plan["stride"], plan["dilation"]
    )
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-9, atol=1e-12):
        raise LSQError(
            f"layer {name}: the exporter cannot work out this conv's padding for its offset's "
            "border bias; export with offset snap-padded"
        )


# --------------------------------------------------------------------------- the deploy model
def _check_offset(offset: str) -> str:
    if offset not in OFFSET_ROUTES:
        raise LSQError(f"offset must be one of {', '.join(OFFSET_ROUTES)}; got {offset!r}")
    return offset


def _default_input(model: nn.Module) -> Tensor:
    return torch.zeros(1, 3, 64, 64)


@torch.no_grad()
def _conv_bn_pairs(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """{quantized layer: BatchNorm2d} where the BN takes that layer's output and nothing else."""
    pairs = conv_bn_pairs(model, example_input, QuantLayer)
    layers = [layer for layer, _ in pairs]
    bns = [bn for _, bn in pairs]
    return {
        layer: bn
        for layer, bn in pairs
        if layers.count(layer) == 1
        and bns.count(bn) == 1
        and isinstance(model.get_submodule(layer).layer, nn.Conv2d)
    }


@torch.no_grad()
def _input_shapes(model: nn.Module, example_input: Tensor) -> dict[str, tuple[int, ...]]:
    """Each quantized layer's input shape on ``example_input``."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        (m, lambda mod, i, n=n: shapes.__setitem__(n, tuple(i[0].shape)), True)
        for n, m in quant_layers(model).items()
    ]
    with switched(hooks=hooks):
        model(example_input)
    return shapes


def deploy_model(
    model: nn.Module,
    example_input: Tensor | None = None,
    offset: str = DEFAULT_OFFSET,
    fold_bn: bool = True,
) -> tuple[nn.Module, list[LayerExport]]:
    """A CPU copy of a quantized model in which each quantized layer is an ``ExportLayer``.

    BatchNorm after a quantized conv is folded into it (``fold_bn=False`` keeps it: a check of
    the QDQ pairs alone, since folding reorders float arithmetic); ``model`` is not changed.
    Quantizers that are switched off export as float (``float_mode(model)``: the float graph).
    """
    _check_offset(offset)
    if not quant_layers(model):
        raise LSQError(
            "the model has no quantized layer to export; quantize it with "
            "lsq.quantize_model and calibrate it first"
        )
    model = copy.deepcopy(model).cpu().float().eval()
    x = (example_input if example_input is not None else _default_input(model)).cpu().float()
    pairs = _conv_bn_pairs(model, x[:1]) if fold_bn else {}
    shapes = _input_shapes(model, x[:1])
    records = []
    for name, ql in quant_layers(model).items():
        bn_name = pairs.get(name)
        bn = model.get_submodule(bn_name) if bn_name else None
        layer = ExportLayer.from_quant_layer(name, ql, bn, offset, shapes.get(name))
        records.append(layer.record)
        set_submodule(model, name, layer)
        if bn_name and layer.record.bn_folded:
            set_submodule(model, bn_name, bn_replacement(bn))
    return model, records


# --------------------------------------------------------------------------- files
@dataclass
class ExportReport:
    """An export: where it went, how the offset was exported, and what each layer became."""

    path: Path
    format: str
    offset: str
    layers: tuple[LayerExport, ...]
    opset: int | None = None
    seconds: float = 0.0
    #: onnx_parity's figures when they were measured (export_run measures them for ONNX).
    parity: dict[str, Any] = field(default_factory=dict)
    #: onnx_layer_table's rows, when asked for (export_run's ``layer_table``).
    layer_table: pd.DataFrame | None = None

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.layers])

    @property
    def max_snap_error_steps(self) -> float:
        return max((r.snap_error_steps for r in self.layers), default=0.0)

    @property
    def parity_warning(self) -> str:
        """``parity_warning(self.parity)``: "" when parity was not measured or is fine."""
        return parity_warning(self.parity)


def _check_out(path: str | os.PathLike, suffix: str, within: str | os.PathLike | None) -> Path:
    """The output file, refused in words when it cannot be written where it is asked for."""
    if not isinstance(path, str | os.PathLike) or not str(path).strip():
        raise LSQError(f"the output path must be a file path, got {path!r}")
    out = Path(path).expanduser().absolute()
    if out.suffix != suffix:
        raise LSQError(f"the output file {out.name} must end in {suffix}")
    if within is not None:
        root = Path(within).expanduser().resolve()
        if not out.resolve().is_relative_to(root):
            raise LSQError(f"the output path {out} is outside {root}; exports are written there")
    if out.is_dir():
        raise LSQError(f"the output path {out} is a folder; give a file name ending in {suffix}")
    if not out.parent.is_dir():
        raise LSQError(f"the folder {out.parent} does not exist; create it or pick another path")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise LSQError(f"the folder {out.parent} is not writable; pick another output path")
    return out


def _write(path: Path, produce) -> None:
    from lsq.runs import atomic_write  # the project's one atomic writer (temp file, rename)

    try:
        atomic_write(path, produce)
    except OSError as e:
        raise LSQError(f"could not write {path}: {e.strerror or e}") from e


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor,
    offset: str = DEFAULT_OFFSET,
    within: str | os.PathLike | None = None,
    fold_bn: bool = True,
) -> ExportReport:
    """Write ``model`` (quantized and calibrated) as an ONNX QDQ graph that ONNX Runtime runs.

    ``example_input`` fixes the image size (the batch size stays free). ``within``: refuse an
    output path outside this folder (the app's export folder). The file appears complete or not
    at all.
    """
    _check_offset(offset)
    if not isinstance(example_input, Tensor) or example_input.dim() != 4:
        raise LSQError("example_input must be an image batch tensor [N, 3, H, W]")
    out = _check_out(path, ".onnx", within)
    t0 = time.perf_counter()
    deployed, records = deploy_model(model, example_input, offset, fold_bn)
    x = example_input[:1].cpu().float()

    def produce(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore"
            )  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                deployed,
                (x,),
                str(tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )

    try:
        _write(out, produce)
    except LSQError:
        raise
    except Exception as e:
        arch = getattr(model, "default_cfg", {}).get("architecture") or type(model).__name__
        raise LSQError(
            f"the ONNX exporter cannot trace {arch}: {type(e).__name__}: {_first_line(e)}. "
            "The integer safetensors export (format safetensors) does not need tracing"
        ) from e
    return ExportReport(
        out, "onnx", offset, tuple(records), OPSET, seconds=time.perf_counter() - t0
    )


def export_safetensors(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: Tensor | None = None,
    offset: str = DEFAULT_OFFSET,
    within: str | os.PathLike | None = None,
    fold_bn: bool = True,
) -> ExportReport:
    """Write the integer model's tensors (codes, scales, zero points, biases, the rest in float).

    Keys are the deploy model's state dict (``<layer>.weight_q`` ...); the header's
    ``lsq_export`` entry (JSON) lists each layer's bits, route and clamp range. See the module
    docstring for the arithmetic.
    """
    from safetensors.torch import save_file

    _check_offset(offset)
    out = _check_out(path, ".safetensors", within)
    t0 = time.perf_counter()
    deployed, records = deploy_model(model, example_input, offset, fold_bn)
    tensors = {k: v.detach().cpu().contiguous() for k, v in deployed.state_dict().items()}
    layers = {}
    for name, m in deployed.named_modules():
        if isinstance(m, ExportLayer):
            plan = m.plan or {}
            layers[name] = {
                **asdict(m.record),
                "qmin": plan.get("qmin"),
                "qmax": plan.get("qmax"),
                "restore": plan.get("restore", False),
                **{k: plan[k] for k in ("size", "pads", "stride", "dilation") if k in plan},
                "op": m.op,
            }
    header = {"format": FORMAT_VERSION, "offset": offset, "layers": layers}
    meta = {"lsq_export": json.dumps(header, default=_json_number)}
    _write(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return ExportReport(
        out, "safetensors", offset, tuple(records), seconds=time.perf_counter() - t0
    )


def _json_number(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# --------------------------------------------------------------------------- parity
def _session(model: str | os.PathLike | bytes, views: Tensor, what: str):
    """An ONNX Runtime CPU session (torch's thread count) for a model file or its bytes, checked
    against the views' image size."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise LSQError(f"ONNX Runtime cannot load {what}: {_first_line(e)}") from e
    shape = sess.get_inputs()[0].shape
    if tuple(shape[1:]) != tuple(views.shape[1:]):
        raise LSQError(
            f"the ONNX model takes images of {shape[1:]} (channels, height, width); the views are "
            f"{list(views.shape[1:])}: make views at the size it was exported at"
        )
    return sess


def onnx_logits(onnx_path: str | os.PathLike, views: Tensor, batch: int = 32) -> Tensor:
    """ONNX Runtime's logits (CPU) on ``views``, in batches."""
    sess = _session(onnx_path, views, str(onnx_path))
    name = sess.get_inputs()[0].name
    outs = [
        torch.from_numpy(sess.run(None, {name: views[i : i + batch].cpu().float().numpy()})[0])
        for i in range(0, len(views), batch)
    ]
    return torch.cat(outs).float()


@torch.no_grad()
def float64_floor(model: nn.Module, views: Tensor, batch: int = 32) -> dict[str, float]:
    """What float rounding alone does to the fake-quant ``model`` on ``views``: a float64 copy
    of it (CPU) against itself in float32, top-1 agreement and KL(float32 || float64).

    An export computes in another order than PyTorch, so it cannot be expected to match the
    fake-quant model much more closely than this (a value on a rounding boundary lands one code
    away, and at low bits such flips grow through the network)."""
    from lsq.metrics import distillation_loss, logits

    ref = logits(model, views, batch).cpu()
    m64 = copy.deepcopy(model).cpu().double().eval()
    out = torch.cat(
        [m64(views[i : i + batch].cpu().double()) for i in range(0, len(views), batch)]
    ).float()
    return {
        "floor_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        "floor_kl": float(distillation_loss(out, ref)),
    }


def parity_tolerance(floor_kl: float) -> float:
    """The largest KL(fake-quant || ONNX) an export may have: ``PARITY_KL_FACTOR`` times the
    fake-quant model's own float64-vs-float32 KL (``float64_floor``), or times
    ``PARITY_KL_ABS_FLOOR`` when that is smaller."""
    return PARITY_KL_FACTOR * max(floor_kl, PARITY_KL_ABS_FLOOR)


@torch.no_grad()
def onnx_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    views: Tensor,
    teacher_logits: Tensor | None = None,
    batch: int = 32,
    locate: bool = True,
) -> dict[str, Any]:
    """The ONNX Runtime model against the fake-quant ``model`` on ``views``.

    Top-1 agreement, KL(fake-quant || ONNX), logit SQNR (dB) and the largest logit difference;
    the fake-quant model's own float64-vs-float32 agreement and KL (``float64_floor``), the
    largest KL allowed (``kl_tolerance``, see ``parity_tolerance``) and ``within_tolerance``:
    agreement at least ``PARITY_MIN_AGREEMENT`` (or the float64 floor's agreement, when lower)
    and KL at most that. When it is not, and
    ``locate``, the per-layer table on the exported graph (``onnx_layer_table``) names the first
    layer whose exported arithmetic diverges (``first_divergence``: ``first_divergent_layer``,
    None when no single layer does, and ``first_divergent_db``; ``located``: whether the table
    was read). With the float model's ``teacher_logits`` also each one's agreement and KL
    against the float model (what the app reports), to show the export changes neither.
    """
    from lsq.metrics import distillation_loss, logits

    ref = logits(model, views, batch).cpu()
    out = onnx_logits(onnx_path, views, batch)
    result: dict[str, Any] = {
        "agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        "kl": float(distillation_loss(out, ref)),
        "logit_sqnr_db": sqnr_db(ref, out),
        "max_abs_diff": float((out - ref).abs().max()),
        "views": float(len(views)),
    }
    result.update(float64_floor(model, views, batch))
    result["kl_tolerance"] = most = parity_tolerance(result["floor_kl"])
    # Agreement: PARITY_MIN_AGREEMENT, or as well as the model agrees with itself in float64
    # when that is lower (at low resolution another float order alone flips some top-1s).
    least = min(PARITY_MIN_AGREEMENT, result["floor_agreement"])
    result["within_tolerance"] = bool(result["agreement"] >= least and result["kl"] <= most)
    result["first_divergent_layer"], result["first_divergent_db"] = None, math.nan
    result["located"] = False
    if not result["within_tolerance"] and locate:
        with contextlib.suppress(LSQError):  # no layer with a quantized input: nothing to name
            table = onnx_layer_table(model, onnx_path, views)
            result.update(first_divergence(table))
    if teacher_logits is not None:
        t = teacher_logits.float().cpu()
        for who, lg in (("fake_quant", ref), ("onnx", out)):
            result[f"{who}_vs_float_agreement"] = float(
                (lg.argmax(-1) == t.argmax(-1)).float().mean()
            )
            result[f"{who}_vs_float_kl"] = float(distillation_loss(lg, t))
    return result


def _onnx_layer_tensors(graph, names: list[str]) -> dict[str, dict[str, str]]:
    """Per exported layer, the graph's tensors holding its float input, its input codes and its
    output, found from the QuantizeLinear that takes ``<layer>.input_scale`` and the ops the
    exporter named after the layer's module."""
    nodes = list(graph.node)
    quantize = {n.input[1]: n for n in nodes if n.op_type == "QuantizeLinear"}
    found = {}
    for name in names:
        q = quantize.get(f"{name}.input_scale")
        if q is None:
            continue
        scope = q.name.rsplit("/", 1)[0] + "/"
        mine = [n for n in nodes if n.name.startswith(scope)]
        clip = next((n for n in mine if n.op_type == "Clip" and n.input[0] == q.output[0]), None)
        sub = next((n for n in mine if n.op_type == "Sub" and n.output[0] == q.input[0]), None)
        found[name] = {
            "input": sub.input[0] if sub is not None else q.input[0],
            "codes": (clip or q).output[0],
            "output": mine[-1].output[0],
        }
    return found


def _output_taps(model: nn.Module, names, example: Tensor, fold_bn: bool) -> dict:
    """Where each layer's output is read in the fake-quant and float models so that it matches
    the exported layer's: after the BatchNorm the export folds in (before its activation).

    Per layer (module, pre, bn): a forward pre-hook on ``module`` when ``pre``, else a forward
    hook; ``bn`` is the BatchNorm the export folded in (None when none)."""
    pairs = _conv_bn_pairs(model, example) if fold_bn else {}
    taps = {}
    for name in names:
        bn = model.get_submodule(pairs[name]) if name in pairs else None
        if bn is None or _op(model.get_submodule(name).layer) == "generic":
            taps[name] = (model.get_submodule(name), False, None)
        elif isinstance(getattr(bn, "act", None), nn.Module):  # timm's BatchNormAct2d
            taps[name] = (bn.act, True, bn)
        else:
            taps[name] = (bn, False, bn)
    return taps


def _batch_norm(bn: nn.Module, y: Tensor) -> Tensor:
    """An eval-mode BatchNorm's normalisation alone (without a BatchNormAct2d's activation)."""
    return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


@torch.no_grad()
def onnx_layer_table(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    views: Tensor,
    batch: int = 4,
    fold_bn: bool = True,
) -> pd.DataFrame:
    """The per-layer table recomputed on the exported graph, next to the fake-quant model's.

    ONNX Runtime runs the graph with each quantized layer's input, input codes and output as
    extra outputs (in memory; the file is not changed); the fake-quant model and the float
    model (quantizers off) run the same ``views``. One row per layer with a quantized input:

    - ``codes_differ``: fraction of the layer's input codes that differ between ONNX Runtime and
      the fake-quant model, each on its own forward pass (differences upstream included);
    - ``codes_differ_same_input``: the same, with the fake-quant quantizer applied to ONNX
      Runtime's own input: only how the codes are made (snapping an offset, rounding);
    - ``input_vs_fake_quant_db``: SQNR of the layer's float input in ONNX Runtime against the
      fake-quant model's: how far the two have drifted apart by this layer;
    - ``output_sqnr_db`` / ``onnx_output_sqnr_db``: the layer's output against the float model,
      in the fake-quant model and in ONNX Runtime (the app's per-layer column, read after the
      BatchNorm the export folds in). ``fold_bn``: as the graph was exported;
    - ``output_same_input_db``: SQNR of the layer's output in ONNX Runtime against the
      fake-quant layer (and its BatchNorm) run on ONNX Runtime's own input of that layer: only
      what this layer's exported arithmetic does, nothing upstream. Float rounding leaves it
      at 100 dB or more; far below, the layer computes something else (``first_divergence``).
    """
    import onnx

    model.eval()
    layers = {n: ql for n, ql in quant_layers(model).items() if ql.input_quant.enabled}
    proto = onnx.load(str(onnx_path))
    tensors = _onnx_layer_tensors(proto.graph, list(layers))
    if not tensors:
        raise LSQError(f"{onnx_path} has no quantized layer of this model; export the model first")
    kinds = {}
    for name, t in tensors.items():
        signed = layers[name].input_quant.qmin < 0
        kinds[t["codes"]] = onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8
        kinds[t["input"]] = kinds[t["output"]] = onnx.TensorProto.FLOAT
    outputs = {o.name for o in proto.graph.output}
    for tensor, kind in kinds.items():
        if tensor not in outputs:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(tensor, kind, None))
    sess = _session(proto.SerializeToString(), views, str(onnx_path))
    names = [o.name for o in sess.get_outputs()]
    input_name = sess.get_inputs()[0].name
    taps = _output_taps(model, tensors, views[:1].cpu().float(), fold_bn)
    keys = ("codes", "differ", "same", "in", "drift", "out", "fq", "onnx", "own", "own_err")
    sums = {n: dict.fromkeys(keys, 0.0) for n in tensors}
    seen: dict[str, Tensor] = {}

    def keep(key):  # a copy: an in-place activation (ReLU6) changes its input afterwards
        return lambda m, args, out=None: seen.__setitem__(
            key, (args[0] if out is None else out).detach().float().clone()
        )

    for i in range(0, len(views), batch):
        x = views[i : i + batch].cpu().float()
        got = dict(zip(names, sess.run(None, {input_name: x.numpy()}), strict=True))
        seen.clear()
        for who, context in (("fq", contextlib.nullcontext()), ("float", float_mode(model))):
            hooks = [(layers[n], keep(f"{who}<{n}"), True) for n in tensors]
            hooks += [(m, keep(f"{who}>{n}"), pre) for n, (m, pre, _) in taps.items()]
            with context, switched(hooks=hooks):
                model(x)
        for n, t in tensors.items():
            aq = layers[n].input_quant
            s = aq.effective_scale().detach().float().cpu()
            beta = aq.offset.detach().float().cpu() if aq.offset is not None else None

            def codes(v, aq=aq, s=s, beta=beta):  # the fake-quant codes, in float32 as it does
                v = v - beta if beta is not None else v
                return torch.round(torch.clamp(v / s, aq.qmin, aq.qmax))

            x_onnx = torch.from_numpy(got[t["input"]]).float()
            q_onnx = torch.from_numpy(got[t["codes"]].astype("int64")).float()
            x_fq, ref = seen[f"fq<{n}"], seen[f"float>{n}"].double()
            acc = sums[n]
            acc["codes"] += q_onnx.numel()
            acc["differ"] += float((codes(x_fq) != q_onnx).sum())
            acc["same"] += float((codes(x_onnx) != q_onnx).sum())
            acc["in"] += float(x_fq.double().pow(2).sum())
            acc["drift"] += float((x_fq.double() - x_onnx.double()).pow(2).sum())
            acc["out"] += float(ref.pow(2).sum())
            acc["fq"] += float((ref - seen[f"fq>{n}"].double()).pow(2).sum())
            y_onnx = torch.from_numpy(got[t["output"]]).double()
            acc["onnx"] += float((ref - y_onnx).pow(2).sum())
            bn = taps[n][2]
            own = layers[n](x_onnx)  # this layer alone, fake-quant, on ONNX Runtime's input
            own = (_batch_norm(bn, own) if bn is not None else own).double()
            acc["own"] += float(own.pow(2).sum())
            acc["own_err"] += float((own - y_onnx).pow(2).sum())
    return pd.DataFrame(
        [
            {
                "layer": n,
                "kind": layers[n].kind,
                "a_bits": layers[n].input_quant.bits,
                "codes_differ": acc["differ"] / acc["codes"],
                "codes_differ_same_input": acc["same"] / acc["codes"],
                "input_vs_fake_quant_db": db(acc["in"], acc["drift"]),
                "output_sqnr_db": db(acc["out"], acc["fq"]),
                "onnx_output_sqnr_db": db(acc["out"], acc["onnx"]),
                "output_same_input_db": db(acc["own"], acc["own_err"]),
            }
            for n, acc in sums.items()
        ]
    )


def first_divergence(table: pd.DataFrame) -> dict[str, Any]:
    """The first layer (in the graph's order) of an ``onnx_layer_table`` whose exported output
    differs from the fake-quant layer's on the same input by more than float rounding:
    ``output_same_input_db`` below ``LAYER_DIVERGENCE_DB``, or ``LAYER_DIVERGENCE_GAP_DB`` below
    the best tenth of the layers. Returns ``first_divergent_layer`` (None when no layer does),
    ``first_divergent_db`` and ``located`` (True: a table was read)."""
    dbs = table["output_same_input_db"]
    best = dbs[dbs < math.inf].quantile(0.9)
    bar = (
        LAYER_DIVERGENCE_DB
        if math.isnan(best)
        else max(LAYER_DIVERGENCE_DB, best - LAYER_DIVERGENCE_GAP_DB)
    )
    low = table[dbs < bar]
    if low.empty:
        return {"first_divergent_layer": None, "first_divergent_db": math.nan, "located": True}
    row = low.iloc[0]
    return {
        "first_divergent_layer": str(row["layer"]),
        "first_divergent_db": float(row["output_same_input_db"]),
        "located": True,
    }


def offset_table(model: nn.Module) -> pd.DataFrame:
    """Per LSQ+ input quantizer: offset, scale, the snapped zero point and how far snapping moves
    the grid (in steps, at most 0.5), and whether folding into the bias is exact there."""
    rows = []
    for name, ql in quant_layers(model).items():
        aq = ql.input_quant
        if aq.offset is None:
            continue
        s = float(aq.effective_scale().detach())
        beta = float(aq.offset.detach())
        z = round(-beta / s)
        rows.append(
            {
                "layer": name,
                "scale": s,
                "offset": beta,
                "zero_point": z,
                "snap_error_steps": abs(beta + z * s) / s,
                "foldable": offset_foldable(ql.layer),
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- saved runs
def model_from_run(run_path: str | os.PathLike, root: str | os.PathLike | None = None):
    """The quantized model of a saved run, rebuilt from its config and state (CPU, eval).

    Returns (model, loaded run). The architecture comes from the run's meta ("model"); its
    weights all come from ``state.safetensors``, so no download is needed.
    """
    import timm

    from lsq.convert import quantize_model
    from lsq.runs import load_run
    from lsq.status import Status

    run = load_run(Path(run_path) if not isinstance(run_path, str) else run_path, root)
    if run.info.status != Status.COMPLETE:
        raise LSQError(
            f"run {run.info.name} is {run.info.status} ({run.info.message or 'no message'}); "
            "only a complete run can be exported"
        )
    if run.state is None:
        raise LSQError(f"run {run.info.name} saved no model state (state.safetensors); rerun it")
    spec = run.info.meta.get("model") if isinstance(run.info.meta.get("model"), dict) else {}
    arch = spec.get("name") or run.info.model
    if not arch or not timm.is_model(arch):
        raise LSQError(
            f"run {run.info.name} names the architecture {arch!r}, which timm cannot build; "
            "the exporter needs a timm architecture"
        )
    state = {k: run.state[k] for k in run.state}
    kwargs = {}
    cfg_classifier = timm.create_model(arch, pretrained=False).pretrained_cfg.get("classifier")
    key = f"{cfg_classifier}.layer.weight"
    if isinstance(cfg_classifier, str) and key in state:
        kwargs["num_classes"] = int(state[key].shape[0])
    model = timm.create_model(arch, pretrained=False, **kwargs).eval()
    quantize_model(model, run.config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise LSQError(
            f"run {run.info.name}'s saved state does not fit {arch} quantized with its config: "
            f"{_first_line(e)}"
        ) from e
    return model, run


def run_resolution(run, model: nn.Module) -> int:
    """The resolution a run was made at (its data meta), else the model's own."""
    data = run.info.meta.get("data") if isinstance(run.info.meta.get("data"), dict) else {}
    if data.get("resolution"):
        return int(data["resolution"])
    import timm.data

    return int(timm.data.resolve_model_data_config(model)["input_size"][-1])


#: File names of a run's exports, by format.
EXPORT_NAMES = {"onnx": "model.onnx", "safetensors": "model-int.safetensors"}


def export_file(run_path: str | os.PathLike, fmt: str) -> Path:
    """Where the app writes a run's export: ``<run>/export/model.onnx`` (or
    ``model-int.safetensors``); the folder is the caller's to create."""
    if fmt not in FORMATS:
        raise LSQError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    return Path(run_path) / "export" / EXPORT_NAMES[fmt]


def export_run(
    run_path: str | os.PathLike,
    fmt: str = "onnx",
    out: str | os.PathLike | None = None,
    offset: str = DEFAULT_OFFSET,
    root: str | os.PathLike | None = None,
    within: str | os.PathLike | None = None,
    parity_views: int = 32,
    layer_table: bool = False,
) -> ExportReport:
    """Export a saved run: ONNX (with parity against the fake-quant model measured on
    ``parity_views`` bundled evaluation views; 0 to skip) or integer safetensors.
    ``layer_table``: ONNX only, also recompute the per-layer table on the exported graph
    (``onnx_layer_table``) on the same views.

    ``out`` defaults to ``model.onnx`` / ``model-int.safetensors`` inside the run folder.
    """
    if fmt not in FORMATS:
        raise LSQError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    _check_offset(offset)
    if layer_table and (fmt != "onnx" or not parity_views):
        raise LSQError(
            "the per-layer table is recomputed on the ONNX graph on the parity views: export "
            "with format onnx and parity views"
        )
    model, run = model_from_run(run_path, root)
    suffix = ".onnx" if fmt == "onnx" else ".safetensors"
    if out is None:
        out = run.info.path / EXPORT_NAMES[fmt]
    res = run_resolution(run, model)
    example = torch.zeros(1, 3, res, res)
    _check_out(out, suffix, within)
    if fmt == "safetensors":
        return export_safetensors(model, out, example, offset, within)
    report = export_onnx(model, out, example, offset, within)
    if parity_views:
        import timm.data

        from lsq.data import bundled_images, make_views

        data_config = dict(timm.data.resolve_model_data_config(model))
        views = make_views(bundled_images("evaluation"), parity_views, res, data_config, seed=1)
        report.parity = onnx_parity(model, report.path, views, locate=not layer_table)
        if layer_table:
            report.layer_table = onnx_layer_table(model, report.path, views)
            if not report.parity["within_tolerance"]:
                report.parity.update(first_divergence(report.layer_table))
    return report


def parity_warning(parity: dict[str, Any]) -> str:
    """One line saying that an export is below the parity bar (``onnx_parity``'s
    ``within_tolerance``) and which layer diverges first; "" when it is within tolerance or parity
    was not measured."""
    if not parity or parity.get("within_tolerance", True):
        return ""
    text = (
        f"the export is below the parity bar: ONNX Runtime vs fake-quant on "
        f"{int(parity['views'])} evaluation views, agreement {parity['agreement']:.3f} (at least "
        f"{PARITY_MIN_AGREEMENT:g}), KL {parity['kl']:.2e} (at most "
        f"{parity['kl_tolerance']:.1e}), logit SQNR {parity['logit_sqnr_db']:.1f} dB; the "
        f"fake-quant model in float64 vs float32: agreement {parity['floor_agreement']:.3f}, KL "
        f"{parity['floor_kl']:.1e}. "
    )
    layer = parity.get("first_divergent_layer")
    if layer:
        return text + (
            f"First diverging layer: {layer}, whose exported output is "
            f"{parity['first_divergent_db']:.1f} dB SQNR from the fake-quant layer's on the same "
            "input: the exported graph computes something else there"
        )
    if parity.get("located"):
        return text + (
            "No single layer diverges (each matches the fake-quant layer on its own input to "
            "float rounding): rounding flips grow through this model; the per-layer table "
            "(--layer-table) shows where"
        )
    return text.rstrip()


__all__ = [
    "DEFAULT_OFFSET",
    "EXPORT_NAMES",
    "FORMATS",
    "OFFSET_ROUTES",
    "OPSET",
    "ExportLayer",
    "ExportReport",
    "LayerExport",
    "deploy_model",
    "export_file",
    "export_onnx",
    "export_run",
    "export_safetensors",
    "first_divergence",
    "float64_floor",
    "model_from_run",
    "offset_foldable",
    "offset_table",
    "onnx_layer_table",
    "onnx_logits",
    "onnx_parity",
    "parity_tolerance",
    "parity_warning",
    "run_resolution",
]
