"""Builds the embedded offline dataset `scaling/data/embedded/cifar10_subset.npz`.

Input: a class-per-folder CIFAR-10 JPEG archive (train/<class>/NNNN.jpg, 5,000 per class),
e.g. ../shared/data/cifar10-train-jpeg.tar.gz. Output: one .npz holding the original JPEG
bytes (not re-encoded), concatenated, with offsets, labels, split ids and names, in a deflate-
compressed .npz (the per-file JPEG headers repeat, so 10.5 MiB of JPEGs store in ~3.5 MiB):

    jpeg         uint8  [total_bytes]   all files back to back
    offsets      int64  [N + 1]         image i is jpeg[offsets[i]:offsets[i + 1]]
    labels       int32  [N]
    split        int8   [N]             index into split_names
    split_names  str    ['train', 'validation']
    class_names  str    [10]
    file_names   str    [N]             'airplane/0000.jpg', ... (provenance)

Split 'train' is the first `--train-per-class` images of each class (file order),
'validation' the last `--val-per-class` (4800-4999 with the defaults), so the two never
overlap. Usage:

    python tools/make_embedded_dataset.py --archive ../shared/data/cifar10-train-jpeg.tar.gz
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pathlib
import re
import tarfile

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-train-jpeg.tar.gz"
DEFAULT_OUT = ROOT / "scaling" / "data" / "embedded" / "cifar10_subset.npz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
SPLIT_NAMES = ("train", "validation")
MAX_BYTES = 10 * 2**20
_MEMBER = re.compile(r"^(?:\./)?train/([^/]+)/(\d+)\.jpg$")


def read_archive(archive: pathlib.Path) -> dict[str, dict[int, bytes]]:
    """{class: {file number: jpeg bytes}} for every train/<class>/NNNN.jpg member."""
    files: dict[str, dict[int, bytes]] = collections.defaultdict(dict)
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:
            match = _MEMBER.match(member.name)
            if member.isfile() and match:
                files[match.group(1)][int(match.group(2))] = tar.extractfile(member).read()
    return files


def build(files: dict[str, dict[int, bytes]], train_per_class: int, val_per_class: int) -> dict:
    missing = sorted(set(CIFAR10_CLASSES) - set(files))
    if missing:
        raise ValueError(f"archive lacks class folders {missing}")
    chunks, labels, split, names = [], [], [], []
    for split_id in range(len(SPLIT_NAMES)):
        for label, cls in enumerate(CIFAR10_CLASSES):
            numbers = sorted(files[cls])
            if len(numbers) < train_per_class + val_per_class:
                raise ValueError(f"class {cls} has {len(numbers)} images, need "
                                 f"{train_per_class + val_per_class}")
            chosen = numbers[:train_per_class] if split_id == 0 else numbers[-val_per_class:]
            for number in chosen:
                data = files[cls][number]
                with Image.open(io.BytesIO(data)) as img:
                    if img.format != "JPEG" or img.size != (32, 32):
                        raise ValueError(f"{cls}/{number:04d}.jpg is {img.format} {img.size}")
                chunks.append(np.frombuffer(data, np.uint8))
                labels.append(label)
                split.append(split_id)
                names.append(f"{cls}/{number:04d}.jpg")
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    return dict(jpeg=np.concatenate(chunks), offsets=offsets,
                labels=np.asarray(labels, np.int32), split=np.asarray(split, np.int8),
                split_names=np.asarray(SPLIT_NAMES), class_names=np.asarray(CIFAR10_CLASSES),
                file_names=np.asarray(names))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=pathlib.Path, default=DEFAULT_ARCHIVE)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--val-per-class", type=int, default=200)
    args = parser.parse_args(argv)
    arrays = build(read_archive(args.archive), args.train_per_class, args.val_per_class)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    size = os.path.getsize(args.out)
    counts = {name: int((arrays["split"] == i).sum()) for i, name in enumerate(SPLIT_NAMES)}
    print(f"wrote {args.out}: {size / 2**20:.2f} MiB, {counts}")
    if size > MAX_BYTES:
        raise SystemExit(f"{args.out} is larger than {MAX_BYTES / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
