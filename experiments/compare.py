"""Model comparison on the same data and budget: params, size, GMACs, step time, training
time and accuracy, with learning curves. `config.compare.models` maps a label to a model
section (`name` + field overrides); every model is one trial of the grid engine, so the
comparison resumes, splits over workers and isolates failures like any grid.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections

from experiments import grid, report

COLUMNS = ("trial", "status", "params", "size_mb", "gmacs", "step_time_s", "train_time_s",
           "val_top1", "val_top5", "peak_memory_mb")


def build_trials(config: Any) -> list[grid.Trial]:
    trials = []
    for label, model in config.compare.models.items():
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.model = ml_collections.ConfigDict(model.to_dict())
        trials.append(grid.Trial(label, {"model": model.name}, cfg))
    if not trials:
        raise ValueError("compare.models: name at least one model to compare.")
    return trials


def validate(config: Any, num_devices: int | None = None) -> None:
    grid.validate_trials(config.grid, build_trials(config), num_devices, "compare.models.{id}")


def run(config: Any, workdir: str) -> dict:
    trials = build_trials(config)
    rows = grid.run_grid(trials, workdir, config.grid)
    if not rows:
        return {}
    table = report.format_table(rows, COLUMNS)
    with open(os.path.join(workdir, "comparison.txt"), "w") as f:
        f.write(table + "\n")
    print(table)
    dirs = {t.id: os.path.join(workdir, "trials", t.id) for t in trials}
    plots = [report.learning_curves(dirs, os.path.join(workdir, "curves_eval_top1.png"),
                                    metric="eval/top1", title="validation top-1"),
             report.learning_curves(dirs, os.path.join(workdir, "curves_train_loss.png"),
                                    metric="train/loss", title="training loss"),
             report.plot_accuracy_vs_cost(rows, os.path.join(workdir, "accuracy_vs_gmacs.png"))]
    return {"models": len(rows), "table": os.path.join(workdir, "comparison.txt"),
            "plots": [p for p in plots if p]}
