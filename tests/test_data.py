"""Input pipeline: sources, deterministic order, host slicing, augmentation, eval, prefetch."""
import io
import logging
import os
import re
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from scaling import data
from scaling.data import augment
from scaling.data.sources import ArraySource

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")


def config(**overrides):
    cfg = data.default_data_config()
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def train_ds():
    return data.build_dataset(config(), "train", train=True, seed=0)


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ----------------------------------------------------------------------------- embedded
def test_embedded_splits_are_real_cifar10():
    train, val = data.embedded_source("train"), data.embedded_source("validation")
    assert (len(train), len(val)) == (10_000, 2_000)
    assert train.num_classes == val.num_classes == 10
    assert train.class_names == CIFAR10 and train.image_size == 32
    assert np.bincount(train.labels()).tolist() == [1000] * 10
    assert np.bincount(val.labels()).tolist() == [200] * 10
    images, labels = val.get(np.arange(2_000))
    assert images.dtype == np.uint8 and images.shape == (2_000, 32, 32, 3)
    assert labels.dtype == np.int32
    # Natural images: full range used, mean near CIFAR-10's (~121 on 0-255), no blank images.
    assert 100 < images.mean() < 140 and images.min() == 0 and images.max() == 255
    assert images.reshape(2_000, -1).std(axis=1).min() > 5
    # Per-channel mean matches the default normalisation constants to 0.02.
    np.testing.assert_allclose(images.mean((0, 1, 2)) / 255, augment.Transform.mean, atol=0.02)
    with pytest.raises(ValueError, match="validation"):
        data.embedded_source("test")


def test_embedded_file_is_small_and_importing_skips_tensorflow():
    assert os.path.getsize(data.sources.EMBEDDED_FILE) < 10 * 2**20
    code = ("import sys, scaling.data as d; d.build_dataset(d.default_data_config(), "
            "'validation', train=False, seed=0); "
            "assert 'tensorflow' not in sys.modules and 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ----------------------------------------------------------------------------- order
def test_batch_is_pure_function_of_seed_and_step(train_ds):
    again = data.build_dataset(config(), "train", train=True, seed=0)
    b5 = train_ds.train_batch(5, 64)
    assert b5["image"].shape == (64, 32, 32, 3) and b5["image"].dtype == np.float32
    assert b5["label"].shape == (64,) and b5["label"].dtype == np.int32
    assert_batches_equal(b5, again.train_batch(5, 64))
    assert not np.array_equal(b5["image"], train_ds.train_batch(6, 64)["image"])
    other_seed = data.build_dataset(config(), "train", train=True, seed=1)
    assert not np.array_equal(train_ds.indices(5, 64), other_seed.indices(5, 64))
    # Normalised with the configured mean/std: roughly zero mean, unit variance.
    assert abs(b5["image"].mean()) < 0.2 and 0.8 < b5["image"].std() < 1.2


def test_epochs_cover_every_example_once():
    ds = data.build_dataset(config(examples_per_class=5), "train", train=True, seed=3)
    assert ds.num_examples == 50 and ds.steps_per_epoch(16) == 4
    stream = np.concatenate([ds.indices(step, 16) for step in range(13)])   # 208 positions
    epochs = [stream[i * 50:(i + 1) * 50] for i in range(4)]
    for e, order in enumerate(epochs):
        assert sorted(order) == list(range(50)), e
        np.testing.assert_array_equal(order, np.random.default_rng([3, e]).permutation(50))
    assert not np.array_equal(epochs[0], epochs[1])
    # Batch 3 spans the epoch boundary: 2 examples of epoch 0, 14 of epoch 1.
    np.testing.assert_array_equal(ds.indices(3, 16), np.concatenate([epochs[0][48:], epochs[1][:14]]))
    # A batch larger than the dataset spans several epochs.
    assert len(ds.indices(0, 120)) == 120


@pytest.mark.parametrize("process_count", [2, 4])
def test_hosts_see_exactly_their_rows_of_the_global_batch(process_count):
    cfg = config(rotation=15.0, color_jitter=0.4, crop="random_resized", image_size=40)
    ds = data.build_dataset(cfg, "train", train=True, seed=7)
    full = ds.train_batch(11, 32)
    parts = [ds.train_batch(11, 32, p, process_count) for p in range(process_count)]
    assert all(len(p["label"]) == 32 // process_count for p in parts)
    assert_batches_equal(full, {k: np.concatenate([p[k] for p in parts]) for k in full})
    with pytest.raises(ValueError, match="multiple of the process count"):
        ds.train_batch(0, 30, 0, 4)


# ----------------------------------------------------------------------------- eval
@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_split_once_with_mask(process_count):
    ds = data.build_dataset(config(), "validation", train=False, seed=0)
    single = list(ds.eval_batches(300))
    assert len(single) == 7                                        # ceil(2000 / 300)
    hosts = [list(ds.eval_batches(300, p, process_count)) for p in range(process_count)]
    batches = [{k: np.concatenate([h[i][k] for h in hosts]) for k in single[0]}
               for i in range(len(single))]
    for merged, whole in zip(batches, single):
        assert_batches_equal(merged, whole)
    mask = np.concatenate([b["mask"] for b in single])
    assert mask.dtype == np.float32 and mask.sum() == 2000 and (mask[2000:] == 0).all()
    labels = np.concatenate([b["label"] for b in single])
    np.testing.assert_array_equal(labels[:2000], ds.source.labels())
    last = single[-1]
    assert last["image"].shape == (300, 32, 32, 3)
    assert (last["image"][200:] == 0).all() and (last["label"][200:] == 0).all()
    # Native size == image_size: eval images are the decoded pixels, only normalised.
    raw, _ = ds.source.get(np.arange(300))
    mean, std = np.asarray(ds.transform.mean), np.asarray(ds.transform.std)
    np.testing.assert_allclose(single[0]["image"] * std + mean, raw / 255, atol=1e-5)


def test_upsampled_cifar_is_plain_resize():
    ds = data.build_dataset(config(image_size=64), "validation", train=False, seed=0)
    batch = next(iter(ds.eval_batches(8)))
    raw, _ = ds.source.get(np.arange(8))
    expected = np.stack([np.asarray(Image.fromarray(r).resize((64, 64), Image.BILINEAR)) for r in raw])
    mean, std = np.asarray(ds.transform.mean), np.asarray(ds.transform.std)
    np.testing.assert_allclose((batch["image"] * std + mean) * 255, expected, atol=1e-3)


# ----------------------------------------------------------------------------- augmentation
def test_pad_crop_offsets_and_flip():
    x = np.arange(2 * 6 * 6 * 3, dtype=np.uint8).reshape(2, 6, 6, 3)
    u = np.array([0.0, 0.999])
    out = augment.pad_crop(x, 2, "zero", u, u)
    np.testing.assert_array_equal(out[0, 2:, 2:], x[0, :4, :4])      # offset 0: shifted in
    assert (out[0, :2] == 0).all()
    np.testing.assert_array_equal(out[1, :4, :4], x[1, 2:, 2:])      # offset 2*pad
    reflect = augment.pad_crop(x, 2, "reflect", u, u)
    np.testing.assert_array_equal(reflect[0, 0, 2:], x[0, 2, :4])
    t = augment.Transform(image_size=6, native=6, pad=0, mean=(0, 0, 0), std=(1 / 255,) * 3)
    uu = np.zeros((2, augment.NUM_UNIFORMS))
    uu[1, augment.FLIP] = 0.9
    flipped = t.train(x, uu)
    np.testing.assert_array_equal(flipped[0], x[0][:, ::-1])         # u < 0.5 flips
    np.testing.assert_array_equal(flipped[1], x[1])


def _reference_box(height, width, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop.get_params, one attempt at a time, fed our uniforms."""
    for area_u, ratio_u, top_u, left_u in u.reshape(10, 4):
        area = height * width * (scale[0] + area_u * (scale[1] - scale[0]))
        aspect = np.exp(np.log(ratio[0]) + ratio_u * (np.log(ratio[1]) - np.log(ratio[0])))
        w, h = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(top_u * (height - h + 1)), int(left_u * (width - w + 1))
            return left, top, left + w, top + h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, (width - w) // 2 + w, (height - h) // 2 + h


def test_random_resized_boxes_follow_inception_rule():
    rng = np.random.default_rng(0)
    heights, widths = rng.integers(20, 400, 500), rng.integers(20, 400, 500)
    heights[:50] = 20 * widths[:50]                          # extreme shapes: fallback path
    u = rng.random((500, 40))
    boxes = augment.random_resized_boxes(heights, widths, u)
    expected = [_reference_box(h, w, uu) for h, w, uu in zip(heights, widths, u)]
    np.testing.assert_array_equal(boxes, expected)
    left, top, right, bottom = boxes.T
    assert (left >= 0).all() and (top >= 0).all()
    assert (right <= widths).all() and (bottom <= heights).all()
    frac = (right - left) * (bottom - top) / (heights * widths)
    assert frac[50:].min() > 0.07 and frac.max() <= 1.0


def test_variable_size_eval_resizes_shorter_side_then_centre_crops():
    img = np.broadcast_to(np.arange(200, dtype=np.uint8)[None, :, None], (100, 200, 3))
    t = augment.Transform(image_size=50, crop_fraction=0.8, mean=(0, 0, 0), std=(1 / 255,) * 3)
    out = t.eval([np.ascontiguousarray(img)])[0]
    # Shorter side 100 -> 62.5, then the centre 50x50: original columns 60..140 (80 px).
    assert out.shape == (50, 50, 3)
    expected = 60 + (np.arange(50) + 0.5) * 80 / 50 - 0.5
    np.testing.assert_allclose(out[25, :, 0], expected, atol=0.6)


# ----------------------------------------------------------------------------- folder
def _write_images(root, classes, n, sizes=((40, 30), (33, 50))):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            w, h = sizes[i % len(sizes)]
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
            if i % 3 == 0:
                img.convert("L").save(root / c / f"{i:03d}.png")        # grayscale PNG
            elif i % 3 == 1:
                img.convert("RGBA").save(root / c / f"{i:03d}.png")
            else:
                img.save(root / c / f"{i:03d}.jpg", quality=90)
    (root / classes[0] / "notes.txt").write_text("not an image")


def test_folder_source_fraction_split_and_split_dirs(tmp_path):
    _write_images(tmp_path / "flat", ["roses", "daisy", "tulips"], 5)
    cfg = config(source="folder", path=str(tmp_path / "flat"), image_size=24, val_fraction=0.4,
                 crop="random_resized", color_jitter=0.3)
    train = data.build_dataset(cfg, "train", train=True, seed=0)
    val = data.build_dataset(cfg, "validation", train=False, seed=0)
    assert train.class_names == ("daisy", "roses", "tulips") and train.num_classes == 3
    assert (train.num_examples, val.num_examples) == (9, 6)
    assert [os.path.basename(p) for p in val.source.paths[:2]] == ["003.png", "004.png"]
    images, labels = val.source.get(np.arange(6))
    assert all(im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3 for im in images)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    batch = train.train_batch(0, 8)
    assert batch["image"].shape == (8, 24, 24, 3) and np.isfinite(batch["image"]).all()
    assert_batches_equal(batch, train.train_batch(0, 8))
    eval_batch = next(iter(val.eval_batches(8)))
    assert eval_batch["mask"].tolist() == [1] * 6 + [0] * 2

    _write_images(tmp_path / "split" / "train", ["a", "b"], 4)
    _write_images(tmp_path / "split" / "val", ["a", "b"], 2)
    cfg = config(source="folder", path=str(tmp_path / "split"), image_size=16, pad=2)
    assert data.build_dataset(cfg, "train", train=True, seed=0).num_examples == 8
    val = data.build_dataset(cfg, "validation", train=False, seed=0)
    assert val.num_examples == 4 and val.class_names == ("a", "b")
    assert data.build_dataset(cfg, "train", train=True, seed=0).train_batch(0, 4)["image"].shape \
        == (4, 16, 16, 3)


def test_folder_source_on_cifar_jpegs_matches_embedded(shared_dir, tmp_path):
    archive = shared_dir / "data" / "cifar10-train-jpeg.tar.gz"
    wanted = {f"train/{c}/{i:04d}.jpg" for c in CIFAR10[:2] for i in range(20)}
    with tarfile.open(archive) as tar:
        members = [m for m in tar if m.name.lstrip("./") in wanted]
        tar.extractall(tmp_path, members=members, filter="data")
    assert len(members) == 40
    cfg = config(source="folder", path=str(tmp_path), val_fraction=0.25)   # root has train/ only
    ds = data.build_dataset(cfg, "train", train=False, seed=0)
    assert ds.class_names == CIFAR10[:2] and ds.num_examples == 30
    assert data.build_dataset(cfg, "validation", train=False, seed=0).num_examples == 10
    images, labels = ds.source.get(np.arange(30))
    # Same JPEG bytes as the embedded subset's first images of each class -> same pixels.
    embedded = data.embedded_source("train")
    expect, expect_labels = embedded.get(np.r_[0:15, 1000:1015])
    np.testing.assert_array_equal(np.stack(images), expect)
    np.testing.assert_array_equal(labels, expect_labels)
    # 32x32 folder images at image_size 32: eval leaves the pixels alone.
    batch = next(iter(ds.eval_batches(30)))
    np.testing.assert_allclose(batch["image"] * ds.transform.std + ds.transform.mean,
                               expect / 255, atol=1e-5)


def _jpeg_folder(root, classes, n, bad_per_class=0, size=(24, 20)):
    """n JPEGs of noise per class (named 000.jpg ...) plus `bad_per_class` random-byte .jpg."""
    rng = np.random.default_rng(1)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:03d}.jpg", quality=90)
        for i in range(bad_per_class):
            (root / c / f"random{i}.jpg").write_bytes(rng.bytes(5000))


def test_folder_skips_undecodable_files_with_one_warning(tmp_path, caplog):
    root = tmp_path / "photos"
    _jpeg_folder(root, ["cat", "dog"], 10, bad_per_class=1)
    good = (root / "cat" / "000.jpg").read_bytes()
    (root / "dog" / "005_cut.jpg").write_bytes(good[:len(good) // 2])      # truncated
    (root / "dog" / "empty.png").write_bytes(b"")
    cfg = config(source="folder", path=str(root), image_size=16, val_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="scaling.data"):
        train = data.build_dataset(cfg, "train", train=True, seed=0)
        val = data.build_dataset(cfg, "validation", train=False, seed=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings          # one warning for the folder, not one per split
    assert "skipping 4 of 24 files" in warnings[0]
    assert ("cat/random0.jpg (UnidentifiedImageError: cannot identify image file); "
            "dog/005_cut.jpg (OSError: ") in warnings[0]
    assert "and 1 more" in warnings[0]
    # The bad files go before the cut: each class keeps 8 train + 2 validation readable images.
    names = lambda ds: [os.path.relpath(p, root) for p in ds.source.paths]   # noqa: E731
    assert names(train) == [f"{c}/{i:03d}.jpg" for c in ("cat", "dog") for i in range(8)]
    assert names(val) == [f"{c}/{i:03d}.jpg" for c in ("cat", "dog") for i in (8, 9)]
    assert train.source.labels().tolist() == [0] * 8 + [1] * 8
    # Every batch decodes: an epoch of training and the whole eval split.
    for step in range(4):
        assert np.isfinite(train.train_batch(step, 4)["image"]).all()
    assert sum(b["mask"].sum() for b in val.eval_batches(3)) == 4
    # Reopening is free and silent and gives the same batches; a repaired file is checked
    # again and comes back.
    caplog.clear()
    again = data.build_dataset(cfg, "train", train=True, seed=0)
    assert not caplog.records
    assert_batches_equal(again.train_batch(3, 4), train.train_batch(3, 4))
    (root / "dog" / "005_cut.jpg").write_bytes(good)
    assert len(data.build_source(cfg, "validation")) == 4   # 11 readable dog files: 9 + 2
    assert "dog/005_cut.jpg" not in names(data.build_dataset(cfg, "validation", train=False, seed=0))


def test_folder_of_good_and_random_byte_jpegs_trains(tmp_path):
    """30 good JPEGs and 3 random-byte .jpg files per class: trains on the good ones."""
    _jpeg_folder(tmp_path, ["a", "b"], 30, bad_per_class=3)
    cfg = config(source="folder", path=str(tmp_path), image_size=16)
    train = data.build_dataset(cfg, "train", train=True, seed=0)
    val = data.build_dataset(cfg, "validation", train=False, seed=0)
    assert (len(train), len(val)) == (54, 6)
    assert not any("random" in os.path.basename(p) for p in train.source.paths + val.source.paths)
    batches = [train.train_batch(step, 18) for step in range(3)]           # one epoch
    assert sorted(np.concatenate([train.indices(s, 18) for s in range(3)])) == list(range(54))
    assert all(b["image"].shape == (18, 16, 16, 3) for b in batches)


def test_folder_of_only_undecodable_files_is_refused(tmp_path):
    _jpeg_folder(tmp_path, ["a", "b"], 0, bad_per_class=2)
    with pytest.raises(ValueError, match=r"data.path=.*none of its 4 files can be decoded: "
                                         r"a/random0.jpg \(UnidentifiedImageError"):
        data.build_source(config(source="folder", path=str(tmp_path)), "train")


@pytest.mark.parametrize("files, message", [
    ((), r" has no class folders \(it has no sub-folders\)"),
    (("x.jpg",), r" has no class folders \(its 1 files must go into one sub-folder per class\)"),
    (("roses/a.jpg",), r" has one class folder \('roses'\), but classification needs at least 2"),
    (("train/roses/a.jpg", "val/roses/b.jpg"), r": train/ has one class folder \('roses'\)"),
    (("a/notes.txt", "b/x.csv"), r": split 'train' has no images"),
])
def test_folder_layout_errors_name_data_path(tmp_path, files, message):
    for name in files:
        os.makedirs((tmp_path / name).parent, exist_ok=True)
        if name.endswith(".jpg"):
            Image.new("RGB", (4, 4)).save(tmp_path / name)
        else:
            (tmp_path / name).write_text("not an image")
    with pytest.raises(ValueError, match=rf"^data.path={re.escape(repr(str(tmp_path)))}{message}"):
        data.build_source(config(source="folder", path=str(tmp_path)), "train")


def test_folder_path_missing_unset_or_a_file(tmp_path):
    with pytest.raises(ValueError, match=r"^data.path is not set.*--config.data.path="):
        data.build_source(config(source="folder"), "train")
    with pytest.raises(ValueError, match=r"^data.path='/nonexistent/photos' does not exist"):
        data.build_source(config(source="folder", path="/nonexistent/photos"), "train")
    (tmp_path / "file.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data.path='.*file.jpg' is a file, not a directory"):
        data.validate_data_config(config(source="folder", path=str(tmp_path / "file.jpg")))


def test_folder_path_expands_home(tmp_path, monkeypatch):
    _jpeg_folder(tmp_path / "photos", ["a", "b"], 2)
    monkeypatch.setenv("HOME", str(tmp_path))
    source = data.build_source(config(source="folder", path="~/photos", val_fraction=0.0), "train")
    assert len(source) == 4 and source.paths[0].startswith(str(tmp_path))


# ----------------------------------------------------------------------------- image modes
def _encoded(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written byte by byte (PIL writes 16-bit grayscale only)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _over_white(rgb, alpha):
    rgb, alpha = np.asarray(rgb, float), np.asarray(alpha, float)[..., None] / 255
    return rgb * alpha + 255 * (1 - alpha)


def _decoded(encoded: bytes) -> np.ndarray:
    out = data.decode_image(encoded)
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    # The check that runs when a folder is opened reads every kind too.
    data.sources.read_image(io.BytesIO(encoded), reduced=True)
    return out.astype(int)


def test_grayscale_bilevel_and_palette_images_become_rgb():
    gray = np.array([[0, 17, 128, 255]], np.uint8)
    np.testing.assert_array_equal(_decoded(_encoded(Image.fromarray(gray), "PNG")),
                                  np.repeat(gray[..., None], 3, -1))
    bits = Image.fromarray(np.array([[0, 255, 255, 0]], np.uint8)).convert("1")
    np.testing.assert_array_equal(_decoded(_encoded(bits, "PNG"))[0, :, 0], [0, 255, 255, 0])
    palette = Image.fromarray(np.array([[0, 1, 2, 1]], np.uint8), "P")
    palette.putpalette([200, 10, 20, 5, 150, 60, 0, 0, 255] + [0] * 759)
    expected = [[200, 10, 20], [5, 150, 60], [0, 0, 255], [5, 150, 60]]
    np.testing.assert_array_equal(_decoded(_encoded(palette, "PNG"))[0], expected)
    np.testing.assert_array_equal(_decoded(_encoded(palette, "GIF"))[0], expected)
    # A transparent palette entry shows the white background.
    np.testing.assert_array_equal(_decoded(_encoded(palette, "PNG", transparency=1))[0],
                                  [[200, 10, 20], [255] * 3, [0, 0, 255], [255] * 3])


def test_alpha_images_are_composited_over_white():
    rgb = np.array([[[200, 100, 0], [10, 20, 30], [90, 180, 250], [0, 0, 0]]], np.uint8)
    alpha = np.array([[255, 0, 128, 64]], np.uint8)
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    np.testing.assert_allclose(_decoded(_encoded(rgba, "PNG")), _over_white(rgb, alpha), atol=1)
    np.testing.assert_allclose(_decoded(_encoded(rgba, "WEBP", lossless=True)),
                               _over_white(rgb, alpha), atol=1)
    gray = rgb[..., 1]
    la = Image.fromarray(np.dstack([gray, alpha]), "LA")
    np.testing.assert_allclose(_decoded(_encoded(la, "PNG")),
                               _over_white(np.repeat(gray[..., None], 3, -1), alpha), atol=1)
    # Fully opaque RGBA keeps its pixels exactly.
    opaque = Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255)]), "RGBA")
    np.testing.assert_array_equal(_decoded(_encoded(opaque, "PNG")), rgb)


def test_cmyk_images_become_rgb():
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255], [100, 50, 25, 60]]], np.uint8)
    c, m, y, k = np.moveaxis(cmyk.astype(float), -1, 0)
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)],
                        -1) / 255                                   # [[white, cyan, black, ...]]
    image = Image.fromarray(cmyk, "CMYK")
    np.testing.assert_allclose(_decoded(_encoded(image, "TIFF")), expected, atol=1)
    # CMYK JPEG (stored with Adobe's inverted convention): flat 16x16 blocks survive it.
    blocks = Image.fromarray(np.kron(cmyk[0][None], np.ones((16, 16, 1), np.uint8)), "CMYK")
    decoded = _decoded(_encoded(blocks, "JPEG", quality=95))
    np.testing.assert_allclose(decoded[8, 8::16], expected[0], atol=4)


def test_sixteen_bit_pngs_keep_their_high_byte():
    values = np.array([[0, 255, 256, 257 * 100, 40000, 65535]], np.uint16)
    high = (values >> 8).astype(int)                               # [0, 0, 1, 100, 156, 255]
    gray16 = _encoded(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(gray16)).mode.startswith("I")   # really a 16-bit PNG
    np.testing.assert_array_equal(_decoded(gray16), np.repeat(high[..., None], 3, -1))
    rgb16 = np.stack([values, values[:, ::-1], np.full_like(values, 0x8000)], -1)
    np.testing.assert_array_equal(_decoded(_png16_rgb(rgb16)), rgb16 >> 8)


# ----------------------------------------------------------------------------- tfds
def test_tfds_source_with_mock_data():
    from scaling.data.tfds_source import import_tfds

    tfds = import_tfds()
    with tfds.testing.mock_data(num_examples=40):
        cfg = config(source="tfds", name="cifar10", data_dir="/nonexistent/tfds", download=True)
        ds = data.build_dataset(cfg, "train", train=True, seed=0)
        assert (ds.num_examples, ds.num_classes, ds.source.image_size) == (40, 10, 32)
        batch = ds.train_batch(2, 16)
        assert batch["image"].shape == (16, 32, 32, 3) and batch["label"].max() < 10
        assert_batches_equal(batch, ds.train_batch(2, 16))
        val = data.build_dataset(cfg, "test", train=False, seed=0)
        assert [b["mask"].sum() for b in val.eval_batches(16)] == [16, 16, 8]
        # Variable-size photos, class subset.
        cfg = config(source="tfds", name="tf_flowers", image_size=48, crop="random_resized",
                     classes=(4, 0))
        flowers = data.build_dataset(cfg, "train", train=True, seed=0)
        assert flowers.class_names == ("roses", "dandelion") and flowers.source.image_size is None
        assert set(flowers.source.labels().tolist()) <= {0, 1}
        assert flowers.train_batch(0, 4)["image"].shape == (4, 48, 48, 3)
        with pytest.raises(ValueError, match="data.name='cifar_10'.*cifar10"):
            data.validate_data_config(config(source="tfds", name="cifar_10"))


def test_tfds_unprepared_dataset_says_how_to_prepare(tmp_path, monkeypatch):
    from scaling.data.tfds_source import TfdsSource, import_tfds

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(import_tfds().core.DatasetBuilder, "download_and_prepare", no_network)
    cfg = config(source="tfds", name="cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"^data.name='cifar10' is not prepared in "
                                         rf"data.data_dir={tmp_path}: .*data.download=True"):
        data.build_dataset(cfg, "train", train=True, seed=0)
    assert not os.listdir(tmp_path)                        # nothing written into data_dir
    with pytest.raises(ValueError, match=r"^data.name='cifar_10' is not a TFDS dataset: "
                                         r"did you mean cifar10"):
        TfdsSource("cifar_10", "train", str(tmp_path))


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("overrides, message", [
    (dict(source="hdf5"), r"data.source='hdf5'.*embedded, tfds, folder"),
    (dict(crop="center"), r"data.crop='center'.*pad_crop, random_resized, none"),
    (dict(image_size=0), r"data.image_size=0"),
    (dict(source="folder"), r"data.path is not set.*--config.data.path="),
    (dict(classes=(1, 1)), r"data.classes"),
    (dict(name="cifar100"), r"data.name='cifar100'.*data.source='tfds'"),
    (dict(crop_fraction=1.5), r"data.crop_fraction"),
    (dict(loader="processes"), r"data.loader='processes'.*auto, grain, threads"),
    (dict(workers=-1), r"data.workers=-1.*grain: worker processes"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        data.validate_data_config(config(**overrides))


# ----------------------------------------------------------------------------- subsets
def test_classes_and_examples_per_class_relabel(train_ds):
    ds = data.build_dataset(config(classes=(3, 1), examples_per_class=7), "train", train=False,
                            seed=0)
    assert ds.num_examples == 14 and ds.num_classes == 2
    assert ds.class_names == ("cat", "automobile")
    images, labels = ds.source.get(np.arange(14))
    full = train_ds.source
    # Source order is kept (automobile rows come before cat rows); labels follow `classes`.
    np.testing.assert_array_equal(labels, [1] * 7 + [0] * 7)
    np.testing.assert_array_equal(images, full.get(np.r_[1000:1007, 3000:3007])[0])
    with pytest.raises(ValueError, match="data.classes.*10"):
        data.build_dataset(config(classes=(12,)), "train", train=False, seed=0)


# ----------------------------------------------------------------------------- prefetch
def test_prefetch_matches_direct_calls_and_resumes(train_ds):
    with data.prefetch(train_ds, 0, 6, 32) as it:
        steps = list(it)
    assert [s for s, _ in steps] == list(range(6))
    for step, batch in steps:
        assert_batches_equal(batch, train_ds.train_batch(step, 32))
    resumed = list(data.prefetch(train_ds, 3, 6, 32, process_index=1, process_count=2))
    for (step, batch), (_, whole) in zip(resumed, steps[3:]):
        assert_batches_equal(batch, {k: v[16:] for k, v in whole.items()})


class _FailingSource(ArraySource):
    def __init__(self, fail_on_call):
        super().__init__(np.zeros((64, 8, 8, 3), np.uint8), np.arange(64) % 4, "abcd")
        self.calls, self.fail_on_call = 0, fail_on_call

    def get(self, indices):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise OSError("disk went away")
        return super().get(indices)


def test_prefetch_reraises_worker_errors_and_stops():
    source = _FailingSource(fail_on_call=3)
    ds = data.Dataset(source, augment.Transform(image_size=8, pad=2), split="train", train=True,
                      seed=0)
    it = data.prefetch(ds, 0, 10, 8)
    assert [next(it)[0], next(it)[0]] == [0, 1]
    with pytest.raises(OSError, match="disk went away"):
        next(it)
    assert not it._thread.is_alive()
    # Closing early stops the background thread too.
    it = data.prefetch(data.Dataset(ArraySource(source.images, source.labels(), "abcd"),
                                    augment.Transform(image_size=8), split="train", train=True,
                                    seed=0), 0, None, 8, depth=2)
    next(it)
    it.close()
    assert not it._thread.is_alive()
    with pytest.raises(StopIteration):
        next(it)


# ----------------------------------------------------------------------------- grain loader
def test_auto_loader_follows_the_measured_choice_per_source():
    for source in ("embedded", "folder", "tfds"):   # grain was not faster on 2 cores
        assert data.resolve_loader(config(source=source)) == "threads"
    assert data.resolve_loader(config(source="folder", loader="grain")) == "grain"
    assert data.resolve_loader(config(loader="threads")) == "threads"


def test_grain_batches_equal_the_threads_loaders_for_any_worker_count(train_ds):
    """The batch is the same function of (seed, step) on both loaders: bitwise equal batches
    for 0 (in-process), 1 and 2 worker processes, from any start step, on any host."""
    want = dict(data.prefetch(train_ds, 3, 7, 32, process_index=1, process_count=2))
    grain_ds = data.Dataset(train_ds.source, train_ds.transform, split="train", train=True,
                            seed=0, loader="grain")
    for workers in (0, 1, 2):
        grain_ds.workers = workers
        with data.prefetch(grain_ds, 3, 7, 32, process_index=1, process_count=2) as it:
            got = list(it)
        assert [s for s, _ in got] == [3, 4, 5, 6], workers
        for step, batch in got:
            assert_batches_equal(batch, want[step])
    # a loader without an end resumes at any step
    with data.prefetch(grain_ds, 5, None, 32, process_index=1, process_count=2) as it:
        step, batch = next(it)
    assert step == 5
    assert_batches_equal(batch, want[5])


def test_grain_eval_batches_equal_the_threads_loaders(tmp_path):
    """A JPEG folder (decoded in the worker processes), eval padded and masked."""
    _jpeg_folder(tmp_path, ["a", "b", "c"], 7, size=(30, 24))
    cfg = config(source="folder", path=str(tmp_path), val_fraction=0.0, image_size=16,
                 crop="random_resized", loader="threads")
    threads = data.build_dataset(cfg, "train", train=False, seed=0)
    cfg.update(loader="grain", workers=2)
    grain_ds = data.build_dataset(cfg, "train", train=False, seed=0)
    assert (threads.loader, grain_ds.loader) == ("threads", "grain")
    want, got = list(threads.eval_batches(8)), list(grain_ds.eval_batches(8))
    assert [b["mask"].sum() for b in got] == [8, 8, 5]
    for a, b in zip(want, got):
        assert_batches_equal(a, b)
    train = data.build_dataset(cfg, "train", train=True, seed=4)
    with data.prefetch(train, 0, 3, 8) as it:
        for step, batch in it:
            assert_batches_equal(batch, train.train_batch(step, 8))


def test_grain_reraises_worker_errors_and_stops():
    ds = data.Dataset(_FailingSource(fail_on_call=1), augment.Transform(image_size=8, pad=2),
                      split="train", train=True, seed=0, workers=1, loader="grain")
    it = data.prefetch(ds, 0, 10, 8)
    with pytest.raises(OSError, match="disk went away"):
        next(it)
    with pytest.raises(StopIteration):
        next(it)


def test_loader_position_is_the_step_and_what_makes_its_batch(train_ds):
    assert data.loader_position(train_ds, 12, 32) == {
        "next_step": 12, "seed": 0, "global_batch": 32, "num_examples": 10_000}
