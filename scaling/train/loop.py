"""The fit loop: model + data + mesh -> trained state, checkpoints, logs and result.json.

Nothing here knows about grids or which experiment runs it. A relaunch with the same
workdir resumes from the newest readable checkpoint; because the batches of step s are a
pure function of (seed, s) and the step RNG is fold_in(rng, s), a resumed run computes
exactly what an uninterrupted one would (bitwise on CPU).
"""
from __future__ import annotations

import dataclasses
import json
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
from scaling import parallel
from scaling.models import create_model, model_fields
from scaling.train import finetune
from scaling.train.state import TrainState, abstract_state, count_params, create_state
from scaling.train.state import batch_spec as make_batch_spec
from scaling.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"training diverged at step {step}: loss={loss}. Lower train.lr "
                         "(or add train.grad_clip_norm / warmup).")
        self.step, self.loss = step, loss


def build_model(model_cfg: Any, num_classes: int, compute_dtype: str = "float32"):
    """Creates the registered model named `model_cfg.name` with the config's other fields as
    overrides; the head size comes from the data unless `model.num_classes` is set."""
    overrides = {k: (tuple(v) if isinstance(v, list) else v)
                 for k, v in model_cfg.items() if k != "name"}
    if not overrides.get("num_classes"):
        overrides["num_classes"] = num_classes
    if "dtype" in model_fields(model_cfg.name) and compute_dtype != "float32":
        overrides["dtype"] = COMPUTE_DTYPES[compute_dtype]
    return create_model(model_cfg.name, **overrides)


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


class Evaluator:
    """Loss / top-1 / top-5 over a whole split; the last batch is padded and masked."""

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
        return {"loss": float(totals["loss"]) / n, "top1": float(totals["top1"]) / n,
                "top5": float(totals["top5"]) / n, "examples": int(totals["count"])}


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
class Run:
    """What a training config compiles to: model, optimizer, schedule, durations and the
    jitted train step with its input shapes. `fit` trains with it; the grid's preflight
    compiles the very same step (so the second compile is a persistent-cache hit)."""
    model: Any
    tx: Any
    schedule: Callable
    steps_per_epoch: int
    total_steps: int
    step_fn: Callable
    state_spec: Any
    batch_spec: dict

    def compile(self):
        return self.step_fn.lower(self.state_spec, self.batch_spec).compile()


def make_run(config: Any, mesh, num_classes: int, num_examples: int) -> Run:
    tc = config.train
    parallel.check_batch_size(tc.batch_size, mesh, "train.batch_size")
    steps_per_epoch = max(math.ceil(num_examples / tc.batch_size), 1)
    total_steps = int(tc.num_steps) if tc.num_steps > 0 else int(round(tc.num_epochs * steps_per_epoch))
    model = build_model(config.model, num_classes, tc.compute_dtype)
    size = config.data.image_size
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    x1 = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), x1)
    params = variables["params"]
    plan = finetune.make_plan(config, model, params)  # scratch / linear_probe / finetune[_bn]
    tx, schedule = finetune.build_optimizer(tc, plan, steps_per_epoch, total_steps)
    state_spec = abstract_state(variables, tx, rep)
    batch_spec = make_batch_spec(tc.batch_size, (size, size, 3), data)
    step_fn = make_train_step(model, tx, mesh, label_smoothing=tc.label_smoothing,
                              compute_dtype=COMPUTE_DTYPES[tc.compute_dtype], plan=plan)
    return Run(model, tx, schedule, steps_per_epoch, total_steps, step_fn, state_spec, batch_spec)


def fit(config: Any, workdir: str, *, mesh=None, variables: dict | None = None,
        on_log: Callable[[int, dict], None] | None = None) -> dict:
    """Trains `config.model` on `config.data` with `config.train`; returns the final metrics.

    Writes WORKDIR/checkpoints, TensorBoard events + metrics.jsonl, result.json (final
    metrics, deterministic) and timing.json (wall-clock figures, per launch).
    """
    tc = config.train
    mesh = mesh or parallel.make_mesh()
    pi, pc = jax.process_index(), jax.process_count()
    is_main = pi == 0
    os.makedirs(workdir, exist_ok=True)
    t_setup = time.perf_counter()

    train_ds = data_lib.build_dataset(config.data, config.data.train_split, train=True, seed=config.seed)
    eval_ds = data_lib.build_dataset(config.data, config.data.eval_split, train=False, seed=config.seed)
    parallel.check_batch_size(tc.eval_batch_size, mesh, "train.eval_batch_size")
    run = make_run(config, mesh, train_ds.num_classes, train_ds.num_examples)
    model, tx, schedule = run.model, run.tx, run.schedule
    batch, steps_per_epoch, total_steps = tc.batch_size, run.steps_per_epoch, run.total_steps
    eval_every = int(tc.eval_every_steps) if tc.eval_every_steps > 0 else int(
        round(tc.eval_every_epochs * steps_per_epoch)) if tc.eval_every_epochs > 0 else 0
    size = config.data.image_size

    if variables is None:  # pretrained weights from config.init.path, if any
        variables = finetune.initial_variables(config, model, jax.random.PRNGKey(config.seed), size)
    host_state = create_state(model, tx, jax.random.PRNGKey(config.seed), (size, size, 3), variables)
    n_params, n_stats = count_params(host_state.params), count_params(host_state.batch_stats)
    state = parallel.replicate(host_state, mesh)
    del host_state

    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=tc.keep_checkpoints)
    state, restored = checkpointer.restore(state)
    start = int(parallel.fetch(state.step))
    if restored is not None:
        log.info("resumed from %s at step %d", checkpointer.directory, start)
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, resume_step=restored)
    if restored is None and is_main:
        writer.text("config", f"```\n{config}\n```")

    compute_dtype = COMPUTE_DTYPES[tc.compute_dtype]
    if (tc.compute_dtype == "bfloat16" and jax.default_backend() == "cpu"
            and not _env.cpu_has_native_bf16()):
        log.warning("train.compute_dtype=bfloat16 on a CPU without native bf16 (no AVX-512 BF16 "
                    "or AMX): XLA emulates it, so it runs slower than float32 here.")
    evaluator = Evaluator(eval_ds, make_eval_step(model, mesh, compute_dtype=compute_dtype),
                          tc.eval_batch_size, mesh)
    batch_sharding = parallel.batch_sharding(mesh)
    t0 = time.perf_counter()
    compiled = run.compile()
    compile_s = time.perf_counter() - t0
    log.info("model %s: %d params, %d BN stats; train step compiled in %.1f s; %d devices, "
                 "global batch %d, %d steps (%d/epoch)", config.model.name, n_params, n_stats,
                 compile_s, mesh.devices.size, batch, total_steps, steps_per_epoch)

    log_every = max(int(tc.log_every_steps), 1)
    window: list[dict] = []
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    step_times: list[float] = []
    bar = tqdm(total=total_steps, initial=start, disable=not (is_main and tc.progress_bar),
               dynamic_ncols=True, unit="step", mininterval=2.0)
    t_loop = t_log = time.perf_counter()
    seen_since_log = 0
    step = start
    stopped_early = False
    try:
        with _StopRequest() as stop:
            for step_idx, local in data_lib.prefetch(train_ds, start, total_steps, batch, pi, pc):
                state, m = compiled(state, parallel.to_global(local, batch_sharding))
                window.append(m)
                step = step_idx + 1
                seen_since_log += batch
                bar.update(1)
                if step % log_every == 0 or step == total_steps:
                    vals = parallel.fetch(jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *window))
                    window = []
                    now = time.perf_counter()
                    ips = seen_since_log / max(now - t_log, 1e-9)
                    step_times.append((now - t_log) / max(seen_since_log / batch, 1))
                    t_log, seen_since_log = now, 0
                    last_train = {k: float(v) for k, v in vals.items()}
                    if not np.isfinite(last_train["loss"]):
                        raise Diverged(step, last_train["loss"])
                    scal = {f"train/{k}": v for k, v in last_train.items()}
                    scal["train/lr"] = float(schedule(step - 1))
                    scal["train/images_per_sec"] = ips
                    scal["train/epoch"] = step / steps_per_epoch
                    writer.scalars(step, scal)
                    bar.set_postfix(loss=f"{last_train['loss']:.3f}", img_s=f"{ips:.0f}")
                    if on_log:
                        on_log(step, scal)
                if eval_every and step % eval_every == 0 and step != total_steps:
                    t_eval = time.perf_counter()
                    last_eval = evaluator(state)
                    writer.scalars(step, {f"eval/{k}": v for k, v in last_eval.items() if k != "examples"})
                    t_log += time.perf_counter() - t_eval  # eval time is not training throughput
                if step % tc.checkpoint_every_steps == 0 or stop.requested:
                    checkpointer.save(step, state)
                if stop.requested:
                    log.warning("SIGTERM: saved step %d; relaunch to resume", step)
                    stopped_early = True
                    break
        if not stopped_early:
            checkpointer.save(step, state, force=True)
    finally:
        bar.close()
        checkpointer.close()
    train_time = time.perf_counter() - t_loop

    if stopped_early:
        writer.close()
        return {"status": "preempted", "step": step}
    final_eval = evaluator(state)
    writer.scalars(total_steps, {f"eval/{k}": v for k, v in final_eval.items() if k != "examples"})
    result = {
        "val_top1": final_eval["top1"], "val_top5": final_eval["top5"],
        "val_loss": final_eval["loss"], "val_examples": final_eval["examples"],
        "train_loss": last_train.get("loss"), "train_top1": last_train.get("top1"),
        "step": total_steps, "epochs": total_steps / steps_per_epoch,
        "params": n_params, "batch_stats": n_stats, "model": config.model.name,
        "num_devices": int(mesh.devices.size), "status": "done",
    }
    writer.hparams(metrics_lib.flatten_config(config),
                   {k: result[k] for k in ("val_top1", "val_top5", "val_loss") if result[k] is not None})
    writer.close()
    if is_main:
        write_json_atomic(os.path.join(workdir, "result.json"), result)
        timing_path = os.path.join(workdir, "timing.json")
        timing = json.load(open(timing_path)) if os.path.exists(timing_path) else {"launches": []}
        timing["launches"].append({
            "start_step": start, "end_step": total_steps, "train_time_s": train_time,
            "compile_time_s": compile_s, "setup_time_s": t0 - t_setup,
            "step_time_s": float(np.median(step_times)) if step_times else None})
        timing["train_time_s"] = sum(x["train_time_s"] for x in timing["launches"])
        steps_timed = [x["step_time_s"] for x in timing["launches"] if x["step_time_s"]]
        timing["step_time_s"] = float(np.median(steps_timed)) if steps_timed else None
        write_json_atomic(timing_path, timing)
    return result
