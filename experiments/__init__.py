"""Experiments: what `launch.py` runs, chosen by `config.experiment`.

Each experiment module has `validate(config, num_devices)` (cheap, before any compile)
and `run(config, workdir) -> dict`.
"""
from __future__ import annotations

import importlib

EXPERIMENTS = {
    "train": "experiments.train",
    "sweep": "experiments.sweep",        # every declarative study (configs/*_grid.py, ...)
    "transfer": "experiments.transfer",  # a pretraining stage, then a sweep over modes
    "eval": "experiments.eval",          # a run or imported weights on any data (configs/eval.py)
}


def get(name: str):
    if name not in EXPERIMENTS:
        raise ValueError(f"experiment: unknown {name!r}; use one of {', '.join(sorted(EXPERIMENTS))}.")
    return importlib.import_module(EXPERIMENTS[name])
