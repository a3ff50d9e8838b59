"""Short quantization-aware training, as a generator of progress events.

The quantized model learns to match the float model (distillation, KL(float || quantized) on the
logits) or labels (cross-entropy). BatchNorm stays in eval mode: the short runs here use small
batches, whose statistics would be noisier than the pretrained running ones. The caller drives the
loop, so it can draw progress, stop between steps, or run it in a thread.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsq.convert import quant_layers
from lsq.errors import LSQError
from lsq.quantizers import SCALE_FLOOR, Quantizer, project_scales_, set_kernels
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
    bf16: bool = False
    train_weights: bool = True
    #: Quantizer updates relative to each quantizer's scale (see ``optimizer_step``); the rates
    #: of the quantizer groups are then fractions of a step size.
    relative_quant_lr: bool = False
    #: Fused torch.compile'd quantizer kernels (same values; a first compile costs ~15 s).
    compile: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every"):
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


def resolve_device(device: str) -> torch.device:
    """auto: CUDA when present, else CPU. Asking for CUDA without one is an error in words."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LSQError("device 'cuda' was asked for, but no CUDA GPU is available; use cpu")
        return torch.device("cuda")
    raise LSQError(f"device must be auto, cpu or cuda, got {device!r}")


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


def quantizer_snapshot(model: nn.Module) -> dict[str, tuple[float, float, float]]:
    """Every layer's current activation scale and offset and its mean weight scale."""
    out = {}
    for name, layer in quant_layers(model).items():
        a, w = layer.input_quant, layer.weight_quant
        s = float(a.effective_scale().detach().mean())
        b = float(a.offset.detach().mean()) if a.offset is not None else 0.0
        out[name] = (s, b, float(w.effective_scale().detach().mean()))
    return out


@torch.no_grad()
def weight_codes(layer: nn.Module) -> Tensor:
    """The integer code of every weight of a ``QuantLayer`` under its weight quantizer (int16):
    round(clamp((w - offset) / scale, qmin, qmax)), as the fake quantizer computes it."""
    q = layer.weight_quant
    w = layer.layer.weight.detach()
    v = w - q._broadcast(q.offset.detach(), w.dim()) if q.offset is not None else w
    v = v / q._broadcast(q.effective_scale().detach(), w.dim())
    return v.clamp_(q.qmin, q.qmax).round_().to(torch.int16)


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
            and bool(layer.weight_quant.initialized)
            and (layer.layer.weight.requires_grad or layer.weight_quant.scale.requires_grad)
        }
        self.start = {name: weight_codes(layer) for name, layer in self.layers.items()}
        self.last = dict(self.start)

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


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(teacher || student) on the softmax of the logits, averaged over the batch."""
    return F.kl_div(
        F.log_softmax(student_logits.float(), -1),
        F.log_softmax(teacher_logits.float(), -1),
        log_target=True,
        reduction="batchmean",
    )


@torch.no_grad()
def logits(model: nn.Module, views: Tensor, batch: int = 32) -> Tensor:
    """The model's logits (fp32) on ``views``, in batches, on the model's device, in eval mode."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat(
        [model(views[i : i + batch].to(device)).float() for i in range(0, len(views), batch)]
    )


@torch.no_grad()
def agreement_and_kl(model: nn.Module, views: Tensor, teacher_logits: Tensor, batch: int = 32):
    """Top-1 agreement with the teacher and mean KL(teacher || model) on ``views``."""
    out = logits(model, views, batch)
    t = teacher_logits.to(out.device)
    return float((out.argmax(-1) == t.argmax(-1)).float().mean()), float(distillation_loss(out, t))


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
    """Run QAT on ``model`` (quantized and calibrated), yielding an event per step.

    ``teacher`` is the float model: the distillation target (``cfg.loss == "kd"``) and the
    reference for agreement; ``labels`` give class indices of ``train_views`` for cross-entropy.
    ``train_views`` is a fixed tensor (each step samples from it) or a source of fresh views
    (``lsq.data.FreshViews`` and friends: each step gets new crops, and the teacher's logits
    are computed on them as it goes). A non-finite loss restores the state before the last
    update and ends with an ``error`` event; ``should_stop`` returning True ends with
    ``stopped``. ``teacher_logits`` (on ``train_views`` — None for a source — and on
    ``eval_views``) skips recomputing them when the caller has them.
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
    gen = torch.Generator().manual_seed(cfg.seed)

    teacher.to(device)
    if teacher_logits is None:
        on_train = None if fresh else logits(teacher, train_views)
        teacher_logits = (on_train, logits(teacher, eval_views))
    teacher_train = None if fresh else teacher_logits[0].to(device)
    teacher_eval = teacher_logits[1].to(device)

    kernels = set_kernels(model, "compiled" if cfg.compile else "eager")
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
    lrs = {g["name"]: g for g in opt.param_groups}

    def lr_of(*names: str) -> float | None:
        for n in names:
            if n in lrs:
                return float(lrs[n]["lr"])
        return None

    agreement, kl = agreement_and_kl(model, eval_views, teacher_eval)
    note = "" if kernels == "compiled" or not cfg.compile else "torch.compile unavailable: eager"
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
    good_state = None
    for step in range(1, cfg.steps + 1):
        if should_stop is not None and should_stop():
            yield TrainEvent("stopped", step - 1, cfg.steps, message="stopped by the user")
            return
        if fresh:
            x = train_views.batch(cfg.seed * 1_000_003 + step, cfg.batch_size).to(device)
            target = logits(teacher, x, batch=len(x))
        else:
            idx = torch.randint(n, (min(cfg.batch_size, n),), generator=gen)
            x = train_views[idx].to(device)
            target = teacher_train[idx]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(x)
        if cfg.loss == "kd":
            loss = distillation_loss(out, target)
        else:
            loss = F.cross_entropy(out.float(), labels[idx].to(device))
        if not torch.isfinite(loss.detach()):
            if good_state is not None:
                model.load_state_dict(good_state)
            yield TrainEvent(
                "error",
                step,
                cfg.steps,
                loss=float(loss.detach()),
                message=(
                    f"loss became {float(loss.detach())} at step {step}; training stopped and "
                    "the last good state was kept. Lower the learning rates."
                ),
            )
            return
        good_state = copy.deepcopy(model.state_dict())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step(opt)
        project_scales_(model)
        sched.step()
        event = TrainEvent(
            "step",
            step,
            cfg.steps,
            loss=float(loss.detach()),
            lr_weights=lr_of("weights", "other"),
            lr_quant=lr_of("act_quant", "weight_quant"),
            seconds=time.perf_counter() - start,
            quantizers=quantizer_snapshot(model),
            flips=flips.update(),
        )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            if not all(torch.isfinite(p).all() for p in model.parameters()):
                model.load_state_dict(good_state)
                yield TrainEvent(
                    "error",
                    step,
                    cfg.steps,
                    message=f"parameters became non-finite at step {step}; last good state kept",
                )
                return
            event.agreement, event.kl = agreement_and_kl(model, eval_views, teacher_eval)
        yield event
    yield TrainEvent(
        "done", cfg.steps, cfg.steps, seconds=time.perf_counter() - start, message="finished"
    )
