"""Metric logging: TensorBoard event files (tensorboardX, no TensorFlow needed), a JSON-lines
copy of every scalar, hparams for the HParams tab, and the config as text.

Only process 0 writes. On resume from step s, scalars logged after s by the interrupted run
are dropped from the JSON-lines file and purged from TensorBoard (`purge_step`), so both
show one clean curve.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np


def _to_float(v: Any) -> float:
    return float(np.asarray(v))


class MetricWriter:
    def __init__(self, logdir: str, *, enabled: bool = True, resume_step: int | None = None):
        self.logdir = logdir
        self.enabled = enabled
        self._tb = None
        self._jsonl = os.path.join(logdir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(logdir, exist_ok=True)
        if resume_step is not None:
            self._truncate_jsonl(resume_step)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(logdir, purge_step=resume_step + 1 if resume_step is not None else None,
                                 flush_secs=30)

    def _truncate_jsonl(self, step: int) -> None:
        if not os.path.exists(self._jsonl):
            return
        with open(self._jsonl) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        tmp = self._jsonl + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self._jsonl)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _to_float(v) for k, v in values.items()}
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        with open(self._jsonl, "a") as f:
            f.write(json.dumps({"step": int(step), **values}) + "\n")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def hparams(self, hparams: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """Writes hparams + final metrics for TensorBoard's HParams tab (one run per trial)."""
        if not self.enabled:
            return
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self._tb.add_hparams(hp, {f"hparams/{k}": _to_float(v) for k, v in metrics.items()},
                             name=".", global_step=None)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

