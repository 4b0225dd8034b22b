"""Grid engine: trials from axes, one directory each, claims for many workers, resume,
preflight against compute/memory budgets, failure isolation, one results table.

    WORKDIR/trials/<id>/   config.txt, checkpoints/, events, metrics.jsonl, result.json
    WORKDIR/results.csv    one row per trial (also results.json)

A trial's id is made from its swept values (`alpha=1.2,beta=1.1` -> `alpha1.2-beta1.1`), so
it is stable across launches and workers. Relaunching skips finished trials (their
result.json has a final status) and resumes unfinished ones from their checkpoints.

Workers (`grid.num_workers=N`, `grid.worker=i`, or SLURM array variables) first take the
trials i, i+N, ... and then help with whatever is left. A trial is run only by the worker
holding its claim file, created atomically (O_EXCL); a claim whose heartbeat stopped
(dead worker) is taken over, also atomically, so no trial ever runs twice at once.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
import traceback
from typing import Any, Callable, Iterable

import ml_collections

log = logging.getLogger(__name__)

FINAL = ("done", "diverged", "failed", "infeasible")
BASE_COLUMNS = ("trial", "status", "val_top1", "val_top5", "val_loss", "params", "gmacs",
                "peak_memory_mb", "step_time_s", "train_time_s", "reason")


@dataclasses.dataclass
class Trial:
    id: str
    values: dict[str, Any]          # the swept values, by axis name
    config: Any                     # the full training config of this trial


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("/", "_").replace(" ", "")


def trial_id(values: dict[str, Any]) -> str:
    return "-".join(f"{k}{_fmt_value(v)}" for k, v in values.items()) or "single"


def grid_points(axes: dict[str, Iterable], mode: str = "product",
                constraint: Callable[[dict], bool] | None = None) -> list[dict[str, Any]]:
    """Axis values -> list of points: 'product' (every combination, optionally filtered by
    `constraint`) or 'zip' (the i-th value of every axis)."""
    names = list(axes)
    values = [list(axes[n]) for n in names]
    if mode == "product":
        points = [dict(zip(names, combo)) for combo in itertools.product(*values)]
    elif mode == "zip":
        lengths = {len(v) for v in values}
        if len(lengths) > 1:
            raise ValueError(f"grid.mode='zip' needs axes of one length; got "
                             f"{ {n: len(v) for n, v in zip(names, values)} }.")
        points = [dict(zip(names, combo)) for combo in zip(*values)]
    else:
        raise ValueError(f"grid.mode: unknown {mode!r}; use 'product' or 'zip'.")
    return [p for p in points if constraint is None or constraint(p)]


def set_path(cfg: ml_collections.ConfigDict, path: str, value: Any) -> None:
    """cfg['a.b.c'] = value for a dotted path, refusing paths the config does not have."""
    node = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        if p not in node:
            raise ValueError(f"grid: config has no section {p!r} (in {path!r}).")
        node = node[p]
    if parts[-1] not in node:
        raise ValueError(f"grid: config has no field {path!r}.")
    with node.ignore_type():
        node[parts[-1]] = value


def worker_identity(grid_cfg) -> tuple[int, int]:
    """(worker, num_workers) from the config, or from SLURM array variables."""
    n, i = int(grid_cfg.num_workers), int(grid_cfg.worker)
    if n <= 1 and "SLURM_ARRAY_TASK_ID" in os.environ:
        n = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", "1"))
        i = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"grid.worker={i} must be in [0, grid.num_workers={n}).")
    return i, n


# ----------------------------------------------------------------------------- claims
class Claim:
    """An exclusive, heart-beating claim on a trial directory."""

    def __init__(self, path: str, owner: str, heartbeat_s: float):
        self.path, self.owner, self.heartbeat_s = path, owner, heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_claim(trial_dir: str, owner: str, *, stale_after_s: float, heartbeat_s: float) -> Claim | None:
    """Claims `trial_dir` or returns None when another live worker holds it."""
    os.makedirs(trial_dir, exist_ok=True)
    path = os.path.join(trial_dir, "claim")
    info = json.dumps({"owner": owner, "host": socket.gethostname(), "pid": os.getpid(),
                       "time": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _claim_is_stale(path, stale_after_s):
                return None
            # Atomic take-over: only one worker can rename the stale claim away.
            try:
                os.rename(path, f"{path}.stale.{owner}.{os.getpid()}")
            except FileNotFoundError:
                return None
            log.warning("taking over stale claim on %s", trial_dir)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(info)
        return Claim(path, owner, heartbeat_s)
    return None


def _claim_is_stale(path: str, stale_after_s: float) -> bool:
    try:
        age = time.time() - os.stat(path).st_mtime
        with open(path) as f:
            held = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return True  # vanished or half-written by a worker killed while claiming
    if held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", -1))):
        return True  # its process on this machine is gone
    return age > stale_after_s


# ----------------------------------------------------------------------------- results
def read_result(trial_dir: str) -> dict | None:
    path = os.path.join(trial_dir, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
        f.write("\n")
    os.replace(tmp, path)


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def collect_results(workdir: str, trials: list[Trial]) -> list[dict]:
    """One row per trial (pending ones too), swept values as columns; writes results.csv/json."""
    rows = []
    axis_names: list[str] = []
    for t in trials:
        for k in t.values:
            if k not in axis_names:
                axis_names.append(k)
    for t in trials:
        tdir = os.path.join(workdir, "trials", t.id)
        res = read_result(tdir) or {"status": "pending"}
        timing_path = os.path.join(tdir, "timing.json")
        timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {}
        row = {"trial": t.id, **{k: t.values.get(k) for k in axis_names}}
        for c in BASE_COLUMNS[1:]:
            row[c] = res.get(c)
        row["step_time_s"] = res.get("step_time_s", timing.get("step_time_s"))
        row["train_time_s"] = res.get("train_time_s", timing.get("train_time_s"))
        if res.get("params") is not None:  # float32 weights + BN statistics, 10^6 bytes
            row["size_mb"] = (res["params"] + (res.get("batch_stats") or 0)) * 4 / 1e6
        for k, v in res.items():  # experiment-specific extras (resolution, objective, ...)
            if k not in row and not isinstance(v, (dict, list)):
                row[k] = v
        rows.append({k: _jsonable(v) for k, v in row.items()})
    columns: list[str] = ["trial", *axis_names]
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    tmp = os.path.join(workdir, f"results.csv.tmp.{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    os.replace(tmp, os.path.join(workdir, "results.csv"))
    write_json_atomic(os.path.join(workdir, "results.json"), rows)
    return rows


# ----------------------------------------------------------------------------- running
def preflight(config: Any) -> dict:
    """Builds the trial's model and compiles its train step ahead of time (nothing runs):
    per-image MACs, parameter counts and XLA's peak-memory estimate of one step per device.
    The step is the one `fit` will compile, so training then hits the compilation cache."""
    import jax
    import jax.numpy as jnp

    from scaling import parallel, profile
    from scaling.data import build_source
    from scaling.train.loop import make_run

    source = build_source(config.data, config.data.train_split)
    run = make_run(config, parallel.make_mesh(), source.num_classes, len(source))
    size = config.data.image_size
    x1 = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = {"params": run.state_spec.params}
    if jax.tree.leaves(run.state_spec.batch_stats):
        variables["batch_stats"] = run.state_spec.batch_stats
    macs = profile.count_macs(lambda v, x: run.model.apply(v, x, train=False), variables, x1)
    mem = profile.compiled_memory(run.compile())
    count = lambda t: int(sum(math.prod(x.shape) for x in jax.tree.leaves(t)))  # noqa: E731
    return {"params": count(run.state_spec.params), "batch_stats": count(run.state_spec.batch_stats),
            "gmacs": macs / 1e9, "peak_memory_mb": mem.get("peak_bytes", 0) / 1e6}


def _hparams_only(config: Any, values: dict, metrics: dict, logdir: str) -> None:
    """An HParams record for a trial that did not train (infeasible / failed / diverged)."""
    from scaling.metrics import MetricWriter
    w = MetricWriter(logdir)
    w.hparams({**values, "status": metrics.get("status", "")},
              {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "status"})
    w.close()


def run_trial(trial: Trial, workdir: str, grid_cfg: Any,
              train_fn: Callable[[Any, str], dict],
              preflight_fn: Callable[[Any], dict] = preflight) -> dict:
    """Preflight, then train; records done / diverged / failed / infeasible in result.json."""
    from scaling.train import Diverged

    tdir = os.path.join(workdir, "trials", trial.id)
    with open(os.path.join(tdir, "config.txt"), "w") as f:
        f.write(str(trial.config))
    pre_path = os.path.join(tdir, "preflight.json")
    try:
        if os.path.exists(pre_path):
            pre = json.load(open(pre_path))
        else:
            pre = preflight_fn(trial.config)
            write_json_atomic(pre_path, pre)
    except Exception as e:  # noqa: BLE001 - a bad trial must not stop the grid
        return _final(tdir, trial, {"status": "failed", "reason": f"preflight: {_reason(e)}"})
    over = []
    if grid_cfg.max_gmacs and pre["gmacs"] > grid_cfg.max_gmacs:
        over.append(f"gmacs {pre['gmacs']:.4f} > grid.max_gmacs {grid_cfg.max_gmacs}")
    if grid_cfg.max_memory_mb and pre["peak_memory_mb"] > grid_cfg.max_memory_mb:
        over.append(f"peak_memory_mb {pre['peak_memory_mb']:.1f} > grid.max_memory_mb "
                    f"{grid_cfg.max_memory_mb}")
    if over:
        return _final(tdir, trial, {"status": "infeasible", "reason": "; ".join(over), **pre})
    try:
        result = train_fn(trial.config, tdir)
    except Diverged as e:
        return _final(tdir, trial, {"status": "diverged", "reason": str(e), **pre})
    except Exception as e:  # noqa: BLE001 - OOM, bad shapes, ...: record and go on
        log.error("trial %s failed:\n%s", trial.id, traceback.format_exc())
        return _final(tdir, trial, {"status": "failed", "reason": _reason(e), **pre})
    if result.get("status") == "preempted":
        return result
    result = {**pre, **result}
    timing_path = os.path.join(tdir, "timing.json")
    if os.path.exists(timing_path):
        timing = json.load(open(timing_path))
        result["step_time_s"] = timing.get("step_time_s")
        result["train_time_s"] = timing.get("train_time_s")
    write_json_atomic(os.path.join(tdir, "result.json"), result)
    return result


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _final(tdir: str, trial: Trial, result: dict) -> dict:
    write_json_atomic(os.path.join(tdir, "result.json"), result)
    _hparams_only(trial.config, trial.values, result, tdir)
    return result


def run_grid(trials: list[Trial], workdir: str, grid_cfg: Any,
             train_fn: Callable[[Any, str], dict] | None = None,
             preflight_fn: Callable[[Any], dict] = preflight) -> list[dict]:
    """Runs this worker's share of `trials` (then helps with the rest); returns all rows."""
    import jax

    from scaling.train import fit

    train_fn = train_fn or (lambda cfg, d: fit(cfg, d))
    ids = [t.id for t in trials]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ValueError(f"grid: two trials share the id(s) {sorted(dupes)}; make the axes distinct.")
    worker, num_workers = worker_identity(grid_cfg)
    owner = f"worker{worker}of{num_workers}"
    mine = trials[worker::num_workers]
    others = [t for t in trials if t not in mine]
    os.makedirs(os.path.join(workdir, "trials"), exist_ok=True)
    single_process = jax.process_count() == 1
    for trial in mine + others:
        tdir = os.path.join(workdir, "trials", trial.id)
        res = read_result(tdir)
        if res and res.get("status") in FINAL:
            continue
        claim = None
        if single_process:  # multi-host jobs run every trial together, in order
            claim = try_claim(tdir, owner, stale_after_s=grid_cfg.stale_after_s,
                              heartbeat_s=grid_cfg.heartbeat_s)
            if claim is None:
                continue
            res = read_result(tdir)  # finished by someone between our check and our claim
            if res and res.get("status") in FINAL:
                claim.release()
                continue
        log.info("trial %s (%s)", trial.id, owner)
        try:
            res = run_trial(trial, workdir, grid_cfg, train_fn, preflight_fn)
            log.info("trial %s: %s val_top1=%s", trial.id, res.get("status"), res.get("val_top1"))
            if res.get("status") == "preempted":
                break
        finally:
            if claim:
                claim.release()
    if jax.process_index() == 0:
        return collect_results(workdir, trials)
    return []


def default_grid_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_workers=1,          # split the grid over N jobs sharing the workdir ...
        worker=0,               # ... this is job i (SLURM_ARRAY_TASK_ID when unset)
        max_gmacs=0.0,          # eq. 8 budget: per-image GMACs (0 = no limit)
        max_memory_mb=0.0,      # eq. 9 budget: peak train-step memory per device (0 = none)
        stale_after_s=300.0,    # a claim not refreshed for this long belongs to a dead worker
        heartbeat_s=20.0,
    ))


def validate_trials(grid_cfg: Any, trials: list[Trial], num_devices: int | None = None,
                    label: str = "trial {id}") -> None:
    """Checks the worker settings and every trial's training config before any compile;
    the error names the trial (`label`, formatted with its id) and the field."""
    from scaling.train import validate_config

    worker_identity(grid_cfg)
    for t in trials:
        try:
            validate_config(t.config, num_devices)
        except ValueError as e:
            raise ValueError(f"{label.format(id=t.id)}: {e}") from None


def trial_config(base: Any, values: dict[str, Any], targets: dict[str, str]) -> Any:
    """A copy of `base` with each swept value written to its config path."""
    cfg = copy.deepcopy(base)
    for axis, value in values.items():
        if axis in targets:
            set_path(cfg, targets[axis], value)
    return cfg
