"""The CUDA path, proven on a machine without a GPU.

PyTorch's ``FakeTensorMode`` makes fake CUDA tensors here: they carry a device, a shape and a dtype
but no data, so an operation that mixes a CPU tensor with a CUDA one raises
``FakeTensorDeviceMismatchError`` and one that reads a number back on the host (``.item()``,
``float(t)``, ``bool(t)``, ``.tolist()``) raises ``DataDependentOutputException``. What runs every
training step is held to "no host read" (the quantizer's forward and backward, a calibrated
model's forward and the step's loss, the optimizer's step with the scale projection and the
schedule, a reconstruction unit with QDrop's mix, a synthesis forward); what runs once, the MSE
weight search, to "no host read and no device mixing" too. Autograd's backward needs a real CUDA
context, so the backward kernels are called as functions and the optimizer gets its gradients
assigned. Modules are built outside the mode (a module made inside cannot be moved) and moved
with ``.to("cuda")`` inside it.

Where a path must read a number, it happens between steps, every ``record_every`` steps
(``lsq.train.LastGood.check``, ``quantizer_snapshot``, ``WeightFlips.update``): the last tests
check that on the CPU, with real numbers.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from lsq.calibrate import calibrate
from lsq.config import make_config
from lsq.convert import quant_layers, quantize_model
from lsq.init import mse_weight_init, mse_weight_scale
from lsq.quantizers import Quantizer, _FakeQuantize, fake_quantize
from lsq.reconstruct import _unit_loss, find_units, qdrop_mix
from lsq.synthetic import BNStatsLoss, total_variation
from lsq.train import (
    TrainConfig,
    apply_gradients,
    make_optimizer,
    param_groups,
    step_loss,
    train,
)

CUDA = torch.device("cuda", 0)


def fake_cuda() -> FakeTensorMode:
    """Inside: fake tensors, CUDA ones included; real tensors may come in (and become fake)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def small_model(method: str = "lsq+", w_bits: int = 4, a_bits: int = 4) -> torch.nn.Module:
    """timm's test_efficientnet (random weights), quantized and calibrated on the CPU."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    cfg = make_config(method, w_bits, a_bits, weight_init="mse")
    quantize_model(model, cfg)
    calibrate(model, [torch.randn(4, 3, 32, 32)], cfg)
    return model


# --- what runs once: the MSE weight search -----------------------------------------------------
def test_mse_weight_search_runs_on_the_weights_device():
    with fake_cuda():
        w = torch.randn(8, 4, 3, 3).to("cuda")
        scale = mse_weight_scale(w.flatten(1), -8, 7)
    assert scale.device == CUDA and scale.shape == (8,)


def test_mse_weight_search_gives_the_same_scales_as_before_on_the_cpu():
    """The grid built on the weight's device searches the same candidates: the least error of
    the 100 + 21 candidate scales, checked by brute force."""
    torch.manual_seed(1)
    w = torch.randn(6, 50)
    r = mse_weight_init(w, -8, 7, per_channel=True)
    for c in range(6):
        s_max = w[c].abs().max() / 7
        cand = torch.linspace(0.05, 1.0, 100) * s_max
        err = [((w[c] / s).clamp(-8, 7).round() * s - w[c]).pow(2).mean() for s in cand]
        s = r.scale[c]
        got = ((w[c] / s).clamp(-8, 7).round() * s - w[c]).pow(2).mean()
        assert float(got) <= float(min(err)) + 1e-12


# --- what runs every step ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("offset", [False, True])
def test_quantizer_forward_and_backward_kernels_on_cuda(dtype, per_channel, offset):
    with fake_cuda():
        x = torch.randn(4, 3, 5, 5, device="cuda").to(dtype).requires_grad_(True)
        shape = (4, 1, 1, 1) if per_channel else ()
        scale = torch.full(shape, 0.1, device="cuda", requires_grad=True)
        off = torch.full(shape, -0.2, device="cuda", requires_grad=True) if offset else None
        out = fake_quantize(x, scale, off, 0, 15, grad_scale=0.5)
        ctx = SimpleNamespace(
            saved_tensors=(x, scale, off),
            args=(0, 15, 0.5, "eager"),
            needs_input_grad=(True, True, offset),
        )
        grads = _FakeQuantize.backward(ctx, torch.ones_like(out))
    assert out.device == CUDA and out.dtype == dtype
    assert grads[0].device == CUDA and grads[0].dtype == dtype
    assert grads[1].device == CUDA and grads[1].shape == scale.shape
    assert grads[1].dtype == torch.float32
    if offset:
        assert grads[2].device == CUDA and grads[2].shape == off.shape
    else:
        assert grads[2] is None


def test_bf16_inputs_are_quantized_in_float32():
    """At 8 bits, codes from 128 up have no fraction left in bf16 (8 mantissa bits), so
    round(v) - v, LSQ's scale gradient, would be 0 there. The quantizer computes in float32:
    a bf16 input gives exactly the float32 result of the same values, forward and backward.
    One scale per element, so each element's gradient is its own round(v) - v."""
    s = 0.01
    x16 = torch.linspace(1.3, 2.5, 257).bfloat16()  # codes 130..250 at s = 0.01
    x32 = x16.float()  # the same values, in float32
    got = {}
    for name, x in (("bf16", x16), ("fp32", x32)):
        scale = torch.full((257,), s, requires_grad=True)
        offset = torch.zeros(257, requires_grad=True)
        out = fake_quantize(x, scale, offset, 0, 255)
        assert out.dtype == x.dtype
        out.float().sum().backward()
        got[name] = (out.float(), scale.grad, offset.grad)
    # forward: the float32 result, rounded once to bf16 at the end
    assert torch.equal(got["bf16"][0], got["fp32"][0].bfloat16().float())
    # LSQ's scale gradient inside the grid (LSQ's equation 3): round(v) - v, v = (x - b) / s
    v = x32 / torch.tensor(s)
    want = v.round() - v
    assert (want.abs() > 0.05).float().mean() > 0.5  # fractions a bf16 computation would lose
    assert torch.allclose(got["bf16"][1], want, atol=1e-5)
    assert torch.equal(got["bf16"][1], got["fp32"][1])
    assert torch.equal(got["bf16"][2], torch.zeros(257))  # the offset: 0 inside the grid


@pytest.mark.parametrize("method", ["lsq+", "lsq"])
def test_calibrated_model_forward_on_cuda_reads_nothing_on_the_host(method):
    """The quantizers' flags (initialised, signed grid) and LSQ's gradient scale are Python
    values: a forward in train and eval mode, in bf16 autocast and without, reads nothing."""
    model = small_model(method)
    with fake_cuda():
        model.to("cuda")
        x = torch.randn(2, 3, 32, 32, device="cuda")
        for mode in (False, True):
            model.train(mode)
            for bf16 in (False, True):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    out = model(x)
                assert out.device == CUDA and out.shape == (2, 10)


@pytest.mark.parametrize("loss", ["kd", "ce"])
def test_a_qat_steps_loss_on_cuda_reads_nothing_on_the_host(loss):
    model = small_model()
    with fake_cuda():
        model.to("cuda")
        x = torch.randn(2, 3, 32, 32, device="cuda")
        if loss == "kd":
            target = torch.randn(2, 10, device="cuda")
        else:
            target = torch.tensor([1, 2]).cuda()
        value = step_loss(model, x, target, loss, bf16=True)
    assert value.device == CUDA and value.dim() == 0


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_optimizer_step_with_projection_and_schedule_on_cuda(optimizer):
    """LSQ+'s relative quantizer steps (a reference scale per parameter), Adam or SGD, the
    scale floor and the cosine schedule, with gradients assigned (no autograd here)."""
    model = small_model()
    with fake_cuda():
        model.to("cuda")
        groups = param_groups([model], 1e-5, 1e-2, 1e-2, relative=True, relative_weights=True)
        opt = make_optimizer(groups, optimizer)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        for g in groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        apply_gradients(opt, model, sched)
        apply_gradients(opt, model, sched)
    scales = [m.scale for m in model.modules() if isinstance(m, Quantizer)]
    assert scales and all(s.device == CUDA for s in scales)


def test_reconstruction_unit_with_qdrop_on_cuda_reads_nothing():
    model = small_model()
    units = find_units(model, torch.randn(1, 3, 32, 32))  # found once, on the CPU
    with fake_cuda():
        model.to("cuda")
        x = torch.randn(4, 3, 32, 32, device="cuda")
        xq = units[0].run(model, x)
        mixed = qdrop_mix(xq, xq + 0.01, 0.5)
        assert mixed.device == CUDA and mixed.shape == xq.shape
        out = units[1].run(model, mixed)  # a block: its input comes from the unit before
        loss = _unit_loss(out, out.detach() + 1, is_logits=False)
    assert loss.device == CUDA


def test_synthesis_forward_on_cuda_reads_nothing():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    bn = BNStatsLoss(model)
    try:
        with fake_cuda():
            model.to("cuda")
            x = torch.randn(2, 3, 32, 32, device="cuda", requires_grad=True)
            logits = model(x)
            target = torch.tensor([0, 1]).cuda()
            loss = bn.loss() + torch.nn.functional.cross_entropy(logits, target)
            loss = loss + 200 * total_variation(x)
        assert loss.device == CUDA
    finally:
        bn.close()


# --- where numbers are read: every record_every steps (CPU, real numbers) -------------------------
def _train(model, cfg, n_views=8):
    torch.manual_seed(0)
    views = torch.randn(n_views, 3, 32, 32)
    teacher = timm.create_model("test_efficientnet", pretrained=False, num_classes=10).eval()
    teacher.load_state_dict(
        {k: v for k, v in model.state_dict().items() if k in teacher.state_dict()}, strict=False
    )
    return list(train(model, teacher, views, views[:4], cfg))


def test_numbers_are_read_every_record_every_steps():
    cfg = TrainConfig(steps=10, batch_size=4, record_every=3, eval_every=10, compile=False)
    events = _train(small_model(), cfg)
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == [3, 6, 9, 10]  # record points and the last step
    assert all(math.isfinite(e.loss) and e.quantizers and e.flips for e in steps)
    assert steps[-1].agreement is not None and events[-1].kind == "done"


def test_a_nan_between_record_points_restores_the_last_good_state():
    """The loss is read every 4 steps only: a NaN at step 6 is seen at step 8, and the model goes
    back to the state checked good at step 4 (held just before that step, whose loss was
    finite)."""
    model = small_model()
    layer = next(iter(quant_layers(model).values()))
    calls = {"n": 0}
    original = layer.forward

    def forward(x):
        calls["n"] += 1
        out = original(x)
        if calls["n"] == 7:  # eval at step 0 is call 1; step k is call k + 1
            return out * float("nan")
        return out

    layer.forward = forward
    cfg = TrainConfig(steps=12, batch_size=4, record_every=4, eval_every=100, compile=False)

    from lsq import train as train_module

    held = {}
    real_hold = train_module.LastGood.hold

    def hold(self):
        real_hold(self)
        held[calls["n"]] = [h.clone() for h in self.held]

    train_module.LastGood.hold = hold
    try:
        events = _train(model, cfg)
    finally:
        train_module.LastGood.hold = real_hold
    assert events[-1].kind == "error" and events[-1].step == 8
    assert "loss became nan" in events[-1].message
    good = held[4]  # held before step 4 (its forward is call 5, after the hold)
    params = [p for g in param_groups([model], 1, 1, 1) for p in g["params"]]
    assert len(params) == len(good)
    assert all(torch.equal(p.detach(), h) for p, h in zip(params, good, strict=True))
