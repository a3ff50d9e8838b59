"""Block-wise reconstruction on toy networks, and the units of real timm architectures."""

import copy
import dataclasses

import pytest
import timm
import torch
from helpers import ChainNet, SkipNet
from torch import nn

from lsq import LSQError, make_config, quantize_model
from lsq.calibrate import calibrate
from lsq.convert import quant_layers
from lsq.reconstruct import HEAD, ReconstructConfig, find_units, reconstruct, unit_frame
from lsq.train import optimizer_step, param_groups


def data(n=64, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def quantized(net, bits=3, seed=0):
    torch.manual_seed(seed)
    teacher = net().eval()
    model = copy.deepcopy(teacher)
    cfg = make_config("lsq+", bits, bits, first_last_bits=None)
    quantize_model(model, cfg)
    calibrate(model, data(32, seed=1).split(16), cfg)
    return teacher, model


FAST = ReconstructConfig(
    iters=60, batch_size=16, compile=False, lr_weights=3e-4, weight_init="keep"
)


def test_chain_units_cover_every_layer_once_and_rebuild_the_output():
    teacher, model = quantized(ChainNet)
    units = find_units(model, data(2))
    assert [u.name for u in units] == [
        "stem",
        "blocks.0.0",
        "blocks.0.1",
        "blocks.1.0",
        "head",
        "classifier",
    ]
    assert units[-1].paths == (HEAD,)
    layers = [n for u in units for n in u.layers]
    assert sorted(layers) == sorted(quant_layers(model)) and len(set(layers)) == len(layers)


def test_non_chain_model_falls_back_to_one_unit_per_layer():
    _, model = quantized(SkipNet)
    units = find_units(model, data(2))
    assert [u.paths for u in units] == [("a",), ("b",), ("fc",)]


@pytest.mark.parametrize("net", [ChainNet, SkipNet])
def test_each_unit_loss_falls_and_the_model_gets_closer(net):
    teacher, model = quantized(net, bits=2)
    x = data(64, seed=2)
    with torch.no_grad():
        kl_before = float(nn.functional.kl_div(model(x).log_softmax(-1),
                                               teacher(x).log_softmax(-1), log_target=True,
                                               reduction="batchmean"))  # fmt: skip
    events = list(reconstruct(model, teacher, x, FAST))
    assert events[-1].kind == "done"
    frame = unit_frame(events)
    assert len(frame) == len(find_units(model, x[:1]))
    assert (frame["after"] < frame["before"]).all(), frame
    with torch.no_grad():
        kl_after = float(nn.functional.kl_div(model(x).log_softmax(-1),
                                              teacher(x).log_softmax(-1), log_target=True,
                                              reduction="batchmean"))  # fmt: skip
    assert kl_after < kl_before


def test_a_unit_that_ends_worse_than_it_started_keeps_its_start():
    teacher, model = quantized(ChainNet)
    harmful = dataclasses.replace(FAST, iters=20, lr_act_quant=0.5, lr_weight_quant=0.5)
    before = copy.deepcopy(model.state_dict())
    events = list(reconstruct(model, teacher, data(32), harmful))
    kept = [e for e in events if e.kind == "unit" and e.message]
    assert kept, "the rates were meant to make some unit worse"
    for e in kept:
        assert e.loss_after == e.loss_before and "kept the starting state" in e.message
    units = {u.name: u for u in find_units(model, data(1))}
    after = model.state_dict()
    for e in kept:  # the unit's own parameters are back where they started
        own = [k for k in before if k.startswith(tuple(p + "." for p in units[e.unit].paths))]
        assert own and all(torch.equal(before[k], after[k]) for k in own), e.unit


def test_reconstruction_is_seeded():
    outs = []
    for _ in range(2):
        teacher, model = quantized(ChainNet)
        list(reconstruct(model, teacher, data(32), FAST))
        outs.append(model(data(4, seed=9)).detach())
    assert torch.equal(outs[0], outs[1])


def test_stop_mid_unit_leaves_a_usable_model():
    teacher, model = quantized(ChainNet)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > FAST.iters + 5  # inside the second unit

    events = list(reconstruct(model, teacher, data(32), FAST, should_stop=stop))
    assert events[-1].kind == "stopped" and events[-1].unit_index == 1
    assert sum(e.kind == "unit" for e in events) == 1
    out = model(data(4))
    assert torch.isfinite(out).all()


def test_nan_loss_stops_with_message_and_keeps_last_good_state():
    teacher, model = quantized(ChainNet)
    x = data(32)
    x[3, 0, 0, 0] = float("nan")  # reaches the stem's loss on the first batch that draws it
    before = copy.deepcopy(model.state_dict())
    events = list(reconstruct(model, teacher, x, FAST))
    assert events[-1].kind == "error" and "loss became nan" in events[-1].message
    steps = [e for e in events if e.kind == "step"]
    after = model.state_dict()
    if not steps:  # the very first batch drew it: nothing changed
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_teacher_must_be_the_quantized_models_float_twin():
    _, model = quantized(ChainNet)
    with pytest.raises(LSQError, match="float model has no module"):
        list(reconstruct(model, SkipNet(), data(8), FAST))


def test_bad_config_is_refused_in_words():
    with pytest.raises(LSQError, match="drop_prob"):
        ReconstructConfig(drop_prob=1.5)
    with pytest.raises(LSQError, match="iters"):
        ReconstructConfig(iters=0)
    with pytest.raises(LSQError, match="weight_init must be one of mse, keep"):
        ReconstructConfig(weight_init="3sigma")
    with pytest.raises(LSQError, match="rounding must be one of ste, learned"):
        ReconstructConfig(rounding="adaround")
    with pytest.raises(LSQError, match="round_warmup"):
        ReconstructConfig(round_warmup=2.0)


@pytest.mark.parametrize("choice", ["mse", "keep"])
def test_units_start_from_the_mse_weight_ranges_unless_asked_to_keep(choice):
    """With "mse" every weight scale is the MSE search's before the first step; "keep" keeps it."""
    from lsq.init import mse_weight_init

    teacher, model = quantized(ChainNet)
    layers = quant_layers(model)
    start = {n: ql.weight_quant.scale.detach().clone() for n, ql in layers.items()}
    mse = {
        n: mse_weight_init(ql.layer.weight.detach(), ql.weight_quant.qmin, ql.weight_quant.qmax,
                           ql.weight_quant.per_channel).scale
        for n, ql in layers.items()
    }  # fmt: skip
    assert not all(torch.allclose(start[n], mse[n].view_as(start[n])) for n in layers)
    cfg = dataclasses.replace(FAST, weight_init=choice)
    events = list(reconstruct(model, teacher, data(8), cfg, should_stop=lambda: True))
    assert events[-1].kind == "stopped"
    want = mse if choice == "mse" else start
    for n, ql in layers.items():
        assert torch.allclose(ql.weight_quant.scale.detach(), want[n].view_as(start[n])), n


def test_relative_step_moves_every_scale_by_the_same_fraction():
    """Adam's first step is lr * sign(grad); relative, it becomes lr * scale * sign(grad)."""
    from lsq.quantizers import Quantizer

    q = Quantizer(4, signed=True, per_channel=True, channels=3, role="weight")
    q.set_range(torch.tensor([5e-4, 1e-2, 5.0]))
    w = torch.randn(3, 16)
    groups = param_groups([q], 0.0, 1e-2, 0.0, relative=True)
    opt = torch.optim.Adam(groups)
    old = q.scale.detach().clone()
    q(w * old.view(-1, 1) * 3).sum().backward()
    optimizer_step(opt)
    ratio = (q.scale.detach() - old).abs() / old
    assert torch.allclose(ratio, torch.full((3,), 1e-2), rtol=1e-3)


LEARNED = dataclasses.replace(FAST, rounding="learned", lr_rounding=5e-2)


def test_learned_rounding_starts_at_the_float_weight_and_ends_on_floor_or_ceil():
    """AdaRound's h(V) starts at the weight's fraction (soft weight = clipped float weight);
    hard() rounds each weight to floor(w/s) or the level above, never further."""
    from lsq.reconstruct import LearnedRounding

    _, model = quantized(ChainNet, bits=3)
    for name, layer in quant_layers(model).items():
        q, w = layer.weight_quant, layer.layer.weight.detach()
        r = LearnedRounding(layer)
        s = q.broadcast(q.effective_scale().detach(), w.dim())
        lo, hi = q.qmin * s, q.qmax * s
        clipped = torch.maximum(torch.minimum(w, hi), lo)
        assert torch.allclose(r(), clipped, atol=2e-4 * float(s.max())), name
        with torch.no_grad():
            r.v.normal_(0, 3)  # any learned state
        codes = r.hard() / s
        assert torch.allclose(codes, codes.round(), atol=1e-4), name
        assert (codes >= q.qmin - 1e-4).all() and (codes <= q.qmax + 1e-4).all()
        floor = torch.floor(w / s).clamp(q.qmin, q.qmax)
        assert ((codes.round() - floor) >= 0).all() and ((codes.round() - floor) <= 1).all()
        up = (r.v >= 0) & (torch.floor(w / s) + 1 <= q.qmax) & (torch.floor(w / s) >= q.qmin)
        assert torch.equal(codes.round()[up], floor[up] + 1), name


def test_rounding_regulariser_and_its_annealed_exponent():
    """sum(1 - |2h - 1|^beta) is 0 when every h is 0 or 1; beta is None in the warm-up, then
    falls linearly from 20 to 2."""
    from lsq.reconstruct import LearnedRounding, round_beta

    _, model = quantized(ChainNet, bits=3)
    r = LearnedRounding(next(iter(quant_layers(model).values())))
    with torch.no_grad():
        r.v.copy_(torch.where(torch.rand_like(r.v) < 0.5, -20.0, 20.0))
    assert float(r.regulariser(2.0).detach()) == 0.0
    with torch.no_grad():
        r.v.fill_(0.0)  # sigmoid 0.5 -> h = 0.5
    assert float(r.regulariser(2.0).detach()) == pytest.approx(r.v.numel(), rel=1e-5)
    assert round_beta(0, 100, 0.2) is None and round_beta(19, 100, 0.2) is None
    assert round_beta(20, 100, 0.2) == pytest.approx(20.0)
    assert round_beta(60, 100, 0.2) == pytest.approx(11.0)
    assert round_beta(99, 100, 0.2) == pytest.approx(2.0 + 18.0 / 80)


def test_learned_rounding_repairs_each_unit_and_leaves_weights_on_the_grid():
    teacher, model = quantized(ChainNet, bits=2)
    layers = quant_layers(model)
    w0 = {n: ql.layer.weight.detach().clone() for n, ql in layers.items()}
    events = list(reconstruct(model, teacher, data(64, seed=2), LEARNED))
    assert events[-1].kind == "done"
    frame = unit_frame(events)
    assert (frame["after"] <= frame["before"]).all() and (frame["after"] < frame["before"]).any()
    units = {u.name: u for u in find_units(model, data(1))}
    kept = {n for e in events if e.kind == "unit" and e.message for n in units[e.unit].layers}
    moved = 0
    for n, ql in layers.items():
        q, w = ql.weight_quant, ql.layer.weight.detach()
        if n in kept:  # a unit that kept its start keeps its float weights
            assert torch.equal(w, w0[n]), n
            continue
        s = q.broadcast(q.effective_scale().detach(), w.dim())
        codes = w / s
        assert torch.allclose(codes, codes.round(), atol=1e-4), n  # a point of the grid
        floor = torch.floor(w0[n] / s).clamp(q.qmin, q.qmax)
        assert ((codes.round() - floor) >= 0).all() and ((codes.round() - floor) <= 1).all(), n
        nearest = (w0[n] / s).round().clamp(q.qmin, q.qmax)
        moved += int((codes.round() != nearest).sum())
        assert torch.equal(q(w), w)  # the quantizer reproduces the rounded weight
    assert moved > 0  # some weights learned to round the other way
    assert not any(m._forward_hooks for m in model.modules())


def test_learned_rounding_stopped_mid_unit_leaves_rounded_weights_and_no_hooks():
    teacher, model = quantized(ChainNet)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > LEARNED.iters + 5

    events = list(reconstruct(model, teacher, data(32), LEARNED, should_stop=stop))
    assert events[-1].kind == "stopped" and events[-1].unit_index == 1
    assert not any(m._forward_hooks for m in model.modules())
    stopped_in = find_units(model, data(1))[1]
    for name in stopped_in.layers:  # the rounding learned so far, on the grid
        ql = quant_layers(model)[name]
        q, w = ql.weight_quant, ql.layer.weight.detach()
        assert torch.equal(q(w), w), name
    assert torch.isfinite(model(data(4))).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch", ["efficientnet_b0", "mixnet_s", "tf_efficientnet_lite0", "resnet18"]
)
def test_units_of_timm_architectures_cover_every_quantized_layer_once(arch):
    model = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    quantize_model(model, make_config("lsq+", 4, 4))
    units = find_units(model, torch.randn(1, 3, 64, 64))
    assert units[-1].paths == (HEAD,) and units[0].name == "stem"
    assert len(units) > 5  # blocks, not one unit per layer and not one for everything
    layers = [n for u in units for n in u.layers]
    assert sorted(layers) == sorted(quant_layers(model)) and len(set(layers)) == len(layers)


@pytest.mark.parametrize("net, slow", [(ChainNet, "blocks.0.1"), (SkipNet, "b")])
def test_unit_costs_are_measured_per_unit(net, slow):
    """A unit made to take 30 ms longer (a sleep in its forward pass) costs the most, and the
    timing leaves no gradient behind."""
    import time

    from lsq.reconstruct import unit_costs

    _, model = quantized(net)
    x = data(4)
    units = find_units(model, x[:1])
    model.get_submodule(slow).register_forward_hook(lambda m, i, o: time.sleep(0.03))
    chained = units[-1].paths == (HEAD,)
    costs = unit_costs(model, units, x, chained)
    names = [u.name for u in units]
    assert len(costs) == len(units) and all(c > 0 for c in costs)
    assert costs[names.index(slow)] >= 0.03
    assert max(c for n, c in zip(names, costs, strict=True) if n != slow) < 0.03
    assert all(p.grad is None for p in model.parameters())


def test_progress_is_counted_in_each_units_cost(monkeypatch):
    """Work moves by each unit's cost per iteration (costs given here), ends at its total, and
    a QAT step is priced as an iteration of every unit."""
    import lsq.reconstruct as rec

    teacher, model = quantized(ChainNet)
    costs = [10.0, 1.0, 1.0, 2.0, 1.0, 1.0]
    monkeypatch.setattr(rec, "unit_costs", lambda *a: costs)
    cfg = dataclasses.replace(FAST, iters=4)
    events = list(reconstruct(model, teacher, data(32), cfg))
    per_unit = [c * (cfg.iters + 4 * 32 / 16 / 3) for c in costs]  # + 4 passes over the views
    assert events[-1].work == events[-1].work_total == pytest.approx(sum(per_unit))
    assert all(e.model_step == pytest.approx(sum(costs)) for e in events)
    ends = [e.work for e in events if e.kind == "unit"]
    assert ends == pytest.approx([sum(per_unit[: k + 1]) for k in range(len(costs))])
    steps = [e for e in events if e.kind == "step"]
    for a, b in zip(steps[:-1], steps[1:], strict=True):
        if a.unit_index == b.unit_index:  # one iteration: the unit's share of its work
            assert b.work - a.work == pytest.approx(per_unit[a.unit_index] / (cfg.iters + 1))
