"""Export: the QDQ graph ONNX Runtime runs, integer safetensors, offset folding and snapping."""

import copy
import json
from pathlib import Path

import onnx
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import Tiny, Untraceable, plant_bias_error
from onnx import numpy_helper
from safetensors import safe_open
from timm.layers.conv2d_same import Conv2dSame
from torch import nn

from lsq import LSQError, float_mode, make_config, quantize_model
from lsq.calibrate import calibrate
from lsq.convert import quant_layers
from lsq.export import (
    PARITY_MIN_AGREEMENT,
    _OffsetBias,
    deploy_model,
    export_onnx,
    export_run,
    export_safetensors,
    offset_table,
    onnx_layer_table,
    onnx_logits,
    onnx_parity,
    parity_warning,
)
from lsq.metrics import sqnr_db


def quantized(model, config, x):
    model = copy.deepcopy(model).eval()
    quantize_model(model, config)
    calibrate(model, [x], config)
    return model


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=10).eval()


@pytest.fixture(scope="module")
def bundled():
    from lsq.data import bundled_images, make_views
    from lsq.models import load_model

    loaded = load_model()
    views = make_views(bundled_images("calibration"), 16, 64, loaded.data_config)
    held_out = make_views(bundled_images("evaluation"), 32, 64, loaded.data_config, seed=1)
    return loaded.model, views, held_out


def graph_parts(path):
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:  # constants the exporter kept as nodes
        if node.op_type == "Constant":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    for node in model.graph.node:  # initializers of equal value, deduplicated by the exporter
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return model.graph.node, inits, consumers


# --- the graph -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_every_quantized_layer_is_a_qdq_pair_with_its_scale_and_zero_point(resnet, bits, tmp_path):
    x = torch.randn(4, 3, 32, 32)
    config = make_config("lsq+", bits, bits, first_last_bits=None)
    model = quantized(resnet, config, x)
    report = export_onnx(model, tmp_path / "m.onnx", x, offset="snap")
    nodes, inits, consumers = graph_parts(report.path)
    layers = quant_layers(model)
    assert len(report.layers) == len(layers)
    for rec in report.layers:
        ql = layers[rec.layer]
        # The input pair: QuantizeLinear -> Clip (below 8 bits) -> DequantizeLinear.
        (q,) = [
            n
            for n in nodes
            if n.op_type == "QuantizeLinear" and n.input[1] == f"{rec.layer}.input_scale"
        ]
        scale = float(inits[q.input[1]])
        assert scale == pytest.approx(float(ql.input_quant.effective_scale().detach()), rel=1e-6)
        beta = float(ql.input_quant.offset.detach())
        z = int(inits[q.input[2]])
        assert z == round(-beta / scale) == rec.zero_point
        assert inits[q.input[2]].dtype.name == "uint8"
        (nxt,) = consumers[q.output[0]]
        if bits < 8:
            assert nxt.op_type == "Clip"
            assert (int(inits[nxt.input[1]]), int(inits[nxt.input[2]])) == (0, 2**bits - 1)
            (nxt,) = consumers[nxt.output[0]]
        assert nxt.op_type == "DequantizeLinear" and list(nxt.input[1:]) == list(q.input[1:])
        # The weights: int8 codes in the b-bit range, per-channel scales, zero point 0.
        (dq,) = [
            n
            for n in nodes
            if n.op_type == "DequantizeLinear" and n.input[0] == f"{rec.layer}.weight_q"
        ]
        codes = inits[dq.input[0]]
        assert codes.dtype.name == "int8"
        assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
        assert inits[dq.input[1]].shape == (codes.shape[0],)
        assert not inits[dq.input[2]].any()
    assert report.max_snap_error_steps <= 0.5


def test_onnx_runtime_matches_the_fake_quant_model_on_a_random_timm_model(resnet, tmp_path):
    x = torch.randn(16, 3, 64, 64)
    model = quantized(resnet, make_config("lsq+", 8, 8, weight_init="mse"), x)
    report = export_onnx(model, tmp_path / "m.onnx", x)
    parity = onnx_parity(model, report.path, x)
    assert parity["agreement"] >= 0.99 and parity["kl"] <= 1e-3
    assert parity["logit_sqnr_db"] >= 30  # measured 44 dB
    # ONNX Runtime computes what the deploy model computes in PyTorch (up to the odd rounding
    # flip where the two sum in different orders).
    deployed, _ = deploy_model(model, x)
    with torch.no_grad():
        expected = deployed(x)
    assert sqnr_db(expected, onnx_logits(report.path, x)) >= 30


def optimized_by_onnx_runtime(path, tmp_path):
    """The graph ONNX Runtime runs: the file after its default (all) graph optimizations."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3  # not its note that the saved graph suits this machine only
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return onnx.load(opts.optimized_model_filepath)


def test_onnx_runtime_keeps_every_bias_in_float(resnet, tmp_path):
    # ONNX Runtime (1.30, WeightBiasQuantization) turns Conv(DQ(x), DQ(w), float bias) into an
    # int32 bias at scale s_x * s_w[c]: the bias rounded to a multiple of a step that is coarse
    # at 4 bits (and at ORT_ENABLE_ALL fuses some into QLinearConv, int32 bias too). The exporter
    # adds every bias after the Conv, so nothing can round it. Failed before the fix.
    x = torch.randn(4, 3, 32, 32)
    model = quantized(resnet, make_config("lsq", 4, 4, first_last_bits=None), x)
    report = export_onnx(model, tmp_path / "m.onnx", x)
    graph = optimized_by_onnx_runtime(report.path, tmp_path).graph
    int32 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT32}
    quantized_biases = [
        n.name
        for n in graph.node
        if n.op_type.startswith("QLinear")
        or (n.op_type == "DequantizeLinear" and n.input[0] in int32)
    ]
    assert not quantized_biases


def bundled_parity_case(bench, method, bits, tmp_path, recon_iters=0):
    """A method at W{bits}A{bits} as the app makes it (its default weight init), exported with
    the default offset route; onnx_parity's figures on the bench's evaluation views."""
    from lsq.config import resolve_weight_init
    from lsq.pipeline import init_method, reconstruct_method
    from lsq.reconstruct import ReconstructConfig

    config = make_config(method, bits, bits, weight_init=resolve_weight_init(method, bits))
    result = init_method(bench, config)
    if recon_iters:
        cfg = ReconstructConfig(iters=recon_iters, device="cpu", compile=False)
        result = reconstruct_method(bench, result, cfg)
    report = export_onnx(result.model, tmp_path / "m.onnx", bench.eval[:1])
    return onnx_parity(result.model, report.path, bench.eval)


@pytest.fixture(scope="module")
def bench96():
    """The bundled model at 96 px as the app prepares it: 32 calibration views, 64 evaluation
    views for parity, 32 views for reconstruction."""
    from lsq.pipeline import DataConfig, ModelSpec, prepare

    data = DataConfig(resolution=96, calib_views=32, eval_views=64, recon_views=32)
    return prepare(ModelSpec(), data, "cpu")


def test_lsq_w4a4_with_signed_inputs_exports_within_the_parity_bar(bench96, tmp_path):
    # The report: LSQ W4A4 (signed 4-bit inputs where calibration saw negatives) exported at
    # agreement 0.56 against its fake-quant model. Before the fix, here: agreement 0.375, KL
    # 0.53, first diverging layer blocks.0.0.conv_dw (its bias rounded by ONNX Runtime).
    parity = bundled_parity_case(bench96, "lsq", 4, tmp_path)
    assert parity["within_tolerance"], parity
    assert parity["agreement"] >= PARITY_MIN_AGREEMENT and parity["kl"] <= parity["kl_tolerance"]


def assert_within_the_bar_or_only_float_rounding_flips(parity):
    """Within the bar (agreement >= 0.95, or the float64 copy's own agreement when lower, and
    KL <= 10x the float64 floor); the one way short of it that is not the exporter's: agreement
    only, where the fake-quant model's own float64 copy also flips top-1 on some views, and
    every layer matches the fake-quant layer on its own input."""
    assert parity["kl"] <= parity["kl_tolerance"], parity
    if not parity["within_tolerance"]:
        assert parity["floor_agreement"] < 1 and parity["located"], parity
        assert parity["first_divergent_layer"] is None, parity


#: Every method of the app at both of its bit-widths.
PARITY_CASES = [(m, b) for m in ("lsq+", "lsq", "lsq-signed", "minmax") for b in (8, 4)]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "bits"), PARITY_CASES)
def test_every_method_and_bit_width_exports_within_the_parity_bar(bench96, method, bits, tmp_path):
    # Measured before the fix (bench/export_parity.py, 96 px, 32 views): LSQ W4A4 0.375 / KL
    # 0.53, signed LSQ W4A4 0.28 / 0.24, min/max W4A4 0.53 / 1.9, LSQ W8A8 0.91 / 1.9e-2.
    assert_within_the_bar_or_only_float_rounding_flips(
        bundled_parity_case(bench96, method, bits, tmp_path)
    )


@pytest.mark.slow
def test_a_reconstructed_lsq_w4a4_model_exports_within_the_parity_bar(bench96, tmp_path):
    # Before the fix: agreement 0.41, KL 2.1, blocks.0.0.conv_dw diverging (96 px, 5 iterations).
    assert_within_the_bar_or_only_float_rounding_flips(
        bundled_parity_case(bench96, "lsq", 4, tmp_path, recon_iters=3)
    )


def test_an_export_below_the_bar_names_the_layer_that_diverges(bundled, tmp_path, monkeypatch):
    float_model, views, held_out = bundled
    model = quantized(float_model, make_config("lsq", 8, 8, weight_init="mse"), views)
    good = onnx_parity(model, export_onnx(model, tmp_path / "good.onnx", held_out).path, held_out)
    # Measured: agreement 0.97, KL 0.019 against a float64 floor of 0.94 / 0.022 (64 px, one
    # thread); with two: 0.94 / 0.043 against 0.94 / 0.029 (float64 flips as many top-1s).
    assert good["within_tolerance"] and not good["located"] and parity_warning(good) == ""
    plant_bias_error(monkeypatch, "blocks.3.1.conv_dw", 0.5)
    path = export_onnx(model, tmp_path / "bad.onnx", held_out).path
    bad = onnx_parity(model, path, held_out)
    assert not bad["within_tolerance"] and bad["first_divergent_layer"] == "blocks.3.1.conv_dw"
    assert bad["first_divergent_db"] < 40
    warning = parity_warning(bad)
    assert "below the parity bar" in warning and "blocks.3.1.conv_dw" in warning
    assert "\n" not in warning
    same_input = onnx_layer_table(model, path, held_out[:8]).set_index("layer")
    same_input = same_input["output_same_input_db"]
    # Every other layer is exact on its own input (measured 114 dB and more): only that one
    # computes something else, the layers after it merely see another input.
    assert (same_input.drop("blocks.3.1.conv_dw") >= 90).all(), same_input


@pytest.mark.parametrize("bits", [8, 4])
def test_bundled_model_at_low_resolution(bundled, bits, tmp_path):
    float_model, views, held_out = bundled
    model = quantized(float_model, make_config("lsq+", bits, bits, weight_init="mse"), views)
    report = export_onnx(model, tmp_path / "m.onnx", held_out)
    parity = onnx_parity(model, report.path, held_out)
    # At 64 px (a fifth of its resolution) the model is ill-conditioned: one rounding flip where
    # two float sums differ in order grows through the net (measured: the fake-quant model in
    # float64 agrees with itself in float32 on 0.97 of these views at W8A8). Measured with the
    # exact fold: agreement 1.0 / 0.97, logit SQNR 30 / 19 dB (W8A8 / W4A4).
    assert parity["agreement"] >= 0.9 and parity["logit_sqnr_db"] >= 15
    # Snapping the padded convs' offsets instead changes the model: at 4 bits it costs most of
    # the agreement (measured 0.44, 5.8 dB), at 8 bits a few dB.
    snapped = export_onnx(model, tmp_path / "s.onnx", held_out, offset="snap-padded")
    cost = onnx_parity(model, snapped.path, held_out)
    assert cost["logit_sqnr_db"] < parity["logit_sqnr_db"] - (8 if bits == 4 else 3)


@pytest.mark.slow
def test_bundled_model_parity_targets_at_224_px(tmp_path):
    from lsq.pipeline import DataConfig, ModelSpec, init_method, prepare

    bench = prepare(ModelSpec(), DataConfig(resolution=224, calib_views=32, eval_views=64), "cpu")
    result = init_method(bench, make_config("lsq+", 8, 8, weight_init="mse"))
    report = export_onnx(result.model, tmp_path / "m.onnx", bench.eval[:1])
    parity = onnx_parity(result.model, report.path, bench.eval)
    # Measured 1.0 and 4e-4 with the exact fold (1.3e-3 when the padded convs' offsets snapped).
    assert parity["agreement"] >= 0.99 and parity["kl"] <= 1e-3


def test_quantizers_off_the_exported_float_graph_equals_pytorch(bundled, tmp_path):
    float_model, views, held_out = bundled
    model = quantized(float_model, make_config("lsq+", 4, 4), views)
    with float_mode(model):
        report = export_onnx(model, tmp_path / "f.onnx", held_out)
        with torch.no_grad():
            expected = float_model(held_out[:8])
    out = onnx_logits(report.path, held_out[:8])
    assert float((out - expected).abs().max()) <= 1e-4
    assert all(r.route == "" and r.w_bits is None for r in report.layers)


# --- the offset: fold and snap -------------------------------------------------------------------
def tiny_quantized(bits=4):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6) - 0.5  # negatives: LSQ+ offsets are well away from 0
    config = make_config("lsq+", bits, bits, first_last_bits=None)
    return quantized(Tiny(), config, x), x


def layer_io(model, x):
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0], o)))
        for n, m in quant_layers(model).items()
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_offset_folding_is_exact_for_a_1x1_conv_a_linear_and_a_padded_conv():
    model, x = tiny_quantized()
    deployed, records = deploy_model(model, x)  # fold, the default
    rec = {r.layer: r for r in records}
    assert {n: r.route for n, r in rec.items()} == {"pw": "fold", "conv": "fold", "fc": "fold"}
    assert [n for n, r in rec.items() if r.border_bias] == ["conv"]
    io = layer_io(model, x)
    for name in ("pw", "conv", "fc"):
        assert abs(float(model.get_submodule(name).input_quant.offset.detach())) > 1e-3
        inp, out = io[name]
        with torch.no_grad():
            got = deployed.get_submodule(name)(inp)
        torch.testing.assert_close(got, out, atol=1e-5, rtol=1e-5)
        assert float(deployed.get_submodule(name).input_zero_point) == 0
    # The padded conv's borders see less of the offset than its inside: a per-channel bias
    # alone (the offset times the kernel's sum) is exact inside and off at the borders.
    conv = deployed.get_submodule("conv")
    with torch.no_grad():
        per_position = _OffsetBias.apply(
            conv.offset_kernel, conv.bias, *(conv.plan[k] for k in _GEOMETRY)
        )[0]
    per_channel = conv.bias + conv.offset_kernel.sum((1, 2, 3))
    err = (per_position - per_channel.view(-1, 1, 1)).abs()
    assert err[:, 1:-1, 1:-1].max() < 1e-5 < err.max()
    # snap-padded: only a per-channel bias, so the padded conv snaps its offset instead.
    _, records = deploy_model(model, x, offset="snap-padded")
    assert {r.layer: r.route for r in records} == {"pw": "fold", "conv": "snap", "fc": "fold"}


_GEOMETRY = ("size", "pads", "stride", "dilation")


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize(
    "conv, size",
    [
        (nn.Conv2d(3, 4, 3, padding=1), (7, 7)),
        (nn.Conv2d(3, 4, (3, 1), padding=(1, 0)), (7, 5)),
        (nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), (9, 9)),
        (nn.Conv2d(3, 4, 4, padding="same"), (8, 8)),
        (nn.Conv2d(4, 4, 5, padding=2, groups=4), (6, 6)),
        (Conv2dSame(3, 4, 3, stride=2), (8, 8)),  # TF "same": one row more at the bottom
        (Conv2dSame(3, 4, 3, stride=2), (8, 7)),  # ... and none at the sides
        (Conv2dSame(4, 4, 5, groups=4), (6, 6)),
    ],
    ids=[
        "pad1",
        "rows-only",
        "dilated-stride2",
        "same-even-kernel",
        "depthwise",
        "tf-same-even",
        "tf-same-uneven",
        "tf-same-depthwise",
    ],
)
def test_the_border_bias_is_exact_for_every_padding(conv, size, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, conv.in_channels, *size) - 0.7
    model = quantized(nn.Sequential(conv), make_config("lsq+", 4, 4, first_last_bits=None), x)
    assert abs(float(model[0].input_quant.offset.detach())) > 0.1
    report = export_onnx(model, tmp_path / "m.onnx", x)
    assert [(r.route, r.border_bias) for r in report.layers] == [("fold", True)]
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(onnx_logits(report.path, x), expected, atol=1e-5, rtol=1e-5)
    # The file stores the small kernel, not a bias per position (ONNX Runtime folds it on load).
    inits = {i.name: i for i in onnx.load(str(report.path)).graph.initializer}
    assert tuple(inits["0.offset_kernel"].dims) == (4, 1, *conv.kernel_size)


def test_a_border_bias_that_does_not_match_the_conv_is_refused_in_words(monkeypatch, tmp_path):
    import lsq.export

    model, x = tiny_quantized()
    monkeypatch.setattr(lsq.export, "_border_pads", lambda *args: (0, 0, 0, 0))  # a padding missed
    with pytest.raises(LSQError, match="cannot work out this conv's padding.*snap-padded"):
        export_onnx(model, tmp_path / "m.onnx", x)
    assert list(tmp_path.iterdir()) == []
    report = export_onnx(model, tmp_path / "m.onnx", x, offset="snap-padded")  # the way out
    assert [r.route for r in report.layers] == ["fold", "snap", "fold"]


def test_w4a4_on_a_random_timm_model_matches_and_snapping_is_reported_apart(resnet, tmp_path):
    x = torch.randn(16, 3, 64, 64)
    model = quantized(resnet, make_config("lsq+", 4, 4), x)
    report = export_onnx(model, tmp_path / "m.onnx", x)
    parity = onnx_parity(model, report.path, x)
    assert parity["agreement"] >= 0.98 and parity["kl"] <= 1e-3
    assert parity["logit_sqnr_db"] >= 40  # measured 48 dB
    # The per-layer table on the exported graph: with the fold the codes are the fake-quant
    # model's own; snapping changes some of them (the cost of snapping, layer by layer).
    table = onnx_layer_table(model, report.path, x[:4])
    assert list(table["layer"]) == [n for n, _ in quant_layers(model).items()]
    assert (table["codes_differ_same_input"] == 0).all()
    assert table["codes_differ"].max() <= 1e-3
    finite = table[table["output_sqnr_db"] < 100]  # inf: BN with zero gamma (timm's init)
    assert len(finite) >= 8
    diff = (finite["onnx_output_sqnr_db"] - finite["output_sqnr_db"]).abs()
    assert diff.max() <= 0.05
    snapped = export_onnx(model, tmp_path / "s.onnx", x, offset="snap")
    table = onnx_layer_table(model, snapped.path, x[:4]).set_index("layer")
    # Moving the grid by d steps changes the codes of at most about a fraction d of the values.
    for rec in snapped.layers:
        changed = table.loc[rec.layer, "codes_differ_same_input"]
        assert changed <= rec.snap_error_steps + 0.05
        assert changed > 0 or rec.snap_error_steps < 0.05


def test_the_layer_table_reads_the_graph_it_is_given(resnet, tmp_path):
    x = torch.randn(4, 3, 32, 32)
    model = quantized(resnet, make_config("lsq+", 8, 8), x)
    path = export_onnx(model, tmp_path / "m.onnx", x).path
    before = path.read_bytes()
    table = onnx_layer_table(model, path, x)
    assert path.read_bytes() == before  # the extra outputs are added in memory only
    assert len(table) == len(quant_layers(model))
    with float_mode(model):
        float_graph = export_onnx(model, tmp_path / "f.onnx", x).path
    with pytest.raises(LSQError, match="no quantized layer of this model"):
        onnx_layer_table(model, float_graph, x)
    tiny, tx = tiny_quantized()
    other = export_onnx(tiny, tmp_path / "t.onnx", tx).path  # its "fc" is named as resnet's
    with pytest.raises(LSQError, match="takes images of"):
        onnx_layer_table(model, other, x)


def test_snapping_moves_the_grid_by_at_most_half_a_step():
    model, x = tiny_quantized(3)
    aq = model.get_submodule("conv").input_quant
    with torch.no_grad():
        aq.offset.fill_(-2.63 * float(aq.scale))  # 0.37 of a step off the grid
    deployed, records = deploy_model(model, x, offset="snap")
    rec = {r.layer: r for r in records}["conv"]
    assert rec.zero_point == 3 and rec.snap_error_steps == pytest.approx(0.37, abs=1e-5)
    table = offset_table(model).set_index("layer")
    assert table.loc["conv", "snap_error_steps"] == pytest.approx(0.37, abs=1e-5)
    assert (table["snap_error_steps"] <= 0.5).all()
    # Each level of the fake-quant grid lands on a level of the snapped grid 0.37 steps away.
    s = float(aq.scale.detach())
    levels = float(aq.offset.detach()) + s * torch.arange(1.0, aq.qmax)
    with torch.no_grad():
        moved = (deployed.get_submodule("conv").quantized_input(levels) - levels).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, 0.37 * s), atol=1e-5, rtol=0)
    assert moved.max() <= s / 2


def test_a_range_without_zero_is_moved_not_given_an_impossible_zero_point(tmp_path):
    model, x = tiny_quantized(8)
    aq = model.get_submodule("conv").input_quant
    with torch.no_grad():
        aq.offset.fill_(300.4 * float(aq.scale))  # z would be -300: not a uint8
    report = export_onnx(model, tmp_path / "m.onnx", x, offset="snap")
    rec = {r.layer: r for r in report.layers}["conv"]
    assert rec.zero_point == 0 and rec.snap_error_steps == pytest.approx(0.4, abs=1e-4)
    deployed, _ = deploy_model(model, x, offset="snap")
    with torch.no_grad():
        expected = deployed(x)
    torch.testing.assert_close(onnx_logits(report.path, x), expected, atol=1e-4, rtol=1e-4)
    # The grid moved by 0.4 of a step, not by hundreds.
    s = float(aq.scale.detach())
    levels = float(aq.offset.detach()) + s * torch.arange(1.0, aq.qmax)
    with torch.no_grad():
        moved = (deployed.get_submodule("conv").quantized_input(levels) - levels).abs()
    assert float(moved.max()) == pytest.approx(0.4 * s, abs=1e-4)


# --- integer safetensors -------------------------------------------------------------------------
def test_integer_safetensors_hold_codes_scales_zero_points_and_the_arithmetic_works(tmp_path):
    model, x = tiny_quantized(4)
    report = export_safetensors(model, tmp_path / "m.safetensors", x)
    with safe_open(str(report.path), framework="pt") as f:
        header = json.loads(f.metadata()["lsq_export"])
        t = {k: f.get_tensor(k) for k in f.keys()}
    assert (
        t["conv.weight_q"].dtype == torch.int8 and t["conv.input_zero_point"].dtype == torch.uint8
    )
    layer = header["layers"]["conv"]
    assert layer["route"] == "fold" and layer["border_bias"] and layer["pads"] == [1, 1, 1, 1]
    # The module docstring's arithmetic, by hand, for the padded conv and its border bias.
    inp, out = layer_io(model, x)["conv"]
    s, z, shift = t["conv.input_scale"], t["conv.input_zero_point"].float(), t["conv.input_shift"]
    q = (torch.round((inp - shift) / s) + z).clamp(layer["qmin"], layer["qmax"])
    w = t["conv.weight_q"].float() * t["conv.weight_scale"].view(-1, 1, 1, 1)
    ones = F.pad(torch.ones(1, 1, *layer["size"]), layer["pads"])
    o = F.conv2d(
        ones, t["conv.offset_kernel"], t["conv.bias"], layer["stride"], 0, layer["dilation"]
    )
    y = F.conv2d(s * (q - z), w, None, padding=1) + o
    torch.testing.assert_close(y, out, atol=1e-5, rtol=1e-5)  # the fake-quant conv's output
    assert header["layers"]["pw"]["route"] == "fold" and not header["layers"]["pw"]["border_bias"]
    # The folded layer subtracts its continuous offset before rounding.
    beta = float(model.get_submodule("pw").input_quant.offset.detach())
    assert float(t["pw.input_shift"]) == pytest.approx(beta) and beta != 0


# --- bad input, runs, atomic writes ---------------------------------------------------------------
def test_bad_input_is_refused_in_words(resnet, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    model = quantized(resnet, make_config("lsq+", 8, 8), x)
    with pytest.raises(LSQError, match="offset must be one of"):
        export_onnx(model, tmp_path / "m.onnx", x, offset="round")
    with pytest.raises(LSQError, match="no quantized layer"):
        export_onnx(resnet, tmp_path / "m.onnx", x)
    fresh = copy.deepcopy(resnet)
    quantize_model(fresh, make_config("lsq+", 8, 8))
    with pytest.raises(LSQError, match="calibrate"):
        export_onnx(fresh, tmp_path / "m.onnx", x)
    with pytest.raises(LSQError, match="does not exist"):
        export_onnx(model, tmp_path / "no" / "m.onnx", x)
    with pytest.raises(LSQError, match="must end in .onnx"):
        export_onnx(model, tmp_path / "m.txt", x)
    with pytest.raises(LSQError, match="outside"):
        export_onnx(model, tmp_path / "m.onnx", x, within=tmp_path / "exports")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        import os

        if not os.access(ro, os.W_OK):  # root may write anywhere: nothing to test then
            with pytest.raises(LSQError, match="not writable"):
                export_safetensors(model, ro / "m.safetensors", x)
    finally:
        ro.chmod(0o700)


def test_a_failed_export_leaves_no_half_written_file(tmp_path, monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    model = quantized(Untraceable(), make_config("lsq+", 8, 8), x)
    with pytest.raises(LSQError, match="cannot trace Untraceable"):
        export_onnx(model, tmp_path / "m.onnx", x)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "m.onnx").write_bytes(b"the previous export")
    with pytest.raises(LSQError):
        export_onnx(model, tmp_path / "m.onnx", x)
    assert (tmp_path / "m.onnx").read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]

    def dies_half_way(model, args, f, **kwargs):
        Path(f).write_bytes(b"half an ONNX file")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch.onnx, "export", dies_half_way)
    with pytest.raises(LSQError, match="killed mid-write"):
        export_onnx(
            quantized(Tiny(), make_config("lsq+", 8, 8), torch.randn(2, 4, 6, 6)),
            tmp_path / "m.onnx",
            torch.randn(1, 4, 6, 6),
        )
    assert (tmp_path / "m.onnx").read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def small_run(tmp_path, finish=True):
    from lsq.pipeline import DataConfig, ModelSpec, init_method, prepare, save_result, start_run

    data = DataConfig(resolution=32, calib_views=8, eval_views=8, batch_size=8)
    bench = prepare(ModelSpec("resnet10t", "random"), data, "cpu")
    result = init_method(bench, make_config("lsq+", 8, 8))
    if finish:
        return save_result(bench, result, root=tmp_path / "runs").run_path, result
    return start_run(bench, result, root=tmp_path / "runs").path, result


def test_a_saved_run_exports_to_both_formats_with_parity(tmp_path):
    path, result = small_run(tmp_path)
    onnx_report = export_run(path, "onnx", parity_views=8)
    assert onnx_report.path == path / "model.onnx" and onnx_report.path.is_file()
    assert onnx_report.parity["agreement"] >= 0.99
    st_report = export_run(path, "safetensors", out=tmp_path / "int.safetensors")
    assert st_report.path.is_file()
    with pytest.raises(LSQError, match="format must be one of"):
        export_run(path, "tflite")


def test_runs_that_cannot_be_exported_are_refused_in_words(tmp_path):
    path, _ = small_run(tmp_path, finish=False)
    from lsq.runs import Run

    Run(path, "").finish("failed", "out of memory")
    with pytest.raises(LSQError, match="only a complete run"):
        export_run(path, "onnx")
    not_a_run = tmp_path / "holiday-photos"
    not_a_run.mkdir()
    (not_a_run / "a.txt").write_text("hello")
    with pytest.raises(LSQError, match="not a readable run"):
        export_run(not_a_run, "onnx")
    done, _ = small_run(tmp_path)
    config = json.loads((done / "config.json").read_text())
    config["meta"]["model"]["name"] = "my_custom_net"
    (done / "config.json").write_text(json.dumps(config))
    with pytest.raises(LSQError, match="cannot build"):
        export_run(done, "onnx")
