"""launch.py end to end as a user runs it: model switching, SIGKILL + relaunch, a changed
config on relaunch, two hosts. Bad inputs: tests/test_bad_inputs.py."""
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


def test_override_syntax_and_types():
    """--config.a.b=v, --config.a.b v, bare booleans and --noconfig.a.b; text read as the
    field's type; the last of repeated overrides wins."""
    from scaling import cli

    config, overrides = cli.parse_flags([
        "launch.py", "--config.train.lr", "0.5", "--config", "configs/train.py:test",
        "--config.data.flip", "--noconfig.train.nesterov", "--workdir", "W",
        "--config.data.mean=(0.5, 0.5, 0.5)", "--config.train.num_steps=3", "--config.train.lr=1"])
    assert config == "configs/train.py:test" and cli.FLAGS.workdir == "W"
    c = cli.load_config(config, overrides)
    assert c.train.lr == 1.0 and isinstance(c.train.lr, float)
    assert c.data.flip is True and c.train.nesterov is False
    assert c.data.mean == (0.5, 0.5, 0.5) and c.train.num_steps == 3
    assert c.is_locked and c.model.is_locked


def test_model_switch_replaces_the_model_section_then_applies_its_overrides():
    from scaling import cli
    from scaling.models import default_model_config

    # model.name first, wherever it stands; then the other model fields, on resnet18's section
    c = cli.load_config("configs/train.py", [("model.zero_init_residual", "true"),
                                             ("model.name", "resnet18")])
    want = default_model_config("resnet18")
    want.zero_init_residual = True
    assert c.model.to_dict() == want.to_dict()
    assert "convs_per_block" not in c.model and "widen_factor" not in c.model
    assert c.data.image_size == 224                  # resnet18's resolution ...
    c = cli.load_config("configs/train.py", [("data.image_size", "64"), ("model.name", "resnet18")])
    assert c.data.image_size == 64                   # ... unless the user set one
    # the old model's fields are gone, so setting one is an unknown field
    with pytest.raises(ValueError, match=r"--config\.model\.widen_factor: section 'model' has no field"):
        cli.load_config("configs/train.py", [("model.name", "resnet18"), ("model.widen_factor", "2")])
    # the model the config already has: its section stays
    c = cli.load_config("configs/train.py:test", [("model.name", "wide_resnet")])
    assert c.model.depth == 10 and c.model.convs_per_block == 1


def test_model_switch_on_the_imagenet_preset_passes_validation(capsys, tmp_path):
    """efficientnet_b0 on the imagenet preset: valid; it stops (no imagenet2012 here) at the
    data, in one line, with nothing written."""
    from scaling import cli

    c = cli.load_config("configs/train.py:imagenet", [("model.name", "efficientnet_b0")])
    assert c.model.name == "efficientnet_b0" and c.data.image_size == 224
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["launch.py", "--config", "configs/train.py:imagenet",
                  "--config.model.name=efficientnet_b0", "--workdir", str(tmp_path / "w")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert "imagenet2012" in lines[0] and "not prepared" in lines[0], lines[0]
    assert not (tmp_path / "w").exists()


def test_switched_model_trains(tmp_path):
    from scaling import cli, rundir

    result = cli.main(["launch.py", *TEST, "--config.model.name=resnet20", "--config.data.image_size=16",
                       "--config.train.num_steps=2", "--workdir", str(tmp_path / "w")])
    assert result["status"] == "done" and result["step"] == 2 and result["model"] == "resnet20"
    recorded = json.loads((tmp_path / "w" / rundir.CONFIG).read_text())
    assert recorded["model"]["name"] == "resnet20" and recorded["data"]["image_size"] == 16
    assert "widen_factor" not in recorded["model"]


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc; [] elsewhere)."""
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return out


@pytest.mark.parametrize("loader", ["threads", "grain"])
def test_sigkill_and_relaunch_gives_the_same_result(tmp_path, loader):
    """The reference runs on the default loader (threads, for the embedded data); the killed
    and relaunched run on `loader` (grain: two worker processes), and must match it exactly."""
    args = [*TEST, "--config.train.num_steps=16", "--config.train.checkpoint_every_steps=4"]
    ref = run_launch([*args, "--workdir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    args += [f"--config.data.loader={loader}", "--config.data.workers=2"]
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
    workers = _children(proc.pid)
    assert loader == "threads" or len(workers) >= 2, workers  # grain's processes (+ helpers)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "result.json").exists()
    # the killed run's worker processes exit with it (they never get a stop request)
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") for p in workers):
        time.sleep(0.2)
    assert not [p for p in workers if os.path.exists(f"/proc/{p}")], "worker processes outlived the run"
    again = run_launch([*args, "--workdir", str(work)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    a = json.loads((tmp_path / "ref" / "result.json").read_text())
    b = json.loads((work / "result.json").read_text())
    assert a == b
    # the same workdir with another learning rate: the change is shown and nothing runs
    changed = run_launch([*args, "--config.train.lr=0.05", "--workdir", str(work)])
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "train.lr: 0.1 -> 0.05" in changed.stderr and "Traceback" not in changed.stderr
    assert json.loads((work / "result.json").read_text()) == b


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
    outs = two_hosts(["--config.train.num_steps=16", "--accept_config_change"])
    assert "resumed from" in outs[0][1]
    b = _losses(tmp_path / "two")
    assert sorted(b) == list(range(1, 17))
