"""Model comparison on the same data and budget (our notes' MobileNetV2 alpha=0.5 vs VGG-16):
params, size in MB, GMACs, step time, training time, validation accuracy, learning curves.

    python launch.py --config configs/compare.py --workdir runs/compare
    python launch.py --config configs/compare.py:imagenet

A config over the generic sweep: axis `model` over the labels of `sweep.models` (label -> a
model section: name + fields), `sweep.derive="models"`.
Presets: default (5 embedded CIFAR-10 classes at 32 px, a short run per model, CPU size),
cifar10, imagenet (224 px, the architectures exactly as published).
"""
import ml_collections

from configs import train
from scaling.models import CIFAR10_MEAN, CIFAR10_STD
from experiments.grid import default_grid_config
from experiments.sweep import default_sweep_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = train.get_config("default")
    c.experiment = "sweep"
    c.grid = default_grid_config()
    c.sweep = s = default_sweep_config()
    s.models = ml_collections.ConfigDict(dict(
        mobilenet_v2_a050=ml_collections.ConfigDict(dict(name="mobilenet_v2", alpha=0.5)),
        vgg16=ml_collections.ConfigDict(dict(name="vgg16")),
    ))
    s.axes = ml_collections.ConfigDict(dict(model=tuple(s.models.keys())))
    s.derive = "models"
    s.report.update(columns=("size_mb", "step_time_s", "train_time_s", "peak_memory_mb"),
                    curves=("eval/top1", "train/loss"), x=("gmacs",), title="model comparison")
    if preset in ("default", "cifar10"):
        # CIFAR-10 statistics for every model (their records hold ImageNet's).
        c.data.update(mean=CIFAR10_MEAN, std=CIFAR10_STD)
    if preset == "default":
        c.data.update(classes=(0, 1, 2, 3, 4), examples_per_class=300)
        c.train.update(batch_size=32, eval_batch_size=200, num_epochs=2.0, optimizer="sgd",
                       lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4,
                       schedule="cosine", warmup_epochs=0.0, eval_every_epochs=0.5,
                       log_every_steps=8, checkpoint_every_steps=48, progress_bar=False)
    elif preset == "cifar10":
        c.data.update(source="tfds", name="cifar10", train_split="train", eval_split="test")
        c.train.update(batch_size=128, num_epochs=30.0, lr=0.01, eval_every_epochs=1.0,
                       log_every_steps=50, checkpoint_every_steps=500)
    elif preset == "imagenet":
        c.data.update(source="tfds", name="imagenet2012", train_split="train",
                      eval_split="validation", image_size=224, crop="random_resized", workers=16)
        c.train.update(batch_size=256, eval_batch_size=512, num_epochs=90.0, lr=0.01,
                       weight_decay=1e-4, schedule="step", decay_epochs=(30, 60, 80),
                       decay_factor=0.1, eval_every_epochs=1.0, log_every_steps=100,
                       checkpoint_every_steps=1000)
    else:
        raise ValueError(f"config preset {preset!r} is unknown; use default, cifar10 or imagenet.")
    return c
