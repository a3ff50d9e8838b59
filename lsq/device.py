"""Where the work runs: the device, its random generator, host-sync discipline, and release.

Every path of the project runs on the CPU or on one CUDA GPU with the same code. What that takes:
tensors made on the device of the data they meet (never a CPU grid times a CUDA weight), random
numbers drawn on that device (not on the CPU and copied), and a training step that never waits on
the host (no ``.item()``, ``float(t)`` or ``bool(t)`` inside it): numbers are read between steps,
every ``record_every`` steps. ``no_host_sync`` makes a host sync inside a step an error on CUDA
(``torch.cuda.set_sync_debug_mode``); on the CPU there is nothing to wait for.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from lsq.errors import LSQError

#: The one default for bf16 autocast, on CUDA only (QAT, reconstruction, torchrun training): the
#: quantizers compute in float32 whatever the input's dtype, so bf16 changes speed, not the grid.
BF16 = True


def resolve_device(device: str | torch.device) -> torch.device:
    """auto: CUDA when present, else CPU. Asking for CUDA without one is an error in words."""
    if isinstance(device, torch.device):
        device = device.type
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise LSQError("device 'cuda' was asked for, but no CUDA GPU is available; use cpu")
        return torch.device("cuda")
    raise LSQError(f"device must be auto, cpu or cuda, got {device!r}")


def generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: random numbers are drawn where they are
    used. (A CUDA generator draws another sequence than the CPU's for the same seed.)"""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


@contextmanager
def no_host_sync(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Inside: on CUDA, an operation that waits on the GPU (``.item()``, ``bool(t)``, a copy to
    the CPU) raises instead of waiting. A no-op on the CPU or when not ``enabled``."""
    if not enabled or torch.device(device).type != "cuda":
        yield
        return
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def free_cached() -> None:
    """Give the GPU memory of models nobody holds any more back to the driver (after a job):
    PyTorch's caching allocator keeps it otherwise, and the app's next job, or another process,
    cannot have it."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
