"""EfficientNet family (step 2 of compound scaling): phi = 0..N from the search's coefficients
(or the paper's alpha=1.2, beta=1.1, gamma=1.15), beside depth-only, width-only and
resolution-only baselines with the same theoretical FLOPs growth per phi.

    python launch.py --config configs/efficientnet_family.py --workdir runs/effnet_family \\
        --config.family.coefficients_from=runs/effnet      # best.json of a search

Writes results.csv and compound_vs_single.png (accuracy vs GMACs, one line per scaling kind).
Presets: default (CPU size, phi 0..2, offline), cifar10, imagenet (as efficientnet_grid.py).
"""
import ml_collections

from configs import efficientnet_grid
from experiments.efficientnet import default_family_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = efficientnet_grid.get_config(preset)
    c.experiment = "efficientnet_family"
    c.family = default_family_config()
    if preset == "default":
        c.family.phis = (0, 1, 2)
    return c
