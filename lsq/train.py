"""Short quantization-aware training, as a generator of progress events.

The quantized model learns to match the float model (distillation, KL(float || quantized) on the
logits) or labels (cross-entropy). BatchNorm stays in eval mode: the short runs here use small
batches, whose statistics would be noisier than the pretrained running ones. The caller drives the
loop, so it can draw progress, stop between steps, or run it in a thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsq.convert import quant_layers
from lsq.device import BF16, generator, no_host_sync, resolve_device
from lsq.errors import LSQError
from lsq.metrics import agreement_and_kl, distillation_loss, logits
from lsq.quantizers import SCALE_FLOOR, Quantizer, fallback_note, project_scales_, set_kernels
from lsq.validate import finite_number

OPTIMIZERS = ("adam", "sgd")


class ViewSource(Protocol):
    """Fresh views on demand (``lsq.data.FreshViews``, ``TensorViews``, ``MixedViews``)."""

    def batch(self, step: int, n: int) -> Tensor: ...


LOSSES = ("kd", "ce")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a short QAT run.

    Learning rates are per parameter group. With Adam a step moves a parameter by about ``lr``
    whatever its gradient, so the rate must sit well below the parameter's size: weight scales are
    ~1e-4..1e-2 (Adam at 1e-3 drove some below zero within 40 steps on the bundled model), hence
    ``lr_weight_quant`` = 1e-5 like the weights. Activation scales and offsets are ~1e-2..1: on
    the bundled model at W8A4/W8A3 (20 steps, 2 seeds, 160 and 224 px) 3e-4 ended with a lower
    mean KL than 1e-3 in all four settings; seed-to-seed spread was as large as the difference.
    With SGD, LSQ's gradient scaling keeps the scale updates in proportion; use larger rates
    there (e.g. 1e-2).
    """

    steps: int = 50
    batch_size: int = 16
    optimizer: str = "adam"
    lr_weights: float = 1e-5
    lr_weight_quant: float = 1e-5
    lr_act_quant: float = 3e-4
    momentum: float = 0.9
    weight_decay: float = 0.0
    loss: str = "kd"
    eval_every: int = 10
    seed: int = 0
    device: str = "auto"
    #: bf16 autocast on CUDA (the quantizers compute in float32 whatever comes in); the CPU
    #: always computes in float32.
    bf16: bool = BF16
    #: Every how many steps the loop reads numbers back on the host: the loss, the quantizer
    #: snapshot, one step's weight flips, and the NaN check with its last good state. The steps
    #: between never wait on the device. 1 keeps every step's curve.
    record_every: int = 1
    #: On CUDA, a host sync inside a step (every step after the first, which compiles the
    #: kernels) raises instead of waiting (``torch.cuda.set_sync_debug_mode("error")``) and ends
    #: the run with an error event.
    sync_check: bool = False
    train_weights: bool = True
    #: Quantizer updates relative to each quantizer's scale (see ``optimizer_step``); the rates
    #: of the quantizer groups are then fractions of a step size.
    relative_quant_lr: bool = False
    #: Fused torch.compile'd quantizer kernels (same values; a first compile costs ~15 s).
    compile: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "record_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LSQError(f"{name} must be a whole number of at least 1, got {v!r}")
        if self.steps > 100_000:
            raise LSQError(f"steps must be at most 100000, got {self.steps}")
        for name in ("lr_weights", "lr_weight_quant", "lr_act_quant", "weight_decay", "momentum"):
            finite_number(getattr(self, name), name, 0, 1e6 if name.startswith("lr") else None)
        if self.optimizer not in OPTIMIZERS:
            raise LSQError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.loss not in LOSSES:
            raise LSQError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        resolve_device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainEvent:
    """One step of progress. ``kind``: step, eval, done, stopped or error."""

    kind: str
    step: int
    total: int
    loss: float | None = None
    lr_weights: float | None = None
    lr_quant: float | None = None
    agreement: float | None = None
    kl: float | None = None
    seconds: float = 0.0
    message: str = ""
    #: layer name -> (activation scale, activation offset, mean weight scale)
    quantizers: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    #: layer name -> (weights whose code changed this step, net codes moved since the start,
    #: number of weights); only layers whose weights or weight scales train (``WeightFlips``)
    flips: dict[str, tuple[int, int, int]] = field(default_factory=dict)


@torch.no_grad()
def quantizer_snapshot(model: nn.Module) -> dict[str, tuple[float, float, float]]:
    """Every layer's current activation scale and offset and its mean weight scale (one read
    from the device for the whole model)."""
    layers = quant_layers(model)
    if not layers:
        return {}
    values = []
    for layer in layers.values():
        a, w = layer.input_quant, layer.weight_quant
        b = a.offset.mean() if a.offset is not None else torch.zeros_like(a.scale).mean()
        values += [a.effective_scale().mean(), b, w.effective_scale().mean()]
    flat = torch.stack([v.float() for v in values]).tolist()
    return {name: tuple(flat[3 * i : 3 * i + 3]) for i, name in enumerate(layers)}


@torch.no_grad()
def weight_codes(layer: nn.Module) -> Tensor:
    """The integer code of every weight of a ``QuantLayer`` under its weight quantizer (int16):
    round(clamp((w - offset) / scale, qmin, qmax)), as the fake quantizer computes it."""
    return layer.weight_quant.codes(layer.layer.weight.detach()).to(torch.int16)


class WeightFlips:
    """Weights crossing a rounding boundary during QAT, per layer and step.

    Keeps each trained layer's integer weight codes from the last step and from the start (two
    int16 copies: 4 bytes per weight). ``update`` after an optimizer step gives, per layer, how
    many weights changed code since the last step (flips) and the net distance, in codes, of all
    weights from where they started: a weight that flips up and back adds two flips and no net
    distance, so flips far above the net distance mean oscillation, not learning. Only layers
    whose weights or weight scale train are followed (the others cannot flip).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = {
            name: layer
            for name, layer in quant_layers(model).items()
            if layer.weight_quant.enabled
            and layer.weight_quant.ready
            and (layer.layer.weight.requires_grad or layer.weight_quant.scale.requires_grad)
        }
        self.start = {name: weight_codes(layer) for name, layer in self.layers.items()}
        self.last = dict(self.start)

    def mark(self) -> None:
        """Take the codes now (just before a step), so that the next ``update`` counts that one
        step's flips: sampling every few steps costs nothing in the steps between."""
        self.last = {name: weight_codes(layer) for name, layer in self.layers.items()}

    @torch.no_grad()
    def update(self) -> dict[str, tuple[int, int, int]]:
        """layer -> (flips this step, net codes moved since the start, number of weights)."""
        if not self.layers:
            return {}
        counts = []
        for name, layer in self.layers.items():
            codes = weight_codes(layer)
            counts.append((codes != self.last[name]).sum())
            counts.append((codes - self.start[name]).abs().sum())
            self.last[name] = codes
        values = torch.stack(counts).tolist()  # one device sync for every layer
        return {
            name: (int(values[2 * i]), int(values[2 * i + 1]), self.start[name].numel())
            for i, name in enumerate(self.layers)
        }


def param_groups(
    modules: list[nn.Module],
    lr_weights: float,
    lr_weight_quant: float,
    lr_act_quant: float,
    train_weights: bool = True,
    relative: bool = False,
    relative_weights: bool = False,
    lr_other: float | None = None,
) -> list[dict]:
    """Parameter groups of ``modules``: quantized weights, other parameters (biases, norms),
    weight quantizers and activation quantizers, each with its learning rate.

    With ``relative`` the quantizer groups carry each parameter's reference scale (``refs``: the
    quantizer's own scale, for the scale and for the offset), and ``optimizer_step`` turns their
    update into one relative to that scale; with ``relative_weights`` a quantized layer's weight
    moves in units of its own quantization step (``lr_weights`` is then a fraction of a step).
    ``lr_other`` (default ``lr_weights``) is the absolute rate of biases and norms.
    """
    act, wq, weights, other, seen = [], [], [], [], set()
    for module in modules:
        for q in module.modules():
            if not isinstance(q, Quantizer):
                continue
            for p in q.parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if p.requires_grad:
                    (act if q.role == "activation" else wq).append((p, q.scale))
    step_of = {}
    for module in modules:
        for layer in quant_layers(module).values():  # a QuantLayer module lists itself
            if layer.weight_quant.enabled:
                step_of[id(layer.layer.weight)] = layer.weight_quant.scale
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                p.requires_grad_(train_weights)
                if train_weights:
                    (weights if id(p) in step_of else other).append(p)
    groups = [
        {
            "params": weights,
            "refs": [step_of[id(p)] for p in weights],
            "relative": relative_weights,
            "lr": lr_weights,
            "name": "weights",
        },
        {"params": other, "lr": lr_weights if lr_other is None else lr_other, "name": "other"},
    ]
    quant = (("weight_quant", lr_weight_quant, wq), ("act_quant", lr_act_quant, act))
    for name, lr, pairs in quant:
        groups.append(
            {
                "params": [p for p, _ in pairs],
                "refs": [r for _, r in pairs],
                "relative": relative,
                "lr": lr,
                "name": name,
            }
        )
    return [g for g in groups if g["params"]]


def make_optimizer(
    groups: list[dict],
    kind: str = "adam",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Adam or SGD over ``groups`` (from ``param_groups``); step it with ``optimizer_step``."""
    if kind == "adam":
        return torch.optim.Adam(groups, weight_decay=weight_decay)
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=momentum, weight_decay=weight_decay)
    raise LSQError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")


def optimizer_step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()``, with the update of every relative group multiplied by its reference scale.

    Adam moves each parameter by about ``lr`` whatever its size; a quantizer scale of 5e-4 and
    one of 5 need steps in proportion. Here the update becomes ``lr * scale`` (taken before the
    step): the scale changes by the same fraction, and the offset by the same fraction of a
    step size, at every size.
    """
    saved = []
    for g in opt.param_groups:
        if g.get("relative"):
            for p, ref in zip(g["params"], g["refs"], strict=True):
                if p.grad is not None:
                    r = ref.detach().abs().clamp_min(SCALE_FLOOR)
                    if r.dim() == 1 and p.dim() > 1:  # per-channel step of a weight
                        r = r.view(-1, *([1] * (p.dim() - 1)))
                    saved.append((p, p.detach().clone(), r.clone()))
    opt.step()
    with torch.no_grad():
        for p, old, ref in saved:
            p.copy_(old + (p - old) * ref)


def update(
    opt: torch.optim.Optimizer,
    loss: Tensor,
    model: nn.Module | list[nn.Module],
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """One update, the same everywhere (QAT, reconstruction, torchrun, the benchmarks):
    gradients of ``loss``, then ``apply_gradients``. Nothing in it reads a number on the host."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    apply_gradients(opt, model, sched)


def apply_gradients(
    opt: torch.optim.Optimizer,
    model: nn.Module | list[nn.Module],
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """The optimizer's step (``optimizer_step``), every quantizer's scale kept above its floor,
    the schedule's step."""
    optimizer_step(opt)
    for m in model if isinstance(model, list) else [model]:
        project_scales_(m)
    if sched is not None:
        sched.step()


def step_loss(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    loss: str = "kd",
    bf16: bool = False,
) -> Tensor:
    """The loss of one QAT step: the model's forward (bf16 autocast on CUDA when ``bf16``) and
    the distillation loss against the teacher's logits (``loss="kd"``) or the cross-entropy
    against class indices (``"ce"``), in float32."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and x.device.type == "cuda"):
        out = model(x)
    if loss == "kd":
        return distillation_loss(out, target)
    return F.cross_entropy(out.float(), target)


class LastGood:
    """The NaN policy without a copy of the model every step and without waiting on the device.

    Before a checked step the trained parameters are copied on the device (``hold``); after it,
    one read (``check``) says whether that step's loss was finite, i.e. whether the held state
    was good. Then the held copy becomes the last good state; if not (or if the parameters went
    non-finite), ``restore`` puts the last good state back. The state the run started from is
    the first good one.
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.good = [p.detach().clone() for p in params]
        self.held = [p.detach().clone() for p in params]

    @torch.no_grad()
    def hold(self) -> None:
        for h, p in zip(self.held, self.params, strict=True):
            h.copy_(p)

    @torch.no_grad()
    def check(self, loss: Tensor, params_too: bool) -> tuple[float, bool]:
        """(the loss, whether the run is healthy): one read from the device. The held state
        becomes the last good one when the loss it gave is finite."""
        flags = [torch.isfinite(loss.detach()).all()]
        if params_too:
            flags += [torch.isfinite(p).all() for p in self.params]
        read = torch.stack([loss.detach().float().reshape(()), torch.stack(flags).all().float()])
        value, ok = read.tolist()
        if math.isfinite(value):
            self.good, self.held = self.held, self.good
        return value, bool(ok)

    @staticmethod
    def problem(value: float) -> str:
        """What ``check`` found unhealthy, in words, from the loss it read."""
        return (
            f"loss became {value}" if not math.isfinite(value) else "parameters became non-finite"
        )

    @torch.no_grad()
    def restore(self) -> None:
        for p, g in zip(self.params, self.good, strict=True):
            p.copy_(g)


def train(
    model: nn.Module,
    teacher: nn.Module,
    train_views: Tensor | ViewSource,
    eval_views: Tensor,
    cfg: TrainConfig,
    labels: Tensor | None = None,
    should_stop: Callable[[], bool] | None = None,
    teacher_logits: tuple[Tensor | None, Tensor] | None = None,
) -> Iterator[TrainEvent]:
    """Run QAT on ``model`` (quantized and calibrated), yielding progress events.

    ``teacher`` is the float model: the distillation target (``cfg.loss == "kd"``) and the
    reference for agreement; ``labels`` give class indices of ``train_views`` for cross-entropy.
    ``train_views`` is a fixed tensor (each step samples from it, on the device) or a source of
    fresh views (``lsq.data.FreshViews`` and friends: each step gets new crops, and the teacher's
    logits are computed on them as it goes). A ``step`` event comes every ``cfg.record_every``
    steps (and at evaluations and the last step): only then are numbers read from the device.
    A non-finite loss or parameters restore the last good state (``LastGood``) and end with an
    ``error`` event; ``should_stop`` returning True ends with ``stopped``. ``teacher_logits``
    (on ``train_views`` — None for a source — and on ``eval_views``) skips recomputing them.
    """
    fresh = not isinstance(train_views, Tensor)
    if fresh and not callable(getattr(train_views, "batch", None)):
        raise LSQError("training views must be a tensor or a view source with batch(step, n)")
    if (not fresh and train_views.shape[0] == 0) or eval_views.shape[0] == 0:
        raise LSQError("training needs at least one training view and one evaluation view")
    if cfg.loss == "ce" and (fresh or labels is None or labels.shape[0] != train_views.shape[0]):
        raise LSQError("cross-entropy training needs a fixed set of views with one label each")
    if teacher is None:
        raise LSQError("training needs the float model as teacher (distillation and agreement)")
    device = resolve_device(cfg.device)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    model.to(device).eval()
    gen = generator(device, cfg.seed)

    teacher.to(device)
    if teacher_logits is None:
        on_train = None if fresh else logits(teacher, train_views)
        teacher_logits = (on_train, logits(teacher, eval_views))
    if not fresh:  # once on the device: a step indexes it there, with no copy
        train_views = train_views.to(device)
        teacher_train = teacher_logits[0].to(device)
        labels = None if labels is None else labels.to(device)
    teacher_eval = teacher_logits[1].to(device)
    eval_views = eval_views.to(device)

    requested = "compiled" if cfg.compile else "eager"
    kernels = set_kernels(model, requested)
    groups = param_groups(
        [model],
        cfg.lr_weights,
        cfg.lr_weight_quant,
        cfg.lr_act_quant,
        cfg.train_weights,
        cfg.relative_quant_lr,
    )
    if not groups:
        raise LSQError("nothing to train: no learnable quantizer and weights frozen")
    opt = make_optimizer(groups, cfg.optimizer, cfg.momentum, cfg.weight_decay)
    flips = WeightFlips(model)  # after param_groups: it decides which weights train
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    last_good = LastGood([p for g in groups for p in g["params"]])
    lrs = {g["name"]: g for g in opt.param_groups}

    def lr_of(*names: str) -> float | None:
        for n in names:
            if n in lrs:
                return float(lrs[n]["lr"])
        return None

    agreement, kl = agreement_and_kl(model, eval_views, teacher_eval)
    note = fallback_note(requested, kernels, device)
    yield TrainEvent(
        "eval",
        0,
        cfg.steps,
        agreement=agreement,
        kl=kl,
        message=note,
        quantizers=quantizer_snapshot(model),
    )
    n = None if fresh else train_views.shape[0]
    start = time.perf_counter()
    recorded = True  # the flip counter's codes are those before step 1
    for step in range(1, cfg.steps + 1):
        if should_stop is not None and should_stop():
            yield TrainEvent("stopped", step - 1, cfg.steps, message="stopped by the user")
            return
        evaluate = step % cfg.eval_every == 0 or step == cfg.steps
        record = evaluate or step % cfg.record_every == 0
        if fresh:
            x = train_views.batch(cfg.seed * 1_000_003 + step, cfg.batch_size)
            x = x.to(device, non_blocking=True)
            target = logits(teacher, x, batch=len(x))
        else:
            idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen, device=device)
            x = train_views[idx]
            target = teacher_train[idx] if cfg.loss == "kd" else labels[idx]
        if record:
            last_good.hold()
            if not recorded:  # else the codes after the last recorded step are these
                flips.mark()
        recorded = record
        try:
            # Step 1 compiles the quantizer kernels for this run's shapes: not checked.
            with no_host_sync(device, cfg.sync_check and step > 1):
                loss = step_loss(model, x, target, cfg.loss, use_bf16)
                update(opt, loss, model, sched)
        except RuntimeError as e:
            if not cfg.sync_check or "synchroniz" not in str(e):
                raise
            yield TrainEvent(
                "error", step, cfg.steps, message=f"a host sync inside QAT step {step}: {e}"
            )
            return
        if not record:
            continue
        value, healthy = last_good.check(loss, params_too=evaluate)
        if not healthy:
            last_good.restore()
            what = LastGood.problem(value)
            yield TrainEvent(
                "error",
                step,
                cfg.steps,
                loss=value,
                message=(
                    f"{what} at step {step}; training stopped and the last good state was "
                    "kept. Lower the learning rates."
                ),
            )
            return
        event = TrainEvent(
            "step",
            step,
            cfg.steps,
            loss=value,
            lr_weights=lr_of("weights", "other"),
            lr_quant=lr_of("act_quant", "weight_quant"),
            seconds=time.perf_counter() - start,
            quantizers=quantizer_snapshot(model),
            flips=flips.update(),
        )
        if evaluate:
            event.agreement, event.kl = agreement_and_kl(model, eval_views, teacher_eval)
        yield event
    yield TrainEvent(
        "done", cfg.steps, cfg.steps, seconds=time.perf_counter() - start, message="finished"
    )
