"""lsq.health: each check fires on a model built to trigger it and stays silent on a healthy one."""

import dataclasses

import pandas as pd
import pytest
import torch
from helpers import SwishChain

from lsq import make_config, quantize_model
from lsq.analysis import layer_table
from lsq.calibrate import calibrate
from lsq.cli import main
from lsq.convert import quant_layers
from lsq.health import (
    CHECKS,
    FLOAT_MODEL,
    SUMMARIES,
    WORST,
    check_ranges,
    combine,
    group_findings,
    model_health,
    run_health,
)
from lsq.quantizers import SCALE_FLOOR
from lsq.runs import Run, load_run

VIEWS = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def build(method: str = "lsq+", bits: int = 8, dead: bool = False):
    """SwishChain quantized with ``method`` and calibrated; ``dead``: the float model's layer c
    has a dead output channel (0), as the bundled model has in 28 layers."""
    torch.manual_seed(0)
    model = SwishChain().eval()
    if dead:
        with torch.no_grad():
            model.c.weight[0].zero_()
    config = make_config(method, bits, bits)
    quantize_model(model, config)
    stats, _ = calibrate(model, VIEWS.split(4), config)
    return model, stats


def found(report: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(report["layer"], report["check"], strict=True))


def test_a_healthy_model_has_no_findings():
    model, stats = build()
    healthy_traj = pd.DataFrame({"step": [0, 1, 2], "layer": "b", "scale": [1.0, 0.95, 0.9]})
    report = model_health(model, stats, healthy_traj)
    assert report.empty, report.to_string()
    assert list(report.columns) == ["layer", "check", "reason", "severity"]


def test_negative_inputs_into_an_unsigned_grid():
    model, stats = build("lsq-unsigned")
    report = model_health(model, stats)
    assert {("b", "negative_input"), ("c", "negative_input")} <= found(report)
    reason = report[report["check"] == "negative_input"]["reason"].iloc[0]
    assert "negative" in reason and "unsigned" in reason


def test_scale_at_the_floor_and_dead_channels():
    model, stats = build()
    layers = quant_layers(model)
    layers["b"].input_quant.set_range(torch.tensor(SCALE_FLOOR), torch.tensor(0.0))
    with torch.no_grad():
        layers["c"].layer.weight[2].zero_()  # dead channel: its scale at the floor is expected
        layers["c"].weight_quant.scale[2] = SCALE_FLOOR
        layers["c"].layer.weight[5].mul_(1e-8)  # zero in all but name: dead as well
        layers["c"].weight_quant.scale[5] = SCALE_FLOOR
        layers["a"].weight_quant.scale[1] = SCALE_FLOOR  # not dead: a real problem
    report = model_health(model, stats)
    assert found(report) == {
        ("b", "scale_floor"),
        ("c", "dead_channels"),
        ("a", "scale_floor"),
    }, report.to_string()
    assert "2 of 8 output channels" in report[report["check"] == "dead_channels"]["reason"].iloc[0]


def test_offset_outside_the_data_and_a_range_much_wider_than_the_data():
    model, stats = build()
    layers = quant_layers(model)
    s_b = layers["b"].input_quant.scale.detach().clone()
    layers["b"].input_quant.set_range(s_b, torch.tensor(stats["b"].max + 1.0))
    s_c = layers["c"].input_quant.scale.detach().clone()
    off_c = layers["c"].input_quant.offset.detach().clone()
    layers["c"].input_quant.set_range(s_c * 20, off_c)
    report = model_health(model, stats)
    assert ("b", "offset_outside") in found(report)
    assert ("c", "range_too_wide") in found(report)
    assert ("c", "offset_outside") not in found(report)


def test_a_collapsing_scale_during_qat():
    model, stats = build()
    traj = pd.DataFrame(
        {
            "method": ["lsq+"] * 4,
            "step": [0, 1, 2, 3],
            "layer": ["b"] * 4,
            "scale": [1.0, 0.5, 0.2, 0.1],
        }
    )
    report = model_health(model, stats, traj)
    assert found(report) == {("b", "scale_collapse")}
    assert "10x smaller" in report["reason"].iloc[0]


def test_a_saved_run_gives_the_same_findings_and_the_cli_prints_them(tmp_path, capsys):
    model, stats = build("lsq-unsigned")
    with torch.no_grad():
        quant_layers(model)["c"].layer.weight[0].zero_()
    run = Run.create("net", make_config("lsq-unsigned", 8, 8), root=tmp_path)
    run.write_table("layers", layer_table(model, stats))
    run.write_state({k: v.detach() for k, v in model.state_dict().items()})
    run.finish()
    live = model_health(model, stats)
    saved = run_health(load_run(run.name, root=tmp_path))
    assert found(saved) == found(live) and len(saved) >= 3
    assert set(saved["check"]) <= set(CHECKS)
    assert main(["--runs-dir", str(tmp_path), "health", run.name, "--layers"]) == 0
    out = capsys.readouterr().out
    assert "negative_input" in out and "dead_channels" in out and " c " in f" {out} "


def test_cli_health_of_a_healthy_run_and_of_a_missing_one(tmp_path, capsys):
    model, stats = build()
    run = Run.create("net", make_config("lsq+", 8, 8), root=tmp_path)
    run.write_table("layers", layer_table(model, stats))
    run.write_state({k: v.detach() for k, v in model.state_dict().items()})
    run.finish()
    assert main(["--runs-dir", str(tmp_path), "health", run.name]) == 0
    assert "no findings" in capsys.readouterr().out
    assert main(["--runs-dir", str(tmp_path), "health", "no-such-run"]) == 2
    assert "no-such-run" in capsys.readouterr().err


@pytest.mark.parametrize("check", CHECKS)
def test_every_check_is_documented(check):
    import lsq.health

    assert check in lsq.health.__doc__


# ------------------------------------------------------- weights flipping across a boundary


def test_weight_flips_count_code_changes_and_net_movement():
    from lsq.train import WeightFlips, weight_codes

    model, _ = build(bits=4)
    layers = quant_layers(model)
    flips = WeightFlips(model)
    assert set(flips.layers) == {"a", "b", "c", "fc"}
    assert flips.update()["b"] == (0, 0, layers["b"].layer.weight.numel())
    w, s = layers["b"].layer.weight, layers["b"].weight_quant.scale.detach()
    codes = weight_codes(layers["b"]).flatten()
    inner = int(torch.nonzero((codes > -7) & (codes < 6))[0])  # can move one code either way
    channel = inner // w[0].numel()
    with torch.no_grad():
        w.view(-1)[inner] += s[channel]  # one code up
    assert flips.update()["b"][:2] == (1, 1)
    assert flips.update()["b"][:2] == (0, 1)  # nothing moved this step; still one code away
    with torch.no_grad():
        w.view(-1)[inner] -= s[channel]  # and back: a second flip, no net movement
    assert flips.update()["b"][:2] == (1, 0)
    layers["a"].layer.weight.requires_grad_(False)
    layers["a"].weight_quant.scale.requires_grad_(False)
    assert "a" not in WeightFlips(model).layers  # nothing of it trains: it cannot flip


def bounce(model, steps: int = 10) -> pd.DataFrame:
    """Trajectories of ``steps`` steps in which a fifth of layer b's weights bounce one code up
    and back every step, and a fifth of layer c's drift one code a step in one direction."""
    from lsq.pipeline import history_frames
    from lsq.train import TrainEvent, WeightFlips, quantizer_snapshot

    layers = quant_layers(model)
    flips = WeightFlips(model)
    events = [TrainEvent("eval", 0, steps, quantizers=quantizer_snapshot(model))]
    for step in range(1, steps + 1):
        with torch.no_grad():
            for name, sign in (("b", (-1) ** (step + 1)), ("c", 1)):
                w = layers[name].layer.weight
                s = layers[name].weight_quant.scale.detach().view(-1, *[1] * (w.dim() - 1))
                fifth = w.view(-1).numel() // 5
                w.view(-1)[:fifth] += (sign * s.expand_as(w)).reshape(-1)[:fifth]
        events.append(
            TrainEvent(
                "step", step, steps, quantizers=quantizer_snapshot(model), flips=flips.update()
            )
        )
    return history_frames(events)[1].assign(method="lsq+")


def test_weights_oscillating_across_a_rounding_boundary(tmp_path):
    model, stats = build(bits=8)
    traj = bounce(model)
    assert {"weight_flips", "weight_net", "weights"} <= set(traj.columns)
    report = model_health(model, stats, traj)
    # b bounces (many flips, no net movement); c drifts (as many flips as codes moved): learning
    assert found(report) == {("b", "weight_oscillation")}, report.to_string()
    reason = report["reason"].iloc[0]
    assert "rounding boundary" in reason and "bounce" in reason
    assert model_health(model, stats, traj[traj["step"] <= 2]).empty  # too few steps to tell
    run = Run.create("net", make_config("lsq+", 8, 8), root=tmp_path)  # saved: the same finding
    run.write_table("layers", layer_table(model, stats))
    run.write_table("trajectories", traj)
    run.finish()
    assert ("b", "weight_oscillation") in found(run_health(load_run(run.name, root=tmp_path)))


def test_training_counts_flips_only_in_the_layers_it_trains():
    from lsq.train import TrainConfig, train

    cfg = TrainConfig(steps=2, batch_size=4, eval_every=2, compile=False, device="cpu")
    teacher = SwishChain().eval()
    model, _ = build("lsq+", 4)
    steps = [e for e in train(model, teacher, VIEWS, VIEWS, cfg) if e.kind == "step"]
    assert [set(e.flips) for e in steps] == [{"a", "b", "c", "fc"}] * 2
    assert steps[0].flips["b"][2] == 8 * 8 * 9
    # Weights frozen: only the layers whose weight scale still learns can flip.
    model, _ = build("lsq+", 4)
    quant_layers(model)["a"].weight_quant.scale.requires_grad_(False)
    frozen = dataclasses.replace(cfg, train_weights=False)
    steps = [e for e in train(model, teacher, VIEWS, VIEWS, frozen) if e.kind == "step"]
    assert set(steps[-1].flips) == {"b", "c", "fc"}


# ------------------------------------------- the float model's findings once, grouped by check

FOUR = ("lsq+", "lsq", "lsq-signed", "minmax")


def comparison(methods, dead: bool = True, change=None):
    """A ``Comparison`` of ``methods`` right after init on SwishChain (the float model with a dead
    channel in layer c when ``dead``); ``change(method, layers)`` alters a method's quantizers."""
    from types import SimpleNamespace

    from lsq.explorer import Comparison, Settings

    initial, stats = {}, None
    for method in methods:
        model, method_stats = build(method, dead=dead)
        stats = stats or method_stats
        if change is not None:
            change(method, quant_layers(model), method_stats)
        initial[method] = SimpleNamespace(model=model, history=())
    return Comparison(Settings(), SimpleNamespace(stats=stats), initial)


def test_the_float_models_finding_appears_once_for_four_methods():
    from lsq.explorer import health_frame

    findings = health_frame(comparison(FOUR))
    dead = findings[findings["check"] == "dead_channels"]
    assert list(zip(dead["method"], dead["layer"], strict=True)) == [(FLOAT_MODEL, "c")]
    assert "1 of 8 output channels" in dead["reason"].iloc[0]
    assert list(findings["method"])[0] == FLOAT_MODEL  # first, above the methods
    groups = group_findings(findings)
    assert groups[groups["check"] == "dead_channels"][["method", "layers"]].values.tolist() == [
        [FLOAT_MODEL, 1]
    ]
    # A finding only some methods have is theirs: trained weights that died in one method.
    one = combine(
        {
            "lsq+": model_health(*build("lsq+", dead=True)),
            "minmax": model_health(*build("minmax")),
        }
    )
    assert set(one[one["check"] == "dead_channels"]["method"]) == {"lsq+"}


def test_method_findings_still_show_up_grouped_by_check():
    def change(method, layers, stats):
        if method == "lsq+":  # a range 20x the one init chose, on layer c only
            q = layers["c"].input_quant
            q.set_range(q.scale.detach().clone() * 20, q.offset.detach().clone())

    from lsq.explorer import health_frame

    findings = health_frame(comparison(("lsq-unsigned", "lsq+", "minmax"), change=change))
    groups = group_findings(findings).set_index(["method", "check"])
    neg = groups.loc[("lsq-unsigned", "negative_input")]  # the image and three Swish outputs
    assert neg["layers"] == 4 and neg["worst"] == "a, b, c (+1 more)"  # 51, 50, 46, 38 %
    assert "unsigned grid" in neg["reason"] and "up to 51%" in neg["reason"]
    wide = groups.loc[("lsq+", "range_too_wide")]
    assert wide["layers"] == 1 and wide["worst"] == "c" and "wider than the data" in wide["reason"]
    assert ("lsq+", "negative_input") not in groups.index
    assert ("minmax", "range_too_wide") not in groups.index
    assert (FLOAT_MODEL, "dead_channels") in groups.index
    per_method = groups.reset_index().groupby("method").size()
    assert (per_method <= len(CHECKS)).all()


def test_a_check_in_many_layers_is_one_row_with_its_worst_layers_first():
    shares = [0.2, 0.9, 0.05, 0.5, 0.3]
    layers = pd.DataFrame(
        {
            "layer": [f"l{i}" for i in range(5)],
            "grid": "unsigned",
            "range_lo": 0.0,
            "range_hi": 1.0,
            "observed_min": -0.5,
            "observed_max": 1.0,
            "negative_fraction": shares,
        }
    )
    findings = pd.DataFrame(check_ranges(layers))
    assert len(findings) == 5
    (row,) = group_findings(findings).to_dict("records")
    assert row["layers"] == 5 and WORST == 3
    assert row["worst"] == "l1, l3, l4 (+2 more)"  # 90 %, 50 %, 30 % negative
    assert row["reason"] == SUMMARIES["negative_input"].format(worst=0.9)
    assert len(row["reason"]) < 100  # short: the layer-by-layer reasons are the detail


def test_cli_health_groups_as_the_page_the_float_model_once(tmp_path, capsys):
    names = []
    for method in ("lsq-unsigned", "lsq+"):
        model, stats = build(method, dead=True)
        run = Run.create("net", make_config(method, 8, 8), root=tmp_path)
        run.write_table("layers", layer_table(model, stats))
        run.write_state({k: v.detach() for k, v in model.state_dict().items()})
        run.finish()
        names.append(run.name)
    assert main(["--runs-dir", str(tmp_path), "health", *names]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert out.count("dead_channels") == 1 and lines[0].startswith("float model: 1 finding")
    assert "dead_channels" in lines[2] and "1 of 8 output channels" in lines[2]
    unsigned = lines.index(f"{names[0]} (lsq-unsigned): 6 finding(s), one row per check")
    assert lines[unsigned + 2].split()[:6] == ["negative_input", "4", "a,", "b,", "c", "(+1"]
    assert f"{names[1]} (lsq+): no findings of its own" in lines
    assert main(["--runs-dir", str(tmp_path), "health", *names, "--layers"]) == 0
    detail = capsys.readouterr().out.split("every finding, layer by layer:")[1]
    assert detail.count("negative_input") == 4 and detail.count("dead_channels") == 1
