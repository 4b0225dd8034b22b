"""One declarative sweep: every study (compound search, phi family, WRN grid, model
comparison, resolution or width tables) is a `config.sweep` section, not a module.

    sweep.axes        name -> values                     e.g. alpha=(1.0, 1.2), l=(1, 2)
    sweep.targets     name -> config path the value is written to (k -> model.widen_factor);
                      axes without one are inputs of `derive` and `constraint` only
    sweep.combine     product | zip | chain, or an expression over the axis names with
                      product(), zip() and chain(), e.g. "chain(product(l, k), zip(depth, k))"
    sweep.constraint  Python expression over the axis names; points where it is false are
                      not part of the study, e.g. "(depth - 4) % (3 * l) == 0"
    sweep.derive      a named function of the point that sets further config fields:
                      "compound" (EfficientNet: alpha, beta, gamma, phi and `scaling` ->
                      model.width, model.depth, data.image_size through the shared rounding
                      rules; settings in `sweep.compound`), "models" (axis `model`: a label of
                      `sweep.models` whose section replaces config.model), "transfer_mode"
                      (axis `mode`: init.mode, init.path and the mode's lr), or "" (none)
    sweep.seeds       replicates per point (seed = config.seed + i); tables give mean, std
                      and a 95 % interval, plots error bars
    sweep.cost_tolerance  keep only points whose realized cost factor (GMACs after rounding /
                      the base's) is within this fraction of the theoretical one; 0 keeps all.
                      Points that build the same network as an earlier point are always dropped.
    sweep.halving     successive halving: `rungs` (budgets before the full one, in `unit`
                      epochs | steps), `eta` (the top 1/eta of the points go on)
    sweep.report      metric and direction, the x of the plots and fits, the grouping (one
                      curve / fit per group), columns, heatmap, how "best" is chosen

Each (point, seed) is one trial of the grid engine (experiments/grid.py): resumable,
split over workers, failures isolated. At the end the study is analysed (experiments/report.py):
results.csv/json, points.csv, study.json, study.md and plots.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import logging
import math
import os
from typing import Any, Callable

import ml_collections

from experiments import grid, report
from scaling import rundir, scaling_rules

log = logging.getLogger(__name__)
placeholder = ml_collections.config_dict.placeholder

_SAFE = {"abs": abs, "min": min, "max": max, "round": round, "math": math}
SCALINGS = ("compound", "depth", "width", "resolution")
METRICS = {"val_top1": "max", "val_top5": "max", "val_loss": "min",  # metric -> better when
           "train_top1": "max", "train_loss": "min"}
COSTS = ("gmacs", "params", "train_pflop")  # what every trial's cost is measured in


def default_sweep_config() -> ml_collections.ConfigDict:
    """The whole sweep schema with its defaults (README "Sweeps")."""
    return ml_collections.ConfigDict(dict(
        axes=ml_collections.ConfigDict(),       # name -> tuple of values
        targets=ml_collections.ConfigDict(),    # name -> config path
        combine="product",                      # product | zip | chain | an expression
        constraint="",                          # Python expression over the axis names
        derive="",                              # "" | compound
        seeds=1,                                # replicates per point
        cost_tolerance=0.0,                     # |realized / theoretical cost - 1| allowed; 0 = all
        compound=default_compound_config(),
        models=ml_collections.ConfigDict(),     # derive=models: label -> model section
        halving=ml_collections.ConfigDict(dict(
            rungs=(),                           # budgets before the full one; () = no halving
            unit="epochs",                      # epochs | steps
            eta=3,                              # keep the top 1/eta of the points at each rung
            min_tau=0.5,                        # warn when Kendall tau between rungs is lower
        )),
        report=ml_collections.ConfigDict(dict(
            metric="val_top1",                  # what "best" and the fits use
            mode="max",                         # max | min
            select="metric",                    # metric | objective (ACC * (GMACs / T)^w)
            objective_w=-0.07,
            objective_target_gmacs=0.0,         # T; 0 = the median GMACs of the finished points
            x=("gmacs", "params", "train_pflop"),  # cost axes of the fits
            group="",                           # one curve / fit per value of this column
            shared="",                          # rows in every group, e.g. "phi == 0" (the base)
            label="point",                      # text next to each plotted point
            columns=(),                         # extra columns of the point table
            heatmap=(),                         # two axis names
            curves=(),                          # learning curves to plot, e.g. ("eval/top1",)
            title="",
        )),
    ))


def default_compound_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        phi=1.0,                                # when phi is not an axis
        alpha=scaling_rules.PAPER_ALPHA,        # when not an axis (or coefficients_from)
        beta=scaling_rules.PAPER_BETA,
        gamma=scaling_rules.PAPER_GAMMA,
        coefficients_from=placeholder(str),     # a finished search's workdir (its best.json)
        base_width=1.0,                         # the baseline B0: 1.0, 1.0, 224
        base_depth=1.0,
        base_resolution=224,
        resolution_divisor=8,
        published=False,                        # phi -> the released B0-B7 table, not the formula
        match_cost=False,                       # single-dimension points: multiplier chosen so
                                                # the realized GMACs match the compound point's
    ))


# ----------------------------------------------------------------------------- points
def combine_points(axes: dict[str, tuple], combine: str) -> list[dict]:
    """Axis values -> points, by `combine` (product | zip | chain | an expression)."""
    names = list(axes)
    if combine in ("product", "zip", "chain"):
        combine = f"{combine}({', '.join(names)})"
    lists = {n: [{n: v} for v in axes[n]] for n in names}

    def product(*parts):
        return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*parts)]

    def zip_(*parts):
        if len({len(p) for p in parts}) > 1:
            raise ValueError(f"sweep.combine: zip() needs parts of one length, got "
                             f"{[len(p) for p in parts]}.")
        return [dict(kv for d in combo for kv in d.items()) for combo in zip(*parts)]

    def chain(*parts):
        return [p for part in parts for p in part]

    try:
        points = eval(compile(combine, "sweep.combine", "eval"),  # noqa: S307
                      {"__builtins__": {}}, {**lists, "product": product, "zip": zip_, "chain": chain})
    except NameError as e:
        raise ValueError(f"sweep.combine={combine!r}: {e}; the axes are {', '.join(names)}.") from None
    except SyntaxError as e:
        raise ValueError(f"sweep.combine={combine!r} is not an expression ({e.msg}).") from None
    return [dict(sorted(p.items(), key=lambda kv: names.index(kv[0]))) for p in points]


def make_constraint(expr: str, field: str = "sweep.constraint") -> Callable[[dict], bool] | None:
    if not expr:
        return None
    try:
        code = compile(expr, field, "eval")
    except SyntaxError as e:
        raise ValueError(f"{field}: {expr!r} is not a Python expression ({e.msg}).") from None

    def check(point: dict) -> bool:
        try:
            return bool(eval(code, {"__builtins__": {}}, {**_SAFE, **point}))  # noqa: S307
        except NameError as e:
            raise ValueError(f"{field}: {e}; the names are {', '.join(point)}.") from None
    return check


# ----------------------------------------------------------------------------- derive
def compound_coefficients_of(cc: Any) -> tuple[float, float, float]:
    if cc.coefficients_from:
        path = os.path.join(cc.coefficients_from, "best.json")
        best = rundir.read_json(path)
        if not best:
            raise ValueError(f"sweep.compound.coefficients_from: {path} does not exist; run "
                             "configs/efficientnet_grid.py with that workdir first, or unset it "
                             "to use sweep.compound.alpha/beta/gamma.")
        return float(best["alpha"]), float(best["beta"]), float(best["gamma"])
    return float(cc.alpha), float(cc.beta), float(cc.gamma)


def compound(point: dict, config: Any) -> dict:
    """EfficientNet scaling of the baseline for one point: alpha, beta, gamma, phi and the
    `scaling` kind (compound, or depth / width / resolution alone with the same theoretical
    FLOPs growth (alpha * beta^2 * gamma^2)^phi) -> width, depth and resolution multipliers,
    rounded by the shared rules. Returns the values to record; `settings` go into the config."""
    cc = config.sweep.compound
    a0, b0, g0 = compound_coefficients_of(cc)
    a, b, g = (float(point.get(k, d)) for k, d in (("alpha", a0), ("beta", b0), ("gamma", g0)))
    for name, v in (("alpha", a), ("beta", b), ("gamma", g)):
        if v < 1.0:
            raise ValueError(f"sweep.compound.{name}={v}: must be >= 1 (compound scaling never "
                             "shrinks a dimension).")
    phi = float(point.get("phi", cc.phi))
    kind = point.get("scaling", "compound")
    if kind not in SCALINGS:
        raise ValueError(f"sweep.axes.scaling: unknown {kind!r}; use {', '.join(SCALINGS)}.")
    growth = scaling_rules.flops_factor(a, b, g) ** phi
    if cc.published and kind == "compound":
        if phi != int(phi) or not 0 <= phi <= 7:
            raise ValueError(f"sweep.compound.published: phi must be an integer 0..7, got {phi}.")
        p = scaling_rules.EFFICIENTNET_PARAMS[f"b{int(phi)}"]
        d, w, r = p.depth, p.width, p.resolution / 224
    elif kind == "compound":
        d, w, r = scaling_rules.compound_coefficients(phi, a, b, g)
    elif kind == "depth":
        d, w, r = growth, 1.0, 1.0
    elif kind == "width":
        d, w, r = 1.0, math.sqrt(growth), 1.0
    else:
        d, w, r = 1.0, 1.0, math.sqrt(growth)
    return _scaled(cc, d, w, r, theory=growth)


def _scaled(cc: Any, d: float, w: float, r: float, theory: float) -> dict:
    res = scaling_rules.scaled_resolution(cc.base_resolution, r, cc.resolution_divisor)
    width, depth = round(cc.base_width * w, 6), round(cc.base_depth * d, 6)
    return {"width": width, "depth": depth, "resolution": res, "cost_factor_theory": round(theory, 4),
            "settings": {"model.width": width, "model.depth": depth, "data.image_size": res}}


def models(point: dict, config: Any) -> dict:
    """Model comparison: the point's `model` is a label of `sweep.models` (label -> a model
    section: name + fields), which replaces the config's model section."""
    label = point.get("model")
    if label not in config.sweep.get("models", {}):
        raise ValueError(f"sweep.axes.model: {label!r} is not a label of sweep.models "
                         f"({', '.join(config.sweep.get('models', {}))}).")
    section = config.sweep.models[label]
    return {"model_name": section.name, "settings": {"model": ml_collections.ConfigDict(section.to_dict())}}


def transfer_mode(point: dict, config: Any) -> dict:
    """Transfer learning: the point's `mode` (scratch / linear_probe / finetune / finetune_bn)
    sets init.mode, clears init.path for scratch, keeps one lr group for scratch and the linear
    probe, and takes the mode's learning rate from transfer.lr.<mode> (0 keeps train.lr)."""
    mode = point["mode"]
    settings = {"init.mode": mode}
    if mode == "scratch":
        settings["init.path"] = ""
    if mode in ("scratch", "linear_probe"):
        settings.update({"init.head_lr_mult": 1.0, "init.backbone_lr_mult": 1.0})
    lr = float(config.transfer.lr.get(mode, 0.0) or 0.0)
    settings["train.lr"] = lr if lr > 0 else float(config.train.lr)
    return {"lr": settings["train.lr"], "settings": settings}


DERIVE: dict[str, Callable[[dict, Any], dict]] = {
    "compound": compound, "models": models, "transfer_mode": transfer_mode}


# ----------------------------------------------------------------------------- study
@functools.lru_cache(maxsize=16)
def _source_info(data_json: str) -> tuple[int, int]:
    from scaling.data import build_source

    data = ml_collections.ConfigDict(json.loads(data_json))
    source = build_source(data, data.train_split)
    return source.num_classes, len(source)


def source_info(data_cfg: Any) -> tuple[int, int]:
    """(classes, training examples) of a data section, built once per distinct section."""
    return _source_info(data_cfg.to_json())


def _set(cfg: Any, settings: dict[str, Any], where: str) -> None:
    for path, value in settings.items():
        try:
            grid.set_path(cfg, path, value)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def build_points(config: Any) -> list[grid.Point]:
    """The study's points before cost control: combined axes, constraint, derived settings."""
    s = config.sweep
    axes = {k: tuple(v) if isinstance(v, (list, tuple)) else (v,) for k, v in s.axes.items()}
    if not axes:
        raise ValueError("sweep.axes: empty; give at least one axis, e.g. "
                         "--config.sweep.axes.lr='(0.1, 0.05)' with sweep.targets.lr=train.lr.")
    empty = [a for a, v in axes.items() if not v]
    if empty:
        raise ValueError(f"sweep.axes.{empty[0]}: empty; give it at least one value, e.g. "
                         f"--config.sweep.axes.{empty[0]}='(1,)'.")
    if s.derive and s.derive not in DERIVE:
        raise ValueError(f"sweep.derive: unknown {s.derive!r}; use one of {', '.join(DERIVE)} or ''.")
    targets = dict(s.targets)
    free = [a for a in axes if a not in targets and not s.derive]
    if free:
        raise ValueError(f"sweep.targets: no config path for axis {free[0]!r}; add "
                         f"--config.sweep.targets.{free[0]}=section.field.")
    if s.derive == "compound":
        for name in ("alpha", "beta", "gamma"):
            bad = [v for v in axes.get(name, ()) if v < 1.0]
            if bad:
                raise ValueError(f"sweep.axes.{name}: every value must be >= 1 (compound scaling "
                                 f"never shrinks a dimension); got {bad}.")
    check = make_constraint(s.constraint)
    values = [p for p in combine_points(axes, s.combine) if check is None or check(p)]
    if not values:
        raise ValueError("sweep.axes / sweep.constraint: no point satisfies the constraint.")
    points = []
    for v in values:
        pid = grid.trial_id(v)
        cfg = copy.deepcopy(config)
        _set(cfg, {targets[a]: x for a, x in v.items() if a in targets}, f"point {pid}")
        record = dict(v)
        if s.derive:
            derived = DERIVE[s.derive](v, config)
            _set(cfg, derived.pop("settings"), f"point {pid}")
            record.update(derived)
        points.append(grid.Point(pid, record, cfg))
    ids = [p.id for p in points]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"sweep: two points share the id(s) {dupes}; make the axes distinct.")
    return points


def realized_cost(config: Any) -> dict:
    """Params, per-image GMACs and the network's shape after rounding (no compile)."""
    from scaling import profile
    from scaling.train import build_model

    model = build_model(config.model, source_info(config.data)[0], image_size=int(config.data.image_size))
    out = profile.model_stats(model, int(config.data.image_size))
    rest = {k: v for k, v in config.to_dict().items() if k not in ("model", "seed")}
    network = config.model.to_dict()
    if hasattr(model, "plan"):  # EfficientNet: realized blocks and channels
        plan = model.plan()
        network = {k: v for k, v in network.items() if k not in ("width", "depth")}
        network["plan"] = plan
        out["blocks"] = len(plan.blocks)
        stages = {b.stage: b.out_channels for b in plan.blocks}
        out["widths"] = [plan.stem, *stages.values(), plan.head]
    out["signature"] = repr((network, rest))  # same network, data and training = same trial
    return out


def _match_single_dimension(points: list[grid.Point], costs: dict, config: Any) -> None:
    """`compound.match_cost`: each depth- / width- / resolution-only point gets the multiplier
    (bisection on its one dimension) whose realized GMACs are closest to the compound point's
    at the same phi."""
    cc = config.sweep.compound
    compound_gmacs = {p.values.get("phi"): costs[p.id]["gmacs"] for p in points
                      if p.values.get("scaling", "compound") == "compound"}
    for p in points:
        kind = p.values.get("scaling", "compound")
        target = compound_gmacs.get(p.values.get("phi"))
        if kind == "compound" or target is None:
            continue

        def gmacs_at(m: float) -> tuple[float, dict]:
            d, w, r = {"depth": (m, 1, 1), "width": (1, m, 1), "resolution": (1, 1, m)}[kind]
            rec = _scaled(cc, d, w, r, p.values["cost_factor_theory"])
            cfg = copy.deepcopy(p.config)
            _set(cfg, rec["settings"], f"point {p.id}")
            return realized_cost(cfg)["gmacs"], rec

        lo, hi, best = 1.0, 8.0, None
        for _ in range(8):  # the cost is a step function of m: 8 halvings of [1, 8] in log
            mid = math.sqrt(lo * hi)
            g, rec = gmacs_at(mid)
            if best is None or abs(g - target) < abs(best[0] - target):
                best = (g, rec)
            lo, hi = (mid, hi) if g < target else (lo, mid)
        _, rec = best
        _set(p.config, rec.pop("settings"), f"point {p.id}")
        p.values.update(rec, matched_to="compound")
        costs[p.id] = realized_cost(p.config)


def control_cost(config: Any, points: list[grid.Point], workdir: str | None) -> list[grid.Point]:
    """Records each point's realized params / GMACs / shape next to its theoretical cost
    factor, marks points that duplicate an earlier network or miss `cost_tolerance` as
    excluded (with the reason), and caches the figures in WORKDIR/realized_cost.json."""
    s = config.sweep
    cache_path = os.path.join(workdir, "realized_cost.json") if workdir else None
    cache = (rundir.read_json(cache_path) if cache_path else None) or {}
    spec = str((s, config.model, config.data))  # what the figures depend on
    if cache.get("ids") == [p.id for p in points] and cache.get("spec") == spec:
        for p in points:
            _set(p.config, cache["settings"][p.id], f"point {p.id}")
            p.values.update(cache["values"][p.id])
            p.excluded = cache["excluded"].get(p.id)
        return points
    costs = {p.id: realized_cost(p.config) for p in points}
    if s.derive == "compound" and s.compound.match_cost:
        _match_single_dimension(points, costs, config)
    base = None
    if s.derive == "compound":
        base_cfg = copy.deepcopy(config)
        _set(base_cfg, compound({"phi": 0.0}, config)["settings"], "the base point")
        base = realized_cost(base_cfg)
    seen: dict[str, str] = {}
    for p in points:
        c = costs[p.id]
        p.values.update(params=c["params"], gmacs=round(c["gmacs"], 6))
        if base:
            p.values["cost_factor"] = round(c["gmacs"] / base["gmacs"], 4)
            if "blocks" in c:  # blocks over the base's; geometric mean of the stage widths' ratios
                p.values["depth_realized"] = round(c["blocks"] / base["blocks"], 4)
                ratios = [w / w0 for w, w0 in zip(c["widths"], base["widths"])]
                p.values["width_realized"] = round(math.prod(ratios) ** (1 / len(ratios)), 4)
            p.values["resolution_realized"] = round(
                int(p.config.data.image_size) / s.compound.base_resolution, 4)
        if c["signature"] in seen:
            p.excluded = f"builds the same network as {seen[c['signature']]}"
        else:
            seen[c["signature"]] = p.id
            theory = p.values.get("cost_factor_theory")
            if s.cost_tolerance and base and theory:
                off = p.values["cost_factor"] / theory - 1
                if abs(off) > s.cost_tolerance:
                    p.excluded = (f"realized cost {p.values['cost_factor']:.2f}x vs theoretical "
                                  f"{theory:.2f}x ({off:+.0%}, outside sweep.cost_tolerance="
                                  f"{s.cost_tolerance:g})")
        if p.excluded:
            log.info("point %s excluded: %s", p.id, p.excluded)
    if cache_path:
        os.makedirs(workdir, exist_ok=True)
        rundir.write_json_atomic(cache_path, {
            "ids": [p.id for p in points], "spec": spec,
            "settings": {p.id: {"model.width": p.config.model.width, "model.depth": p.config.model.depth,
                                "data.image_size": p.config.data.image_size}
                         if s.derive == "compound" else {} for p in points},
            "values": {p.id: list(p.values.items()) for p in points},  # in order: the columns
            "excluded": {p.id: p.excluded for p in points if p.excluded}})
    return points


def study_points(config: Any, workdir: str | None = None) -> list[grid.Point]:
    return control_cost(config, build_points(config), workdir)


def trials_of(config: Any, points: list[grid.Point], workdir: str | None = None) -> list[grid.Trial]:
    """One trial per (point, seed): `<point>-seed<i>`, or the point's id for a single seed;
    its HParams record is the axes whose value differs between points, and the seed.
    A study relaunched with more seeds keeps its single-seed trials as seed 0 (those found
    in WORKDIR/trials), so only the new seeds train."""
    n = int(config.sweep.seeds)
    # TensorBoard's HParams tab shows the first five columns: the axes that vary, seed, status
    axes = [a for a in config.sweep.axes.keys()
            if len({repr(p.values.get(a)) for p in points}) > 1]
    trials = []
    for p in points:
        for i in range(n):
            cfg = copy.deepcopy(p.config)
            cfg.seed = int(config.seed) + i
            recorded = (rundir.read_config(os.path.join(workdir, "trials", p.id))
                        if workdir and n > 1 and i == 0 else None)
            single = recorded is not None and recorded.get("seed") == cfg.seed
            tid = p.id if n == 1 or single else f"{p.id}-seed{i}"
            hparams = {**{a: p.values[a] for a in axes if a in p.values}, "seed": cfg.seed}
            trials.append(grid.Trial(tid, {**p.values, "seed": cfg.seed}, cfg, point=p.id,
                                     excluded=p.excluded, hparams=hparams))
    return trials


def rung_steps(config: Any, trial: grid.Trial) -> list[int]:
    """The halving rungs of a trial in steps (the last is its full budget)."""
    h, tc = config.sweep.halving, trial.config.train
    per_epoch = max(math.ceil(source_info(trial.config.data)[1] / tc.batch_size), 1)
    total = int(tc.num_steps) if tc.num_steps > 0 else int(round(tc.num_epochs * per_epoch))
    steps = [int(round(b * per_epoch)) if h.unit == "epochs" else int(b) for b in h.rungs]
    return [s for s in steps if 0 < s < total] + [total]


def validate(config: Any, num_devices: int | None = None) -> None:
    s = config.sweep
    if int(s.seeds) < 1:
        raise ValueError(f"sweep.seeds={s.seeds}: must be >= 1.")
    if s.cost_tolerance < 0:
        raise ValueError(f"sweep.cost_tolerance={s.cost_tolerance}: must be >= 0 (0 keeps every point).")
    if s.cost_tolerance and s.derive != "compound":
        raise ValueError("sweep.cost_tolerance: needs a theoretical cost, i.e. sweep.derive='compound'.")
    h = s.halving
    if h.unit not in ("epochs", "steps"):
        raise ValueError(f"sweep.halving.unit: unknown {h.unit!r}; use epochs or steps.")
    if h.rungs and (int(h.eta) < 2 or list(h.rungs) != sorted(h.rungs) or min(h.rungs) <= 0):
        raise ValueError(f"sweep.halving: rungs {tuple(h.rungs)} must be positive and rising and "
                         f"eta={h.eta} at least 2.")
    points = build_points(config)
    validate_report(config, points)
    grid.validate_trials(config.grid, trials_of(config, points), num_devices, "point {id}")


def validate_report(config: Any, points: list[grid.Point]) -> None:
    """The report spec against what the study records, before anything trains: a misspelt
    metric would otherwise rank every halving rung by a value no trial has (and prune them
    all), a misspelt column leave a plot or fit out at the end."""
    r = config.sweep.report
    if r.metric not in METRICS:
        raise ValueError(f"sweep.report.metric={r.metric!r}: unknown; use one of "
                         f"{', '.join(METRICS)} (what every trial records).")
    if r.mode != METRICS[r.metric]:
        raise ValueError(f"sweep.report.mode={r.mode!r}: {r.metric} is better when "
                         f"{'higher' if METRICS[r.metric] == 'max' else 'lower'}; use "
                         f"--config.sweep.report.mode={METRICS[r.metric]}.")
    if r.select not in ("metric", "objective"):
        raise ValueError(f"sweep.report.select={r.select!r}: use metric or objective.")
    if r.select == "objective" and METRICS[r.metric] != "max":
        raise ValueError(f"sweep.report.select=objective: ACC * (GMACs / T)^w needs an accuracy, "
                         f"not {r.metric}; set --config.sweep.report.metric=val_top1.")
    columns = {k for p in points for k in p.values} | set(COSTS) | (  # + what control_cost adds
        set(report.POINT_COLUMNS) if config.sweep.derive == "compound" else set())
    named = {"x": tuple(r.x), "group": (r.group,) if r.group else (), "heatmap": tuple(r.heatmap),
             "label": (r.label,) if r.label != "point" else ()}
    for field, names in named.items():
        unknown = [n for n in names if n not in columns]
        if unknown:
            raise ValueError(f"sweep.report.{field}: {unknown[0]!r} is not a column of this study; "
                             f"use one of {', '.join(sorted(columns))}.")
    if len(r.heatmap) not in (0, 2):
        raise ValueError(f"sweep.report.heatmap={tuple(r.heatmap)}: give two axes, e.g. "
                         "('l', 'k'), or () for none.")
    shared = make_constraint(r.shared, "sweep.report.shared")
    for p in points if shared else ():
        shared(p.values)


def run(config: Any, workdir: str) -> dict:
    if rundir.read_config(workdir) is None:  # launch.py records it; a direct caller gets one too
        os.makedirs(workdir, exist_ok=True)
        rundir.write_config(workdir, config)
    points = study_points(config, workdir)
    trials = trials_of(config, points, workdir)
    rungs = {t.id: rung_steps(config, t) for t in trials}
    rows = grid.run_study(trials, workdir, config.grid, rungs=rungs,
                          eta=int(config.sweep.halving.eta), metric=config.sweep.report.metric,
                          mode=config.sweep.report.mode)
    if not rows:
        return {}
    study = report.write_study(config, workdir, rows)
    best = study.get("best") or {}
    if best and "alpha" in best.get("values", {}):
        rundir.write_json_atomic(os.path.join(workdir, "best.json"), {
            **{k: best["values"][k] for k in ("alpha", "beta", "gamma") if k in best["values"]},
            "point": best["point"], config.sweep.report.metric: best["mean"]})
    return {"points": len(points), "trials": len(trials),
            "done": sum(r.get("status") == "done" for r in rows),
            "best": best.get("point"), "best_mean": best.get("mean"),
            "study": os.path.join(workdir, "study.md")}

