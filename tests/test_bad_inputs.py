"""Every bad input of a launch ends the same way: one line `error: ...` on stderr naming the
problem and the fix, exit status 2, no traceback, and the workdir absent or empty.

The cases run launch.py's `cli.main` in this process (a launch costs seconds, not the ~10 s of
a fresh interpreter); `test_entry_point_prints_one_line` checks the script itself.
"""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from scaling import cli, parallel, rundir
from tests.conftest import ROOT

TRAIN = ["--config", "configs/train.py:test"]


def launch(argv, workdir):
    """launch.py's main, in this process; returns the experiment's result."""
    return cli.main(["launch.py", *argv, "--workdir", str(workdir)])


def assert_clean_error(capsys, workdir, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        launch(argv, workdir)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert not workdir.exists() or not any(workdir.iterdir()), sorted(workdir.iterdir())
    return lines[0]


def write_images(folder, n, *, size=24, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """Config files that fail in each way a file can."""
    d = tmp_path_factory.mktemp("configs")
    (d / "raises.py").write_text("def get_config(arg=None):\n    raise RuntimeError('no GPU quota')\n")
    (d / "syntax.py").write_text("import ml_collections\n\ndef get_config(arg=None):\n    return (\n")
    (d / "noconfig.py").write_text("x = 1\n")
    return d


# ----------------------------------------------------------------------------- config level
@pytest.mark.parametrize("argv, message", [
    (["--config", "nosuch.py"], "--config nosuch.py: no such file 'nosuch.py'"),
    (["--config", "configs/trian.py"], "did you mean configs/train.py"),
    (["--config", "configs/train.py:nosuchpreset"], "unknown preset 'nosuchpreset'"),
    ([*TRAIN, "--config.nosuchfield=1"], "--config.nosuchfield: the config has no field 'nosuchfield'"),
    ([*TRAIN, "--config.lr=0.1"], "did you mean --config.train.lr?"),
    ([*TRAIN, "--config.train.lr=abc"], "--config.train.lr='abc': train.lr takes a number"),
    ([*TRAIN, "--config.train.batch_size=1.5"], "train.batch_size takes an integer"),
    ([*TRAIN, "--config.data.flip=maybe"], "data.flip takes true or false"),
    ([*TRAIN, "--config.train.lr"], "--config.train.lr needs a value"),
    ([*TRAIN, "--config.model.name"], "--config.model.name needs a model name"),
    ([*TRAIN, "--config.train.optimzer=adam"], "did you mean --config.train.optimizer?"),
    ([*TRAIN, "--config.train.lr.x=1"], "train.lr is a value, not a section"),
    ([*TRAIN, "--workdri=x"], "Unknown command line flag 'workdri'"),
    (["--config.train.lr=0.1"], "--config is required"),
])
def test_config_argument_errors(capsys, tmp_path, argv, message):
    assert_clean_error(capsys, tmp_path / "w", argv, message)


@pytest.mark.parametrize("name, message", [
    ("raises.py", "get_config raised RuntimeError: no GPU quota"),
    ("syntax.py", "syntax error at line 4"),
    ("noconfig.py", "defines no get_config(arg)"),
])
def test_broken_config_files(capsys, tmp_path, configs, name, message):
    assert_clean_error(capsys, tmp_path / "w", ["--config", str(configs / name)], message)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("override, message", [
    ("--config.model.depth=11", "model.depth"),
    ("--config.model.widen_factor=-1", "model.widen_factor must be > 0"),
    ("--config.data.image_size=0", "data.image_size=0 is invalid"),
    ("--config.data.loader=processes", "data.loader='processes' is invalid: allowed values are "
     "auto, grain, threads"),
    ("--config.train.optimizer=adamm", "train.optimizer: unknown 'adamm'"),
    ("--config.train.schedule=linear", "train.schedule: unknown 'linear'"),
    ("--config.train.compute_dtype=float16", "train.compute_dtype: unknown 'float16'"),
    ("--config.model.name=resnet5O", "model.name: unknown model 'resnet5O'"),
    ("--config.train.batch_size=12", "train.batch_size=12 is not divisible by the 8 devices"),
])
def test_bad_values(capsys, tmp_path, override, message):
    assert_clean_error(capsys, tmp_path / "w", [*TRAIN, override], message)


# ----------------------------------------------------------------------------- data
FOLDER = [*TRAIN, "--config.data.source=folder"]


def test_folder_without_path(capsys, tmp_path):
    assert_clean_error(capsys, tmp_path / "w", FOLDER, "data.path is not set")


def test_folder_missing_path(capsys, tmp_path):
    assert_clean_error(capsys, tmp_path / "w", [*FOLDER, f"--config.data.path={tmp_path}/photos"],
                       "does not exist")


def test_folder_empty_directory(capsys, tmp_path):
    (tmp_path / "photos").mkdir()
    assert_clean_error(capsys, tmp_path / "w", [*FOLDER, f"--config.data.path={tmp_path}/photos"],
                       f"data.path={str(tmp_path / 'photos')!r}")


def test_folder_with_one_class(capsys, tmp_path):
    write_images(tmp_path / "photos" / "cats", 12)
    line = assert_clean_error(capsys, tmp_path / "w",
                              [*FOLDER, f"--config.data.path={tmp_path}/photos"], "data.path")
    assert "class" in line


def test_folder_with_random_byte_jpegs_runs_with_a_warning_or_stops_clean(capsys, caplog, tmp_path):
    """30 good JPEGs per class and 3 files of random bytes named .jpg: either refused up front
    (one line) or trained on with one warning that names them."""
    rng = np.random.default_rng(1)
    for c in ("cats", "dogs"):
        write_images(tmp_path / "photos" / c, 30, seed=len(c))
        for i in range(3):
            (tmp_path / "photos" / c / f"bad{i}.jpg").write_bytes(rng.bytes(2000))
    argv = [*FOLDER, f"--config.data.path={tmp_path}/photos", "--config.train.num_steps=2",
            "--config.data.examples_per_class=0"]
    try:
        result = launch(argv, tmp_path / "w")
    except SystemExit as e:
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.code == 2 and len(lines) == 1 and "bad0.jpg" in lines[0], lines
        return
    assert result["status"] == "done"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "bad" in r.getMessage()]
    assert len(warnings) == 1 and "6" in warnings[0], warnings


TFDS = [*TRAIN, "--config.data.source=tfds"]


def test_tfds_name_that_does_not_exist(capsys, tmp_path):
    assert_clean_error(capsys, tmp_path / "w", [*TFDS, "--config.data.name=cifar11"],
                       "data.name='cifar11' is not a TFDS dataset")


def test_tfds_set_not_prepared(capsys, tmp_path):
    (tmp_path / "tfds").mkdir()
    assert_clean_error(capsys, tmp_path / "w", [*TFDS, "--config.data.name=cifar10",
                                                f"--config.data.data_dir={tmp_path}/tfds"],
                       "is not prepared")


# ----------------------------------------------------------------------------- workdir
def test_workdir_is_a_file(capsys, tmp_path):
    (tmp_path / "w").write_text("notes")
    with pytest.raises(SystemExit) as exit_info:
        launch(TRAIN, tmp_path / "w")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert lines[0] == f"error: --workdir {tmp_path / 'w'} is a file, not a directory; give a new or existing run directory."
    assert (tmp_path / "w").read_text() == "notes"


# ----------------------------------------------------------------------------- grids
@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/wrn_grid.py", "--config.sweep.axes.k=()"], "sweep.axes.k: empty"),
    (["--config", "configs/efficientnet_grid.py", "--config.sweep.constraint=alpha > 100"],
     "no point satisfies the constraint"),
    (["--config", "configs/wrn_grid.py", "--config.sweep.constraint=depth = 10"],
     "sweep.constraint: 'depth = 10' is not a Python expression"),
    (["--config", "configs/wrn_grid.py", "--config.grid.num_workers=2", "--config.grid.worker=2"],
     "grid.worker=2 must be in [0, grid.num_workers=2)"),
    # the report spec: a misspelt metric would rank (and prune) by a value no trial has
    (["--config", "configs/wrn_grid.py", "--config.sweep.report.metric=val_acc"],
     "sweep.report.metric='val_acc': unknown; use one of val_top1, val_top5, val_loss"),
    (["--config", "configs/wrn_grid.py", "--config.sweep.report.metric=val_loss"],
     "sweep.report.mode='max': val_loss is better when lower; use --config.sweep.report.mode=min"),
    (["--config", "configs/efficientnet_grid.py", "--config.sweep.report.select=objective",
      "--config.sweep.report.metric=val_loss", "--config.sweep.report.mode=min"],
     "sweep.report.select=objective: ACC * (GMACs / T)^w needs an accuracy, not val_loss"),
    (["--config", "configs/wrn_grid.py", "--config.sweep.report.x=('flops',)"],
     "sweep.report.x: 'flops' is not a column of this study; use one of depth, dropout, gmacs, k, l, "
     "params, train_pflop."),
    (["--config", "configs/efficientnet_family.py", "--config.sweep.report.shared=phi = 0"],
     "sweep.report.shared: 'phi = 0' is not a Python expression"),
    (["--config", "configs/transfer.py:test", "--config.sweep.report.metric=top1"],
     "sweep.report.metric='top1': unknown"),
])
def test_grid_errors(capsys, tmp_path, argv, message):
    assert_clean_error(capsys, tmp_path / "w", argv, message)


# ----------------------------------------------------------------------------- transfer
def test_transfer_folder_with_missing_weights(capsys, tmp_path):
    for c in ("cats", "dogs"):
        write_images(tmp_path / "photos" / c, 10)
    assert_clean_error(capsys, tmp_path / "w", [
        "--config", "configs/transfer.py:folder", f"--config.data.path={tmp_path}/photos",
        f"--config.init.path={tmp_path}/resnet18.safetensors"], "does not exist")


def test_transfer_folder_without_weights(capsys, tmp_path):
    for c in ("cats", "dogs"):
        write_images(tmp_path / "photos" / c, 10)
    assert_clean_error(capsys, tmp_path / "w", [
        "--config", "configs/transfer.py:folder", f"--config.data.path={tmp_path}/photos"],
        "init.path: set the pretrained weights")


def test_transfer_default_refuses_an_init_path_it_would_ignore(capsys, tmp_path):
    assert_clean_error(capsys, tmp_path / "w", [
        "--config", "configs/transfer.py", f"--config.init.path={tmp_path}/w.safetensors"],
        "transfer.pretrain.enabled=True trains the weights here")


# ----------------------------------------------------------------------------- relaunch
def test_relaunch_with_a_changed_config_stops_and_names_the_fields(capsys, tmp_path):
    workdir = tmp_path / "w"
    config = cli.load_config("configs/train.py:test", [("train.lr", "0.05")])
    workdir.mkdir()
    assert cli.check_relaunch(config, str(workdir), accept_change=False)  # a new workdir: record
    rundir.write_config(str(workdir), config)
    assert not cli.check_relaunch(config, str(workdir), accept_change=False)  # the same: nothing
    recorded = json.loads((workdir / rundir.CONFIG).read_text())
    before = (workdir / rundir.CONFIG).read_text()
    with pytest.raises(SystemExit) as exit_info:
        launch([*TRAIN, "--config.train.lr=0.1", "--config.data.workers=1"], workdir)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert "(train.lr: 0.05 -> 0.1)" in lines[0] and "data.workers" not in lines[0]
    assert "--accept_config_change" in lines[0]
    assert sorted(p.name for p in workdir.iterdir()) == [rundir.CONFIG]
    assert (workdir / rundir.CONFIG).read_text() == before
    # accepted: the new config is to be recorded (launch writes it)
    changed = cli.load_config("configs/train.py:test", [("train.lr", "0.1")])
    assert cli.check_relaunch(changed, str(workdir), accept_change=True)
    # a model switch lists the fields that went and came
    switched = cli.load_config("configs/train.py:test", [("model.name", "resnet18")])
    changes = cli.config_changes(recorded, json.loads(switched.to_json()))
    assert "model.name: \"wide_resnet\" -> \"resnet18\"" in changes
    assert "model.convs_per_block: 1 -> (absent)" in changes


def test_an_eval_workdir_given_another_evaluation_says_so_not_resuming(tmp_path):
    """An evaluation has nothing to resume: the refusal says what the workdir holds."""
    config = cli.load_config("configs/eval.py", [("eval.workdir", str(tmp_path / "run"))])
    rundir.write_config(str(tmp_path), config)
    other = cli.load_config("configs/eval.py", [("eval.workdir", str(tmp_path / "other"))])
    with pytest.raises(ValueError, match="holds the evaluation of another config") as e:
        cli.check_relaunch(other, str(tmp_path), accept_change=False)
    assert "eval.workdir" in str(e.value) and "resuming" not in str(e.value)
    assert cli.check_relaunch(other, str(tmp_path), accept_change=True)


# ----------------------------------------------------------------------------- the script
def test_entry_point_prints_one_line(tmp_path):
    """python launch.py itself: one line, status 2, for an error in the config file and one
    in the workdir."""
    (tmp_path / "file").write_text("")
    for argv in (["--config", "nosuch.py"], [*TRAIN, "--workdir", str(tmp_path / "file")]):
        p = subprocess.run([sys.executable, str(ROOT / "launch.py"), *argv], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr


# ----------------------------------------------------------------------------- memory
def test_a_step_larger_than_the_hosts_memory_stops_before_the_workdir(capsys, tmp_path, monkeypatch):
    """On CPU a step that does not fit would be SIGKILLed by the kernel at its first call; the
    launch instead compares XLA's estimate of the compiled step with the host's memory. With
    train.auto_accumulate off it stops and names the microbatch split that fits (on, it
    trains in it: tests/test_accumulate.py)."""
    from scaling.train import memory

    big = ["--config.train.batch_size=64"]   # 8 a device: activations outweigh the weights
    config = cli.load_config("configs/train.py:test", [("train.batch_size", "64")])
    mesh = parallel.make_mesh()
    need1, need2 = (memory.train_step_bytes(config, mesh, k) for k in (1, 2))
    assert need2 < need1
    devices = jax.local_device_count()   # the host's devices share its memory
    # Room for 2 microbatches of 32 but not one of 64 (the check keeps 10 % for the runtime).
    monkeypatch.setattr(memory, "host_memory_available",
                        lambda: int((need1 + need2) / 2 * devices / 0.9))
    line = assert_clean_error(capsys, tmp_path / "w", [*TRAIN, *big, "--config.train.auto_accumulate=False"],
                              "train.batch_size=64: a train step of wide_resnet at 16 px in 1 "
                              "microbatch needs about ")
    assert "per device (XLA's estimate) and " in line, line
    assert line.endswith("is available (the host's available memory / 8 devices); set "
                         "--config.train.grad_accum_steps=2 (microbatches of 32; the batch is "
                         "kept), or --config.train.auto_accumulate=True."), line
    # Not even the weights: the message says so.
    monkeypatch.setattr(memory, "host_memory_available", lambda: 1000)
    assert_clean_error(capsys, tmp_path / "w", [*TRAIN, *big], "even one example per device does not fit")
