"""Initializers against hand-computed values, and the MSE search against brute force."""

import math

import pytest
import torch

from lsq.init import (
    init_activation_quantizer,
    init_weight_quantizer,
    lsq_init,
    lsq_plus_weight_init,
    maxabs_init,
    minmax_init,
    mse_init,
    mse_weight_init,
    quant_mse,
    refine_init,
)
from lsq.quantizers import SCALE_FLOOR, Quantizer, fake_quantize, int_range


def test_lsq_init_hand_computed():
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    r = lsq_init(x, 0, 15)
    assert float(r.scale) == pytest.approx(2 * 2.5 / math.sqrt(15))
    w = torch.tensor([[1.0, -1.0], [4.0, 0.0]])
    r = lsq_init(w, -8, 7, per_channel=True)
    torch.testing.assert_close(r.scale, torch.tensor([2 * 1.0, 2 * 2.0]) / math.sqrt(7))


def test_lsq_plus_weight_init_three_sigma_hand_computed():
    w = torch.tensor([[1.0, 2.0, 3.0, 6.0], [-1.0, -1.0, -1.0, -1.0]])
    r = lsq_plus_weight_init(w, bits=4, per_channel=True)
    mu, sd = 3.0, math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + 3**2) / 4)
    expect0 = max(abs(mu - 3 * sd), abs(mu + 3 * sd)) / 8  # 2^(b-1), the paper's divisor
    expect1 = 1.0 / 8  # sd = 0: |mu| / 2^(b-1)
    torch.testing.assert_close(r.scale, torch.tensor([expect0, expect1]))
    per_tensor = lsq_plus_weight_init(w, bits=2, per_channel=False)
    flat = w.reshape(-1)
    mu, sd = flat.mean(), flat.std(correction=0)
    expect = max(abs(mu - 3 * sd), abs(mu + 3 * sd)) / 2
    assert float(per_tensor.scale) == pytest.approx(float(expect))


def test_dead_channel_gets_the_floor_not_a_division_by_zero():
    w = torch.zeros(3, 4)
    w[0] = torch.tensor([1.0, -1.0, 0.5, 0.0])
    for r in (lsq_plus_weight_init(w, 4), lsq_init(w, -8, 7, True), maxabs_init(w, -8, 7)):
        assert float(r.scale[1]) == pytest.approx(SCALE_FLOOR) and math.isfinite(r.mse)
    r = mse_weight_init(w, -8, 7)
    assert torch.isfinite(r.scale).all() and math.isfinite(r.mse)


def test_minmax_init_hand_computed():
    x = torch.tensor([-1.0, 0.0, 2.0, 3.0])
    r = minmax_init(x, 0, 3, asymmetric=True)  # 2 bits unsigned grid
    assert float(r.scale) == pytest.approx(4 / 3)
    assert float(r.offset) == pytest.approx(-1.0)
    lo, hi = float(r.offset), float(r.offset + 3 * r.scale)
    assert (lo, hi) == pytest.approx((-1.0, 3.0))
    s = minmax_init(x, -2, 1, asymmetric=False)  # signed: max(3/1, -1/-2)
    assert float(s.scale) == pytest.approx(3.0) and s.offset is None
    u = minmax_init(x, 0, 3, asymmetric=False)
    assert float(u.scale) == pytest.approx(1.0)


def test_maxabs_clips_nothing_hand_computed():
    # Channel 0: the largest magnitude is negative, -2.54 -> -2.54 / 127 = 0.02.
    w = torch.tensor([[0.5, -2.54, 1.0], [0.127, 0.0, -0.1]])
    r = maxabs_init(w, -128, 127)
    torch.testing.assert_close(r.scale, torch.tensor([0.02, 0.001]))
    # The largest magnitude of each channel sits exactly on the grid's edge: nothing is clipped.
    q = fake_quantize(w, r.scale[:, None], None, -128, 127)
    assert float(q[0, 1]) == pytest.approx(-2.54) and float(q[1, 0]) == pytest.approx(0.127)
    assert float(maxabs_init(w, -8, 7, per_channel=False).scale) == pytest.approx(2.54 / 7)


def brute_force_asymmetric(x, qmin, qmax, n=120):
    """Exact MSE over a fine (lo, hi) grid, then a finer grid around the best cell."""
    lo0, hi0 = float(x.min()), float(x.max())
    levels = qmax - qmin

    def search(los, his):
        lo_g, hi_g = torch.meshgrid(los, his, indexing="ij")
        lo_g, hi_g = lo_g.reshape(-1), hi_g.reshape(-1)
        ok = hi_g > lo_g
        lo_g, hi_g = lo_g[ok], hi_g[ok]
        s = (hi_g - lo_g) / levels
        b = lo_g - qmin * s
        best = (math.inf, None)
        for i in range(0, s.numel(), 256):
            sk, bk = s[i : i + 256, None], b[i : i + 256, None]
            q = ((x[None] - bk) / sk).clamp(qmin, qmax).round() * sk + bk
            err = (q - x[None]).pow(2).mean(1)
            j = int(err.argmin())
            if float(err[j]) < best[0]:
                best = (float(err[j]), (float(lo_g[i + j]), float(hi_g[i + j])))
        return best

    span = hi0 - lo0
    err, (lo, hi) = search(
        torch.linspace(lo0, lo0 + 0.6 * span, n), torch.linspace(lo0 + 0.05 * span, hi0, n)
    )
    d = span / n
    err2, _ = search(torch.linspace(lo - d, lo + d, 41), torch.linspace(hi - d, hi + d, 41))
    return min(err, err2)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_init_beats_minmax_and_matches_brute_force_on_skewed_data(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.nn.functional.silu(torch.randn(6000, generator=gen) * 2)
    qmin, qmax = int_range(bits, signed=False)
    mse = mse_init(x, qmin, qmax, asymmetric=True)
    mm = minmax_init(x, qmin, qmax, asymmetric=True)
    assert mse.mse < mm.mse
    # The MSE it reports is the MSE its (scale, offset) reach on x.
    assert mse.mse == pytest.approx(
        float(quant_mse(x, mse.scale, mse.offset, qmin, qmax)), rel=1e-5
    )
    brute = brute_force_asymmetric(x, qmin, qmax)
    assert mse.mse <= brute * 1.01


@pytest.mark.parametrize("bits", [2, 4])
def test_symmetric_mse_init_matches_brute_force(bits):
    gen = torch.Generator().manual_seed(10 + bits)
    x = torch.randn(5000, generator=gen) ** 3  # heavy tails: the optimum clips
    qmin, qmax = int_range(bits, signed=True)
    r = mse_init(x, qmin, qmax, asymmetric=False)
    assert r.offset is None
    s_max = max(float(x.max()) / qmax, float(x.min()) / qmin)
    scales = torch.linspace(s_max / 2000, s_max, 4000)
    errs = torch.stack([quant_mse(x, s, None, qmin, qmax) for s in scales])
    assert r.mse <= float(errs.min()) * 1.01
    assert r.mse < float(quant_mse(x, torch.tensor(s_max), None, qmin, qmax))


@pytest.mark.parametrize("bits", [3, 4])
def test_gradient_refinement_reaches_the_search_optimum_from_minmax(bits):
    """The paper's variant (gradient descent on the MSE) from the min/max grid, which clips
    nothing and is far from the optimum, gets most of the way to what the search finds."""
    gen = torch.Generator().manual_seed(3)
    x = torch.nn.functional.silu(torch.randn(4000, generator=gen) * 2)
    qmin, qmax = int_range(bits, signed=False)
    start = minmax_init(x, qmin, qmax, asymmetric=True)
    refined = refine_init(x, start, qmin, qmax, steps=50)
    searched = mse_init(x, qmin, qmax, asymmetric=True)
    assert refined.mse < 0.8 * start.mse
    assert refined.mse < 1.15 * searched.mse
    assert float(refined.scale) < float(start.scale)  # the optimum clips the long right tail
    assert refined.mse == pytest.approx(
        float(quant_mse(x, refined.scale, refined.offset, qmin, qmax)), rel=1e-5
    )


def test_mse_init_with_refinement_reports_its_own_mse_and_respects_sample_bounds():
    x = torch.nn.functional.silu(torch.randn(4000, generator=torch.Generator().manual_seed(3)))
    refined = mse_init(x, 0, 7, asymmetric=True, refine_steps=20)
    assert refined.mse == pytest.approx(
        float(quant_mse(x, refined.scale, refined.offset, 0, 7)), rel=1e-5
    )
    # A true maximum far outside the sample widens the search (the sample missed the outlier).
    wide = mse_init(x, 0, 255, asymmetric=True, lo=-0.3, hi=50.0)
    assert math.isfinite(wide.mse)


def test_constant_input_is_handled():
    x = torch.full((100,), 2.5)
    r = mse_init(x, 0, 15, asymmetric=True)
    assert math.isfinite(r.mse) and r.mse < 1e-6


def test_mse_weight_init_per_channel_beats_maxabs_at_low_bits():
    w = torch.randn(8, 200, generator=torch.Generator().manual_seed(0)) ** 3
    r = mse_weight_init(w, -2, 1)
    m = maxabs_init(w, -2, 1)
    assert r.mse < m.mse
    assert r.scale.shape == (8,)


def test_quantizer_level_dispatch_sets_range():
    q = Quantizer(4, signed=True, per_channel=True, channels=4, role="weight")
    w = torch.randn(4, 3, 3, 3)
    r = init_weight_quantizer(q, w, "3sigma")
    torch.testing.assert_close(q.scale.detach(), r.scale)
    a = Quantizer(4, signed=False, asymmetric=True)
    sample = torch.randn(1000)
    r = init_activation_quantizer(a, sample, "minmax", lo=-5.0, hi=5.0)
    lo, hi = a.clip_range()
    assert (float(lo), float(hi)) == pytest.approx((-5.0, 5.0))
    assert bool(a.initialized)
