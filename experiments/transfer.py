"""Transfer learning: the same model and budget trained from scratch, as a linear probe and
fine-tuned from pretrained weights (configs/transfer.py).

Stage 1 (`transfer.pretrain.enabled`): trains the model on the source classes in
WORKDIR/pretrain and exports its final variables as a torch-layout state dict,
WORKDIR/pretrain/pretrained.safetensors, through scaling.weights (so the target trials load
it exactly as they would a torchvision or timm checkpoint). Without it, `init.path` names
the pretrained weights.

Stage 2: a sweep (experiments/sweep.py) over `transfer.modes` x `sweep.seeds`:
`sweep.derive="transfer_mode"` sets `init.mode`, clears `init.path` for scratch, takes the
learning rate `transfer.lr.<mode>` (0 keeps train.lr); the head / backbone multipliers of
`init` apply to the finetune modes only (scratch and linear_probe have one group). Every
trial has the same data, steps and evaluation schedule. Writes study.md (the modes with
their seeds' intervals and whether the best is resolved), transfer.txt, results.csv/json and
learning curves. Everything resumes. This stays a module of its own only for stage 1.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import ml_collections

from experiments import grid, report, sweep
from scaling import rundir

log = logging.getLogger(__name__)

COLUMNS = ("trial", "mode", "seed", "status", "val_top1", "val_loss", "train_top1", "lr",
           "step", "train_time_s", "step_time_s")
EXPORT_NAME = "pretrained.safetensors"


def pretrain_config(config: Any) -> Any:
    """The stage-1 training config: source classes, its own duration and lr, no init."""
    p = config.transfer.pretrain
    cfg = copy.deepcopy(config)
    cfg.data.update(classes=tuple(p.classes), examples_per_class=int(p.examples_per_class))
    cfg.train.update(num_epochs=float(p.num_epochs), num_steps=0, lr=float(p.lr),
                     batch_size=int(p.batch_size), eval_every_epochs=float(p.eval_every_epochs),
                     eval_every_steps=0)
    cfg.init.update(mode="scratch", path="")
    return cfg


def sweep_config(config: Any, init_path: str) -> Any:
    """The stage-2 sweep: one point per mode, `sweep.seeds` seeds each."""
    from scaling.train.finetune import MODES

    modes = tuple(config.transfer.modes)
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"transfer.modes={modes!r}: distinct entries of {', '.join(MODES)}.")
    cfg = copy.deepcopy(config)
    cfg.init.path = init_path
    cfg.sweep.update(derive="transfer_mode", combine="product", constraint="", cost_tolerance=0.0)
    cfg.sweep.axes = ml_collections.ConfigDict(dict(mode=modes))
    cfg.sweep.report.update(label="mode", x=(), curves=("eval/top1", "train/loss"), heatmap=(),
                            columns=("lr",), title=f"transfer: {config.model.name}")
    return cfg


def export_path(workdir: str) -> str:
    return os.path.join(workdir, "pretrain", EXPORT_NAME)


def validate(config: Any, num_devices: int | None = None) -> None:
    pretrain = bool(config.transfer.pretrain.enabled)
    if pretrain and config.init.path:
        raise ValueError(f"init.path={config.init.path!r} is set but transfer.pretrain.enabled=True "
                         "trains the weights here first; clear init.path, or transfer from the "
                         "file with --config.transfer.pretrain.enabled=False.")
    if pretrain:
        grid.validate_trials(config.grid, [grid.Trial("pretrain", {}, pretrain_config(config))],
                             num_devices, "transfer.pretrain")
    elif not config.init.path:
        raise ValueError("init.path: set the pretrained weights to transfer "
                         "(--config.init.path=/path/to/weights.safetensors), or enable "
                         "transfer.pretrain to train them here first.")
    # With stage 1 the weights do not exist yet: check everything else of the trials now.
    cfg = sweep_config(config, "" if pretrain else config.init.path)
    points = sweep.build_points(cfg)
    sweep.validate_report(cfg, points)
    trials = sweep.trials_of(cfg, points)
    if pretrain:
        for t in trials:
            t.config.init.update(mode="scratch", path="")
    grid.validate_trials(config.grid, trials, num_devices, "transfer trial {id}")


def run_pretraining(config: Any, workdir: str) -> tuple[str, dict]:
    """Stage 1: trains (or resumes) in WORKDIR/pretrain and exports the final variables."""
    import jax

    from scaling import weights
    from scaling.train import fit, load_run

    cfg = pretrain_config(config)
    pdir = os.path.join(workdir, "pretrain")
    result = rundir.read_result(pdir)
    if not result or result.get("status") != "done":
        result = fit(cfg, pdir)
    path = export_path(workdir)
    if jax.process_index() == 0 and not os.path.exists(path):
        _, run, variables = load_run(pdir)
        model = run.model
        weights.save(path, model, variables, metadata={
            "model": cfg.model.name, "fields": json.dumps(cfg.model.to_dict()),
            "classes": json.dumps(list(cfg.data.classes)), "val_top1": str(result.get("val_top1"))})
        log.info("pretrained %s (val top-1 %.3f) exported to %s", cfg.model.name,
                 result.get("val_top1") or 0.0, path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("transfer: pretrained weights exported")
    return path, result


def study_config(config: Any, workdir: str) -> Any:
    """The stage-2 sweep of a transfer workdir from the config it was launched with (its
    config.json), for `python -m experiments.report WORKDIR`."""
    enabled = config.transfer.pretrain.enabled
    return sweep_config(config, export_path(workdir) if enabled else config.init.path)


def run(config: Any, workdir: str) -> dict:
    pretrained = None
    init_path = config.init.path
    if config.transfer.pretrain.enabled:
        init_path, pretrained = run_pretraining(config, workdir)
    out = sweep.run(sweep_config(config, init_path), workdir)
    rows = rundir.read_json(os.path.join(workdir, "results.json"))
    if not out or rows is None:
        return {}
    header = [f"target: {config.model.name} on {config.data.source}:{config.data.name} classes "
              f"{tuple(config.data.classes) or 'all'}, {config.data.examples_per_class or 'all'} "
              f"examples per class, {config.train.num_epochs:g} epochs; weights: {init_path}"]
    if pretrained:
        header.append(f"source: {tuple(config.transfer.pretrain.classes)}, val top-1 "
                      f"{pretrained.get('val_top1', float('nan')):.4f} after "
                      f"{config.transfer.pretrain.num_epochs:g} epochs")
    text = "\n".join(header + ["", report.format_table(rows, COLUMNS)])
    with open(os.path.join(workdir, "transfer.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    done = {r["trial"]: r.get("val_top1") for r in rows if r.get("status") == "done"}
    return {**out, "val_top1": done, "table": os.path.join(workdir, "transfer.txt"),
            "pretrain_val_top1": pretrained and pretrained.get("val_top1")}
