"""MobileNetV2 width-multiplier table (alpha = 0.25, 0.5, 0.75, 1.0): params, GMACs and
accuracy at each width, as in the MobileNet papers' tables; a config over the generic sweep
and nothing else.

    python launch.py --config configs/mobilenet_width.py --workdir runs/mobilenet_width
    python launch.py --config configs/mobilenet_width.py:imagenet     # the papers' setting

Presets: default (32 px, 2,000 embedded CIFAR-10 images, 3 epochs, 2 seeds; CPU size),
imagenet (224 px, TFDS imagenet2012, the MobileNetV2 recipe).
"""
import ml_collections

from configs import train
from scaling.models import CIFAR10_MEAN, CIFAR10_STD
from experiments.grid import default_grid_config
from experiments.sweep import default_sweep_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = train.get_config("imagenet" if preset == "imagenet" else "default")
    c.experiment = "sweep"
    c.model = ml_collections.ConfigDict(dict(name="mobilenet_v2", alpha=1.0))
    c.grid = default_grid_config()
    c.sweep = s = default_sweep_config()
    s.axes = ml_collections.ConfigDict(dict(alpha=(0.25, 0.5, 0.75, 1.0)))
    s.targets = ml_collections.ConfigDict(dict(alpha="model.alpha"))
    s.report.update(label="alpha", x=("gmacs", "params"), columns=("size_mb", "step_time_s"),
                    title="MobileNetV2 width multiplier")
    if preset == "default":
        s.seeds = 2
        c.data.update(examples_per_class=200, mean=CIFAR10_MEAN, std=CIFAR10_STD)
        c.train.update(batch_size=64, eval_batch_size=400, num_epochs=3.0, optimizer="adamw",
                       lr=3e-3, weight_decay=5e-5, schedule="cosine", warmup_epochs=0.2,
                       log_every_steps=8, checkpoint_every_steps=16, progress_bar=False)
    elif preset == "imagenet":
        c.train.update(batch_size=1024, num_epochs=300.0, optimizer="rmsprop", lr=0.064,
                       rmsprop_decay=0.9, momentum=0.9, eps=0.0316, weight_decay=4e-5,
                       schedule="exponential", decay_factor=0.97, decay_every_epochs=2.4)
    else:
        raise ValueError(f"config preset {preset!r} is unknown; use default or imagenet.")
    return c
