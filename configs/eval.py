"""Evaluate a trained run, or torchvision / timm weights, on any data (experiments/eval.py).

    # a run on its own eval split (reproduces its val_top1)
    python launch.py --config configs/eval.py --config.eval.workdir=runs/train --workdir runs/train_eval
    # the same run on other data: each data.* field set here replaces the run's
    python launch.py --config configs/eval.py --config.eval.workdir=runs/train \\
        --config.data.source=folder --config.data.path=~/photos --workdir runs/train_photos
    # imported weights of a registered model
    python launch.py --config configs/eval.py --config.eval.weights=resnet50.safetensors \\
        --config.eval.model=resnet50 --config.data.source=tfds --config.data.name=imagenet2012 \\
        --workdir runs/resnet50_eval

Writes WORKDIR/eval.json (top-1, top-5, loss, images, per-class top-1 with class names, the
confusion matrix) and WORKDIR/confusion.png.
"""
import ml_collections
from ml_collections import config_dict

from scaling.data import default_data_config


def data_overrides() -> ml_collections.ConfigDict:
    """Every field of the data section, unset (None): a field given on the command line
    replaces the evaluated run's value, the others keep it."""
    defaults = default_data_config()
    return ml_collections.ConfigDict(
        {k: config_dict.placeholder(defaults.get_type(k)) for k in defaults})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"configs/eval.py has no presets (got {arg!r}); set its fields instead.")
    c = ml_collections.ConfigDict()
    c.experiment = "eval"
    c.eval = ml_collections.ConfigDict(dict(
        workdir="",          # a training run's workdir: its recorded config and newest checkpoint
        weights="",          # ... or a torchvision / timm state dict (.safetensors, .pth)
        model="",            # eval.weights: the registered model (resnet50, vit_b_16, ...)
        source="auto",       # eval.weights: torchvision | timm | auto
        num_classes=0,       # eval.weights: its head size (0: from its class names, or the model's)
        batch_size=0,        # 0: the run's train.eval_batch_size (512 for eval.weights)
    ))
    c.data = data_overrides()
    return c
