"""Grid engine: ids, axes, claims, resume, worker split, failure isolation, results table.
Trials here use a stand-in train function (no compute) so the engine's logic is what runs."""
import csv
import json
import multiprocessing as mp
import os
import time

import ml_collections
import pytest

from experiments import grid
from scaling import rundir


def base_config():
    return ml_collections.ConfigDict(dict(model=dict(name="x", width=1.0, depth=1.0),
                                          train=dict(lr=0.1, num_steps=10, batch_size=1)))


TARGETS = {"w": "model.width", "d": "model.depth", "lr": "train.lr"}


def make_trials(points, seeds=1):
    trials = []
    for p in points:
        pid = grid.trial_id(p)
        for s in range(seeds):
            cfg = base_config()
            for k, v in p.items():
                grid.set_path(cfg, TARGETS[k], v)
            cfg.seed = s
            trials.append(grid.Trial(pid if seeds == 1 else f"{pid}-seed{s}", dict(p), cfg, point=pid))
    return trials


def fake_preflight(cfg, memory_limit_mb=0.0):
    return {"params": 100, "batch_stats": 0, "gmacs": cfg.model.width * cfg.model.depth,
            "peak_memory_mb": 10.0 * cfg.model.width}


def fake_train(log_path=None, sleep=0.0):
    from scaling.train import Diverged

    def train(cfg, workdir, until_step=None, hparams=None):
        if log_path:
            with open(log_path, "a") as f:
                f.write(os.path.basename(workdir) + "\n")
        time.sleep(sleep)
        if cfg.train.lr > 100:
            raise Diverged(3, float("nan"))
        if cfg.model.depth < 0:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return {"val_top1": round(0.1 * cfg.model.width * cfg.model.depth, 6), "status": "done"}
    return train


def gcfg(**kw):
    c = grid.default_grid_config()
    c.update(**kw)
    return c


def test_ids_and_paths():
    assert grid.trial_id({"alpha": 1.2, "beta": 1.1, "l": 2}) == "alpha1.2-beta1.1-l2"
    with pytest.raises(ValueError, match="no field 'model.widht'"):
        grid.set_path(base_config(), "model.widht", 2.0)


def test_statuses_results_and_resume(tmp_path):
    pts = [{"w": 1.0, "d": 1.0, "lr": 0.1}, {"w": 2.0, "d": 1.0, "lr": 0.1},
           {"w": 1.0, "d": 1.0, "lr": 1e6}, {"w": 9.0, "d": 1.0, "lr": 0.1},
           {"w": 1.0, "d": -1.0, "lr": 0.1}]
    trials = make_trials(pts)
    log = tmp_path / "ran.txt"
    rows = grid.run_study(trials, str(tmp_path), gcfg(max_gmacs=5.0), train_fn=fake_train(log),
                          preflight_fn=fake_preflight)
    status = {r["trial"]: r["status"] for r in rows}
    assert list(status.values()) == ["done", "done", "diverged", "infeasible", "failed"]
    failed = rows[4]
    assert "RESOURCE_EXHAUSTED" in failed["reason"]
    assert "grid.max_gmacs" in rows[3]["reason"]
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["trial"] for t in table] == [t.id for t in trials]
    for col in ("trial", "status", "val_top1", "params", "gmacs", "peak_memory_mb",
                "step_time_s", "train_time_s", "w", "d", "lr"):
        assert col in table[0]
    assert float(table[1]["val_top1"]) == pytest.approx(0.2)
    # relaunch: nothing runs again, same table
    before = (tmp_path / "results.csv").read_text()
    grid.run_study(trials, str(tmp_path), gcfg(max_gmacs=5.0), train_fn=fake_train(log),
                   preflight_fn=fake_preflight)
    assert sorted(log.read_text().split()) == sorted([trials[i].id for i in (0, 1, 2, 4)])
    assert (tmp_path / "results.csv").read_text() == before


def _worker(args):
    workdir, worker, log = args
    trials = make_trials([{"w": float(w), "d": 1.0, "lr": 0.1} for w in range(1, 9)])
    grid.run_study(trials, workdir, gcfg(num_workers=2, worker=worker),
                   train_fn=fake_train(log, sleep=0.3), preflight_fn=fake_preflight)


def run_two_workers(worker_fn, tmp_path) -> str:
    """Runs worker_fn((workdir, i, log)) for workers 0 and 1 in two processes; the log path."""
    log = str(tmp_path / "ran.txt")
    with mp.get_context("spawn").Pool(2) as pool:
        pool.map(worker_fn, [(str(tmp_path), 0, log), (str(tmp_path), 1, log)])
    return log


def test_two_workers_split_without_duplicates(tmp_path):
    ran = open(run_two_workers(_worker, tmp_path)).read().split()
    assert len(ran) == 8 and len(set(ran)) == 8
    rows = json.loads((tmp_path / "results.json").read_text())
    assert all(r["status"] == "done" for r in rows)


def test_claims_are_exclusive_and_stale_claims_taken_over(tmp_path):
    d = str(tmp_path / "t")
    c1 = grid.try_claim(d, "a", stale_after_s=60, heartbeat_s=0.05)
    assert c1 is not None
    assert grid.try_claim(d, "b", stale_after_s=60, heartbeat_s=0.05) is None
    time.sleep(0.2)
    assert time.time() - os.stat(os.path.join(d, "claim")).st_mtime < 0.15  # heartbeat
    c1.release()
    c2 = grid.try_claim(d, "b", stale_after_s=60, heartbeat_s=60)
    assert c2 is not None
    c2._stop.set()  # the worker died: no more heartbeats
    # a claim from a dead process on this host is stale at once
    path = os.path.join(d, "claim")
    info = json.load(open(path))
    info["pid"] = 2 ** 22 + 12345
    json.dump(info, open(path, "w"))
    c3 = grid.try_claim(d, "c", stale_after_s=60, heartbeat_s=60)
    assert c3 is not None and json.load(open(path))["owner"] == "c"
    # an old claim from another host is stale after stale_after_s
    info = json.load(open(path))
    info["host"] = "elsewhere"
    json.dump(info, open(path, "w"))
    assert grid.try_claim(d, "d", stale_after_s=60, heartbeat_s=60) is None
    os.utime(path, (time.time() - 120, time.time() - 120))
    assert grid.try_claim(d, "d", stale_after_s=60, heartbeat_s=60) is not None


def test_slurm_array_sets_worker(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert grid.worker_identity(gcfg()) == (3, 4)
    with pytest.raises(ValueError, match="grid.worker"):
        grid.worker_identity(gcfg(num_workers=2, worker=2))


# ----------------------------------------------------------------------------- halving
class SyntheticTrain:
    """A stand-in train function with memory: a trial's metric after s steps rises towards its
    point's quality (a fixed function of w and d), with a small seed-dependent wobble; it
    "checkpoints" its step so a promoted trial continues, and counts the steps it computes."""

    def __init__(self, log_path, crash_after=None, sleep=0.0):
        self.log_path, self.crash_after, self.sleep = log_path, crash_after, sleep

    @staticmethod
    def quality(cfg):
        w, d = cfg.model.width, cfg.model.depth
        return 0.9 - 0.1 * (w - 2.3) ** 2 - 0.05 * (d - 1.6) ** 2

    def __call__(self, cfg, workdir, until_step=None, hparams=None):
        total = cfg.train.num_steps
        stop = total if until_step is None else min(until_step, total)
        start = (rundir.read_json(os.path.join(workdir, "progress.json")) or {}).get("step", 0)
        with open(self.log_path, "a") as f:
            f.write(f"{os.path.basename(workdir)} {start} {stop}\n")
        if self.crash_after is not None:
            self.crash_after -= 1
            if self.crash_after < 0:
                raise KeyboardInterrupt("killed")  # not caught by the engine, like SIGKILL
        time.sleep(self.sleep)
        rundir.write_json_atomic(os.path.join(workdir, "progress.json"), {"step": stop})
        wobble = 0.002 * ((hash((cfg.seed, cfg.model.width, cfg.model.depth)) % 7) - 3)
        metric = self.quality(cfg) * (1 - 0.5 ** (stop / 9)) + wobble
        res = {"val_top1": round(metric, 6), "step": stop, "status": "paused" if stop < total else "done"}
        if stop == total:
            rundir.write_result(workdir, res)
        return res


def _halving_trials(seeds=2):
    pts = [{"w": w, "d": d} for w in (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
           for d in (1.0, 1.6, 2.2)]
    trials = make_trials(pts, seeds)
    for t in trials:
        t.config.train.num_steps = 81
    return trials


def _computed_steps(log_path):
    return sum(int(b) - int(a) for _, a, b in (line.split() for line in open(log_path)))


def test_halving_finds_the_best_with_a_third_of_the_compute(tmp_path):
    trials = _halving_trials()
    rungs = {t.id: [9, 27, 81] for t in trials}
    log = str(tmp_path / "ran.txt")
    rows = grid.run_study(trials, str(tmp_path), gcfg(), rungs=rungs, eta=3,
                          train_fn=SyntheticTrain(log), preflight_fn=fake_preflight)
    full_grid = 81 * len(trials)
    assert _computed_steps(log) <= full_grid / 3
    best = max(trials, key=lambda t: SyntheticTrain.quality(t.config)).point
    done = [r for r in rows if r["status"] == "done"]
    assert max(done, key=lambda r: r["val_top1"])["point"] == best == "w2.5-d1.6"
    # 27 points -> 9 -> 3; every pruned trial says where it stopped; both seeds move together
    assert len({r["point"] for r in done}) == 3 and len(done) == 6
    pruned = [r for r in rows if r["status"] == "pruned"]
    assert len(pruned) == 2 * 24 and {r["rung"] for r in pruned} == {0, 1}
    table = json.loads((tmp_path / "rungs.json").read_text())
    assert [sum(r["rung"] == k for r in table) for k in (0, 1, 2)] == [27, 9, 3]
    assert sum(r["promoted"] for r in table if r["rung"] == 0) == 9


def test_halving_resumes_after_a_kill_with_the_same_table(tmp_path):
    rungs = {t.id: [9, 27, 81] for t in _halving_trials()}
    straight = tmp_path / "straight"
    grid.run_study(_halving_trials(), str(straight), gcfg(), rungs=rungs, eta=3,
                   train_fn=SyntheticTrain(str(tmp_path / "a.txt")), preflight_fn=fake_preflight)
    killed = tmp_path / "killed"
    log = str(tmp_path / "b.txt")
    for crash_after in (5, 50, 20):  # killed three times: in rungs 0, 1 and 2
        with pytest.raises(KeyboardInterrupt):
            grid.run_study(_halving_trials(), str(killed), gcfg(), rungs=rungs, eta=3,
                           train_fn=SyntheticTrain(log, crash_after=crash_after),
                           preflight_fn=fake_preflight)
        for claim in killed.glob("trials/*/claim"):
            info = json.loads(claim.read_text())
            info["pid"] = 2 ** 22 + 1  # its process is gone
            claim.write_text(json.dumps(info))
    grid.run_study(_halving_trials(), str(killed), gcfg(), rungs=rungs, eta=3,
                   train_fn=SyntheticTrain(log), preflight_fn=fake_preflight)
    drop = ("step_time_s", "train_time_s")
    a = [{k: v for k, v in r.items() if k not in drop} for r in json.loads((straight / "results.json").read_text())]
    b = [{k: v for k, v in r.items() if k not in drop} for r in json.loads((killed / "results.json").read_text())]
    assert a == b
    assert (straight / "rungs.json").read_text() == (killed / "rungs.json").read_text()


def _halving_worker(args):
    workdir, worker, log = args
    trials = _halving_trials(seeds=1)
    grid.run_study(trials, workdir, gcfg(num_workers=2, worker=worker, poll_s=0.2),
                   rungs={t.id: [9, 27, 81] for t in trials}, eta=3,
                   train_fn=SyntheticTrain(log, sleep=0.05), preflight_fn=fake_preflight)


def test_halving_with_two_workers_runs_each_trial_rung_once(tmp_path):
    runs = [tuple(line.split()) for line in open(run_two_workers(_halving_worker, tmp_path))]
    assert len(runs) == len(set(runs)) == 27 + 9 + 3
    rows = json.loads((tmp_path / "results.json").read_text())
    assert sum(r["status"] == "done" for r in rows) == 3
