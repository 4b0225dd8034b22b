"""Gradient accumulation (`train.grad_accum_steps`) and memory-aware batch sizes
(`scaling.train.memory`): k microbatches equal one batch of k times the size without
BatchNorm; with BatchNorm they are ghost batches; under a memory cap the largest microbatch
that fits is chosen."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scaling import cli, parallel
from scaling.models import create_model
from scaling.train import memory
from scaling.train.state import create_state
from scaling.train.step import make_train_step
from tests.helpers import FAST_COMPILE


@pytest.fixture
def x64():
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)


def _batch(n, shape, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, *shape)), "label": rng.integers(0, classes, n).astype(np.int32)}


def _step(model, state, batch, mesh, k, tx, accumulate="auto"):
    step = make_train_step(model, tx, mesh, donate=False, compiler_options=FAST_COMPILE,
                           grad_accum_steps=k, accumulate=accumulate)
    return step(parallel.replicate(state, mesh),
                parallel.to_global(batch, parallel.batch_sharding(mesh)))


@pytest.mark.parametrize("accumulate", ["scan", "host"])
def test_microbatches_equal_one_large_batch_for_a_layernorm_model(x64, accumulate):
    """A ViT (LayerNorm, no dropout) in float64: 4 microbatches of 8 give the update of one
    batch of 32 within 1e-6 (over two steps, so the momentum carries the difference too)."""
    model = create_model("vit_ti_16", patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                         mlp_dim=32, num_classes=10, image_size=8, dtype=jnp.float64)
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_state(model, tx, jax.random.PRNGKey(0), (8, 8, 3))
    state = jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, state)
    state = state.replace(opt_state=tx.init(state.params))
    mesh = parallel.make_mesh(8)
    results = {}
    for k in (1, 4):
        s, losses = state, []
        for i in range(2):
            s, metrics = _step(model, s, _batch(32, (8, 8, 3), seed=i), mesh, k, tx, accumulate)
            s = parallel.fetch(s)
            losses.append(float(metrics["loss"]))
        results[k] = (s, losses)
    (one, loss1), (four, loss4) = results[1], results[4]
    assert jax.tree.leaves(one.params)[0].dtype == np.float64
    np.testing.assert_allclose(loss4, loss1, rtol=0, atol=1e-6)
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(one.params), jax.tree.leaves(state.params)))
    assert moved > 1e-3    # the comparison is not between two unchanged states
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("accumulate", ["scan", "host"])
def test_batchnorm_microbatches_are_ghost_batches(accumulate):
    """With BatchNorm, microbatch i is rows i, i+k, ...; it is normalised with its own
    statistics and the running averages are updated once per microbatch, in order."""
    model = create_model("wide_resnet", depth=10, widen_factor=1, convs_per_block=1, num_classes=10)
    tx = optax.sgd(0.1)
    state = create_state(model, tx, jax.random.PRNGKey(0), (8, 8, 3))
    batch = _batch(16, (8, 8, 3))
    batch["image"] = batch["image"].astype(np.float32)
    new, metrics = _step(model, state, batch, parallel.make_mesh(8), 2, tx, accumulate)
    new = parallel.fetch(new)

    stats, losses = state.batch_stats, []
    for i in range(2):
        rows = {k: v[i::2] for k, v in batch.items()}
        logits, upd = model.apply({"params": state.params, "batch_stats": stats}, rows["image"],
                                  train=True, mutable=["batch_stats"])
        stats = upd["batch_stats"]
        losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, rows["label"]).mean())
    for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(new.batch_stats)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), float(np.mean(losses)), rtol=1e-5)


def test_host_accumulation_equals_the_scanned_step_and_needs_less_memory():
    """The CPU form (k microbatch steps called from Python, then the update) gives the scanned
    step's new state and metrics, dropout included, and its memory estimate counts one
    microbatch's activations: below the one-batch step's."""
    model = create_model("wide_resnet", depth=10, widen_factor=1, convs_per_block=1,
                         dropout=0.3, num_classes=10)
    tx = optax.sgd(0.1, momentum=0.9)
    state = create_state(model, tx, jax.random.PRNGKey(0), (16, 16, 3))
    batch = _batch(32, (16, 16, 3))
    batch["image"] = batch["image"].astype(np.float32)
    mesh = parallel.make_mesh(8)
    out = {a: _step(model, state, batch, mesh, 4, tx, a) for a in ("scan", "host")}
    (scan, m_scan), (host, m_host) = (jax.tree.map(np.asarray, parallel.fetch(o)) for o in out.values())
    assert set(m_host) == set(m_scan) and int(host.step) == 1
    for a, b in zip(jax.tree.leaves((scan, m_scan)), jax.tree.leaves((host, m_host))):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert not np.allclose(host.params["fc"]["kernel"], np.asarray(state.params["fc"]["kernel"]))

    from scaling.profile import compiled_memory
    rep, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    spec = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state),
            {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data) for k, v in batch.items()})
    peak = {k: compiled_memory(make_train_step(model, tx, mesh, grad_accum_steps=k, accumulate="host")
                               .lower(*spec).compile())["peak_bytes"] for k in (1, 4)}
    assert peak[4] < peak[1]


def test_a_batch_that_does_not_split_over_the_microbatches_is_refused():
    from scaling.train import validate_config
    config = cli.load_config("configs/train.py:test", [("train.grad_accum_steps", "3")])
    config.train.batch_size = 32
    with pytest.raises(ValueError, match=r"train.batch_size=32 does not split into "
                       r"train.grad_accum_steps=3 microbatches over 8 device\(s\); use a "
                       r"multiple of 24 \(e.g. 24 or 48\)"):
        validate_config(config, 8)


def _config(**train):
    config = cli.load_config("configs/train.py:test", [])
    config.train.update(batch_size=64, **train)
    return config


def test_under_a_memory_cap_the_largest_microbatch_that_fits_is_chosen(monkeypatch):
    """The search over microbatch counts, with a stand-in for XLA's estimate (a fixed part
    plus a part per example of the microbatch); the launch test below uses the real one."""
    config, mesh = _config(), parallel.make_mesh()     # batch 64 on 8 devices: k in 1, 2, 4, 8
    probed = []

    def need(cfg, mesh, k):
        probed.append(k)
        return 1000 + 64 // k * 100

    monkeypatch.setattr(memory, "train_step_bytes", need)
    for k in (1, 2, 4, 8):
        cap = need(None, None, k) + 50          # under the need of k / 2 microbatches
        probed.clear()
        assert memory.plan_train(config, mesh, cap, "a test cap") == (k, need(None, None, k)), k
        assert len(probed) <= 4, probed          # the configured k, then a bisection of 3
    with pytest.raises(memory.DoesNotFit, match="even one example per device does not fit"):
        memory.plan_train(config, mesh, 1799, "a test cap")
    config.train.auto_accumulate = False
    with pytest.raises(memory.DoesNotFit, match=r"set --config.train.grad_accum_steps=4 "
                       r"\(microbatches of 16; the batch is kept\)"):
        memory.plan_train(config, mesh, 2700, "a test cap")


def test_the_eval_batch_is_halved_until_its_step_fits(monkeypatch):
    config, mesh = _config(eval_batch_size=256), parallel.make_mesh()
    monkeypatch.setattr(memory, "eval_step_bytes", lambda cfg, mesh, e: 1000 + 10 * e)
    assert memory.plan_eval(config, mesh, 1700, "a test cap") == (64, 1640)
    with pytest.raises(memory.DoesNotFit, match=r"even at batch 8"):
        memory.plan_eval(config, mesh, 1000, "a test cap")
    # a train step known to fit with room for the eval batch: nothing is compiled
    monkeypatch.setattr(memory, "eval_step_bytes", None)
    assert memory.plan_eval(config, mesh, 10 ** 6, "a test cap", train_need=100) == (256, None)


def test_a_launch_over_the_cap_trains_in_microbatches_and_records_them(tmp_path, caplog):
    config, mesh = _config(), parallel.make_mesh()
    need = {k: memory.train_step_bytes(config, mesh, k) for k in (1, 2)}
    cap_gb = (need[1] + need[2]) / 2 / 2 ** 30
    workdir = tmp_path / "w"
    with caplog.at_level("INFO"):
        result = cli.main(["launch.py", "--config", "configs/train.py:test",
                           "--config.train.batch_size=64", f"--config.train.device_memory_gb={cap_gb}",
                           "--workdir", str(workdir)])
    assert result["status"] == "done"
    assert "training in grad_accum_steps=2 microbatches of 32" in caplog.text
    assert "global batch 64 in 2 microbatches of 32" in caplog.text
    recorded = json.loads((workdir / "config.json").read_text())
    assert recorded["train"]["grad_accum_steps"] == 2


def test_a_sweeps_preflight_splits_a_trial_over_its_memory_budget_before_calling_it_infeasible():
    """grid.max_memory_mb between the needs of 1 and 2 microbatches: the preflight records
    grad_accum_steps=2 and the peak of that split; a budget under every split: DoesNotFit,
    which the grid records as `infeasible`."""
    from experiments import grid

    config, mesh = _config(), parallel.make_mesh()
    need = {k: memory.train_step_bytes(config, mesh, k) for k in (1, 2, 8)}
    budget_mb = (need[1] + need[2]) / 2 / 1e6
    pre = grid.preflight(config, memory_limit_mb=budget_mb)
    assert pre["grad_accum_steps"] == 2 and pre["peak_memory_mb"] == need[2] / 1e6
    assert config.train.grad_accum_steps == 1          # the trial's config is not changed here
    with pytest.raises(memory.DoesNotFit) as e:
        grid.preflight(config, memory_limit_mb=(need[8] - 1) / 1e6)
    # in the budget's own unit (results.csv's peak_memory_mb), not MiB next to an MB field
    limit = f"{(need[8] - 1) / 1e6:.0f} MB is available (grid.max_memory_mb="
    assert f"needs about {need[1] / 1e6:.0f} MB per device" in str(e.value) and limit in str(e.value)
