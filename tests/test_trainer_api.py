"""The trainer's API: prepare / restore, fit(until_step=...) pause and resume, divergence,
the HParams record, and the run-directory files (scaling.rundir)."""
import json
import math

import jax
import numpy as np
import pytest

from configs import train as train_config
from scaling import _env, rundir
from scaling.train import Diverged, Run, fit, prepare, restore, validate_config
from scaling.train.loop import divergence_reason, hparams_record


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Relaunches of one config compile the same steps: with JAX's persistent compilation
    cache (on in launch.py) they hit it, as real relaunches do. Restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    cc.reset_cache()
    _env.enable_compilation_cache(str(tmp_path_factory.mktemp("jax_cache")))
    yield
    for n, v in old.items():
        jax.config.update(n, v)
    cc.reset_cache()


def tiny_config(**train_overrides):
    """The test preset (WRN-10-1 at 16 px, 160 images, batch 16): 7 steps, windows of 2."""
    c = train_config.get_config("test")
    c.train.update(num_steps=7, log_every_steps=2, checkpoint_every_steps=4)
    c.train.update(**train_overrides)
    return c


def jsonl(run_dir):
    return [json.loads(x) for x in (run_dir / rundir.METRICS).read_text().splitlines()]


def train_rows(run_dir):
    return [{k: v for k, v in r.items() if k != "train/images_per_sec"}
            for r in jsonl(run_dir) if "train/loss" in r]


def test_write_json_atomic_writes_non_finite_floats_as_strings(tmp_path):
    path = str(tmp_path / "r.json")
    rundir.write_json_atomic(path, {"a": float("nan"), "b": [np.float32(np.inf), -math.inf],
                                    "c": np.float32(0.5), "d": np.arange(2), "e": None})
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": "nan", "b": ["inf", "-inf"], "c": 0.5, "d": [0, 1], "e": None}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left
    assert rundir.read_json(str(tmp_path / "missing.json")) is None
    assert rundir.read_result(str(tmp_path)) is None
    assert rundir.read_timing(str(tmp_path)) == {"launches": []}
    rundir.record_launch(str(tmp_path), {"train_time_s": 2.0, "step_time_s": 0.5})
    timing = rundir.record_launch(str(tmp_path), {"train_time_s": 3.0, "step_time_s": None})
    assert timing["train_time_s"] == 5.0 and timing["step_time_s"] == 0.5
    assert rundir.read_timing(str(tmp_path)) == timing


def test_divergence_rule():
    ln10 = math.log(10)
    assert divergence_reason(2.3, 1.0, None, 10, 10.0) is None
    assert divergence_reason(float("nan"), 1.0, 2.3, 10, 10.0) == "loss=nan is not finite"
    assert divergence_reason(2.0, float("inf"), 2.3, 10, 0.0) == "grad_norm=inf is not finite"
    # explosion: > factor x max(first window's loss, ln C)
    assert divergence_reason(10 * ln10 * 0.99, 1.0, 0.5, 10, 10.0) is None
    assert "exceeds train.diverge_factor=10" in divergence_reason(10 * ln10 * 1.01, 1.0, 0.5, 10, 10.0)
    assert divergence_reason(40.0, 1.0, 5.0, 10, 10.0) is None          # first window was 5.0
    assert divergence_reason(51.0, 1.0, 5.0, 10, 10.0) is not None
    assert divergence_reason(1e9, 1.0, 2.3, 10, 0.0) is None             # rule off
    assert divergence_reason(30.0, 1.0, None, 10, 10.0) is None          # the first window itself
    err = Diverged(12, float("inf"), "grad_norm")
    assert err.step == 12 and "step 12: grad_norm=inf" in str(err) and "train.lr" in str(err)
    with pytest.raises(ValueError, match=r"train\.diverge_factor=-1"):
        validate_config(tiny_config(diverge_factor=-1.0), 8)


def test_hparams_record():
    c = tiny_config()
    result = {"val_top1": 0.25, "val_top5": 0.5, "val_loss": 2.0, "status": "done"}
    hp, metrics = hparams_record(c, result)
    assert hp == {"model.name": "wide_resnet", "seed": 0, "train.lr": c.train.lr,
                  "train.batch_size": 16, "train.num_steps": 7, "data.image_size": 16,
                  "status": "done"}
    assert metrics == {"val_top1": 0.25, "val_top5": 0.5, "val_loss": 2.0}
    hp, _ = hparams_record(c, result, {"width": 1.5, "seed": 3})
    assert hp == {"width": 1.5, "seed": 3, "status": "done"}
    c.train.update(num_steps=0, num_epochs=2.0)
    assert "train.num_epochs" in hparams_record(c, result)[0]


def test_pause_and_resume_equal_a_straight_run(tmp_path):
    """Paused at step 3 (inside a log window: windows end at 2, 4, 6, 7), restored, resumed to
    the end: the same result.json and train windows as one uninterrupted run."""
    cfg = tiny_config()
    straight_dir, paused_dir = tmp_path / "straight", tmp_path / "paused"
    straight = fit(cfg, str(straight_dir), hparams={"lr": cfg.train.lr})

    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        restore(cfg, str(paused_dir))
    paused = fit(cfg, str(paused_dir), until_step=3)
    assert paused["status"] == "paused" and paused["step"] == 3
    assert paused["epochs"] == pytest.approx(3 / 10)
    for key in ("val_top1", "val_top5", "val_loss", "train_loss", "train_top1", "params", "batch_stats"):
        assert paused[key] is not None, key
    assert not (paused_dir / rundir.RESULT).exists()
    assert rundir.read_result(str(paused_dir)) is None
    assert [x["end_step"] for x in rundir.read_timing(str(paused_dir))["launches"]] == [3]
    assert [r["step"] for r in jsonl(paused_dir) if "eval/top1" in r] == [3]
    assert paused["val_top1"] == next(r["eval/top1"] for r in jsonl(paused_dir) if "eval/top1" in r)

    run = prepare(cfg)
    assert isinstance(run, Run) and run.total_steps == 7 and run.steps_per_epoch == 10
    variables = restore(cfg, str(paused_dir), run=run)
    assert set(variables) == {"params", "batch_stats"}
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables))

    resumed = fit(cfg, str(paused_dir), hparams={"lr": cfg.train.lr})
    assert resumed == straight
    assert json.loads((paused_dir / rundir.RESULT).read_text()) == json.loads(
        (straight_dir / rundir.RESULT).read_text())
    assert train_rows(paused_dir) == train_rows(straight_dir)
    assert [r["step"] for r in train_rows(paused_dir)] == [2, 4, 6, 7]
    launches = rundir.read_timing(str(paused_dir))["launches"]
    assert [(x["start_step"], x["end_step"], x["status"]) for x in launches] == [
        (0, 3, "paused"), (3, 7, "done")]

    # HParams record: what was passed plus status, and the final metrics; not the config.
    hp, metrics = read_hparams(straight_dir)
    assert hp == {"lr": cfg.train.lr, "status": "done"}
    assert metrics["hparams/val_top1"] == pytest.approx(straight["val_top1"], abs=1e-6)


def read_hparams(run_dir):
    """(hparams, final metrics) of the HParams record in `run_dir`'s event files."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    for f in run_dir.rglob("events.out.tfevents*"):
        ea = event_accumulator.EventAccumulator(str(f.parent), size_guidance={"scalars": 0})
        ea.Reload()
        for content in ea.PluginTagToContent("hparams").values():
            data = plugin_data_pb2.HParamsPluginData.FromString(content)
            if data.HasField("session_start_info"):
                hp = {k: getattr(v, v.WhichOneof("kind")) for k, v in data.session_start_info.hparams.items()}
                metrics = {t: ea.Scalars(t)[-1].value for t in ea.Tags()["scalars"] if t.startswith("hparams/")}
                return hp, metrics
    raise AssertionError(f"no HParams record in {run_dir}")


def test_exploding_run_raises_diverged(tmp_path):
    with pytest.raises(Diverged) as info:
        fit(tiny_config(lr=1e6), str(tmp_path))
    err = info.value
    # lr=1e6: the loss is non-finite from step 3, seen at the end of its window (step 4)
    assert err.step <= 4 and err.quantity in ("loss", "grad_norm")
    assert "train.lr" in str(err)
    assert rundir.read_result(str(tmp_path)) is None


def test_seeds_share_one_compiled_step_and_other_changes_do_not():
    """A sweep's seeds (and a preflight and its trial) reuse one executable in a process; any
    other config change, e.g. the learning rate, compiles its own."""
    runs = {}
    for name, overrides, seed in (("a", {}, 0), ("b", {}, 1), ("lr", {"lr": 0.123}, 0)):
        c = tiny_config(**overrides)
        c.seed = seed
        runs[name] = prepare(c)
    assert runs["a"].key == runs["b"].key != runs["lr"].key
    assert runs["a"].compile() is runs["b"].compile()
    assert runs["lr"].compile() is not runs["a"].compile()
