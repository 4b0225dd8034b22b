"""A single training run: `fit` the configured model, write WORKDIR/result.json."""
from __future__ import annotations

from typing import Any

from scaling.train import fit, validate_config
from scaling.train.run import check_host_memory


def validate(config: Any, num_devices: int | None = None) -> None:
    """The config's fields, data and model, then (on CPU) that one train step fits in memory."""
    validate_config(config, num_devices)
    check_host_memory(config)


def run(config: Any, workdir: str) -> dict:
    return fit(config, workdir)
