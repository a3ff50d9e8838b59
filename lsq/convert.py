"""quantize_model: wrap every Conv2d and Linear with an input quantizer and a weight quantizer.

The wrapped layer keeps its own forward (timm's ``Conv2dSame`` keeps its "same" padding); the
wrapper only substitutes the quantized input and weight. With both quantizers off it calls the
original layer unchanged, so the float model is always one switch away.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, conv2d_same
from torch import Tensor, nn

from lsq.config import QuantConfig
from lsq.errors import LSQError
from lsq.init import init_weight_quantizer
from lsq.quantizers import Quantizer


class QuantLayer(nn.Module):
    """A conv or linear layer whose input and weight pass through fake quantizers."""

    def __init__(self, layer: nn.Module, input_quant: Quantizer, weight_quant: Quantizer) -> None:
        super().__init__()
        self.layer = layer
        self.input_quant = input_quant
        self.weight_quant = weight_quant
        self.first_or_last = False

    @property
    def kind(self) -> str:
        """conv, depthwise, grouped or linear."""
        if isinstance(self.layer, nn.Linear):
            return "linear"
        groups = self.layer.groups
        if groups == 1:
            return "conv"
        return "depthwise" if groups == self.layer.in_channels else "grouped"

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not (self.input_quant.enabled or self.weight_quant.enabled):
            return self.layer(x)
        xq = self.input_quant(x)
        wq = self.weight_quant(self.layer.weight)
        layer = self.layer
        if type(layer) is nn.Conv2d:
            return layer._conv_forward(xq, wq, layer.bias)
        if type(layer) is nn.Linear:
            return F.linear(xq, wq, layer.bias)
        if type(layer) is Conv2dSame:  # timm's TF "same" padding, called directly (no overhead)
            return conv2d_same(
                xq, wq, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups
            )
        # Subclasses with their own forward (Conv2dSame and friends): run it with the new weight.
        return torch.func.functional_call(layer, {"weight": wq}, (xq,))


def _is_target(m: nn.Module) -> bool:
    return isinstance(m, (nn.Conv2d, nn.Linear))


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _first_and_last(model: nn.Module, names: list[str]) -> set[str]:
    """The first conv and last linear layer: from timm's pretrained_cfg, else module order."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    picked = set()
    first = cfg.get("first_conv")
    last = cfg.get("classifier")
    if isinstance(first, str) and first in names:
        picked.add(first)
    elif names:
        picked.add(names[0])
    if isinstance(last, str) and last in names:
        picked.add(last)
    elif names:
        linears = [n for n in names if isinstance(model.get_submodule(n), nn.Linear)]
        picked.add(linears[-1] if linears else names[-1])
    return picked


def quantize_model(
    model: nn.Module, config: QuantConfig, example_input: Tensor | None = None
) -> list[str]:
    """Wrap every Conv2d/Linear of ``model`` in place; returns the wrapped layers' names.

    Weight quantizers are initialised at once from the weights; activation quantizers wait for
    ``calibrate``. With ``config.fold_bn`` BatchNorm is first folded into the preceding conv
    (what a deployed integer model computes); that needs a forward pass (``example_input``, by
    default a 1x3x64x64 zero image).
    """
    if any(isinstance(m, QuantLayer) for m in model.modules()):
        raise LSQError("model is already quantized; load a fresh copy to quantize it again")
    model.eval()
    if config.fold_bn:
        fold_batchnorm(model, example_input)
    names = [n for n, m in model.named_modules() if _is_target(m) and n]
    if not names:
        raise LSQError("model has no Conv2d or Linear layer to quantize")
    special = _first_and_last(model, names)
    for name in names:
        layer = model.get_submodule(name)
        w_bits, a_bits = config.bits_for(name in special)
        wq = Quantizer(
            w_bits,
            signed=True,
            per_channel=config.per_channel_weights,
            channels=layer.weight.shape[0],
            learnable=config.learnable,
            grad_scaling=config.grad_scaling,
            role="weight",
        )
        aq = Quantizer(
            a_bits,
            signed=config.act_mode == "signed",
            asymmetric=config.act_mode == "asymmetric",
            learnable=config.learnable,
            grad_scaling=config.grad_scaling,
            role="activation",
        )
        wq.to(layer.weight.device)
        aq.to(layer.weight.device)
        init_weight_quantizer(wq, layer.weight, config.weight_init)
        wq.enabled = config.quantize_weights
        aq.enabled = config.quantize_acts
        ql = QuantLayer(layer, aq, wq)
        ql.first_or_last = name in special
        set_submodule(model, name, ql)
    return names


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """The wrapped layers by their original names (without the wrapper's suffix)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


def quantizers(model: nn.Module) -> Iterator[Quantizer]:
    for m in model.modules():
        if isinstance(m, Quantizer):
            yield m


@contextlib.contextmanager
def switched(
    quantizers: Iterable[Quantizer] = (),
    enabled: bool = False,
    hooks: Iterable[tuple[nn.Module, Callable, bool]] = (),
) -> Iterator[None]:
    """For the block only: turn ``quantizers`` on or off and attach forward ``hooks``.

    ``hooks`` are (module, hook, pre) triples: a forward pre-hook when ``pre``, else a forward
    hook. On leaving, even on an exception, every switch is set back to what it was and every
    hook is removed. The one way the library changes a model temporarily; nest it to turn
    everything off and then a few back on.
    """
    saved = [(q, q.enabled) for q in quantizers]
    handles = []
    try:
        for q, _ in saved:
            q.enabled = enabled
        for module, hook, pre in hooks:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(hook))
        yield
    finally:
        for h in handles:
            h.remove()
        for q, was in saved:
            q.enabled = was


@contextlib.contextmanager
def float_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run the model in float (all quantizers off); restores each switch after."""
    with switched(quantizers(model), False):
        yield model


# --- BatchNorm folding ---------------------------------------------------------------------------
def bn_replacement(bn: nn.Module) -> nn.Module | None:
    """What stays of a BN after folding: nothing, or timm's BatchNormAct2d's drop + activation."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    if hasattr(bn, "act") and hasattr(bn, "drop") and isinstance(bn, nn.BatchNorm2d):
        return nn.Sequential(bn.drop, bn.act)
    return None


@torch.no_grad()
def conv_bn_pairs(
    model: nn.Module, example_input: Tensor, producer: type[nn.Module] = nn.Conv2d
) -> list[tuple[str, str]]:
    """(producer, BatchNorm2d) name pairs where the BN takes the producer's output unchanged.

    Found by running ``example_input`` and matching tensors, so it works for any architecture.
    """
    produced: dict[int, tuple[str, Tensor]] = {}  # holds the tensors, so no id is reused
    pairs: list[tuple[str, str]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, producer):
            hooks.append((m, lambda mod, i, o, n=name: produced.__setitem__(id(o), (n, o)), False))
        elif isinstance(m, nn.BatchNorm2d) and bn_replacement(m) is not None:

            def pre(mod, inputs, n=name):
                hit = produced.get(id(inputs[0]))
                if hit is not None and hit[1] is inputs[0]:
                    pairs.append((hit[0], n))

            hooks.append((m, pre, True))
    with switched(hooks=hooks):
        model(example_input)
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, example_input: Tensor | None = None) -> list[tuple[str, str]]:
    """Fold each BatchNorm2d that directly consumes a conv's output into that conv.

    Pairs are found by running ``example_input`` and matching tensors (``conv_bn_pairs``), so it
    works for any architecture whose BN takes a conv's output unchanged. Returns the (conv, bn)
    name pairs.
    """
    model.eval()
    if example_input is None:
        p = next(model.parameters())
        example_input = torch.zeros(1, 3, 64, 64, device=p.device, dtype=p.dtype)
    pairs = conv_bn_pairs(model, example_input)
    seen_convs = {}
    for conv_name, _ in pairs:
        seen_convs[conv_name] = seen_convs.get(conv_name, 0) + 1
    for conv_name, bn_name in pairs:
        if seen_convs[conv_name] != 1:
            continue  # a conv feeding two BNs cannot be folded into both
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        inv = (
            bn.weight / torch.sqrt(bn.running_var + bn.eps)
            if bn.affine
            else 1 / torch.sqrt(bn.running_var + bn.eps)
        )
        beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        conv.weight.mul_(inv.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        new_bias = (bias - bn.running_mean) * inv + beta
        conv.bias = nn.Parameter(new_bias)
        set_submodule(model, bn_name, bn_replacement(bn))
    return pairs
