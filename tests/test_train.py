"""Training path: one step per optimizer, 8 devices == 1 device, resume exactness,
checkpoint fallback, logs read back, config validation."""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import train as train_config
from scaling import parallel
from scaling.checkpoint import Checkpointer
from scaling.models import create_model
from scaling.train import Diverged, fit, optim, validate_config
from scaling.train.state import create_state
from scaling.train.step import make_train_step, train_step


def tiny_config(**train_overrides):
    c = train_config.get_config("test")
    c.train.update(**train_overrides)
    return c


def _batch(n=16, size=16, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, classes, n).astype(np.int32)}


def _state(model, tx, size=16):
    return create_state(model, tx, jax.random.PRNGKey(0), (size, size, 3))


def _one_step_on(n_devices, model, tx, batch):
    mesh = parallel.make_mesh(n_devices)
    state = _state(model, tx)
    dtype = batch["image"].dtype
    cast = lambda t: jax.tree.map(lambda x: x.astype(dtype), t)  # noqa: E731
    state = state.replace(params=cast(state.params), batch_stats=cast(state.batch_stats))
    state = parallel.replicate(state.replace(opt_state=tx.init(state.params)), mesh)
    gbatch = parallel.to_global(batch, parallel.batch_sharding(mesh))
    grads = jax.jit(jax.grad(lambda p, b: train_step(state.replace(params=p), b, model=model,
                                                     tx=optax.identity())[1]["loss"]))(state.params, gbatch)
    new_state, metrics = make_train_step(model, tx, mesh, donate=False)(state, gbatch)
    return (float(metrics["loss"]), parallel.fetch(grads), parallel.fetch(new_state.params),
            parallel.fetch(new_state.batch_stats))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_eight_devices_equal_one_device(dtype):
    """The sharded step is the same computation: BN statistics and gradients over the global
    batch. In float32 a ReLU whose input sits within rounding noise of 0 can flip between the
    two reduction orders and move single gradient entries by ~1e-4, so gradients are compared
    to 1e-5 in float64, where no such flip happens; the loss is compared in both."""
    assert jax.device_count() == 8
    with jax.enable_x64(dtype == "float64"):
        model = create_model("wide_resnet", depth=10, widen_factor=1, convs_per_block=1,
                             num_classes=10, dtype=jnp.dtype(dtype))
        tx = optax.sgd(0.1, momentum=0.9)
        batch = _batch()
        batch["image"] = batch["image"].astype(dtype)
        (l1, g1, p1, b1), (l8, g8, p8, b8) = (_one_step_on(n, model, tx, batch) for n in (1, 8))
        assert abs(l1 - l8) < 1e-5
        if dtype == "float64":
            assert jax.tree.leaves(g1)[0].dtype == np.float64
            for a, b in zip(jax.tree.leaves((g1, p1, b1)), jax.tree.leaves((g8, p8, b8))):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        else:
            diffs = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8))]
            assert max(diffs) < 1e-3


@pytest.mark.parametrize("name,extra", [
    ("sgd", {}), ("rmsprop", {"eps": 1e-3, "schedule": "exponential"}),
    ("adamw", {"schedule": "step", "decay_epochs": (1, 2)}), ("adam", {"warmup_epochs": 0.0, "label_smoothing": 0.1}),
])
def test_optimizers_take_a_step(name, extra):
    cfg = tiny_config(optimizer=name, **extra).train
    model = create_model("wide_resnet", depth=10, widen_factor=1, convs_per_block=1, num_classes=10)
    tx, schedule = optim.build(cfg, steps_per_epoch=4, total_steps=8)
    state = _state(model, tx)
    new, metrics = jax.jit(lambda s, b: train_step(s, b, model=model, tx=tx, label_smoothing=0.1))(
        state, _batch())
    assert np.isfinite(float(metrics["loss"]))
    assert int(new.step) == 1
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params))]
    assert all(moved)


def test_weight_decay_skips_norm_scales_and_biases():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)}}
    mask = optim.decay_mask(params)
    assert mask["conv"]["kernel"] and not mask["bn"]["scale"] and not mask["bn"]["bias"]


def test_schedules():
    cfg = tiny_config(schedule="step", lr=0.1, decay_epochs=(60, 120, 160), decay_factor=0.2).train
    s = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=2000)
    np.testing.assert_allclose([s(0), s(599), s(600), s(1200), s(1600)],
                               [0.1, 0.1, 0.02, 0.004, 0.0008], rtol=1e-5)
    cfg = tiny_config(schedule="exponential", lr=0.256, decay_factor=0.97, decay_every_epochs=2.4).train
    s = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=1000)
    np.testing.assert_allclose([s(23), s(24), s(48)], [0.256, 0.256 * 0.97, 0.256 * 0.97 ** 2], rtol=1e-5)
    cfg = tiny_config(schedule="cosine", lr=1.0, warmup_epochs=1.0).train
    s = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=110)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def _read_events(logdir):
    from tensorboard.backend.event_processing import event_accumulator
    ea = event_accumulator.EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_fit_writes_result_logs_and_hparams(tmp_path):
    result = fit(tiny_config(), str(tmp_path))
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert 0.0 <= saved["val_top1"] <= 1.0 and saved["val_examples"] == 160  # 16 per class (test preset)
    assert saved["step"] == 6
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [2, 4, 6]
    ea = _read_events(tmp_path)
    tags = ea.Tags()["scalars"]
    for tag in ("train/loss", "train/top1", "train/lr", "train/images_per_sec", "eval/top1"):
        assert tag in tags
    losses = [e.value for e in ea.Scalars("train/loss")]
    np.testing.assert_allclose(losses, [x["train/loss"] for x in lines if "train/loss" in x], rtol=1e-6)
    # hparams: the HParams plugin data sits in a run directory of its own
    hp_files = list(pathlib.Path(tmp_path).rglob("events.out.tfevents*"))
    plugin_found = False
    for f in hp_files:
        ea2 = _read_events(f.parent)
        if "hparams/val_top1" in ea2.Tags()["scalars"]:
            assert ea2.Scalars("hparams/val_top1")[0].value == pytest.approx(saved["val_top1"], abs=1e-6)
            plugin_found = "hparams" in ea2.PluginTagToContent("hparams") or bool(
                ea2.PluginTagToContent("hparams"))
    assert plugin_found


def test_resume_is_exact(tmp_path):
    cfg = tiny_config(num_steps=8, log_every_steps=2, checkpoint_every_steps=2)
    full = fit(cfg, str(tmp_path / "full"))

    class Killed(Exception):
        pass

    def kill_at_5(step, _):
        if step == 6:
            raise Killed()
    with pytest.raises(Killed):
        fit(cfg, str(tmp_path / "resumed"), on_log=kill_at_5)
    assert Checkpointer(str(tmp_path / "resumed" / "checkpoints")).steps()[-1] == 4
    resumed = fit(cfg, str(tmp_path / "resumed"))
    assert resumed == full
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in x]
    assert steps == [2, 4, 6, 8]  # no duplicate of the lost step 6 window
    # killed after the last checkpoint, before result.json: the relaunch trains no step and
    # still reports the last window's train_loss / train_top1
    os.remove(tmp_path / "resumed" / "result.json")
    assert fit(cfg, str(tmp_path / "resumed")) == full


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    cfg = tiny_config(num_steps=4, log_every_steps=2, checkpoint_every_steps=2)
    first = fit(cfg, str(tmp_path))
    ckdir = tmp_path / "checkpoints"
    latest = ckdir / "4"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage")
    os.remove(tmp_path / "result.json")
    again = fit(cfg, str(tmp_path))
    assert "cannot be restored" in caplog.text
    assert again == first  # steps 3-4 recomputed from the step-2 checkpoint, bitwise equal
    assert (ckdir / "2").exists()


def test_diverging_run_raises(tmp_path):
    with pytest.raises(Diverged):
        fit(tiny_config(lr=1e12, num_steps=6), str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("model.name", "resnet5O", "model.name: unknown model 'resnet5O'"),
    ("data.source", "nope", "data.source"),
    ("train.batch_size", 20, "train.batch_size=20 is not divisible by the 8 devices"),
    ("train.optimizer", "lamb", "train.optimizer"),
    ("data.path", "/nonexistent/photos", "data.path"),
])
def test_validation_names_the_field(field, value, match):
    cfg = tiny_config()
    if field == "data.path":
        cfg.data.source = "folder"
    section, key = field.split(".")
    cfg[section][key] = value
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        validate_config(cfg, num_devices=8)


def test_checkpoint_data_item_and_steps_saved_before_it(tmp_path):
    """Steps carry the input position as a 'data' item; a step written before that item
    existed (a single-item Orbax checkpoint) still restores, with no data record."""
    import orbax.checkpoint as ocp

    old = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(create=True))
    old.save(1, args=ocp.args.StandardSave({"w": np.arange(3.0)}))
    old.wait_until_finished()
    old.close()
    target = {"w": np.zeros(3)}
    ck = Checkpointer(str(tmp_path))
    state, step = ck.restore(target)
    assert step == 1 and ck.data is None and state["w"].tolist() == [0.0, 1.0, 2.0]
    ck.save(2, {"w": np.arange(3.0) + 1}, data={"next_step": 2, "seed": 0})
    ck.close()
    ck = Checkpointer(str(tmp_path))
    state, step = ck.restore(target)
    ck.close()
    assert step == 2 and ck.data == {"next_step": 2, "seed": 0} and state["w"].tolist() == [1.0, 2.0, 3.0]
