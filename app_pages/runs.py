"""Runs: saved runs listed; open one, compare two (per-layer SQNR and training curves),
download the per-layer CSV and checkpoint, export a run as ONNX (QDQ) or integer safetensors
and download it."""

import pandas as pd
import streamlit as st

from lsq import plots
from lsq.errors import LSQError
from lsq.explorer import compare_runs_frame, saved_curves, saved_units
from lsq.export import export_file, export_run, parity_warning
from lsq.pipeline import FIT_GAP_NOTE
from lsq.runs import list_runs, load_run, run_stage, runs_root
from lsq.status import Status
from ui import chart

#: The curves a trained run shows, with titles short enough for a third of the page.
CURVES = {"loss": "Training loss", "agreement": "Top-1 agreement", "kl": "KL to float"}

st.title("Saved runs")
infos = list_runs()
if not infos:
    st.info("No saved runs yet: calibrating or training saves one per method.")
    st.stop()
rows = []
for i in infos:
    metrics = (i.meta.get("metrics_final") or i.meta.get("metrics_init")) or {}
    rows.append(
        {
            "run": i.name,
            "status": i.status,
            "label": f"{i.config.get('method')} W{i.config.get('w_bits')}A{i.config.get('a_bits')}",
            "stage": run_stage(i),
            **{k: metrics.get(k) for k in ("agreement", "kl", "calib_agreement", "calib_kl")},
        }
    )
table = pd.DataFrame(rows)
st.dataframe(
    table,
    hide_index=True,
    column_config={
        "calib_agreement": "agreement (calibration views)",
        "calib_kl": "KL (calibration views)",
    },
)
st.caption(f"Agreement and KL: on the held-out views, and on the calibration views. {FIT_GAP_NOTE}")
incomplete = table[table.status == Status.INCOMPLETE]
if len(incomplete):
    st.warning(
        f"{len(incomplete)} run(s) were interrupted (server stopped mid-run): marked incomplete."
    )

names = list(table["run"])
chosen = st.multiselect(
    "Open one run, or two to compare", names, default=names[:1], max_selections=2
)
opened = []
for name in chosen:
    try:
        opened.append(load_run(name))
    except LSQError as e:
        st.error(str(e))
if len(opened) == 2:
    a, b = opened
    merged = compare_runs_frame(a, b)
    if not merged.empty:
        st.subheader("Output SQNR (dB), side by side")
        st.caption(f"A: `{a.info.name}` · B: `{b.info.name}` · higher is better")
        st.dataframe(
            merged,
            hide_index=True,
            column_config={
                c: st.column_config.NumberColumn(c, format="%.2f") for c in ("A", "B", "B − A")
            },
        )
curves = saved_curves(opened)
if not curves.empty:
    st.subheader("Training curves" + (" of both runs" if len(opened) == 2 else ""))
    if len(opened) == 2:
        st.caption(f"A: `{opened[0].info.name}` · B: `{opened[1].info.name}`")
    cols = st.columns(3)
    for col, (y, title) in zip(cols, CURVES.items(), strict=True):
        chart(plots.curves_figure(curves, y, title=title), where=col, key=f"run-{y}")
elif opened:
    stages = {run_stage(run.info) for run in opened}
    st.caption(f"No QAT in {' or '.join(sorted(stages))} runs: no training curves.")
units = saved_units(opened)
if not units.empty:
    st.subheader("Block-wise reconstruction" + (" of both runs" if len(opened) == 2 else ""))
    chart(plots.units_figure(units), key="run-units")
for run in opened:
    st.subheader(run.info.name)
    st.write(f"Status: **{run.info.status}** {run.info.message}")
    meta = run.info.meta
    if meta.get("command"):
        st.caption("The same run, headless:")
        st.code(meta["command"], language="bash")
    st.json(
        {
            "config": run.info.config,
            "metrics_init": meta.get("metrics_init"),
            "metrics_final": meta.get("metrics_final"),
        },
        expanded=False,
    )
    if "layers" in run.tables:
        st.dataframe(run.tables["layers"], hide_index=True)
        st.download_button(
            "Per-layer CSV",
            lambda table=run.tables["layers"]: table.to_csv(index=False),
            file_name=f"{run.info.name}-layers.csv",
            key=f"csv-{run.info.name}",
            on_click="ignore",
        )
    state = run.info.path / "state.safetensors"
    if state.exists():
        st.download_button(
            "Checkpoint (safetensors)",
            state.read_bytes,  # read only when the user asks for it
            file_name=f"{run.info.name}.safetensors",
            key=f"ckpt-{run.info.name}",
            on_click="ignore",
        )
    st.markdown("**Export** (what an integer runtime computes; LSQ+'s offset folded into the bias)")
    cols = st.columns(2)
    for col, fmt, label in (
        (cols[0], "onnx", "Export ONNX"),
        (cols[1], "safetensors", "Export integer safetensors"),
    ):
        out = export_file(run.info.path, fmt)
        done_key = f"export-{fmt}-{run.info.name}"
        if col.button(label, key=f"do-{done_key}"):
            try:
                out.parent.mkdir(exist_ok=True)
                with st.spinner(f"Exporting {run.info.name} as {fmt}..."):
                    report = export_run(run.info.path, fmt, out=out, within=runs_root())
                st.session_state[done_key] = report.parity
            except LSQError as e:
                col.error(str(e))
            except OSError as e:  # the export folder could not be created
                col.error(f"cannot create the export folder {out.parent}: {e.strerror or e}")
        parity = st.session_state.get(done_key)
        warning = parity_warning(parity) if parity else ""  # below the bar, and where
        if warning:
            col.warning(warning)
        elif parity:
            col.caption(
                f"ONNX Runtime vs fake-quant on {int(parity['views'])} evaluation views: "
                f"agreement {parity['agreement']:.3f}, KL {parity['kl']:.2e}, "
                f"logit SQNR {parity['logit_sqnr_db']:.1f} dB"
            )
        if out.is_file():
            col.download_button(
                f"Download {out.name}",
                out.read_bytes,  # read only when the user asks for it
                file_name=f"{run.info.name}-{out.name}",
                key=f"get-{done_key}",
                on_click="ignore",
            )
