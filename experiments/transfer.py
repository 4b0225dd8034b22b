"""Transfer learning: the same model and budget trained from scratch, as a linear probe and
fine-tuned from pretrained weights (configs/transfer.py).

Stage 1 (`transfer.pretrain.enabled`): trains the model on the source classes in
WORKDIR/pretrain and exports its final variables as a torch-layout state dict,
WORKDIR/pretrain/pretrained.safetensors, through scaling.weights (so the target trials load
it exactly as they would a torchvision or timm checkpoint). Without it, `init.path` names
the pretrained weights.

Stage 2: one grid trial per `transfer.modes` entry (WORKDIR/trials/<mode>): `init.mode` set,
`init.path` cleared for scratch, learning rate `transfer.lr.<mode>` (0 keeps train.lr); the
head / backbone multipliers of `init` apply to the finetune modes only (scratch and
linear_probe have one group). Every trial has the same data, steps and evaluation schedule.
Writes transfer.txt (the table), results.csv/json, curves_eval_top1.png and
curves_train_loss.png. Everything resumes.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

from experiments import grid, report

log = logging.getLogger(__name__)

COLUMNS = ("trial", "mode", "status", "val_top1", "val_loss", "train_top1", "lr",
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


def build_trials(config: Any, init_path: str) -> list[grid.Trial]:
    from scaling.train.finetune import MODES

    modes = tuple(config.transfer.modes)
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ValueError(f"transfer.modes={modes!r}: distinct entries of {', '.join(MODES)}.")
    trials = []
    for mode in modes:
        cfg = copy.deepcopy(config)
        cfg.init.update(mode=mode, path="" if mode == "scratch" else init_path)
        if mode in ("scratch", "linear_probe"):  # one group: its lr is transfer.lr.<mode>
            cfg.init.update(head_lr_mult=1.0, backbone_lr_mult=1.0)
        lr = float(config.transfer.lr.get(mode, 0.0) or 0.0)
        if lr > 0:
            cfg.train.lr = lr
        trials.append(grid.Trial(mode, {"mode": mode, "lr": cfg.train.lr}, cfg))
    return trials


def export_path(workdir: str) -> str:
    return os.path.join(workdir, "pretrain", EXPORT_NAME)


def validate(config: Any, num_devices: int | None = None) -> None:
    pretrain = bool(config.transfer.pretrain.enabled)
    if pretrain:
        grid.validate_trials(config.grid, [grid.Trial("pretrain", {}, pretrain_config(config))],
                             num_devices, "transfer.pretrain")
    elif not config.init.path:
        raise ValueError("init.path: set the pretrained weights to transfer "
                         "(--config.init.path=/path/to/weights.safetensors), or enable "
                         "transfer.pretrain to train them here first.")
    # With stage 1 the weights do not exist yet: check everything else of the trials now.
    trials = build_trials(config, "" if pretrain else config.init.path)
    if pretrain:
        for t in trials:
            t.config.init.update(mode="scratch", path="")
    grid.validate_trials(config.grid, trials, num_devices, "transfer trial {id}")


def run_pretraining(config: Any, workdir: str) -> tuple[str, dict]:
    """Stage 1: trains (or resumes) in WORKDIR/pretrain and exports the final variables."""
    import jax

    from scaling import weights
    from scaling.train import fit

    cfg = pretrain_config(config)
    pdir = os.path.join(workdir, "pretrain")
    result = grid.read_result(pdir)
    if not result or result.get("status") != "done":
        result = fit(cfg, pdir)
    path = export_path(workdir)
    if jax.process_index() == 0 and not os.path.exists(path):
        model, variables = final_variables(cfg, pdir)
        weights.save(path, model, variables, metadata={
            "model": cfg.model.name, "fields": json.dumps(cfg.model.to_dict()),
            "classes": json.dumps(list(cfg.data.classes)), "val_top1": str(result.get("val_top1"))})
        log.info("pretrained %s (val top-1 %.3f) exported to %s", cfg.model.name,
                 result.get("val_top1") or 0.0, path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("transfer: pretrained weights exported")
    return path, result


def final_variables(config: Any, run_dir: str) -> tuple[Any, dict]:
    """(model, {'params', 'batch_stats'}) of the newest checkpoint of a `fit` run."""
    from scaling import parallel
    from scaling.checkpoint import Checkpointer
    from scaling.data import build_source
    from scaling.train.loop import make_run

    source = build_source(config.data, config.data.train_split)
    run = make_run(config, parallel.make_mesh(), source.num_classes, len(source))
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        state, step = checkpointer.restore(run.state_spec)
    finally:
        checkpointer.close()
    if step is None:
        raise FileNotFoundError(f"transfer: no checkpoint in {run_dir}/checkpoints to export.")
    variables = {"params": parallel.fetch(state.params)}
    if state.batch_stats:
        variables["batch_stats"] = parallel.fetch(state.batch_stats)
    return run.model, variables


def run(config: Any, workdir: str) -> dict:
    pretrained = None
    init_path = config.init.path
    if config.transfer.pretrain.enabled:
        init_path, pretrained = run_pretraining(config, workdir)
    trials = build_trials(config, init_path)
    rows = grid.run_grid(trials, workdir, config.grid)
    if not rows:
        return {}
    table = report.format_table(rows, COLUMNS)
    header = [f"target: {config.model.name} on {config.data.source}:{config.data.name} classes "
              f"{tuple(config.data.classes) or 'all'}, {config.data.examples_per_class or 'all'} "
              f"examples per class, {config.train.num_epochs:g} epochs; weights: {init_path}"]
    if pretrained:
        header.append(f"source: {tuple(config.transfer.pretrain.classes)}, val top-1 "
                      f"{pretrained.get('val_top1', float('nan')):.4f} after "
                      f"{config.transfer.pretrain.num_epochs:g} epochs")
    text = "\n".join(header + ["", table])
    with open(os.path.join(workdir, "transfer.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    dirs = {t.id: os.path.join(workdir, "trials", t.id) for t in trials}
    plots = [report.learning_curves(dirs, os.path.join(workdir, f"curves_{metric.replace('/', '_')}.png"),
                                    metric=metric, title=f"transfer: {title}")
             for metric, title in (("eval/top1", "validation top-1"), ("train/loss", "training loss"))]
    done = {r["trial"]: r.get("val_top1") for r in rows if r.get("status") == "done"}
    return {"trials": len(rows), "val_top1": done, "table": os.path.join(workdir, "transfer.txt"),
            "pretrain_val_top1": pretrained and pretrained.get("val_top1"),
            "plots": [p for p in plots if p]}
