"""Resolution-only scaling: one network trained and evaluated at several input resolutions,
a config over the generic sweep and nothing else (no Python of its own).

    python launch.py --config configs/resolution.py --workdir runs/resolution

The axis `resolution` writes data.image_size; study.md has accuracy against GMACs with the
seeds' intervals and the power-law fit. Presets: default (the EfficientNet search's tiny B0
on 2,000 embedded CIFAR-10 images, 24-56 px, 2 seeds, 3 epochs), cifar10.
"""
import ml_collections

from configs import efficientnet_grid


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    c = efficientnet_grid.get_config(preset)
    s = c.sweep
    s.update(derive="", cost_tolerance=0.0, constraint="", seeds=2, combine="product")
    s.halving.rungs = ()
    c.model.update(width=s.compound.base_width, depth=s.compound.base_depth)
    s.axes = ml_collections.ConfigDict(dict(resolution=(24, 32, 40, 48, 56)))
    s.targets = ml_collections.ConfigDict(dict(resolution="data.image_size"))
    s.report.update(heatmap=(), label="resolution", x=("gmacs",),
                    title=f"resolution-only scaling of {c.model.name} (width {c.model.width}, "
                          f"depth {c.model.depth})")
    if preset == "default":
        c.train.num_epochs = 3.0
    return c
