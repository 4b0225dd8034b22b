"""The fit loop: model + data + mesh -> trained state, checkpoints, logs and result.json.

Nothing here knows about grids or which experiment runs it; what the run directory holds is
scaling.rundir's contract. `fit` is three parts: `_setup` (data, Run, state restored from the
workdir, writer, evaluator, compiled step), `_train_loop`, and `_finish` (evaluation,
result.json, HParams record, timing.json).

A relaunch with the same workdir resumes from the newest readable checkpoint; because the
batches of step s are a pure function of (seed, s) and the step RNG is fold_in(rng, s), a
resumed run computes exactly what an uninterrupted one would (bitwise on CPU). The per-step
metrics of the log window in progress are saved beside every checkpoint (progress.json), so a
run resumed from inside a window (after a pause or a preemption) logs the same windows as an
uninterrupted run, and judges divergence the same way.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from scaling import _env
from scaling import checkpoint as ckpt_lib
from scaling import data as data_lib
from scaling import metrics as metrics_lib
from scaling import parallel, rundir
from scaling.train import finetune
from scaling.train.run import (COMPUTE_DTYPES, Run, build_model, data_config,  # noqa: F401 (re-exported)
                               make_run)
from scaling.train.state import TrainState, count_params, create_state
from scaling.train.step import make_eval_step

log = logging.getLogger(__name__)

_FIX = "Lower train.lr, or add train.grad_clip_norm or warmup (train.warmup_epochs)."


class Diverged(RuntimeError):
    """Training diverged: raised as soon as it is seen; the run is left unfinished (its
    checkpoints stop at the last healthy save, no result.json is written).

    The rule, checked at every logged window (every `train.log_every_steps` steps and at the
    end) on the per-step metrics the train step returns, which stay on device in between (no
    extra host sync per step):
      * a step's loss or grad_norm is NaN or infinite (the window's mean is then non-finite;
        the message names the first such step), or
      * the window's mean loss exceeds `train.diverge_factor` (default 10; 0 turns this rule
        off) times max(the first logged window's mean loss, ln(num_classes)).
    Parameters: with a finite grad_norm and learning rate an update is finite unless it
    overflows, and a non-finite update shows in the next step's loss; to also catch an
    overflow in the last steps before a save, the parameters and BatchNorm statistics are
    checked for finiteness (one reduction on device) before every checkpoint, so no
    checkpoint of a diverged state is written. A run paused inside a window is checked for
    non-finite values only (the explosion rule needs the whole window).

    Attributes: step, quantity ('loss', 'grad_norm' or 'params'), value, reason.
    """

    def __init__(self, step: int, value: float, quantity: str = "loss", reason: str | None = None):
        self.step, self.value, self.quantity = int(step), value, quantity
        self.reason = reason or f"{quantity}={value} is not finite"
        super().__init__(f"training diverged at step {self.step}: {self.reason}. {_FIX}")


def divergence_reason(loss: float, grad_norm: float | None, first_loss: float | None,
                      num_classes: int, factor: float) -> str | None:
    """Why a logged window counts as diverged (the rule of `Diverged`), or None.

    `loss` / `grad_norm`: the window's means; `first_loss`: the first logged window's mean
    loss (None for the first window itself); `factor`: train.diverge_factor (0: only the
    finiteness rule)."""
    for name, value in (("loss", loss), ("grad_norm", grad_norm)):
        if value is not None and not math.isfinite(value):
            return f"{name}={value} is not finite"
    if factor > 0:
        first = loss if first_loss is None else first_loss
        log_c = math.log(max(num_classes, 1))
        if loss > factor * max(first, log_c):
            return (f"the mean loss of the window, {loss:.4g}, exceeds train.diverge_factor="
                    f"{factor:g} x max(first window's loss {first:.4g}, ln({num_classes}) = "
                    f"{log_c:.4g})")
    return None


def hparams_record(config: Any, result: dict, hparams: dict | None = None) -> tuple[dict, dict]:
    """(hparams, metrics) of a finished run's TensorBoard HParams record.

    hparams: `hparams` as given (a flat dict name -> scalar: swept values, seed, ...) or, when
    None, model.name, seed, train.lr, train.batch_size, the duration (train.num_steps when set,
    else train.num_epochs) and data.image_size (audio: data.clip_samples); plus `status` (the
    result's, 'done').
    metrics: the result's val_top1, val_top5 and val_loss. The whole config is in the text tab."""
    if hparams is None:
        tc = config.train
        duration = ("train.num_steps", tc.num_steps) if tc.num_steps > 0 else (
            "train.num_epochs", tc.num_epochs)
        hparams = {"model.name": config.model.name, "seed": config.get("seed", 0),
                   "train.lr": tc.lr, "train.batch_size": tc.batch_size, duration[0]: duration[1],
                   **{f"data.{k}": config.data[k] for k in ("image_size", "clip_samples")
                      if k in config.data}}
    hp = {**hparams, "status": result["status"]}
    metrics = {k: result[k] for k in ("val_top1", "val_top5", "val_loss") if result.get(k) is not None}
    return hp, metrics


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class Evaluator:
    """Loss / top-1 / top-5 over a whole split; the last batch is padded and masked. With an
    eval step made with `per_class=True` the per-class sums come back too, as arrays."""

    def __init__(self, dataset, eval_step: Callable, batch_size: int, mesh):
        self.dataset, self.eval_step, self.batch_size = dataset, eval_step, batch_size
        self.sharding = parallel.batch_sharding(mesh)

    def __call__(self, state: TrainState) -> dict[str, float]:
        totals = None
        for batch in self.dataset.eval_batches(self.batch_size, jax.process_index(),
                                               jax.process_count()):
            out = self.eval_step(state, parallel.to_global(batch, self.sharding))
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        totals = parallel.fetch(totals)
        n = max(float(totals["count"]), 1.0)
        per_class = {k: v for k, v in totals.items() if np.ndim(v)}
        return {"loss": float(totals["loss"]) / n, "top1": float(totals["top1"]) / n,
                "top5": float(totals["top5"]) / n, "examples": int(totals["count"]), **per_class}


class _StopRequest:
    """SIGTERM (a preemption notice) -> save a checkpoint at the next step and stop cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class _Session:
    """What `_setup` builds for one launch of `fit`, and the progress `_train_loop` makes."""
    config: Any
    workdir: str
    mesh: Any
    run: Run
    train_ds: Any
    evaluator: Evaluator
    compiled: Callable
    checkpointer: ckpt_lib.Checkpointer
    writer: metrics_lib.MetricWriter
    state: TrainState
    start: int                  # the step this launch starts from (restored, or 0)
    stop: int                   # the step it trains to: min(until_step, total_steps)
    num_classes: int
    n_params: int
    n_stats: int
    eval_every: int             # 0: evaluate at the end only
    setup_s: float
    compile_s: float
    is_main: bool
    window: list                # per-step metrics since the last logged window (on device)
    first_loss: float | None    # the first logged window's mean loss (divergence reference)
    step: int = 0
    last_train: dict = dataclasses.field(default_factory=dict)
    step_times: list = dataclasses.field(default_factory=list)
    train_time_s: float = 0.0


def fit(config: Any, workdir: str, *, mesh=None, variables: dict | None = None,
        on_log: Callable[[int, dict], None] | None = None, until_step: int | None = None,
        hparams: dict | None = None) -> dict:
    """Trains `config.model` on `config.data` with `config.train`; returns the final metrics.

    Writes the run directory of scaling.rundir: checkpoints/, TensorBoard events +
    metrics.jsonl, result.json (final metrics, deterministic), timing.json (wall-clock, per
    launch). Resumes from the newest checkpoint in `workdir`.

    variables: initial {'params', 'batch_stats'} (else config.init's weights, else random).
    on_log(step, scalars): called at every logged train window.
    until_step: train with the whole configured schedule but stop after this step: save a
      checkpoint there, evaluate (logged as eval/* at that step) and return the result's keys
      with status 'paused' and step = until_step (train_loss / train_top1: the mean over the
      steps since the last logged window, or of that window when the pause ends one), without
      result.json or the HParams record; timing.json records the launch. A relaunch with a
      larger until_step (or None) resumes and ends with exactly the result.json and train/*
      log of an uninterrupted run (at any until_step, on a log window boundary or not); the
      only differences in the logs are the eval/* point at the pause step (when it is not an
      eval step anyway) and wall-clock values (train/images_per_sec). None, or >= the run's
      total steps: train to the end. A run already past until_step is not rewound: it
      evaluates and returns 'paused' at its step.
    hparams: the TensorBoard HParams record's hparams (see `hparams_record`).
    Returns {'status': 'preempted', 'step'} when a SIGTERM stopped it (relaunch to resume).
    Raises Diverged (see there) when training diverges.
    """
    session = _setup(config, workdir, mesh, variables, until_step)
    try:
        preempted = _train_loop(session, on_log)  # closes the checkpointer (waits for saves)
        return _finish(session, preempted, hparams)
    finally:
        session.writer.close()


def _setup(config: Any, workdir: str, mesh, variables: dict | None, until_step: int | None) -> _Session:
    if until_step is not None and int(until_step) < 1:
        raise ValueError(f"fit: until_step={until_step} must be a positive step (or None: to the end).")
    tc = config.train
    mesh = mesh or parallel.mesh_from_config(config)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if is_main:
        rundir.write_config(workdir, config)  # what eval / predict / export rebuild the run from
    t_setup = time.perf_counter()

    data = data_config(config)   # the model's mean / std / crop where the config sets none
    train_ds = data_lib.build_dataset(data, data.train_split, train=True, seed=config.seed)
    eval_ds = data_lib.build_dataset(data, data.eval_split, train=False, seed=config.seed)
    parallel.check_batch_size(tc.eval_batch_size, mesh, "train.eval_batch_size")
    run = make_run(config, mesh, train_ds.num_classes, train_ds.num_examples)
    steps_per_epoch, total_steps = run.steps_per_epoch, run.total_steps
    stop = total_steps if until_step is None else min(int(until_step), total_steps)
    eval_every = int(tc.eval_every_steps) if tc.eval_every_steps > 0 else int(
        round(tc.eval_every_epochs * steps_per_epoch)) if tc.eval_every_epochs > 0 else 0
    size = config.data.get("image_size")           # None for audio data

    if variables is None:  # pretrained weights from config.init.path, if any
        variables = finetune.initial_variables(config, run.model, jax.random.PRNGKey(config.seed), size)
    host_state = create_state(run.model, run.tx, jax.random.PRNGKey(config.seed), run.input_shape, variables)
    n_params, n_stats = count_params(host_state.params), count_params(host_state.batch_stats)
    state = parallel.place(host_state, run.state_sharding)  # each device gets only its slice
    del host_state

    # Restored into this run's shardings, whatever mesh the checkpoint was saved from.
    checkpointer = ckpt_lib.Checkpointer(rundir.checkpoint_dir(workdir), max_to_keep=tc.keep_checkpoints)
    state, restored = checkpointer.restore(state)
    start = int(parallel.fetch(state.step))
    if restored is not None:
        _check_loader_position(checkpointer.data, data_lib.loader_position(
            train_ds, start, tc.batch_size))
    window, first_loss, last_train = [], None, {}
    if restored is not None:
        log.info("resumed from %s at step %d", checkpointer.directory, start)
        window, first_loss, last_train = _carried_over(workdir, restored, mesh)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=restored)
    if restored is None and is_main:
        writer.text("config", f"```\n{config}\n```")

    compute_dtype = COMPUTE_DTYPES[tc.compute_dtype]
    if (tc.compute_dtype == "bfloat16" and jax.default_backend() == "cpu"
            and not _env.cpu_has_native_bf16()):
        log.warning("train.compute_dtype=bfloat16 on a CPU without native bf16 (no AVX-512 BF16 "
                    "or AMX): XLA emulates it, so it runs slower than float32 here.")
    evaluator = Evaluator(eval_ds, make_eval_step(run.model, mesh, compute_dtype=compute_dtype,
                                                  state_sharding=run.state_sharding),
                          tc.eval_batch_size, mesh)
    t0 = time.perf_counter()
    compiled = run.compile()
    compile_s = time.perf_counter() - t0
    accum = int(tc.get("grad_accum_steps", 1))
    log.info("model %s: %d params, %d BN stats; train step compiled in %.1f s; %d devices "
             "(mesh %s), global batch %d%s, %d steps (%d/epoch)%s", config.model.name, n_params,
             n_stats, compile_s, mesh.devices.size,
             " x ".join(f"{a}={n}" for a, n in mesh.shape.items()), tc.batch_size,
             f" in {accum} microbatches of {tc.batch_size // accum}" if accum > 1 else "",
             total_steps, steps_per_epoch,
             f"; pausing after step {stop}" if stop < total_steps else "")
    return _Session(config, workdir, mesh, run, train_ds, evaluator, compiled, checkpointer, writer,
                    state, start, stop, train_ds.num_classes, n_params, n_stats, eval_every,
                    t0 - t_setup, compile_s, is_main, window, first_loss, last_train=last_train)


def _check_loader_position(saved: dict | None, current: dict) -> None:
    """Warns when the checkpoint's input-pipeline record (None: a step saved before it was
    recorded) does not describe the batches this launch reads from its step on."""
    if saved is None:
        return
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        log.warning("the checkpoint's input-pipeline position differs from this launch's "
                    "(%s): the batches from here on are not those of an uninterrupted run",
                    ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))


def _carried_over(workdir: str, step: int, mesh) -> tuple[list, float | None, dict]:
    """The log window in progress, the divergence reference and the last logged window's
    means (what result.json reports as train_loss / train_top1) at checkpoint `step`
    (progress.json), with the window's per-step metrics back on the devices."""
    entry = rundir.read_progress(workdir, step)
    if entry is None:  # e.g. killed between the checkpoint and its progress record
        log.info("no progress record for step %d: the first log window after it is partial", step)
        return [], None, {}
    dtypes = entry.get("dtypes", {})
    window = [{k: np.asarray(v, dtype=dtypes.get(k, "float32")) for k, v in m.items()}
              for m in entry["window"]]
    return parallel.replicate(window, mesh), entry.get("first_loss"), entry.get("last_train", {})


def _train_loop(s: _Session, on_log: Callable[[int, dict], None] | None) -> bool:
    """Steps s.start+1 .. s.stop: logs, evaluates and checkpoints on schedule, then saves a
    checkpoint at the last step. Returns True when a SIGTERM stopped it early."""
    tc = s.config.train
    batch, total_steps = tc.batch_size, s.run.total_steps
    log_every = max(int(tc.log_every_steps), 1)
    batch_sharding = parallel.batch_sharding(s.mesh)
    bar = tqdm(total=total_steps, initial=s.start, disable=not (s.is_main and tc.progress_bar),
               dynamic_ncols=True, unit="step", mininterval=2.0)
    t_loop = t_log = time.perf_counter()
    seen_since_log = 0
    s.step = s.start
    preempted = False
    try:
        with _StopRequest() as stop, data_lib.prefetch(
                s.train_ds, s.start, s.stop, batch, jax.process_index(),
                jax.process_count()) as batches:
            for step_idx, local in batches:
                s.state, m = s.compiled(s.state, parallel.to_global(local, batch_sharding))
                s.window.append(m)
                s.step = step = step_idx + 1
                seen_since_log += batch
                bar.update(1)
                if step % log_every == 0 or step == total_steps:
                    jax.block_until_ready(m)  # the window's steps ran: time them, not their dispatch
                    now = time.perf_counter()
                    ips = seen_since_log / max(now - t_log, 1e-9)
                    s.step_times.append((now - t_log) / max(seen_since_log / batch, 1))
                    t_log, seen_since_log = now, 0
                    scal = _log_window(s, step, ips)
                    bar.set_postfix(loss=f"{s.last_train['loss']:.3f}", img_s=f"{ips:.0f}")
                    if on_log:
                        on_log(step, scal)
                if s.eval_every and step % s.eval_every == 0 and step != s.stop:
                    jax.block_until_ready(s.state)  # queued train steps count as training
                    t_eval = time.perf_counter()
                    _evaluate(s, step)
                    t_log += time.perf_counter() - t_eval  # eval time is not training throughput
                if step % tc.checkpoint_every_steps == 0 or stop.requested:
                    _save(s, step)
                if stop.requested:
                    log.warning("SIGTERM: saved step %d; relaunch to resume", step)
                    preempted = True
                    break
        if not preempted:
            _save(s, s.step, force=True)
    finally:
        bar.close()
        s.checkpointer.close()
    s.train_time_s = time.perf_counter() - t_loop
    return preempted


def _window_means(window: list) -> dict[str, float]:
    means = parallel.fetch(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *window))
    return {k: float(v) for k, v in means.items()}


def _log_window(s: _Session, step: int, images_per_sec: float) -> dict:
    """Logs the window that ends at `step` (raising Diverged first if it diverged)."""
    s.last_train = _window_means(s.window)
    _check_divergence(s, step, s.last_train, explosion=True)
    s.window = []
    if s.first_loss is None:
        s.first_loss = s.last_train["loss"]
    scal = {f"train/{k}": v for k, v in s.last_train.items()}
    scal["train/lr"] = float(s.run.schedule(step - 1))
    scal["train/images_per_sec"] = images_per_sec
    scal["train/epoch"] = step / s.run.steps_per_epoch
    s.writer.scalars(step, scal)
    return scal


def _check_divergence(s: _Session, step: int, means: dict, *, explosion: bool) -> None:
    """Raises Diverged when the window ending at `step` (whose means are `means`) diverged."""
    factor = float(s.config.train.diverge_factor) if explosion else 0.0
    reason = divergence_reason(means["loss"], means.get("grad_norm"), s.first_loss,
                               s.num_classes, factor)
    if reason is None:
        return
    at, quantity, value = step, "loss", means["loss"]
    if not math.isfinite(value) or not math.isfinite(means.get("grad_norm", 0.0)):
        # Name the first step with a non-finite value (the means can also overflow on their own).
        for i, m in enumerate(parallel.fetch(s.window)):
            bad = [(k, float(m[k])) for k in ("loss", "grad_norm") if k in m and not np.isfinite(m[k])]
            if bad:
                at, (quantity, value) = step - len(s.window) + 1 + i, bad[0]
                reason = f"{quantity}={value} is not finite"
                break
    raise Diverged(at, value, quantity, reason)


def _evaluate(s: _Session, step: int) -> dict:
    """Evaluates the current state on the eval split and logs eval/* at `step`."""
    metrics = s.evaluator(s.state)
    s.writer.scalars(step, {f"eval/{k}": v for k, v in metrics.items() if k != "examples"})
    return metrics


def _save(s: _Session, step: int, force: bool = False) -> None:
    """Checkpoints the state at `step` (refusing a non-finite one: Diverged) and records the
    log window in progress beside it."""
    if not bool(parallel.fetch(_all_finite((s.state.params, s.state.batch_stats)))):
        raise Diverged(step, float("nan"), "params",
                       "the parameters or BatchNorm statistics are not finite")
    position = data_lib.loader_position(s.train_ds, step, s.config.train.batch_size)
    if s.checkpointer.save(step, s.state, force=force, data=position) and s.is_main:
        window = parallel.fetch(s.window)
        rundir.write_progress(s.workdir, step, {
            "window": [{k: float(v) for k, v in m.items()} for m in window],
            "dtypes": {k: str(np.asarray(v).dtype) for k, v in window[0].items()} if window else {},
            "first_loss": s.first_loss, "last_train": s.last_train},
            keep=s.config.train.keep_checkpoints)


def _finish(s: _Session, preempted: bool, hparams: dict | None) -> dict:
    """Evaluates, writes result.json and the HParams record of a finished run, and records
    the launch in timing.json; a paused run gets the same metrics but no result.json."""
    if preempted:
        _record_launch(s, "preempted")
        return {"status": "preempted", "step": s.step}
    finished = s.step >= s.run.total_steps
    train = s.last_train
    if not finished and s.window:  # paused inside a log window: report the steps since the last one
        train = _window_means(s.window)
        _check_divergence(s, s.step, train, explosion=False)
    final_eval = _evaluate(s, s.step)
    result = {
        "val_top1": final_eval["top1"], "val_top5": final_eval["top5"],
        "val_loss": final_eval["loss"], "val_examples": final_eval["examples"],
        "train_loss": train.get("loss"), "train_top1": train.get("top1"),
        "step": s.step, "epochs": s.step / s.run.steps_per_epoch,
        "params": s.n_params, "batch_stats": s.n_stats, "model": s.config.model.name,
        "num_devices": int(s.mesh.devices.size), "status": "done" if finished else "paused",
    }
    if finished:
        s.writer.hparams(*hparams_record(s.config, result, hparams))
    s.writer.close()
    if finished and s.is_main:
        rundir.write_result(s.workdir, result)
    _record_launch(s, result["status"])
    return result


def _record_launch(s: _Session, status: str) -> None:
    if s.is_main:
        rundir.record_launch(s.workdir, {
            "start_step": s.start, "end_step": s.step, "status": status,
            "train_time_s": s.train_time_s, "compile_time_s": s.compile_s,
            "setup_time_s": s.setup_s,
            "step_time_s": float(np.median(s.step_times)) if s.step_times else None})
