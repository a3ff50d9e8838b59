"""lsq.plots: every figure on small synthetic frames, empty input, NaN and inf."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from lsq.plots import (
    METHOD_COLORS,
    NO_DATA,
    Grid,
    clipped_mass,
    compare_figure,
    curves_figure,
    histogram_figure,
    layer_error_figure,
    method_color,
    ranges_figure,
    sensitivity_figure,
    symlog,
    trajectory_figure,
)

METHODS = ["lsq+", "lsq", "minmax"]


def title(fig: go.Figure) -> str:
    return fig.layout.title.text or ""


def is_empty(fig: go.Figure) -> bool:
    return len(fig.data) == 0 and any(a.text == NO_DATA for a in fig.layout.annotations)


def trace(fig: go.Figure, name: str):
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def points(values) -> list:
    """The non-None values of a trace array."""
    return [v for v in values if v is not None]


def ranges_frame() -> pd.DataFrame:
    rows = []
    for m, (lo, hi) in zip(METHODS, [(-1.0, 5.0), (0.0, 4.0), (-70.0, 70.0)], strict=True):
        for i, name in enumerate(["stem", "blocks.0", "head"]):
            obs = {"observed_min": -2.0, "observed_max": 6.0 + i}
            rows.append(dict(method=m, index=i, layer=name, range_lo=lo, range_hi=hi + i, **obs))
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------ colours


def test_method_colours_are_fixed_and_fallback_is_stable():
    assert set(METHOD_COLORS) == {"lsq+", "lsq", "lsq-unsigned", "lsq-signed", "minmax"}
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    assert method_color("lsq+") == METHOD_COLORS["lsq+"]
    others = [f"custom-{i}" for i in range(12)]
    colours = [method_color(m) for m in others]
    assert all(c.startswith("#") and c not in METHOD_COLORS.values() for c in colours)
    assert len(set(colours)) > 3  # different names get different colours
    # The same name gets the same colour in another process (Python's hash() would not).
    code = "from lsq.plots import method_color as c; print(*(c(f'custom-{i}') for i in range(12)))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True
    )
    assert out.stdout.split() == colours, out.stderr


def test_colour_per_method_is_the_same_across_figures():
    fig_r = ranges_figure(ranges_frame())
    curves = pd.DataFrame({"method": ["lsq", "lsq+"], "step": [0, 0], "loss": [1.0, 2.0]})
    fig_c = curves_figure(curves)
    for m in ("lsq+", "lsq"):
        assert trace(fig_r, m).line.color == trace(fig_c, m).line.color == METHOD_COLORS[m]
    assert trace(fig_c, "lsq+").line.width > trace(fig_c, "lsq").line.width


def all_figures() -> dict[str, go.Figure]:
    curves = pd.DataFrame({"method": ["lsq", "lsq+"], "step": [0, 0], "loss": [1.0, 2.0]})
    traj = pd.DataFrame({"method": ["lsq+"], "step": [0], "layer": ["a"], "scale": [0.1]})
    sens = pd.DataFrame({"unit": ["stem"], "part": ["weights"], "kl": [0.1]})
    grid = {"lsq+": {"levels": [0.0, 1.0], "lo": 0.0, "hi": 1.0}}
    return {
        "ranges": ranges_figure(ranges_frame()),
        "histogram": histogram_figure(hist_frame(8), grid),
        "curves": curves_figure(curves),
        "trajectory": trajectory_figure(traj.assign(offset=0.0), "a"),
        "layer error": layer_error_figure(error_frame()),
        "sensitivity": sensitivity_figure(sens),
        "compare": compare_figure(compare_frame()),
        "empty": curves_figure(pd.DataFrame()),
    }


def test_every_figure_uses_the_registered_lsq_template():
    lsq = pio.templates["lsq"]
    assert lsq.layout.font.size > 12  # larger than plotly's 12 px default, for projection
    for name, fig in all_figures().items():
        template = fig.layout.template
        # Not plotly's default (grey #E5ECF6 plot area, 12 px font): the project's look.
        assert template.layout.plot_bgcolor == "white", name
        assert template.layout.font.size == lsq.layout.font.size, name
        assert template.layout.title.xanchor == "left", name
        assert not fig.layout.legend.title.text, name  # no "method" heading from plotly express


# ------------------------------------------------------------------------------------- ranges


def test_ranges_figure_draws_a_segment_per_layer_and_method():
    fig = ranges_figure(ranges_frame())
    assert title(fig) == "Quantization ranges vs observed min/max"
    # The project's look, not plotly's default (grey #E5ECF6 plot area): a white plot area.
    assert fig.layout.template.layout.plot_bgcolor == "white"
    for m in METHODS:
        t = trace(fig, m)
        assert len(points(t.y)) == 6  # 3 layers x (lo, hi)
        assert t.x.count(None) == 3
    plus = trace(fig, "lsq+")
    assert points(plus.y)[:2] == [-1.0, 5.0]
    assert "stem" in plus.hovertext[0]
    band = trace(fig, "observed min..max")
    assert list(band.base) == [-2.0, -2.0, -2.0] and list(band.y) == [8.0, 9.0, 10.0]
    # Methods sit side by side, not on top of each other.
    xs = {m: points(trace(fig, m).x)[0] for m in METHODS}
    assert len(set(xs.values())) == 3
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_ranges_figure_log_scale_transforms_values_and_labels_ticks():
    fig = ranges_figure(ranges_frame(), log_scale=True)
    mm = trace(fig, "minmax")
    assert points(mm.y)[:2] == pytest.approx([-math.log10(71), math.log10(71)])
    assert "70" in mm.hovertext[0]  # hover keeps the original numbers
    assert "symlog" in fig.layout.yaxis.title.text
    assert "10" in fig.layout.yaxis.ticktext and "-30" in fig.layout.yaxis.ticktext
    assert symlog([0.0, -9.0]).tolist() == [0.0, -1.0]


def test_ranges_figure_drops_nan_and_inf_and_handles_empty():
    df = ranges_frame()
    df.loc[0, "range_lo"] = math.nan
    df.loc[1, "range_hi"] = math.inf
    fig = ranges_figure(df)
    assert len(points(trace(fig, "lsq+").y)) == 2
    assert all(math.isfinite(v) for t in fig.data for v in points(t.y))
    assert is_empty(ranges_figure(pd.DataFrame()))
    assert is_empty(ranges_figure(df.iloc[0:0]))
    no_obs = ranges_figure(ranges_frame().drop(columns=["observed_min", "observed_max"]))
    assert {t.name for t in no_obs.data} == set(METHODS)


# ---------------------------------------------------------------------------------- histogram


def test_clipped_mass_counts_partial_bins_proportionally():
    hist = pd.DataFrame({"left": [0.0, 1.0, 2.0], "right": [1.0, 2.0, 3.0], "count": [1, 2, 3]})
    below, above = clipped_mass(hist, 0.5, 2.0)
    assert below == pytest.approx(0.5 / 6) and above == pytest.approx(3 / 6)
    assert clipped_mass(hist, -10, 10) == (0.0, 0.0)
    assert clipped_mass(hist, 1.5, 1.5) == pytest.approx((2 / 6, 4 / 6))
    assert clipped_mass(hist, math.nan, 2.5) == pytest.approx((0.0, 1.5 / 6))
    assert clipped_mass(pd.DataFrame(columns=["left", "right", "count"]), 0, 1) == (0.0, 0.0)


def hist_frame(n: int = 256) -> pd.DataFrame:
    edges = np.linspace(-2.0, 6.0, n + 1)
    counts = np.exp(-(((edges[:-1] + edges[1:]) / 2) ** 2)) * 1000
    return pd.DataFrame({"left": edges[:-1], "right": edges[1:], "count": counts.round()})


def test_histogram_figure_draws_bars_levels_and_clipped_regions():
    hist = hist_frame()
    grids = {
        "lsq+": {"levels": np.linspace(-1.0, 3.0, 16), "lo": -1.0, "hi": 3.0},
        "lsq": {"levels": np.linspace(0.0, 2.0, 16), "lo": 0.0, "hi": 2.0},
    }
    fig = histogram_figure(hist, grids, observed=(-2.0, 6.0))
    assert title(fig)
    bars = trace(fig, "input histogram")
    assert len(bars.y) == 256
    for m in grids:
        levels = trace(fig, f"{m}: 16 levels")
        assert len(points(levels.x)) == 32 and levels.x.count(None) == 16
        assert levels.line.color == METHOD_COLORS[m]
        band = [t for t in fig.data if t.name.startswith(f"clipped by {m}:")]
        assert len(band) == 1 and band[0].fill == "toself"
    assert fig.layout.yaxis.type == "log"
    assert len(points(trace(fig, "observed min / max").x)) == 4
    linear = histogram_figure(hist, grids, log_y=False)
    assert linear.layout.yaxis.type == "linear"


def test_histogram_legend_gives_the_clipped_share_of_the_data():
    # Eight bins of 10 values on [0, 8): a grid on [1.5, 6] clips 1.5 / 8 below and 2 / 8 above.
    hist = pd.DataFrame({"left": np.arange(8.0), "right": np.arange(1.0, 9.0), "count": [10] * 8})
    grid = {"levels": np.linspace(1.5, 6.0, 4), "lo": 1.5, "hi": 6.0}
    fig = histogram_figure(hist, {"lsq+": grid})
    (band,) = [t for t in fig.data if t.name.startswith("clipped by lsq+")]
    assert "18.75% below" in band.name and "25.00% above" in band.name
    # Shaded: [0, 1.5] and [6, 8], the data outside the grid.
    xs = points(band.x)
    assert sorted(set(xs)) == [0.0, 1.5, 6.0, 8.0]


def test_grid_record_keeps_finite_levels_and_draws_like_the_dict_form():
    torch = pytest.importorskip("torch")
    grid = Grid(torch.tensor([0.0, math.nan, 1.0, math.inf]), None, 2)
    assert grid.levels == (0.0, 1.0) and math.isnan(grid.lo) and grid.hi == 2.0
    assert grid.bounds() == [2.0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        grid.lo = 0.0
    assert Grid.from_dict({"levels": [1, 2]}) == Grid((1.0, 2.0))
    assert Grid.from_dict(grid) is grid
    hist = hist_frame(16)
    as_dicts = {"lsq+": {"levels": np.linspace(-1.0, 3.0, 4), "lo": -1.0, "hi": 3.0}}
    as_grids = {"lsq+": Grid(np.linspace(-1.0, 3.0, 4), -1.0, 3.0)}
    a = histogram_figure(hist, as_dicts, observed=(-2.0, 6.0))
    b = histogram_figure(hist, as_grids, observed=(-2.0, 6.0))
    assert a.to_json() == b.to_json() and len(a.data) == 4  # bars, band, levels, observed


def test_histogram_figure_handles_empty_nan_and_tensor_levels():
    torch = pytest.importorskip("torch")
    assert is_empty(histogram_figure(pd.DataFrame(), {}))
    hist = hist_frame(8)
    hist.loc[0, "count"] = math.nan
    hist.loc[1, "right"] = math.inf
    grid = {"levels": torch.tensor([0.0, 1.0, math.nan]), "lo": 0.0, "hi": 1.0}
    fig = histogram_figure(hist, {"lsq+": grid}, observed=(math.nan, 5.0))
    assert len(trace(fig, "input histogram").y) == 6
    assert len(points(trace(fig, "lsq+: 2 levels").x)) == 4
    assert len(points(trace(fig, "observed min / max").x)) == 2
    # A grid without a histogram still shows its levels.
    only_grid = histogram_figure(pd.DataFrame(), {"lsq": grid})
    assert [t.name for t in only_grid.data] == ["lsq: 2 levels"]


# ------------------------------------------------------------------------------------- curves


def test_curves_figure_one_line_per_method_without_nan():
    steps = np.arange(10)
    df = pd.DataFrame(
        {
            "method": ["lsq+"] * 10 + ["lsq"] * 10,
            "step": np.concatenate([steps, steps]),
            "loss": np.linspace(1, 0.1, 20),
            "agreement": [0.5 if s % 5 == 0 else math.nan for s in steps] * 2,
        }
    )
    df.loc[3, "loss"] = math.inf
    fig = curves_figure(df, y="loss")
    assert [t.name for t in fig.data] == ["lsq+", "lsq"]
    assert len(trace(fig, "lsq+").y) == 9 and len(trace(fig, "lsq").y) == 10
    assert "loss" in title(fig) and fig.layout.xaxis.title.text == "training step"
    agree = curves_figure(df, y="agreement")
    assert len(trace(agree, "lsq").y) == 2 and "markers" in trace(agree, "lsq").mode
    assert curves_figure(df.assign(kl=0.5), y="kl").layout.yaxis.type == "log"
    assert is_empty(curves_figure(pd.DataFrame()))
    assert is_empty(curves_figure(df, y="missing"))
    assert is_empty(curves_figure(df.assign(loss=math.nan)))


# --------------------------------------------------------------------------------- trajectory


def test_trajectory_figure_scale_and_offset_subplots():
    rows = [
        dict(method=m, step=s, layer=layer, scale=0.1 + s, offset=-0.5 * s if m == "lsq+" else 0.0)
        for m in ("lsq+", "lsq")
        for s in range(5)
        for layer in ("a", "b")
    ]
    df = pd.DataFrame(rows)
    df.loc[0, "scale"] = math.nan
    fig = trajectory_figure(df, "a")
    assert "a" in title(fig)

    def y_axis(t):
        return fig.layout["yaxis" + t.yaxis[1:]]

    panels = {(t.name, y_axis(t).title.text): t for t in fig.data}
    assert len(panels) == len(fig.data) == 4
    scale, offset = panels[("lsq+", "scale s")], panels[("lsq+", "offset β")]
    assert list(scale.y) == pytest.approx([1.1, 2.1, 3.1, 4.1])  # layer a only, NaN dropped
    assert list(offset.y) == pytest.approx([0.0, -0.5, -1.0, -1.5, -2.0])
    assert list(panels[("lsq", "offset β")].y) == [0.0] * 5
    assert y_axis(scale).domain[0] > y_axis(offset).domain[0]  # scale on top
    assert scale.line.color == METHOD_COLORS["lsq+"] == offset.line.color
    for m in ("lsq+", "lsq"):  # one legend entry per method
        assert sum(t.showlegend is not False for t in fig.data if t.name == m) == 1
    assert fig.layout.xaxis.matches == "x2" or fig.layout.xaxis2.matches == "x"
    assert y_axis(scale).matches is None  # each panel keeps its own range
    assert is_empty(trajectory_figure(df, "missing"))
    assert is_empty(trajectory_figure(pd.DataFrame(), "a"))


# -------------------------------------------------------------------------------- layer error


def error_frame() -> pd.DataFrame:
    rows = []
    for m, shift in (("lsq", 0.0), ("lsq+", 3.0)):
        for i in range(8):
            sqnr = 10.0 + i + shift
            rows.append(
                dict(method=m, index=i, layer=f"blocks.{i}", kind="conv", output_sqnr_db=sqnr)
            )
    return pd.DataFrame(rows)


def test_layer_error_figure_marks_worst_layers_of_lsq_plus():
    df = error_frame()
    df.loc[df["method"].eq("lsq+") & df["index"].eq(7), "output_sqnr_db"] = math.inf
    df.loc[df["method"].eq("lsq") & df["index"].eq(7), "output_sqnr_db"] = math.nan
    fig = layer_error_figure(df, worst=3)
    assert "SQNR" in title(fig)
    plus, lsq = trace(fig, "lsq+"), trace(fig, "lsq")
    assert len(plus.y) == 8 and len(lsq.y) == 7
    finite = [v for t in (plus, lsq) for v in t.y[:7]]
    assert math.isfinite(plus.y[-1]) and plus.y[-1] > max(finite)  # +inf drawn above the rest
    assert "exact" in plus.hovertext[-1] and "conv" in plus.hovertext[0]
    worst = trace(fig, "worst 3 layers (lsq+)")
    assert sorted(worst.x) == [0, 1, 2]
    assert {a.text for a in fig.layout.annotations} == {"blocks.0", "blocks.1", "blocks.2"}


def test_layer_error_figure_without_lsq_plus_uses_first_method_and_handles_empty():
    df = error_frame()
    df = df[df["method"] == "lsq"].assign(method="custom")
    fig = layer_error_figure(df, worst=2)
    assert len(trace(fig, "worst 2 layers (custom)").x) == 2
    assert fig.data[0].line.color == method_color("custom")
    assert is_empty(layer_error_figure(pd.DataFrame()))
    assert is_empty(layer_error_figure(df.assign(output_sqnr_db=math.nan)))
    all_inf = layer_error_figure(df.assign(output_sqnr_db=math.inf))
    assert all(math.isfinite(v) for v in all_inf.data[0].y)


# -------------------------------------------------------------------------------- sensitivity


def test_sensitivity_figure_sorted_grouped_bars():
    df = pd.DataFrame(
        {
            "unit": ["stem", "stem", "head", "head", "depthwise", "depthwise"],
            "part": ["weights", "activations"] * 3,
            "kl": [0.01, 0.02, 0.5, 0.0, 0.1, math.nan],
        }
    )
    fig = sensitivity_figure(df)
    assert title(fig) == "Where the error comes from (KL when only this part is quantized)"
    w, a = trace(fig, "only weights quantized"), trace(fig, "only activations quantized")
    assert w.orientation == "h" and len(w.x) == 3 and len(a.x) == 2
    assert min(a.x) > 0  # zero KL drawn above the floor of the log axis
    assert "KL 0" in a.hovertext[list(a.y).index("head")]
    assert list(fig.layout.yaxis.categoryarray) == ["stem", "depthwise", "head"]  # worst on top
    assert fig.layout.xaxis.type == "log" and fig.layout.barmode == "group"
    assert sensitivity_figure(df, log_x=False).layout.xaxis.type != "log"
    assert list(sensitivity_figure(df, top=1).layout.yaxis.categoryarray) == ["head"]
    assert is_empty(sensitivity_figure(pd.DataFrame()))
    assert is_empty(sensitivity_figure(df.assign(kl=math.nan)))


# ------------------------------------------------------------------------------------ compare


def compare_frame() -> pd.DataFrame:
    rows = [
        dict(method=m, bits=b, init_kl=0.01 * (9 - b) * (1 + j), init_agreement=0.9 - 0.05 * j)
        for j, m in enumerate(METHODS)
        for b in (2, 8, 4, 3)
    ]
    return pd.DataFrame(rows)


def test_compare_figure_grouped_bars_by_bits():
    fig = compare_figure(compare_frame())
    assert "KL" in title(fig)
    assert [t.name for t in fig.data] == METHODS
    for t in fig.data:
        assert list(t.x) == ["8", "4", "3", "2"] and len(t.y) == 4
    assert list(fig.layout.xaxis.categoryarray) == ["8", "4", "3", "2"]
    assert fig.layout.yaxis.type == "log" and fig.layout.barmode == "group"
    agree = compare_figure(compare_frame(), metric="init_agreement")
    assert agree.layout.yaxis.type != "log"
    assert trace(agree, "lsq+").marker.color == METHOD_COLORS["lsq+"]


def test_compare_figure_nan_inf_and_empty():
    df = compare_frame()
    df.loc[0, "init_kl"] = math.nan
    df.loc[1, "init_kl"] = math.inf
    df.loc[2, "init_kl"] = 0.0  # not drawable on a log axis
    fig = compare_figure(df)
    assert list(trace(fig, "lsq+").x) == ["3"]
    assert is_empty(compare_figure(pd.DataFrame()))
    assert is_empty(compare_figure(df, metric="qat_kl"))
    assert is_empty(compare_figure(df.assign(init_kl=math.nan)))


def test_histogram_shades_only_clipped_data_not_empty_axis():
    hist = hist_frame()  # data on [-2, 6]
    grids = {
        "wide": {"levels": np.linspace(-10.0, 20.0, 16), "lo": -10.0, "hi": 20.0},
        "narrow": {"levels": np.linspace(0.0, 2.0, 16), "lo": 0.0, "hi": 2.0},
    }
    fig = histogram_figure(hist, grids)
    bands = [t for t in fig.data if (t.name or "").startswith("clipped by")]
    assert [t.name.split(":")[0] for t in bands] == ["clipped by narrow"]
    xs = [x for x in bands[0].x if x is not None]
    assert min(xs) >= -2.0 and max(xs) <= 6.0


# ------------------------------------------------------------------ issue 12: readable pictures


def test_many_levels_are_drawn_as_a_range_and_a_tick_band():
    from lsq.plots import MAX_LEVEL_LINES

    hist = hist_frame()
    few = {"lsq": {"levels": np.linspace(0.0, 2.0, MAX_LEVEL_LINES), "lo": 0.0, "hi": 2.0}}
    many = {"lsq+": {"levels": np.linspace(-1.0, 3.0, 256), "lo": -1.0, "hi": 3.0}}
    lines = trace(histogram_figure(hist, few), f"lsq: {MAX_LEVEL_LINES} levels")
    heights = {(a, b) for a, b in zip(lines.y[0::3], lines.y[1::3], strict=True)}
    assert len(heights) == 1  # every level a full-height line
    fig = histogram_figure(hist, many)
    band = trace(fig, "lsq+: 256 levels (range, levels as ticks)")
    starts = points(band.y)[0::2]
    full = [y for y in starts if y == min(starts)]
    assert len(full) == 2  # the range's two ends run the full height; 256 short ticks at the top
    assert len(starts) == 258


def test_clip_summary_tells_rounding_onto_the_end_level_from_real_clipping():
    from lsq.plots import clip_summary, clip_text

    # A quarter of the data exactly 0 (a ReLU's zeros), the rest on (0.5, 4].
    hist = pd.DataFrame(
        {
            "left": [-0.001, 0.5, 1.5, 2.5],
            "right": [0.001, 1.5, 2.5, 4.0],
            "count": [25, 25, 25, 25],
        }
    )
    near = Grid(np.linspace(0.05, 4.0, 16), 0.05, 4.0)  # offset a hair above 0: step 0.26
    summary = clip_summary(hist, near)
    assert summary["below"] == pytest.approx(0.25) and summary["below_near"] == pytest.approx(0.25)
    assert "all within half a step" in clip_text(summary)
    far = Grid(np.linspace(1.0, 4.0, 16), 1.0, 4.0)  # zeros far below: really clipped
    summary = clip_summary(hist, far)
    assert summary["below"] > 0.25 and summary["below_near"] < summary["below"] / 2
    assert "within half a step" not in clip_text(summary).split(";")[0] or summary["below_near"] > 0


def test_small_multiples_one_panel_per_method_with_its_clipped_share():
    from lsq.plots import histogram_panels_figure

    hist = pd.DataFrame({"left": np.arange(8.0), "right": np.arange(1.0, 9.0), "count": [10] * 8})
    grids = {
        "lsq+": {"levels": np.linspace(1.5, 6.0, 4), "lo": 1.5, "hi": 6.0},
        "minmax": {"levels": np.linspace(0.0, 8.0, 16), "lo": 0.0, "hi": 8.0},
    }
    fig = histogram_panels_figure(hist, grids, observed=(0.0, 8.0))
    heads = [a.text for a in fig.layout.annotations]
    assert heads[0].startswith("<b>lsq+</b>") and "below 18.8%" in heads[0]
    assert "above 25.0%" in heads[0] and "below 0 %" in heads[1]
    axes = {t.yaxis for t in fig.data if t.name.startswith(("lsq+:", "minmax:"))}
    assert len(axes) == 2  # one panel each
    assert fig.layout.xaxis.matches == "x2" or fig.layout.xaxis2.matches == "x"
    assert sum(1 for t in fig.data if t.name == "input histogram" and t.showlegend) == 1


def test_error_split_figure_stacks_clipping_on_rounding_per_method():
    from lsq.plots import error_split_figure

    rows = [
        dict(method=m, index=i, layer=f"l{i}", clip_error=c, round_error=1.0, input_power=10.0)
        for m, c in (("lsq+", 0.5), ("minmax", 0.0))
        for i in range(3)
    ]
    fig = error_split_figure(pd.DataFrame(rows))
    assert fig.layout.barmode == "stack"
    clip = [t for t in fig.data if t.name == "clipping"]
    assert [list(t.y) for t in clip] == [[5.0] * 3, [0.0] * 3]
    assert "33%" in fig.layout.annotations[0].text and "0%" in fig.layout.annotations[1].text
    assert list(fig.layout.xaxis2.ticktext) == ["0 · l0", "1 · l1", "2 · l2"]
    assert is_empty(error_split_figure(pd.DataFrame()))


def test_layer_axes_carry_names_and_worst_labels_do_not_share_a_height():
    fig = ranges_figure(ranges_frame())
    assert list(fig.layout.xaxis.ticktext) == ["0 · stem", "1 · blocks.0", "2 · head"]
    err = error_frame()
    fig = layer_error_figure(err, worst=3)
    assert "0 · blocks.0" in fig.layout.xaxis.ticktext
    heights = [a.ay for a in fig.layout.annotations]
    assert len(set(heights)) == 3  # neighbouring worst layers are labelled at different heights


def test_log_axes_get_full_labels_not_minor_digits():
    from lsq.plots import _log_ticks

    assert _log_ticks(0.1, 5.0)[1] == ["0.1", "0.2", "0.5", "1", "2", "5"]
    assert _log_ticks(1.0, 1e5)[1] == ["1", "10", "100", "1000", "10000", "100000"]
    df = pd.DataFrame({"method": ["lsq+"] * 3, "step": [0, 1, 2], "kl": [0.15, 0.4, 2.0]})
    fig = curves_figure(df, "kl")
    assert fig.layout.yaxis.type == "log" and list(fig.layout.yaxis.ticktext) == [
        "0.2",
        "0.5",
        "1",
        "2",
    ]


def test_trajectory_gives_each_method_its_own_axes():
    rows = [
        dict(method=m, step=s, layer="a", scale=k * (1 + 0.01 * s), offset=0.0)
        for m, k in (("lsq+", 1e-3), ("lsq", 5.0))
        for s in range(4)
    ]
    fig = trajectory_figure(pd.DataFrame(rows), "a")
    scale_axes = {t.name: t.yaxis for t in fig.data if t.customdata[0][0] == "scale"}
    assert scale_axes["lsq+"] != scale_axes["lsq"]
    assert sorted(a.text for a in fig.layout.annotations) == ["lsq", "lsq+"]


def test_intro_figure_has_a_panel_per_grid_with_its_mse():
    from lsq.lab import intro_grids, swish_sample, values_histogram
    from lsq.plots import intro_figure

    x = swish_sample(5000)
    grids = [
        (
            g.name,
            g.label,
            Grid(g.setting.levels, g.setting.lo, g.setting.hi),
            g.split.total,
            g.split.clip,
            g.split.round,
        )
        for g in intro_grids(3, x)
    ]
    fig = intro_figure(values_histogram(x), grids, 3)
    heads = [a.text for a in fig.layout.annotations]
    assert [h.split("</b>")[0] for h in heads] == ["<b>lsq", "<b>lsq-signed", "<b>lsq+"]
    assert all("MSE" in h for h in heads) and "least" in heads[2]


# -------------------------------------------------------------- presentation mode and replay


def test_presentation_mode_enlarges_every_font_and_darkens_ticks():
    from lsq.plots import (
        FONT_SIZE,
        PRESENT_INK,
        PRESENT_TICK,
        histogram_panels_figure,
        presentation,
    )

    grids = {m: {"levels": [0.0, 1.0, 2.0], "lo": 0.0, "hi": 2.0} for m in ("lsq+", "lsq")}
    figs = {
        **all_figures(),
        "panels": histogram_panels_figure(hist_frame(8), grids),
        "worst": layer_error_figure(error_frame(), worst=3),
    }
    for name, fig in figs.items():
        before = json.loads(fig.to_json())
        big = presentation(fig)
        assert json.loads(fig.to_json()) == before, name  # the figure itself is left as it was
        assert big.layout.font.size > FONT_SIZE and big.layout.font.color == PRESENT_INK, name
        assert big.layout.title.font.size > 22 and big.layout.legend.font.size > FONT_SIZE, name
        assert big.layout.height > (fig.layout.height or 450), name
        axes = [*fig.select_xaxes(), *fig.select_yaxes()]
        big_axes = [*big.select_xaxes(), *big.select_yaxes()]
        assert axes and len(axes) == len(big_axes), name
        for ax, big_ax in zip(axes, big_axes, strict=True):
            assert big_ax.tickfont.color == PRESENT_INK, name
            small = ax.tickfont.size  # made small on purpose (50 layer names): larger too
            assert big_ax.tickfont.size == (PRESENT_TICK if small is None else round(small * 1.4))
        for a, b in zip(fig.layout.annotations, big.layout.annotations, strict=True):
            assert b.font.size > (a.font.size or FONT_SIZE), (name, a.text)
            assert b.font.color == (a.font.color if a.font.color == "red" else PRESENT_INK)
    worst = presentation(figs["worst"])
    assert {a.font.color for a in worst.layout.annotations} == {"red"}  # meaning kept
    head = (
        "<b>lsq+</b> · outside the range: below 8.4%, all within half a step; "
        "above 2.7% (0.3% within half a step)"
    )  # a long panel head breaks into two lines
    fig = go.Figure().add_annotation(text=head)
    assert presentation(fig).layout.annotations[0].text == head.replace("; ", ";<br>")
    short = presentation(fig.update_annotations(text="short; head"))
    assert short.layout.annotations[0].text == "short; head"


def test_grid_at_step_reads_the_recorded_trajectory():
    from lsq.analysis import grid_at_step
    from lsq.errors import LSQError

    traj = pd.DataFrame(
        {
            "step": [0, 0, 5, 10],
            "layer": ["a", "b", "a", "a"],
            "scale": [0.1, 9.0, 0.2, 0.3],
            "offset": [-0.5, 0.0, -0.4, None],
        }
    )
    g = grid_at_step(traj, "a", 5, 0, 3)
    assert g["levels"] == pytest.approx([-0.4, -0.2, 0.0, 0.2])
    assert (g["lo"], g["hi"]) == pytest.approx((-0.4, 0.2))
    assert grid_at_step(traj, "a", 7, 0, 3)["lo"] == pytest.approx(-0.4)  # the latest before
    assert grid_at_step(traj, "a", 99, -2, 1)["levels"] == pytest.approx([-0.6, -0.3, 0, 0.3])
    assert grid_at_step(traj, "a", -1, 0, 1)["lo"] == pytest.approx(-0.5)  # before the first
    with pytest.raises(LSQError, match="'c'"):
        grid_at_step(traj, "c", 0, 0, 1)


def test_replay_figure_draws_each_methods_grid_at_the_step():
    from lsq.plots import replay_figure

    grids = {
        "lsq": {"levels": [0.0, 1.0, 2.0, 3.0], "lo": 0.0, "hi": 3.0},
        "lsq+": {"levels": [-1.0, 0.0, 1.0, 2.0], "lo": -1.0, "hi": 2.0},
    }
    fig = replay_figure(hist_frame(8), grids, (-1.0, 3.0), "blocks.1", 7, 20)
    assert "blocks.1" in title(fig) and "step 7 of 20" in title(fig)
    heads = [a.text.split("</b>")[0] for a in fig.layout.annotations]
    assert heads == ["<b>lsq+", "<b>lsq"]
    lines = trace(fig, "lsq+: 4 levels")
    assert sorted(set(points(lines.x))) == [-1.0, 0.0, 1.0, 2.0]


def test_panel_heads_and_layer_axes_stay_readable_in_presentation_mode():
    """A panel head puts what lies outside the range on lines of its own (one side each), so it
    is never cut off at the right edge; in presentation mode an axis of 50 layer names labels
    at most PRESENT_MAX_TICKS of them (every k-th, the first kept) instead of a block of text."""
    import re

    from lsq.plots import PRESENT_MAX_TICKS, histogram_panels_figure, presentation

    hist = pd.DataFrame({"left": np.arange(8.0), "right": np.arange(1.0, 9.0), "count": [10] * 8})
    grids = {"lsq+": {"levels": np.linspace(1.5, 6.0, 4), "lo": 1.5, "hi": 6.0}}
    (head,) = [a.text for a in histogram_panels_figure(hist, grids).layout.annotations]
    lines = [re.sub(r"<[^>]+>", "", line) for line in head.split("<br>")]
    assert lines[0] == "lsq+" and len(lines) == 4 and max(map(len, lines)) <= 65, lines
    rows = [
        dict(method="lsq+", index=i, layer=f"blocks.{i}.conv_pw", kind="conv", output_sqnr_db=i)
        for i in range(50)
    ]
    fig = layer_error_figure(pd.DataFrame(rows))
    assert len(fig.layout.xaxis.ticktext) == 50
    big = presentation(fig)
    assert len(big.layout.xaxis.ticktext) <= PRESENT_MAX_TICKS
    assert big.layout.xaxis.ticktext[0] == "0 · blocks.0.conv_pw"
    assert len(big.layout.xaxis.tickvals) == len(big.layout.xaxis.ticktext)


def test_the_lab_picture_moves_only_its_grid_over_a_histogram_made_once(monkeypatch):
    """The Range lab's chart per move (``LabPicture.figure``) is the one-panel histogram figure
    of that grid, whatever the grid (bits, kind, range, clipped or not), while the histogram's
    part is made once: after the picture exists, no move builds a panel figure again."""
    import torch

    import lsq.plots as plots
    from lsq.lab import LabSetting, values_histogram
    from lsq.plots import LabPicture, histogram_panels_figure

    x = torch.randn(20_000, generator=torch.Generator().manual_seed(0)) * 1.3 + 0.2
    hist, observed = values_histogram(x, 200), (float(x.min()), float(x.max()))
    picture = LabPicture(hist, observed)
    cases = [(4, "asymmetric", -2.0, 2.5), (8, "asymmetric", -1.0, 5.0), (3, "signed", 0, 1.5)]
    cases += [(2, "unsigned", 0, 0.5), (4, "asymmetric", -10.0, 10.0)]  # the last clips nothing
    want = {}
    for bits, kind, lo, hi in cases:
        s = LabSetting.from_range(bits, kind, lo, hi)
        grid = Grid(s.levels, s.lo, s.hi)
        outside = {"lsq+": s.split(x).clip_summary()}
        want[(bits, kind, lo)] = histogram_panels_figure(
            hist, {"lsq+": grid}, observed, title="This layer's input", outside=outside
        ).to_plotly_json()
    monkeypatch.setattr(plots, "make_subplots", lambda *a, **k: pytest.fail("a panel rebuilt"))
    for bits, kind, lo, hi in cases:
        s = LabSetting.from_range(bits, kind, lo, hi)
        got = picture.figure(Grid(s.levels, s.lo, s.hi), "lsq+", s.split(x).clip_summary())
        assert json.loads(pio.to_json(got)) == json.loads(pio.to_json(want[(bits, kind, lo)]))
