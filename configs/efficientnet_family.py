"""EfficientNet family (step 2 of compound scaling): phi = 0..N from the search's coefficients
(or the paper's alpha=1.2, beta=1.1, gamma=1.15), beside depth-only, width-only and
resolution-only scaling at equal realized cost, as a config over the generic sweep.

    python launch.py --config configs/efficientnet_family.py --workdir runs/effnet_family \\
        --config.sweep.compound.coefficients_from=runs/effnet      # best.json of a search

Axes `scaling` x `phi`; the single-dimension points take the multiplier whose realized GMACs
match the compound point's at the same phi (`sweep.compound.match_cost`). study.md has the
table of realized against theoretical cost, a saturating power-law fit per strategy with
bootstrap intervals, the frontier and which strategy wins at each budget.
`--config.sweep.compound.published=True` takes B0..B7 from the released table instead.
Presets: default (CPU size, phi 0..2, 2 seeds, offline), cifar10, imagenet (as efficientnet_grid.py).
"""
import ml_collections

from configs import efficientnet_grid


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = efficientnet_grid.get_config(preset)
    s = c.sweep
    s.axes = ml_collections.ConfigDict(dict(
        scaling=("compound", "depth", "width", "resolution"),
        phi=(0, 1, 2) if preset == "default" else tuple(range(8))))
    s.constraint = "phi > 0 or scaling == 'compound'"
    s.compound.match_cost = True
    s.update(cost_tolerance=0.0, seeds=2)
    s.halving.rungs = ()
    if preset == "default":
        c.train.num_epochs = 3.0  # 9 points x 2 seeds in about 20 minutes on 2 cores
    s.report.update(group="scaling", shared="phi == 0", label="phi", heatmap=(), x=("gmacs", "params", "train_pflop"),
                    title="compound vs single-dimension scaling at equal realized cost")
    return c
