"""Grid engine: one directory per trial, claims for many workers, resume, preflight against
compute/memory budgets, failure isolation, successive halving, one results table.

    WORKDIR/trials/<id>/   config.txt, checkpoints/, events, metrics.jsonl, result.json,
                           rung<k>.json (the trial's metrics at the end of halving rung k)
    WORKDIR/preflight/     <point>.json: GMACs, params, peak memory (shared by its seeds)
    WORKDIR/results.csv    one row per trial (also results.json); rungs.json: the rung table

A point's id is made from its swept values (`alpha=1.2,beta=1.1` -> `alpha1.2-beta1.1`), a
trial's from its point and seed, so both are stable across launches and workers. Relaunching
skips finished trials (their result.json has a final status) and resumes unfinished ones
from their checkpoints.

Successive halving: every trial trains to the first rung's step and stops there (the
learning-rate schedule is the full budget's, so a promoted trial continuing from its own
checkpoint computes exactly what a straight run would). When every trial of the rung has
finished, points are ranked by the mean metric over their seeds and the top ceil(n / eta)
go on; the others end `pruned`. The ranking is a pure function of the (deterministic) rung
results, so every worker computes the same promotions.

Workers (`grid.num_workers=N`, `grid.worker=i`, or SLURM array variables) first take the
trials i, i+N, ... and then help with whatever is left. A trial is run only by the worker
holding its claim file, created atomically (O_EXCL); a claim whose heartbeat stopped
(dead worker) is taken over, also atomically, so no trial ever runs twice at once.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import logging
import math
import os
import socket
import threading
import time
import traceback
from typing import Any, Callable

import ml_collections

from scaling import rundir

log = logging.getLogger(__name__)

FINAL = ("done", "diverged", "failed", "infeasible", "pruned", "excluded")
RUNG_FINAL = ("paused", *FINAL)     # a trial's state at the end of a rung
BASE_COLUMNS = ("trial", "point", "seed", "status", "rung", "step", "val_top1", "val_top5",
                "val_loss", "params", "gmacs", "peak_memory_mb", "step_time_s", "train_time_s",
                "reason")


@dataclasses.dataclass
class Point:
    id: str
    values: dict[str, Any]          # swept values, then derived and realized ones
    config: Any                     # the training config (seed not set yet)
    excluded: str | None = None     # why the study leaves it out (cost control)


@dataclasses.dataclass
class Trial:
    id: str
    values: dict[str, Any]          # the point's values and the seed
    config: Any                     # the full training config of this trial
    point: str | None = None        # the point it replicates (default: its own id)
    excluded: str | None = None
    hparams: dict[str, Any] | None = None  # what TensorBoard's HParams tab shows

    def __post_init__(self):
        self.point = self.point or self.id


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v).replace("/", "_").replace(" ", "")


def trial_id(values: dict[str, Any]) -> str:
    return "-".join(f"{k}{_fmt_value(v)}" for k, v in values.items()) or "single"


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
def rung_path(trial_dir: str, k: int) -> str:
    return os.path.join(trial_dir, f"rung{k}.json")


def trial_state(trial_dir: str) -> dict:
    """The trial's final result, else its newest rung result, else pending."""
    res = rundir.read_result(trial_dir)
    if res and res.get("status") in FINAL:
        return res
    rungs = sorted(int(f[4:-5]) for f in (os.listdir(trial_dir) if os.path.isdir(trial_dir) else [])
                   if f.startswith("rung") and f.endswith(".json"))
    return rundir.read_json(rung_path(trial_dir, rungs[-1])) if rungs else {"status": "pending"}


def collect_rows(workdir: str, trials: list[Trial]) -> list[dict]:
    """One row per trial (pending ones too): its point's values, seed, state and metrics."""
    rows = []
    for t in trials:
        tdir = os.path.join(workdir, "trials", t.id)
        res = trial_state(tdir)
        timing = rundir.read_timing(tdir)
        row = {"trial": t.id, "point": t.point, **t.values}
        for c in BASE_COLUMNS[3:]:
            if res.get(c) is not None or c not in row:
                row[c] = res.get(c)
        row["step_time_s"] = res.get("step_time_s", timing.get("step_time_s"))
        row["train_time_s"] = res.get("train_time_s", timing.get("train_time_s"))
        if res.get("params") is not None:  # float32 weights + BN statistics, 10^6 bytes
            row["size_mb"] = (res["params"] + (res.get("batch_stats") or 0)) * 4 / 1e6
        if res.get("gmacs") is not None and res.get("step") is not None:  # 2 FLOP/MAC x 3 (fwd+bwd)
            row["train_pflop"] = 6e-6 * res["gmacs"] * res["step"] * t.config.train.batch_size
        for k, v in res.items():  # experiment-specific extras
            if k not in row and not isinstance(v, (dict, list)):
                row[k] = v
        rows.append(rundir.jsonable(row))  # as results.json will hold it
    return rows


def write_results(workdir: str, rows: list[dict], name: str = "results") -> None:
    """rows -> WORKDIR/<name>.csv and .json (columns in first-seen order)."""
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    tmp = os.path.join(workdir, f"{name}.csv.tmp.{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    os.replace(tmp, os.path.join(workdir, f"{name}.csv"))
    rundir.write_json_atomic(os.path.join(workdir, f"{name}.json"), rows)


# ----------------------------------------------------------------------------- running
def preflight(config: Any, memory_limit_mb: float = 0.0) -> dict:
    """Builds the trial's model and compiles its train step ahead of time (nothing runs):
    per-image MACs, parameter counts and XLA's peak-memory estimate of one step per device.
    The step is the one `fit` will compile, so training then hits the compilation cache.

    The memory limit is `memory_limit_mb` (the study's budget, grid.max_memory_mb) or the
    device's, whichever is smaller: a step over it is first split into more microbatches
    (train.auto_accumulate, `scaling.train.memory`); `grad_accum_steps` records the split
    that fits, and the peak is the one of that split. One that cannot fit raises ValueError."""
    from scaling import parallel, profile
    from scaling.train import memory, prepare

    mesh = parallel.mesh_from_config(config)
    config = copy.deepcopy(config)
    budget = (int(memory_limit_mb * 1e6), f"grid.max_memory_mb={memory_limit_mb:g}")
    memory.fit_to_memory(config, mesh, budget if memory_limit_mb else None)
    run = prepare(config, mesh)
    peak = profile.compiled_memory(run.compile()).get("peak_bytes", 0)
    return {**profile.model_stats(run.model, int(config.data.image_size)),
            "peak_memory_mb": peak / 1e6, "grad_accum_steps": int(config.train.grad_accum_steps),
            "eval_batch_size": int(config.train.eval_batch_size)}


def _hparams_only(trial: Trial, metrics: dict, logdir: str) -> None:
    """An HParams record for a trial that did not finish training (pruned, infeasible, ...)."""
    from scaling.metrics import MetricWriter
    w = MetricWriter(logdir)
    hp = trial.hparams if trial.hparams is not None else trial.values
    w.hparams({**hp, "status": metrics.get("status", "")},
              {k: metrics[k] for k in ("val_top1", "val_top5", "val_loss")
               if isinstance(metrics.get(k), (int, float))})
    w.close()


def _preflight(trial: Trial, workdir: str, preflight_fn: Callable[..., dict],
               memory_limit_mb: float) -> dict:
    path = os.path.join(workdir, "preflight", f"{trial.point}.json")
    pre = rundir.read_json(path)
    if pre is None:
        pre = preflight_fn(trial.config, memory_limit_mb=memory_limit_mb)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        rundir.write_json_atomic(path, pre)
    return pre


def run_trial(trial: Trial, workdir: str, grid_cfg: Any, train_fn: Callable[..., dict],
              preflight_fn: Callable[[Any], dict] = preflight, *, rung: int = 0,
              until_step: int | None = None) -> dict:
    """Preflight, then train (to `until_step`, or to the end); records the trial's state at
    this rung in rung<k>.json and, when it ended, result.json: done / diverged / failed /
    infeasible. Returns that state."""
    from scaling.train import Diverged
    from scaling.train.memory import DoesNotFit

    tdir = os.path.join(workdir, "trials", trial.id)
    with open(os.path.join(tdir, "config.txt"), "w") as f:
        f.write(str(trial.config))
    try:
        pre = _preflight(trial, workdir, preflight_fn, grid_cfg.max_memory_mb)
    except DoesNotFit as e:  # no microbatch split fits the budget or the device
        return _final(tdir, trial, {"status": "infeasible", "reason": str(e)}, rung)
    except Exception as e:  # noqa: BLE001 - a bad trial must not stop the grid
        return _final(tdir, trial, {"status": "failed", "reason": f"preflight: {_reason(e)}"}, rung)
    for field in ("grad_accum_steps", "eval_batch_size"):  # the split that fits (preflight)
        if pre.get(field):
            trial.config.train[field] = pre[field]
    over = []
    if grid_cfg.max_gmacs and pre["gmacs"] > grid_cfg.max_gmacs:
        over.append(f"gmacs {pre['gmacs']:.4f} > grid.max_gmacs {grid_cfg.max_gmacs}")
    if grid_cfg.max_memory_mb and pre["peak_memory_mb"] > grid_cfg.max_memory_mb:
        over.append(f"peak_memory_mb {pre['peak_memory_mb']:.1f} > grid.max_memory_mb "
                    f"{grid_cfg.max_memory_mb}")
    if over:
        return _final(tdir, trial, {"status": "infeasible", "reason": "; ".join(over), **pre}, rung)
    try:
        result = train_fn(trial.config, tdir, until_step=until_step, hparams=trial.hparams)
    except Diverged as e:
        return _final(tdir, trial, {"status": "diverged", "reason": str(e), "step": e.step, **pre}, rung)
    except Exception as e:  # noqa: BLE001 - OOM, bad shapes, ...: record and go on
        log.error("trial %s failed:\n%s", trial.id, traceback.format_exc())
        return _final(tdir, trial, {"status": "failed", "reason": _reason(e), **pre}, rung)
    if result.get("status") == "preempted":
        return result
    result = {**pre, **result, "rung": rung}
    timing = rundir.read_timing(tdir)
    result["step_time_s"] = timing.get("step_time_s")
    result["train_time_s"] = timing.get("train_time_s")
    if result.get("status") == "done":
        rundir.write_result(tdir, result)
    rundir.write_json_atomic(rung_path(tdir, rung), result)
    return result


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _final(tdir: str, trial: Trial, result: dict, rung: int = 0) -> dict:
    os.makedirs(tdir, exist_ok=True)
    result = {**result, "rung": rung}
    rundir.write_result(tdir, result)
    rundir.write_json_atomic(rung_path(tdir, rung), result)
    _hparams_only(trial, result, tdir)
    return result


def _rung_result(workdir: str, trial: Trial, k: int) -> dict | None:
    """The trial's state at the end of rung k, if it got there (or ended before it)."""
    tdir = os.path.join(workdir, "trials", trial.id)
    res = rundir.read_json(rung_path(tdir, k))
    if res and res.get("status") in RUNG_FINAL:
        return res
    final = rundir.read_result(tdir)
    return final if final and final.get("status") in FINAL else None


def _run_rung(units: list[Trial], workdir: str, grid_cfg: Any, k: int, steps: dict[str, list[int]],
              train_fn, preflight_fn, owner: str, single_process: bool) -> bool:
    """Runs every unit to the end of rung k (claims, then waits for other workers' units);
    returns False when a SIGTERM stopped it."""
    while True:
        waiting = False
        for trial in units:
            if _rung_result(workdir, trial, k):
                continue
            tdir = os.path.join(workdir, "trials", trial.id)
            claim = None
            if single_process:  # multi-host jobs run every trial together, in order
                claim = try_claim(tdir, owner, stale_after_s=grid_cfg.stale_after_s,
                                  heartbeat_s=grid_cfg.heartbeat_s)
                if claim is None:
                    waiting = True
                    continue
                if _rung_result(workdir, trial, k):  # finished between our check and our claim
                    claim.release()
                    continue
            last = k == len(steps[trial.id]) - 1
            log.info("trial %s rung %d (%s)", trial.id, k, owner)
            try:
                res = run_trial(trial, workdir, grid_cfg, train_fn, preflight_fn, rung=k,
                                until_step=None if last else steps[trial.id][k])
                log.info("trial %s rung %d: %s val_top1=%s", trial.id, k, res.get("status"),
                         res.get("val_top1"))
                if res.get("status") == "preempted":
                    return False
            finally:
                if claim:
                    claim.release()
        if not waiting:
            return True
        time.sleep(grid_cfg.poll_s)


def promote(units: list[Trial], results: dict[str, dict], metric: str, mode: str, eta: int
            ) -> tuple[list[str], list[dict]]:
    """Ranks the points of a rung by the mean of `metric` over their seeds (points whose
    trials did not all reach the rung healthy rank last) and keeps the top ceil(n / eta).
    Returns (the promoted point ids, the rung table rows)."""
    by_point: dict[str, list[dict]] = {}
    for t in units:
        by_point.setdefault(t.point, []).append(results[t.id])
    sign = 1.0 if mode == "max" else -1.0
    table = []
    for pid, res in by_point.items():
        ok = all(r.get("status") in ("paused", "done", "pruned") and r.get(metric) is not None
                 for r in res)
        mean = sum(float(r[metric]) for r in res) / len(res) if ok else None
        table.append({"point": pid, "seeds": len(res), "step": res[0].get("step"), metric: mean,
                      "status": "ok" if ok else "/".join(sorted({str(r.get('status')) for r in res}))})
    order = sorted(range(len(table)), key=lambda i: (table[i][metric] is None,
                                                   -sign * (table[i][metric] or 0.0), i))
    keep = max(1, math.ceil(len(table) / eta))
    promoted = [table[i]["point"] for i in order[:keep] if table[i][metric] is not None]
    for rank, i in enumerate(order):
        table[i]["rank"] = rank + 1
        table[i]["promoted"] = table[i]["point"] in promoted
    return promoted, [table[i] for i in order]


def run_study(trials: list[Trial], workdir: str, grid_cfg: Any, *,
              rungs: dict[str, list[int]] | None = None, eta: int = 3, metric: str = "val_top1",
              mode: str = "max", train_fn: Callable[..., dict] | None = None,
              preflight_fn: Callable[[Any], dict] = preflight) -> list[dict]:
    """Runs the trials (this worker's share first, then whatever is left), rung by rung when
    `rungs` (trial id -> rising step budgets, the last the full one) has more than one; writes
    results.csv/json and rungs.json and returns the rows (process 0; others get [])."""
    import jax

    if train_fn is None:
        from scaling.train import fit as train_fn
    ids = [t.id for t in trials]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise ValueError(f"grid: two trials share the id(s) {sorted(dupes)}; make the axes distinct.")
    worker, num_workers = worker_identity(grid_cfg)
    owner = f"worker{worker}of{num_workers}"
    os.makedirs(os.path.join(workdir, "trials"), exist_ok=True)
    for t in trials:
        if t.excluded and not rundir.read_result(os.path.join(workdir, "trials", t.id)):
            _final(os.path.join(workdir, "trials", t.id), t, {"status": "excluded", "reason": t.excluded})
    active = [t for t in trials if not t.excluded]
    mine = active[worker::num_workers]
    active = mine + [t for t in active if t not in mine]
    steps = rungs or {}
    steps = {t.id: steps.get(t.id) or [0] for t in trials}
    n_rungs = max((len(steps[t.id]) for t in active), default=1)
    single_process = jax.process_count() == 1
    table: list[dict] = []
    for k in range(n_rungs):
        units = [t for t in active if k < len(steps[t.id])]
        if not _run_rung(units, workdir, grid_cfg, k, steps, train_fn, preflight_fn, owner,
                         single_process):
            break
        results = {t.id: _rung_result(workdir, t, k) for t in units}
        last = k == n_rungs - 1
        promoted, rows = promote(units, results, metric, mode, 1 if last else eta)
        table += [{"rung": k, **row, **({"promoted": None} if last else {})} for row in rows]
        if last:  # the full budget: a ranking, nothing to promote or prune
            break
        for t in units:
            res = results[t.id]
            if t.point not in promoted and res.get("status") == "paused":
                tdir = os.path.join(workdir, "trials", t.id)
                if not rundir.read_result(tdir):
                    _final(tdir, t, {**res, "status": "pruned",
                                     "reason": f"not in the top 1/{eta} at rung {k}"}, k)
        active = [t for t in units if t.point in promoted]
    if jax.process_index() != 0:
        return []
    rows = collect_rows(workdir, trials)
    write_results(workdir, rows)
    rundir.write_json_atomic(os.path.join(workdir, "rungs.json"), table)
    return rows


def default_grid_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_workers=1,          # split the grid over N jobs sharing the workdir ...
        worker=0,               # ... this is job i (SLURM_ARRAY_TASK_ID when unset)
        max_gmacs=0.0,          # eq. 8 budget: per-image GMACs (0 = no limit)
        max_memory_mb=0.0,      # eq. 9 budget: peak train-step memory per device (0 = none)
        stale_after_s=300.0,    # a claim not refreshed for this long belongs to a dead worker
        heartbeat_s=20.0,
        poll_s=5.0,             # how often a worker waiting for others' trials looks again
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
            raise ValueError(f"{label.format(id=t.point)}: {e}") from None
