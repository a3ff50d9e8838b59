"""Health checks: which layers of a quantized model look wrong, each with a one-line reason.

The checks read plain facts, so they work the same on a live model (``model_health``) and on a
saved run (``run_health``, from its ``layers.csv``, ``state.safetensors`` and
``trajectories.csv``):

- negative_input: negative values reach an unsigned grid and are clipped to 0 (LSQ+'s motivation);
- scale_floor: a scale sits at SCALE_FLOOR (an activation, or a weight channel that is not dead);
- scale_collapse: an activation scale shrank by more than COLLAPSE times during QAT;
- offset_outside: an LSQ+ offset left the observed data range;
- range_too_wide: less than WIDE_USE of the grid's span holds data (levels wasted);
- dead_channels: weight output channels that are all zero (or below DEAD_RELATIVE of the
  layer's largest weight);
- weight_oscillation: during QAT, at least FLIP_SHARE of a layer's weights cross a rounding
  boundary (change integer code) per step over the second half of training, while their code
  changes add up to at least OSCILLATION times their net movement: most flips are undone, the
  weights bounce between two levels instead of learning (training counts the flips per step and
  layer, ``lsq.train.WeightFlips``; ``trajectories.csv`` keeps them).

Each finding carries a ``severity`` (larger is worse; per check: the share of inputs negative,
of channels dead or at the floor, of weights flipping; how many times too wide or collapsed; how
many data spans the offset lies away) to name a check's worst layers first.

Reported for several methods (the app's pages) or runs (``lsq health``), ``combine`` keeps the
float model's findings once: a check in FLOAT_CHECKS reads only a layer's weights, never a
quantizer, so what it finds in every method is the float model's (every method starts from its
weights), not any method's. ``group_findings`` then gives one row per check and method: how many
layers, the worst few, and one short reason; the per-layer rows stay the detail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
import torch
from torch import Tensor, nn

from lsq.calibrate import ActStats
from lsq.convert import quant_layers
from lsq.quantizers import SCALE_FLOOR

#: More than this share of a layer's inputs negative on an unsigned grid is reported.
NEGATIVE_SHARE = 0.01
#: A scale within this factor of SCALE_FLOOR counts as at the floor.
FLOOR_FACTOR = 10.0
#: An activation scale that ends below 1/COLLAPSE of where it started has collapsed.
COLLAPSE = 5.0
#: An offset more than this share of the data span below the observed min is outside it.
OFFSET_MARGIN = 0.25
#: A grid whose span holds data on less than this share of it wastes its levels.
WIDE_USE = 0.25
#: A weight channel whose largest magnitude is below this share of the layer's largest is dead
#: (the bundled model has channels at 1e-8 next to ones at 3: zero in all but name).
DEAD_RELATIVE = 1e-6
#: A layer whose weights change code at this share per step (mean over the second half of
#: training) flips a lot. Measured on the bundled model (LSQ+, Adam at the default rates, 20
#: steps, 160 px): the median layer flips 1.0 % of its weights per step at W8A4 (the most, a
#: depthwise layer, 6 %) and 0.006 % at W4A4 (larger steps are harder to cross).
FLIP_SHARE = 0.01
#: ... and oscillates when its flips add up to this many times the net codes its weights moved
#: (a weight that flips up and back: two flips, no net movement). In the runs above the flips
#: were 1.1 to 1.8 times the net movement in every layer: weights learning, none flagged.
OSCILLATION = 2.0
#: Fewest training steps (with flip counts) before the oscillation check says anything.
FLIP_MIN_STEPS = 4

CHECKS = (
    "negative_input",
    "scale_floor",
    "scale_collapse",
    "offset_outside",
    "range_too_wide",
    "dead_channels",
    "weight_oscillation",
)
COLUMNS = ["layer", "check", "reason", "severity"]
#: Checks that read only a layer's weights (no quantizer, no activation): what they find is the
#: float model's while the weights are its own. Every other check reads a quantizer's scale,
#: offset or grid (or how QAT moved them), so it belongs to a method.
FLOAT_CHECKS = frozenset({"dead_channels"})
#: The method column's value for the float model's findings, reported once.
FLOAT_MODEL = "float model"
#: Layers named per grouped row, worst first.
WORST = 3
#: A grouped row's reason when the check fired in more than one layer; {worst} is the largest
#: severity (one layer: that layer's own reason).
SUMMARIES = {
    "negative_input": "negative inputs clipped to 0 on an unsigned grid (up to {worst:.0%} of "
    "a layer's inputs)",
    "scale_floor": "scales at the floor ({floor:g}) though their inputs or weights are not zero",
    "scale_collapse": "input scale shrank during QAT (up to {worst:.3g}x)",
    "offset_outside": "offset outside the inputs seen (up to {worst:.3g} data spans away)",
    "range_too_wide": "range much wider than the data: most levels unused (up to {worst:.3g}x)",
    "dead_channels": "output channels with zero weights: they add nothing (up to {worst:.1%} "
    "of a layer's channels)",
    "weight_oscillation": "weights bounce across a rounding boundary during QAT (up to "
    "{worst:.1%} of a layer's weights a step)",
}
GROUP_COLUMNS = ["method", "check", "layers", "worst", "reason"]


def _finding(layer: str, check: str, reason: str, severity: float) -> dict:
    return {"layer": layer, "check": check, "reason": reason, "severity": float(severity)}


def check_ranges(layers: pd.DataFrame) -> list[dict]:
    """Checks on each layer's input range against what calibration observed.

    ``layers``: one row per layer with layer, grid (asymmetric/unsigned/signed), range_lo,
    range_hi, observed_min, observed_max, negative_fraction (``analysis.layer_table``'s columns).
    """
    out = []
    need = {"layer", "grid", "range_lo", "range_hi", "observed_min", "observed_max"}
    if layers is None or layers.empty or not need <= set(layers.columns):
        return out
    for row in layers.to_dict("records"):
        name, grid = str(row["layer"]), str(row["grid"])
        lo, hi = float(row["range_lo"]), float(row["range_hi"])
        dmin, dmax = float(row["observed_min"]), float(row["observed_max"])
        if not all(math.isfinite(v) for v in (lo, hi, dmin, dmax)):
            continue
        neg = float(row.get("negative_fraction", math.nan))
        if grid == "unsigned" and dmin < 0 and not neg <= NEGATIVE_SHARE:
            share = f"{neg:.0%} of the inputs are" if math.isfinite(neg) else "inputs are"
            out.append(
                _finding(
                    name,
                    "negative_input",
                    f"{share} negative (min {dmin:.3g}) on an unsigned grid: all clipped to 0",
                    neg if math.isfinite(neg) else 1.0,
                )
            )
        span = dmax - dmin
        if grid == "asymmetric" and span > 0:
            if lo > dmax or lo < dmin - OFFSET_MARGIN * span:
                where = "above the largest" if lo > dmax else "far below the smallest"
                out.append(
                    _finding(
                        name,
                        "offset_outside",
                        f"offset {lo:.3g} lies {where} input seen ([{dmin:.3g}, {dmax:.3g}])",
                        max(lo - dmax, dmin - lo) / span,
                    )
                )
        width = hi - lo
        used = max(0.0, min(hi, dmax) - max(lo, dmin))
        if width > 0 and span > 0 and used / width < WIDE_USE:
            out.append(
                _finding(
                    name,
                    "range_too_wide",
                    f"range [{lo:.3g}, {hi:.3g}] is {width / max(used, 1e-30):.3g}x wider than "
                    f"the data it covers ([{dmin:.3g}, {dmax:.3g}]): most levels never used",
                    width / max(used, 1e-30),
                )
            )
    return out


def check_state(state: Mapping[str, Tensor], layers: list[str]) -> list[dict]:
    """Checks on saved tensors: scales at the floor and dead (all-zero) weight channels."""
    out = []
    floor = SCALE_FLOOR * FLOOR_FACTOR
    for name in layers:
        a_key, w_key, wq_key = (
            f"{name}.input_quant.scale",
            f"{name}.layer.weight",
            f"{name}.weight_quant.scale",
        )
        if a_key in state and float(state[a_key].float().min()) <= floor:
            out.append(
                _finding(
                    name,
                    "scale_floor",
                    f"input scale {float(state[a_key].float().min()):.3g} is at the floor "
                    f"({SCALE_FLOOR:g}): every input maps to one or two levels",
                    1.0,
                )
            )
        dead = torch.zeros(0, dtype=torch.bool)
        if w_key in state:
            w = state[w_key].float()
            peak = w.reshape(w.shape[0], -1).abs().amax(1)
            dead = peak <= DEAD_RELATIVE * float(peak.max())
            if dead.any():
                out.append(
                    _finding(
                        name,
                        "dead_channels",
                        f"{int(dead.sum())} of {len(dead)} output channels are dead (weights zero "
                        f"or below {DEAD_RELATIVE:g} of the layer's largest): they add nothing",
                        float(dead.float().mean()),
                    )
                )
        if wq_key in state:
            s = state[wq_key].float().reshape(-1)
            low = s <= floor
            if len(dead) == len(s):
                low &= ~dead  # a dead channel's scale sits at the floor by design
            if low.any():
                out.append(
                    _finding(
                        name,
                        "scale_floor",
                        f"{int(low.sum())} weight channel scale(s) at the floor ({SCALE_FLOOR:g}) "
                        "though their weights are not zero",
                        float(low.float().mean()),
                    )
                )
    return out


def check_trajectories(traj: pd.DataFrame | None) -> list[dict]:
    """Activation scales that collapsed during QAT (``trajectories.csv``: step, layer, scale)."""
    out = []
    if traj is None or traj.empty or not {"step", "layer", "scale"} <= set(traj.columns):
        return out
    group = ["method", "layer"] if "method" in traj.columns else ["layer"]
    for key, sub in traj.sort_values("step").groupby(group, sort=False):
        scales = sub["scale"].astype(float).to_numpy()
        scales = scales[pd.notna(scales)]
        if len(scales) < 2 or scales[0] <= 0:
            continue
        if scales[-1] < scales[0] / COLLAPSE:
            layer = key[-1] if isinstance(key, tuple) else key
            steps = int(sub["step"].max() - sub["step"].min())
            out.append(
                _finding(
                    str(layer),
                    "scale_collapse",
                    f"input scale fell from {scales[0]:.3g} to {scales[-1]:.3g} in {steps} steps "
                    f"({scales[0] / max(scales[-1], 1e-30):.3g}x smaller)",
                    scales[0] / max(scales[-1], 1e-30),
                )
            )
    return out


def check_flips(traj: pd.DataFrame | None) -> list[dict]:
    """Weights oscillating across a rounding boundary during QAT, per layer (``trajectories``
    with step, layer, weight_flips, weight_net and weights: ``pipeline.history_frames``)."""
    out = []
    need = {"step", "layer", "weight_flips", "weight_net", "weights"}
    if traj is None or traj.empty or not need <= set(traj.columns):
        return out
    data = traj.dropna(subset=["weight_flips", "weight_net", "weights"])
    data = data[data["step"] > 0].sort_values("step")
    group = ["method", "layer"] if "method" in data.columns else ["layer"]
    for key, sub in data.groupby(group, sort=False):
        n = float(sub["weights"].iloc[-1])
        if len(sub) < FLIP_MIN_STEPS or n <= 0:
            continue
        late = sub.iloc[len(sub) // 2 :]  # the second half of the steps
        share = float(late["weight_flips"].mean()) / n
        flips = float(sub["weight_flips"].sum())
        net = float(sub["weight_net"].iloc[-1])
        if share >= FLIP_SHARE and flips >= OSCILLATION * max(net, 1.0):
            layer = key[-1] if isinstance(key, tuple) else key
            out.append(
                _finding(
                    str(layer),
                    "weight_oscillation",
                    f"{share:.1%} of its {n:.0f} weights cross a rounding boundary each step "
                    f"(last {len(late)} steps), yet {flips:.0f} flips moved them {net:.0f} codes "
                    "net: they bounce between two levels",
                    share,
                )
            )
    return out


def _frame(findings: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(findings, columns=COLUMNS)


def range_facts(model: nn.Module, stats: Mapping[str, ActStats]) -> pd.DataFrame:
    """What ``check_ranges`` reads, straight from a model's quantizers and calibration stats."""
    rows = []
    for name, layer in quant_layers(model).items():
        q = layer.input_quant
        if not q.ready or name not in stats:
            continue
        lo, hi = (float(v) for v in q.clip_range())
        st = stats[name]
        rows.append(
            {
                "layer": name,
                "grid": "asymmetric" if q.asymmetric else ("signed" if q.signed else "unsigned"),
                "range_lo": lo,
                "range_hi": hi,
                "observed_min": st.min,
                "observed_max": st.max,
                "negative_fraction": st.negative_fraction,
            }
        )
    return pd.DataFrame(rows)


def model_health(
    model: nn.Module, stats: Mapping[str, ActStats], trajectories: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Every finding on a live quantized model: layer, check, reason, severity (empty when
    healthy)."""
    names = list(quant_layers(model))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return _frame(
        check_ranges(range_facts(model, stats))
        + check_state(state, names)
        + check_trajectories(trajectories)
        + check_flips(trajectories)
    )


def run_health(run) -> pd.DataFrame:
    """Every finding on a saved run (``lsq.runs.LoadedRun``): layer, check, reason, severity."""
    layers = run.tables.get("layers")
    names = list(layers["layer"]) if layers is not None and "layer" in layers else []
    state = run.state if run.state is not None else {}
    return _frame(
        check_ranges(layers)
        + check_state(state, names)
        + check_trajectories(run.tables.get("trajectories"))
        + check_flips(run.tables.get("trajectories"))
    )


def combine(reports: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per-method reports (method or run: its ``model_health``/``run_health``) as one frame with
    a method column, the float model's findings once.

    A finding of a FLOAT_CHECKS check that every method in ``reports`` has, word for word, is
    kept once, first, its method FLOAT_MODEL; one that only some have (their weights changed in
    training) stays with each of them. Every other finding stays with its method.
    """
    frames = {m: r for m, r in reports.items() if r is not None and not r.empty}
    columns = ["method", *COLUMNS]
    if not frames:
        return pd.DataFrame(columns=columns)

    def keys(r: pd.DataFrame | None) -> set[tuple]:
        if r is None or r.empty:
            return set()
        r = r[r["check"].isin(FLOAT_CHECKS)]
        return set(zip(r["layer"], r["check"], r["reason"], strict=True))

    shared = set.intersection(*(keys(r) for r in reports.values()))
    out, first = [], None
    for method, r in frames.items():
        key = pd.Series(list(zip(r["layer"], r["check"], r["reason"], strict=True)), index=r.index)
        mine = key.isin(shared)
        if first is None and mine.any():
            first = r[mine].assign(method=FLOAT_MODEL)
        out.append(r[~mine].assign(method=method))
    frame = pd.concat(([first] if first is not None else []) + out, ignore_index=True)
    return frame[columns]


def _layers(names: list[str]) -> str:
    more = f" (+{len(names) - WORST} more)" if len(names) > WORST else ""
    return ", ".join(names[:WORST]) + more


def group_findings(findings: pd.DataFrame) -> pd.DataFrame:
    """One row per method and check (``combine``'s frame, or one report without a method): the
    number of layers, the WORST worst of them (by severity) and one short reason, that layer's
    own where only one layer has it. Methods in their order, the float model first; checks in
    CHECKS order."""
    if findings is None or findings.empty:
        return pd.DataFrame(columns=GROUP_COLUMNS)
    if "method" not in findings.columns:
        findings = findings.assign(method="")
    rows = []
    methods = list(dict.fromkeys(findings["method"]))
    order = {c: i for i, c in enumerate(CHECKS)}
    for (_, check), sub in sorted(
        findings.groupby(["method", "check"], sort=False),
        key=lambda kv: (methods.index(kv[0][0]), order.get(kv[0][1], len(order))),
    ):
        sub = sub.sort_values("severity", ascending=False, kind="stable")
        names = list(dict.fromkeys(sub["layer"]))
        worst = float(sub["severity"].max())
        if len(names) == 1:
            reason = "; ".join(dict.fromkeys(sub["reason"].astype(str)))
        else:
            reason = SUMMARIES.get(check, check).format(worst=worst, floor=SCALE_FLOOR)
        rows.append(
            {
                "method": sub["method"].iloc[0],
                "check": check,
                "layers": len(names),
                "worst": _layers(names),
                "reason": reason,
            }
        )
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)
