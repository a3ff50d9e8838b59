"""lsq.lab: clipping vs rounding error, the range lab's model-level numbers, the intro picture."""

import copy
import math

import pytest
import torch
from helpers import ChainNet, Plain
from torch import nn

from lsq import LSQError, make_config, quantize_model
from lsq.calibrate import calibrate
from lsq.convert import float_mode, quant_layers
from lsq.lab import (
    LabSetting,
    RangeLab,
    error_split,
    intro_grids,
    setting_from_state,
    setting_of,
    snap,
    swish_sample,
)
from lsq.metrics import distillation_loss


@pytest.mark.parametrize("seed", range(5))
def test_clip_plus_round_is_the_total_mse(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(20_000, generator=g) * 3 + 1
    scale = float(torch.rand((), generator=g)) * 0.5 + 0.05
    offset = float(torch.randn((), generator=g))
    for qmin, qmax, off in ((0, 15, offset), (-8, 7, None), (0, 3, None)):
        s = error_split(x, scale, off, qmin, qmax)
        direct = float(
            (torch.clamp(((x - (off or 0)) / scale), qmin, qmax).round() * scale + (off or 0) - x)
            .double()
            .pow(2)
            .mean()
        )
        assert s.clip + s.round == pytest.approx(s.total, rel=1e-12)
        assert s.total == pytest.approx(direct, rel=1e-5)
        assert s.clip > 0 and s.round > 0


def test_split_against_hand_values():
    # s = 1, grid [0, 2]: -1 -> 0 (clipped, error 1), 0.5 -> 0 (rounded, 0.25), 3 -> 2 (clipped, 1)
    s = error_split(torch.tensor([-1.0, 0.5, 3.0]), 1.0, None, 0, 2)
    assert s.clip == pytest.approx(2 / 3) and s.round == pytest.approx(0.25 / 3)
    assert s.clipped == pytest.approx(2 / 3)
    # -1 is a whole step below (not within half a step); 3 is a whole step above.
    assert s.clip_summary() == pytest.approx(
        {"below": 1 / 3, "above": 1 / 3, "below_near": 0.0, "above_near": 0.0}
    )


def test_the_lab_caption_and_chart_say_the_same_share_outside_the_range():
    """A ReLU6 input: 30 % exact zeros, under a range that starts a hair above 0 (LSQ+'s offset
    after init). The chart's histogram spreads the zeros over its first bin, so it used to say
    a share below the range far under the true one while the caption (exact) said 30 %; both now
    write the exact shares, and the zeros are said to lie within half a step (rounded onto the
    end level)."""
    from lsq.lab import values_histogram
    from lsq.plots import Grid, clip_text, lab_figure

    torch.manual_seed(0)
    x = torch.cat([torch.zeros(3000), torch.rand(6600) * 6, torch.full((400,), 6.0)])
    setting = LabSetting.from_range(4, "asymmetric", 0.008717, 5.937)
    split = setting.split(x)
    assert split.below == pytest.approx(0.3, abs=0.002)
    assert split.above == pytest.approx(((x > 5.937).sum() / len(x)).item())
    assert split.below_near == split.below  # the zeros: within half a step of the bound
    outside = split.clip_summary()
    levels = [setting.lo + k * setting.scale for k in range(16)]
    grid = Grid(levels=levels, lo=setting.lo, hi=setting.hi)
    hist = values_histogram(x, 200)
    head = lab_figure(hist, grid, (0.0, 6.0), "lsq+", outside).layout.annotations[0].text
    assert clip_text(outside).split(": ", 1)[1].split("; ")[0] in head.replace("<br>", " ")
    assert f"below {split.below:.1%}, all within half a step" in head
    estimated = lab_figure(hist, grid, (0.0, 6.0), "lsq+").layout.annotations[0].text
    assert f"below {split.below:.1%}" not in estimated  # what the histogram alone said


def test_no_clipping_error_when_the_range_covers_the_data():
    x = swish_sample(10_000)
    lo, hi = float(x.min()), float(x.max())
    for grid in ("asymmetric", "signed"):
        covering = LabSetting.from_range(4, grid, lo - 1e-6, max(hi, -lo) + 1e-6)
        split = covering.split(x)
        assert split.clip == 0 and split.clipped == 0 and split.round > 0
    # Unsigned cannot cover Swish's negatives: those are clipped.
    assert snap(x.float(), "minmax", 4, "unsigned").split(x).clip > 0


def test_setting_from_range_and_back():
    s = LabSetting.from_range(4, "asymmetric", -0.3, 2.7)
    assert (s.lo, s.hi) == pytest.approx((-0.3, 2.7)) and len(s.levels) == 16
    signed = LabSetting.from_range(3, "signed", -123.0, 3.0)  # lo follows from the grid
    assert signed.hi == pytest.approx(3.0) and signed.lo == pytest.approx(-4 * 3.0 / 3)
    back = setting_of(s.quantizer())  # float32 parameters
    assert (back.bits, back.grid) == (4, "asymmetric")
    assert (back.scale, back.offset) == pytest.approx((s.scale, s.offset), rel=1e-6)
    with pytest.raises(LSQError, match="above its low end"):
        LabSetting.from_range(4, "asymmetric", 1.0, 1.0)
    with pytest.raises(LSQError, match="grid must be"):
        LabSetting(4, "float", 1.0)


def test_intro_lsq_plus_beats_both_lsq_grids_at_every_bit_width():
    x = swish_sample(20_000)
    for bits in (2, 3, 4, 8):
        grids = {g.name: g for g in intro_grids(bits, x)}
        assert list(grids) == ["lsq", "lsq-signed", "lsq+"]
        plus = grids["lsq+"].split.total
        assert plus <= grids["lsq"].split.total and plus <= grids["lsq-signed"].split.total
        assert grids["lsq"].split.clip > 0  # the unsigned grid clips the negatives
        for g in grids.values():
            assert g.split.clip + g.split.round == pytest.approx(g.split.total, rel=1e-12)


def quantized(model: nn.Module, views: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    config = make_config("lsq+", 8, 4)
    quantize_model(model.eval(), config)
    calibrate(model, views.split(8), config)
    return model


@pytest.fixture(scope="module")
def views():
    return torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def chain_model(views):
    torch.manual_seed(0)
    return quantized(ChainNet(act=nn.SiLU), views)


@pytest.mark.parametrize("which", ["chain", "plain"])
def test_lab_kl_is_zero_off_and_equals_a_full_forward_for_the_mse_range(which, chain_model, views):
    model = chain_model if which == "chain" else quantized(Plain(), views)
    names = list(quant_layers(model))
    for layer in (names[1], names[len(names) // 2]):
        lab = RangeLab(model, layer, views)
        if which == "chain":
            assert lab.units_run is not None and lab.units_run < 6  # only the tail runs
        else:
            assert lab.units_run is None
        off = lab.evaluate(None)
        assert off.kl == 0 and off.agreement == 1 and math.isinf(off.output_sqnr_db)
        mse = lab.snap("mse", 2, "asymmetric")
        got = lab.evaluate(mse)
        full = lab.full_forward(mse, views)
        float_logits = lab.full_forward(None, views)
        want = float(distillation_loss(full, float_logits))
        assert got.kl > 0
        assert got.kl == pytest.approx(want, rel=1e-4, abs=1e-7)
        assert lab.evaluate(None).kl == 0  # an update leaves nothing behind
        # The lab works on a copy: the model's own quantizers are untouched.
        assert quant_layers(model)[layer].input_quant.enabled


def test_the_layers_own_numbers_follow_the_papers_formula(chain_model, views):
    """``RangeLab.local`` (the numbers drawn first on a move) against the formula on the layer's
    float input: x_q = clamp(round((x - b) / s), 0, 2^bits - 1) s + b; the clipping error from the
    values outside [b, b + (2^bits - 1) s], the rounding error from the rest; the layer's output on
    x_q against its float output. ``evaluate`` gives the same numbers beside the model's."""
    layer = list(quant_layers(chain_model))[2]
    lab = RangeLab(chain_model, layer, views)
    lo, hi = lab.observed
    setting = LabSetting.from_range(3, "asymmetric", lo + 0.2 * (hi - lo), hi - 0.3 * (hi - lo))
    here = lab.local(setting)
    model = copy.deepcopy(chain_model)
    target = quant_layers(model)[layer]
    got = {}
    hook = target.register_forward_pre_hook(lambda m, i: got.update(x=i[0]))
    with float_mode(model), torch.no_grad():
        model(views)
        hook.remove()
        x = got["x"].double()
        s, b, qmax = setting.scale, setting.offset, 7
        xq = torch.clamp(torch.round((x - b) / s), 0, qmax) * s + b
        outside = ((x - b) / s < 0) | ((x - b) / s > qmax)
        err = (xq - x) ** 2
        y, yq = target(got["x"]).double(), target(xq.float()).double()
    assert outside.any() and (~outside).any()
    assert here.split.clip == pytest.approx(float(err[outside].sum() / x.numel()), rel=1e-5)
    assert here.split.round == pytest.approx(float(err[~outside].sum() / x.numel()), rel=1e-5)
    assert here.split.power == pytest.approx(float(x.pow(2).mean()), rel=1e-6)
    sqnr = 10 * math.log10(float((y**2).sum() / ((y - yq) ** 2).sum()))
    assert here.output_sqnr_db == pytest.approx(sqnr, abs=1e-3)
    both = lab.evaluate(setting)
    assert (both.split, both.output_sqnr_db) == (here.split, here.output_sqnr_db)
    assert both.kl == lab.model_answer(setting).kl > 0


def test_snap_kinds_and_learned_setting_from_a_state_dict(chain_model, views):
    layer = list(quant_layers(chain_model))[3]
    lab = RangeLab(chain_model, layer, views)
    lo, hi = lab.observed
    mm = lab.snap("minmax", 4, "asymmetric")
    assert (mm.lo, mm.hi) == pytest.approx((lo, hi), rel=1e-5)
    assert lab.snap("lsq", 4, "unsigned").lo == 0
    mse = lab.snap("mse", 4, "asymmetric")
    assert mse.split(lab.input).total <= mm.split(lab.input).total
    learned = setting_from_state(chain_model.state_dict(), layer, 4, asymmetric=True)
    assert learned == setting_of(quant_layers(chain_model)[layer].input_quant)
    with pytest.raises(LSQError, match="no input quantizer"):
        setting_from_state({}, layer, 4, True)
    with pytest.raises(LSQError, match="no quantized layer"):
        RangeLab(chain_model, "nope", views)


def test_layer_table_splits_each_input_error_into_clipping_and_rounding(chain_model, views):
    from lsq.analysis import layer_table

    config = make_config("lsq+", 8, 4)
    stats, _ = calibrate(chain_model, views.split(8), config)
    table = layer_table(chain_model, stats)
    total = table["input_power"] / 10 ** (table["input_sqnr_db"] / 10)
    assert (table["clip_error"] + table["round_error"]).to_numpy() == pytest.approx(
        total.to_numpy(), rel=1e-4
    )
    assert (table["clip_error"] >= 0).all() and (table["round_error"] > 0).all()
