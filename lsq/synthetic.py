"""Images from nothing: inputs optimised so the float model's BatchNorm statistics match.

Every BatchNorm layer remembers the mean and variance of what it saw in training (its running
statistics). Images whose activations reproduce them look, to the model, like its training data
(ZeroQ, Cai et al. 2020; GENIE, Jeon et al. 2022): good enough to calibrate activation ranges and
to reconstruct blocks without a single photo. The loss per batch is

    sum over BN layers of ||mean - running_mean|| + ||std - running_std||
    + ce_weight * cross-entropy to random target classes (each image leans towards one class)
    + tv_weight * total variation (neighbouring pixels alike: smooth, photo-like images)

with pixels kept inside the range a real normalised image can take. Results are cached on disk
per model, resolution, count and seed, so the cost is paid once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lsq.device import resolve_device
from lsq.errors import LSQError
from lsq.runs import atomic_write
from lsq.validate import finite_number

#: progress(done, total): images finished so far.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SynthConfig:
    """How images are synthesised; part of the cache key."""

    count: int = 64
    resolution: int = 128
    iters: int = 100
    batch_size: int = 32
    lr: float = 0.2
    ce_weight: float = 5.0
    tv_weight: float = 200.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo, hi in (
            ("count", 1, 4096),
            ("resolution", 32, 1024),
            ("iters", 1, 10_000),
            ("batch_size", 1, 1024),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise LSQError(f"synthetic {name} must be a whole number from {lo} to {hi}")
        for name in ("lr", "ce_weight", "tv_weight"):
            finite_number(getattr(self, name), f"synthetic {name}", 0)


class BNStatsLoss:
    """Hooks on every BatchNorm2d with running statistics; ``loss()`` after a forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.terms: list[Tensor] = []
        self.handles = []
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                self.handles.append(m.register_forward_pre_hook(self._hook))
        if not self.handles:
            raise LSQError(
                "the model has no BatchNorm layer with running statistics: images cannot be "
                "synthesised from it; use photos"
            )

    def _hook(self, bn: nn.BatchNorm2d, inputs: tuple[Tensor, ...]) -> None:
        x = inputs[0].float()
        mean = x.mean((0, 2, 3))
        std = (x.var((0, 2, 3), unbiased=False) + bn.eps).sqrt()
        want_std = (bn.running_var + bn.eps).sqrt()
        self.terms.append(
            torch.linalg.vector_norm(mean - bn.running_mean)
            + torch.linalg.vector_norm(std - want_std)
        )

    def loss(self) -> Tensor:
        out = torch.stack(self.terms).sum()
        self.terms = []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def total_variation(x: Tensor) -> Tensor:
    """Mean squared difference of neighbouring pixels."""
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean() + (x[..., :, 1:] - x[..., :, :-1]).pow(
        2
    ).mean()


def pixel_bounds(data_config: dict) -> tuple[Tensor, Tensor]:
    """The range of a normalised image: (0 - mean) / std to (1 - mean) / std per channel."""
    mean = torch.tensor([float(m) for m in data_config["mean"]]).view(1, 3, 1, 1)
    std = torch.tensor([float(s) for s in data_config["std"]]).view(1, 3, 1, 1)
    return -mean / std, (1 - mean) / std


def synthesize(
    model: nn.Module,
    data_config: dict,
    cfg: SynthConfig = SynthConfig(),
    device: str = "auto",
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    history: list[float] | None = None,
) -> Tensor:
    """``cfg.count`` images [N, 3, R, R] (normalised like the model's input) from the float
    ``model``'s BatchNorm statistics. ``history`` collects each batch's loss per iteration."""
    dev = resolve_device(device)
    model = model.to(dev).eval()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)  # only the pixels learn; restored below
    lo, hi = (b.to(dev) for b in pixel_bounds(data_config))
    gen = torch.Generator().manual_seed(cfg.seed)
    classes = _num_classes(model, cfg.resolution, dev)
    out = []
    bn = BNStatsLoss(model)
    try:
        for start in range(0, cfg.count, cfg.batch_size):
            n = min(cfg.batch_size, cfg.count - start)
            x = (torch.randn(n, 3, cfg.resolution, cfg.resolution, generator=gen) * 0.5).to(dev)
            x = x.clamp(lo, hi).requires_grad_(True)
            targets = torch.randint(classes, (n,), generator=gen).to(dev)
            opt = torch.optim.Adam([x], lr=cfg.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.iters)
            for _ in range(cfg.iters):
                if should_stop is not None and should_stop():
                    raise LSQError("image synthesis stopped by the user")
                logits = model(x)
                loss = bn.loss() + cfg.ce_weight * F.cross_entropy(logits.float(), targets)
                loss = loss + cfg.tv_weight * total_variation(x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.clamp_(lo, hi)
                if history is not None:
                    history.append(float(loss.detach()))
            out.append(x.detach().cpu())
            if progress is not None:
                progress(start + n, cfg.count)
    finally:
        bn.close()
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.cat(out)


@torch.no_grad()
def _num_classes(model: nn.Module, resolution: int, device) -> int:
    return int(model(torch.zeros(1, 3, resolution, resolution, device=device)).shape[-1])


def cache_dir() -> Path:
    """Where synthesised images are kept: ``LSQ_CACHE_DIR``, else ``data/synthetic``."""
    return Path(os.environ.get("LSQ_CACHE_DIR", "data/synthetic"))


def cache_path(model_key: str, cfg: SynthConfig, root: Path | None = None) -> Path:
    """One file per model and settings; the model key is hashed into the name."""
    key = repr((model_key, sorted(asdict(cfg).items())))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in model_key)[:40]
    return (root or cache_dir()) / f"{safe}-{cfg.resolution}px-{cfg.count}-{digest}.safetensors"


def cached_synthesize(
    model: nn.Module,
    data_config: dict,
    model_key: str,
    cfg: SynthConfig = SynthConfig(),
    device: str = "auto",
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
    root: Path | None = None,
) -> tuple[Tensor, bool]:
    """``synthesize`` through the disk cache: (images, whether they came from the cache).

    A cache file that cannot be read or holds the wrong shape is made again.
    """
    path = cache_path(model_key, cfg, root)
    want = (cfg.count, 3, cfg.resolution, cfg.resolution)
    if path.exists():
        try:
            images = load_file(str(path))["images"]
            if tuple(images.shape) == want and torch.isfinite(images).all():
                return images, True
        except Exception:  # corrupt or foreign file: rebuild below
            pass
    t0 = time.perf_counter()
    images = synthesize(model, data_config, cfg, device, progress, should_stop)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": model_key, "seconds": f"{time.perf_counter() - t0:.1f}"}
    atomic_write(
        path, lambda tmp: save_file({"images": images.contiguous()}, str(tmp), metadata=meta)
    )
    return images, False
