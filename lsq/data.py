"""Images for calibration and evaluation, and the tensors ("views") the model sees.

The default images are the photos that ship inside scikit-image, read straight from the package's
data folder so nothing is ever downloaded. User images go through ``load_image``, which checks the
pixel count from the header before decoding anything, and ``folder_images`` for a whole folder.
"""

from __future__ import annotations

import io
import math
import os
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from lsq.errors import LSQError
from lsq.validate import whole_number

SPLITS = ("calibration", "evaluation")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_PIXELS = 40_000_000
MAX_FOLDER_IMAGES = 5000
MIN_RESOLUTION, MAX_RESOLUTION = 16, 1024

# The two splits of scikit-image's bundled photos, disjoint by construction.
#
# Evaluation holds natural object photos that the bundled float EfficientNet-Lite0 recognises with
# an ImageNet class that fits (centre crop, timm's default transform): chelsea -> 282 tiger cat
# (0.39; 285 Egyptian cat and 281 tabby follow), coffee -> 967 espresso (0.95), camera -> 872
# tripod (0.94; the cameraman's tripod), motorcycle_left/right -> 665 moped (0.54 / 0.55) and
# rocket -> 657 missile (0.27; 744 projectile second). The motorcycle pair is a stereo pair, two
# near-identical views of one scene, so both stay in the same split.
#
# Calibration gets everything else that is a real photograph: astronaut (a person, predicted
# "football helmet" - no ImageNet class fits, so useless for accuracy but a fine natural colour
# photo for activation statistics), coins and the motion-blurred clock (photos of objects),
# microscopy (ihc, cell), retina, moon, Hubble, and the grey textures (brick, grass, gravel).
# Synthetic pictures (chessboard, color wheel, logo, phantom, text scans) are left out: they would
# pull the activation ranges away from what photos produce.
EVALUATION_IMAGES: tuple[str, ...] = (
    "chelsea.png",
    "coffee.png",
    "camera.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "rocket.jpg",
)
CALIBRATION_IMAGES: tuple[str, ...] = (
    "astronaut.png",
    "coins.png",
    "clock_motion.png",
    "ihc.png",
    "retina.jpg",
    "hubble_deep_field.jpg",
    "moon.png",
    "cell.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def skimage_data_dir() -> Path:
    """The folder inside the installed scikit-image package that holds its bundled photos."""
    import skimage

    return Path(skimage.__file__).parent / "data"


def bundled_images(split: str) -> list[Image.Image]:
    """The scikit-image photos of one split ("calibration" or "evaluation"), as RGB images."""
    if split not in SPLITS:
        raise LSQError(f"Unknown image split {split!r}: use one of {', '.join(SPLITS)}.")
    names = CALIBRATION_IMAGES if split == "calibration" else EVALUATION_IMAGES
    folder = skimage_data_dir()
    return [load_image(folder / name) for name in names]


#: Bundled photos that show one scene (a stereo pair): never split between folds or splits.
SAME_SCENE: tuple[tuple[str, ...], ...] = (("motorcycle_left.png", "motorcycle_right.png"),)


def bundled_scenes() -> list[tuple[str, ...]]:
    """Every bundled photo (both splits: evaluation first), grouped by scene."""
    scenes: list[tuple[str, ...]] = []
    seen: set[str] = set()
    for name in EVALUATION_IMAGES + CALIBRATION_IMAGES:
        if name not in seen:
            scene = next((s for s in SAME_SCENE if name in s), (name,))
            seen.update(scene)
            scenes.append(scene)
    return scenes


def scene_folds(k: int) -> list[list[str]]:
    """The bundled photos in ``k`` folds by scene (dealt in turn, evaluation photos first, so
    every fold gets object photos and others): cross-validation's held-out sets."""
    scenes = bundled_scenes()
    k = whole_number(k, "folds", 2, len(scenes))
    folds: list[list[str]] = [[] for _ in range(k)]
    for i, scene in enumerate(scenes):
        folds[i % k].extend(scene)
    return folds


def named_bundled_images(names: Sequence[str]) -> list[Image.Image]:
    """Bundled photos by file name (any split)."""
    known = set(EVALUATION_IMAGES + CALIBRATION_IMAGES)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LSQError(f"not a bundled photo: {', '.join(unknown)}")
    folder = skimage_data_dir()
    return [load_image(folder / name) for name in names]


def load_image(source: str | os.PathLike | bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file (or its bytes) safely and return it as an RGB image.

    The pixel count is read from the header before anything is decoded: a JPEG larger than
    ``max_pixels`` is decoded at 1/2, 1/4 or 1/8 scale instead, anything else that large is
    refused, so a small file announcing 20000 x 20000 pixels cannot exhaust memory. Grey,
    16-bit, palette, CMYK and transparent images are converted to 8-bit RGB (transparency on
    white), and the EXIF orientation of phone photos is applied.
    """
    max_pixels = whole_number(max_pixels, "max_pixels", 1)
    if isinstance(source, bytes | bytearray):
        label = "the uploaded image"
        if not source:
            raise LSQError("The uploaded image is empty (0 bytes).")
        fp: io.BytesIO | Path = io.BytesIO(bytes(source))
    elif isinstance(source, str | os.PathLike):
        fp = Path(source)
        label = str(fp)
        if not fp.exists():
            raise LSQError(f"Image file {label} does not exist.")
        if fp.is_dir():
            raise LSQError(f"{label} is a folder, not an image file.")
        if fp.stat().st_size == 0:
            raise LSQError(f"Image file {label} is empty (0 bytes).")
    else:
        raise LSQError(f"An image must be a file path or bytes, not {type(source).__name__}.")

    with warnings.catch_warnings():
        # The size check below is ours; Pillow's own warning would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise LSQError(
                f"{label} is far too large to open ({_pixels_from_message(e)}); "
                f"the limit is {max_pixels:,} pixels."
            ) from e
        except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError, ...
            raise LSQError(
                f"{label} is not an image that can be read (accepted formats: "
                f"{', '.join(IMAGE_EXTENSIONS)}): {e}"
            ) from e
        try:
            return _decode_rgb(img, label, max_pixels)
        finally:
            img.close()


def _pixels_from_message(error: Exception) -> str:
    match = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(match.group(1)):,} pixels" if match else "its header announces too many pixels"


def _decode_rgb(img: Image.Image, label: str, max_pixels: int) -> Image.Image:
    """Decode an opened (still lazy) image within the pixel budget and convert it to RGB."""
    width, height = img.size
    if width * height > max_pixels and img.format == "JPEG":
        # JPEG can decode straight to a reduced size: pick the smallest factor that fits.
        for factor in (2, 4, 8):
            if math.ceil(width / factor) * math.ceil(height / factor) <= max_pixels:
                img.draft(None, (width // factor, height // factor))
                break
    if img.size[0] * img.size[1] > max_pixels:
        raise LSQError(
            f"{label} is too large: {width} x {height} = {width * height:,} pixels, "
            f"the limit is {max_pixels:,}. Downscale it first."
        )
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except LSQError:
        raise
    except Exception as e:  # truncated data, broken chunks, decoder errors
        raise LSQError(f"{label} is truncated or corrupt and cannot be decoded: {e}") from e


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode; 16-bit and float images are scaled, not clipped."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if mode == "F" and np.nanmax(a) <= 1.0:
            a = a * 255.0
        elif a.max() > 255:
            a = a / 257.0 if a.max() <= 65535 else a * (255.0 / a.max())
        grey = np.nan_to_num(a).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "1":
        return img.convert("L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class FolderImages(tuple):
    """``(images, labels, class_names)`` from ``folder_images``, plus ``files`` and ``skipped``.

    It unpacks like the plain 3-tuple; ``files`` holds the path of every image in order and
    ``skipped`` the files that could not be read, each with the reason.
    """

    def __new__(
        cls,
        images: list[Image.Image],
        labels: list[int] | None,
        class_names: list[str],
        files: list[str],
        skipped: list[str],
    ) -> FolderImages:
        self = super().__new__(cls, (images, labels, class_names))
        self.files = files
        self.skipped = skipped
        return self

    def __getnewargs__(self) -> tuple:  # so that pickle and copy (e.g. app caches) rebuild it
        return (*self, self.files, self.skipped)

    @property
    def images(self) -> list[Image.Image]:
        return self[0]

    @property
    def labels(self) -> list[int] | None:
        return self[1]

    @property
    def class_names(self) -> list[str]:
        return self[2]


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def folder_images(
    path: str | os.PathLike,
    max_pixels: int = MAX_PIXELS,
    max_images: int = MAX_FOLDER_IMAGES,
) -> FolderImages:
    """Read a folder of images: class sub-folders (labelled) or a flat folder (unlabelled).

    With sub-folders that contain images, each is a class: the label is the index of its name in
    sorted order, and images lying directly in the folder are skipped. Otherwise the images in the
    folder itself are returned with ``labels`` None and no class names. Unreadable files are
    skipped (listed in ``.skipped`` and in one warning); it is an error when none can be read.
    """
    folder = Path(path)
    if not folder.exists():
        raise LSQError(f"Image folder {folder} does not exist.")
    if not folder.is_dir():
        raise LSQError(f"{folder} is a file, not a folder of images.")
    accepted = ", ".join(IMAGE_EXTENSIONS)

    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = [(d.name, files) for d in subfolders if (files := _image_files(d))]
    skipped: list[str] = []
    if classes:
        entries = [(f, i) for i, (_, files) in enumerate(classes) for f in files]
        class_names = [name for name, _ in classes]
        skipped += [f"{f}: not inside a class folder" for f in _image_files(folder)]
    else:
        entries = [(f, None) for f in _image_files(folder)]
        class_names = []
    if not entries:
        raise LSQError(
            f"No images found in {folder} or its sub-folders; accepted file types: {accepted}."
        )
    if len(entries) > max_images:
        raise LSQError(
            f"{folder} holds {len(entries):,} images, more than the limit of {max_images:,}; "
            "use a smaller selection."
        )

    images: list[Image.Image] = []
    labels: list[int] = []
    files: list[str] = []
    for file, label in entries:
        try:
            images.append(load_image(file, max_pixels=max_pixels))
        except LSQError as e:
            skipped.append(str(e))
            continue
        files.append(str(file))
        if label is not None:
            labels.append(label)
    if not images:
        raise LSQError(f"None of the {len(entries)} image files in {folder} could be read.")
    if skipped:
        shown = "; ".join(skipped[:5]) + (
            f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        )
        warnings.warn(f"Skipped {len(skipped)} file(s) in {folder}: {shown}", stacklevel=2)
    return FolderImages(images, labels if class_names else None, class_names, files, skipped)


def labels_for_views(labels: Sequence[int], n_views: int) -> list[int]:
    """The label of every view from ``make_views``: view i shows image i % len(images)."""
    if not labels:
        raise LSQError("No labels given.")
    n_views = whole_number(n_views, "number of views", 1)
    return [int(labels[i % len(labels)]) for i in range(n_views)]


def _rgb_images(images: Sequence[Image.Image]) -> list[Image.Image]:
    """The images as RGB (converted once), or an LSQError saying which item is not an image."""
    if isinstance(images, Image.Image | str | bytes) or not isinstance(images, Sequence):
        raise LSQError(f"Give a list of PIL images, not a {type(images).__name__}.")
    if not images:
        raise LSQError("No images to make views from: the list is empty.")
    bad = [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]
    if bad:
        raise LSQError(f"Item {bad[0]} is a {type(images[bad[0]]).__name__}, not a PIL image.")
    return [im if im.mode == "RGB" else _to_rgb(im) for im in images]


def _check_data_config(data_config: dict) -> None:
    if not isinstance(data_config, dict):
        raise LSQError(f"data_config must be a dict (timm's data config), not {data_config!r}.")
    for key in ("mean", "std"):
        value = data_config.get(key)
        if value is None or len(value) != 3:
            raise LSQError(f"data_config needs a 3-channel {key!r}, got {value!r}.")
    if any(float(s) <= 0 for s in data_config["std"]):
        raise LSQError(f"data_config's std must be positive, got {data_config['std']!r}.")
    interp = data_config.get("interpolation", "bicubic")
    if interp not in _INTERPOLATIONS:
        raise LSQError(
            f"Unknown interpolation {interp!r} in data_config; "
            f"use one of {', '.join(_INTERPOLATIONS)}."
        )


def _check_resolution(resolution: int) -> int:
    return whole_number(resolution, "resolution", MIN_RESOLUTION, MAX_RESOLUTION)


# Training crops: 25-100 % of the image's area at an aspect ratio of 3/4 to 4/3, flipped
# horizontally half of the time. torchvision draws them from torch's global generator (its
# transforms take no generator), so the draw runs inside fork_rng on a seeded copy of that state:
# the caller's global RNG is restored afterwards. The lock keeps two threads making views from
# seeding each other; a thread that draws from torch's global CPU generator at the same moment
# without going through here is not covered.
CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
_GLOBAL_RNG_LOCK = threading.Lock()


def _step_seed(seed: int, step: int) -> int:
    """A well-mixed 64-bit seed for one (seed, step) pair: neighbouring pairs share nothing."""
    return int(np.random.SeedSequence((seed, step)).generate_state(1, np.uint64)[0])


def _random_crops(
    images: Sequence[Image.Image], resolution: int, interpolation: str, seed: int
) -> list[Image.Image]:
    """One random resized crop (with a random flip) of each image, a function of ``seed`` only."""
    from torchvision.transforms import v2

    augment = v2.Compose(
        [
            v2.RandomResizedCrop(
                (resolution, resolution),
                scale=CROP_SCALE,
                ratio=CROP_RATIO,
                interpolation=v2.InterpolationMode(interpolation),
            ),
            v2.RandomHorizontalFlip(p=0.5),
        ]
    )
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [augment(im) for im in images]


def _normalise(views: Sequence[Image.Image], data_config: dict) -> torch.Tensor:
    """RGB images of one size -> float32 [n, 3, h, w], scaled to [0, 1] and normalised."""
    mean = torch.tensor([float(m) for m in data_config["mean"]]).view(1, 3, 1, 1)
    std = torch.tensor([float(s) for s in data_config["std"]]).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.stack([np.asarray(v) for v in views]))  # [n, h, w, 3] uint8
    return ((pixels.permute(0, 3, 1, 2).float() / 255.0 - mean) / std).contiguous()


def make_views(
    images: Sequence[Image.Image],
    n_views: int,
    resolution: int,
    data_config: dict,
    seed: int = 0,
    augment: bool = True,
) -> torch.Tensor:
    """A float32 batch [n_views, 3, resolution, resolution] normalised with data_config's mean/std.

    View i comes from image i % len(images). With ``augment`` each view is a random resized crop
    (25-100 % of the area, aspect 3/4-4/3) with a random horizontal flip, seeded with ``seed``
    (the global RNGs are left as they were), so a few photos give many different calibration
    inputs and the same seed always gives the same tensor; it is ``FreshViews(...).batch(0, n)``.
    Without it each view is timm's evaluation transform (resize, centre crop) at this resolution.
    """
    if not augment:
        return _eval_views(images, n_views, resolution, data_config)
    return FreshViews(images, resolution, data_config, seed).batch(0, n_views)


def _eval_views(
    images: Sequence[Image.Image], n_views: int, resolution: int, data_config: dict
) -> torch.Tensor:
    import timm.data

    rgb = _rgb_images(images)
    n_views = whole_number(n_views, "number of views", 1)
    _check_resolution(resolution)
    _check_data_config(data_config)
    cfg = {k: data_config[k] for k in _TRANSFORM_KEYS if k in data_config}
    cfg.update(
        input_size=(3, resolution, resolution),
        mean=tuple(float(m) for m in data_config["mean"]),
        std=tuple(float(s) for s in data_config["std"]),
    )
    transform = timm.data.create_transform(**cfg, is_training=False)
    distinct = [transform(im).float() for im in rgb[: min(len(rgb), n_views)]]
    return torch.stack([distinct[i % len(distinct)] for i in range(n_views)]).contiguous()


class FreshViews:
    """New random crops of a few images at every training step, reproducible from (seed, step).

    ``batch(step, n)`` gives n views, view i showing image (step * n + i) % len(images) (so every
    image is seen equally often) as a random resized crop with a random flip, normalised like
    ``make_views``. The same seed and step always give the same tensor, different steps give
    different crops, and the global RNGs are left as they were.
    """

    def __init__(
        self, images: Sequence[Image.Image], resolution: int, data_config: dict, seed: int = 0
    ) -> None:
        self.images = _rgb_images(images)
        self.resolution = _check_resolution(resolution)
        _check_data_config(data_config)
        self.data_config = dict(data_config)
        self.seed = whole_number(seed, "seed", 0)
        self._interpolation = str(data_config.get("interpolation", "bicubic"))

    def indices(self, step: int, n: int) -> list[int]:
        """Which image each of the n views of ``step`` shows (to look up labels)."""
        step = whole_number(step, "step", 0)
        n = whole_number(n, "number of views", 1)
        return [(step * n + i) % len(self.images) for i in range(n)]

    def batch(self, step: int, n: int) -> torch.Tensor:
        """float32 [n, 3, resolution, resolution]: the views of training step ``step``."""
        step = whole_number(step, "step", 0)
        chosen = [self.images[i] for i in self.indices(step, n)]
        crops = _random_crops(
            chosen, self.resolution, self._interpolation, _step_seed(self.seed, step)
        )
        return _normalise(crops, self.data_config)


class TensorViews:
    """``batch(step, n)`` over views already made (e.g. synthetic images): random picks and flips.

    Each step draws n indices (with replacement) and flips each pick horizontally with
    probability 1/2, from a private generator seeded with (seed, step): reproducible, and the
    global RNGs are untouched.
    """

    def __init__(self, views: torch.Tensor, seed: int = 0) -> None:
        if not isinstance(views, torch.Tensor) or views.dim() != 4 or views.shape[1] != 3:
            shape = tuple(views.shape) if isinstance(views, torch.Tensor) else type(views).__name__
            raise LSQError(f"views must be a tensor [n, 3, height, width], got {shape}.")
        if views.shape[0] == 0:
            raise LSQError("views holds no views (its first dimension is 0).")
        if not views.is_floating_point():
            raise LSQError(f"views must be floating point (normalised images), not {views.dtype}.")
        self.views = views.detach()
        self.resolution = int(views.shape[-1])
        self.seed = whole_number(seed, "seed", 0)

    def batch(self, step: int, n: int) -> torch.Tensor:
        """float32 [n, 3, height, width]: n random picks for step ``step``, about half flipped."""
        step = whole_number(step, "step", 0)
        n = whole_number(n, "number of views", 1)
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step))
        picks = torch.randint(0, self.views.shape[0], (n,), generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        out = self.views[picks.to(self.views.device)].float()
        out[flips] = out[flips].flip(-1)
        return out.contiguous()


class MixedViews:
    """Several view sources (FreshViews, TensorViews, ...) drawn from in proportion to weights.

    Step ``step`` asks every source for its share of n (largest-remainder rounding of
    n * weight / sum(weights), so the shares always add up to n and are the same on every call)
    at that same step and concatenates them in the order of ``sources``.
    """

    def __init__(self, sources: Sequence, weights: Sequence[float]) -> None:
        if not sources:
            raise LSQError("MixedViews needs at least one source of views.")
        bad = [i for i, s in enumerate(sources) if not callable(getattr(s, "batch", None))]
        if bad:
            raise LSQError(
                f"Source {bad[0]} is a {type(sources[bad[0]]).__name__}, which has no "
                "batch(step, n); use FreshViews or TensorViews."
            )
        if len(weights) != len(sources):
            raise LSQError(
                f"{len(sources)} sources need {len(sources)} weights, got {len(weights)}."
            )
        w = [float(x) for x in weights]
        if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
            raise LSQError(
                f"Weights must be non-negative with a positive sum, got {list(weights)!r}."
            )
        sizes = {getattr(s, "resolution", None) for s in sources} - {None}
        if len(sizes) > 1:
            raise LSQError(
                f"The sources make views of different sizes ({sorted(sizes)} pixels); "
                "make them at one resolution."
            )
        self.sources = list(sources)
        self.weights = w

    def shares(self, n: int) -> list[int]:
        """How many of n views each source gives (they add up to n)."""
        n = whole_number(n, "number of views", 1)
        exact = [n * x / sum(self.weights) for x in self.weights]
        counts = [math.floor(e) for e in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
        for i in by_remainder[: n - sum(counts)]:
            counts[i] += 1
        return counts

    def batch(self, step: int, n: int) -> torch.Tensor:
        """float32 [n, 3, h, w]: each source's share of step ``step``'s views, concatenated."""
        parts = [
            s.batch(step, k) for s, k in zip(self.sources, self.shares(n), strict=True) if k > 0
        ]
        return torch.cat(parts)
