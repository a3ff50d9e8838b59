"""Block-wise reconstruction: repair a quantized model one unit at a time (BRECQ, QDrop).

Instead of training the whole quantized network against the float logits, each unit (the stem,
every block, the head, the classifier) learns to reproduce the float unit's output on the same
images. Its input comes from the already-reconstructed quantized stream, with every element
replaced by the float stream's value with probability ``drop_prob`` (QDrop), so the unit becomes
robust to the quantization noise of its input without fitting it. Each unit has a target of its
own, which is why a few hundred images repair what end-to-end distillation on the same images
cannot. LSQ+'s learnable offsets are trained with the scales.

The loop is a generator of ``ReconstructEvent``, with the same contract as ``lsq.train.train``:
the caller draws progress, stops between iterations, and a non-finite loss restores the unit's
last good state. Only the current unit's float and quantized inputs are held in memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsq.convert import float_mode, quant_layers
from lsq.device import BF16, generator, resolve_device
from lsq.errors import LSQError
from lsq.init import init_weight_quantizer
from lsq.metrics import distillation_loss
from lsq.quantizers import fallback_note, set_kernels
from lsq.train import LastGood, make_optimizer, param_groups, update
from lsq.validate import finite_number

#: Containers whose children timm runs one after another as the network's blocks.
BLOCK_CONTAINERS = ("blocks", "layer1", "layer2", "layer3", "layer4", "stages", "features")
HEAD = "forward_head"
RECON_WEIGHT_INITS = ("mse", "keep")
#: How a unit's quantized weights are learned: "ste" trains the float weights through the
#: straight-through rounding; "learned" keeps them and the weight scales fixed and learns, per
#: weight, whether it rounds down or up (AdaRound, Nagel et al. 2020, as BRECQ and QDrop do).
ROUNDINGS = ("ste", "learned")


@dataclass(frozen=True)
class ReconstructConfig:
    """Settings of block-wise reconstruction.

    Learning rates are per parameter group, as in QAT. With ``relative_quant_lr`` (the default)
    a quantizer's scale and offset move by ``lr`` times its own scale per Adam step, so a step
    size of 5e-4 and one of 5 change by the same fraction (Adam otherwise moves every parameter
    by about ``lr``, whatever its size, and cancels LSQ's gradient scaling); with
    ``relative_weight_lr`` a weight moves by ``lr_weights`` times its quantization step. Why
    each default is what it is, with measurements: docs/RECIPE.md.
    """

    #: Per unit (chosen to fit the recipe in about 5 minutes on 2 CPU cores at 224 px).
    iters: int = 60
    batch_size: int = 32
    #: With ``relative_weight_lr``: the fraction of its quantization step a weight moves per
    #: Adam step; else an absolute rate.
    lr_weights: float = 1e-2
    lr_other: float = 3e-5  # biases and norms, absolute
    lr_weight_quant: float = 1e-2
    lr_act_quant: float = 1e-2
    relative_quant_lr: bool = True
    relative_weight_lr: bool = True
    drop_prob: float = 0.5  # QDrop: chance that an input element comes from the float stream
    #: Weight ranges the units start from: "mse" searches every quantized layer's weight scales
    #: for the least quantization error first (per channel), "keep" starts from the model's own
    #: init (LSQ+'s mean +- 3 sigma, LSQ's 2<|w|>/sqrt(Qp), min/max's max |w|).
    weight_init: str = "mse"
    #: "ste" or "learned" (``ROUNDINGS``). With "learned" the weights and weight scales stay
    #: fixed and each weight's rounding direction is learned: its soft value is
    #: ``s * clamp(floor(w/s) + h(V), n, p)`` with the rectified sigmoid
    #: ``h(V) = clamp(sigmoid(V) * 1.2 - 0.1, 0, 1)``, started at the weight's own fraction, and a
    #: regulariser ``sum(1 - |2h - 1|^beta)`` pushes every h to 0 or 1 (beta annealed from 20 to
    #: 2 after ``round_warmup`` of the iterations); the unit ends with h rounded to 0 or 1.
    #: BRECQ and QDrop run 20,000 iterations per block; in this CPU budget "ste" ends better.
    rounding: str = "ste"
    lr_rounding: float = 0.1  # Adam's rate for V (absolute: V is about +-2.4 at the start)
    #: Weight of the rounding regulariser (its mean over the unit's weights), as a multiple of
    #: the unit's output error at the start.
    round_reg: float = 1.0
    round_warmup: float = 0.2  # share of a unit's iterations before the regulariser starts
    seed: int = 0
    device: str = "auto"
    bf16: bool = BF16  # autocast on CUDA only; the quantizers compute in float32 regardless
    compile: bool = True
    #: Every how many iterations the loop reads the loss on the host (the step event) and checks
    #: for non-finite values, keeping the last good state; the iterations between never wait.
    record_every: int = 1

    def __post_init__(self) -> None:
        for name, hi in (("iters", 100_000), ("batch_size", 4096), ("record_every", 100_000)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
                raise LSQError(f"{name} must be a whole number from 1 to {hi}, got {v!r}")
        for name in ("lr_weights", "lr_other", "lr_weight_quant", "lr_act_quant"):
            finite_number(getattr(self, name), name, 0, 1e6)
        finite_number(self.drop_prob, "drop_prob", 0, 1)
        finite_number(self.lr_rounding, "lr_rounding", 0, 1e6)
        finite_number(self.round_reg, "round_reg", 0, 1e6)
        finite_number(self.round_warmup, "round_warmup", 0, 1)
        if self.rounding not in ROUNDINGS:
            raise LSQError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.weight_init not in RECON_WEIGHT_INITS:
            raise LSQError(
                f"weight_init must be one of {', '.join(RECON_WEIGHT_INITS)}, "
                f"got {self.weight_init!r}"
            )
        resolve_device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Unit:
    """A piece of the network trained as one: modules run in order, or the model's head."""

    name: str
    paths: tuple[str, ...]  # module paths run one after another; (HEAD,) for forward_head
    layers: tuple[str, ...]  # the quantized layers inside

    def run(self, model: nn.Module, x: Tensor) -> Tensor:
        if self.paths == (HEAD,):
            return model.forward_head(x)
        for p in self.paths:
            x = model.get_submodule(p)(x)
        return x

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules holding this unit's parameters."""
        if self.paths == (HEAD,):
            return [model.get_submodule(n) for n in self.layers]
        return [model.get_submodule(p) for p in self.paths]


@dataclass
class ReconstructEvent:
    """Progress: ``kind`` is step, unit (a unit finished), done, stopped or error."""

    kind: str
    unit: str
    unit_index: int
    units: int
    step: int  # iterations done, over all units
    total: int
    loss: float | None = None
    loss_before: float | None = None  # unit: its output error before and after reconstruction
    loss_after: float | None = None
    seconds: float = 0.0
    message: str = ""
    #: Work done and in all, in seconds as estimated from each unit's measured cost
    #: (``unit_costs``): what progress bars and time left are counted in.
    work: float = 0.0
    work_total: float = 0.0
    #: The estimated seconds of one forward and backward pass of the whole model at the
    #: reconstruction's batch (its units' iterations): what a QAT step costs, in the same units.
    model_step: float = 0.0


#: One iteration (a forward and a backward pass) costs about this many forward passes.
PASSES_PER_ITERATION = 3.0
#: Passes of every unit ``unit_costs`` takes: one that may compile kernels, two timed.
COST_PASSES = 3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unit_costs(model: nn.Module, units: list[Unit], x: Tensor, chained: bool) -> list[float]:
    """Seconds of one training iteration of each unit on the batch ``x`` (the model's input),
    the least of two timed passes after one that may compile kernels. Chained units run one
    after another, each a forward and a backward pass (gradients cleared after); per-layer units
    are timed by hooks inside one forward pass of the model, an iteration counted as
    ``PASSES_PER_ITERATION`` forward passes."""
    timed = _chain_costs if chained else _hooked_costs
    passes = [timed(model, units, x) for _ in range(COST_PASSES)]
    return [min(c) for c in zip(*passes[1:], strict=True)]


def _chain_costs(model: nn.Module, units: list[Unit], x: Tensor) -> list[float]:
    costs = []
    x = x.detach()
    _sync(x.device)
    try:
        for u in units:
            t = time.perf_counter()
            out = u.run(model, x)
            if out.requires_grad:  # a unit with nothing to learn has no backward pass
                out.float().square().mean().backward()
            _sync(x.device)
            costs.append(time.perf_counter() - t)
            x = out.detach()
    finally:
        model.zero_grad(set_to_none=True)
    return costs


@torch.no_grad()
def _hooked_costs(model: nn.Module, units: list[Unit], x: Tensor) -> list[float]:
    begun: dict[str, float] = {}
    spent: dict[str, float] = {}

    def begin(name: str) -> None:
        _sync(x.device)
        begun[name] = time.perf_counter()

    def end(name: str) -> None:
        _sync(x.device)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - begun[name]

    hooks = []
    for u in units:
        mod = model.get_submodule(u.paths[0])
        hooks.append(mod.register_forward_pre_hook(lambda m, i, n=u.name: begin(n)))
        hooks.append(mod.register_forward_hook(lambda m, i, o, n=u.name: end(n)))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return [PASSES_PER_ITERATION * spent.get(u.name, 0.0) for u in units]


def _expand(model: nn.Module, name: str) -> list[str]:
    """A block container's blocks: nested Sequentials (EfficientNet stages) are flattened."""
    out = []
    for child, m in model.get_submodule(name).named_children():
        path = f"{name}.{child}"
        if type(m) is nn.Sequential:
            out.extend(f"{path}.{c}" for c, _ in m.named_children())
        else:
            out.append(path)
    return out


def _layers_under(paths: tuple[str, ...], layer_names: list[str]) -> tuple[str, ...]:
    return tuple(n for n in layer_names if any(n == p or n.startswith(p + ".") for p in paths))


def _chain_units(model: nn.Module, example: Tensor) -> list[Unit] | None:
    """Units of a timm model whose forward_features runs its children in order, or None."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        return None
    order: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda mod, inp, n=name: order.append(n))
        for name, m in model.named_children()
    ]
    try:
        with torch.no_grad(), float_mode(model):
            model.forward_features(example)
    finally:
        for h in handles:
            h.remove()
    if len(set(order)) != len(order):
        return None  # a child runs twice: not a chain
    names = list(quant_layers(model))
    units: list[Unit] = []
    pending: list[str] = []

    def flush(label: str) -> None:
        if pending:
            paths = tuple(pending)
            units.append(Unit(label, paths, _layers_under(paths, names)))
            pending.clear()

    for child in order:
        if child in BLOCK_CONTAINERS:
            flush("stem" if not units else f"before {child}")
            for path in _expand(model, child):
                units.append(Unit(path, (path,), _layers_under((path,), names)))
        else:
            pending.append(child)
    flush("stem" if not units else "head")
    covered = {n for u in units for n in u.layers}
    units.append(Unit("classifier", (HEAD,), tuple(n for n in names if n not in covered)))
    return units


def _layer_units(model: nn.Module) -> list[Unit]:
    """The fallback: one unit per quantized layer, its input captured with a hook."""
    return [Unit(n, (n,), (n,)) for n in quant_layers(model)]


def find_units(model: nn.Module, example: Tensor) -> list[Unit]:
    """The units of a quantized model, in the order data flows through them.

    timm's blocks (``blocks`` stages of EfficientNet/MobileNet/MixNet, ResNet's ``layer1..4``,
    ``stages``) each make a unit, with what runs before them as the stem, what runs after as the
    head, and ``forward_head`` as the classifier. The chain is checked: run unit after unit, it
    must give the model's own output, and every quantized layer must sit in exactly one unit.
    Anything else gets one unit per quantized layer.
    """
    if not quant_layers(model):
        raise LSQError("the model has no quantized layer: quantize it first")
    model.eval()
    units = _chain_units(model, example)
    if units is not None:
        with torch.no_grad(), float_mode(model):
            want = model(example)
            x = example
            for u in units:
                x = u.run(model, x)
        layers = [n for u in units for n in u.layers]
        exact = x.shape == want.shape and torch.allclose(x, want, rtol=1e-4, atol=1e-5)
        if exact and sorted(layers) == sorted(quant_layers(model)) and all(u.layers for u in units):
            return units
        if exact and sorted(layers) == sorted(quant_layers(model)):
            # Units without a quantized layer (a pooling step) merge into the next one.
            return _merge_empty(units)
    return _layer_units(model)


def _merge_empty(units: list[Unit]) -> list[Unit]:
    out: list[Unit] = []
    carry: tuple[str, ...] = ()
    for u in units:
        if not u.layers and u.paths != (HEAD,):
            carry += u.paths
            continue
        if carry and u.paths != (HEAD,):
            u = Unit(u.name, carry + u.paths, u.layers)
        elif carry:  # nothing quantized between the last block and forward_head: keep apart
            out.append(Unit("head", carry, ()))
        carry = ()
        out.append(u)
    return out


def qdrop_mix(
    x_q: Tensor, x_fp: Tensor, drop_prob: float, gen: torch.Generator | None = None
) -> Tensor:
    """QDrop's input: each element of the quantized stream replaced by the float stream's with
    probability ``drop_prob``; the draw is made on the inputs' device (``gen`` there)."""
    keep_float = torch.rand(x_q.shape, generator=gen, device=x_q.device)
    return torch.where(keep_float < drop_prob, x_fp, x_q)


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_input(model: nn.Module, path: str, views: Tensor, batch: int, device) -> Tensor:
    """The input of module ``path`` on every view (the model run only as far as that module)."""
    module = model.get_submodule(path)
    got: list[Tensor] = []

    def hook(mod, inputs):
        got.append(inputs[0].detach())
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        for i in range(0, len(views), batch):
            try:
                model(views[i : i + batch].to(device))
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(got)


@torch.no_grad()
def _run_all(unit: Unit, model: nn.Module, x: Tensor, batch: int) -> Tensor:
    return torch.cat([unit.run(model, x[i : i + batch]) for i in range(0, len(x), batch)])


def _unit_loss(out: Tensor, target: Tensor, is_logits: bool) -> Tensor:
    if is_logits:
        return distillation_loss(out, target)
    return F.mse_loss(out.float(), target.float())


@torch.no_grad()
def _eval_loss(unit, model, x, target, is_logits, batch) -> float:
    total = torch.zeros((), device=x.device)
    for i in range(0, len(x), batch):
        out = unit.run(model, x[i : i + batch])
        total += _unit_loss(out, target[i : i + batch], is_logits) * len(out)
    return float(total) / len(x)  # one read per unit


class LearnedRounding(nn.Module):
    """AdaRound's soft rounding of one layer's weights, for the duration of one unit.

    The weight ``w`` and its quantizer's (per-channel) scale ``s`` stay fixed; the learned
    ``V`` decides, per weight, between ``floor(w/s)`` and the level above:
    ``w_soft = s * clamp(floor(w/s) + h(V), n, p)`` with ``h(V) = clamp(sigmoid(V)(zeta - gamma)
    + gamma, 0, 1)``, zeta = 1.1, gamma = -0.1 (Nagel et al. 2020, eq. 23). ``V`` starts where
    ``h`` equals the weight's fraction, so the soft weight starts at the (clipped) float weight.
    ``hard()`` is the quantized weight with every ``h`` rounded to 0 or 1: a point of the
    quantizer's grid, which the quantizer itself then reproduces exactly.
    """

    ZETA, GAMMA = 1.1, -0.1

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        q, w = layer.weight_quant, layer.layer.weight.detach()
        s = q.broadcast(q.effective_scale().detach(), w.dim())
        self.qmin, self.qmax = q.qmin, q.qmax
        self.register_buffer("s", s.clone())
        self.register_buffer("floor", torch.floor(w / s))
        frac = (w / s - self.floor).clamp(1e-4, 1 - 1e-4)
        p = (frac - self.GAMMA) / (self.ZETA - self.GAMMA)
        self.v = nn.Parameter(torch.log(p / (1 - p)))

    def h(self) -> Tensor:
        return (torch.sigmoid(self.v) * (self.ZETA - self.GAMMA) + self.GAMMA).clamp(0, 1)

    def forward(self) -> Tensor:  # noqa: D102
        return self.s * torch.clamp(self.floor + self.h(), self.qmin, self.qmax)

    @torch.no_grad()
    def hard(self) -> Tensor:
        up = (self.v >= 0).to(self.s.dtype)
        return self.s * torch.clamp(self.floor + up, self.qmin, self.qmax)

    def regulariser(self, beta: float) -> Tensor:
        """``sum(1 - |2h - 1|^beta)``: zero when every h is 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()


def round_beta(it: int, iters: int, warmup: float) -> float | None:
    """The regulariser's exponent at iteration ``it``: None during the warm-up, then annealed
    linearly from 20 to 2 (BRECQ's schedule)."""
    start = int(warmup * iters)
    if it < start:
        return None
    t = (it - start) / max(iters - start, 1)
    return 2.0 + (20.0 - 2.0) * (1.0 - t)


def _learned_rounding(unit: Unit, model: nn.Module) -> dict[str, LearnedRounding]:
    """A LearnedRounding for every enabled, initialised weight quantizer of the unit (the
    first and last layers' too); ``reconstruct`` hooks each onto its quantizer's output."""
    out = {}
    for name in unit.layers:
        layer = model.get_submodule(name)
        q = layer.weight_quant
        if q.enabled and q.ready and q.offset is None:
            out[name] = LearnedRounding(layer).to(layer.layer.weight.device)
    return out


@contextmanager
def _rounding_attached(model: nn.Module, rounders: dict[str, LearnedRounding]):
    """Each layer's weight quantizer outputs its LearnedRounding's soft weight while inside; on
    leaving, also when the unit is stopped or closed mid-way, the hooks go and every weight
    takes the rounding learned so far."""
    hooks = [
        model.get_submodule(n).weight_quant.register_forward_hook(lambda m, i, o, r=r: r())
        for n, r in rounders.items()
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, r in rounders.items():
                model.get_submodule(n).layer.weight.copy_(r.hard())


def reconstruct(
    model: nn.Module,
    teacher: nn.Module,
    views: Tensor,
    cfg: ReconstructConfig = ReconstructConfig(),
    should_stop: Callable[[], bool] | None = None,
    units: list[Unit] | None = None,
) -> Iterator[ReconstructEvent]:
    """Reconstruct ``model`` (quantized and calibrated) unit by unit against ``teacher`` (float).

    ``views`` are the images both streams start from. The teacher must be the float model that
    ``model`` was quantized from (same module names). Yields a ``step`` event per iteration and a
    ``unit`` event with each unit's output error (on all views, quantized input) before and after.
    """
    if views.ndim != 4 or len(views) == 0:
        raise LSQError("reconstruction needs a batch of images [N, 3, H, W] with N >= 1")
    device = resolve_device(cfg.device)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    model.to(device).eval()
    teacher.to(device).eval()
    if units is None:
        units = find_units(model, views[:1].to(device))
    missing = [p for u in units for p in u.paths if p != HEAD and _get(teacher, p) is None]
    if missing:
        raise LSQError(f"the float model has no module {missing[0]!r}: not the model quantized")
    requested = "compiled" if cfg.compile else "eager"
    note_kernels = fallback_note(requested, set_kernels(model, requested), device)
    if cfg.weight_init == "mse":
        mse_weight_ranges_(model)
    gen = generator(device, cfg.seed)
    batch = cfg.batch_size
    n = len(views)
    total = cfg.iters * len(units)
    chained = units[0].paths != units[-1].paths and units[-1].paths == (HEAD,)
    # Progress counted in each unit's measured cost: its iterations, and the passes over all
    # views (the float target, the error before and after, the quantized stream carried on).
    costs = unit_costs(model, units, views[:batch].to(device), chained)
    passes = cfg.iters + 4 * n / min(batch, n) / PASSES_PER_ITERATION
    unit_work = [c * passes for c in costs]
    work_before = [sum(unit_work[:k]) for k in range(len(units) + 1)]
    plan = {"work_total": work_before[-1], "model_step": sum(costs)}
    start = time.perf_counter()

    x_fp = x_q = views.to(device)
    for k, unit in enumerate(units):
        if not chained:
            x_fp = _capture_input(teacher, unit.paths[0], views, batch, device)
            x_q = _capture_input(model, unit.paths[0], views, batch, device)
        is_logits = unit.paths == (HEAD,)
        target = _run_all(unit, teacher, x_fp, batch)
        before = _eval_loss(unit, model, x_q, target, is_logits, batch)
        groups = param_groups(
            unit.modules(model),
            cfg.lr_weights,
            cfg.lr_weight_quant,
            cfg.lr_act_quant,
            relative=cfg.relative_quant_lr,
            relative_weights=cfg.relative_weight_lr,
            lr_other=cfg.lr_other,
        )
        rounders = _learned_rounding(unit, model) if cfg.rounding == "learned" else {}
        if rounders:  # the weights and their scales stay; V learns the rounding
            groups = [g for g in groups if g["name"] not in ("weights", "weight_quant")]
            groups.append(
                {"params": [r.v for r in rounders.values()], "lr": cfg.lr_rounding, "name": "v"}
            )
        params = [p for g in groups for p in g["params"]]
        last_good = LastGood(params)
        start_state = [p.detach().clone() for p in params]
        start_weights = [model.get_submodule(m).layer.weight.detach().clone() for m in rounders]
        n_rounded = sum(r.v.numel() for r in rounders.values())
        with _rounding_attached(model, rounders):
            if groups:
                opt = make_optimizer(groups, "adam")
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters)
            for it in range(cfg.iters if groups else 0):  # no parameters: nothing to learn
                step = k * cfg.iters + it
                if should_stop is not None and should_stop():
                    yield ReconstructEvent(
                        "stopped", unit.name, k, len(units), step, total,
                        seconds=time.perf_counter() - start, message="stopped by the user",
                        work=work_before[k], **plan,
                    )  # fmt: skip
                    return
                idx = torch.randint(n, (min(batch, n),), generator=gen, device=device)
                xq = x_q[idx]
                if cfg.drop_prob > 0 and k > 0:
                    xq = qdrop_mix(xq, x_fp[idx], cfg.drop_prob, gen)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                    out = unit.run(model, xq)
                rec = _unit_loss(out, target[idx], is_logits)
                loss = rec
                beta = round_beta(it, cfg.iters, cfg.round_warmup) if rounders else None
                if beta is not None:
                    reg = sum(r.regulariser(beta) for r in rounders.values()) / n_rounded
                    loss = rec + cfg.round_reg * before * reg
                record = (it + 1) % cfg.record_every == 0 or it + 1 == cfg.iters
                if record:
                    last_good.hold()
                update(opt, loss, unit.modules(model), sched)
                if not record:
                    continue
                value, healthy = last_good.check(loss, params_too=True)
                if not healthy:
                    last_good.restore()
                    what = LastGood.problem(value)
                    yield ReconstructEvent(
                        "error", unit.name, k, len(units), step + 1, total,
                        loss=value, seconds=time.perf_counter() - start,
                        message=f"{what} in unit {unit.name} at iteration {it + 1}; stopped "
                        "with the last good state. Lower the learning rates.",
                        work=work_before[k], **plan,
                    )  # fmt: skip
                    return
                rec_value = float(rec.detach()) if beta is not None else value
                yield ReconstructEvent(
                    "step", unit.name, k, len(units), step + 1, total,
                    loss=rec_value, seconds=time.perf_counter() - start,
                    work=work_before[k] + unit_work[k] * (it + 1) / (cfg.iters + 1), **plan,
                )  # fmt: skip
        after = _eval_loss(unit, model, x_q, target, is_logits, batch)
        note = ""
        if groups and after > before:  # no better than its start: keep the start
            with torch.no_grad():
                for p, g in zip(params, start_state, strict=True):
                    p.copy_(g)
                for name, w in zip(rounders, start_weights, strict=True):
                    model.get_submodule(name).layer.weight.copy_(w)
            after, note = before, "no better than its start: kept the starting state"
        yield ReconstructEvent(
            "unit", unit.name, k, len(units), (k + 1) * cfg.iters, total,
            loss_before=before, loss_after=after, seconds=time.perf_counter() - start,
            message=note, work=work_before[k + 1], **plan,
        )  # fmt: skip
        if chained:
            x_q = _run_all(unit, model, x_q, batch)
            x_fp = target
    yield ReconstructEvent(
        "done", units[-1].name, len(units) - 1, len(units), total, total,
        seconds=time.perf_counter() - start,
        message="finished" + (f" ({note_kernels})" if note_kernels else ""),
        work=work_before[-1], **plan,
    )  # fmt: skip


@torch.no_grad()
def mse_weight_ranges_(model: nn.Module) -> None:
    """Set every enabled weight quantizer's scales by the MSE search (``init.mse_weight_init``)."""
    for layer in quant_layers(model).values():
        q = layer.weight_quant
        if q.enabled:
            init_weight_quantizer(q, layer.layer.weight, "mse")


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def unit_frame(events: list[ReconstructEvent]):
    """Each finished unit's output error before and after, as a DataFrame (for the chart)."""
    import pandas as pd

    rows = [
        {"unit": e.unit, "index": e.unit_index, "before": e.loss_before, "after": e.loss_after}
        for e in events
        if e.kind == "unit"
    ]
    return pd.DataFrame(rows, columns=["unit", "index", "before", "after"])
