"""EfficientNet compound-coefficient search (step 1 of the paper's compound scaling).

    python launch.py --config configs/efficientnet_grid.py --workdir runs/effnet
    python launch.py --config configs/efficientnet_grid.py:cifar10 --config.grid.num_workers=4 --config.grid.worker=$i
    tensorboard --logdir runs/effnet        # HParams tab: every trial

Sweeps alpha (depth), beta (width), gamma (resolution) >= 1 at phi = 1, keeps the points with
|alpha * beta^2 * gamma^2 - search.target| <= search.tolerance, scales the baseline through
the shared rounding rules, trains each trial with the same budget and writes best.json
(selected by accuracy, or by ACC * (GMACs / T)^w with --config.search.select=objective).
Budgets: --config.grid.max_gmacs / --config.grid.max_memory_mb mark trials `infeasible`.

Presets:
  default   CPU size, offline: B0 at width 0.25 / depth 0.25 / 32 px on 2,000 embedded CIFAR-10
            images, 6 trials of 5 epochs (about 10-15 minutes on 2 CPU cores).
  cifar10   B0 (width 1, depth 1) at 32 -> upsampled resolutions on TFDS cifar10, a 0.05-step
            grid, 30 epochs per trial.
  imagenet  the paper's setting: B0 at 224 on imagenet2012, RMSProp 0.9 / momentum 0.9,
            lr 0.016 per 256 images, exponential decay 0.97 every 2.4 epochs, 30 epochs a trial.
"""
import ml_collections

from configs import train
from experiments.efficientnet import default_search_config
from experiments.grid import default_grid_config


def base_config() -> ml_collections.ConfigDict:
    c = train.get_config("default")
    c.experiment = "efficientnet_search"
    c.model = ml_collections.ConfigDict(dict(
        name="efficientnet_b0", width=1.0, depth=1.0, dropout=0.2, drop_connect_rate=0.2))
    c.search = default_search_config()
    c.grid = default_grid_config()
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = base_config()
    s = c.search
    if preset == "default":
        s.update(alpha=(1.0, 1.4, 2.0), beta=(1.0, 1.1, 1.2, 1.4), gamma=(1.0, 1.1, 1.2, 1.4),
                 tolerance=0.05, base_width=0.25, base_depth=0.25, base_resolution=32,
                 resolution_divisor=4)
        # Short runs: no dropout / drop-connect, fast-adapting BN (torchvision b0 momentum).
        c.model.update(dropout=0.0, drop_connect_rate=0.0)
        c.data.update(examples_per_class=200)
        c.train.update(batch_size=64, eval_batch_size=400, num_epochs=5.0, optimizer="adamw",
                       lr=3e-3, weight_decay=5e-5, schedule="cosine", warmup_epochs=0.2,
                       log_every_steps=8, checkpoint_every_steps=16, progress_bar=False)
    elif preset == "cifar10":
        grid = tuple(round(1.0 + 0.05 * i, 2) for i in range(9))  # 1.00 .. 1.40
        s.update(alpha=tuple(round(1.0 + 0.1 * i, 1) for i in range(11)), beta=grid, gamma=grid,
                 tolerance=0.05, base_width=1.0, base_depth=1.0, base_resolution=32,
                 resolution_divisor=4)
        c.data.update(source="tfds", name="cifar10", train_split="train", eval_split="test")
        c.train.update(batch_size=256, num_epochs=30.0, optimizer="sgd", lr=0.2, nesterov=True,
                       weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
                       eval_every_epochs=5.0, log_every_steps=50, checkpoint_every_steps=500)
    elif preset == "imagenet":
        grid = tuple(round(1.0 + 0.05 * i, 2) for i in range(9))
        s.update(alpha=tuple(round(1.0 + 0.1 * i, 1) for i in range(11)), beta=grid, gamma=grid,
                 tolerance=0.05, base_resolution=224, resolution_divisor=8)
        c.model.name = "tf_efficientnet_b0"
        c.data.update(source="tfds", name="imagenet2012", train_split="train",
                      eval_split="validation", image_size=224, crop="random_resized",
                      mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), workers=16)
        c.train.update(batch_size=4096, eval_batch_size=1024, num_epochs=30.0, optimizer="rmsprop",
                       lr=0.016 * 4096 / 256, momentum=0.9, rmsprop_decay=0.9, eps=1e-3,
                       weight_decay=1e-5, schedule="exponential", decay_factor=0.97,
                       decay_every_epochs=2.4, warmup_epochs=5.0, label_smoothing=0.1,
                       compute_dtype="bfloat16", eval_every_epochs=5.0, log_every_steps=100,
                       checkpoint_every_steps=1000)
    else:
        raise ValueError(f"config preset {preset!r} is unknown; use default, cifar10 or imagenet.")
    return c
