"""LSQ+ Explorer: navigation and the shared sidebar (model, bits, methods, data, device)."""

from __future__ import annotations

import streamlit as st
import torch

from lsq.config import METHODS
from lsq.errors import LSQError
from lsq.explorer import WEIGHT_INIT_CHOICES, Settings
from lsq.pipeline import DataConfig, ModelSpec
from ui import save_upload

st.set_page_config(page_title="LSQ+ Explorer", layout="wide")

BASELINES = [m for m in METHODS if m != "lsq+"]
SOURCES = {
    "Bundled EfficientNet-Lite0 (ImageNet, offline)": "bundled",
    "timm hub model (needs internet)": "hub",
    "Checkpoint file": "file",
    "Random weights (smoke test)": "random",
}


def sidebar() -> Settings | None:
    sb = st.sidebar
    sb.header("Model")
    label = sb.selectbox("Source", list(SOURCES), key="model_source")
    source = SOURCES[label]
    spec = ModelSpec()
    if source in ("hub", "random"):
        name = sb.text_input("timm model name", "tf_efficientnet_lite0", key="model_name")
        spec = ModelSpec(name.strip(), source)
    elif source == "file":
        arch = sb.text_input("Architecture (timm name)", "tf_efficientnet_lite0", key="file_arch")
        path = sb.text_input("Checkpoint path on the server", key="file_path")
        upload = sb.file_uploader(
            "…or upload one", type=["pth", "pt", "bin", "safetensors"], key="ckpt"
        )
        if upload is not None:
            try:
                path = str(save_upload(upload, "checkpoints"))
            except LSQError as e:
                sb.error(str(e))
                return None
        if not path:
            sb.info("Give a checkpoint path or upload a file.")
            return None
        spec = ModelSpec(arch.strip(), "file", path.strip())

    sb.header("Bits")
    w_bits = sb.select_slider("Weight bits", options=list(range(2, 9)), value=8, key="w_bits")
    a_bits = sb.select_slider("Activation bits", options=list(range(2, 9)), value=4, key="a_bits")
    quantize_weights = sb.checkbox("Quantize weights", True, key="qw", help="Off: activations only")
    weight_init = sb.selectbox(
        "Weight init",
        WEIGHT_INIT_CHOICES,
        key="weight_init",
        help="auto: each method's own rule below 6 bits, an MSE search at 6+ bits (the 3-sigma "
        "and LSQ rules clip too hard there). method: always the method's own rule.",
    )
    baselines = sb.multiselect(
        "Compare LSQ+ with", BASELINES, default=["lsq", "lsq-signed", "minmax"], key="baselines"
    )

    sb.header("Data")
    data_src = sb.radio(
        "Calibration images",
        ["Bundled photos (scikit-image)", "Folder on the server", "Upload images"],
        key="data_src",
    )
    folder = None
    if data_src == "Folder on the server":
        folder = sb.text_input("Folder path", key="folder").strip() or None
        if folder is None:
            sb.info("Give a folder of images (flat, or one sub-folder per class).")
            return None
    elif data_src == "Upload images":
        files = sb.file_uploader(
            "Images",
            type=["jpg", "jpeg", "png", "bmp", "webp"],
            accept_multiple_files=True,
            key="imgs",
        )
        if not files:
            sb.info("Upload at least two images.")
            return None
        try:
            paths = [save_upload(f, "images") for f in files]
        except LSQError as e:
            sb.error(str(e))
            return None
        folder = str(paths[0].parent)
    resolution = sb.select_slider(
        "Resolution (px)", options=[64, 96, 128, 160, 192, 224], value=224, key="res"
    )
    views = sb.select_slider(
        "Views (calibration and evaluation)", [8, 16, 32, 64, 128], 32, key="views"
    )

    sb.header("Device")
    cuda = torch.cuda.is_available()
    found = f"found CUDA: {torch.cuda.get_device_name(0)}" if cuda else "no CUDA GPU found: CPU"
    device = sb.radio("Device", ["auto", "cpu", "cuda"], key="device", help=found, horizontal=True)
    sb.caption(found)
    try:
        data = DataConfig(
            source="folder" if folder else "bundled",
            folder=folder,
            resolution=resolution,
            calib_views=views,
            eval_views=views,
        )
        return Settings(
            model=spec,
            data=data,
            w_bits=w_bits,
            a_bits=a_bits,
            methods=("lsq+", *baselines),
            weight_init=weight_init,
            quantize_weights=quantize_weights,
            device=device,
        )
    except LSQError as e:
        sb.error(str(e))
        return None


pages = [
    st.Page("pages/home.py", title="What is LSQ+?", default=True),
    st.Page("pages/calibrate.py", title="Calibrate"),
    st.Page("pages/train.py", title="Train"),
    st.Page("pages/layers.py", title="Layers"),
    st.Page("pages/runs.py", title="Runs"),
]
nav = st.navigation(pages)
st.session_state["settings"] = sidebar()
nav.run()
