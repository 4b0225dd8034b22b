"""Tables and plots from a grid's results: accuracy vs GMACs with the Pareto front, heatmaps
of 2-D grids, learning curves. PNG files go into the workdir.

    python -m experiments.report WORKDIR
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaling import rundir  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig, ax, path: str, *, legend_outside: bool = False) -> str:
    """Writes the PNG and frees the figure; a line plot's axes (`ax`, None for a heatmap) get
    the grid and legend the plots share."""
    if ax is not None:
        ax.grid(alpha=0.3)
        if legend_outside:  # many entries: beside the axes, never over the data
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _done(rows: list[dict], x: str, y: str) -> list[dict]:
    return [r for r in rows if r.get("status") == "done" and r.get(x) not in (None, "")
            and r.get(y) not in (None, "")]


def plot_heatmap(rows: list[dict], path: str, *, row_axis: str, col_axis: str,
                 value: str = "val_top1", title: str = "") -> str | None:
    """Mean `value` over trials for each (row_axis, col_axis) cell; blank where none finished."""
    rows = _done(rows, row_axis, value)
    if not rows:
        return None
    rv = sorted({r[row_axis] for r in rows}, key=float)
    cv = sorted({r[col_axis] for r in rows}, key=float)
    grid = np.full((len(rv), len(cv)), np.nan)
    for i, a in enumerate(rv):
        for j, b in enumerate(cv):
            vals = [float(r[value]) for r in rows if r[row_axis] == a and r[col_axis] == b]
            if vals:
                grid[i, j] = np.mean(vals)
    fig, ax = plt.subplots(figsize=(1.2 * len(cv) + 3, 0.8 * len(rv) + 2.5))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cv)), [str(c) for c in cv])
    ax.set_yticks(range(len(rv)), [str(r) for r in rv])
    ax.set_xlabel(col_axis)
    ax.set_ylabel(row_axis)
    for i in range(len(rv)):
        for j in range(len(cv)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=9,
                        color="black" if im.norm(grid[i, j]) > 0.6 else "white")  # viridis is light at the top
    fig.colorbar(im, ax=ax, label=f"{value}, mean over seeds")
    ax.set_title(title or f"{value} by {row_axis} x {col_axis}")
    return _save(fig, None, path)


def logged(run_dir: str) -> list[dict]:
    """The records of a run's metrics.jsonl ([] when it has none)."""
    path = os.path.join(run_dir, rundir.METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def learning_curves(run_dirs: dict[str, str], path: str, *, metric: str = "train/loss",
                    title: str = "") -> str | None:
    """One line per run from its metrics.jsonl (x: step)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = 0
    for name, d in run_dirs.items():
        pts = [(p["step"], p[metric]) for p in logged(d) if metric in p]
        if pts:
            ax.plot(*zip(*pts), label=name, marker="." if len(pts) < 30 else None)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    return _save(fig, ax, path)


def format_table(rows: list[dict], columns: Sequence[str], *, markdown: bool = False) -> str:
    """`rows` as a table of `columns`: aligned plain text, or Markdown."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "/") if markdown else str(v)
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    if markdown:
        return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                         + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- study analysis
POINT_COLUMNS = ("width", "depth", "resolution", "cost_factor_theory", "cost_factor",
                 "depth_realized", "width_realized", "resolution_realized", "params", "gmacs")
X_LABELS = {"gmacs": "GMACs per image (log scale)", "params": "parameters (log scale)",
            "train_pflop": "training compute, PFLOP (log scale)"}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def add_objective(rows: list[dict], r: Any) -> None:
    """The paper's objective ACC * (GMACs / T)^w on every finished row (T: the median GMACs of
    the finished rows unless report.objective_target_gmacs is set)."""
    done = [row for row in rows if row.get("status") == "done" and _num(row.get("gmacs"))]
    if not done:
        return
    target = r.objective_target_gmacs or sorted(float(x["gmacs"]) for x in done)[len(done) // 2]
    for row in done:
        row["objective"] = float(row[r.metric]) * (float(row["gmacs"]) / target) ** r.objective_w


def summarize_points(rows: list[dict], axes: Sequence[str], metric: str, extra: Sequence[str] = ()
                     ) -> list[dict]:
    """One row per point: its values, trial statuses and the metric over its seeds (mean, std,
    95 % interval) at the furthest budget all of its healthy seeds reached."""
    from scaling import stats

    by_point: dict[str, list[dict]] = {}
    for row in rows:
        by_point.setdefault(row["point"], []).append(row)
    out = []
    for pid, trials in by_point.items():
        first = trials[0]
        p = {"point": pid, **{k: first.get(k) for k in axes}}
        p.update({k: first[k] for k in (*POINT_COLUMNS, *extra) if first.get(k) not in (None, "")})
        statuses = sorted({str(t.get("status")) for t in trials})
        p["status"] = statuses[0] if len(statuses) == 1 else "/".join(statuses)
        p["rung"] = max((int(t["rung"]) for t in trials if _num(t.get("rung")) is not None), default=None)
        vals = [float(t[metric]) for t in trials
                if t.get("status") in ("done", "pruned") and _num(t.get(metric)) is not None]
        p["seeds"] = len(trials)
        if vals:
            s = stats.summarize(vals)
            p.update(mean=s.mean, std=s.std, ci_low=s.ci_low if s.ci_known else None,
                     ci_high=s.ci_high if s.ci_known else None, n=s.n)
        p["values"] = vals
        pflop = [_num(t.get("train_pflop")) for t in trials]
        if all(v is not None for v in pflop) and pflop:
            p["train_pflop"] = float(np.mean(pflop))
        if first.get("reason") and p["status"] in ("excluded", "infeasible", "failed"):
            p["reason"] = first["reason"]
        out.append(p)
    return out


def _error(mean: float, metric: str, mode: str) -> float:
    """What the fits model: error = 1 - accuracy for an accuracy, else the metric itself."""
    return 1.0 - mean if mode == "max" and metric.startswith(("val_top", "train_top")) else mean


def in_group(row: dict, group: str, g: str, shared: Callable[[dict], bool] | None) -> bool:
    """Whether a row belongs to group g: its own, or every group when `shared` says so (the
    common base of a family, e.g. phi == 0)."""
    return not group or str(row.get(group)) == g or bool(shared and shared(row))


def scaling_fits(points: list[dict], rows: list[dict], metric: str, mode: str, xs: Sequence[str],
                 group: str, shared: Callable[[dict], bool] | None = None) -> dict:
    """Per group and cost axis: the saturating power law error = a (x + d)^-b + c over the
    finished points' seeds, bootstrap intervals, leave-largest-out error; the frontier."""
    from scaling import stats

    full = {p["point"] for p in points if p["status"] == "done" and p.get("n")}
    out: dict[str, Any] = {"fits": {}, "frontier": {}, "best_by_budget": {}}
    for x in xs:
        sel = [r for r in rows if r["point"] in full and _num(r.get(x)) and _num(r.get(metric)) is not None
               and r.get("status") == "done"]
        if not sel:
            continue
        groups = sorted({str(r.get(group)) for r in sel if not (shared and shared(r))}
                        if group else {"all"})
        fits = {}
        for g in groups:
            gs = [r for r in sel if in_group(r, group, g, shared)]
            xv = [float(r[x]) for r in gs]
            yv = [_error(float(r[metric]), metric, mode) for r in gs]
            entry = {"n_points": len({r["point"] for r in gs}), "n_trials": len(gs)}
            try:
                boot = stats.bootstrap_power_law(xv, yv, groups=[r["point"] for r in gs], n_boot=200)
                fit = stats.fit_power_law(xv, yv)
                entry.update(fit=fit.to_dict(), intervals=boot["intervals"], n_boot_ok=boot["n_ok"],
                             samples=boot["samples"],
                             leave_largest_out=stats.leave_largest_out(xv, yv))
                fits[g] = fit
            except ValueError as e:
                entry["skipped"] = str(e)
            out["fits"].setdefault(x, {})[g] = entry
        pts = [p for p in points if p["point"] in full and _num(p.get(x))]
        front = stats.pareto_frontier([(float(p[x]), _error(p["mean"], metric, mode)) for p in pts])
        out["frontier"][x] = [{"point": pts[i]["point"], "group": pts[i].get(group) if group else "",
                               x: pts[i][x], metric: pts[i]["mean"]} for i in front]
        if len(fits) > 1:
            budgets = sorted({float(p[x]) for p in pts})
            out["best_by_budget"][x] = [
                {x: b, "group": g, metric: 1 - e if _error(0.0, metric, mode) == 1.0 else e}
                for b, g, e in stats.best_by_budget(fits, budgets)]
    return out


def rung_agreement(table: list[dict], metric: str, min_tau: float) -> list[dict]:
    """Kendall tau between the rankings of consecutive rungs, over the points in both."""
    from scaling import stats

    out = []
    rungs = sorted({r["rung"] for r in table})
    for k0, k1 in zip(rungs, rungs[1:]):
        a = {r["point"]: r[metric] for r in table if r["rung"] == k0 and r[metric] is not None}
        b = {r["point"]: r[metric] for r in table if r["rung"] == k1 and r[metric] is not None}
        both = [p for p in a if p in b]
        tau = stats.kendall_tau([a[p] for p in both], [b[p] for p in both]) if len(both) >= 2 else None
        tau = None if tau is None or not np.isfinite(tau) else float(tau)
        warn = tau is None or tau < min_tau or len(both) < 3
        out.append({"from_rung": k0, "to_rung": k1, "points": len(both), "kendall_tau": tau,
                    "warning": "" if not warn else (
                        f"only {len(both)} points reached both rungs, too few for the rank agreement "
                        "to say whether pruning was safe; promote more (smaller eta) to check it."
                        if len(both) < 3 else
                        f"rank agreement tau={tau if tau is None else round(tau, 2)} over {len(both)} "
                        f"points is below sweep.halving.min_tau={min_tau}: pruning at this rung may "
                        "have dropped the eventual best; start the rungs later or promote more "
                        "(smaller eta).")})
    return out


def plot_study(points: list[dict], fits: dict, path: str, *, x: str, metric: str, mode: str,
               group: str, label: str, title: str,
               shared: Callable[[dict], bool] | None = None) -> str | None:
    """The metric against a cost: mean and 95 % interval (error bars) per point, one colour per
    group, the fitted law with its bootstrap band, the frontier."""
    from scaling import stats

    pts = [p for p in points if p.get("mean") is not None and _num(p.get(x))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(11, 5.5))
    groups = sorted({str(p.get(group)) for p in pts if not (shared and shared(p))}) if group else [""]
    colors = dict(zip(groups, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
    is_acc = _error(0.0, metric, mode) == 1.0
    for g in groups:
        sel = sorted((p for p in pts if in_group(p, group, g, shared)), key=lambda p: float(p[x]))
        xs = np.array([float(p[x]) for p in sel])
        ys = np.array([p["mean"] for p in sel])
        lo = np.array([p["mean"] - (p["ci_low"] if p.get("ci_low") is not None else p["mean"]) for p in sel])
        hi = np.array([(p["ci_high"] if p.get("ci_high") is not None else p["mean"]) - p["mean"] for p in sel])
        done = np.array([p["status"] == "done" for p in sel])
        c = colors[g]
        ax.errorbar(xs[done], ys[done], yerr=[lo[done], hi[done]], fmt="o", color=c, capsize=3,
                    label=g or "points")
        if (~done).any():
            ax.errorbar(xs[~done], ys[~done], yerr=[lo[~done], hi[~done]], fmt="x", color=c,
                        alpha=0.5, capsize=2, label=f"{g + ' ' if g else ''}pruned (earlier budget)")
        entry = fits.get("fits", {}).get(x, {}).get(g or "all")
        if entry and entry.get("fit"):
            grid_x = np.geomspace(xs.min() / 1.5, xs.max() * 2.0, 100)
            f = entry["fit"]
            curve = stats.PowerLawFit(**f).predict(grid_x)
            band = stats.prediction_band(entry["samples"], grid_x, 0.95) if entry.get("samples") else None
            to_m = (lambda e: 1 - e) if is_acc else (lambda e: e)  # noqa: E731
            ax.plot(grid_x, to_m(curve), color=c, lw=1.2, alpha=0.8,
                    label=f"{g + ': ' if g else ''}fit {'1 - ' if is_acc else ''}"
                          f"({f['a']:.3g}(x+{f['d']:.2g})^-{f['b']:.2f} + {f['c']:.3f})")
            if band is not None:
                ax.fill_between(grid_x, to_m(band[0]), to_m(band[1]), color=c, alpha=0.12)
        for p in sel:
            ax.annotate(str(p.get(label, p["point"])), (float(p[x]), p["mean"]), fontsize=6,
                        alpha=0.7, xytext=(3, 3), textcoords="offset points")
    front = fits.get("frontier", {}).get(x)
    if front:
        ax.plot([f[x] for f in front], [f[metric] for f in front], "k--", lw=0.8,
                label="frontier (best at each cost)")
    ax.set_xscale("log")
    if is_acc:  # a 2-seed t interval can reach past [0, 1]; the axis shows what is possible,
        # and at least 0.05 of it (points that all tie would get an axis of 1e-12)
        mid, half = np.mean(ax.get_ylim()), max(np.ptp(ax.get_ylim()), 0.05) / 2
        ax.set_ylim(max(mid - half, 0.0), min(mid + half, 1.0))
    ax.set_xlabel(X_LABELS.get(x, x))
    ax.set_ylabel({"val_top1": "validation top-1 (fraction)", "val_top5": "validation top-5 "
                   "(fraction)", "val_loss": "validation loss"}.get(metric, metric))
    ax.set_title(title)
    return _save(fig, ax, path, legend_outside=True)


def plot_rungs(table: list[dict], path: str, metric: str) -> str | None:
    """Each point's mean metric at each halving rung it reached."""
    if len({r["rung"] for r in table}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    for pid in dict.fromkeys(r["point"] for r in table):
        sel = sorted((r for r in table if r["point"] == pid and r[metric] is not None),
                     key=lambda r: r["rung"])
        if sel:
            ax.plot([r["step"] for r in sel], [r[metric] for r in sel], marker="o", lw=1,
                    label=pid + ("" if sel[-1]["promoted"] or len(sel) > 1 else " (pruned)"),
                    alpha=0.8)
    ax.set_xlabel("training step at the end of the rung")
    ax.set_ylabel(f"{metric}, mean over seeds")
    ax.set_title("successive halving: points by rung (promoted points continue)")
    return _save(fig, ax, path)


def md_table(rows: list[dict], columns: Sequence[str]) -> str:
    return format_table(rows, columns, markdown=True)


def _interval(p: dict) -> str:
    if p.get("mean") is None:
        return ""
    if p.get("ci_low") is None:
        return f"{p['mean']:.4f} (1 seed)"
    return f"{p['mean']:.4f} ± {p['std']:.4f} [{p['ci_low']:.4f}, {p['ci_high']:.4f}]"


def write_study(config: Any, workdir: str, rows: list[dict]) -> dict:
    """The study's analysis from its rows: points.csv, study.json, study.md and the plots."""
    from experiments import grid
    from experiments import sweep as sweep_lib
    from scaling import stats

    s, r = config.sweep, config.sweep.report
    metric, mode = r.metric, r.mode
    axes = list(s.axes.keys())
    points = summarize_points(rows, axes, metric, r.columns)
    rank_key, sign = "mean", 1 if mode == "max" else -1
    if r.select == "objective":
        add_objective(rows, r)
        grid.write_results(workdir, rows)  # the objective column goes into results.csv
        for p, o in zip(points, summarize_points(rows, axes, "objective")):
            p["objective"], p["objective_values"] = o.get("mean"), o["values"]
        rank_key, sign = "objective", 1
    ranked = sorted((p for p in points if p["status"] == "done" and p.get(rank_key) is not None),
                    key=lambda p: -sign * p[rank_key])
    table = rundir.read_json(os.path.join(workdir, "rungs.json")) or []
    agreement = rung_agreement(table, metric, float(s.halving.min_tau)) if table else []
    shared = sweep_lib.make_constraint(r.shared, "sweep.report.shared") if r.get("shared") else None
    fits = scaling_fits(points, rows, metric, mode, [x for x in r.x if any(_num(p.get(x)) for p in points)],
                        r.group, shared)
    study = {"metric": metric, "mode": mode, "select": r.select, "seeds": int(s.seeds),
             "points": points, "rungs": table, "rank_agreement": agreement,
             "fits": {x: {g: {k: v for k, v in e.items() if k != "samples"} for g, e in fs.items()}
                      for x, fs in fits["fits"].items()},
             "frontier": fits["frontier"], "best_by_budget": fits["best_by_budget"]}
    if ranked:
        best = ranked[0]
        study["best"] = {"point": best["point"], "mean": best["mean"], "std": best.get("std"),
                         "ci_low": best.get("ci_low"), "ci_high": best.get("ci_high"),
                         "n": best.get("n"), "select": r.select, "objective": best.get("objective"),
                         "values": {k: best.get(k) for k in axes + list(POINT_COLUMNS) if k in best}}
        if len(ranked) > 1:
            key = "objective_values" if r.select == "objective" else "values"
            cmp = stats.compare(best[key], ranked[1][key],
                                higher_is_better=sign == 1)
            study["best"]["runner_up"] = ranked[1]["point"]
            study["best"]["comparison"] = cmp.to_dict()
            study["best"]["sentence"] = cmp.sentence(best["point"], ranked[1]["point"],
                                                     "objective" if r.select == "objective" else metric)
    title = r.title or f"{config.get('experiment', 'sweep')}: {config.model.name}"
    plots = []
    for x in fits["fits"] or ([r.x[0]] if r.x else []):
        plots.append(plot_study(points, fits, os.path.join(workdir, f"{metric}_vs_{x}.png"), x=x,
                                metric=metric, mode=mode, group=r.group, label=r.label, title=title,
                                shared=shared))
    first = {}
    for row in rows:
        first.setdefault(row["point"], os.path.join(workdir, "trials", row["trial"]))
    finished = any(row.get("status") == "done" for row in rows)  # else nothing is missing yet
    for curve in r.curves:
        plots.append(learning_curves(first, os.path.join(workdir, f"curves_{curve.replace('/', '_')}.png"),
                                     metric=curve, title=f"{title}: {curve} (first seed)"))
        if plots[-1] is None and finished:
            names = {k for d in first.values() for record in logged(d) for k in record} - {"step"}
            log.warning("sweep.report.curves: no trial logged %r; the trials log %s", curve,
                        ", ".join(sorted(names)))
    missing = [c for c in r.columns if all(row.get(c) in (None, "") for row in rows)]
    if missing and finished:
        log.warning("sweep.report.columns: no trial has %s", ", ".join(map(repr, missing)))
    if len({row["rung"] for row in table}) > 1:
        plots.append(plot_rungs(table, os.path.join(workdir, "rungs.png"), r.metric))
    cells = [{*(p.get(a) for p in ranked)} for a in r.heatmap]
    if len(r.heatmap) == 2 and min(map(len, cells)) >= 2:  # a heatmap needs two values per axis
        plots.append(plot_heatmap([{**p, metric: p.get("mean")} for p in ranked],
                                  os.path.join(workdir, f"heatmap_{r.heatmap[0]}_{r.heatmap[1]}.png"),
                                  row_axis=r.heatmap[0], col_axis=r.heatmap[1], value=metric))
    study["plots"] = [os.path.basename(p) for p in plots if p]
    grid.write_results(workdir, [{k: v for k, v in p.items() if not k.endswith("values")}
                                 for p in points], "points")
    rundir.write_json_atomic(os.path.join(workdir, "study.json"), study)
    with open(os.path.join(workdir, "study.md"), "w") as f:
        f.write(study_markdown(config, study, title))
    print(format_table(ranked + [p for p in points if p not in ranked],
                       ["point", *axes, "status", "seeds", "mean", "std", "gmacs", "params"]))
    return study


def _winner_runs(rows: list[dict], x: str) -> list[tuple[str, str]]:
    """The fits' winner at each budget (ascending), as consecutive runs of one strategy:
    [(group, 'at 0.1' or 'from 0.1 to 0.4'), ...]."""
    runs: list[list] = []
    for row in rows:
        if runs and runs[-1][0] == row["group"]:
            runs[-1][2] = row[x]
        else:
            runs.append([row["group"], row[x], row[x]])
    return [(g, f"at {lo:.4g}" if lo == hi else f"from {lo:.4g} to {hi:.4g}") for g, lo, hi in runs]


def study_markdown(config: Any, study: dict, title: str) -> str:
    s = config.sweep
    metric, axes = study["metric"], list(s.axes.keys())
    points = study["points"]
    lines = [f"# {title}", ""]
    lines.append(f"{len(points)} points, {study['seeds']} seed(s) each; metric `{metric}` "
                 f"({'higher' if study['mode'] == 'max' else 'lower'} is better); intervals are "
                 "95 % Student-t intervals of the mean over seeds.")
    if s.halving.rungs:
        lines.append(f"Successive halving: rungs at {tuple(s.halving.rungs)} {s.halving.unit} "
                     f"then the full budget; the top 1/{s.halving.eta} of the points go on.")
    lines += ["", "## Conclusion", ""]
    best = study.get("best")
    if best:
        by = f" (chosen by the objective, {best['objective']:.4f})" if best["select"] == "objective" else ""
        lines.append(f"Best: **{best['point']}**{by}, {metric} {_interval(best)}.")
        if best.get("sentence"):
            lines += ["", best["sentence"]]
    else:
        lines.append("No point finished; nothing to conclude yet.")
    for x, rows in study["best_by_budget"].items():
        runs = _winner_runs(rows, x)
        text = (f"{runs[0][0]} wins at every budget ({runs[0][1]})" if len(runs) == 1 else
                "; ".join(f"{group} {span}" for group, span in runs))
        lines += ["", f"Compute-optimal by the fits against {x}: {text}."]
    lines += ["", "## Points", ""]
    shown = sorted(points, key=lambda p: (p.get("mean") is None, -(p.get("mean") or 0)
                                          * (1 if study["mode"] == "max" else -1)))
    cols = ["point", *[a for a in axes if a != "seed"],
            *[c for c in (*POINT_COLUMNS, *s.report.columns)
              if any(p.get(c) is not None for p in points) and c not in axes],
            "status", "rung", "seeds"]
    lines.append(md_table([{**p, metric: _interval(p)} for p in shown], cols + [metric]))
    excluded = [p for p in points if p.get("reason")]
    if excluded:
        lines += ["", "Left out:", ""] + [f"- {p['point']} ({p['status']}): {p['reason']}" for p in excluded]
    if any(p.get("cost_factor_theory") for p in points):
        lines += ["", "## Realized against theoretical cost", "",
                  "The theoretical factor is (alpha * beta^2 * gamma^2)^phi; the realized one is the "
                  "point's GMACs after channel, repeat and resolution rounding over the base's.", ""]
        lines.append(md_table(points, ["point", *[a for a in axes if a in ("scaling", "phi")],
                                       "cost_factor_theory", "cost_factor", "depth_realized",
                                       "width_realized", "resolution_realized"]))
    if len({row["rung"] for row in study["rungs"]}) > 1:
        lines += ["", "## Rungs", ""]
        lines.append(md_table(study["rungs"], ["rung", "step", "point", "seeds", s.report.metric,
                                               "rank", "promoted", "status"]))
        for a in study["rank_agreement"]:
            tau = "n/a" if a["kendall_tau"] is None else f"{a['kendall_tau']:.2f}"
            lines += ["", f"Rank agreement rung {a['from_rung']} -> {a['to_rung']}: Kendall tau "
                          f"{tau} over {a['points']} points." + (f" **Warning:** {a['warning']}"
                                                                if a["warning"] else "")]
    if study["fits"]:
        lines += ["", "## Scaling laws", "",
                  "error = a * (x + d)^(-b) + c, fitted to every finished seed (error = 1 - "
                  f"{metric} for accuracies); 95 % bootstrap intervals (seeds resampled within "
                  "each point); the leave-largest-out error is |predicted - observed| at the "
                  "largest x when it is left out of the fit.", ""]
        rows, skipped = [], []
        for x, fs in study["fits"].items():
            for g, e in fs.items():
                f, ci = e.get("fit"), e.get("intervals") or {}
                row = {"x": x, "group": g, "points": e["n_points"]}
                if f:
                    for k in ("a", "b", "c"):
                        iv = ci.get(k)
                        row[k] = f"{f[k]:.3g}" + (f" [{iv[0]:.3g}, {iv[1]:.3g}]" if iv else "")
                    lo = e.get("leave_largest_out") or {}
                    row["leave-largest-out error"] = (lo.get("abs_error") if lo.get("abs_error") is not None
                                                      else "n/a: 4+ costs needed")
                else:
                    skipped.append(f"- {x}, {g}: no fit ({e.get('skipped', '')})")
                    continue
                rows.append(row)
        if rows:
            lines.append(md_table(rows, ["x", "group", "points", "a", "b", "c", "leave-largest-out error"]))
        lines += ([""] if rows and skipped else []) + skipped
        for x, front in study["frontier"].items():
            lines += ["", f"Frontier against {x} (no cheaper point does better): " +
                      ", ".join(f"{f['point']}" + (f" ({f['group']})" if f.get("group") else "")
                                for f in front)]
    if study["plots"]:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in study["plots"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    """Re-analyses a finished or partly finished sweep workdir: results.csv/json, study.md,
    study.json and the plots."""
    from experiments import grid, sweep, transfer
    from scaling.cli import fail

    p = argparse.ArgumentParser(description="Analyse a sweep workdir: writes study.md, study.json "
                                "and the plots.\n\n    python -m experiments.report WORKDIR")
    p.add_argument("workdir")
    a = p.parse_args(argv)
    config = rundir.read_config(a.workdir)
    kind = config.get("experiment", "train") if config is not None else None
    if kind not in ("sweep", "transfer"):
        fail(f"{a.workdir}: not a sweep workdir ({'no config.json' if kind is None else f'a {kind} run'}"
             "); give the --workdir of a launch.py sweep or transfer study.")
    if kind == "transfer":  # the launch config; its study is stage 2
        config = transfer.study_config(config, a.workdir)
    try:  # the trials' states as they are on disk: a sweep stopped half-way is analysed too
        trials = sweep.trials_of(config, sweep.study_points(config, a.workdir), a.workdir)
    except (ValueError, OSError) as e:  # e.g. a coefficients_from workdir that is gone
        fail(e)
    rows = grid.collect_rows(a.workdir, trials)
    grid.write_results(a.workdir, rows)
    write_study(config, a.workdir, rows)
    print(os.path.join(a.workdir, "study.md"))


if __name__ == "__main__":
    main()
