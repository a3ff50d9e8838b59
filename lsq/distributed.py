"""QAT at scale: the project's quantizers, inits and run format on an image folder, under torchrun.

    python -m lsq train --data train/ --val val/ --w-bits 4 --a-bits 4 --epochs 1 --batch 256
    torchrun --nproc_per_node=8 -m lsq train ...     # the same run on one node's 8 GPUs

One process per device; torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) says which, and
without it the same code runs as one process. The data is an ImageNet-style folder (one
sub-folder per class) read with timm's dataset and transforms. The model is quantized with
``quantize_model``, calibrated and initialised on rank 0 (``collect_stats``/``init_from_stats``,
optionally block-wise reconstruction) and broadcast, so every rank starts identical; it then
trains under DistributedDataParallel on cross-entropy with the folder's labels, plus
``distill`` times the distillation loss from the float model. BatchNorm stays in eval mode, as
in ``lsq.train``; bf16 autocast on CUDA.

The run does not depend on the number of processes W. ``batch_size`` is the global batch B,
split evenly (B/W per rank). DistributedSampler with drop_last hands rank r the positions r,
r+W, r+2W, ... of the epoch's permutation, so at step t the ranks together hold positions
tB..tB+B-1: the same images for any W. Each image's augmentation is drawn from (seed, epoch,
index), not from a worker's random state. LSQ's gradient scale g = 1/sqrt(N * Qp) counts N per
sample (activations) or per output channel (weights), never the batch, so every rank uses the
g of the global batch; each rank's loss is the mean over its B/W images and DDP averages the
gradients, which is exactly the gradient of the mean over all B. So W processes take the same
steps as one process with batch B (tests/test_distributed.py checks it to float tolerance).

Checkpoints go to ``<run>/checkpoints/step-XXXXXXXX.pt`` every ``ckpt_every`` steps (written
atomically, the last ``keep`` kept): model, optimizer, scheduler, step, random states (the CPU's
and this device's) and the curves so far. ``resume`` continues the same loss curve, also with
another W (the global batch stays B). Only a run nobody writes can be resumed: the writer holds
``<run>/.lock`` (host and pid; a lock whose process is gone from this host is stale and taken
over). A checkpoint continues only the setup it was written for (``_fingerprint``); the learning
rates alone may change on resume (the cosine schedule goes on from the step reached, with the new
base rates). The runs folder must be one that every node sees. The run folder is the project's
(``lsq.runs``): the app's Runs page lists it with its curves and its per-layer table; the tables
are written at the start, at each checkpoint and at the end.

Errors: bad input raises ``LSQError`` on every rank before any work. Work done on rank 0 alone
(calibration, the run's files, checkpoints) reports its failure to the other ranks, which stop
too; they wait for it in a gloo group with a long timeout (``WAIT_TIMEOUT``), while the training
collectives keep PyTorch's normal timeout.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import timm.data
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from lsq.analysis import layer_table, model_metrics
from lsq.calibrate import collect_stats, init_from_stats
from lsq.config import QuantConfig
from lsq.convert import quantize_model
from lsq.data import MAX_RESOLUTION, MIN_RESOLUTION
from lsq.device import resolve_device
from lsq.errors import LSQError
from lsq.metrics import distillation_loss, logits
from lsq.models import load_model
from lsq.pipeline import ModelSpec
from lsq.quantizers import fallback_note, refresh_flags, set_kernels
from lsq.reconstruct import ReconstructConfig, reconstruct, unit_frame

# The project's one atomic writer (temp file, fsync, rename), for the checkpoints too.
from lsq.runs import Run, atomic_write, list_runs, load_run, pid_alive, runs_root
from lsq.status import Status
from lsq.train import (
    OPTIMIZERS,
    TrainConfig,
    WeightFlips,
    make_optimizer,
    param_groups,
    quantizer_snapshot,
    update,
)
from lsq.validate import finite_number, whole_number

#: ``meta["kind"]`` of runs written here; ``--resume`` only picks these up.
KIND = "folder-qat"
#: ``resume`` value meaning: the newest unfinished run of this model and config.
LATEST = "latest"
#: Views (from the validation folder, else the calibration images) behind the agreement and KL
#: with the float model that the Runs page shows (top-1 alone with a new head), and behind the
#: per-layer table (first 8).
METRIC_VIEWS = 64
#: Quantizer trajectories are sampled about this many times over a run; each sample after step 0
#: also holds that one step's weight flips (``_FlipSampler``).
TRAJECTORY_POINTS = 200
#: Batch of calibration and of the metrics on rank 0: a constant, so that the statistics (whose
#: sample is drawn batch by batch) do not depend on the number of processes.
CALIB_BATCH = 32
#: Ranks wait for rank 0's own work (calibration and reconstruction above all) for at most this
#: long, in a gloo group of their own; the training's collectives keep PyTorch's default timeout.
WAIT_TIMEOUT = timedelta(hours=2)
#: 2: the fingerprint names every setting, the random states hold this device's CUDA state only,
#: and ``flip_start`` holds the weight codes the flip counts start from.
CHECKPOINT_FORMAT = 2
#: The file in a run folder that says which process writes the run (JSON: host, pid).
LOCK_NAME = ".lock"
#: Fingerprint entries a resume may change, and the setting behind each (the learning rates).
LR_KEYS = {
    "lr weights": "lr_weights",
    "lr weight quantizers": "lr_weight_quant",
    "lr activation quantizers": "lr_act_quant",
}
#: Optimizer parameter group (``lsq.train.param_groups``) -> its learning-rate setting.
GROUP_LR = {
    "weights": "lr_weights",
    "other": "lr_weights",
    "weight_quant": "lr_weight_quant",
    "act_quant": "lr_act_quant",
}
_TRAIN = TrainConfig()


@dataclass(frozen=True)
class FolderQATConfig:
    """Settings of a QAT run on an image folder (one process or many)."""

    data: str
    val: str | None = None
    model: ModelSpec = ModelSpec()
    quant: QuantConfig = QuantConfig()
    #: Replace the classifier with a new one for the folder's classes (random weights, so no
    #: distillation). Otherwise the folder's class count must equal the model's outputs.
    new_head: bool = False
    resolution: int | None = None  # None: the model's own input size
    #: Length: ``steps`` or ``epochs`` (one of them; neither means one epoch).
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 64  # global, over all processes
    workers: int = 4  # data-loading processes per rank
    optimizer: str = _TRAIN.optimizer
    lr_weights: float = _TRAIN.lr_weights
    lr_weight_quant: float = _TRAIN.lr_weight_quant
    lr_act_quant: float = _TRAIN.lr_act_quant
    momentum: float = _TRAIN.momentum
    weight_decay: float = _TRAIN.weight_decay
    #: Weight of the distillation term KL(float || quantized) added to the cross-entropy.
    distill: float = 0.0
    calib_images: int = 256
    #: Block-wise reconstruction on the calibration images before QAT (rank 0), or None.
    reconstruct: ReconstructConfig | None = None
    ckpt_every: int = 500
    keep: int = 3
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    bf16: bool = _TRAIN.bf16  # CUDA only; the CPU always computes in fp32
    compile: bool = True

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise LSQError("give the length as epochs or as steps, not both")
        if self.epochs is not None:
            object.__setattr__(self, "epochs", whole_number(self.epochs, "epochs", 1, 10_000))
        if self.steps is not None:
            object.__setattr__(self, "steps", whole_number(self.steps, "steps", 1, 10_000_000))
        for name, lo, hi in (
            ("batch_size", 1, 1 << 20),
            ("workers", 0, 256),
            ("calib_images", 1, 1 << 16),
            ("ckpt_every", 1, None),
            ("keep", 1, 1000),
            ("log_every", 1, None),
            ("seed", 0, None),
        ):
            object.__setattr__(self, name, whole_number(getattr(self, name), name, lo, hi))
        if self.resolution is not None:
            res = whole_number(self.resolution, "resolution", MIN_RESOLUTION, MAX_RESOLUTION)
            object.__setattr__(self, "resolution", res)
        if self.optimizer not in OPTIMIZERS:
            raise LSQError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        for name in ("lr_weights", "lr_weight_quant", "lr_act_quant", "momentum"):
            finite_number(getattr(self, name), name, 0, 1e6)
        finite_number(self.weight_decay, "weight_decay", 0, 1.0)
        finite_number(self.distill, "distill", 0, 1e3)
        if self.distill and self.new_head:
            raise LSQError(
                "distillation needs the float model's own classifier, and a new head has none "
                "trained; drop --distill or --new-head"
            )
        if not self.data:
            raise LSQError("give the training folder (--data DIR, one sub-folder per class)")
        resolve_device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FolderQATResult:
    """How a run ended, as this process saw it (only rank 0 writes the run)."""

    status: str
    message: str
    run_path: Path
    steps: int
    rank: int
    world_size: int
    val_top1: float | None = None
    images_per_second: float | None = None
    history: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- processes


@dataclass
class _Group:
    """This process's place among the ranks, and the few collectives the engine uses.

    ``waiter`` is a gloo group with a long timeout (``WAIT_TIMEOUT``) for the points where ranks
    wait for work done on rank 0 alone, or for every rank's verdict on its own setup
    (``wait=True``); everything else runs in the default group with its normal timeout, so a
    rank that dies mid-training does not keep the others waiting for hours.
    """

    rank: int
    world: int
    local_rank: int
    device: torch.device
    waiter: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj: object, wait: bool = False) -> object:
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.waiter if wait else None)
        return box[0]

    def gather_objects(self, obj: object, wait: bool = False) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.waiter if wait else None)
        return out

    def mean(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast_module(self, module: nn.Module) -> None:
        """Every parameter and buffer of ``module`` from rank 0 (quantizer states included)."""
        if self.world > 1:
            with torch.no_grad():
                for t in module.state_dict().values():
                    dist.broadcast(t, src=0)
            refresh_flags(module)  # the quantizers' Python flags, from the buffers just written


def _int_env(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise LSQError(
            f"${name} must be a whole number (torchrun sets it), got {os.environ[name]!r}"
        ) from None


def _start_group(device: str) -> _Group:
    """Join torchrun's process group (NCCL on CUDA, gloo on the CPU) with its default timeout,
    plus the gloo group for waiting on rank 0; or be the only process."""
    world, rank = _int_env("WORLD_SIZE", 1), _int_env("RANK", 0)
    local_rank = _int_env("LOCAL_RANK", 0)
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LSQError(
                f"LOCAL_RANK is {local_rank} but only {torch.cuda.device_count()} GPU(s) are "
                "visible; start at most that many processes per node (--nproc_per_node)"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    waiter = None
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        waiter = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return _Group(rank, world, local_rank, dev, waiter)


def _error_of(e: BaseException) -> tuple[str, str]:
    return ("LSQError" if isinstance(e, LSQError) else type(e).__name__, str(e))


def _raise_remote(error: tuple[str, str], rank: int) -> None:
    """Raise, on this rank, the error another rank reported: an ``LSQError`` as it is."""
    kind, message = error
    if kind == "LSQError":
        raise LSQError(message)
    raise RuntimeError(f"rank {rank} failed ({kind}: {message}); this rank stops too")


def _on_rank0(group: _Group, work: Callable[[], object]) -> object:
    """``work()`` run on rank 0, its result sent to every rank; an error there is raised on
    every rank, so none waits forever. The others wait in the long-timeout group."""
    result, error = None, None
    if group.main:
        try:
            result = work()
        except LSQError as e:
            error = _error_of(e)
        except BaseException as e:
            if group.world > 1:
                group.broadcast_object((None, _error_of(e)), wait=True)
            raise
    result, error = group.broadcast_object((result, error), wait=True)
    if error is not None:
        _raise_remote(error, 0)
    return result


def _agree(group: _Group, work: Callable[[], object]) -> object:
    """``work()`` on every rank, then every rank learns whether any failed and, if one did,
    raises (its own error, or the first other rank's), so none goes on alone."""
    result, error, own = None, None, None
    try:
        result = work()
    except Exception as e:
        error, own = _error_of(e), e
    errors = group.gather_objects(error, wait=True)
    if own is not None:
        raise own
    for rank, err in enumerate(errors):
        if err is not None:
            _raise_remote(err, rank)
    return result


# --------------------------------------------------------------------------- data


def _image_dataset(folder: Path, what: str):
    """timm's ImageDataset over ``folder``, refusing one without class sub-folders in words."""
    if not folder.exists():
        raise LSQError(f"the {what} folder {folder} does not exist")
    if not folder.is_dir():
        raise LSQError(f"the {what} folder {folder} is a file, not a folder of class folders")
    try:
        ds = timm.data.create_dataset("", root=str(folder), search_split=False)
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise LSQError(
            f"no images in the {what} folder {folder} or its sub-folders ({e})"
        ) from None
    classes = ds.reader.class_to_idx
    if "" in classes:  # files lying in the folder itself
        loose = sum(1 for _, t in ds.reader.samples if t == classes[""])
        if len(classes) == 1:
            raise LSQError(
                f"the {what} folder {folder} has no class sub-folders: its {loose} image(s) lie "
                "directly in it. Put each class's images in a sub-folder named after the class "
                f"(the ImageNet layout: {folder}/n01440764/*.JPEG, ...)"
            )
        raise LSQError(
            f"{loose} image(s) lie directly in the {what} folder {folder}, outside its class "
            "sub-folders; move them into their class's folder or out of it"
        )
    return ds


def _transform(data_config: dict, training: bool):
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return timm.data.create_transform(
        **{k: data_config[k] for k in keys if k in data_config}, is_training=training
    )


class SeededViews(Dataset):
    """``dataset[i]`` with its random augmentation drawn from (seed, epoch, i).

    So an image gets the same crop whichever rank or worker loads it, with any number of
    processes and after a resume. The global random states are left as they were.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed = int(np.random.SeedSequence((self.seed, self.epoch, index)).generate_state(1)[0])
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(state)


class _Sampler(DistributedSampler):
    """DistributedSampler that can start part of the way into an epoch (after a resume)."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return super().__len__() - self.skip


@dataclass
class _Data:
    train: Dataset  # training transform
    train_eval: Dataset  # the same images, evaluation transform (calibration)
    val: Dataset | None
    classes: list[str]


def _datasets(cfg: FolderQATConfig) -> _Data:
    """The training and validation folders, checked; transforms come with ``_set_transforms``."""
    train = _image_dataset(Path(cfg.data), "training")
    classes = sorted(train.reader.class_to_idx, key=train.reader.class_to_idx.get)
    val = None
    if cfg.val:
        val = _image_dataset(Path(cfg.val), "validation")
        if set(val.reader.class_to_idx) != set(classes):
            only_val = sorted(set(val.reader.class_to_idx) - set(classes))
            only_train = sorted(set(classes) - set(val.reader.class_to_idx))
            parts = [f"only in validation: {_few(only_val)}"] if only_val else []
            parts += [f"only in training: {_few(only_train)}"] if only_train else []
            raise LSQError(
                f"the validation folder's classes differ from the training folder's "
                f"({len(val.reader.class_to_idx)} vs {len(classes)}; {'; '.join(parts)}); "
                "both need the same class sub-folders"
            )
    return _Data(train, copy.copy(train), val, classes)


def _set_transforms(data: _Data, data_config: dict) -> None:
    """timm's training transform on ``train``, its evaluation transform on the others."""
    data.train.transform = _transform(data_config, True)
    data.train_eval.transform = _transform(data_config, False)
    if data.val is not None:
        data.val.transform = data.train_eval.transform


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _stack(dataset: Dataset, indices: list[int]) -> tuple[Tensor, Tensor]:
    pairs = [dataset[i] for i in indices]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])


def _subset(n: int, k: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()


# --------------------------------------------------------------------------- checkpoints


def _checkpoints(run_path: Path) -> list[Path]:
    folder = run_path / "checkpoints"
    return sorted(folder.glob("step-*.pt")) if folder.is_dir() else []


def _rng_states(device: torch.device) -> dict:
    """The CPU generators' states and, when the run is on CUDA, this process's device's (not
    every visible GPU's: a resume may see fewer); a CPU run never touches CUDA. Nothing in
    training draws from CUDA's generator (the model stays in eval mode, augmentations are seeded
    per image), so it is kept only for completeness."""
    keys = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
        "python": random.getstate(),
        "numpy": [keys[0], keys[1].tolist(), *keys[2:]],
    }


def _set_rng_states(states: dict, device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"])  # this process's device
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def save_checkpoint(run_path: Path, state: dict, keep: int) -> Path:
    """Write ``state`` as ``checkpoints/step-XXXXXXXX.pt`` atomically; keep the newest ``keep``."""
    folder = run_path / "checkpoints"
    folder.mkdir(exist_ok=True)
    path = folder / f"step-{state['step']:08d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in _checkpoints(run_path)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_bytes_tensor(v: object) -> bool:
    return isinstance(v, Tensor) and v.dtype == torch.uint8 and v.dim() == 1


def _tensors(v: object) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, Tensor) for k, t in v.items()
    )


def _dicts(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(r, dict) for r in v)


def _python_rng(v: object) -> bool:
    return (
        isinstance(v, tuple | list)
        and len(v) == 3
        and _is_int(v[0])
        and isinstance(v[1], tuple | list)
        and all(_is_int(k) for k in v[1])
    )


def _numpy_rng(v: object) -> bool:
    return (
        isinstance(v, tuple | list)
        and len(v) == 5
        and isinstance(v[0], str)
        and isinstance(v[1], list)
        and len(v[1]) == 624
        and all(_is_int(k) for k in v[1])
    )


#: What each entry of a checkpoint must be: (check, what it should be).
_CHECKPOINT_ENTRIES: dict[str, tuple[Callable[[object], bool], str]] = {
    "fingerprint": (lambda v: isinstance(v, dict), "a dict of settings"),
    "step": (lambda v: _is_int(v) and v >= 1, "a step number from 1"),
    "model": (_tensors, "a dict of tensors"),
    "optimizer": (
        lambda v: (
            isinstance(v, dict)
            and isinstance(v.get("state"), dict)
            and _dicts(v.get("param_groups"))
        ),
        "an optimizer state (state, param_groups)",
    ),
    "scheduler": (
        lambda v: (
            isinstance(v, dict)
            and _is_int(v.get("last_epoch"))
            and isinstance(v.get("base_lrs"), list)
        ),
        "a scheduler state (last_epoch, base_lrs)",
    ),
    "rng": (
        lambda v: (
            isinstance(v, dict)
            and _is_bytes_tensor(v.get("torch"))
            and (v.get("cuda") is None or _is_bytes_tensor(v.get("cuda")))
            and _python_rng(v.get("python"))
            and _numpy_rng(v.get("numpy"))
        ),
        "random states (torch, cuda, python, numpy)",
    ),
    "rows": (_dicts, "a list of curve rows"),
    "trajectories": (_dicts, "a list of trajectory rows"),
    "seconds": (
        lambda v: (
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
        ),
        "a number of seconds",
    ),
    "flip_start": (_tensors, "a dict of weight codes"),
}


def _damaged(path: Path, what: str) -> LSQError:
    return LSQError(
        f"the checkpoint {path} is damaged or was not written by `lsq train` ({what}); delete "
        "it to resume from the one before, or start a new run without --resume"
    )


def load_checkpoint(path: Path) -> dict:
    """A checkpoint read back with ``weights_only=True`` (no code runs from the file), every
    entry checked, so a damaged one is refused in one line (``LSQError``), never a traceback."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise LSQError(
            f"the checkpoint {path} cannot be read ({type(e).__name__}: {first})"
        ) from None
    if not isinstance(state, dict) or not _is_int(state.get("format")):
        raise LSQError(f"{path} is not a checkpoint of `lsq train` (format {CHECKPOINT_FORMAT})")
    if state["format"] != CHECKPOINT_FORMAT:
        raise LSQError(
            f"the checkpoint {path} has format {state['format']}; this version of `lsq train` "
            f"reads format {CHECKPOINT_FORMAT}: start a new run without --resume"
        )
    for key, (ok, what) in _CHECKPOINT_ENTRIES.items():
        if key not in state:
            raise _damaged(path, f"it has no {key!r}")
        if not ok(state[key]):
            raise _damaged(path, f"{key!r} is not {what}")
    return state


def _fingerprint(
    cfg: FolderQATConfig, data: _Data, resolution: int, total: int, bf16: bool
) -> dict:
    """What must be the same for a checkpoint to continue this run (but the ``LR_KEYS``)."""
    return {
        "model": cfg.model.name,
        "model source": cfg.model.source,
        "new head": cfg.new_head,
        "training folder": str(Path(cfg.data).absolute()),
        "validation folder": str(Path(cfg.val).absolute()) if cfg.val else None,
        "classes": len(data.classes),
        "training images": len(data.train),
        "quantization": cfg.quant.to_dict(),
        "resolution": resolution,
        "global batch": cfg.batch_size,
        "steps": total,
        "seed": cfg.seed,
        "optimizer": cfg.optimizer,
        "momentum": cfg.momentum if cfg.optimizer == "sgd" else None,
        "weight decay": cfg.weight_decay,
        "distill": cfg.distill,
        "bf16 autocast": bf16,
        "calibration images": cfg.calib_images,
        "reconstruction iterations": cfg.reconstruct.iters if cfg.reconstruct else 0,
        **{key: getattr(cfg, name) for key, name in LR_KEYS.items()},
    }


def _check_fingerprint(saved: dict, here: dict, path: Path) -> None:
    """Refuse, naming every differing setting, a checkpoint of another setup; the learning
    rates may differ (``_Engine._new_rates`` applies them)."""
    differ = []
    for key, value in here.items():
        if key in LR_KEYS or saved.get(key) == value:
            continue
        theirs, ours = saved.get(key, "(not recorded)"), value
        if key == "quantization":
            theirs = QuantConfig.from_dict(theirs).label if isinstance(theirs, dict) else theirs
            ours = QuantConfig.from_dict(ours).label
            if theirs == ours:
                theirs, ours = "other settings", "these"
        differ.append(f"{key} {theirs} there, {ours} here")
    if differ:
        raise LSQError(
            f"the checkpoint {path.name} of run {path.parent.parent.name} is from another "
            f"setup: {'; '.join(differ)}. Resume with the run's own settings (only the learning "
            "rates may change on resume), or start a new run without --resume"
        )


def _lock_holder(lock: Path) -> dict | None:
    try:
        doc = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _take_lock(run_path: Path) -> Path:
    """``<run>/.lock`` created exclusively (O_CREAT|O_EXCL) with this host and pid: the proof
    that this process writes the run. A lock whose process is gone from this host is stale and
    taken over; a live one, or one from another host (its process cannot be checked from here),
    is refused in words."""
    lock = run_path / LOCK_NAME
    host = socket.gethostname()
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder and holder.get("host") == host and not pid_alive(holder.get("pid")):
                lock.unlink(missing_ok=True)  # stale: killed, or its machine restarted
                continue
            who = (
                f"pid {holder.get('pid')} on {holder.get('host')}"
                if holder
                else "an unreadable lock"
            )
            raise LSQError(
                f"run {run_path.name} is locked by {who} ({lock}): another process may be "
                "writing it, and resuming would write it twice. Wait for that run to end or stop "
                "it; if its process is gone (one on another host cannot be checked from here), "
                "delete the lock file and resume again"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"host": host, "pid": os.getpid(), "since": time.time()}, f)
        return lock
    raise LSQError(f"cannot take the lock {lock}: other processes keep taking it")


def _release_lock(lock: Path) -> None:
    """Remove ``lock`` if this process holds it."""
    holder = _lock_holder(lock)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def _refuse_live(info) -> None:
    """A run whose writer is alive on this host (the status says so) is not resumed."""
    if info.status != Status.RUNNING:
        return
    try:
        st = json.loads((info.path / "status.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        st = {}
    host = st.get("host") if isinstance(st, dict) else None
    if host in (None, socket.gethostname()):
        raise LSQError(
            f"run {info.name} is running (pid {st.get('pid')} on this host): resuming it would "
            "write the same run twice; wait for it to end or stop it, then resume"
        )
    # Another host's writer cannot be checked from here: its lock decides (_take_lock).


def _run_to_resume(resume: str | os.PathLike, cfg: FolderQATConfig, root) -> Path:
    """The folder of the run ``resume`` names (or the newest fitting one for ``LATEST``); only a
    run that nobody writes any more (incomplete, stopped or failed) is resumed."""
    if resume == LATEST:
        for info in list_runs(root):
            fits = info.meta.get("kind") == KIND and info.model == cfg.model.name
            fits = fits and info.config == cfg.quant.to_dict()
            if fits and info.status != Status.COMPLETE and _checkpoints(info.path):
                _refuse_live(info)
                return info.path
        raise LSQError(
            f"nothing to resume: no unfinished `lsq train` run of {cfg.model.name} "
            f"{cfg.quant.label} with a checkpoint in {runs_root(root)}; start without --resume, "
            "or name the run (--resume RUN)"
        )
    text = os.fspath(resume)
    run = load_run(Path(text) if ("/" in text or os.sep in text) else text, root)
    name = run.info.name
    if run.info.meta.get("kind") != KIND:
        raise LSQError(f"run {name} was not made by `lsq train`, so there is nothing to resume")
    if run.info.status == Status.COMPLETE:
        raise LSQError(f"run {name} is complete: nothing to resume")
    _refuse_live(run.info)
    if not _checkpoints(run.info.path):
        raise LSQError(
            f"run {name} has no checkpoint to resume from yet (one is written every "
            "--ckpt-every steps); start it again without --resume"
        )
    return run.info.path


def _pick(resume, cfg: FolderQATConfig, root, held: list[Path]) -> tuple[str, str]:
    """Rank 0: the run to resume, locked for this process, and its newest checkpoint."""
    path = _run_to_resume(resume, cfg, root)
    held.append(_take_lock(path))
    return str(path), str(_checkpoints(path)[-1])


class _FlipSampler(WeightFlips):
    """``lsq.train.WeightFlips`` at the trajectory's sampled steps only: ``mark()`` just before
    step s takes the weight codes, ``update()`` after it gives that one step's flips and the
    net codes moved since the run's start, the per-step rows `lsq health` reads, at no cost in
    the steps between."""

    def restore_start(self, saved: dict[str, Tensor]) -> None:
        """The codes the run started from, from a checkpoint (where the layers still match)."""
        for name, codes in saved.items():
            if name in self.start and codes.shape == self.start[name].shape:
                self.start[name] = codes.to(self.start[name].device, torch.int16)


# --------------------------------------------------------------------------- evaluation


def state_digest(module: nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names and bytes): equal on ranks in step."""
    h = hashlib.sha256()
    for key, t in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def _top1(model: nn.Module, dataset: Dataset, group: _Group, batch: int, workers: int, bf16: bool):
    """Top-1 accuracy on ``dataset``, each rank counting its share (every image once)."""
    shard = Subset(dataset, range(group.rank, len(dataset), group.world))
    loader = DataLoader(shard, batch_size=batch, num_workers=workers)
    counts = torch.zeros(2, dtype=torch.float64, device=group.device)
    model.eval()
    for x, y in loader:
        with torch.autocast(group.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(x.to(group.device, non_blocking=True))
        counts[0] += (out.argmax(-1) == y.to(group.device)).sum()
        counts[1] += len(y)
    counts = group.sum(counts)
    return float(counts[0] / counts[1])


# --------------------------------------------------------------------------- the run


def train_folder(
    cfg: FolderQATConfig,
    root: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> FolderQATResult:
    """QAT of ``cfg.model`` on ``cfg.data``, on this process's share; every rank calls it.

    ``resume`` names a run of this setup (``LATEST``: the newest unfinished one) to continue
    from its last checkpoint. ``report`` gets progress lines (rank 0 only). Bad input raises
    ``LSQError`` on every rank before any work.
    """
    data = _datasets(cfg)
    group = _start_group(cfg.device)
    held: list[Path] = []  # the run's lock, on rank 0
    try:
        picked = None
        if resume is not None:
            picked = _on_rank0(group, lambda: _pick(resume, cfg, root, held))
        engine, ckpt = _agree(group, lambda: _setup(cfg, group, data, picked, held))
        run_path = Path(picked[0]) if picked is not None else None
        return engine.train(root, run_path, ckpt, report)
    finally:
        for lock in held:
            _release_lock(lock)
        if group.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _setup(cfg: FolderQATConfig, group: _Group, data: _Data, picked, held: list[Path]):
    """Every rank: the checkpoint (if resuming) checked, the model loaded, the run's length
    worked out; the engine and the checkpoint."""
    ckpt = None
    if picked is not None:
        ckpt_path = Path(picked[1])
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["fingerprint"].get("model") != cfg.model.name:  # before loading any weights
            _check_fingerprint(ckpt["fingerprint"], {"model": cfg.model.name}, ckpt_path)
    torch.manual_seed(cfg.seed)  # random weights and a new head: the same on every rank
    loaded = load_model(cfg.model.name, cfg.model.source, path=cfg.model.path)
    data_config = dict(loaded.data_config)
    resolution = cfg.resolution or int(data_config["input_size"][-1])
    data_config["input_size"] = (3, resolution, resolution)
    _set_transforms(data, data_config)
    if cfg.new_head:
        loaded.model.reset_classifier(len(data.classes))
    if loaded.num_classes != len(data.classes):
        raise LSQError(
            f"the training folder has {len(data.classes)} classes but {cfg.model.name} has "
            f"{loaded.num_classes} outputs; use a folder with one sub-folder per model class "
            f"(ImageNet: 1000, sorted like train/n01440764 ...), or --new-head to train a "
            f"new {len(data.classes)}-class classifier"
        )
    per_rank = cfg.batch_size // group.world
    if per_rank * group.world != cfg.batch_size:
        raise LSQError(
            f"the global batch {cfg.batch_size} does not split evenly over {group.world} "
            f"processes; use a multiple of {group.world}"
        )
    per_epoch = (len(data.train) // group.world) // per_rank
    if per_epoch == 0:
        raise LSQError(
            f"the training folder has {len(data.train)} images, fewer than one batch of "
            f"{cfg.batch_size}; lower --batch"
        )
    total = cfg.steps or (cfg.epochs or 1) * per_epoch
    bf16 = cfg.bf16 and group.device.type == "cuda"
    fingerprint = _fingerprint(cfg, data, resolution, total, bf16)
    if ckpt is not None:
        _check_fingerprint(ckpt["fingerprint"], fingerprint, ckpt_path)
        if ckpt["step"] >= total:
            raise _damaged(ckpt_path, f"step {ckpt['step']} is not before the run's end, {total}")
    engine = _Engine(cfg, group, loaded, data, resolution, total, per_epoch, fingerprint, held)
    return engine, ckpt


class _Engine:
    """One run's state on one rank; ``train`` is the whole of it."""

    def __init__(
        self, cfg, group, loaded, data, resolution, total, per_epoch, fingerprint, held
    ) -> None:
        self.cfg, self.group, self.data = cfg, group, data
        self.resolution, self.total, self.per_epoch = resolution, total, per_epoch
        self.fingerprint = fingerprint
        self.held = held
        self.per_rank = cfg.batch_size // group.world
        self.device = group.device
        self.bf16 = cfg.bf16 and self.device.type == "cuda"
        self.spec = asdict(cfg.model)
        self.stats = None
        self.metric_views: tuple[Tensor, Tensor] | None = None
        self.teacher = loaded.model.to(self.device).eval().requires_grad_(False)
        self.student = copy.deepcopy(self.teacher).requires_grad_(True)

        quantize_model(self.student, cfg.quant)
        self.kernels = set_kernels(self.student, "compiled" if cfg.compile else "eager")
        self.rows: list[dict] = []  # one per step (and step 0): loss, val_top1, lr, seconds
        self.traj: list[dict] = []
        self.seconds_before = 0.0
        self.saved: Run | None = None
        #: Rank 0: whether this process has the run marked running (it must then end it).
        self.live = False
        self.flips: _FlipSampler | None = None
        self.flip_start: dict[str, Tensor] | None = None
        self.step = 0  # the last step taken
        self.speed: float | None = None  # images per second over the last log interval
        #: Rank 0: the first error of its own work this step, reported at ``_sync_main``.
        self.failed: BaseException | None = None

    # ---- work on rank 0 alone ------------------------------------------------------------
    def _main(self, work: Callable[..., None], *args) -> None:
        """``work(*args)`` on rank 0. With other ranks, its error is held (and the rest of rank 0's
        work skipped) until ``_sync_main`` tells every rank."""
        if not self.group.main:
            return
        if self.group.world == 1:
            work(*args)
            return
        if self.failed is None:
            try:
                work(*args)
            except Exception as e:
                self.failed = e

    def _sync_main(self) -> None:
        """Every rank learns whether rank 0's work since the last call failed; all raise if so,
        so no rank waits in a collective for a rank 0 that has stopped."""
        if self.group.world == 1:
            return
        error = None if self.failed is None else _error_of(self.failed)
        error = self.group.broadcast_object(error, wait=True)
        if error is not None:
            if self.failed is not None:
                raise self.failed
            _raise_remote(error, 0)

    def _fail(self, status: str, message: str) -> None:
        """Rank 0: end a run this process has marked running, with what it has."""
        if self.group.main and self.live and self.saved is not None:
            self.live = False
            if self.rows:
                self._write_tables()
            self.saved.finish(status, message)

    # ---- data on rank 0 ------------------------------------------------------------------
    def _calib_views(self) -> Tensor:
        n = min(self.cfg.calib_images, len(self.data.train_eval))
        return _stack(self.data.train_eval, _subset(len(self.data.train_eval), n, self.cfg.seed))[0]

    def _metric_views(self) -> tuple[Tensor, Tensor]:
        if self.metric_views is None:
            source = self.data.val if self.data.val is not None else self.data.train_eval
            n = min(METRIC_VIEWS, len(source))
            self.metric_views = _stack(source, _subset(len(source), n, self.cfg.seed + 1))
        return self.metric_views

    def _stats(self, calib: Tensor):
        """Input statistics of every layer of the float model (as ``pipeline.ensure_stats``)."""
        probe = copy.deepcopy(self.teacher)
        quantize_model(probe, QuantConfig())
        return collect_stats(probe, calib.split(CALIB_BATCH), seed=self.cfg.seed)

    def _metrics(self) -> dict[str, float]:
        """Agreement, KL and logit SQNR against the float model, top-1, on the metric views;
        with a new head only top-1 (the float model's head is as untrained as the start's, so
        agreement and KL with it mean nothing)."""
        views, labels = self._metric_views()
        if self.cfg.new_head:
            out = logits(self.student, views).cpu()
            top1 = float((out.argmax(-1) == labels).float().mean())
            return {"top1": top1, "views": float(len(views))}
        return model_metrics(self.student, views, logits(self.teacher, views), labels)

    def _evaluate(self, row: dict) -> None:
        """Top-1 on the validation folder (all ranks) and agreement and KL with the float model
        (rank 0, on ``METRIC_VIEWS`` views: the Runs page's curves; not with a new head) into
        ``row``."""
        if self.data.val is not None:
            row["val_top1"] = _top1(
                self.student, self.data.val, self.group, self.per_rank, self.cfg.workers, self.bf16
            )
        if not self.cfg.new_head:

            def teacher_metrics() -> None:
                metrics = self._metrics()
                row.update(agreement=metrics["agreement"], kl=metrics["kl"])

            self._main(teacher_metrics)

    # ---- start ---------------------------------------------------------------------------
    def _initialise(self, root, report) -> str:
        """Rank 0: calibrate, initialise, maybe reconstruct; create the run. Its path."""
        cfg = self.cfg
        note = fallback_note("compiled" if cfg.compile else "eager", self.kernels, self.device)
        if note:
            report(note)
        report(f"calibrating on {min(cfg.calib_images, len(self.data.train))} training images")
        calib = self._calib_views()
        self.stats = self._stats(calib)
        init = init_from_stats(self.student, self.stats, cfg.quant)
        metrics_init = self._metrics()
        units = None
        if cfg.reconstruct is not None:
            report(f"block-wise reconstruction, {cfg.reconstruct.iters} iterations per unit")
            events = list(reconstruct(self.student, self.teacher, calib, cfg.reconstruct))
            if events[-1].kind != "done":
                raise LSQError(f"reconstruction ended early: {events[-1].message}")
            units = unit_frame(events)
        if cfg.new_head:
            report(
                "a new head: no agreement or KL with the float model, whose classifier is as "
                "untrained as this one's; top-1 on the folder's labels only"
            )
        meta = {
            "kind": KIND,
            "model": self.spec,
            "data": {
                "source": "folder",
                "folder": str(Path(cfg.data).absolute()),
                "val": str(Path(cfg.val).absolute()) if cfg.val else None,
                "resolution": self.resolution,
                "classes": len(self.data.classes),
                "train_images": len(self.data.train),
                "val_images": len(self.data.val) if self.data.val is not None else 0,
                "calib_views": min(cfg.calib_images, len(self.data.train)),
                "batch_size": cfg.batch_size,
                "seed": cfg.seed,
            },
            "train": {**cfg.to_dict(), "model": None, "quant": None, "total_steps": self.total},
            "distributed": {
                "world_size": self.group.world,
                "backend": "nccl" if self.device.type == "cuda" else "gloo",
                "device": self.device.type,
                "kernels": self.kernels,
            },
            "reconstruct": cfg.reconstruct.to_dict() if cfg.reconstruct is not None else None,
            "metrics_init": metrics_init,
            "teacher_metrics": not cfg.new_head,
        }
        self.saved = Run.create(cfg.model.name, cfg.quant, meta=meta, root=root)
        self.live = True
        try:
            self.held.append(_take_lock(self.saved.path))
            self.saved.write_table("init", pd.DataFrame([asdict(r) for r in init]))
            if units is not None:
                self.saved.write_table("units", units)
        except BaseException as e:
            self._fail(Status.FAILED, f"{type(e).__name__}: {e}")
            raise
        return str(self.saved.path)

    def _restore(self, ckpt: dict, opt, sched) -> int:
        refs = [g.get("refs") for g in opt.param_groups]
        try:
            self.student.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            first = (lines[1] if len(lines) > 1 else lines[0] if lines else repr(e))[:300]
            raise LSQError(
                f"the checkpoint does not fit {self.cfg.model.name} quantized as "
                f"{self.cfg.quant.label}: {first}"
            ) from None
        for g, r in zip(opt.param_groups, refs, strict=True):
            if r is not None:
                g["refs"] = r  # live quantizer scales, not the saved copies
        try:
            sched.load_state_dict(ckpt["scheduler"])
            _set_rng_states(ckpt["rng"], self.device)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise LSQError(
                f"the checkpoint's scheduler or random states cannot be restored ({e}); delete "
                "it to resume from the one before, or start a new run without --resume"
            ) from None
        self.rows = list(ckpt["rows"])
        self.traj = list(ckpt["trajectories"])
        self.seconds_before = float(ckpt["seconds"])
        self.flip_start = ckpt["flip_start"]
        return int(ckpt["step"])

    def _new_rates(self, opt, sched) -> dict[str, list[float]]:
        """After a restore: the learning rates given now where they differ from the run's, set
        as the schedule's new base rates from the step reached (cosine, as if the run had had
        them all along). Setting -> [old, new] for each one changed."""
        changed: dict[str, list[float]] = {}
        for i, g in enumerate(opt.param_groups):
            name = GROUP_LR.get(g.get("name"))
            new = getattr(self.cfg, name) if name else None
            old = g.get("initial_lr", sched.base_lrs[i])
            if new is None or new == old:
                continue
            changed[name] = [old, new]
            g["initial_lr"] = sched.base_lrs[i] = new
            g["lr"] = new * (1 + math.cos(math.pi * sched.last_epoch / sched.T_max)) / 2
            sched._last_lr[i] = g["lr"]
        return changed

    def _mark_resumed(self, path: Path, step: int, changed: dict, report) -> None:
        """Rank 0: the run marked running again, the resume (and any new rates) in its meta."""
        info = load_run(path).info
        self.saved = Run(path, info.started)
        note = ""
        if changed:
            rates = ", ".join(f"{name} {old:g} -> {new:g}" for name, (old, new) in changed.items())
            note = f"; learning rates changed: {rates}"
            report(
                f"learning rates changed on resume at step {step}: {rates} (the cosine schedule "
                "goes on from this step with the new base rates)"
            )
        self.saved.set_status(Status.RUNNING, f"resumed at step {step}{note}")
        self.live = True
        resumes = info.meta.get("resumes") or []
        resumes = [*resumes, {"step": step, "world_size": self.group.world, "lr": changed}]
        self.saved.update_meta(resumes=resumes)

    def _checkpoint(self, step: int, opt, sched, seconds: float, report) -> None:
        """The tables, then a checkpoint of everything the run needs to go on from ``step``."""
        self._write_tables()
        optimizer = opt.state_dict()
        for g in optimizer["param_groups"]:
            g.pop("refs", None)  # references to live parameters, rebuilt on resume
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "step": step,
            "model": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "optimizer": optimizer,
            "scheduler": sched.state_dict(),
            "rng": _rng_states(self.device),
            "rows": self.rows,
            "trajectories": self.traj,
            "seconds": seconds,
            "flip_start": {k: v.cpu() for k, v in self.flips.start.items()},
        }
        save_checkpoint(self.saved.path, state, self.cfg.keep)
        report(f"checkpoint at step {step}")

    def _write_tables(self) -> None:
        self.saved.write_table("metrics", pd.DataFrame(self.rows))
        if self.traj:
            self.saved.write_table("trajectories", pd.DataFrame(self.traj))

    def _snapshot(self, step: int) -> None:
        """Each layer's quantizer state and, after a step, that step's weight flips."""
        flips = self.flips.update() if step > 0 else {}
        for layer, (s, b, ws) in quantizer_snapshot(self.student).items():
            row = {"step": step, "layer": layer, "scale": s, "offset": b, "weight_scale": ws}
            if layer in flips:
                n_flips, net, n = flips[layer]
                row.update(weight_flips=n_flips, weight_net=net, weights=n)
            self.traj.append(row)

    def _log(self, pending: list[Tensor], step: int, lr_of: dict, seconds: float) -> float:
        """The losses of the steps up to ``step``, averaged over the ranks (the global batch's
        mean loss), into ``rows``; the last one. A non-finite loss ends the run."""
        losses = self.group.mean(torch.stack(pending).float()).tolist()
        first = step - len(losses) + 1
        weights, quant = lr_of.get("weights", lr_of.get("other")), lr_of.get("act_quant")
        for i, value in enumerate(losses):
            self.rows.append(
                {
                    "step": first + i,
                    "epoch": (first + i - 1) // self.per_epoch,
                    "loss": value,
                    "lr_weights": weights["lr"] if weights else None,
                    "lr_quant": quant["lr"] if quant else None,
                    "seconds": seconds,
                }
            )
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise _Diverged(first + bad[0], losses[bad[0]])
        return losses[-1]

    # ---- the loop ------------------------------------------------------------------------
    def _start(self, ckpt, path: Path, report):
        """Every rank: the optimizer and schedule, restored (with any new rates) when resuming;
        rank 0 marks a resumed run running. (optimizer, scheduler, step)."""
        cfg = self.cfg
        groups = param_groups([self.student], cfg.lr_weights, cfg.lr_weight_quant, cfg.lr_act_quant)
        opt = make_optimizer(groups, cfg.optimizer, cfg.momentum, cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total)
        if ckpt is None:
            return opt, sched, 0
        step = self._restore(ckpt, opt, sched)
        changed = self._new_rates(opt, sched)
        if self.group.main:
            self._mark_resumed(path, step, changed, report)
        return opt, sched, step

    def _start_flips(self) -> None:
        """Rank 0: the flip counter, from the run's starting codes (after a resume, the saved
        ones)."""
        self.flips = _FlipSampler(self.student)
        if self.flip_start is not None:
            self.flips.restore_start(self.flip_start)

    def train(self, root, run_path, ckpt, report) -> FolderQATResult:
        group = self.group
        say = report if group.main else (lambda line: None)
        if ckpt is None:  # a failure after the run exists ends it as failed (_initialise)
            path = Path(_on_rank0(group, lambda: self._initialise(root, say)))
        else:
            path = Path(run_path)

        status, message = Status.COMPLETE, "finished"
        try:
            try:
                self._loop(ckpt, path, say)
            except _Diverged as e:
                status, message = Status.FAILED, str(e)
            digests = group.gather_objects(state_digest(self.student))
            if len(set(digests)) > 1:
                status = Status.FAILED
                message = "the ranks ended with different parameters (see rank_digests)"
            evals = [r["val_top1"] for r in self.rows if r.get("val_top1") is not None]
            top1 = evals[-1] if evals else None
            if group.main:
                self._finish(status, message, digests, self.speed, top1, report)
        except KeyboardInterrupt:
            self._fail(Status.STOPPED, f"interrupted at step {self.step}")
            raise
        except BaseException as e:
            self._fail(Status.FAILED, f"{type(e).__name__}: {e}")
            raise
        say(f"{status}: {message}; run {path}")
        return FolderQATResult(
            status, message, path, self.step, group.rank, group.world, top1, self.speed, self.rows
        )

    def _loop(self, ckpt, path: Path, say) -> None:
        """Every rank: the start (the optimizer, restored when resuming) and the steps."""
        cfg, group = self.cfg, self.group
        if ckpt is None:
            group.broadcast_module(self.student)
        opt, sched, step = _agree(group, lambda: self._start(ckpt, path, say))
        self.step = step
        self._main(self._start_flips)
        self._sync_main()
        if ckpt is not None:
            say(f"resuming {path.name} at step {step} of {self.total}")
        net: nn.Module = self.student
        if group.world > 1:
            net = nn.parallel.DistributedDataParallel(
                self.student,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # Buffers are synced once at the start; eval-mode BatchNorm and the
                # quantizers' flags never change them, so no sync before every forward.
                forward_sync_buffers=False,
            )
        lr_of = {g["name"]: g for g in opt.param_groups}
        traj_every = max(1, math.ceil(self.total / TRAJECTORY_POINTS))

        if ckpt is None:
            if self.data.val is not None and not cfg.new_head:
                float_top1 = _top1(
                    self.teacher, self.data.val, group, self.per_rank, cfg.workers, self.bf16
                )
                self._main(lambda: self.saved.update_meta(val_top1_float=float_top1))
                say(f"float model: top-1 {float_top1:.4f} on the validation folder")
            self.rows.append({"step": 0, "epoch": 0})
            self._evaluate(self.rows[-1])
            if self.data.val is not None:
                say(f"after init: top-1 {self.rows[-1]['val_top1']:.4f}")
            self._main(self._snapshot, 0)
            self._main(self._write_tables)
            self._sync_main()

        train = SeededViews(self.data.train, cfg.seed)
        sampler = _Sampler(
            train, num_replicas=group.world, rank=group.rank, shuffle=True, seed=cfg.seed,
            drop_last=True,
        )  # fmt: skip
        t_start, pending, last_log = time.perf_counter(), [], (step, time.perf_counter())
        while step < self.total:
            epoch, done_in_epoch = divmod(step, self.per_epoch)
            train.epoch = epoch
            sampler.set_epoch(epoch)
            sampler.skip = done_in_epoch * self.per_rank
            loader = DataLoader(
                train, batch_size=self.per_rank, sampler=sampler, num_workers=cfg.workers,
                pin_memory=self.device.type == "cuda", drop_last=True,
            )  # fmt: skip
            for x, y in loader:
                step = self.step = step + 1
                snap = step % traj_every == 0 or step == self.total
                if snap:
                    self._main(lambda: self.flips.mark())  # the codes before this step
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                    out = net(x)
                    if cfg.distill:
                        with torch.no_grad():
                            target = self.teacher(x)
                loss = F.cross_entropy(out.float(), y)
                if cfg.distill:
                    loss = loss + cfg.distill * distillation_loss(out, target)
                update(opt, loss, self.student, sched)
                pending.append(loss.detach())
                epoch_end = step % self.per_epoch == 0
                save = step % cfg.ckpt_every == 0 and step < self.total
                if step % cfg.log_every == 0 or step == self.total or epoch_end or save:
                    seconds = self.seconds_before + time.perf_counter() - t_start
                    last = self._log(pending, step, lr_of, seconds)
                    pending = []
                    n, t = step - last_log[0], time.perf_counter() - last_log[1]
                    self.speed = cfg.batch_size * n / t if t > 0 else None
                    last_log = (step, time.perf_counter())
                    say(
                        f"step {step}/{self.total}  epoch {epoch}  loss {last:.4f}  "
                        + (f"{self.speed:.1f} images/s" if self.speed else "")
                    )
                if snap:
                    self._main(self._snapshot, step)
                if epoch_end or step == self.total:
                    self._evaluate(self.rows[-1])
                    if self.data.val is not None:
                        top1 = self.rows[-1]["val_top1"]
                        say(f"step {step}: top-1 {top1:.4f} on the validation folder")
                if save:  # the tables with each checkpoint, not every few steps
                    self._main(self._checkpoint, step, opt, sched, seconds, say)
                if snap or save or epoch_end or step == self.total:
                    self._sync_main()
                if step == self.total:
                    break

    def _finish(self, status, message, digests, speed, top1, report) -> None:
        self._write_tables()
        if status == Status.COMPLETE:  # a diverged model is not saved: its checkpoints are
            report("per-layer table")
            views = self._metric_views()[0][:8]
            stats = self.stats or self._stats(self._calib_views())  # after a resume: again
            table = layer_table(copy.deepcopy(self.student), stats, views)
            self.saved.write_table("layers", table)
            state = {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
            self.saved.write_state(state)
        last = self.rows[-1] if self.rows else {}
        self.saved.update_meta(
            metrics_final=self._metrics() if status == Status.COMPLETE else None,
            val_top1=top1,
            images_per_second=speed,
            seconds={"train": last.get("seconds")},
            stage="trained",
            rank_digests=digests,
            world_size_last=self.group.world,
        )
        self.saved.finish(status, message)
        self.live = False


class _Diverged(Exception):
    def __init__(self, step: int, value: float) -> None:
        super().__init__(
            f"the loss became {value} at step {step}; training stopped. The last checkpoint is "
            "intact: lower the learning rates and start again"
        )


__all__ = [
    "KIND",
    "LATEST",
    "FolderQATConfig",
    "FolderQATResult",
    "SeededViews",
    "load_checkpoint",
    "save_checkpoint",
    "state_digest",
    "train_folder",
]
