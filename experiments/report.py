"""Tables and plots from a grid's results: accuracy vs GMACs with the Pareto front, heatmaps
of 2-D grids, learning curves. PNG files go into the workdir.

    python -m experiments.report WORKDIR [--x gmacs] [--heatmap l,k]
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated (lower cost x, higher accuracy y), by rising x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -np.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _save(fig, ax, path: str) -> str:
    """Grid, legend and layout shared by the line plots; writes the PNG and frees the figure."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _done(rows: list[dict], x: str, y: str) -> list[dict]:
    return [r for r in rows if r.get("status") == "done" and r.get(x) not in (None, "")
            and r.get(y) not in (None, "")]


def plot_accuracy_vs_cost(rows: list[dict], path: str, *, x: str = "gmacs", y: str = "val_top1",
                          label: str = "trial", group: str | None = None, title: str = "") -> str | None:
    rows = _done(rows, x, y)
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    groups = sorted({str(r.get(group)) for r in rows}) if group else [None]
    for g in groups:
        sel = [r for r in rows if group is None or str(r.get(group)) == g]
        ax.scatter([float(r[x]) for r in sel], [float(r[y]) for r in sel], label=g, alpha=0.8)
        if group:
            sel = sorted(sel, key=lambda r: float(r[x]))
            ax.plot([float(r[x]) for r in sel], [float(r[y]) for r in sel], alpha=0.5)
    for r in rows:
        ax.annotate(str(r.get(label, "")), (float(r[x]), float(r[y])), fontsize=6, alpha=0.7)
    pts = [(float(r[x]), float(r[y])) for r in rows]
    front = pareto_front(pts)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("GMACs per image" if x == "gmacs" else x)
    ax.set_ylabel("validation top-1" if y == "val_top1" else y)
    ax.set_title(title or f"{y} vs {x}")
    return _save(fig, ax, path)


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
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label=value)
    ax.set_title(title or f"{value} by {row_axis} x {col_axis}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def learning_curves(run_dirs: dict[str, str], path: str, *, metric: str = "train/loss",
                    title: str = "") -> str | None:
    """One line per run from its metrics.jsonl (x: step)."""
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = 0
    for name, d in run_dirs.items():
        f = os.path.join(d, "metrics.jsonl")
        if not os.path.exists(f):
            continue
        pts = [json.loads(line) for line in open(f) if line.strip()]
        pts = [(p["step"], p[metric]) for p in pts if metric in p]
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


def format_table(rows: list[dict], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--x", default="gmacs")
    p.add_argument("--heatmap", default="", help="two axis names, e.g. l,k")
    a = p.parse_args(argv)
    rows = json.load(open(os.path.join(a.workdir, "results.json")))
    print(plot_accuracy_vs_cost(rows, os.path.join(a.workdir, "accuracy_vs_gmacs.png"), x=a.x))
    if a.heatmap:
        r, c = a.heatmap.split(",")
        print(plot_heatmap(rows, os.path.join(a.workdir, f"heatmap_{r}_{c}.png"), row_axis=r, col_axis=c))


if __name__ == "__main__":
    main()
