"""Random-access image sources: the embedded CIFAR-10 subset, image folders, class subsets.

A source maps an example index to a decoded uint8 RGB image and an int label.
Everything above it (order, augmentation, sharding over hosts) only needs `Source`.
The TFDS source lives in `tfds_source.py` so that TensorFlow is imported only when used.
"""
from __future__ import annotations

import functools
import io
import os
import pathlib
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

EMBEDDED_FILE = pathlib.Path(__file__).resolve().parent / "embedded" / "cifar10_subset.npz"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# Folder split names -> directory names tried in order (train/ + val|validation|test/ layout).
_SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val", "test"),
               "val": ("val", "validation", "test"), "test": ("test",)}


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


def decode_image(data: bytes) -> np.ndarray:
    """Any PIL-readable encoded image -> uint8 [H, W, 3] RGB."""
    with Image.open(io.BytesIO(data)) as img:
        return _to_rgb_array(img)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)


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


def _list_images(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path)
                  if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


class FolderSource:
    """A class-per-folder directory of images: `root/<class>/*.jpg` (Flowers Recognition layout).

    If `root` holds `train/` and one of `val/`, `validation/`, `test/`, those are the splits
    ('validation' and 'val' fall back to `test/`). Otherwise split 'train' is the first
    (1 - val_fraction) of each class's files in name order and 'validation' (or 'val',
    'test') the rest. Classes are the sorted sub-directory names of the training folder.
    """
    image_size = None

    def __init__(self, root: str, split: str, val_fraction: float = 0.1):
        from scaling.data.config import check_folder_path

        check_folder_path(root)
        if split not in _SPLIT_DIRS:
            raise ValueError(f"folder split {split!r} is not supported: use one of "
                             f"{', '.join(_SPLIT_DIRS)} (data.train_split / data.eval_split)")
        subdirs = set(_list_dirs(root))
        eval_dirs = [d for d in ("val", "validation", "test") if d in subdirs]
        if "train" in subdirs and eval_dirs:
            self.class_names = tuple(_list_dirs(os.path.join(root, "train")))
            found = [d for d in _SPLIT_DIRS[split] if d in subdirs]
            if not found:
                raise ValueError(f"data.path={root!r} has no directory for split {split!r} "
                                 f"(looked for {', '.join(_SPLIT_DIRS[split])}/)")
            files = self._scan(os.path.join(root, found[0]), root)
        else:
            base = os.path.join(root, "train") if subdirs == {"train"} else root
            self.class_names = tuple(_list_dirs(base))
            files = self._scan(base, root)
            files = {c: self._fraction(f, val_fraction, split == "train") for c, f in files.items()}
        self.num_classes = len(self.class_names)
        self.paths = [p for c in self.class_names for p in files.get(c, [])]
        self._labels = np.concatenate(
            [np.full(len(files.get(c, [])), i, np.int32) for i, c in enumerate(self.class_names)])
        if not self.paths:
            raise ValueError(f"data.path={root!r}: split {split!r} has no images "
                             f"(extensions {', '.join(IMAGE_EXTENSIONS)}; data.val_fraction="
                             f"{val_fraction})")

    def _scan(self, base: str, root: str) -> dict[str, list[str]]:
        if not self.class_names:
            raise ValueError(f"data.path={root!r}: no class folders in {base} "
                             "(expected <path>/<class>/*.jpg)")
        unknown = sorted(set(_list_dirs(base)) - set(self.class_names))
        if unknown:
            raise ValueError(f"data.path={root!r}: classes {unknown} in {base} are not in the "
                             f"training folder's classes {list(self.class_names)}")
        return {c: [os.path.join(base, c, f) for f in _list_images(os.path.join(base, c))]
                for c in _list_dirs(base)}

    @staticmethod
    def _fraction(files: list[str], val_fraction: float, train: bool) -> list[str]:
        cut = len(files) - int(round(len(files) * val_fraction))
        return files[:cut] if train else files[cut:]

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, indices):
        indices = np.asarray(indices, np.int64)
        images = []
        for i in indices:
            with Image.open(self.paths[i]) as img:
                images.append(_to_rgb_array(img))
        return images, self._labels[indices]

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
