"""Shared by the tests: a small network shaped like a timm model, a job hook, and an exporter
planted with one wrong layer."""

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
