"""launch.py end to end as a user runs it: clean errors, SIGKILL + relaunch, two hosts."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.helpers import run_launch

TEST = ["--config", "configs/train.py:test"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("override,message", [
    ("--config.model.name=resnet5O", "model.name: unknown model 'resnet5O'"),
    ("--config.data.name=cifar11", "data.name"),
    ("--config.train.batch_size=12", "train.batch_size=12 is not divisible by the 8 devices"),
])
def test_bad_input_is_one_clear_line(tmp_path, override, message):
    if "cifar11" in override:
        override = "--config.data.source=tfds " + override
    p = run_launch([*TEST, *override.split(), "--workdir", str(tmp_path / "w")])
    assert p.returncode == 2, p.stderr[-2000:]
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_missing_data_directory(tmp_path):
    p = run_launch([*TEST, "--config.data.source=folder", f"--config.data.path={tmp_path}/photos",
                    "--workdir", str(tmp_path / "w")])
    assert p.returncode == 2 and "data.path" in p.stderr and "Traceback" not in p.stderr


def test_sigkill_and_relaunch_gives_the_same_result(tmp_path):
    args = [*TEST, "--config.train.num_steps=16", "--config.train.checkpoint_every_steps=4"]
    ref = run_launch([*args, "--workdir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    work = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args, "--workdir", str(work)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ck = work / "checkpoints"
        if ck.exists() and any(d.name.isdigit() and int(d.name) >= 8 for d in ck.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "result.json").exists()
    again = run_launch([*args, "--workdir", str(work)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    a = json.loads((tmp_path / "ref" / "result.json").read_text())
    b = json.loads((work / "result.json").read_text())
    assert a == b


def _losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["train/loss"] for x in lines if "train/loss" in x}


def test_two_processes_match_one_process(tmp_path):
    # lr 0.01: the two all-reduce orders differ in the last float32 bit; a small step keeps
    # that rounding from being amplified past 1e-4 over the run.
    args = [*TEST, "--config.train.num_steps=12", "--config.train.log_every_steps=1",
            "--config.train.checkpoint_every_steps=6", "--config.train.lr=0.01"]
    one = run_launch([*args, "--workdir", str(tmp_path / "one")], devices=8)
    assert one.returncode == 0, one.stderr[-3000:]

    def two_hosts(extra):
        port = _free_port()
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   TF_CPP_MIN_LOG_LEVEL="2")
        procs = [subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), *args, *extra, "--workdir", str(tmp_path / "two"),
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, err[-3000:]
        return outs

    outs = two_hosts([])
    assert "8 device(s) x 2 process(es)" in outs[0][1]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for s in a:
        assert abs(a[s] - b[s]) < 1e-4, (s, a[s], b[s])
    # one set of logs and one checkpoint directory, written once
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("events")) != []
    assert [d.name for d in (tmp_path / "two").iterdir() if d.name == "checkpoints"] == ["checkpoints"]
    r1 = json.loads((tmp_path / "one" / "result.json").read_text())
    r2 = json.loads((tmp_path / "two" / "result.json").read_text())
    assert abs(r1["val_top1"] - r2["val_top1"]) < 1e-3
    # resume from the two-host checkpoint: extend the run by 4 steps
    outs = two_hosts(["--config.train.num_steps=16"])
    assert "resumed from" in outs[0][1]
    b = _losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 17))
