"""WideResNet study of l (convolutions per block) x k (widening factor) x depth (x dropout).

    python launch.py --config configs/wrn_grid.py --workdir runs/wrn
    python launch.py --config configs/wrn_grid.py:cifar10 --config.grid.num_workers=8 --config.grid.worker=$i

Depth and l must fit depth = 3 * N * l + 4 (N blocks per group); other combinations are
filtered out by `sweep.constraint`. A config over the generic sweep (experiments/sweep.py).

Presets:
  default  l in {1, 2} x k in {1, 2} at depth 10 on 2,000 embedded CIFAR-10 images, 3 epochs
           (a few minutes on 2 CPU cores; a smoke-size version of the study).
  cifar10  l in {1,2,3,4} x k in {1,2,4,8,10} x depth in {16,22,28,40} x dropout {0, 0.3}
           with the WRN paper's recipe: SGD Nesterov 0.9, lr 0.1, wd 5e-4, batch 128, 200 epochs,
           lr x0.2 at epochs 60/120/160.
"""
import ml_collections

from configs import train
from experiments.grid import default_grid_config
from experiments.sweep import default_sweep_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = train.get_config("cifar10" if preset == "cifar10" else "default")
    c.experiment = "sweep"
    c.grid = default_grid_config()
    c.sweep = s = default_sweep_config()
    s.targets = ml_collections.ConfigDict(dict(
        l="model.convs_per_block", k="model.widen_factor", depth="model.depth",
        dropout="model.dropout"))
    s.constraint = "(depth - 4) % (3 * l) == 0"
    s.report.update(heatmap=("l", "k"), x=("gmacs", "params"), title="WideResNet: l x k")
    if preset == "cifar10":
        s.axes = ml_collections.ConfigDict(dict(
            l=(1, 2, 3, 4), k=(1, 2, 4, 8, 10), depth=(16, 22, 28, 40), dropout=(0.0, 0.3)))
        s.seeds = 2
    elif preset == "default":
        s.axes = ml_collections.ConfigDict(dict(l=(1, 2), k=(1, 2), depth=(10,), dropout=(0.0,)))
        c.data.examples_per_class = 200
        c.train.update(num_epochs=3.0, batch_size=128, warmup_epochs=0.0, log_every_steps=8,
                       checkpoint_every_steps=16, eval_batch_size=512, progress_bar=False)
    else:
        raise ValueError(f"config preset {preset!r} is unknown; use default or cifar10.")
    return c
