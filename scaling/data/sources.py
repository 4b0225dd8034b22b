"""Random-access image sources: the embedded CIFAR-10 subset, image folders, class subsets.

A source maps an example index to a decoded uint8 RGB image and an int label.
Everything above it (order, augmentation, sharding over hosts) only needs `Source`.
The TFDS source lives in `tfds_source.py` so that TensorFlow is imported only when used.
"""
from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import logging
import os
import pathlib
import time
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

EMBEDDED_FILE = pathlib.Path(__file__).resolve().parent / "embedded" / "cifar10_subset.npz"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# Folder split names -> directory names tried in order (train/ + val|validation|test/ layout).
_SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val", "test"),
               "val": ("val", "validation", "test"), "test": ("test",)}

log = logging.getLogger(__name__)


@runtime_checkable
class Source(Protocol):
    """Random access to (image, label) examples.

    `image_size` is the side of every image when the dataset has one fixed square size
    (32 for CIFAR), else None (photos of any size).
    """
    num_classes: int
    class_names: tuple[str, ...]
    image_size: int | None

    def __len__(self) -> int: ...

    def get(self, indices: np.ndarray) -> tuple[Sequence[np.ndarray] | np.ndarray, np.ndarray]:
        """uint8 RGB images (an [n,H,W,3] array or a list of [H,W,3]) and int32 labels.
        Returned arrays belong to the caller (augmentation may modify them in place)."""

    def labels(self) -> np.ndarray:
        """All labels, int32 [len]; used by the class / examples-per-class filters."""


# What PIL raises on a file it cannot decode: an unknown format (UnidentifiedImageError is an
# OSError), truncated data (OSError), malformed headers (SyntaxError, ValueError, EOFError), a
# conversion PIL lacks (ValueError), an image far above Image.MAX_IMAGE_PIXELS.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_WHITE = (255, 255, 255, 255)


def decode_image(data: bytes) -> np.ndarray:
    """Any PIL-readable encoded image -> uint8 [H, W, 3] RGB (see `to_rgb`)."""
    return read_image(io.BytesIO(data))


def read_image(file, *, reduced: bool = False) -> np.ndarray:
    """An image file (path or file object) -> uint8 [H, W, 3] RGB (see `to_rgb`).

    reduced: JPEGs are decoded at 1/8 scale (a photo costs under half the CPU time); libjpeg
    still reads every byte of the file, so truncated or unreadable files fail as in a full
    decode.
    """
    with Image.open(file) as img:
        if reduced:
            img.draft(img.mode, (1, 1))
        return to_rgb(img)


def to_rgb(img: Image.Image) -> np.ndarray:
    """A PIL image of any mode -> uint8 [H, W, 3] RGB.

    Grayscale is repeated over the three channels; palette, CMYK and YCbCr images go through
    PIL's conversions. 16-bit grayscale (PNG modes I;16*) keeps its high byte, as PIL reads
    16-bit RGB PNGs, where PIL's own conversion would clip every value above 255 to white.
    Images with transparency (RGBA, LA, PA, a palette or PNG with a transparent colour) are
    composited over white, as a viewer shows them, instead of exposing whatever colours hide
    under the transparent pixels.
    """
    if img.mode == "RGB":
        return np.asarray(img)
    if img.mode in _SIXTEEN_BIT:
        gray = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    return np.asarray(img.convert("RGB"))


class ArraySource:
    """Decoded images held in memory as one uint8 [N, H, W, 3] array."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {images.shape}")
        self.images = images
        self._labels = np.asarray(labels, np.int32)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        height, width = images.shape[1:3]
        self.image_size = height if height == width else None

    def __len__(self) -> int:
        return len(self.images)

    def get(self, indices):
        indices = np.asarray(indices, np.int64)
        return self.images[indices], self._labels[indices]

    def labels(self) -> np.ndarray:
        return self._labels


@functools.lru_cache(maxsize=None)
def _embedded_split(split: str) -> ArraySource:
    with np.load(EMBEDDED_FILE) as z:
        split_names = [str(s) for s in z["split_names"]]
        if split not in split_names:
            raise ValueError(f"split {split!r} is not in the embedded dataset: allowed "
                             f"{', '.join(split_names)} (data.train_split / data.eval_split)")
        rows = np.flatnonzero(z["split"] == split_names.index(split))
        offsets, blob = z["offsets"], z["jpeg"].tobytes()
        images = np.stack([decode_image(blob[offsets[i]:offsets[i + 1]]) for i in rows])
        return ArraySource(images, z["labels"][rows], [str(c) for c in z["class_names"]])


def embedded_source(split: str) -> ArraySource:
    """CIFAR-10 subset shipped in the package ('train': 10,000, 'validation': 2,000 images).

    The JPEGs are decoded once per process and split (about 1 s for 'train').
    """
    return _embedded_split(split)


def _list_dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _list_images(path: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    return sorted(e.name for e in os.scandir(path)
                  if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions)


_CHECKED: dict[tuple, dict[str, str]] = {}  # (check, digest of paths/sizes/mtimes) -> unreadable
_NAMED = 3  # unreadable files named in the warning


def _error(check: Callable[[str], object], path: str) -> str | None:
    """Why `check` cannot read `path` (the exception, without the path), or None."""
    try:
        check(path)
    except DECODE_ERRORS as e:
        return f"{type(e).__name__}: {str(e).replace(repr(path), '').strip()}"
    return None


def _unreadable(paths: Sequence[str], check: Callable[[str], object]) -> tuple[dict[str, str], bool]:
    """({path: error} of the files in `paths` that `check` cannot read, whether they were
    checked by this call). Files are checked on all cores; the answer is kept for the process,
    keyed by every file's path, size and modification time, so reopening a source (the launch
    checks, then training) costs one `os.stat` per file."""
    digest = hashlib.sha1()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    key = (check, digest.hexdigest())
    if key in _CHECKED:
        return _CHECKED[key], False
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with concurrent.futures.ThreadPoolExecutor(max(threads or 1, 1)) as pool:
        errors = list(pool.map(functools.partial(_error, check), paths, chunksize=16))
    _CHECKED[key] = {p: e for p, e in zip(paths, errors) if e is not None}
    return _CHECKED[key], True


class FolderSource:
    """A class-per-folder directory of images: `root/<class>/*.jpg` (Flowers Recognition layout).

    If `root` holds `train/` and one of `val/`, `validation/`, `test/`, those are the splits
    ('validation' and 'val' fall back to `test/`). Otherwise split 'train' is the first
    (1 - val_fraction) of each class's files in name order and 'validation' (or 'val',
    'test') the rest. Classes are the sorted sub-directory names of the training folder;
    there must be at least two.

    Every file is decoded once when the source is opened (JPEGs at 1/8 scale, which still
    reads the whole file: 1.4 CPU-ms per 500x375 photo, under half a full decode), and files
    that cannot be decoded (not an image, truncated) are left out, before the train/validation
    cut, with one warning that counts them and names the first few: a bad file never stops a
    run midway, and batches stay a pure function of (seed, step). Subclasses reading other
    files set `extensions` and override `get` and `check`.
    """
    image_size = None
    extensions = IMAGE_EXTENSIONS   # the files it lists; audio.WavFolderSource reads '.wav'

    def __init__(self, root: str, split: str, val_fraction: float = 0.1):
        from scaling.data.config import check_folder_path

        root = check_folder_path(root)
        if split not in _SPLIT_DIRS:
            raise ValueError(f"folder split {split!r} is not supported: use one of "
                             f"{', '.join(_SPLIT_DIRS)} (data.train_split / data.eval_split)")
        subdirs = set(_list_dirs(root))
        eval_dirs = [d for d in ("val", "validation", "test") if d in subdirs]
        if "train" in subdirs and eval_dirs:
            self.class_names = self._classes(os.path.join(root, "train"), root)
            found = [d for d in _SPLIT_DIRS[split] if d in subdirs]
            if not found:
                raise ValueError(f"data.path={root!r} has no directory for split {split!r} "
                                 f"(looked for {', '.join(_SPLIT_DIRS[split])}/)")
            files = self._readable(self._scan(os.path.join(root, found[0]), root), root)
        else:
            base = os.path.join(root, "train") if subdirs == {"train"} else root
            self.class_names = self._classes(base, root)
            files = self._readable(self._scan(base, root), root)
            files = {c: self._fraction(f, val_fraction, split == "train") for c, f in files.items()}
        self.num_classes = len(self.class_names)
        self.paths = [p for c in self.class_names for p in files.get(c, [])]
        self._labels = np.concatenate(
            [np.full(len(files.get(c, [])), i, np.int32) for i, c in enumerate(self.class_names)])
        if not self.paths:
            raise ValueError(f"data.path={root!r}: split {split!r} has no images "
                             f"(extensions {', '.join(self.extensions)}; data.val_fraction="
                             f"{val_fraction})")

    def _classes(self, base: str, root: str) -> tuple[str, ...]:
        """The class folders of `base` (`root` or its train/), at least two."""
        names = tuple(_list_dirs(base))
        where = f"data.path={root!r}" + ("" if base == root else f": {os.path.relpath(base, root)}/")
        if not names:
            loose = len(_list_images(base, self.extensions))
            what = (f"its {loose} files must go into one sub-folder per class" if loose
                    else "it has no sub-folders")
            raise ValueError(f"{where} has no class folders ({what}); lay it out as "
                             "<path>/<class>/*.jpg")
        if len(names) < 2:
            raise ValueError(f"{where} has one class folder ({names[0]!r}), but classification "
                             "needs at least 2: add a sub-folder per class, <path>/<class>/*.jpg")
        return names

    def _scan(self, base: str, root: str) -> dict[str, list[str]]:
        unknown = sorted(set(_list_dirs(base)) - set(self.class_names))
        if unknown:
            raise ValueError(f"data.path={root!r}: classes {unknown} in {base} are not in the "
                             f"training folder's classes {list(self.class_names)}")
        return {c: [os.path.join(base, c, f)
                    for f in _list_images(os.path.join(base, c), self.extensions)]
                for c in _list_dirs(base)}

    def _readable(self, files: dict[str, list[str]], root: str) -> dict[str, list[str]]:
        """`files` without those `check` cannot read, with one warning per process naming the
        first few; an error when no file is readable."""
        paths = [p for fs in files.values() for p in fs]
        t0 = time.perf_counter()
        bad, fresh = _unreadable(paths, type(self).check)
        seconds = time.perf_counter() - t0
        if fresh and seconds >= 1:
            log.info("data.path=%r: checked %d files in %.1f s", root, len(paths), seconds)
        if not bad:
            return files
        named = "; ".join(f"{os.path.relpath(p, root)} ({e})" for p, e in list(bad.items())[:_NAMED])
        more = f"; and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
        if len(bad) == len(paths):
            raise ValueError(f"data.path={root!r}: none of its {len(paths)} files can be decoded: "
                             f"{named}{more}")
        if fresh:
            log.warning("data.path=%r: skipping %d of %d files that cannot be decoded: %s%s",
                        root, len(bad), len(paths), named, more)
        return {c: [p for p in fs if p not in bad] for c, fs in files.items()}

    @staticmethod
    def _fraction(files: list[str], val_fraction: float, train: bool) -> list[str]:
        cut = len(files) - int(round(len(files) * val_fraction))
        return files[:cut] if train else files[cut:]

    @staticmethod
    def check(path: str) -> None:
        """Raises one of DECODE_ERRORS when the file at `path` cannot be read. Images are decoded
        (JPEGs at 1/8 scale); other files pass (a subclass reading them overrides this)."""
        if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            read_image(path, reduced=True)

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, indices):
        indices = np.asarray(indices, np.int64)
        return [read_image(self.paths[i]) for i in indices], self._labels[indices]

    def labels(self) -> np.ndarray:
        return self._labels


class SubsetSource:
    """Keeps `classes` (relabelled 0..n-1 in the given order; () = all) and the first
    `examples_per_class` examples of each (0 = all), in the underlying source's order."""

    def __init__(self, source: Source, classes: Sequence[int] = (), examples_per_class: int = 0):
        classes = tuple(int(c) for c in classes) or tuple(range(source.num_classes))
        bad = [c for c in classes if not 0 <= c < source.num_classes]
        if bad:
            raise ValueError(f"data.classes has indices {bad} outside 0..{source.num_classes - 1} "
                             f"(the dataset has {source.num_classes} classes)")
        labels = source.labels()
        keep = [np.flatnonzero(labels == c)[:examples_per_class or None] for c in classes]
        index = np.concatenate(keep)
        order = np.argsort(index, kind="stable")
        relabel = np.concatenate([np.full(len(k), i, np.int32) for i, k in enumerate(keep)])
        self.index, self._labels = index[order], relabel[order]
        self.source = source
        self.class_names = tuple(source.class_names[c] for c in classes)
        self.num_classes = len(classes)
        self.image_size = source.image_size

    def __len__(self) -> int:
        return len(self.index)

    def get(self, indices):
        indices = np.asarray(indices, np.int64)
        images, _ = self.source.get(self.index[indices])
        return images, self._labels[indices]

    def labels(self) -> np.ndarray:
        return self._labels
