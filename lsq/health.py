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
COLUMNS = ["layer", "check", "reason"]


def _finding(layer: str, check: str, reason: str) -> dict:
    return {"layer": layer, "check": check, "reason": reason}


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
    """Every finding on a live quantized model: layer, check, reason (empty when healthy)."""
    names = list(quant_layers(model))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return _frame(
        check_ranges(range_facts(model, stats))
        + check_state(state, names)
        + check_trajectories(trajectories)
        + check_flips(trajectories)
    )


def run_health(run) -> pd.DataFrame:
    """Every finding on a saved run (``lsq.runs.LoadedRun``): layer, check, reason."""
    layers = run.tables.get("layers")
    names = list(layers["layer"]) if layers is not None and "layer" in layers else []
    state = run.state if run.state is not None else {}
    return _frame(
        check_ranges(layers)
        + check_state(state, names)
        + check_trajectories(run.tables.get("trajectories"))
        + check_flips(run.tables.get("trajectories"))
    )
