"""The low-bit recipe's pieces working together: fresh views in QAT, reconstruction then QAT."""

import copy

import torch
from torch import nn

from lsq import make_config, quantize_model
from lsq.calibrate import calibrate
from lsq.data import TensorViews
from lsq.train import TrainConfig, train


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


class Recording:
    """A view source that remembers what it handed out."""

    def __init__(self, views):
        self.source = TensorViews(views, seed=0)
        self.seen = []

    def batch(self, step, n):
        x = self.source.batch(step, n)
        self.seen.append(x)
        return x


def test_qat_on_fresh_views_draws_new_views_each_step_and_learns():
    torch.manual_seed(0)
    teacher = Net().eval()
    model = copy.deepcopy(teacher)
    cfg = make_config("lsq+", 3, 3, first_last_bits=None)
    quantize_model(model, cfg)
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(64, 3, 8, 8, generator=g)
    calibrate(model, pool.split(16), cfg)
    source = Recording(pool)
    events = list(
        train(model, teacher, source, pool[:16], TrainConfig(steps=6, batch_size=8, eval_every=6,
                                                            compile=False, lr_weights=1e-3))
    )  # fmt: skip
    assert events[-1].kind == "done"
    assert len(source.seen) == 6
    assert not torch.equal(source.seen[0], source.seen[1])
    steps = [e for e in events if e.kind == "step"]
    # The loss is the distillation loss against the teacher on that very batch.
    assert all(e.loss is not None and e.loss >= 0 for e in steps)
    assert events[-2].kl < events[0].kl
