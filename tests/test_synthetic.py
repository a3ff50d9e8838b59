"""Images synthesised from BatchNorm statistics: the loss falls, the cache is used and repaired."""

import pytest
import torch
from torch import nn

from lsq import LSQError
from lsq.synthetic import (
    BNStatsLoss,
    SynthConfig,
    cache_path,
    cached_synthesize,
    pixel_bounds,
    synthesize,
)

DATA_CONFIG = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def bn_net(seed=0):
    """A conv net whose BatchNorm running statistics are far from what noise produces."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )
    # "Training data": nearly flat images of one colour, normalised; far from noise.
    for bn in (net[1], net[4]):
        bn.momentum = None  # a plain average over the batches below
    net.train()
    g = torch.Generator().manual_seed(seed)
    colour = torch.tensor([0.9, 0.2, 0.5]).view(1, 3, 1, 1)
    with torch.no_grad():
        for _ in range(10):
            raw = colour + 0.05 * torch.randn(16, 3, 32, 32, generator=g)
            net((raw - 0.5) / 0.25)
    return net.eval()


SMALL = SynthConfig(count=6, resolution=32, iters=40, batch_size=4, lr=0.1, tv_weight=1.0)


def bn_loss_of(net, images):
    loss = BNStatsLoss(net)
    with torch.no_grad():
        net(images)
    value = float(loss.loss())
    loss.close()
    return value


def test_bn_statistics_loss_falls_and_pixels_stay_in_range():
    net = bn_net()
    history = []
    images = synthesize(net, DATA_CONFIG, SMALL, device="cpu", history=history)
    assert images.shape == (6, 3, 32, 32)
    noise = (torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 0.5).clamp(
        *pixel_bounds(DATA_CONFIG)
    )
    assert bn_loss_of(net, images) < 0.5 * bn_loss_of(net, noise)
    assert history[-1] < history[0]
    lo, hi = pixel_bounds(DATA_CONFIG)
    assert (images >= lo - 1e-6).all() and (images <= hi + 1e-6).all()
    # The float model is left as it was: no hooks, gradients still on.
    assert all(p.requires_grad for p in net.parameters())
    assert not net[1]._forward_pre_hooks


def test_same_seed_same_images():
    a = synthesize(bn_net(), DATA_CONFIG, SMALL.__class__(count=2, resolution=32, iters=3))
    b = synthesize(bn_net(), DATA_CONFIG, SMALL.__class__(count=2, resolution=32, iters=3))
    assert torch.equal(a, b)


def test_cache_is_reused_and_a_corrupt_file_is_rebuilt(tmp_path, monkeypatch):
    net = bn_net()
    cfg = SynthConfig(count=2, resolution=32, iters=3)
    first, cached = cached_synthesize(net, DATA_CONFIG, "toy", cfg, root=tmp_path)
    assert not cached
    calls = []
    import lsq.synthetic as synthetic

    real = synthetic.synthesize
    monkeypatch.setattr(synthetic, "synthesize", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, cached = cached_synthesize(net, DATA_CONFIG, "toy", cfg, root=tmp_path)
    assert cached and not calls and torch.equal(first, again)
    # Another model key or other settings: another file.
    assert cache_path("other", cfg, tmp_path) != cache_path("toy", cfg, tmp_path)
    assert cache_path("toy", cfg, tmp_path) != cache_path("toy", SynthConfig(count=3), tmp_path)
    cache_path("toy", cfg, tmp_path).write_bytes(b"not a safetensors file")
    rebuilt, cached = cached_synthesize(net, DATA_CONFIG, "toy", cfg, root=tmp_path)
    assert not cached and calls and torch.equal(rebuilt, first)


def test_models_without_batchnorm_and_bad_settings_are_refused_in_words():
    with pytest.raises(LSQError, match="no BatchNorm"):
        synthesize(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten()), DATA_CONFIG, SMALL)
    with pytest.raises(LSQError, match="count"):
        SynthConfig(count=0)
    with pytest.raises(LSQError, match="lr"):
        SynthConfig(lr=float("nan"))
