"""Orbax checkpoints: periodic and final saves, automatic resume, fallback on a bad step.

Saves are asynchronous (training goes on while the checkpoint is written); `close()` waits
for them. Restoring tries the newest step first and, if it cannot be read (a run killed
while writing, a truncated file), warns and falls back to the previous one. Nothing is
ever deleted on a failed restore.

A checkpoint step holds two items: 'default', the train state, and 'data', a small JSON
record of where the input pipeline resumes (`scaling.data.pipeline.loader_position`). Steps
written before the 'data' item existed restore as before, without it.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        # Named items from the start: steps with and without 'data' then share one layout
        # (the state in <step>/default/, as single-item managers wrote it).
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers={
            "default": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
        self.data: dict | None = None   # the data record of the step `restore` returned

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False, data: dict | None = None) -> bool:
        """Saves `state` (and the JSON-able `data` record, when given) as step `step`."""
        if step in self._mngr.all_steps():
            return False
        items = {"default": ocp.args.StandardSave(state)}
        if data is not None:
            items["data"] = ocp.args.JsonSave(data)
        return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

    def _has_data(self, step: int) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), "data"))

    def restore(self, target: Any) -> tuple[Any, int | None]:
        """Restores the newest readable step into the structure, shapes and shardings of `target`.

        Returns (state, step), or (target, None) when the directory holds no checkpoint. The
        step's data record is then `self.data` (None when the step has none).
        """
        self.data = None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            target)
        steps = sorted(self._mngr.all_steps(), reverse=True)
        errors = []
        for step in steps:
            try:
                items = {"default": ocp.args.StandardRestore(abstract)}
                if self._has_data(step):
                    items["data"] = ocp.args.JsonRestore()
                restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
                state = restored["default"]
                self.data = dict(restored["data"]) if "data" in items else None
            except Exception as e:  # corrupt or incompatible step: try the previous one
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                errors.append(f"step {step}: {reason}")
                log.warning("checkpoint step %d in %s cannot be restored (%s); trying the "
                                "previous one", step, self.directory, reason)
                continue
            if errors:
                log.warning("resumed from step %d after skipping unreadable steps: %s", step,
                                "; ".join(errors))
            return state, step
        if steps:
            raise ValueError(
                f"checkpoint: none of the checkpoints in {self.directory} (steps {steps}) can be "
                f"restored into this model/optimizer: {' | '.join(errors)}. They were left as they "
                "are; if the config changed on purpose, use a new --workdir (or move the "
                "checkpoints directory away).")
        return target, None

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
