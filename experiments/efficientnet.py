"""EfficientNet compound scaling, end to end (Tan & Le 2019, section 3.3 and eqs. 6-9).

Step 1, `efficientnet_search`: sweep alpha (depth), beta (width), gamma (resolution) >= 1 on a
grid at phi = 1, keep the combinations with |alpha * beta^2 * gamma^2 - target| <= tolerance,
apply each to the baseline through the shared rounding rules (`scaling.scaling_rules`), train
all with the same budget, and pick the best by validation accuracy or by the paper's
objective ACC * (FLOPs / T)^w. Trials over `grid.max_gmacs` / `grid.max_memory_mb` (the
paper's FLOPs and memory limits) are recorded `infeasible` before any training.

Step 2, `efficientnet_family`: phi = 0..N from the chosen coefficients (a search's best.json,
or the paper's 1.2 / 1.1 / 1.15), beside single-dimension baselines (depth-only, width-only,
resolution-only) whose multiplier gives the same theoretical FLOPs growth
(alpha * beta^2 * gamma^2)^phi, so the report reproduces the compound-vs-single comparison.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any

import ml_collections

from experiments import grid, report
from scaling import scaling_rules

SELECT = ("accuracy", "objective")
SCALINGS = ("compound", "depth", "width", "resolution")


def default_search_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        alpha=(1.0, 1.1, 1.2, 1.3, 1.4, 1.5),   # depth coefficient candidates
        beta=(1.0, 1.05, 1.1, 1.15, 1.2, 1.3),  # width
        gamma=(1.0, 1.05, 1.1, 1.15, 1.2, 1.3),  # resolution
        phi=1.0,
        target=2.0,                # alpha * beta^2 * gamma^2 ~= target
        tolerance=0.1,
        base_width=1.0,            # the baseline (B0: 1.0, 1.0, 224)
        base_depth=1.0,
        base_resolution=224,
        resolution_divisor=8,
        select="accuracy",         # accuracy | objective (ACC * (GMACs / T)^w)
        objective_w=-0.07,
        objective_target_gmacs=0.0,  # T; 0 = the median GMACs of the finished trials
    ))


def default_family_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        alpha=scaling_rules.PAPER_ALPHA, beta=scaling_rules.PAPER_BETA, gamma=scaling_rules.PAPER_GAMMA,
        coefficients_from=ml_collections.config_dict.placeholder(str),  # a search workdir
        phis=(0, 1, 2, 3, 4, 5, 6, 7),
        single_dimension=True,     # also depth-only / width-only / resolution-only baselines
        tolerance=0.1,             # |alpha*beta^2*gamma^2 - search.target| allowed (paper: 1.92)
    ))


def scaled_config(config: Any, width: float, depth: float, resolution: int) -> Any:
    cfg = copy.deepcopy(config)
    cfg.model.width = float(width)
    cfg.model.depth = float(depth)
    cfg.data.image_size = int(resolution)
    return cfg


def _r(x: float) -> float:
    return round(float(x), 6)


# ----------------------------------------------------------------------------- search
def search_points(s: Any) -> list[dict]:
    def ok(p):
        return abs(scaling_rules.flops_factor(p["alpha"], p["beta"], p["gamma"]) - s.target) <= s.tolerance
    for name in ("alpha", "beta", "gamma"):
        bad = [v for v in s[name] if v < 1.0]
        if bad:
            raise ValueError(f"search.{name}: every value must be >= 1 (compound scaling never "
                             f"shrinks a dimension); got {bad}.")
    return grid.grid_points({"alpha": s.alpha, "beta": s.beta, "gamma": s.gamma}, "product", ok)


def search_trials(config: Any) -> list[grid.Trial]:
    s = config.search
    points = search_points(s)
    if not points:
        raise ValueError(f"search.tolerance={s.tolerance}: no (alpha, beta, gamma) on the grid has "
                         f"alpha*beta^2*gamma^2 within it of {s.target}; widen the tolerance or the grid.")
    trials = []
    for p in points:
        c = scaling_rules.compound_coefficients(s.phi, p["alpha"], p["beta"], p["gamma"])
        res = scaling_rules.scaled_resolution(s.base_resolution, c.resolution_factor, s.resolution_divisor)
        cfg = scaled_config(config, s.base_width * c.width, s.base_depth * c.depth, res)
        values = {**p, "flops_factor": _r(scaling_rules.flops_factor(**p)),
                  "width": _r(s.base_width * c.width), "depth": _r(s.base_depth * c.depth),
                  "resolution": res}
        trials.append(grid.Trial(grid.trial_id(p), values, cfg))
    return trials


def select_best(rows: list[dict], s: Any) -> dict | None:
    done = [r for r in rows if r.get("status") == "done" and r.get("val_top1") is not None]
    if not done:
        return None
    if s.select == "accuracy":
        return max(done, key=lambda r: float(r["val_top1"]))
    target = s.objective_target_gmacs or sorted(float(r["gmacs"]) for r in done)[len(done) // 2]
    for r in done:
        r["objective"] = float(r["val_top1"]) * (float(r["gmacs"]) / target) ** s.objective_w
    return max(done, key=lambda r: r["objective"])


def validate_search(config: Any, num_devices: int | None = None) -> None:
    s = config.search
    if s.select not in SELECT:
        raise ValueError(f"search.select: unknown {s.select!r}; use one of {', '.join(SELECT)}.")
    trials = search_trials(config)
    for t in trials:
        scaling_rules.check_constraint(t.values["alpha"], t.values["beta"], t.values["gamma"],
                                       s.target, s.tolerance, prefix="search.")
    grid.validate_trials(config.grid, trials, num_devices)


def run_search(config: Any, workdir: str) -> dict:
    rows = grid.run_grid(search_trials(config), workdir, config.grid)
    if not rows:
        return {}
    best = select_best(rows, config.search)
    if config.search.select == "objective":
        grid.collect_results(workdir, search_trials(config))  # rows now carry 'objective'
    plots = [report.plot_accuracy_vs_cost(rows, os.path.join(workdir, "accuracy_vs_gmacs.png"),
                                          title="compound coefficient search (phi=1)")]
    two_d = [r for r in rows if r.get("status") == "done"]
    if two_d:
        plots.append(report.plot_heatmap(rows, os.path.join(workdir, "heatmap_alpha_gamma.png"),
                                         row_axis="alpha", col_axis="gamma",
                                         title="val top-1 by alpha x gamma (beta implied)"))
    out = {"trials": len(rows), "done": sum(r.get("status") == "done" for r in rows)}
    if best:
        chosen = {k: best[k] for k in ("alpha", "beta", "gamma", "val_top1", "gmacs", "trial")}
        chosen["select"] = config.search.select
        grid.write_json_atomic(os.path.join(workdir, "best.json"), chosen)
        out.update(best=best["trial"], alpha=best["alpha"], beta=best["beta"], gamma=best["gamma"],
                   best_val_top1=best["val_top1"])
    print(report.format_table(rows, ["trial", "alpha", "beta", "gamma", "flops_factor", "resolution",
                                     "status", "val_top1", "params", "gmacs", "peak_memory_mb",
                                     "train_time_s"]))
    out["plots"] = [p for p in plots if p]
    return out


# ----------------------------------------------------------------------------- family
def family_coefficients(config: Any) -> tuple[float, float, float]:
    f = config.family
    if f.coefficients_from:
        path = os.path.join(f.coefficients_from, "best.json")
        if not os.path.exists(path):
            raise ValueError(f"family.coefficients_from: {path} does not exist; run "
                             "configs/efficientnet_grid.py with that workdir first, or unset it "
                             "to use the paper's 1.2 / 1.1 / 1.15.")
        best = json.load(open(path))
        return float(best["alpha"]), float(best["beta"]), float(best["gamma"])
    return float(f.alpha), float(f.beta), float(f.gamma)


def family_trials(config: Any) -> list[grid.Trial]:
    s, f = config.search, config.family
    a, b, g = family_coefficients(config)
    growth = scaling_rules.flops_factor(a, b, g)
    trials = []
    for phi in f.phis:
        kinds = SCALINGS if f.single_dimension and phi > 0 else ("compound",)
        for kind in kinds:
            if kind == "compound":
                d, w, r = scaling_rules.compound_coefficients(phi, a, b, g)
            elif kind == "depth":   # same FLOPs growth from depth alone: d = growth^phi
                d, w, r = growth ** phi, 1.0, 1.0
            elif kind == "width":   # FLOPs ~ w^2
                d, w, r = 1.0, growth ** (phi / 2), 1.0
            else:                   # FLOPs ~ r^2
                d, w, r = 1.0, 1.0, growth ** (phi / 2)
            res = scaling_rules.scaled_resolution(s.base_resolution, r, s.resolution_divisor)
            cfg = scaled_config(config, s.base_width * w, s.base_depth * d, res)
            values = {"scaling": kind, "phi": phi, "alpha": a, "beta": b, "gamma": g,
                      "width": _r(s.base_width * w), "depth": _r(s.base_depth * d), "resolution": res}
            tid = f"{kind}-phi{phi}"
            trials.append(grid.Trial(tid, values, cfg))
    return trials


def validate_family(config: Any, num_devices: int | None = None) -> None:
    a, b, g = family_coefficients(config)
    scaling_rules.check_constraint(a, b, g, config.search.target, config.family.tolerance,
                                   prefix="family.")
    grid.validate_trials(config.grid, family_trials(config), num_devices)


def run_family(config: Any, workdir: str) -> dict:
    trials = family_trials(config)
    rows = grid.run_grid(trials, workdir, config.grid)
    if not rows:
        return {}
    plots = [report.plot_accuracy_vs_cost(rows, os.path.join(workdir, "compound_vs_single.png"),
                                          group="scaling", label="phi",
                                          title="compound vs single-dimension scaling")]
    print(report.format_table(rows, ["trial", "scaling", "phi", "width", "depth", "resolution",
                                     "status", "val_top1", "params", "gmacs", "train_time_s"]))
    return {"trials": len(rows), "done": sum(r.get("status") == "done" for r in rows),
            "plots": [p for p in plots if p]}
