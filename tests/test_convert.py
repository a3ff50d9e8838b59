"""quantize_model on timm CNNs: what it wraps, float behaviour, first/last bits, BN folding."""

import copy

import pytest
import timm
import torch
from torch import nn

from lsq import LSQError, make_config, quantize_model
from lsq.calibrate import calibrate
from lsq.convert import QuantLayer, float_mode, fold_batchnorm, quant_layers, quantizers, switched


def count_targets(model):
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


@pytest.mark.parametrize("name", ["efficientnet_b0", "mixnet_s", "tf_efficientnet_lite0"])
def test_wraps_every_conv_and_linear(name):
    model = timm.create_model(name, pretrained=False)
    expected = count_targets(model)
    names = quantize_model(model, make_config("lsq+", 4, 4))
    assert len(names) == expected == len(quant_layers(model))
    kinds = {layer.kind for layer in quant_layers(model).values()}
    assert {"conv", "depthwise", "linear"} <= kinds
    # Every conv/linear now sits inside a wrapper.
    inner = [m for m in model.modules() if isinstance(m, QuantLayer)]
    assert all(isinstance(m.layer, (nn.Conv2d, nn.Linear)) for m in inner)


def test_quantizers_off_gives_identical_outputs():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    quantize_model(model, make_config("lsq+", 4, 4))
    calibrate(model, [x], make_config("lsq+", 4, 4))
    with torch.no_grad():
        expected = ref(x)
        with float_mode(model):
            got = model(x)
        quantized = model(x)
    assert torch.equal(got, expected)
    assert not torch.equal(quantized, expected)
    with torch.no_grad():
        assert torch.equal(model(x), quantized)  # float_mode switched everything back on
        with switched(quantizers(model), False):
            assert torch.equal(model(x), expected)


def test_switched_restores_switches_and_removes_hooks_even_on_an_error():
    model = timm.create_model("resnet10t", pretrained=False).eval()
    quantize_model(model, make_config("lsq+", 4, 4))
    layers = quant_layers(model)
    first = next(iter(layers.values()))
    first.weight_quant.enabled = False  # a switch that was already off stays off
    before = [q.enabled for q in quantizers(model)]
    assert True in before and False in before
    seen = []
    hooks = [(first, lambda m, i: seen.append(1), True)]
    with pytest.raises(RuntimeError, match="boom"):
        with switched(quantizers(model), False, hooks=hooks):
            assert not any(q.enabled for q in quantizers(model))
            model(torch.zeros(1, 3, 32, 32))
            raise RuntimeError("boom")
    assert seen == [1]
    assert [q.enabled for q in quantizers(model)] == before
    with float_mode(model):
        model(torch.zeros(1, 3, 32, 32))
    assert seen == [1], "the hook was removed"


def test_first_and_last_layers_default_to_8_bits():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    quantize_model(model, make_config("lsq", 2, 3))
    layers = quant_layers(model)
    assert layers["conv_stem"].weight_quant.bits == 8 and layers["conv_stem"].input_quant.bits == 8
    assert layers["classifier"].weight_quant.bits == 8
    assert layers["conv_head"].weight_quant.bits == 2 and layers["conv_head"].input_quant.bits == 3
    assert [n for n, m in layers.items() if m.first_or_last] == ["conv_stem", "classifier"]
    model2 = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    quantize_model(model2, make_config("lsq", 2, 3, first_last_bits=None))
    assert quant_layers(model2)["conv_stem"].weight_quant.bits == 2


def test_conv2d_same_keeps_its_padding():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    same = [n for n, m in model.named_modules() if type(m).__name__ == "Conv2dSame"]
    assert same, "tf_efficientnet_lite0 should have Conv2dSame layers"
    name = same[0]
    conv = copy.deepcopy(model.get_submodule(name))
    quantize_model(model, make_config("minmax", 8, 8))
    layer = quant_layers(model)[name]
    layer.input_quant.enabled = False
    x = torch.randn(1, conv.in_channels, 17, 17)  # odd size: "same" padding is asymmetric here
    with torch.no_grad():
        wq = layer.weight_quant(conv.weight)
        conv.weight.copy_(wq)
        assert torch.equal(layer(x), conv(x))


def test_state_dict_round_trip_restores_outputs():
    torch.manual_seed(1)
    cfg = make_config("lsq", 4, 4)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64) - 0.5
    quantize_model(model, cfg)
    calibrate(model, [x], cfg)
    other = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    quantize_model(other, cfg)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


def test_quantizing_twice_and_a_model_without_layers_are_refused():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    quantize_model(model, make_config())
    with pytest.raises(LSQError, match="already quantized"):
        quantize_model(model, make_config())
    with pytest.raises(LSQError, match="no Conv2d or Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), make_config())


def test_fold_batchnorm_matches_the_unfolded_model():
    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    pairs = fold_batchnorm(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in ref.modules())
    assert len(pairs) == n_bn
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    folded = copy.deepcopy(ref)
    quantize_model(folded, make_config("minmax", 8, 8, fold_bn=True))
    assert all(quant_layers(folded)[c].layer.bias is not None for c, _ in pairs)
