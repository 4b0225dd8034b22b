"""TFDS image-classification datasets through TFDS random-access data sources.

Datasets must be prepared in the array_record format (`builder.as_data_source`); images
are read as encoded bytes (`tfds.decode.SkipDecoding`) and decoded with PIL on the host,
the same path as the folder source. TensorFlow is imported only here, CPU-only.
"""
from __future__ import annotations

import logging

import numpy as np

from scaling.data.sources import decode_image


def import_tfds():
    """Imports tensorflow_datasets with TensorFlow hidden from every GPU (input runs on CPU)."""
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already initialised its devices; nothing to change then
        pass
    import tensorflow_datasets as tfds

    return tfds


def _is_prepared(builder) -> bool:
    """`builder.is_prepared()` without TFDS's warning for each missing version folder (the
    error that follows says what is missing)."""
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)
    try:
        return builder.is_prepared()
    finally:
        absl_log.setLevel(level)


def _prepare_hint(name: str, data_dir: str | None) -> str:
    where = f" --data_dir={data_dir}" if data_dir else ""
    return (f"set --config.data.download=True to download and prepare it, or run "
            f"`tfds build {name} --file_format=array_record{where}` (datasets with manual "
            f"downloads such as imagenet2012 need the files in <data_dir>/downloads/manual)")


class TfdsSource:
    """One split of a TFDS dataset with (image, label) supervised keys."""

    def __init__(self, name: str, split: str, data_dir: str | None = None, download: bool = False):
        tfds = import_tfds()
        try:
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError:
            from scaling.data.config import check_tfds_name

            check_tfds_name(name)  # raises, naming the closest datasets
            raise
        keys = builder.info.supervised_keys
        if not (isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys)):
            raise ValueError(f"data.name={name!r}: TFDS dataset has supervised keys {keys!r}, "
                             "need (image, label) for image classification")
        self.image_key, self.label_key = keys
        label = builder.info.features[self.label_key]
        if not hasattr(label, "names"):
            raise ValueError(f"data.name={name!r}: feature {self.label_key!r} is not a class label")
        self.class_names = tuple(label.names)
        self.num_classes = len(self.class_names)
        shape = builder.info.features[self.image_key].shape
        self.image_size = shape[0] if shape[0] is not None and shape[0] == shape[1] else None
        if download and not _is_prepared(builder):
            builder.download_and_prepare(file_format="array_record")
        try:  # reads local files only: nothing is downloaded without data.download
            self._data = builder.as_data_source(
                split=split, decoders={self.image_key: tfds.decode.SkipDecoding()})
        except Exception as e:  # tfds raises KeyError/ValueError/NotImplementedError here
            if not _is_prepared(builder):
                raise ValueError(f"data.name={name!r} is not prepared in data.data_dir="
                                 f"{builder.data_dir_root}: {_prepare_hint(name, data_dir)}") from e
            if isinstance(e, NotImplementedError):
                raise ValueError(f"data.name={name!r} in {builder.data_dir} is not in the "
                                 f"array_record format needed for random access: "
                                 f"{_prepare_hint(name, data_dir)} into a new data.data_dir") from e
            raise ValueError(f"split {split!r} of TFDS dataset {name!r} cannot be read ({e}); "
                             f"its splits are {', '.join(builder.info.splits)}; slices such as "
                             "'train[:90%]' work (data.train_split / data.eval_split)") from e
        self.name, self.split = name, split
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._data)

    def _read(self, indices):
        # Per-item reads: the mocked data source of tfds.testing lacks __getitems__.
        return [self._data[int(i)] for i in indices]

    def get(self, indices):
        records = self._read(np.asarray(indices, np.int64))
        images = [decode_image(r[self.image_key]) for r in records]
        return images, np.asarray([r[self.label_key] for r in records], np.int32)

    def labels(self) -> np.ndarray:
        """Reads every record's label once (images stay encoded); needed only for subsets."""
        if self._labels is None:
            self._labels = np.asarray(
                [r[self.label_key] for r in self._read(range(len(self)))], np.int32)
        return self._labels
