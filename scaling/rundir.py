"""The run directory: what one training run (`scaling.train.fit`) leaves in its workdir.

This module is the one owner of the layout; code that reads or writes a run directory uses
these names and helpers rather than spelling paths itself.

    RUN_DIR/
      checkpoints/    Orbax checkpoints of the TrainState, one sub-directory per step
                      (`fit`; the newest `train.keep_checkpoints` are kept). Deterministic.
      progress.json   the trainer's bookkeeping for each kept checkpoint step: the per-step
                      metrics of the log window in progress, the first window's loss (the
                      divergence reference) and the last logged window's means (result.json's
                      train_loss / train_top1), so a relaunch logs, decides and reports exactly
                      as an uninterrupted run would (`fit`). Deterministic.
      metrics.jsonl   every logged scalar, one JSON object a line: {"step": s, "train/loss": ...}
                      (`fit`, process 0; truncated to the restored step on resume). Deterministic
                      except `train/images_per_sec`.
      events.out.tfevents.*   the same scalars, the config as text and, for a finished run, the
                      HParams record, for TensorBoard (`fit`, process 0).
      result.json     the final metrics and `status` of a finished run: written once, at the end
                      (`fit` writes status 'done'; an experiment engine may add its own keys or
                      write 'diverged' / 'failed' / 'infeasible' for a run that did not finish).
                      A run that is paused (`fit(until_step=...)`) or preempted has none.
                      Deterministic: a resumed run writes the same file as an uninterrupted one.
      timing.json     wall-clock figures, appended by every launch that ends normally (done,
                      paused or preempted): {"launches": [{start_step, end_step, status,
                      train_time_s, compile_time_s, setup_time_s, step_time_s}, ...],
                      "train_time_s": sum over launches, "step_time_s": median over launches}.
                      Not deterministic; kept apart from result.json for that reason.
      config.json     the config `fit` trains with, as JSON (tuples as lists), rewritten by
                      every launch (`fit`, process 0): what evaluation, prediction and weight
                      export rebuild the model, its classes and its preprocessing from
                      (`read_config`), and what a relaunch is compared with (`scaling.cli`;
                      a sweep's workdir holds its own, and each trial one). Deterministic.

Every JSON file is written atomically (a temporary file, then `os.replace`), so a reader sees
either the old or the new content, never half a file.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

RESULT = "result.json"
TIMING = "timing.json"
METRICS = "metrics.jsonl"
PROGRESS = "progress.json"
CHECKPOINTS = "checkpoints"
CONFIG = "config.json"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def jsonable(obj: Any) -> Any:
    """numpy / jax scalars and arrays -> Python; non-finite floats -> 'nan' / 'inf' / '-inf'."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)) or hasattr(obj, "__array__"):
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes `obj` as JSON (indent 2, sorted keys) to `path` through a temporary file and
    `os.replace`. numpy / jax values become Python numbers and lists; non-finite floats
    (NaN, inf), which JSON cannot hold, are written as the strings "nan", "inf" and "-inf"
    (read back as those strings)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(jsonable(obj), f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_config(run_dir: str, config: Any) -> None:
    """Records `config` (an ml_collections ConfigDict) as RUN_DIR/config.json."""
    write_json_atomic(os.path.join(run_dir, CONFIG), json.loads(config.to_json_best_effort()))


def read_config(run_dir: str):
    """The ConfigDict recorded in RUN_DIR/config.json (lists back to tuples, as configs write
    them), or None when there is none."""
    import ml_collections

    data = read_json(os.path.join(run_dir, CONFIG))
    return None if data is None else ml_collections.ConfigDict(_tuples(data))


def _tuples(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj


def read_result(run_dir: str) -> dict | None:
    """RUN_DIR/result.json, or None while the run has not finished."""
    return read_json(os.path.join(run_dir, RESULT))


def write_result(run_dir: str, result: dict) -> None:
    write_json_atomic(os.path.join(run_dir, RESULT), result)


def read_timing(run_dir: str) -> dict:
    """RUN_DIR/timing.json; {"launches": []} before any launch has ended."""
    return read_json(os.path.join(run_dir, TIMING)) or {"launches": []}


def record_launch(run_dir: str, launch: dict) -> dict:
    """Appends one launch's wall-clock figures to timing.json and refreshes the totals
    (train_time_s: sum over launches; step_time_s: median of the launches' medians)."""
    timing = read_timing(run_dir)
    timing["launches"].append(launch)
    timing["train_time_s"] = sum(x.get("train_time_s") or 0.0 for x in timing["launches"])
    steps_timed = [x["step_time_s"] for x in timing["launches"] if x.get("step_time_s")]
    timing["step_time_s"] = float(np.median(steps_timed)) if steps_timed else None
    write_json_atomic(os.path.join(run_dir, TIMING), timing)
    return timing


def read_progress(run_dir: str, step: int) -> dict | None:
    """progress.json's entry for checkpoint `step`: {"window": [per-step metrics],
    "first_loss": float | None, "last_train": {metric: mean}}, or None when there is none."""
    progress = read_json(os.path.join(run_dir, PROGRESS)) or {}
    return progress.get(str(int(step)))


def write_progress(run_dir: str, step: int, entry: dict, keep: int) -> None:
    """Records `entry` for checkpoint `step`, keeping the entries of the newest `keep` steps."""
    progress = read_json(os.path.join(run_dir, PROGRESS)) or {}
    progress[str(int(step))] = entry
    newest = sorted(progress, key=int)[-max(keep, 1):]
    write_json_atomic(os.path.join(run_dir, PROGRESS), {k: progress[k] for k in newest})
