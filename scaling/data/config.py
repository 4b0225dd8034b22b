"""The `data` section of an experiment config and its validation."""
from __future__ import annotations

import difflib
import os

import ml_collections
from ml_collections import config_dict

SOURCES = ("embedded", "tfds", "folder")
CROPS = ("pad_crop", "random_resized", "none")
PAD_MODES = ("reflect", "zero")
EMBEDDED_NAMES = ("cifar10",)
LOADERS = ("auto", "grain", "threads")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults: the embedded CIFAR-10 subset at 32x32, pad-and-crop + flip augmentation."""
    return ml_collections.ConfigDict(dict(
        source="embedded",            # 'embedded' | 'tfds' | 'folder'
        name="cifar10",               # TFDS name ('cifar100', 'imagenet2012', 'tf_flowers', ...)
        data_dir=config_dict.placeholder(str),  # TFDS data_dir (None: TFDS default)
        path=config_dict.placeholder(str),      # folder source: root/<class>/*.jpg
        download=False,               # tfds: download and prepare when missing
        train_split="train",
        eval_split="validation",
        image_size=32,
        crop="pad_crop",              # 'pad_crop' | 'random_resized' | 'none'
        pad=4,                        # pad_crop: pixels on each side
        pad_mode="reflect",           # pad_crop: 'reflect' | 'zero'
        flip=True,                    # random horizontal flip
        rotation=0.0,                 # max degrees of random rotation
        color_jitter=0.0,             # brightness / contrast / saturation strength
        # Normalisation (R, G, B on the 0-1 scale) and eval crop (the shorter side is resized to
        # image_size / crop_fraction). None: the model's, from its registry record (CIFAR-10
        # statistics for the CIFAR families, ImageNet's for torchvision models, ...); without a
        # model (build_dataset alone) the embedded CIFAR-10 statistics and 0.875.
        crop_fraction=config_dict.placeholder(float),
        mean=config_dict.placeholder(tuple),
        std=config_dict.placeholder(tuple),
        classes=(),                   # class indices to keep, relabelled 0..n-1; () = all
        examples_per_class=0,         # first n of each class; 0 = all
        val_fraction=0.1,             # folder without split dirs: last fraction of each class
        # How batches are decoded and augmented ahead of the train step (the batches are the
        # same either way): 'threads' (data.workers threads), 'grain' (data.workers processes;
        # 0: in this process) or 'auto' (the one measured faster for data.source on the 2-core
        # machines here: threads for every source; see the README).
        loader="auto",
        workers=2,                    # decode / augment threads or grain processes
    ))


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"data.{field}={value!r} is invalid: {allowed}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_data_config(cfg) -> None:
    """Raises ValueError naming the first bad `data.*` field and what it accepts."""
    if cfg.get("modality", "image") == "audio":
        from scaling.data.audio import validate_audio_data_config

        return validate_audio_data_config(cfg)
    if cfg.source not in SOURCES:
        _fail("source", cfg.source, f"allowed values are {', '.join(SOURCES)}")
    if cfg.crop not in CROPS:
        _fail("crop", cfg.crop, f"allowed values are {', '.join(CROPS)}")
    if cfg.pad_mode not in PAD_MODES:
        _fail("pad_mode", cfg.pad_mode, f"allowed values are {', '.join(PAD_MODES)}")
    if not _is_int(cfg.image_size) or cfg.image_size < 1:
        _fail("image_size", cfg.image_size, "must be a positive integer (pixels)")
    if not _is_int(cfg.pad) or cfg.pad < 0:
        _fail("pad", cfg.pad, "must be an integer >= 0")
    for field in ("rotation", "color_jitter"):
        if not cfg[field] >= 0:
            _fail(field, cfg[field], "must be >= 0 (0 turns it off)")
    if cfg.crop_fraction is not None and not 0 < cfg.crop_fraction <= 1:
        _fail("crop_fraction", cfg.crop_fraction, "must be in (0, 1], or None for the model's")
    for field in ("mean", "std"):
        if cfg[field] is not None and len(cfg[field]) != 3:
            _fail(field, cfg[field], "must have 3 values (R, G, B) on the 0-1 scale, or None for "
                  "the model's")
    if cfg.std is not None and min(cfg.std) <= 0:
        _fail("std", cfg.std, "every value must be > 0")
    validate_subset_fields(cfg)
    if cfg.get("loader", "auto") not in LOADERS:
        _fail("loader", cfg.loader, f"allowed values are {', '.join(LOADERS)} ('auto': the one "
              "measured faster for data.source)")
    if cfg.source == "embedded" and cfg.name not in EMBEDDED_NAMES:
        _fail("name", cfg.name, f"data.source='embedded' ships only {', '.join(EMBEDDED_NAMES)}; "
              "use data.source='tfds' or 'folder' for other datasets")
    if cfg.source == "folder":
        check_folder_path(cfg.path)
    if cfg.source == "tfds":
        check_tfds_name(cfg.name)


def validate_subset_fields(cfg) -> None:
    """The fields image and audio sections share: which classes and examples, the folder
    split and the decode threads."""
    classes = tuple(cfg.classes or ())
    if (not all(_is_int(c) and c >= 0 for c in classes)) or len(set(classes)) != len(classes):
        _fail("classes", cfg.classes, "must be distinct class indices >= 0; () keeps all")
    if not _is_int(cfg.examples_per_class) or cfg.examples_per_class < 0:
        _fail("examples_per_class", cfg.examples_per_class, "must be an integer >= 0 (0 = all)")
    if not 0 <= cfg.val_fraction < 1:
        _fail("val_fraction", cfg.val_fraction, "must be in [0, 1)")
    if not _is_int(cfg.workers) or cfg.workers < 0:
        _fail("workers", cfg.workers, "must be an integer >= 0 (threads: 0 or 1 is no thread "
              "pool; grain: worker processes, 0 decodes in this process)")


IMAGE_FOLDER = ("/path/to/images, a directory laid out as <path>/<class>/*.jpg (optionally "
                "<path>/train/<class>/ and <path>/val/<class>/)")


def check_folder_path(path, layout: str = IMAGE_FOLDER) -> str:
    """`data.path` with `~` expanded; raises ValueError when it is unset, missing or a file.
    `layout` is the fix the error suggests (images by default)."""
    fix = f"set --config.data.path={layout}"
    if not path:
        raise ValueError(f"data.path is not set but data.source='folder' needs it: {fix}")
    expanded = os.path.expanduser(str(path))
    if not os.path.exists(expanded):
        raise ValueError(f"data.path={path!r} does not exist: {fix}")
    if not os.path.isdir(expanded):
        raise ValueError(f"data.path={path!r} is a file, not a directory: {fix}")
    return expanded


def check_tfds_name(name: str) -> None:
    """Unknown TFDS names fail early with the closest registered names."""
    from scaling.data.tfds_source import import_tfds

    tfds = import_tfds()
    base = str(name).split(":")[0].split("/")[0]
    known = tfds.list_builders(with_community_datasets=False)  # community: a network lookup
    if base not in known:
        close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"data.name={name!r} is not a TFDS dataset: {hint}"
                         "see tfds.list_builders() or https://www.tensorflow.org/datasets/catalog")
