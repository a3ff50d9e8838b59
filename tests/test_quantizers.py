"""fake_quantize and Quantizer against the paper's formulas (LSQ eq. 3, LSQ+ eq. 4-6)."""

import math

import pytest
import torch

from lsq.errors import LSQError
from lsq.quantizers import SCALE_FLOOR, Quantizer, fake_quantize, int_range, project_scales_


def round_ste(z):
    return z + (torch.round(z) - z).detach()


def reference(x, s, b, n, p):
    """The autograd reference of LSQPLUS.md: round_ste(clamp(v, n, p)) * s + beta, n/p numbers."""
    v = (x - b) / s if b is not None else x / s
    out = round_ste(torch.clamp(v, n, p)) * s
    return out + b if b is not None else out


def grads(fn, x, s, b, gout):
    x, s = x.clone().requires_grad_(True), s.clone().requires_grad_(True)
    b = None if b is None else b.clone().requires_grad_(True)
    y = fn(x, s, b)
    y.backward(gout)
    return y.detach(), x.grad, s.grad, (None if b is None else b.grad)


def bound_points(s, b, n, p):
    """Values below, exactly on, inside and above both bounds (exact in binary floating point)."""
    return torch.tensor(
        [b + (n - 3) * s, b + (n - 0.25) * s, b + n * s, b + (n + 0.25) * s, b + (n + 1.5) * s]
        + [b + (p - 1.5) * s, b + (p - 0.25) * s, b + p * s, b + (p + 0.25) * s, b + (p + 7) * s]
    )


KERNELS = ["eager", pytest.param("compiled", marks=pytest.mark.compiled)]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_values_and_gradients_match_reference_at_and_around_bounds(bits, signed, kernels):
    n, p = int_range(bits, signed)
    s, b = torch.tensor(0.5), torch.tensor(0.25)
    x = bound_points(0.5, 0.25, n, p)
    gout = torch.linspace(0.5, 1.5, x.numel())
    ours = grads(lambda x, s, b: fake_quantize(x, s, b, n, p, kernels=kernels), x, s, b, gout)
    ref = grads(lambda x, s, b: reference(x, s, b, n, p), x, s, b, gout)
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_bound_semantics_explicitly():
    """On a bound counts as clipped: dx = 0, ds = the bound, dbeta = 1."""
    n, p = 0, 15
    x = torch.tensor([-1.0, 0.0, 0.3, 7.5, 15.0, 16.0], requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    b = torch.tensor(0.0, requires_grad=True)
    y = fake_quantize(x, s, b, n, p)
    y.backward(torch.ones_like(y))
    assert y.tolist() == [0.0, 0.0, 0.0, 8.0, 15.0, 15.0]
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    # ds per element: n=0, n=0 (on the bound), round(.3)-.3, round(7.5)-7.5, p=15, p=15
    assert s.grad.item() == pytest.approx(0 + 0 - 0.3 + 0.5 + 15 + 15)
    assert b.grad.item() == 4.0
    # The reference (clamp with number bounds) agrees on this torch; if an upgrade moves clamp's
    # gradient at the bounds, this fails here rather than silently changing the other tests.
    xr = x.detach().clone().requires_grad_(True)
    reference(xr, torch.tensor(1.0), torch.tensor(0.0), n, p).sum().backward()
    assert xr.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("seed", range(6))
def test_random_shapes_per_tensor_and_per_channel_with_grad_scale(seed, kernels):
    gen = torch.Generator().manual_seed(seed)
    ndim = 1 + seed % 4
    shape = [int(torch.randint(1, 7, (1,), generator=gen)) for _ in range(ndim)]
    x = torch.randn(shape, generator=gen) * 3
    gout = torch.randn(shape, generator=gen)
    n, p = int_range(2 + seed % 7, seed % 2 == 0)
    g = 1 / math.sqrt(x.numel() * p)
    per_channel = seed % 3 != 0
    if per_channel:
        view = (-1,) + (1,) * (ndim - 1)
        s = (torch.rand(shape[0], generator=gen) + 0.1).reshape(view)
        b = torch.randn(shape[0], generator=gen).reshape(view) * 0.5
    else:
        s, b = torch.rand((), generator=gen) + 0.1, torch.randn((), generator=gen)
    # Put some values exactly on the bounds.
    flat = x.view(-1)
    flat[0] = (b.reshape(-1)[0] + n * s.reshape(-1)[0]).item()
    flat[-1] = (b.reshape(-1)[-1] + p * s.reshape(-1)[-1]).item()
    for offset in (b, None):
        y, gx, gs, gb = grads(
            lambda x, s, b: fake_quantize(x, s, b, n, p, g, kernels), x, s, offset, gout
        )
        ry, rgx, rgs, rgb = grads(lambda x, s, b: reference(x, s, b, n, p), x, s, offset, gout)
        torch.testing.assert_close(y, ry)
        torch.testing.assert_close(gx, rgx)
        torch.testing.assert_close(gs, rgs * g)
        if offset is not None:
            torch.testing.assert_close(gb, rgb * g)
        assert gs.shape == s.shape


@pytest.mark.parametrize("kernels", KERNELS)
def test_forward_is_bit_identical_with_and_without_grad(kernels):
    q = Quantizer(4, signed=False, asymmetric=True)
    q.kernels = kernels
    q.set_range(torch.tensor(0.1234567), torch.tensor(-0.3333))
    s, b = q.scale.detach(), q.offset.detach()
    # Values that sit exactly on rounding boundaries are the ones an ulp in s would flip.
    k = torch.arange(0, 15, dtype=torch.float32) + 0.5
    x = torch.cat([k * s + b, torch.randn(10_000) * 2])
    with torch.no_grad():
        y0 = q(x)
    y1 = q(x.clone().requires_grad_(True))
    assert torch.equal(y0, y1.detach())


def test_scale_stays_positive_after_an_optimizer_step_pushes_it_below_zero():
    q = Quantizer(4, signed=True, per_channel=True, channels=3, role="weight")
    q.set_range(torch.tensor([0.01, 0.02, 0.03]))
    opt = torch.optim.SGD(q.parameters(), lr=1.0)
    x = torch.randn(3, 8) * 10
    q(x).pow(2).sum().mul(-1).backward()  # a loss that wants larger |x_hat|
    q.scale.grad = torch.full_like(q.scale, 5.0)  # and a step that drives every scale negative
    opt.step()
    assert (q.scale < 0).all()
    assert (q.effective_scale() >= SCALE_FLOOR).all()
    assert torch.isfinite(q(x)).all()
    project_scales_(q)
    assert (q.scale > 0).all()


def test_grad_scale_counts_elements_per_channel_and_per_sample():
    w = Quantizer(4, signed=True, per_channel=True, channels=8, role="weight")
    assert w.grad_scale_for(torch.zeros(8, 3, 3, 3)) == pytest.approx(1 / math.sqrt(27 * 7))
    wt = Quantizer(4, signed=True, role="weight")
    assert wt.grad_scale_for(torch.zeros(8, 3, 3, 3)) == pytest.approx(1 / math.sqrt(216 * 7))
    a = Quantizer(4, signed=False, asymmetric=True)
    # Per sample: the same g for batch 2 and batch 32.
    assert a.grad_scale_for(torch.zeros(2, 16, 5, 5)) == pytest.approx(1 / math.sqrt(400 * 15))
    assert a.grad_scale_for(torch.zeros(32, 16, 5, 5)) == a.grad_scale_for(torch.zeros(2, 16, 5, 5))
    assert Quantizer(4, signed=False, grad_scaling=False).grad_scale_for(torch.zeros(2, 3)) == 1.0


def test_module_applies_grad_scale_to_scale_and_offset_gradients():
    a = Quantizer(3, signed=False, asymmetric=True)
    a.set_range(torch.tensor(0.3), torch.tensor(-0.2))
    x = torch.randn(4, 2, 3, 3) * 2
    a(x).sum().backward()
    g = 1 / math.sqrt(18 * 7)
    s, b = torch.tensor(0.3, requires_grad=True), torch.tensor(-0.2, requires_grad=True)
    reference(x, s, b, 0, 7).sum().backward()
    torch.testing.assert_close(a.scale.grad, s.grad * g)
    torch.testing.assert_close(a.offset.grad, b.grad * g)


def test_quantizer_range_bits_switch_and_errors():
    q = Quantizer(3, signed=False, asymmetric=True)
    with pytest.raises(LSQError, match="before initialisation"):
        q(torch.randn(4))
    q.set_range(torch.tensor(0.5), torch.tensor(-1.0))
    lo, hi = q.clip_range()
    assert (float(lo), float(hi)) == (-1.0, -1.0 + 7 * 0.5)
    assert (q.bits, q.qmin, q.qmax) == (3, 0, 7)
    q.enabled = False
    x = torch.randn(5)
    assert q(x) is x
    with pytest.raises(LSQError):
        Quantizer(9, signed=True)
    with pytest.raises(LSQError):
        Quantizer(1, signed=True)
    with pytest.raises(LSQError):
        Quantizer(4, signed=True, asymmetric=True)
    with pytest.raises(LSQError):
        fake_quantize(x, torch.tensor(1.0), None, 3, 3)


def test_frozen_quantizer_has_no_trainable_parameters_and_state_round_trips():
    q = Quantizer(4, signed=False, asymmetric=True, learnable=False)
    assert not any(p.requires_grad for p in q.parameters())
    q.set_range(torch.tensor(0.2), torch.tensor(0.1))
    q2 = Quantizer(4, signed=True, asymmetric=False)
    q2.signed = False
    q3 = Quantizer(4, signed=True)
    q3.load_state_dict(q2.state_dict())
    assert q3.signed is False and not bool(q3.initialized)


@pytest.mark.compiled
@pytest.mark.parametrize("per_channel", [False, True])
def test_compiled_and_eager_kernels_give_bit_identical_values_and_gradients(per_channel):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 9, 9, generator=gen) * 3
    g = torch.randn(x.shape, generator=gen)
    if per_channel:
        s, b, n, p = torch.rand(16, 1, 1, 1, generator=gen) + 0.05, None, -8, 7
    else:
        s, b, n, p = torch.tensor(0.07), torch.tensor(-0.4), 0, 15
    out = {}
    for kernels in ("eager", "compiled"):
        out[kernels] = grads(
            lambda x, s, b, k=kernels: fake_quantize(x, s, b, n, p, 0.1, k), x, s, b, g
        )
    for a, c in zip(out["eager"], out["compiled"], strict=True):
        if a is None:
            assert c is None
        elif a.dim() == 0 or a.shape == s.shape:  # reductions: summation order may differ
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(a, c)


def test_unknown_kernels_are_refused():
    with pytest.raises(LSQError, match="kernels"):
        fake_quantize(torch.zeros(3), torch.tensor(1.0), None, 0, 3, kernels="fast")


def test_a_failed_compile_probe_falls_back_to_eager_and_says_why(monkeypatch):
    """The probe runs once per device type; when it failed there, set_kernels uses eager kernels
    and the run's note names the device and the reason (QAT's first event, reconstruction's
    last, torchrun's report all use fallback_note)."""
    from lsq import quantizers

    monkeypatch.setitem(quantizers._probed, "cpu", "no C++ compiler")
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.q = Quantizer(4, signed=False)
    used = quantizers.set_kernels(model, "compiled")
    assert used == "eager" and model.q.kernels == "eager"
    note = quantizers.fallback_note("compiled", used, "cpu")
    assert note == "torch.compile unavailable on cpu (no C++ compiler): eager kernels"
    assert quantizers.fallback_note("eager", "eager", "cpu") == ""
