"""EfficientNet compound-coefficient search (step 1 of the paper's compound scaling), as a
config over the generic sweep (experiments/sweep.py).

    python launch.py --config configs/efficientnet_grid.py --workdir runs/effnet
    python launch.py --config configs/efficientnet_grid.py:cifar10 --config.grid.num_workers=4 --config.grid.worker=$i
    tensorboard --logdir runs/effnet        # HParams tab: every trial

Sweeps alpha (depth), beta (width), gamma (resolution) >= 1 at phi = 1 on the constraint
surface |alpha * beta^2 * gamma^2 - 2| <= 0.1, scales the baseline through the shared rounding
rules (`sweep.derive="compound"`), keeps the points whose realized GMACs factor is within
`sweep.cost_tolerance` of the theoretical one (and one of any points that round to the same
network), trains `sweep.seeds` seeds of each with successive halving, and writes study.md,
the rung table, best.json (alpha, beta, gamma of the best) and the plots. Select by the
paper's objective ACC * (GMACs / T)^w with --config.sweep.report.select=objective.
Budgets: --config.grid.max_gmacs / --config.grid.max_memory_mb mark trials `infeasible`.

Presets:
  default   CPU size, offline: B0 at width 0.25 / depth 0.5 / 32 px (channels rounded to
            multiples of 4) on 2,000 embedded CIFAR-10 images; of the grid's points on the
            surface, those within 15 % of their theoretical cost; 2 seeds, halving 2.5 -> 5 epochs.
  cifar10   B0 (width 1, depth 1) at 32 -> upsampled resolutions on TFDS cifar10, a 0.05-step
            grid, 30 epochs per trial, halving at 5 and 10 epochs, 2 seeds.
  imagenet  the paper's setting: B0 at 224 on imagenet2012, RMSProp 0.9 / momentum 0.9,
            lr 0.016 per 256 images, exponential decay 0.97 every 2.4 epochs, 30 epochs a trial.
"""
import ml_collections

from configs import train
from scaling.models import CIFAR10_MEAN, CIFAR10_STD
from experiments.grid import default_grid_config
from experiments.sweep import default_sweep_config

PRESETS = ("default", "cifar10", "imagenet")


def base_config() -> ml_collections.ConfigDict:
    c = train.get_config("default")
    c.experiment = "sweep"
    c.model = ml_collections.ConfigDict(dict(
        name="efficientnet_b0", width=1.0, depth=1.0, dropout=0.2, drop_connect_rate=0.2))
    c.grid = default_grid_config()
    c.sweep = s = default_sweep_config()
    s.derive = "compound"
    s.combine = "product"
    s.constraint = "abs(alpha * beta**2 * gamma**2 - 2.0) <= 0.1"
    s.compound.phi = 1.0
    s.report.update(label="point", title="compound coefficient search (phi = 1)",
                    heatmap=("alpha", "beta"), x=("gmacs",))
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = base_config()
    s = c.sweep
    if preset in ("default", "cifar10"):
        c.data.update(mean=CIFAR10_MEAN, std=CIFAR10_STD)  # not the model's ImageNet statistics
    if preset == "default":
        s.axes = ml_collections.ConfigDict(dict(
            alpha=(1.0, 1.2, 1.4, 1.6, 1.8, 2.0), beta=(1.0, 1.1, 1.2, 1.3, 1.4),
            gamma=(1.0, 1.1, 1.2, 1.3, 1.4)))
        # A small base, rounded finely (channels to multiples of 4, resolution of 2): with B0's
        # multiples of 8 and depth 0.25, most multipliers here would round to the same network.
        s.compound.update(base_width=0.25, base_depth=0.5, base_resolution=32, resolution_divisor=2)
        c.model.divisor = 4
        s.update(cost_tolerance=0.15, seeds=2)
        # The first rung at half the budget: after 1 epoch (32 steps) validation is still at
        # chance (0.1) for every point, so a ranking there would be noise.
        s.halving.update(rungs=(2.5,), unit="epochs", eta=3)
        # Short runs: no dropout / drop-connect, fast-adapting BN (torchvision b0 momentum).
        c.model.update(dropout=0.0, drop_connect_rate=0.0)
        c.data.update(examples_per_class=200)
        c.train.update(batch_size=64, eval_batch_size=400, num_epochs=5.0, optimizer="adamw",
                       lr=3e-3, weight_decay=5e-5, schedule="cosine", warmup_epochs=0.2,
                       log_every_steps=8, checkpoint_every_steps=16, progress_bar=False)
    elif preset == "cifar10":
        grid = tuple(round(1.0 + 0.05 * i, 2) for i in range(9))  # 1.00 .. 1.40
        s.axes = ml_collections.ConfigDict(dict(
            alpha=tuple(round(1.0 + 0.1 * i, 1) for i in range(11)), beta=grid, gamma=grid))
        s.constraint = "abs(alpha * beta**2 * gamma**2 - 2.0) <= 0.05"
        s.compound.update(base_width=1.0, base_depth=1.0, base_resolution=32, resolution_divisor=4)
        s.update(cost_tolerance=0.1, seeds=2)
        s.halving.update(rungs=(5.0, 10.0), unit="epochs", eta=3)
        c.data.update(source="tfds", name="cifar10", train_split="train", eval_split="test")
        c.train.update(batch_size=256, num_epochs=30.0, optimizer="sgd", lr=0.2, nesterov=True,
                       weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
                       eval_every_epochs=5.0, log_every_steps=50, checkpoint_every_steps=500)
    elif preset == "imagenet":
        grid = tuple(round(1.0 + 0.05 * i, 2) for i in range(9))
        s.axes = ml_collections.ConfigDict(dict(
            alpha=tuple(round(1.0 + 0.1 * i, 1) for i in range(11)), beta=grid, gamma=grid))
        s.constraint = "abs(alpha * beta**2 * gamma**2 - 2.0) <= 0.05"
        s.compound.update(base_resolution=224, resolution_divisor=8)
        s.update(cost_tolerance=0.1)
        s.halving.update(rungs=(5.0, 10.0), unit="epochs", eta=3)
        c.model.name = "tf_efficientnet_b0"
        c.data.update(source="tfds", name="imagenet2012", train_split="train",
                      eval_split="validation", image_size=224, crop="random_resized", workers=16)
        c.train.update(batch_size=4096, eval_batch_size=1024, num_epochs=30.0, optimizer="rmsprop",
                       lr=0.016 * 4096 / 256, momentum=0.9, rmsprop_decay=0.9, eps=1e-3,
                       weight_decay=1e-5, schedule="exponential", decay_factor=0.97,
                       decay_every_epochs=2.4, warmup_epochs=5.0, label_smoothing=0.1,
                       compute_dtype="bfloat16", eval_every_epochs=5.0, log_every_steps=100,
                       checkpoint_every_steps=1000)
    else:
        raise ValueError(f"config preset {preset!r} is unknown; use {', '.join(PRESETS)}.")
    return c
