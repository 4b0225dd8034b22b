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
from experiments.report import pareto_front


def base_config():
    return ml_collections.ConfigDict(dict(model=dict(name="x", width=1.0, depth=1.0),
                                          train=dict(lr=0.1)))


def make_trials(points):
    return [grid.Trial(grid.trial_id(p), p, grid.trial_config(base_config(), p,
                                                              {"w": "model.width", "d": "model.depth",
                                                               "lr": "train.lr"}))
            for p in points]


def fake_preflight(cfg):
    return {"params": 100, "batch_stats": 0, "gmacs": cfg.model.width * cfg.model.depth,
            "peak_memory_mb": 10.0 * cfg.model.width}


def fake_train(log_path=None, sleep=0.0):
    from scaling.train import Diverged

    def train(cfg, workdir):
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


def test_points_and_ids():
    pts = grid.grid_points({"a": [1.0, 1.1], "b": [1, 2, 3]}, "product")
    assert len(pts) == 6 and pts[0] == {"a": 1.0, "b": 1}
    assert grid.grid_points({"a": [1, 2], "b": [3, 4]}, "zip") == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    kept = grid.grid_points({"a": [1.0, 1.2], "b": [1.0, 1.1]}, "product",
                            constraint=lambda p: abs(p["a"] * p["b"] ** 2 - 1.45) < 0.05)
    assert kept == [{"a": 1.2, "b": 1.1}]
    assert grid.trial_id({"alpha": 1.2, "beta": 1.1, "l": 2}) == "alpha1.2-beta1.1-l2"
    with pytest.raises(ValueError, match="grid.mode"):
        grid.grid_points({"a": [1]}, "cartesian")
    with pytest.raises(ValueError, match="one length"):
        grid.grid_points({"a": [1], "b": [1, 2]}, "zip")
    with pytest.raises(ValueError, match="no field 'model.widht'"):
        grid.trial_config(base_config(), {"w": 2.0}, {"w": "model.widht"})


def test_statuses_results_and_resume(tmp_path):
    pts = [{"w": 1.0, "d": 1.0, "lr": 0.1}, {"w": 2.0, "d": 1.0, "lr": 0.1},
           {"w": 1.0, "d": 1.0, "lr": 1e6}, {"w": 9.0, "d": 1.0, "lr": 0.1},
           {"w": 1.0, "d": -1.0, "lr": 0.1}]
    trials = make_trials(pts)
    log = tmp_path / "ran.txt"
    rows = grid.run_grid(trials, str(tmp_path), gcfg(max_gmacs=5.0), fake_train(log), fake_preflight)
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
    grid.run_grid(trials, str(tmp_path), gcfg(max_gmacs=5.0), fake_train(log), fake_preflight)
    assert sorted(log.read_text().split()) == sorted([trials[i].id for i in (0, 1, 2, 4)])
    assert (tmp_path / "results.csv").read_text() == before


def _worker(args):
    workdir, worker, log = args
    trials = make_trials([{"w": float(w), "d": 1.0, "lr": 0.1} for w in range(1, 9)])
    grid.run_grid(trials, workdir, gcfg(num_workers=2, worker=worker),
                  fake_train(log, sleep=0.3), fake_preflight)


def test_two_workers_split_without_duplicates(tmp_path):
    log = str(tmp_path / "ran.txt")
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        pool.map(_worker, [(str(tmp_path), 0, log), (str(tmp_path), 1, log)])
    ran = open(log).read().split()
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


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.6), (4.0, 0.8)]
    assert pareto_front(pts) == [0, 2, 4]
