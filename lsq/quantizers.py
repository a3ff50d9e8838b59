"""Fake quantization for LSQ and LSQ+: the function with its exact gradients, and the modules.

A b-bit quantizer maps x to integer codes in [qmin, qmax] and back:

    v     = (x - offset) / scale
    x_hat = round(clamp(v, qmin, qmax)) * scale + offset

Gradients (straight-through estimator for round; "inside" is strict, qmin < v < qmax, so a value
exactly on a bound counts as clipped, as in LSQ's equation 3):

    d x_hat / d x      = 1 inside, 0 outside
    d x_hat / d scale  = round(v) - v inside, qmin if v <= qmin, qmax if v >= qmax
    d x_hat / d offset = 0 inside, 1 outside

The scale and offset gradients are multiplied by ``grad_scale`` (LSQ's g = 1 / sqrt(N * qmax)).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from lsq.errors import LSQError

#: Smallest scale a quantizer ever uses. Dead (all-zero) weight channels sit here; keeps every
#: division finite whatever the optimizer does to the raw parameter.
SCALE_FLOOR = 1e-8

MIN_BITS, MAX_BITS = 2, 8


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer code range [qmin, qmax] of a b-bit quantizer."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _normalized(x: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
    """v = (x - offset) / scale in a fresh buffer; forward and backward must compute it alike."""
    if offset is None:
        return x / scale
    v = x - offset
    return v.div_(scale)


def _forward_kernel(
    x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int
) -> Tensor:
    """round(clamp((x - offset) / scale, qmin, qmax)) * scale + offset, in one buffer."""
    v = _normalized(x, scale, offset)
    v.clamp_(qmin, qmax).round_().mul_(scale)
    if offset is not None:
        v.add_(offset)
    return v


def _backward_kernel(
    g: Tensor, x: Tensor, scale: Tensor, offset: Tensor | None, qmin: int, qmax: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of x, scale and offset (before LSQ's gradient scaling), recomputed from x."""
    v = _normalized(x, scale, offset)
    inside = (v > qmin) & (v < qmax)
    q = v.clamp(qmin, qmax).round_()
    # d x_hat / d scale: round(v) - v inside; outside, the bound, which q equals there.
    ds = torch.where(inside, q - v, q)
    grad_x = torch.where(inside, g, 0.0)
    grad_scale = (g * ds).sum_to_size(scale.shape)
    # d x_hat / d offset = 1 outside: g - grad_x is exactly g outside and 0 inside.
    grad_offset = None if offset is None else (g - grad_x).sum_to_size(offset.shape)
    return grad_x, grad_scale, grad_offset


#: Kernels by name. "compiled" fuses each into one pass over memory with torch.compile (a first
#: compile costs ~15 s on 2 CPU cores, then it is cached on disk); "eager" runs them op by op.
KERNELS = ("eager", "compiled")
_compiled: dict[str, object] = {}


def _kernels(kind: str):
    if kind == "eager":
        return _forward_kernel, _backward_kernel
    if not _compiled:
        # One graph per variant (rank, per-channel or not, offset or not, grad or not): more
        # than dynamo's default limit of 8 in a whole model, far fewer than 64.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled["forward"] = torch.compile(_forward_kernel, dynamic=True)
        _compiled["backward"] = torch.compile(_backward_kernel, dynamic=True)
    return _compiled["forward"], _compiled["backward"]


#: Device type -> why the compiled kernels failed there ("" when they work); probed once each.
_probed: dict[str, str] = {}


def compile_failure(device: torch.device | str = "cpu") -> str:
    """Why torch.compile'd kernels fail on ``device`` ("" when they work). Probed once per device
    type, on that device (a C++ compiler on the CPU, Triton on CUDA), so a failure falls back to
    eager before the first training step instead of inside it."""
    kind = torch.device(device).type
    if kind not in _probed:
        try:
            fwd, bwd = _kernels("compiled")
            x = torch.linspace(-2, 2, 64, device=kind).reshape(4, 16)
            s, b = torch.tensor(0.1, device=kind), torch.tensor(0.0, device=kind)
            fwd(x, s, b, 0, 15)
            bwd(x, x, s, b, 0, 15)
            _probed[kind] = ""
        except Exception as e:  # no compiler, no Triton, unsupported platform: eager works
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            warnings.warn(
                f"torch.compile is unavailable on {kind} ({reason}); using eager kernels",
                stacklevel=2,
            )
            _probed[kind] = reason or type(e).__name__
    return _probed[kind]


def compiled_kernels_work(device: torch.device | str = "cpu") -> bool:
    """Whether torch.compile'd kernels work on ``device`` (see ``compile_failure``)."""
    return not compile_failure(device)


def _arithmetic_dtype(x: Tensor, scale: Tensor) -> torch.dtype:
    """float32 at least, whatever the input's dtype: in bf16 (8 mantissa bits) a code of 128 or
    more has no fraction, so round(v) - v, LSQ's scale gradient, would be 0 at 8 bits."""
    return torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)


def _as(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Detached (plain tensors, so a weight Parameter does not compile a graph of its own), in
    ``dtype``."""
    return None if t is None else t.detach().to(dtype)


class _FakeQuantize(torch.autograd.Function):
    """Forward and backward in one place, so the value never depends on whether grad is on.
    Both compute in float32 (float64 for float64 inputs) and return the input's dtype."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax, grad_scale, kernels):  # noqa: D102
        forward, _ = _kernels(kernels)
        dt = _arithmetic_dtype(x, scale)
        out = forward(_as(x, dt), _as(scale, dt), _as(offset, dt), qmin, qmax)
        if any(ctx.needs_input_grad[:3]):
            ctx.save_for_backward(x, scale, offset)
            ctx.args = (qmin, qmax, grad_scale, kernels)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        x, scale, offset = ctx.saved_tensors
        qmin, qmax, grad_scale, kernels = ctx.args
        _, backward = _kernels(kernels)
        dt = _arithmetic_dtype(x, scale)
        grad_x, grad_s, grad_b = backward(
            _as(grad_out, dt), _as(x, dt), _as(scale, dt), _as(offset, dt), qmin, qmax
        )
        grad_x = grad_x.to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_s = (grad_s * grad_scale).to(scale.dtype) if ctx.needs_input_grad[1] else None
        if grad_b is not None and ctx.needs_input_grad[2]:
            grad_b = (grad_b * grad_scale).to(offset.dtype)
        else:
            grad_b = None
        return grad_x, grad_s, grad_b, None, None, None, None


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    offset: Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float = 1.0,
    kernels: str = "eager",
) -> Tensor:
    """Quantize x to integers in [qmin, qmax] and back, with LSQ/LSQ+ gradients.

    ``scale`` and ``offset`` broadcast against ``x``: a 0-d tensor is per-tensor, a [C, 1, 1, 1]
    tensor is per-output-channel. ``offset=None`` is a symmetric quantizer (offset fixed at 0).
    ``grad_scale`` multiplies the gradients of scale and offset, not of x. ``kernels`` picks the
    eager or the torch.compile'd implementation of the same arithmetic (see KERNELS).
    """
    if qmin >= qmax:
        raise LSQError(f"quantizer range is empty: qmin={qmin} must be below qmax={qmax}")
    if kernels not in KERNELS:
        raise LSQError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    return _FakeQuantize.apply(x, scale, offset, int(qmin), int(qmax), float(grad_scale), kernels)


class Quantizer(nn.Module):
    """A learnable b-bit fake quantizer for weights or activations.

    ``signed`` picks the integer grid ([-2^(b-1), 2^(b-1)-1] or [0, 2^b-1]); ``asymmetric`` adds
    LSQ+'s learnable continuous offset (on the unsigned grid). ``per_channel`` gives one scale per
    slice along dim 0 (output channels of a weight). ``learnable=False`` freezes scale and offset
    (static min/max ranges). A quantizer starts uninitialised: set its range with ``set_range``.
    """

    def __init__(
        self,
        bits: int,
        *,
        signed: bool,
        asymmetric: bool = False,
        per_channel: bool = False,
        channels: int = 1,
        learnable: bool = True,
        grad_scaling: bool = True,
        role: str = "activation",
    ) -> None:
        super().__init__()
        check_bits(bits)
        if asymmetric and signed:
            raise LSQError("an asymmetric (LSQ+) quantizer uses the unsigned grid; signed=False")
        self.bits = int(bits)
        self.asymmetric = asymmetric
        self.per_channel = per_channel
        self.learnable = learnable
        self.grad_scaling = grad_scaling
        self.role = role
        self.enabled = True
        #: "eager" or "compiled" (see KERNELS); both compute the same values.
        self.kernels = "eager"
        shape = (channels,) if per_channel else ()
        self.scale = nn.Parameter(torch.ones(shape), requires_grad=learnable)
        self.offset = (
            nn.Parameter(torch.zeros(shape), requires_grad=learnable) if asymmetric else None
        )
        # Buffers so that a state dict round trip restores them; the forward reads the Python
        # copies below, never the buffers (reading a CUDA buffer waits for the GPU).
        self.register_buffer("signed_grid", torch.tensor(bool(signed)))
        self.register_buffer("initialized", torch.tensor(False))
        self._signed = bool(signed)
        self._ready = False

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self.refresh_flags()

    def refresh_flags(self) -> None:
        """Read the grid and initialised flags from the buffers (after something wrote them in
        place: a state dict, a broadcast from another process)."""
        self._signed, self._ready = bool(self.signed_grid), bool(self.initialized)

    # --- the grid -----------------------------------------------------------------------------
    @property
    def signed(self) -> bool:
        return self._signed

    @signed.setter
    def signed(self, value: bool) -> None:
        if value and self.asymmetric:
            raise LSQError("an asymmetric (LSQ+) quantizer uses the unsigned grid")
        self.signed_grid.fill_(bool(value))
        self._signed = bool(value)

    @property
    def ready(self) -> bool:
        """Whether a range was set (``set_range``, or a state dict of an initialised one)."""
        return self._ready

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.signed)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.signed)[1]

    def effective_scale(self) -> Tensor:
        """The scale the forward uses: the parameter, never below SCALE_FLOOR."""
        return self.scale.clamp_min(SCALE_FLOOR)

    def broadcast(self, t: Tensor | None, ndim: int) -> Tensor | None:
        """A per-channel ``t`` shaped to broadcast over an ``ndim``-d tensor (dim 0: channels)."""
        if t is None or not self.per_channel:
            return t
        return t.view(-1, *([1] * (ndim - 1)))

    @torch.no_grad()
    def codes(self, x: Tensor) -> Tensor:
        """The integer code of every element of ``x`` (as floats), as the forward computes it:
        round(clamp((x - offset) / scale, qmin, qmax))."""
        s = self.broadcast(self.effective_scale().detach(), x.dim())
        v = x if self.offset is None else x - self.broadcast(self.offset.detach(), x.dim())
        return (v / s).clamp_(self.qmin, self.qmax).round_()

    def clip_range(self) -> tuple[Tensor, Tensor]:
        """The current clipping range [offset + qmin*scale, offset + qmax*scale], detached."""
        s = self.effective_scale().detach()
        b = self.offset.detach() if self.offset is not None else torch.zeros_like(s)
        return b + self.qmin * s, b + self.qmax * s

    def grad_scale_for(self, x: Tensor) -> float:
        """LSQ's gradient scale g = 1 / sqrt(N * qmax).

        N counts the elements that share one scale: per output channel for per-channel weights,
        the whole tensor for per-tensor weights, and one sample's feature map for activations
        (LSQ's choice, so g does not change with the batch size).
        """
        if not self.grad_scaling:
            return 1.0
        if self.per_channel:
            n = x.numel() // max(x.shape[0], 1)
        elif self.role == "activation" and x.dim() > 1:
            n = x.numel() // max(x.shape[0], 1)
        else:
            n = x.numel()
        return 1.0 / math.sqrt(max(n, 1) * self.qmax)

    # --- state --------------------------------------------------------------------------------
    @torch.no_grad()
    def set_range(self, scale: Tensor, offset: Tensor | None = None) -> None:
        """Set scale (and offset) from an initializer; marks the quantizer initialised."""
        scale = torch.as_tensor(scale, dtype=self.scale.dtype, device=self.scale.device)
        self.scale.copy_(scale.reshape(self.scale.shape).clamp_min(SCALE_FLOOR))
        if self.offset is not None:
            off = torch.zeros(()) if offset is None else torch.as_tensor(offset)
            self.offset.copy_(off.to(self.offset).reshape(self.offset.shape))
        self.initialized.fill_(True)
        self._ready = True

    @torch.no_grad()
    def project_(self) -> None:
        """Pull the raw scale back above SCALE_FLOOR (call after each optimizer step)."""
        self.scale.clamp_(min=SCALE_FLOOR)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not self.enabled:
            return x
        if not self._ready:
            raise LSQError(
                f"{self.role} quantizer used before initialisation: calibrate the model first"
            )
        s = self.broadcast(self.effective_scale(), x.dim())
        b = self.broadcast(self.offset, x.dim())
        return fake_quantize(x, s, b, self.qmin, self.qmax, self.grad_scale_for(x), self.kernels)

    def extra_repr(self) -> str:
        kind = "asymmetric" if self.asymmetric else ("signed" if self.signed else "unsigned")
        pc = ", per_channel" if self.per_channel else ""
        frozen = "" if self.learnable else ", frozen"
        return f"{self.role}, bits={self.bits}, {kind}{pc}{frozen}, enabled={self.enabled}"


def check_bits(bits: object, what: str = "bits") -> int:
    """Validate a bit-width typed by a user: an integer from 2 to 8."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        if isinstance(bits, float) and bits.is_integer():
            bits = int(bits)
        else:
            raise LSQError(
                f"{what} must be a whole number from {MIN_BITS} to {MAX_BITS}, got {bits!r}"
            )
    if not MIN_BITS <= bits <= MAX_BITS:
        raise LSQError(f"{what} must be from {MIN_BITS} to {MAX_BITS}, got {bits}")
    return bits


def set_kernels(model: nn.Module, kernels: str) -> str:
    """Use ``kernels`` in every quantizer of ``model``; falls back to eager (and says so in the
    return value) when torch.compile does not work here."""
    if kernels not in KERNELS:
        raise LSQError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if kernels == "compiled":
        param = next(model.parameters(), None)
        if not compiled_kernels_work("cpu" if param is None else param.device):
            kernels = "eager"
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.kernels = kernels
    return kernels


def fallback_note(requested: str, used: str, device: torch.device | str) -> str:
    """The run's words when ``set_kernels`` fell back from the compiled kernels ("" if not)."""
    if requested == used:
        return ""
    kind = torch.device(device).type
    return f"torch.compile unavailable on {kind} ({compile_failure(kind)}): eager kernels"


def refresh_flags(model: nn.Module) -> None:
    """``Quantizer.refresh_flags`` for every quantizer of ``model``."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.refresh_flags()


def project_scales_(model: nn.Module) -> None:
    """Keep every quantizer's scale above SCALE_FLOOR; attach after the optimizer step."""
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.project_()
