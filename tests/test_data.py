import io
import pickle
import struct
import zlib

import numpy as np
import pytest
import timm.data
import torch
from PIL import Image

from lsq.data import (
    CALIBRATION_IMAGES,
    EVALUATION_IMAGES,
    FreshViews,
    MixedViews,
    TensorViews,
    bundled_images,
    folder_images,
    labels_for_views,
    load_image,
    make_views,
    skimage_data_dir,
)
from lsq.errors import LSQError

CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def png_header_only(width, height):
    """A valid PNG header announcing width x height 1-bit pixels, with almost no pixel data."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def save(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


def small_photo(seed=0, size=(64, 48)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# --- bundled photos ------------------------------------------------------------------------------


def test_splits_are_disjoint_non_empty_and_present():
    assert CALIBRATION_IMAGES and EVALUATION_IMAGES
    assert not set(CALIBRATION_IMAGES) & set(EVALUATION_IMAGES)
    assert {"chelsea.png", "coffee.png"} <= set(EVALUATION_IMAGES)
    pair = {"motorcycle_left.png", "motorcycle_right.png"}
    assert pair <= set(EVALUATION_IMAGES) or pair <= set(CALIBRATION_IMAGES)
    for name in CALIBRATION_IMAGES + EVALUATION_IMAGES:
        assert (skimage_data_dir() / name).is_file(), name


@pytest.mark.parametrize("split", ["calibration", "evaluation"])
def test_bundled_images_are_rgb(split):
    images = bundled_images(split)
    names = CALIBRATION_IMAGES if split == "calibration" else EVALUATION_IMAGES
    assert len(images) == len(names)
    assert all(im.mode == "RGB" and min(im.size) >= 100 for im in images)


def test_unknown_split():
    with pytest.raises(LSQError, match="calibration, evaluation"):
        bundled_images("train")


# --- load_image ----------------------------------------------------------------------------------


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_text("this is not a picture")
    with pytest.raises(LSQError, match="photo.jpg is not an image"):
        load_image(path)


def test_missing_empty_and_folder(tmp_path):
    with pytest.raises(LSQError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(LSQError, match="empty.png is empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(LSQError, match="is a folder"):
        load_image(tmp_path)
    with pytest.raises(LSQError, match="empty"):
        load_image(b"")
    with pytest.raises(LSQError, match="path or bytes"):
        load_image(42)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    buffer = io.BytesIO()
    small_photo(size=(300, 200)).save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LSQError, match=r"cut\.\w+ is truncated or corrupt"):
        load_image(path)


def test_rgba_is_put_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    out = load_image(save(rgba, tmp_path / "a.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((5, 5)) == (255, 0, 0)


def test_grey_palette_and_16_bit_become_rgb(tmp_path):
    grey = Image.new("L", (8, 6), 77)
    out = load_image(save(grey, tmp_path / "g.png"))
    assert out.mode == "RGB" and out.size == (8, 6) and out.getpixel((1, 1)) == (77, 77, 77)
    palette = small_photo().convert("P")
    assert load_image(save(palette, tmp_path / "p.gif")).mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    out = load_image(save(deep, tmp_path / "d.png"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)  # scaled, not clipped
    assert load_image((tmp_path / "g.png").read_bytes()).getpixel((0, 0)) == (77, 77, 77)


@pytest.mark.parametrize("side", [8000, 20000])
def test_huge_header_is_refused_before_decoding(tmp_path, side):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_only(side, side))  # a few hundred bytes on disk
    with pytest.raises(LSQError, match="too large"):
        load_image(path)


def test_max_pixels_applies_to_small_images_too(tmp_path):
    path = save(small_photo(size=(100, 100)), tmp_path / "x.png")
    with pytest.raises(LSQError, match=r"100 x 100 = 10,000 pixels, the limit is 5,000"):
        load_image(path, max_pixels=5000)
    assert load_image(path, max_pixels=10_000).size == (100, 100)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    path = save(Image.new("RGB", (1600, 1200), (10, 200, 30)), tmp_path / "big.jpg")
    out = load_image(path, max_pixels=150_000)
    assert out.size == (400, 300) and out.mode == "RGB"  # 1/4 scale, the first that fits
    with pytest.raises(LSQError, match="too large"):
        load_image(path, max_pixels=20_000)  # even 1/8 (200 x 150) is too big


# --- folder_images -------------------------------------------------------------------------------


def test_folder_errors(tmp_path):
    with pytest.raises(LSQError, match="does not exist"):
        folder_images(tmp_path / "missing")
    file = tmp_path / "file.png"
    file.write_bytes(b"x")
    with pytest.raises(LSQError, match="not a folder"):
        folder_images(file)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LSQError, match=r"No images found.*\.jpg.*\.png"):
        folder_images(empty)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("hello")
    with pytest.raises(LSQError, match="No images found"):
        folder_images(notes)


def test_flat_folder_skips_unreadable_files(tmp_path):
    for i in range(3):
        save(small_photo(i), tmp_path / f"img{i}.png")
    (tmp_path / "broken.jpg").write_text("not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(UserWarning, match="Skipped 1 file"):
        result = folder_images(tmp_path)
    images, labels, class_names = result
    assert len(images) == 3 and labels is None and class_names == []
    assert [f.rsplit("/", 1)[-1] for f in result.files] == ["img0.png", "img1.png", "img2.png"]
    assert len(result.skipped) == 1 and "broken.jpg" in result.skipped[0]


def test_class_folders(tmp_path):
    for cls, n in (("dogs", 1), ("cats", 2)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            save(small_photo(i), tmp_path / cls / f"{i}.jpg")
    (tmp_path / "empty_class").mkdir()  # no images: not a class
    images, labels, class_names = folder_images(tmp_path)
    assert class_names == ["cats", "dogs"] and labels == [0, 0, 1] and len(images) == 3
    copy = pickle.loads(pickle.dumps(folder_images(tmp_path)))  # app caches pickle results
    assert copy.labels == [0, 0, 1] and len(copy.files) == 3 and copy.skipped == []


def test_folder_with_nothing_readable(tmp_path):
    (tmp_path / "a.png").write_bytes(b"garbage")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(LSQError, match="None of the 2 image files"):
        folder_images(tmp_path)


# --- make_views ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos():
    return [small_photo(0, (120, 90)), small_photo(1, (80, 100)).convert("L")]


def test_views_shape_dtype_range_and_determinism(photos):
    a = make_views(photos, 5, 32, CONFIG, seed=3)
    assert a.shape == (5, 3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= -1 and a.max() <= 1  # mean = std = 0.5 maps [0, 1] to [-1, 1]
    assert torch.equal(a, make_views(photos, 5, 32, CONFIG, seed=3))
    assert not torch.equal(a, make_views(photos, 5, 32, CONFIG, seed=4))
    assert not torch.equal(a[0], a[2])  # same photo, different crop


def test_views_leave_global_rngs_alone(photos):
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    make_views(photos, 4, 24, CONFIG, seed=0)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_views_without_augment_are_timms_eval_transform(photos):
    views = make_views(photos, 3, 64, CONFIG, augment=False)
    transform = timm.data.create_transform(**{**CONFIG, "input_size": (3, 64, 64)})
    assert torch.allclose(views[0], transform(photos[0]))
    assert torch.allclose(views[1], transform(photos[1].convert("RGB")))
    assert torch.equal(views[2], views[0])


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n_views": 0}, "number of views"),
        ({"resolution": 8}, "resolution"),
        ({"resolution": 2048}, "resolution"),
        ({"images": []}, "No images"),
        ({"images": ["a.png"]}, "not a PIL image"),
        ({"data_config": {**CONFIG, "mean": (0.5,)}}, "mean"),
        ({"data_config": {**CONFIG, "interpolation": "magic"}}, "interpolation"),
    ],
)
def test_views_refuse_bad_arguments(photos, kwargs, words):
    args = {"images": photos, "n_views": 2, "resolution": 32, "data_config": CONFIG, **kwargs}
    with pytest.raises(LSQError, match=words):
        make_views(**args)


def test_labels_for_views():
    assert labels_for_views([3, 7], 5) == [3, 7, 3, 7, 3]
    with pytest.raises(LSQError):
        labels_for_views([], 2)


# --- views drawn afresh every step ---------------------------------------------------------------


def ramp(size=256):
    """A grey image whose brightness rises from 0 (left) to 255 (right)."""
    row = np.linspace(0, 255, size).round().astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (size, 1))[:, :, None], 3, axis=2))


def pixels(views):
    """Views normalised with CONFIG (mean = std = 0.5) back to [0, 1]."""
    return views * 0.5 + 0.5


def test_fresh_views_differ_between_steps_and_repeat_per_seed(photos):
    fresh = FreshViews(photos, 32, CONFIG, seed=7)
    a, b = fresh.batch(0, 6), fresh.batch(1, 6)
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert all(not torch.equal(a[i], b[i]) for i in range(6))  # every view is a new crop
    assert torch.equal(b, FreshViews(photos, 32, CONFIG, seed=7).batch(1, 6))
    assert not torch.equal(b, FreshViews(photos, 32, CONFIG, seed=8).batch(1, 6))
    assert torch.equal(a, make_views(photos, 6, 32, CONFIG, seed=7))  # one crop code path
    assert torch.equal(b, fresh.batch(1.0, 6.0))  # a number widget's 1.0 is the whole number 1


def test_fresh_views_cycle_through_the_images_evenly(photos):
    fresh = FreshViews(photos * 2, 16, CONFIG)  # four images
    assert fresh.indices(0, 3) == [0, 1, 2] and fresh.indices(1, 3) == [3, 0, 1]
    assert fresh.indices(5, 4) == [0, 1, 2, 3]


def test_fresh_views_are_normalised_colours():
    flat = Image.new("RGB", (50, 40), (255, 0, 51))
    views = FreshViews([flat], 16, CONFIG).batch(3, 2)
    expected = (torch.tensor([1.0, 0.0, 0.2]) - 0.5) / 0.5
    assert torch.allclose(views, expected.view(1, 3, 1, 1).expand(2, 3, 16, 16), atol=1e-6)


def test_fresh_crops_cover_a_quarter_to_all_of_the_width_range_and_flip():
    # On a left-to-right ramp, a crop's brightness span is the share of the width it covers:
    # 25-100 % of the area at aspect 3/4-4/3 covers sqrt(0.25 * 3/4) = 43 % to 100 % of it.
    views = pixels(FreshViews([ramp()], 48, CONFIG, seed=1).batch(0, 64))
    slope = views[:, 0, :, -1].mean(1) - views[:, 0, :, 0].mean(1)
    span = slope.abs()
    assert span.min() > 0.40 and span.max() <= 1.0
    assert span.min() < 0.6 and span.max() > 0.9  # both close and wide crops happen
    flipped = int((slope < 0).sum())
    assert 16 <= flipped <= 48  # about half of the views are mirrored


def test_fresh_views_leave_global_rngs_alone(photos):
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    FreshViews(photos, 24, CONFIG, seed=0).batch(4, 3)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)


def test_fresh_views_convert_once_and_do_not_keep_the_callers_list(photos):
    images = list(photos)
    fresh = FreshViews(images, 16, CONFIG)
    images.clear()
    assert [im.mode for im in fresh.images] == ["RGB", "RGB"]
    assert fresh.batch(0, 2).shape == (2, 3, 16, 16)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"images": []}, "No images"),
        ({"images": "photo.png"}, "list of PIL images, not a str"),
        ({"images": [None]}, "Item 0 is a NoneType, not a PIL image"),
        ({"resolution": 8}, "resolution"),
        ({"resolution": 32.5}, "resolution must be a whole number from 16 to 1024"),
        ({"seed": -1}, "seed"),
        ({"data_config": {**CONFIG, "std": (0.5, 0.0, 0.5)}}, "std must be positive"),
        ({"data_config": {**CONFIG, "interpolation": "magic"}}, "interpolation"),
    ],
)
def test_fresh_views_refuse_bad_arguments(photos, kwargs, words):
    args = {"images": photos, "resolution": 32, "data_config": CONFIG, "seed": 0, **kwargs}
    with pytest.raises(LSQError, match=words):
        FreshViews(**args)


def test_fresh_views_refuse_bad_steps_and_counts(photos):
    fresh = FreshViews(photos, 16, CONFIG)
    with pytest.raises(LSQError, match="step"):
        fresh.batch(-1, 2)
    with pytest.raises(LSQError, match="number of views"):
        fresh.batch(0, 0)
    with pytest.raises(LSQError, match="number of views"):
        fresh.batch(0, True)


def test_tensor_views_pick_flip_and_repeat():
    base = torch.arange(5 * 3 * 4 * 4, dtype=torch.float32).view(5, 3, 4, 4)
    source = TensorViews(base, seed=2)
    a = source.batch(0, 40)
    assert torch.equal(a, source.batch(0.0, 40.0))
    assert a.shape == (40, 3, 4, 4) and a.dtype == torch.float32
    plain = [any(torch.equal(v, b) for b in base) for v in a]
    mirrored = [any(torch.equal(v, b.flip(-1)) for b in base) for v in a]
    assert all(p or m for p, m in zip(plain, mirrored, strict=True))  # nothing else comes out
    assert 10 <= sum(mirrored) <= 30 and 10 <= sum(plain) <= 30
    assert len({int(v[0, 0].max()) for v in a}) == 5  # every view gets picked
    assert torch.equal(a, TensorViews(base, seed=2).batch(0, 40))
    assert not torch.equal(a, source.batch(1, 40))
    assert not torch.equal(a, TensorViews(base, seed=3).batch(0, 40))
    assert torch.equal(base, torch.arange(240, dtype=torch.float32).view(5, 3, 4, 4))  # untouched


def test_tensor_views_leave_global_rngs_alone():
    state = torch.get_rng_state()
    TensorViews(torch.zeros(3, 3, 8, 8)).batch(2, 4)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "views, words",
    [
        (np.zeros((2, 3, 8, 8)), "tensor"),
        (torch.zeros(3, 8, 8), r"\[n, 3, height, width\]"),
        (torch.zeros(2, 1, 8, 8), r"\(2, 1, 8, 8\)"),
        (torch.zeros(0, 3, 8, 8), "no views"),
        (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "floating point"),
    ],
)
def test_tensor_views_refuse_bad_tensors(views, words):
    with pytest.raises(LSQError, match=words):
        TensorViews(views)


def test_mixed_views_share_by_weight():
    zeros = TensorViews(torch.zeros(4, 3, 8, 8))
    ones = TensorViews(torch.ones(4, 3, 8, 8))
    mixed = MixedViews([zeros, ones], [3, 1])
    assert mixed.shares(32) == [24, 8] and mixed.shares(5) == [4, 1] and mixed.shares(1) == [1, 0]
    assert MixedViews([zeros, ones, zeros], [1, 1, 1]).shares(4) == [2, 1, 1]
    assert mixed.shares(8.0) == [6, 2]
    batch = mixed.batch(3, 10)
    assert batch.shape == (10, 3, 8, 8)
    assert batch[:, 0, 0, 0].tolist() == [0.0] * 8 + [1.0] * 2
    assert torch.equal(batch, mixed.batch(3, 10))


def test_mixed_views_pass_the_step_to_each_source(photos):
    fresh = FreshViews(photos, 16, CONFIG, seed=5)
    mixed = MixedViews([fresh, TensorViews(torch.zeros(2, 3, 16, 16))], [1, 1])
    assert torch.equal(mixed.batch(7, 4)[:2], fresh.batch(7, 2))
    assert not torch.equal(mixed.batch(8, 4)[:2], fresh.batch(7, 2))


@pytest.mark.parametrize(
    "sources, weights, words",
    [
        ([], [], "at least one source"),
        (["photos"], [1], "Source 0 is a str"),
        ("two", [1, 1], "at least one|Source 0"),
        (None, [1], "at least one source"),
        ("zeros", [1, 2], "1 sources need 1 weights, got 2"),
        ("zeros", [-1], "non-negative"),
        ("zeros", [0], "positive sum"),
        ("zeros", [float("nan")], "non-negative"),
        ("mixed sizes", [1, 1], r"different sizes \(\[8, 16\] pixels\)"),
    ],
)
def test_mixed_views_refuse_bad_arguments(sources, weights, words):
    zeros = TensorViews(torch.zeros(2, 3, 8, 8))
    if sources == "zeros":
        sources = [zeros]
    elif sources == "mixed sizes":
        sources = [zeros, TensorViews(torch.zeros(2, 3, 16, 16))]
    elif sources == "two":
        sources = "ab"
    with pytest.raises(LSQError, match=words):
        MixedViews(sources or [], weights)
