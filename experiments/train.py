"""A single training run: `fit` the configured model, write WORKDIR/result.json."""
from __future__ import annotations

from typing import Any

from scaling.train import fit, validate_config


def validate(config: Any, num_devices: int | None = None) -> None:
    validate_config(config, num_devices)


def run(config: Any, workdir: str) -> dict:
    return fit(config, workdir)
