"""Small utilities shared by tests."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def run_launch(args: list[str], *, env_extra: dict | None = None, timeout: int = 600,
               devices: int = 8) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# Tests compile many tiny programs; XLA's backend optimisations cost more compile time than
# they save at these sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny_train_step(model, input_shape, *, batch: int = 8, num_classes: int | None = None,
                    devices: int = 8, seed: int = 0, compute_dtype=None, compiler_options=None):
    """Init `model` and run one sharded SGD train step on `devices` CPU devices (inputs cast
    to `compute_dtype`, as `train.compute_dtype` does; default float32).

    `input_shape` excludes the batch dimension, e.g. (32, 32, 3). Asserts a finite loss,
    finite parameters and that every parameter leaf receiving gradient moved. Returns
    (loss, old_state, new_state).
    """
    import jax
    import numpy as np
    import optax

    from scaling import parallel
    from scaling.train.state import create_state
    from scaling.train.step import make_train_step

    num_classes = num_classes or getattr(model, "num_classes", 10)
    mesh = parallel.make_mesh(devices)
    tx = optax.sgd(0.01, momentum=0.9)
    state = parallel.replicate(create_state(model, tx, jax.random.PRNGKey(seed), tuple(input_shape)), mesh)
    old = parallel.fetch(state)
    rng = np.random.default_rng(seed)
    data = {"image": rng.standard_normal((batch, *input_shape)).astype(np.float32),
            "label": rng.integers(0, num_classes, batch).astype(np.int32)}
    step = make_train_step(model, tx, mesh, donate=False, compute_dtype=compute_dtype or np.float32,
                           compiler_options=FAST_COMPILE if compiler_options is None else compiler_options)
    new_state, metrics = step(state, parallel.to_global(data, parallel.batch_sharding(mesh)))
    new = parallel.fetch(new_state)
    loss = float(metrics["loss"])
    assert np.isfinite(loss), loss
    leaves_new = jax.tree.leaves(new.params)
    assert all(np.all(np.isfinite(x)) for x in leaves_new)
    moved = sum(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(old.params), leaves_new))
    assert moved >= 0.9 * len(leaves_new), f"only {moved}/{len(leaves_new)} parameter arrays moved"
    return loss, old, new


def check_reference_counts(name: str, reference: dict, *, gmacs_rtol: float = 0.01, **overrides):
    """Asserts that registered model `name` has the reference params (and batch_stats, gmacs
    where the reference gives them), from shapes only."""
    from scaling.models import create_model
    from scaling.profile import model_stats

    ref = reference[name]
    model = create_model(name, num_classes=ref["num_classes"], **overrides)
    stats = model_stats(model, ref["resolution"])
    assert stats["params"] == ref["params"], (name, stats["params"], ref["params"])
    if "batch_stats" in ref:
        assert stats["batch_stats"] == ref["batch_stats"], (name, stats["batch_stats"], ref["batch_stats"])
    if "gmacs" in ref:
        assert abs(stats["gmacs"] - ref["gmacs"]) <= gmacs_rtol * ref["gmacs"], (name, stats["gmacs"], ref["gmacs"])
    return stats


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(args: list[str], *, num_processes: int = 2, devices: int = 4,
                  timeout: int = 600) -> list[tuple[str, str]]:
    """Runs `python *args` as `num_processes` processes of one JAX job on this machine
    (`devices` CPU devices each), passing launch.py's --coordinator_address /
    --num_processes / --process_id; asserts that each exits 0 and returns their (stdout,
    stderr)."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               TF_CPP_MIN_LOG_LEVEL="2")
    procs = [subprocess.Popen(
        [sys.executable, *args, f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={num_processes}", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(num_processes)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * num_processes, "\n".join(  # every process's end: which one failed first
        f"--- process {i} (exit {c}):\n{err[-2000:]}" for i, (c, (_, err)) in enumerate(zip(codes, outs)))
    return outs
