"""The `train` config section and validation of a whole training config.

Validation runs before anything is built or compiled and raises one ValueError that names
the field and the allowed values.
"""
from __future__ import annotations

import functools
import json
from typing import Any

import ml_collections

from scaling.models import check_model_name, model_fields, model_info
from scaling.parallel import check_mesh_config
from scaling.train.finetune import validate_init_config
from scaling.train.optim import OPTIMIZERS, SCHEDULES

# The data fields that decide which examples a source holds (not how they are transformed).
_SOURCE_FIELDS = ("source", "name", "data_dir", "path", "download", "val_fraction", "classes",
                  "examples_per_class", "modality", "sample_rate")


def default_train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        batch_size=128,             # global batch, split over every device of every host
        eval_batch_size=512,
        grad_accum_steps=1,         # microbatches per update (batch_size / k at a time)
        auto_accumulate=True,       # when a step does not fit in device memory: more microbatches
                                    # (and a smaller eval batch) until it does; logged
        device_memory_gb=0.0,       # per-device memory for that choice; 0: detect (CPU: the
                                    # host's available memory / local devices)
        num_epochs=10.0,            # duration in epochs ...
        num_steps=0,                # ... or in steps (wins when > 0)
        optimizer="sgd",            # sgd | rmsprop | adam | adamw
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,          # skips norm scales and biases
        schedule="cosine",          # cosine | step | exponential | constant
        warmup_epochs=0.0,
        end_factor=0.0,             # cosine ends at lr * end_factor
        decay_epochs=(60, 120, 160),  # step schedule boundaries
        decay_factor=0.2,           # step: x0.2 (WRN); exponential: 0.97 (EfficientNet)
        decay_every_epochs=2.4,     # exponential schedule period
        rmsprop_decay=0.9,
        eps=1e-8,
        b1=0.9,
        b2=0.999,
        label_smoothing=0.0,
        grad_clip_norm=0.0,
        diverge_factor=10.0,        # Diverged when a log window's mean loss exceeds this times
                                    # max(first window's loss, ln(num_classes)); 0: off
        compute_dtype="float32",    # float32 | bfloat16 (params stay float32)
        log_every_steps=50,
        eval_every_epochs=0.0,      # 0: evaluate at the end only
        eval_every_steps=0,
        checkpoint_every_steps=200,
        keep_checkpoints=3,
        progress_bar=True,
    ))


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@functools.lru_cache(maxsize=8)
def _open_source(key: str, split: str) -> tuple[int, int]:
    from scaling.data import build_source

    source = build_source(ml_collections.ConfigDict(json.loads(key)), split)
    return source.num_classes, len(source)


def source_counts(data: Any, split: str) -> tuple[int, int]:
    """(classes, examples) of `split` of the `data` section, opened once per source and split
    in a process (a folder's file scan checks every image, ~1.4 ms a file)."""
    return _open_source(json.dumps({k: data.get(k) for k in _SOURCE_FIELDS}, sort_keys=True), split)


def open_splits(data: Any) -> int:
    """Opens the training and evaluation splits of the `data` section (metadata only: file
    lists, TFDS builders) so that a missing, empty or unprepared source fails now, before
    anything is written; returns the number of classes. Opened once per source and split."""
    num_classes, _ = source_counts(data, data.train_split)
    source_counts(data, data.eval_split)
    return num_classes


def check_modality(config: Any) -> None:
    """The model's input modality (its registry record) is the data section's."""
    wants = model_info(config.model.name).modality
    has = config.data.get("modality", "image")
    if wants != has:
        fix = ("use configs/wavenet.py, or an audio data section "
               "(scaling.data.default_audio_data_config())" if wants == "audio" else
               "choose an image model, or an image data section (configs/train.py)")
        raise ValueError(f"model.name={config.model.name!r} takes {wants} input but the data "
                         f"section describes {has} data (data.source={config.data.source!r}, "
                         f"data.name={config.data.get('name')!r}); {fix}.")


def check_accumulation(batch_size: int, steps: int, num_devices: int) -> None:
    """Each of the `steps` microbatches of a global batch takes the same number of rows on
    every device: batch_size must be a multiple of steps x devices."""
    unit = int(steps) * num_devices
    if batch_size % unit:
        lo, hi = batch_size // unit * unit, (batch_size // unit + 1) * unit
        raise ValueError(
            f"train.batch_size={batch_size} does not split into train.grad_accum_steps={steps} "
            f"microbatches over {num_devices} device(s); use a multiple of {unit} "
            f"(e.g. {f'{lo} or {hi}' if lo else hi}), or another grad_accum_steps.")


def validate_config(config: Any, num_devices: int | None = None) -> None:
    """Checks a training config before anything is compiled or written: every field, the
    data sources (opened, see `open_splits`) and the model (built, so its own checks run)."""
    from scaling.data import validate_data_config
    from scaling.train.run import COMPUTE_DTYPES, build_model

    _check("model" in config and "name" in config.model, "model.name: missing; set the model to train.")
    check_model_name(config.model.name, "model.name")
    fields = model_fields(config.model.name)
    for k in config.model:
        if k != "name" and fields and k not in fields:
            raise ValueError(f"model.{k}: {config.model.name!r} has no field {k!r}. "
                             f"Its fields are: {', '.join(fields)}.")
    validate_data_config(config.data)
    check_modality(config)
    validate_init_config(config)
    t = config.train
    _check(t.optimizer in OPTIMIZERS,
           f"train.optimizer: unknown {t.optimizer!r}; use one of {', '.join(OPTIMIZERS)}.")
    _check(t.schedule in SCHEDULES,
           f"train.schedule: unknown {t.schedule!r}; use one of {', '.join(SCHEDULES)}.")
    _check(t.compute_dtype in COMPUTE_DTYPES,
           f"train.compute_dtype: unknown {t.compute_dtype!r}; use one of {', '.join(COMPUTE_DTYPES)}.")
    for name in ("batch_size", "eval_batch_size", "grad_accum_steps", "log_every_steps",
                 "checkpoint_every_steps", "keep_checkpoints"):
        _check(int(t[name]) > 0, f"train.{name}={t[name]}: must be a positive integer.")
    _check(t.num_steps > 0 or t.num_epochs > 0,
           "train.num_epochs / train.num_steps: set one of them to a positive value.")
    _check(t.lr > 0, f"train.lr={t.lr}: must be positive.")
    _check(t.device_memory_gb >= 0, f"train.device_memory_gb={t.device_memory_gb}: must be >= 0 "
           "(0: detect the device's memory).")
    _check(t.diverge_factor >= 0, f"train.diverge_factor={t.diverge_factor}: must be >= 0 "
           "(0 turns the loss-explosion rule off).")
    _check(0.0 <= t.label_smoothing < 1.0, f"train.label_smoothing={t.label_smoothing}: must be in [0, 1).")
    _check(t.checkpoint_every_steps % t.log_every_steps == 0,
           f"train.checkpoint_every_steps={t.checkpoint_every_steps} must be a multiple of "
           f"train.log_every_steps={t.log_every_steps}, so a resumed run logs the same windows.")
    check_mesh_config(config, num_devices)  # mesh sizes, sharding rules
    if num_devices:
        for name in ("batch_size", "eval_batch_size"):
            n = int(t[name])
            if n % num_devices:
                lo, hi = (n // num_devices) * num_devices, (n // num_devices + 1) * num_devices
                raise ValueError(f"train.{name}={n} is not divisible by the {num_devices} devices; "
                                 f"use a multiple of {num_devices} "
                                 f"(e.g. {f'{lo} or {hi}' if lo else hi}).")
    check_accumulation(t.batch_size, t.grad_accum_steps, num_devices or 1)
    build_model(config.model, open_splits(config.data), t.compute_dtype,
                image_size=config.data.get("image_size"))
