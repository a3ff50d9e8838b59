"""Figures for the explorer: pure functions, DataFrames in, ``plotly.graph_objects.Figure`` out.

Every figure uses the same colour per method (``METHOD_COLORS``, LSQ+ the most prominent), large
fonts for projection, and hover text with the exact numbers. Empty input gives a figure that
says "no data"; NaN values are dropped and infinities dropped or capped (and said so in hover).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

#: One colour per method, the same in every figure (Okabe-Ito, colour-blind safe).
METHOD_COLORS: dict[str, str] = {
    "lsq+": "#D55E00",  # vermillion: the method the app is about
    "lsq": "#0072B2",
    "lsq-unsigned": "#56B4E9",
    "lsq-signed": "#009E73",
    "minmax": "#CC79A7",
}
#: Colours for method names not in METHOD_COLORS, picked by a stable hash of the name.
FALLBACK_COLORS: tuple[str, ...] = (
    "#E69F00",
    "#8C564B",
    "#9467BD",
    "#17BECF",
    "#BCBD22",
    "#7F7F7F",
    "#1F77B4",
    "#2CA02C",
)
#: Colours of the two parts in the sensitivity figure (not method colours on purpose).
PART_COLORS: dict[str, str] = {"weights": "#332288", "activations": "#44AA99"}
PROMINENT = "lsq+"
TEMPLATE = "lsq"  # registered below as pio.templates["lsq"]
FONT_SIZE = 16
TITLE_SIZE = 22
NO_DATA = "no data"
INF_MARGIN = 10.0  # +inf is drawn this far above the largest finite value
MAX_LEVEL_LINES = 32  # more levels than this are drawn as a range and a tick band
TICK_BAND = 0.08  # height of the tick band, as a share of the count axis

METRIC_LABELS: dict[str, str] = {
    "loss": "training loss",
    "agreement": "top-1 agreement with the float model",
    "kl": "KL divergence to the float model",
    "output_sqnr_db": "output SQNR (dB, higher is better)",
    "calib_output_sqnr_db": "output SQNR on calibration views (dB, higher is better)",
    "input_sqnr_db": "input SQNR (dB, higher is better)",
    "weight_sqnr_db": "weight SQNR (dB, higher is better)",
    "init_kl": "KL to float after initialisation (lower is better)",
    "qat_kl": "KL to float after QAT (lower is better)",
    "init_agreement": "top-1 agreement after initialisation",
    "qat_agreement": "top-1 agreement after QAT",
}


def _register_template() -> None:
    """The look of every figure as a plotly template: plotly_white, large fonts for projection,
    the title top left, and the method colours first in the colour sequence."""
    template = go.layout.Template(pio.templates["plotly_white"])
    template.layout.update(
        title={"font": {"size": TITLE_SIZE}, "x": 0.01, "xanchor": "left"},
        font={"size": FONT_SIZE},
        legend={"font": {"size": FONT_SIZE - 2}},
        hoverlabel={"font": {"size": FONT_SIZE - 2}},
        margin={"t": 80, "l": 80, "r": 30, "b": 70},
        colorway=[*METHOD_COLORS.values(), *FALLBACK_COLORS],
    )
    pio.templates[TEMPLATE] = template


_register_template()


# ----------------------------------------------------------------------------------- helpers


def method_color(method: str) -> str:
    """The colour of ``method``: METHOD_COLORS, else a stable pick from FALLBACK_COLORS."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK_COLORS[zlib.crc32(str(method).encode()) % len(FALLBACK_COLORS)]


def _line_width(method: str) -> float:
    return 4.0 if method == PROMINENT else 2.5


def _marker_size(method: str) -> int:
    return 10 if method == PROMINENT else 7


def _label(column: str) -> str:
    return METRIC_LABELS.get(column, column.replace("_", " "))


def _fmt(value: float) -> str:
    """A number for hover text: enough digits to be exact for the eye."""
    return f"{value:.6g}"


def _ordered_methods(methods: Iterable[Any]) -> list[str]:
    """Known methods in METHOD_COLORS order, then the others in order of appearance."""
    seen = list(dict.fromkeys(str(m) for m in methods))
    known = [m for m in METHOD_COLORS if m in seen]
    return known + [m for m in seen if m not in METHOD_COLORS]


def _style(fig: go.Figure, title: str, x_title: str = "", y_title: str = "") -> go.Figure:
    """The layout every figure shares: the "lsq" template, the title, axis labels."""
    fig.update_layout(template=TEMPLATE, title_text=title, legend_title_text="")
    if x_title:
        fig.update_xaxes(title_text=x_title)
    if y_title:
        fig.update_yaxes(title_text=y_title)
    return fig


def empty_figure(title: str, note: str = NO_DATA) -> go.Figure:
    """A figure with only a title and a centred "no data" note."""
    fig = go.Figure()
    fig.add_annotation(
        text=note,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font={"size": FONT_SIZE + 4, "color": "#7F7F7F"},
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, title)


def _clean(
    df: pd.DataFrame | None, numeric: Sequence[str], required: Sequence[str] = ()
) -> pd.DataFrame | None:
    """Copy of ``df`` with ``numeric`` columns as floats; None when columns are missing or empty.

    Rows are not dropped here: each figure decides what to do with NaN and inf.
    """
    if df is None or len(df) == 0:
        return None
    if any(c not in df.columns for c in (*numeric, *required)):
        return None
    out = df.copy()
    for c in numeric:
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    if "method" in out.columns:
        out["method"] = out["method"].astype(str)
    return out


def _finite(df: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Rows where every one of ``columns`` is finite."""
    mask = np.ones(len(df), dtype=bool)
    for c in columns:
        mask &= np.isfinite(df[c].to_numpy(dtype=float))
    return df[mask]


def _segments(
    xs: Sequence[tuple[float, float]],
    ys: Sequence[tuple[float, float]],
    texts: Sequence[str],
) -> tuple[list, list, list]:
    """Flatten line segments into None-separated x, y and hover text lists for one trace."""
    x: list = []
    y: list = []
    t: list = []
    for (x0, x1), (y0, y1), text in zip(xs, ys, texts, strict=True):
        x += [x0, x1, None]
        y += [y0, y1, None]
        t += [text, text, None]
    return x, y, t


def _layer_names_axis(fig: go.Figure, data: pd.DataFrame) -> None:
    """Label the layer-index axis with the layer names the pickers use, "index · name"."""
    names = data.dropna(subset=["index"]).groupby("index", sort=True)["layer"].first()
    if names.empty:
        return
    fig.update_xaxes(
        tickvals=[float(i) for i in names.index],
        ticktext=[f"{int(i)} · {n}" for i, n in names.items()],
        tickangle=-60,
        tickfont={"size": FONT_SIZE - 5},
    )
    fig.update_layout(margin={"b": 190})


# ------------------------------------------------------------------------------------ ranges


def symlog(values: Any) -> np.ndarray:
    """sign(x) * log10(1 + |x|): a log scale that keeps sign and zero."""
    v = np.asarray(values, dtype=float)
    return np.sign(v) * np.log10(1.0 + np.abs(v))


def _symlog_ticks(max_abs: float) -> tuple[list[float], list[str]]:
    """Tick positions (transformed) and labels (original values) at 0, ±1, ±3, ±10, ±30, ..."""
    values = [0.0]
    k = 0
    while 10.0**k <= max_abs * 3 and k < 12:  # ticks past the axis range are not drawn
        for m in (1.0, 3.0):
            v = m * 10.0**k
            if v <= max_abs * 3:
                values += [v, -v]
        k += 1
    values.sort()
    return [float(symlog(v)) for v in values], [f"{v:g}" for v in values]


def ranges_figure(df: pd.DataFrame, log_scale: bool = False) -> go.Figure:
    """Each method's initialised clipping range per layer, against the observed min/max.

    ``df``: one row per (method, layer), columns method, index, layer, range_lo, range_hi,
    observed_min, observed_max. ``log_scale`` draws sign(x)*log10(1+|x|), tick labels in the
    original units.
    """
    title = "Quantization ranges vs observed min/max"
    cols = ["index", "range_lo", "range_hi"]
    if df is not None and {"observed_min", "observed_max"} <= set(df.columns):
        cols += ["observed_min", "observed_max"]
    data = _clean(df, cols, required=["method", "layer"])
    if data is None:
        return empty_figure(title)
    if "observed_min" not in data.columns:
        data = data.assign(observed_min=math.nan, observed_max=math.nan)
    tf = symlog if log_scale else (lambda v: np.asarray(v, dtype=float))
    ranges = _finite(data, ["index", "range_lo", "range_hi"])
    observed = (
        _finite(data, ["index", "observed_min", "observed_max"])
        .groupby("index", sort=True)
        .agg(layer=("layer", "first"), lo=("observed_min", "min"), hi=("observed_max", "max"))
        .reset_index()
    )
    if ranges.empty and observed.empty:
        return empty_figure(title)

    fig = go.Figure()
    if not observed.empty:
        idx = observed["index"].to_numpy(dtype=float)
        lo, hi = tf(observed["lo"]), tf(observed["hi"])
        text = [
            f"layer {i:g}: {name}<br>observed min {_fmt(a)}, max {_fmt(b)}"
            for i, name, a, b in zip(
                idx, observed["layer"], observed["lo"], observed["hi"], strict=True
            )
        ]
        fig.add_trace(
            go.Bar(
                x=idx,
                y=hi - lo,
                base=lo,
                width=0.9,
                name="observed min..max",
                marker={"color": "rgba(128,128,128,0.25)", "line": {"width": 0}},
                hovertext=text,
                hoverinfo="text",
            )
        )
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([idx, idx]),
                y=np.concatenate([lo, hi]),
                mode="markers",
                name="observed min / max",
                marker={"symbol": "line-ew", "size": 16, "line": {"width": 2.5, "color": "black"}},
                hovertext=text + text,
                hoverinfo="text",
            )
        )

    methods = _ordered_methods(ranges["method"])
    step = 0.7 / max(len(methods), 1)
    for i, method in enumerate(methods):
        sub = ranges[ranges["method"] == method].sort_values("index")
        offset = (i - (len(methods) - 1) / 2) * step
        xs = [(x + offset, x + offset) for x in sub["index"]]
        ys = list(zip(tf(sub["range_lo"]), tf(sub["range_hi"]), strict=True))
        texts = [
            f"<b>{method}</b><br>layer {idx:g}: {name}<br>range [{_fmt(a)}, {_fmt(b)}]"
            for idx, name, a, b in zip(
                sub["index"], sub["layer"], sub["range_lo"], sub["range_hi"], strict=True
            )
        ]
        x, y, t = _segments(xs, ys, texts)
        fig.add_trace(
            go.Scatter(
                x=x,
                y=y,
                mode="lines",
                name=method,
                line={"color": method_color(method), "width": _line_width(method) + 1},
                hovertext=t,
                hoverinfo="text",
            )
        )

    y_title = "value"
    if log_scale:
        all_values = np.concatenate(
            [
                ranges[["range_lo", "range_hi"]].to_numpy().ravel(),
                observed[["lo", "hi"]].to_numpy().ravel(),
            ]
        )
        max_abs = float(np.max(np.abs(all_values))) if all_values.size else 0.0
        tickvals, ticktext = _symlog_ticks(max_abs)
        if len(tickvals) > 1:
            fig.update_yaxes(tickvals=tickvals, ticktext=ticktext)
        y_title = "value (symlog: sign·log10(1+|x|))"
    fig.update_yaxes(zeroline=True, zerolinecolor="#999999", zerolinewidth=1)
    fig.update_layout(barmode="overlay", hovermode="closest")
    _layer_names_axis(fig, data)
    return _style(fig, title, "layer", y_title)


# --------------------------------------------------------------------------------- histogram


def clipped_mass(hist: pd.DataFrame, lo: float, hi: float) -> tuple[float, float]:
    """Fractions of the histogram's mass below ``lo`` and above ``hi``.

    Bins that straddle a bound count in proportion to the part outside it (uniform within a
    bin). NaN bounds clip nothing; an empty or all-zero histogram gives (0.0, 0.0).
    """
    data = _clean(hist, ["left", "right", "count"])
    if data is None:
        return 0.0, 0.0
    data = _finite(data, ["left", "right", "count"])
    left = data["left"].to_numpy(dtype=float)
    right = data["right"].to_numpy(dtype=float)
    count = np.clip(data["count"].to_numpy(dtype=float), 0.0, None)
    total = float(count.sum())
    if total <= 0:
        return 0.0, 0.0
    lo = -math.inf if lo is None or math.isnan(lo) else float(lo)
    hi = math.inf if hi is None or math.isnan(hi) else float(hi)
    width = right - left
    with np.errstate(divide="ignore", invalid="ignore"):
        frac_below = np.where(width > 0, np.clip((lo - left) / width, 0.0, 1.0), left < lo)
        frac_above = np.where(width > 0, np.clip((right - hi) / width, 0.0, 1.0), left > hi)
    below = float((count * frac_below).sum()) / total
    above = float((count * frac_above).sum()) / total
    return below, above


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


@dataclass(frozen=True)
class Grid:
    """A method's quantization grid on one layer's input: its levels and its clipping range.

    ``levels`` may be any array-like (list, NumPy, tensor); it is kept as a tuple of its finite
    values. ``lo``/``hi`` are NaN when unknown (nothing is shaded then).
    """

    levels: tuple[float, ...] = ()
    lo: float = math.nan
    hi: float = math.nan

    def __post_init__(self) -> None:
        values = np.asarray(self.levels, dtype=float).ravel()
        object.__setattr__(self, "levels", tuple(float(v) for v in values if math.isfinite(v)))
        object.__setattr__(self, "lo", _float_or_nan(self.lo))
        object.__setattr__(self, "hi", _float_or_nan(self.hi))

    @classmethod
    def from_dict(cls, grid: Grid | Mapping[str, Any]) -> Grid:
        """A Grid from ``{"levels", "lo", "hi"}`` (missing keys: none / unknown), or as it is."""
        if isinstance(grid, Grid):
            return grid
        return cls(grid.get("levels", ()), grid.get("lo", math.nan), grid.get("hi", math.nan))

    def bounds(self) -> list[float]:
        """The finite ones of lo and hi."""
        return [v for v in (self.lo, self.hi) if math.isfinite(v)]


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


@dataclass(frozen=True)
class _YSpan:
    """The count axis: vertical lines and bands run from ``bottom`` to ``top``."""

    bottom: float
    top: float
    log: bool

    @property
    def axis_range(self) -> list[float]:
        if self.log:
            return [math.log10(self.bottom), math.log10(self.top)]
        return [self.bottom, self.top]


def _histogram_data(hist: pd.DataFrame | None) -> pd.DataFrame | None:
    """The bins with finite edges and counts (negative counts as 0); None when there are none."""
    data = _clean(hist, ["left", "right", "count"])
    if data is None:
        return None
    data = _finite(data, ["left", "right", "count"])
    return None if data.empty else data.assign(count=data["count"].clip(lower=0.0))


def _x_extent(
    data: pd.DataFrame | None, grids: Mapping[str, Grid], observed: Sequence[float]
) -> tuple[float, float] | None:
    """Everything that is drawn along x, with a 3 % margin; None when nothing is."""
    xs = [v for g in grids.values() for v in (*g.levels, *g.bounds())] + list(observed)
    if data is not None:
        xs += [float(data["left"].min()), float(data["right"].max())]
    if not xs:
        return None
    lo, hi = min(xs), max(xs)
    pad = 0.03 * (hi - lo) if hi > lo else 1.0
    return lo - pad, hi + pad


def _y_span(counts: np.ndarray, log_y: bool) -> _YSpan:
    """On a log axis from half the smallest non-zero count to twice the largest; else from 0."""
    positive = counts[counts > 0]
    if log_y:
        if not positive.size:
            return _YSpan(0.5, 10.0, True)
        return _YSpan(float(positive.min()) / 2, float(positive.max()) * 2, True)
    return _YSpan(0.0, float(counts.max()) * 1.05 if positive.size else 1.0, False)


def _histogram_bars(data: pd.DataFrame) -> go.Bar:
    counts = data["count"].to_numpy(dtype=float)
    total = counts.sum()
    text = [
        f"[{_fmt(a)}, {_fmt(b)}): {c:g} ({c / total:.3%})" if total > 0 else f"{c:g}"
        for a, b, c in zip(data["left"], data["right"], counts, strict=True)
    ]
    return go.Bar(
        x=(data["left"] + data["right"]).to_numpy() / 2,
        y=counts,
        width=(data["right"] - data["left"]).to_numpy(),
        name="input histogram",
        marker={"color": "#A0A0A0", "line": {"width": 0}},
        hovertext=text,
        hoverinfo="text",
    )


def _clip_band(method: str, grid: Grid, data: pd.DataFrame, y: _YSpan) -> go.Scatter | None:
    """The data a grid clips, shaded, with the clipped share below/above in its legend entry.

    Only the part of the axis where there is data is shaded, so a range wider than the data
    leaves the figure clear (None: nothing to shade).
    """
    d_lo, d_hi = float(data["left"].min()), float(data["right"].max())
    boxes = []
    if math.isfinite(grid.lo) and grid.lo > d_lo:
        boxes.append((d_lo, min(grid.lo, d_hi)))
    if math.isfinite(grid.hi) and grid.hi < d_hi:
        boxes.append((max(grid.hi, d_lo), d_hi))
    if not boxes:
        return None
    x: list = []
    yy: list = []
    for a, b in boxes:
        x += [a, b, b, a, a, None]
        yy += [y.bottom, y.bottom, y.top, y.top, y.bottom, None]
    below, above = clipped_mass(data, grid.lo, grid.hi)
    color = method_color(method)
    return go.Scatter(
        x=x,
        y=yy,
        mode="lines",
        fill="toself",
        fillcolor=_rgba(color, 0.12),
        line={"color": color, "width": 1.5, "dash": "dash"},
        name=f"clipped by {method}: {below:.2%} below, {above:.2%} above",
        legendgroup=method,
        hovertext=(
            f"clipped by {method}: [{_fmt(grid.lo)}, {_fmt(grid.hi)}]<br>"
            f"{below:.3%} of the mass below, {above:.3%} above"
        ),
        hoverinfo="text",
        hoveron="fills",
    )


def _vertical_lines(
    xs: Sequence[float], texts: Sequence[str], y: _YSpan, name: str, line: dict, **kwargs: Any
) -> go.Scatter:
    """One trace of vertical lines across the count axis, one per x, each with its hover text."""
    x, yy, t = _segments([(v, v) for v in xs], [(y.bottom, y.top)] * len(xs), texts)
    return go.Scatter(
        x=x, y=yy, mode="lines", name=name, line=line, hovertext=t, hoverinfo="text", **kwargs
    )


def _level_lines(method: str, grid: Grid, y: _YSpan) -> go.Scatter:
    """A grid's levels: full-height lines when there are at most MAX_LEVEL_LINES of them;
    otherwise its range as two full-height lines and every level as a short tick at the top
    (a tick band), so 256 levels do not hide the histogram."""
    n = len(grid.levels)
    style = {"color": method_color(method), "width": 2.0 if method == PROMINENT else 1.2}
    texts = [f"{method} level {k + 1}/{n}: {_fmt(v)}" for k, v in enumerate(grid.levels)]
    if n <= MAX_LEVEL_LINES:
        return _vertical_lines(
            grid.levels, texts, y, f"{method}: {n} levels", style, legendgroup=method, opacity=0.85
        )
    if y.log:
        top = math.log10(y.top)
        tick_bottom = 10 ** (top - TICK_BAND * (top - math.log10(y.bottom)))
    else:
        tick_bottom = y.top - TICK_BAND * (y.top - y.bottom)
    bounds = grid.bounds() or [grid.levels[0], grid.levels[-1]]
    xs = [(v, v) for v in grid.levels] + [(v, v) for v in bounds]
    ys = [(tick_bottom, y.top)] * n + [(y.bottom, y.top)] * len(bounds)
    bound_texts = [
        f"{method} range {'low' if i == 0 else 'high'}: {_fmt(v)}" for i, v in enumerate(bounds)
    ]
    x, yy, t = _segments(xs, ys, texts + bound_texts)
    return go.Scatter(
        x=x,
        y=yy,
        mode="lines",
        name=f"{method}: {n} levels (range, levels as ticks)",
        line=style,
        hovertext=t,
        hoverinfo="text",
        legendgroup=method,
        opacity=0.85,
    )


def clip_summary(hist: pd.DataFrame, grid: Grid) -> dict[str, float]:
    """Shares of the data below and above a grid's range, and how much of each lies within half
    a step of the range: those values map to the end level just as rounding would map them, so
    they are not really clipped (the exact zeros of a ReLU input under an LSQ+ offset a hair above
    0, say)."""
    below, above = clipped_mass(hist, grid.lo, grid.hi)
    step = (grid.levels[1] - grid.levels[0]) if len(grid.levels) > 1 else 0.0
    far_below, far_above = clipped_mass(hist, grid.lo - step / 2, grid.hi + step / 2)
    return {
        "below": below,
        "above": above,
        "below_near": max(below - far_below, 0.0),
        "above_near": max(above - far_above, 0.0),
    }


def clip_text(summary: Mapping[str, float]) -> str:
    """``clip_summary`` in words, for a panel: what is clipped, and what only looks clipped."""
    parts = []
    for side in ("below", "above"):
        share, near = summary[side], summary[f"{side}_near"]
        if share <= 0:
            parts.append(f"{side} 0 %")
        elif near >= share * 0.999:
            parts.append(f"{side} {share:.1%}, all within half a step (rounded onto the end level)")
        elif near > 0.0005:
            parts.append(
                f"{side} {share:.1%} ({near:.1%} within half a step: rounded, not clipped)"
            )
        else:
            parts.append(f"{side} {share:.1%}")
    return "outside the range: " + "; ".join(parts)


def histogram_figure(
    hist: pd.DataFrame,
    grids: Mapping[str, Grid | Mapping[str, Any]],
    observed: tuple[float, float] | None = None,
    log_y: bool = True,
    title: str = "Layer input: histogram and quantization grid",
) -> go.Figure:
    """A layer's input histogram with each method's quantization levels and clipped regions.

    ``hist``: columns left, right, count. ``grids``: method -> ``Grid`` (or the same as a dict
    ``{"levels", "lo", "hi"}``). Each method's legend entry for its shaded clipped region gives
    the share of the data clipped below/above (``clipped_mass``). ``observed``: optional
    (min, max) drawn as dotted black lines.
    """
    data = _histogram_data(hist)
    methods = _ordered_methods(grids or {})
    typed = {m: Grid.from_dict(grids[m]) for m in methods}
    obs = [
        (name, float(v))
        for name, v in zip(("min", "max"), observed or (), strict=False)
        if v is not None and math.isfinite(float(v))
    ]
    x_range = _x_extent(data, typed, [v for _, v in obs])
    if x_range is None:
        return empty_figure(title)
    y = _y_span(data["count"].to_numpy(dtype=float) if data is not None else np.zeros(0), log_y)

    fig = go.Figure()
    if data is not None:
        fig.add_trace(_histogram_bars(data))
    for method, grid in typed.items():
        band = _clip_band(method, grid, data, y) if data is not None else None
        if band is not None:
            fig.add_trace(band)
        if grid.levels:
            fig.add_trace(_level_lines(method, grid, y))
    if obs:
        fig.add_trace(
            _vertical_lines(
                [v for _, v in obs],
                [f"observed {name} {_fmt(v)}" for name, v in obs],
                y,
                "observed min / max",
                {"color": "black", "width": 2, "dash": "dot"},
            )
        )
    fig.update_xaxes(range=list(x_range))
    fig.update_yaxes(type="log" if log_y else "linear", range=y.axis_range)
    if log_y:
        _readable_log(fig, "y", y.bottom, y.top)
    fig.update_layout(bargap=0, hovermode="closest", legend={"groupclick": "togglegroup"})
    return _style(fig, title, "input value", "count (log scale)" if log_y else "count")


def histogram_panels_figure(
    hist: pd.DataFrame,
    grids: Mapping[str, Grid | Mapping[str, Any]],
    observed: tuple[float, float] | None = None,
    log_y: bool = True,
    title: str = "Layer input: histogram and each method's grid",
    notes: Mapping[str, str] | None = None,
    keep_order: bool = False,
    outside: Mapping[str, Mapping[str, float]] | None = None,
) -> go.Figure:
    """One panel per method (small multiples sharing the x axis): the same histogram, that
    method's levels (or range and tick band), its clipped region shaded, and the clipped share
    written on the panel (``clip_text``; ``outside``: exact shares per method instead of the
    histogram's estimate). ``notes``: an extra line per method (an MSE, say). Panels follow the
    usual method order, or the order of ``grids`` with ``keep_order``."""
    data = _histogram_data(hist)
    methods = list(grids or {}) if keep_order else _ordered_methods(grids or {})
    typed = {m: Grid.from_dict(grids[m]) for m in methods}
    obs = [float(v) for v in (observed or ()) if v is not None and math.isfinite(float(v))]
    x_range = _x_extent(data, typed, obs)
    if x_range is None or not methods:
        return empty_figure(title)
    counts = data["count"].to_numpy(dtype=float) if data is not None else np.zeros(0)
    y = _y_span(counts, log_y)
    heads = [
        _panel_head(m, typed[m], data, (outside or {}).get(m), (notes or {}).get(m))
        for m in methods
    ]
    fig = make_subplots(
        rows=len(methods),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.12 / max(len(methods), 1) + 0.03,
        subplot_titles=heads,
    )
    for row, (method, grid) in enumerate(typed.items(), start=1):
        if data is not None:
            bars = _histogram_bars(data)
            bars.update(showlegend=row == 1, legendgroup="histogram")
            fig.add_trace(bars, row=row, col=1)
            band = _clip_band(method, grid, data, y)
            if band is not None:
                band.update(showlegend=False)
                fig.add_trace(band, row=row, col=1)
        if grid.levels:
            fig.add_trace(_level_lines(method, grid, y), row=row, col=1)
        if obs:
            lines = _vertical_lines(
                obs,
                [f"observed {_fmt(v)}" for v in obs],
                y,
                "observed min / max",
                {"color": "black", "width": 2, "dash": "dot"},
                legendgroup="observed",
                showlegend=row == 1,
            )
            fig.add_trace(lines, row=row, col=1)
    for a in fig.layout.annotations:  # the panel heads: left-aligned, readable
        a.update(x=0, xanchor="left", font={"size": FONT_SIZE - 2})
    fig.update_xaxes(range=list(x_range))
    fig.update_yaxes(type="log" if log_y else "linear", range=y.axis_range)
    if log_y:
        _readable_log(fig, "y", y.bottom, y.top)
    fig.update_xaxes(title_text="input value", row=len(methods), col=1)
    fig.update_layout(
        height=140 + 210 * len(methods),
        bargap=0,
        hovermode="closest",
        legend={"orientation": "h", "y": -0.12 if len(methods) > 1 else -0.3, "x": 0},
    )
    return _style(fig, title, "", "count (log)" if log_y else "count")


def _panel_head(
    method: str,
    grid: Grid,
    data: pd.DataFrame | None,
    outside: Mapping[str, float] | None = None,
    note: str | None = None,
) -> str:
    """A histogram panel's head: the method, its clipped shares (``outside``: exact shares, when
    the caller counted them; else the histogram's estimate) and an extra line."""
    text = f"<b>{method}</b>"
    if outside is None and data is not None and grid.bounds():
        outside = clip_summary(data, grid)
    if outside is not None:  # on lines of their own: never cut off
        clipped = clip_text(outside)
        text += "<br>" + clipped.replace(": ", ":<br>", 1).replace("; ", ";<br>")
    if note:
        text += f"<br>{note}"
    return text


def intro_figure(
    hist: pd.DataFrame, grids: Sequence[tuple[str, str, Grid, float, float, float]], bits: int
) -> go.Figure:
    """The paper's opening picture: a Swish-like distribution and each grid at its best range.

    ``grids``: (name, label, Grid, mse, clipping error, rounding error) per panel, in order.
    """
    named = {name: grid for name, _, grid, *_ in grids}
    best = min((mse for *_, mse, _, _ in grids), default=math.nan)
    notes = {
        name: f"{label} — MSE {mse:.2e} (clipping {clip:.1e} + rounding {rnd:.1e})"
        + (" ← least" if mse == best else f", {mse / best:.1f}× LSQ+'s" if best > 0 else "")
        for name, label, _, mse, clip, rnd in grids
    }
    fig = histogram_panels_figure(
        hist,
        named,
        log_y=False,
        title=f"Swish-like activations at {bits} bits: three grids, each at its best range",
        notes=notes,
        keep_order=True,
    )
    return fig


class LabPicture:
    """The range lab's picture of one layer, made in two parts: the histogram, the observed
    min/max and the layout once (``histogram_panels_figure`` with an empty grid, kept as plain
    JSON), then per move only the grid: its clipped band, its levels, the panel's head and the x
    extent. ``figure`` is ``histogram_panels_figure`` of that one grid, at a third of the cost."""

    def __init__(self, hist: pd.DataFrame, observed: tuple[float, float]) -> None:
        self.data = _histogram_data(hist)
        self.observed = [float(v) for v in observed if math.isfinite(float(v))]
        self.y = _y_span(self.data["count"].to_numpy(dtype=float), True)
        base = histogram_panels_figure(hist, {"_": Grid([], None, None)}, observed, **LAB_TITLE)
        self.base = base.to_plotly_json()

    def figure(
        self, grid: Grid, label: str, outside: Mapping[str, float] | None = None
    ) -> go.Figure:
        """The picture under ``grid``, drawn as ``label``'s (its colour and name); ``outside``:
        the exact shares outside the range, written on the panel."""
        band = _clip_band(label, grid, self.data, self.y)
        traces = [] if band is None else [band.update(showlegend=False)]
        if grid.levels:
            traces.append(_level_lines(label, grid, self.y))
        data = list(self.base["data"])  # the grid after the bars, on the one panel's axes
        data[1:1] = [t.update(xaxis="x", yaxis="y").to_plotly_json() for t in traces]
        layout = dict(self.base["layout"])
        head = dict(layout["annotations"][0], text=_panel_head(label, grid, self.data, outside))
        layout["annotations"] = [head, *layout["annotations"][1:]]
        x_range = _x_extent(self.data, {label: grid}, self.observed)
        layout["xaxis"] = dict(layout["xaxis"], range=list(x_range))
        return go.Figure({"data": data, "layout": layout})


#: The range lab picture's title (the panel figure's keyword).
LAB_TITLE = {"title": "This layer's input"}


def lab_figure(
    hist: pd.DataFrame,
    grid: Grid,
    observed: tuple[float, float],
    label: str,
    outside: Mapping[str, float] | None = None,
) -> go.Figure:
    """The range lab's picture: the layer's input histogram under the chosen grid. ``outside``:
    the exact shares outside the range (``lsq.lab.ErrorSplit.clip_summary``), written on the
    panel instead of the histogram's estimate (which spreads a spike, ReLU's zeros say, over
    its bin). Made by a ``LabPicture``, which keeps the histogram's part across moves."""
    return LabPicture(hist, observed).figure(grid, label, outside)


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Ticks for a log axis from ``lo`` to ``hi`` that all carry full labels: 1-2-5 per decade
    when the axis spans under three decades, else only the powers of ten."""
    if not (lo > 0 and hi > lo):
        return [], []
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mantissas = (1, 2, 5) if k1 - k0 < 3 else (1,)
    step = 1 if k1 - k0 <= 8 else math.ceil((k1 - k0) / 8)
    vals = [m * 10.0**k for k in range(k0, k1 + 1, step) for m in mantissas]
    vals = [v for v in vals if lo <= v <= hi]
    return vals, [f"{v:g}" for v in vals]


def _readable_log(fig: go.Figure, axis: str, lo: float, hi: float) -> None:
    """Full tick labels on a log axis (plotly otherwise shows bare minor digits like "2 5")."""
    vals, text = _log_ticks(lo, hi)
    if len(vals) >= 2:
        update = fig.update_yaxes if axis == "y" else fig.update_xaxes
        update(tickvals=vals, ticktext=text, minor={"showgrid": False})


# ------------------------------------------------------------------------------------ curves


def _method_colors(methods: Iterable[str]) -> dict[str, str]:
    return {m: method_color(m) for m in methods}


def _emphasise(fig: go.Figure, marker_shrink: int = 0) -> None:
    """LSQ+ drawn thicker than the others; markers only where a line has few points."""
    for t in fig.data:
        t.update(
            mode="lines+markers" if len(t.x) <= 60 else "lines",
            line_width=_line_width(t.name),
            marker_size=_marker_size(t.name) - marker_shrink,
        )


def curves_figure(
    metrics: pd.DataFrame, y: str = "loss", log_y: bool | None = None, title: str | None = None
) -> go.Figure:
    """``y`` against training step, one line per method; NaN/inf rows dropped.

    ``log_y``: None chooses a log axis for KL columns when all values are positive.
    """
    label = _label(y)
    title = title or f"Training: {label}"
    data = _clean(metrics, ["step", y], required=["method"])
    if data is None:
        return empty_figure(title)
    data = _finite(data, ["step", y])
    if data.empty:
        return empty_figure(title)
    if log_y is None:
        log_y = "kl" in y.lower() and bool((data[y] > 0).all())
    elif log_y:
        data = data[data[y] > 0]
    methods = _ordered_methods(data["method"])
    fig = px.line(
        data.sort_values("step"),
        x="step",
        y=y,
        color="method",
        color_discrete_map=_method_colors(methods),
        category_orders={"method": methods},
        log_y=log_y,
    )
    _emphasise(fig)
    for t in fig.data:
        t.hovertemplate = f"<b>{t.name}</b><br>step %{{x}}<br>{y} %{{y:.6g}}<extra></extra>"
    if log_y and len(data):
        _readable_log(fig, "y", float(data[y].min()), float(data[y].max()))
    fig.update_layout(hovermode="x unified")
    return _style(fig, title, "training step", label + (" (log scale)" if log_y else ""))


# -------------------------------------------------------------------------------- trajectory

_TRAJECTORY_PANELS = {"scale": "scale s", "offset": "offset β"}


def trajectory_figure(traj: pd.DataFrame, layer: str) -> go.Figure:
    """A layer's learned scale (top row) and offset (bottom row) against training step, one
    column per method, every panel with its own y range: methods' scales differ by orders of
    magnitude, and on a shared axis every line looks flat."""
    title = f"Learned quantizer parameters: {layer}"
    data = _clean(traj, ["step", "scale", "offset"], required=["method", "layer"])
    if data is None:
        return empty_figure(title)
    data = data[data["layer"].astype(str) == str(layer)]
    long = data.melt(
        id_vars=["method", "step"], value_vars=list(_TRAJECTORY_PANELS), var_name="parameter"
    )
    long = _finite(long, ["step", "value"])
    if long.empty:
        return empty_figure(title)
    methods = _ordered_methods(long["method"])
    fig = px.line(
        long.sort_values("step"),
        x="step",
        y="value",
        color="method",
        facet_row="parameter",
        facet_col="method" if len(methods) > 1 else None,
        custom_data=["parameter"],
        color_discrete_map=_method_colors(methods),
        category_orders={"method": methods, "parameter": list(_TRAJECTORY_PANELS)},
    )
    _emphasise(fig, marker_shrink=2)
    for t in fig.data:
        parameter = t.customdata[0][0]
        t.hovertemplate = f"<b>{t.name}</b><br>step %{{x}}<br>{parameter} %{{y:.6g}}<extra></extra>"
        fig.layout["yaxis" + t.yaxis[1:]].title.text = _TRAJECTORY_PANELS[parameter]
    # px's "parameter=..." labels go (the y titles say it); "method=lsq+" becomes "lsq+".
    fig.layout.annotations = [
        a.update(text=a.text.split("=", 1)[1], font={"size": FONT_SIZE})
        for a in fig.layout.annotations
        if a.text.startswith("method=")
    ]
    fig.update_yaxes(matches=None, showticklabels=True)  # every panel its own range
    fig.for_each_xaxis(lambda ax: ax.update(title_text="training step") if ax.title.text else None)
    fig.update_layout(height=600, hovermode="x unified")
    return _style(fig, title)


# ------------------------------------------------------------------------------- layer error


def layer_error_figure(
    df: pd.DataFrame, metric: str = "output_sqnr_db", worst: int = 5
) -> go.Figure:
    """Per-layer error of each method over layer index; the ``worst`` layers of LSQ+ marked.

    Higher is better (SQNR). +inf (exact) is drawn at the largest finite value + 10 and -inf at
    the smallest - 10, with hover saying so; NaN is dropped. The reference method for the worst
    layers is "lsq+", else the first method in ``df``.
    """
    label = _label(metric)
    title = f"Per-layer error: {label}"
    data = _clean(df, ["index", metric], required=["method", "layer"])
    if data is None:
        return empty_figure(title)
    data = data[np.isfinite(data["index"]) & data[metric].notna()]
    if data.empty:
        return empty_figure(title)
    values = data[metric].to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    bottom = float(finite.min()) if finite.size else 0.0
    data = data.assign(
        _value=np.clip(values, bottom - INF_MARGIN, top + INF_MARGIN),
        _note=np.where(
            values == math.inf,
            " (exact: +inf, drawn capped)",
            np.where(values == -math.inf, " (-inf, drawn capped)", ""),
        ),
        _kind=data["kind"].astype(str) if "kind" in data.columns else "",
    )

    fig = go.Figure()
    for method in _ordered_methods(data["method"]):
        sub = data[data["method"] == method].sort_values("index")
        raw = sub[metric].to_numpy(dtype=float)
        text = [
            f"<b>{method}</b><br>layer {i:g}: {name}<br>kind {kind}<br>{metric} "
            f"{'+inf' if v == math.inf else '-inf' if v == -math.inf else _fmt(v)}{note}"
            for i, name, kind, v, note in zip(
                sub["index"], sub["layer"], sub["_kind"], raw, sub["_note"], strict=True
            )
        ]
        fig.add_trace(
            go.Scatter(
                x=sub["index"],
                y=sub["_value"],
                mode="lines+markers",
                name=method,
                line={"color": method_color(method), "width": _line_width(method)},
                marker={
                    "size": _marker_size(method),
                    "symbol": np.where(np.isinf(raw), "triangle-up", "circle").tolist(),
                },
                hovertext=text,
                hoverinfo="text",
            )
        )

    reference = PROMINENT if (data["method"] == PROMINENT).any() else data["method"].iloc[0]
    ref = data[data["method"] == reference]
    if worst > 0 and not ref.empty:
        low = ref.nsmallest(worst, "_value")
        fig.add_trace(
            go.Scatter(
                x=low["index"],
                y=low["_value"],
                mode="markers",
                name=f"worst {len(low)} layers ({reference})",
                marker={"size": 20, "color": "rgba(0,0,0,0)", "line": {"color": "red", "width": 3}},
                hovertext=[f"worst: {name}" for name in low["layer"]],
                hoverinfo="text",
            )
        )
        for k, (_, row) in enumerate(low.sort_values("index").iterrows()):
            fig.add_annotation(
                x=row["index"],
                y=row["_value"],
                text=str(row["layer"]),
                showarrow=True,
                arrowhead=2,
                arrowcolor="red",
                ax=0,
                ay=40 + 34 * (k % 3),  # neighbours in index get different heights
                font={"size": FONT_SIZE - 4, "color": "red"},
                bgcolor="rgba(255,255,255,0.8)",
            )
    fig.update_layout(hovermode="closest")
    _layer_names_axis(fig, data)
    return _style(fig, title, "layer", label)


# ------------------------------------------------------------------------------ error split

SPLIT_COLORS = {"clipping": "#B2182B", "rounding": "#92C5DE"}


def error_split_figure(df: pd.DataFrame) -> go.Figure:
    """Each layer's input quantization error split into clipping and rounding, stacked, one
    panel per method (sharing the layer axis). Both as a share of the input's power (noise to
    signal, %), so layers of any scale compare: a method that clips hard shows red, one whose
    range is too wide shows blue.

    ``df``: one row per (method, layer) with index, layer, clip_error, round_error, input_power.
    """
    title = "Why each range: input error from clipping vs from rounding"
    cols = ["index", "clip_error", "round_error", "input_power"]
    data = _clean(df, cols, required=["method", "layer"])
    if data is None:
        return empty_figure(title)
    data = _finite(data, cols)
    data = data[data["input_power"] > 0]
    if data.empty:
        return empty_figure(title)
    data = data.assign(
        clipping=100 * data["clip_error"] / data["input_power"],
        rounding=100 * data["round_error"] / data["input_power"],
    )
    methods = _ordered_methods(data["method"])
    heads = []
    for m in methods:
        sub = data[data["method"] == m]
        clip, rnd = sub["clip_error"].sum(), sub["round_error"].sum()
        share = clip / (clip + rnd) if clip + rnd > 0 else 0.0
        heads.append(f"<b>{m}</b> · clipping is {share:.0%} of its summed input error")
    fig = make_subplots(
        rows=len(methods), cols=1, shared_xaxes=True, subplot_titles=heads, vertical_spacing=0.06
    )
    for row, method in enumerate(methods, start=1):
        sub = data[data["method"] == method].sort_values("index")
        for part, color in SPLIT_COLORS.items():
            text = [
                f"<b>{method}</b><br>{int(i)} · {name}<br>{part}: {v:.3g} % of the input power"
                for i, name, v in zip(sub["index"], sub["layer"], sub[part], strict=True)
            ]
            fig.add_trace(
                go.Bar(
                    x=sub["index"],
                    y=sub[part],
                    name=part,
                    marker={"color": color, "line": {"width": 0}},
                    legendgroup=part,
                    showlegend=row == 1,
                    hovertext=text,
                    hoverinfo="text",
                ),
                row=row,
                col=1,
            )
        fig.update_yaxes(title_text="% of power", row=row, col=1)
    for a in fig.layout.annotations:
        a.update(x=0, xanchor="left", font={"size": FONT_SIZE - 2})
    fig.update_layout(
        barmode="stack",
        bargap=0.15,
        height=200 + 190 * len(methods),
        hovermode="closest",
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    _layer_names_axis(fig, data)
    fig.update_xaxes(showticklabels=False)
    fig.update_xaxes(showticklabels=True, row=len(methods), col=1)
    return _style(fig, title)


# ------------------------------------------------------------------------------- sensitivity


def sensitivity_figure(df: pd.DataFrame, log_x: bool = True, top: int | None = None) -> go.Figure:
    """KL to float per unit when only its weights or only its activations are quantized.

    Units sorted by their larger KL, the worst at the top; ``top`` keeps only the worst few.
    On a log axis, zero KL is drawn at a tenth of the smallest positive value (hover is exact).
    """
    title = "Where the error comes from (KL when only this part is quantized)"
    data = _clean(df, ["kl"], required=["unit", "part"])
    if data is None:
        return empty_figure(title)
    data = data.assign(unit=data["unit"].astype(str), part=data["part"].astype(str))
    data = data[data["kl"].notna() & (data["kl"] != -math.inf)]
    finite = data["kl"][np.isfinite(data["kl"])]
    if finite.empty:
        return empty_figure(title)
    cap = float(finite.max()) * 10 if log_x else float(finite.max()) * 1.2
    positive = finite[finite > 0]
    floor = float(positive.min()) / 10 if positive.size else 1e-6
    drawn = data["kl"].clip(upper=cap)
    if log_x:
        drawn = drawn.clip(lower=floor)
    data = data.assign(_drawn=drawn)
    order = data.groupby("unit")["kl"].max().sort_values(ascending=False)
    if top is not None:
        order = order.iloc[: max(top, 0)]
    data = data[data["unit"].isin(order.index)]
    units = list(order.index[::-1])  # plotly draws the first category at the bottom

    parts = [p for p in PART_COLORS if p in set(data["part"])]
    parts += [p for p in dict.fromkeys(data["part"]) if p not in PART_COLORS]
    data = data.assign(
        _series=[f"only {p} quantized" for p in data["part"]],
        _hover=[
            f"{u}, {p}: KL {_fmt(v)}"
            for u, p, v in zip(data["unit"], data["part"], data["kl"], strict=True)
        ],
    )
    fig = px.bar(
        data,
        y="unit",
        x="_drawn",
        color="_series",
        orientation="h",
        barmode="group",
        hover_name="_hover",
        category_orders={"_series": [f"only {p} quantized" for p in parts]},
        color_discrete_map={
            f"only {p} quantized": PART_COLORS.get(p, method_color(p)) for p in parts
        },
        log_x=log_x,
    )
    fig.update_traces(hovertemplate="%{hovertext}<extra></extra>")
    fig.update_yaxes(categoryorder="array", categoryarray=units, automargin=True)
    fig.update_yaxes(title_text="")  # the unit names say it
    if log_x:
        _readable_log(fig, "x", float(data["_drawn"].min()), float(data["_drawn"].max()))
    fig.update_layout(
        height=max(420, 34 * len(units) * max(len(parts), 1) // 2 + 180),
        legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
    )
    x_title = "KL divergence to the float model" + (" (log scale)" if log_x else "")
    return _style(fig, title, x_title, "")


# ----------------------------------------------------------------------------------- compare


def compare_figure(
    df: pd.DataFrame, metric: str = "init_kl", log_y: bool | None = None
) -> go.Figure:
    """``metric`` per bit width (categories, most bits first) and method, as grouped bars.

    ``log_y``: None chooses a log axis for KL metrics. Duplicate (method, bits) rows are
    averaged; NaN/inf dropped, and non-positive values dropped on a log axis.
    """
    label = _label(metric)
    title = f"Methods compared: {label}"
    data = _clean(df, [metric], required=["method", "bits"])
    if data is None:
        return empty_figure(title)
    if log_y is None:
        log_y = "kl" in metric.lower()
    data = _finite(data, [metric])
    if log_y:
        data = data[data[metric] > 0]
    if data.empty:
        return empty_figure(title)
    numeric_bits = pd.to_numeric(data["bits"], errors="coerce")
    if numeric_bits.notna().all():
        data = data.assign(bits=numeric_bits.astype(float))
        order = [f"{b:g}" for b in sorted(set(data["bits"]), reverse=True)]
        data = data.assign(bits=[f"{b:g}" for b in data["bits"]])
    else:
        data = data.assign(bits=data["bits"].astype(str))
        order = list(dict.fromkeys(data["bits"]))
    mean = data.groupby(["method", "bits"], sort=False)[metric].mean().reset_index()

    methods = _ordered_methods(mean["method"])
    mean = mean.assign(_order=mean["bits"].map(order.index)).sort_values("_order")
    fig = px.bar(
        mean,
        x="bits",
        y=metric,
        color="method",
        barmode="group",
        text=[f"{v:.3g}" for v in mean[metric]],
        color_discrete_map=_method_colors(methods),
        category_orders={"method": methods, "bits": order},
        log_y=log_y,
    )
    for t in fig.data:
        t.update(
            marker_line={"color": "black", "width": 2 if t.name == PROMINENT else 0},
            textposition="outside",
            hovertemplate=f"<b>{t.name}</b><br>%{{x}} bits<br>{metric} %{{y:.6g}}<extra></extra>",
        )
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)
    if log_y:
        _readable_log(fig, "y", float(mean[metric].min()), float(mean[metric].max()))
    fig.update_layout(hovermode="closest")
    return _style(fig, title, "bits", label + (" (log scale)" if log_y else ""))


# -------------------------------------------------------------------------- reconstruction
def units_figure(units: pd.DataFrame) -> go.Figure:
    """Each unit's output error before and after block-wise reconstruction, per method.

    ``units``: columns method, unit, index, before, after (``lsq.explorer.units_frame``). The
    error axis is logarithmic: the stem's error and a late block's differ by orders of magnitude.
    """
    title = "Block-wise reconstruction: each unit's output error (quantized input) before and after"
    data = _clean(units, ["index", "before", "after"], required=["method", "unit"])
    if data is None:
        return empty_figure(title)
    data = _finite(data, ["before", "after"])
    data = data[(data["before"] > 0) & (data["after"] > 0)]
    if data.empty:
        return empty_figure(title)
    long = data.melt(
        id_vars=["method", "unit", "index"],
        value_vars=["before", "after"],
        var_name="when",
        value_name="error",
    )
    methods = _ordered_methods(long["method"])
    fig = px.line(
        long.sort_values("index"),
        x="unit",
        y="error",
        color="method",
        line_dash="when",
        markers=True,
        color_discrete_map=_method_colors(methods),
        category_orders={"method": methods, "when": ["before", "after"]},
        log_y=True,
    )
    for t in fig.data:
        t.hovertemplate = "%{x}<br>error %{y:.4g}<extra>" + t.name + "</extra>"
    _readable_log(fig, "y", float(long["error"].min()), float(long["error"].max()))
    fig.update_xaxes(tickangle=-45)
    return _style(fig, title, "unit (in the order data flows)", "output error (MSE; KL last)")


# ------------------------------------------------------------------------- presentation mode

#: Presentation mode (a projector at the back of a room): every font this many times larger,
#: tick labels at PRESENT_TICK px, and text, ticks and axis lines in PRESENT_INK.
PRESENT_SCALE = 1.4
PRESENT_TICK = 20
PRESENT_INK = "#111111"
PRESENT_GRID = "#B0B0B0"
#: Labelled ticks on an axis at most (50 layer names at 20 px pile into a block): every k-th.
PRESENT_MAX_TICKS = 17
#: Colours of text that carries no meaning of its own (plotly's default, greys): made ink.
_PLAIN_TEXT = {None, "", "#7F7F7F", "#444", "#2a3f5f", "gray", "grey"}
#: Annotations longer than this (characters) break after their first "; " in presentation mode.
PRESENT_LINE = 80
_DEFAULT_MARGIN = {"t": 80, "l": 80, "r": 30, "b": 70}
_DEFAULT_HEIGHT = 450


def _bigger(size: float | None, default: float) -> int:
    return round((size or default) * PRESENT_SCALE)


def presentation(fig: go.Figure) -> go.Figure:
    """A copy of ``fig`` for projection: every font PRESENT_SCALE times larger (title, axis
    titles, legend, hover, annotations such as panel heads), tick labels at PRESENT_TICK px
    (ones a figure made small on purpose, 50 layer names say, PRESENT_SCALE times theirs),
    dark text, ticks and axis lines, darker grid lines, and margins and height grown to fit.
    Written as explicit layout values, so they hold over any chart theme (Streamlit's draws
    small grey tick labels otherwise); colours that mean something (a method's, the red
    worst-layer labels) are kept."""
    out = go.Figure(fig)
    base = out.layout.template.layout if out.layout.template else go.Layout()
    font = out.layout.font.size or base.font.size or FONT_SIZE
    ink = {"color": PRESENT_INK}
    out.update_layout(
        font={"size": _bigger(font, FONT_SIZE), **ink},
        title_font={"size": _bigger(out.layout.title.font.size or base.title.font.size, 22)},
        title_font_color=PRESENT_INK,
        legend_font={"size": _bigger(out.layout.legend.font.size or base.legend.font.size, 14)},
        legend_font_color=PRESENT_INK,
        hoverlabel_font_size=_bigger(base.hoverlabel.font.size, FONT_SIZE - 2),
        margin={
            k: _bigger(out.layout.margin[k] or base.margin[k], _DEFAULT_MARGIN[k])
            for k in _DEFAULT_MARGIN
        },
        height=_bigger(out.layout.height, _DEFAULT_HEIGHT),
    )

    def axis(ax) -> None:
        size = ax.tickfont.size  # set on purpose when small (50 layer names): scaled
        if ax.tickvals is not None and len(ax.tickvals) > PRESENT_MAX_TICKS:
            every = math.ceil(len(ax.tickvals) / PRESENT_MAX_TICKS)  # a label a tick: a block
            ax.update(tickvals=ax.tickvals[::every], ticktext=(ax.ticktext or ())[::every] or None)
        ax.update(
            tickfont={"size": PRESENT_TICK if size is None else _bigger(size, PRESENT_TICK)},
            title_font={"size": _bigger(ax.title.font.size, font), **ink},
            tickcolor=PRESENT_INK,
            linecolor=PRESENT_INK,
            gridcolor=PRESENT_GRID,
        )
        ax.tickfont.color = PRESENT_INK

    out.for_each_xaxis(axis)
    out.for_each_yaxis(axis)
    for a in out.layout.annotations:
        color = a.font.color if a.font.color not in _PLAIN_TEXT else PRESENT_INK
        text = a.text or ""
        if len(re.sub(r"<[^>]+>", "", text)) > PRESENT_LINE:  # a long panel head: two lines
            text = text.replace("; ", ";<br>", 1)
        a.update(text=text, font={"size": _bigger(a.font.size, font), "color": color})
    return out


# ------------------------------------------------------------------------- trajectory replay


def replay_figure(
    hist: pd.DataFrame,
    grids: Mapping[str, Grid | Mapping[str, Any]],
    observed: tuple[float, float] | None,
    layer: str,
    step: int,
    last: int,
) -> go.Figure:
    """A layer's input histogram under each trained method's grid at one training step (small
    multiples, as ``histogram_panels_figure``): stepping through them shows the range move.

    ``grids``: method -> the grid at ``step`` (``lsq.analysis.grid_at_step``); ``last``: the
    last step recorded, for the title.
    """
    return histogram_panels_figure(
        hist,
        grids,
        observed,
        title=f"Replay: {layer}'s grid at step {step} of {last}",
    )
