"""A generic grid over config fields: `config.grid.axes` (name -> values), `config.grid.targets`
(name -> config path), `mode` product or zip, and an optional `constraint` expression over
the axis names, e.g. "(depth - 4) % (3 * l) == 0". Every trial config is validated before
anything is compiled. Writes results.csv/json, accuracy_vs_gmacs.png and, with
`grid.heatmap=('l', 'k')`, a heatmap.
"""
from __future__ import annotations

import math
import os
from typing import Any

from experiments import grid, report

_SAFE = {"abs": abs, "min": min, "max": max, "round": round, "math": math}


def make_constraint(expr: str):
    if not expr:
        return None
    try:
        code = compile(expr, "grid.constraint", "eval")
    except SyntaxError as e:
        raise ValueError(f"grid.constraint: {expr!r} is not a Python expression ({e.msg}).") from None

    def check(point: dict) -> bool:
        try:
            return bool(eval(code, {"__builtins__": {}}, {**_SAFE, **point}))  # noqa: S307
        except NameError as e:
            raise ValueError(f"grid.constraint: {e}; the axes are {', '.join(point)}.") from None
    return check


def build_trials(config: Any) -> list[grid.Trial]:
    g = config.grid
    axes = {k: tuple(v) for k, v in g.axes.items()}
    targets = dict(g.targets)
    missing = [a for a in axes if a not in targets]
    if missing:
        raise ValueError(f"grid.targets: no config path for axis {missing[0]!r}; add "
                         f"--config.grid.targets.{missing[0]}=section.field.")
    points = grid.grid_points(axes, g.mode, make_constraint(g.constraint))
    if not points:
        raise ValueError("grid.axes / grid.constraint: no trial satisfies the constraint.")
    return [grid.Trial(grid.trial_id(p), p, grid.trial_config(config, p, targets)) for p in points]


def validate(config: Any, num_devices: int | None = None) -> None:
    grid.validate_trials(config.grid, build_trials(config), num_devices)


def write_report(config: Any, workdir: str, rows: list[dict]) -> list[str]:
    out = [report.plot_accuracy_vs_cost(rows, os.path.join(workdir, "accuracy_vs_gmacs.png"),
                                        title=f"{config.model.name}: accuracy vs compute")]
    hm = tuple(config.grid.get("heatmap", ()) or ())
    if len(hm) == 2:
        out.append(report.plot_heatmap(rows, os.path.join(workdir, f"heatmap_{hm[0]}_{hm[1]}.png"),
                                       row_axis=hm[0], col_axis=hm[1]))
    return [p for p in out if p]


def run(config: Any, workdir: str) -> dict:
    rows = grid.run_grid(build_trials(config), workdir, config.grid)
    if not rows:
        return {}
    plots = write_report(config, workdir, rows)
    done = [r for r in rows if r.get("status") == "done"]
    best = max(done, key=lambda r: float(r["val_top1"]), default=None)
    print(report.format_table(rows, ["trial", *config.grid.axes.keys(), "status", "val_top1",
                                     "params", "gmacs", "peak_memory_mb", "train_time_s"]))
    return {"trials": len(rows), "done": len(done), "best": best and best["trial"],
            "best_val_top1": best and best["val_top1"], "results": os.path.join(workdir, "results.csv"),
            "plots": plots}
