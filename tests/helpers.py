"""Shared by the tests: the toy networks (each with the shape its tests need: a timm-like chain,
a skip, no forward_features, an untraceable op, ...), a job hook, and an exporter planted with one
wrong layer."""

import torch
from torch import nn

from lsq.export import ExportLayer


class Block(nn.Module):
    """A residual block: conv, activation, 1x1 conv, added to the input."""

    def __init__(self, c: int, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pw = nn.Conv2d(c, c, 1)
        self.act = act()

    def forward(self, x):
        return x + self.pw(self.act(self.conv(x)))


class ChainNet(nn.Module):
    """Shaped like a timm model: stem, ``blocks`` run in order, head, forward_head."""

    def __init__(self, c: int = 8, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, c, 3, padding=1)
        self.act = act()  # a child module: the stem unit runs it
        self.blocks = nn.Sequential(
            nn.Sequential(Block(c, act), Block(c, act)), nn.Sequential(Block(c, act))
        )
        self.conv_head = nn.Conv2d(c, 16, 1)
        self.classifier = nn.Linear(16, 10)

    def forward_features(self, x):
        return self.conv_head(self.blocks(self.act(self.conv_stem(x))))

    def forward_head(self, x):
        return self.classifier(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def on_step(job, action):
    """``job``, calling ``action()`` each time it records a training step event."""
    add = job.add_event

    def add_event(event) -> None:
        add(event)
        if event[1].kind == "step":
            action()

    job.add_event = add_event
    return job


def plant_bias_error(monkeypatch, layer: str, amount: float) -> None:
    """Exports made in the test add ``amount`` to ``layer``'s exported bias: an exporter that
    computes something else at that layer only (as ONNX Runtime's rounded biases did)."""
    original = ExportLayer.from_quant_layer

    def planted(name, *args, **kwargs):
        exported = original(name, *args, **kwargs)
        if name == layer:
            exported.bias += amount
        return exported

    monkeypatch.setattr(ExportLayer, "from_quant_layer", planted)


class Toy(nn.Module):
    """Input -> conv (sees the raw input) -> ReLU -> conv -> pool -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(4, 6, 1)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = self.pw(x)
        x = self.conv(x)
        return self.fc(x.mean((2, 3)))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return torch.special.bessel_j0(self.conv(x))  # no ONNX operator for this


class SwishChain(nn.Module):
    """Swish activations (negative inputs downstream), a plain chain of convs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = nn.functional.silu(self.a(x))
        x = nn.functional.silu(self.b(x))
        return self.fc(nn.functional.silu(self.c(x)).mean((2, 3)))


class Plain(nn.Module):
    """No forward_features: the lab must fall back to whole forwards."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.nn.functional.silu(self.a(x))
        x = torch.nn.functional.silu(self.b(x)) - 0.1
        return self.fc(x.mean((2, 3)))


class OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class SkipNet(nn.Module):
    """Not a chain: the input skips over the middle."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 3, 1)
        self.fc = nn.Linear(3, 10)

    def forward(self, x):
        y = x + self.b(torch.relu(self.a(x)))
        return self.fc(y.mean((2, 3)))
