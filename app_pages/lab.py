"""Range lab: drag one layer's input range and see what clipping, rounding and the model say."""

import streamlit as st

from lsq import plots
from lsq.errors import LSQError
from lsq.explorer import lab_grid, lab_picture, learned_settings, range_lab
from lsq.lab import GRIDS, LabSetting
from lsq.quantizers import MAX_BITS, MIN_BITS
from ui import chart, comparison_or_stop

GRID_NAMES = {
    "asymmetric": "LSQ+: unsigned grid + offset",
    "unsigned": "LSQ unsigned (negatives clip to 0)",
    "signed": "LSQ signed (a bit for the sign)",
}
COLOR_OF = {"asymmetric": "lsq+", "unsigned": "lsq-unsigned", "signed": "lsq-signed"}
SNAPS = {"minmax": "min/max", "lsq": "LSQ init", "mse": "LSQ+ MSE init"}

st.title("Range lab")
st.markdown(
    "Pick a layer and drag its input range. Only this layer's input is quantized; every other "
    "layer stays float, so the KL and agreement below are this range's cost to the whole model."
)
comp = comparison_or_stop(": the lab uses the calibrated model and its views")
layers = list(next(iter(comp.initial.values())).init_frame()["name"])
layer = st.selectbox("Layer", layers, index=min(1, len(layers) - 1), key="lab_layer")
try:
    lab = range_lab(comp, layer)
except LSQError as e:
    st.error(str(e))
    st.stop()
lo_obs, hi_obs = lab.observed
ss = st.session_state


def put(setting: LabSetting) -> None:
    """Move the widgets to ``setting`` (runs as a button callback, before the widgets)."""
    ss["lab_bits"], ss["lab_grid"] = setting.bits, setting.grid
    ss["lab_range"] = (setting.lo, setting.hi)
    ss["lab_hi"] = setting.hi


if ss.get("lab_for") != (comp.calibration, layer):  # a new layer starts at LSQ+'s MSE init
    ss["lab_for"] = (comp.calibration, layer)
    put(lab.snap("mse", ss.get("lab_bits", comp.settings.a_bits), "asymmetric"))

learned = learned_settings(comp, layer)  # read once per layer, not on every move
picture = lab_picture(lab)  # the histogram's part of the chart, made once per layer


@st.fragment
def lab_panel() -> None:
    """The controls and what they do. Only this reruns when a control moves: the layer's own
    numbers are drawn first, then the grid over the histogram, then the whole model's answer."""
    c1, c2 = st.columns([1, 2])
    bits = c1.select_slider("Bits", list(range(MIN_BITS, MAX_BITS + 1)), key="lab_bits")
    grid = c2.radio("Grid", GRIDS, format_func=GRID_NAMES.get, key="lab_grid", horizontal=True)

    span = max(hi_obs - lo_obs, 1e-6)
    lo_min, hi_max = lo_obs - 0.25 * span, hi_obs + 0.25 * span
    lo_cur, hi_cur = ss.get("lab_range", (lo_obs, hi_obs))
    lo_min, hi_max = min(lo_min, lo_cur), max(hi_max, hi_cur, ss.get("lab_hi", hi_max))
    step = (hi_max - lo_min) / 1000
    if grid == "asymmetric":
        lo, hi = st.slider(
            "Range [low, high]", lo_min, hi_max, key="lab_range", step=step, format="%.4g"
        )
    else:
        hi = st.slider(
            "Upper bound (the grid's scale × its top level)",
            step,
            hi_max,
            key="lab_hi",
            step=step,
            format="%.4g",
        )
        lo = 0.0

    cols = st.columns(len(SNAPS) + 1)
    for col, (kind, label) in zip(cols, SNAPS.items(), strict=False):
        col.button(
            f"Snap: {label}",
            on_click=lambda k=kind: put(lab.snap(k, ss["lab_bits"], ss["lab_grid"])),
            key=f"snap-{kind}",
        )
    if learned:
        with cols[-1].popover("Snap: a learned value"):
            st.selectbox("From", list(learned), key="lab_learned")
            st.button(
                "Use it", on_click=lambda: put(learned[ss["lab_learned"]]), key="snap-learned"
            )

    try:
        setting = LabSetting.from_range(bits, grid, lo, hi)
    except LSQError as e:
        st.warning(str(e))
        return
    here = lab.local(setting)
    split = here.split
    m = st.columns(5)
    m[0].metric("Clipping error (MSE)", f"{split.clip:.3g}", help="from values outside the range")
    m[1].metric("Rounding error (MSE)", f"{split.round:.3g}", help="from values inside, rounded")
    m[2].metric("Layer output SQNR", f"{here.output_sqnr_db:.1f} dB")
    caption, figure = st.empty(), st.empty()
    whole = lab.model_answer(setting)
    m[3].metric("Model KL to float", f"{whole.kl:.4f}")
    m[4].metric("Top-1 agreement", f"{whole.agreement:.0%}")
    share = split.clip / split.total if split.total > 0 else 0.0
    runs = f"{lab.units_run} of the network's units" if lab.units_run else "the whole model"
    outside = split.clip_summary()
    caption.caption(
        f"Range [{setting.lo:.4g}, {setting.hi:.4g}], step {setting.scale:.4g}: clipping is "
        f"{share:.0%} of this layer's input error; {plots.clip_text(outside)}. "
        f"Update: this layer {here.seconds * 1000:.0f} ms, then the model "
        f"{whole.seconds * 1000:.0f} ms on {len(lab.start)} views ({runs} rerun)."
    )
    # the chart last: the browser's heaviest redraw never holds a number back
    chart(picture.figure(lab_grid(setting), COLOR_OF[grid], outside), figure, key="lab_hist")


lab_panel()
