"""Runs on disk: one folder per experiment, written so that a crash never corrupts it.

A run is ``<root>/<YYYYmmdd-HHMMSS>-<model>-<method>-W<w>A<a>/`` holding ``config.json`` (the
quantization config, model and free-form ``meta``), ``status.json`` (running / complete / failed /
stopped, with the writer's pid), tables as CSV (``layers.csv``, ``metrics.csv``,
``trajectories.csv``, ...), other JSON documents and tensors as ``state.safetensors``.

Every file is written to a hidden temp file in the same folder, fsynced, then renamed over the
final name, so readers see either the old or the new version, never half of one. A run left
"running" by a process that no longer exists (killed, crashed machine) is reported as
"incomplete": interrupted, but everything in it is readable.

The root is ``runs/`` under the current directory, or ``$LSQ_RUNS_DIR``, or the ``root`` argument.
Run names given as ``str`` must be plain folder names inside the root; pass a ``pathlib.Path`` to
open a run folder by path.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lsq.config import QuantConfig
from lsq.errors import LSQError
from lsq.status import RUN_STATUSES, Status

#: Environment variable that moves the default runs folder.
RUNS_DIR_ENV = "LSQ_RUNS_DIR"
#: Statuses a run can be given; "incomplete" is only ever reported, never written.
STATUSES = RUN_STATUSES
#: Version of the config.json layout, for readers of old runs.
FORMAT_VERSION = 1

_RESERVED = {"config", "status"}
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass
class RunInfo:
    """What ``list_runs`` knows about a run without loading its tables or tensors."""

    path: Path
    name: str
    status: str
    config: dict
    meta: dict
    started: str
    finished: str | None
    message: str
    model: str = ""


def run_stage(info: RunInfo) -> str:
    """How far a saved run came, in words, from what its meta records: "initialised",
    "reconstructed", "trained" or "reconstructed, then trained". A run whose reconstruction
    stopped before its QAT started is "reconstructed", whatever training it was set up for."""
    meta = info.meta
    stage = meta.get("stage")
    if stage is None:  # written before the stage was recorded: training settings say it
        stage = "trained" if meta.get("train") else "initialised"
    reconstructed = meta.get("reconstruct") is not None
    if stage == "trained":
        return "reconstructed, then trained" if reconstructed else "trained"
    return "reconstructed" if stage == "reconstructed" or reconstructed else "initialised"


class SavedState(Mapping[str, torch.Tensor]):
    """The tensors of a ``.safetensors`` file, each read from disk only when asked for.

    Opening a run does not read its checkpoint: ``safe_open`` reads the header for the names,
    and a tensor's bytes when it is looked up.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with safe_open(str(path), framework="pt") as f:
            self._keys = list(f.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _saved_state(path: Path) -> SavedState | None:
    return SavedState(path) if path.is_file() else None


@dataclass
class LoadedRun:
    """A run read back from disk: its info, config, tables and (optional) tensors."""

    info: RunInfo
    config: QuantConfig
    tables: dict[str, pd.DataFrame]
    #: The ``state`` tensors, read lazily; None when the run saved none.
    state: SavedState | None
    #: Other JSON documents written with ``Run.write_json``, by name.
    extras: dict[str, Any] = field(default_factory=dict)

    def read_state(self, name: str = "state") -> SavedState | None:
        """Tensors saved with ``Run.write_state(..., name=name)`` (read lazily); None if none."""
        return _saved_state(
            self.info.path / f"{_check_file_name(name, 'state', '.safetensors')}.safetensors"
        )


# --------------------------------------------------------------------------- atomic files


def atomic_write(path: Path, produce: Callable[[Path], None]) -> None:
    """Have ``produce`` write a temp file next to ``path``, fsync it, then rename it over ``path``.

    On any error the temp file is removed and ``path`` keeps its previous content.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        produce(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    """Let paths, numpy/torch scalars and sets into JSON; refuse anything else in words."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if callable(getattr(obj, "tolist", None)):  # numpy and torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, indent=2, default=_json_default) + "\n"
    except (TypeError, ValueError) as exc:
        raise LSQError(
            f"{what} cannot be saved as JSON ({exc}); use numbers, strings, lists and dicts"
        ) from exc


def _write_json_file(path: Path, obj: Any, what: str) -> None:
    text = _dumps(obj, what)

    def produce(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, produce)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------------------- names and paths


def runs_root(root: str | Path | None = None) -> Path:
    """The runs folder (absolute): ``root`` if given, else ``$LSQ_RUNS_DIR``, else ``./runs``."""
    if root is None:
        root = os.environ.get(RUNS_DIR_ENV) or "runs"
    return Path(root).expanduser().absolute()


def _safe(text: str) -> str:
    """``text`` in file-name-safe characters: ``+`` becomes ``plus``, the rest of odd runs ``-``."""
    text = _SAFE_CHARS.sub("-", str(text).replace("+", "plus")).strip("-.")
    return text[:60].rstrip("-.") or "x"


def _check_file_name(name: str, kind: str, suffix: str = "") -> str:
    """A table/JSON/state name without ``suffix``, safe as a file name inside the run."""
    if isinstance(name, str) and suffix:
        name = name.removesuffix(suffix)
    if not isinstance(name, str) or not _TABLE_NAME.match(name):
        raise LSQError(
            f"{kind} name {name!r} is not usable as a file name; "
            "use letters, digits, '_', '-' and '.', not starting with '.' or '-'"
        )
    return name


def _check_run_name(name: str) -> str:
    """Refuse run names that could leave the runs folder or name a hidden/temp folder."""
    bad = (
        not name
        or name in {".", ".."}
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
        or name.startswith(".")
    )
    if bad:
        raise LSQError(
            f"{name!r} is not a run name: a name is a single folder name inside the runs folder "
            "(no '/', '\\' or '..', not absolute); pass a pathlib.Path to open a folder by path"
        )
    return name


def _run_path(path_or_name: str | Path, root: str | Path | None) -> Path:
    """The folder of a run given by name (inside the root) or by ``Path``."""
    if isinstance(path_or_name, os.PathLike):
        return Path(path_or_name).expanduser().absolute()
    if not isinstance(path_or_name, str):
        raise LSQError(f"a run is given by name (str) or path, not {type(path_or_name).__name__}")
    return runs_root(root) / _check_run_name(path_or_name)


def _missing(path_or_name: str | Path, path: Path, root: str | Path | None) -> LSQError:
    where = runs_root(root)
    return LSQError(
        f"no run {str(path_or_name)!r} (looked for {path}); list_runs() shows the runs in "
        f"{where} — pass root= or set {RUNS_DIR_ENV} to look in another runs folder"
    )


# --------------------------------------------------------------------------- status


def _now() -> datetime:
    """Local time with its offset (a function so tests can pin it)."""
    return datetime.now().astimezone()


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists (the current one always does)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid() or os.name == "nt":  # os.kill(pid, 0) would signal on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _check_status(status: str) -> Status:
    if status not in STATUSES:
        raise LSQError(f"run status must be one of {', '.join(STATUSES)}; got {status!r}")
    return Status(status)


# --------------------------------------------------------------------------- writing


class Run:
    """A run being written. Create with ``Run.create``; usable as a context manager.

    As a context manager the run is finished "complete" on normal exit, "stopped" on Ctrl-C and
    "failed" (with the error as message) on an exception, unless already finished.
    """

    def __init__(self, path: Path, started: str) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.started = started
        self.status = Status.RUNNING

    @classmethod
    def create(
        cls,
        model: str,
        config: QuantConfig,
        meta: dict | None = None,
        root: str | Path | None = None,
    ) -> Run:
        """Make a new run folder under the root with status "running" and its config saved."""
        if not isinstance(config, QuantConfig):
            raise LSQError(f"config must be a QuantConfig, got {type(config).__name__}")
        if not isinstance(model, str) or not model.strip():
            raise LSQError("model must be a non-empty model name, e.g. 'resnet18'")
        if meta is not None and not isinstance(meta, Mapping):
            raise LSQError(f"meta must be a dict of extra run details, got {type(meta).__name__}")
        meta = dict(meta or {})
        now = _now()
        started = now.isoformat(timespec="microseconds")
        doc = {
            "format": FORMAT_VERSION,
            "model": model,
            "config": config.to_dict(),
            "label": config.label,
            "created": started,
            "meta": meta,
        }
        _dumps(doc, "the run's meta")  # refuse unsaveable meta before making a folder

        base = runs_root(root)
        if base.exists() and not base.is_dir():
            raise LSQError(f"the runs folder {base} is a file; pass root= or set {RUNS_DIR_ENV}")
        base.mkdir(parents=True, exist_ok=True)
        w = f"W{config.w_bits}" if config.quantize_weights else "Wfp"
        a = f"A{config.a_bits}" if config.quantize_acts else "Afp"
        stem = f"{now:%Y%m%d-%H%M%S}-{_safe(model)}-{_safe(config.method)}-{w}{a}"
        path = _make_unique_dir(base, stem)
        run = cls(path, started)
        _write_json_file(path / "config.json", doc, "the run's config")
        run.set_status(Status.RUNNING)
        return run

    def update_meta(self, **changes: object) -> None:
        """Merge ``changes`` into the meta of config.json (rewritten atomically)."""
        doc = json.loads((self.path / "config.json").read_text())
        doc["meta"] = {**doc.get("meta", {}), **changes}
        _dumps(doc, "the run's meta")
        _write_json_file(self.path / "config.json", doc, "the run's config")

    def set_status(self, status: str, message: str = "") -> None:
        """Rewrite status.json; any status but "running" also stamps the finish time."""
        self.status = _check_status(status)
        finished = None if status == Status.RUNNING else _now().isoformat(timespec="microseconds")
        doc = {
            "status": status,
            "message": str(message),
            "started": self.started,
            "finished": finished,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        _write_json_file(self.path / "status.json", doc, "the run's status")

    def finish(self, status: str = Status.COMPLETE, message: str = "") -> None:
        """Mark the run done: "complete", "failed" or "stopped"."""
        if status == Status.RUNNING:
            raise LSQError("finish() needs a final status: complete, failed or stopped")
        self.set_status(status, message)

    def write_table(self, name: str, df: pd.DataFrame) -> Path:
        """Save ``df`` as ``<name>.csv`` (atomically). A non-default index is kept as columns."""
        if not isinstance(df, pd.DataFrame):
            raise LSQError(f"table {name!r} must be a pandas DataFrame, got {type(df).__name__}")
        name = _check_file_name(name, "table", ".csv")
        if not _is_default_index(df.index):
            df = df.reset_index()

        def produce(tmp: Path) -> None:
            df.to_csv(tmp, index=False)

        path = self.path / f"{name}.csv"
        atomic_write(path, produce)
        return path

    def write_json(self, name: str, obj: Any) -> Path:
        """Save ``obj`` as ``<name>.json`` (atomically); config and status are reserved."""
        name = _check_file_name(name, "JSON", ".json")
        if name in _RESERVED:
            raise LSQError(
                f"{name}.json is written by the run itself; pick another name for your document"
            )
        path = self.path / f"{name}.json"
        _write_json_file(path, obj, f"{name}.json")
        return path

    def write_state(self, state_dict: Mapping[str, torch.Tensor], name: str = "state") -> Path:
        """Save tensors as ``<name>.safetensors`` (atomically), as contiguous CPU copies.

        Tensors sharing memory (tied weights) are cloned, which safetensors requires.
        """
        name = _check_file_name(name, "state", ".safetensors")
        tensors = _plain_tensors(state_dict)
        path = self.path / f"{name}.safetensors"
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        return path

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.status != Status.RUNNING:
            return
        if exc is None:
            self.finish(Status.COMPLETE)
        elif isinstance(exc, KeyboardInterrupt):
            self.finish(Status.STOPPED, "interrupted")
        else:
            self.finish(Status.FAILED, f"{type(exc).__name__}: {exc}")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.status!r})"


def _make_unique_dir(base: Path, stem: str) -> Path:
    """Create ``base/stem``, or ``stem-2``, ``stem-3``, ... if taken (safe across processes)."""
    for i in range(1, 10_000):
        path = base / (stem if i == 1 else f"{stem}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise LSQError(f"too many runs named {stem} in {base}; delete some or use another root")


def _is_default_index(index: pd.Index) -> bool:
    """True for an unnamed 0..n-1 index, which CSV need not store."""
    if index.name is not None or index.nlevels != 1:
        return False
    if isinstance(index, pd.RangeIndex):
        return index.start == 0 and index.step == 1
    return False


def _plain_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory with another."""
    if not isinstance(state_dict, Mapping):
        raise LSQError(f"state must be a dict of name -> tensor, got {type(state_dict).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise LSQError(f"state keys must be strings, got {key!r}")
        if not isinstance(value, torch.Tensor):
            raise LSQError(
                f"state entry {key!r} is a {type(value).__name__}, not a tensor; "
                "save numbers and text with write_json instead"
            )
        t = value.detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()  # tied weights / views of one buffer: safetensors wants them apart
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


# --------------------------------------------------------------------------- reading


def _read_info(path: Path) -> RunInfo | None:
    """What a run folder says about itself; None (with a warning) if it is not a readable run."""
    config_path = path / "config.json"
    if not config_path.exists():
        if any(path.iterdir()):
            warnings.warn(
                f"skipping {path}: it has no config.json, so it is not a run", stacklevel=3
            )
        return None  # an empty folder: a run being created, or one killed before its config
    try:
        doc = _read_json(config_path)
        if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
            raise ValueError("it is not a run config (no 'config' object)")
    except (OSError, ValueError) as exc:
        warnings.warn(f"skipping {path}: config.json cannot be read ({exc})", stacklevel=3)
        return None
    meta = doc.get("meta") if isinstance(doc.get("meta"), dict) else {}
    info = RunInfo(
        path=path,
        name=path.name,
        status=Status.INCOMPLETE,
        config=doc["config"],
        meta=meta,
        started=str(doc.get("created", "")),
        finished=None,
        message="killed before its first status write",
        model=str(doc.get("model", "")),
    )
    status_path = path / "status.json"
    if not status_path.exists():
        return info
    try:
        st = _read_json(status_path)
        if not isinstance(st, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        info.message = f"status.json cannot be read ({exc})"
        return info
    info.status = str(st.get("status", Status.INCOMPLETE))
    info.message = str(st.get("message", ""))
    info.started = str(st.get("started") or info.started)
    info.finished = st.get("finished")
    same_host = st.get("host") in (None, socket.gethostname())
    if info.status == Status.RUNNING and same_host and not pid_alive(st.get("pid")):
        info.status = Status.INCOMPLETE
        info.message = (
            f"interrupted: the process that wrote it (pid {st.get('pid')}) is gone; "
            "everything saved before that is intact"
        )
    return info


def _sort_key(info: RunInfo) -> tuple[float, str]:
    try:
        when = datetime.fromisoformat(info.started)
        if when.tzinfo is None:
            when = when.astimezone()
        stamp = when.timestamp()
    except ValueError:
        try:
            stamp = info.path.stat().st_mtime
        except OSError:
            stamp = -math.inf
    return stamp, info.name


def list_runs(root: str | Path | None = None) -> list[RunInfo]:
    """All runs in the root, newest first. Folders that are not runs are skipped with a warning."""
    base = runs_root(root)
    if not base.exists():
        return []
    if not base.is_dir():
        raise LSQError(f"the runs folder {base} is a file; pass root= or set {RUNS_DIR_ENV}")
    infos = []
    for entry in base.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        info = _read_info(entry)
        if info is not None:
            infos.append(info)
    infos.sort(key=_sort_key, reverse=True)
    return infos


def load_run(path_or_name: str | Path, root: str | Path | None = None) -> LoadedRun:
    """Read a run: info, QuantConfig, every ``*.csv`` table, other JSON and ``state`` tensors."""
    path = _run_path(path_or_name, root)
    if not path.is_dir():
        raise _missing(path_or_name, path, root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = _read_info(path)
    if info is None:
        why = f" ({caught[0].message})" if caught else ""
        raise LSQError(f"{path} is not a readable run{why}; list_runs() shows the runs there are")
    try:
        config = QuantConfig.from_dict(info.config)
    except (LSQError, TypeError) as exc:
        raise LSQError(f"run {info.name} has a config this version cannot read: {exc}") from exc

    tables: dict[str, pd.DataFrame] = {}
    extras: dict[str, Any] = {}
    for file in sorted(path.iterdir()):
        if file.name.startswith(".") or not file.is_file():
            continue  # temp files of interrupted writes are hidden
        if file.suffix == ".csv":
            try:
                tables[file.stem] = pd.read_csv(file, float_precision="round_trip")
            except pd.errors.EmptyDataError:
                tables[file.stem] = pd.DataFrame()
            except (OSError, ValueError, pd.errors.ParserError) as exc:
                warnings.warn(f"skipping table {file}: cannot be parsed ({exc})", stacklevel=2)
        elif file.suffix == ".json" and file.stem not in _RESERVED:
            try:
                extras[file.stem] = _read_json(file)
            except (OSError, ValueError) as exc:
                warnings.warn(f"skipping {file}: cannot be read ({exc})", stacklevel=2)
    state = _saved_state(path / "state.safetensors")
    return LoadedRun(info=info, config=config, tables=tables, state=state, extras=extras)


def delete_run(
    path_or_name: str | Path, root: str | Path | None = None, force: bool = False
) -> None:
    """Delete a run folder inside the root. A run still being written needs ``force=True``."""
    path = _run_path(path_or_name, root)
    base = runs_root(root)
    if path.parent.resolve() != base.resolve():
        raise LSQError(f"{path} is not inside the runs folder {base}; only runs there are deleted")
    if path.is_symlink():
        raise LSQError(f"{path} is a link, not a run folder; remove the link yourself")
    if not path.is_dir():
        raise _missing(path_or_name, path, root)
    if not (path / "config.json").exists() and any(path.iterdir()):
        raise LSQError(f"{path} does not look like a run (no config.json); not deleting it")
    if not force:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            info = _read_info(path)
        if info is not None and info.status == Status.RUNNING:
            raise LSQError(
                f"run {path.name} is still running; stop it first, or pass force=True to delete it"
            )
    # Rename to a hidden name first so a half-deleted run never shows up in list_runs.
    trash = base / f".deleting-{path.name}-{secrets.token_hex(4)}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


__all__ = [
    "RUNS_DIR_ENV",
    "STATUSES",
    "LoadedRun",
    "Run",
    "RunInfo",
    "delete_run",
    "list_runs",
    "load_run",
    "runs_root",
]
