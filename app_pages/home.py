"""First page: what LSQ+ is, what each page shows, and a one-click demo."""

import streamlit as st

from lsq import plots
from lsq.explorer import Settings, calibrate_job, intro_view
from lsq.jobs import Job
from ui import chart, job_manager, show_job, submit

st.title("LSQ+ Explorer")
st.markdown(
    """
**LSQ** (Esser et al., 2020) trains the step size of each quantizer together with the weights.
**LSQ+** (Bhalgat et al., 2020) adds a learnable **offset** to activation quantizers and starts
the ranges well: weights from mean ± 3σ, activations from the scale and offset that minimise the
quantization error (an MSE search). Swish-like activations and residual streams are negative and
skewed; unsigned LSQ clips them to zero, signed LSQ spends a bit on a sign, and LSQ+'s offset fits
them at no inference cost (it folds into the bias).

- **Calibrate**: every layer's initial range for each method against the observed min/max;
  one layer's input histogram with each method's quantization levels; agreement with the float
  model right after init.
- **Train**: a short quantization-aware training run, live loss and agreement curves, and how a
  layer's scale and offset move.
- **Layers**: per-layer error (SQNR) of LSQ+ next to each baseline, worst layers marked, and
  which part of the network the error comes from.
- **Range lab**: one layer's range under your fingers: clipping and rounding error, and the whole
  model's KL and agreement with only that layer quantized.
- **Runs**: saved runs: open, compare, download the per-layer CSV and the checkpoint.

Pick the model, bits and methods in the sidebar, or start with the default.
"""
)

st.subheader("The idea in one picture")
st.markdown(
    "Swish-like activations are skewed with a short negative tail. Each panel puts one grid "
    "on the same values, at the range that minimises its own error: the unsigned grid clips "
    "the negatives, the signed grid wastes half its levels on a tail that barely exists, and "
    "LSQ+'s offset slides the unsigned grid down to where the data start."
)
bits = st.select_slider("Bits", list(range(2, 9)), value=3, key="intro_bits")
hist, grids = intro_view(bits)
chart(plots.intro_figure(hist, grids, bits), key="intro")

default = Settings()
st.caption(
    f"Default: bundled EfficientNet-Lite0 (ImageNet weights), W{default.w_bits}A{default.a_bits}, "
    f"{', '.join(default.methods)}, {default.data.calib_views} views of the photos that ship with "
    "scikit-image."
)
if st.button("Run the default", type="primary"):
    job = submit(
        Job("calibrate", "Calibration (default)", {"settings": default}),
        lambda job: calibrate_job(job, default),
    )
    if job is not None:
        st.switch_page("app_pages/calibrate.py")
show_job(job_manager().active())
