"""A single training run: `fit` the configured model, write WORKDIR/result.json."""
from __future__ import annotations

from typing import Any

from scaling.train import fit, validate_config
from scaling.train.memory import fit_to_memory


def validate(config: Any, num_devices: int | None = None) -> None:
    """The config's fields, data and model, then that its steps fit in device memory (in more
    microbatches, or a smaller eval batch, if need be: `scaling.train.memory`)."""
    validate_config(config, num_devices)
    fit_to_memory(config)


def run(config: Any, workdir: str) -> dict:
    return fit(config, workdir)
