"""Experiments end to end at tiny size: a real sweep with a diverging and an over-budget
trial, the EfficientNet search trials, report plots."""
import csv
import json

import ml_collections
import pytest

from configs import efficientnet_family, efficientnet_grid, train
from experiments import efficientnet, sweep
from experiments.grid import default_grid_config
from scaling import scaling_rules


def tiny_sweep_config():
    c = train.get_config("test")
    c.experiment = "sweep"
    c.grid = default_grid_config()
    c.grid.axes = ml_collections.ConfigDict(dict(lr=(0.1, 1e6), k=(1, 4)))
    c.grid.targets = ml_collections.ConfigDict(dict(lr="train.lr", k="model.widen_factor"))
    c.grid.mode = "product"
    c.grid.constraint = ""
    c.grid.heatmap = ("lr", "k")
    return c


def test_sweep_records_done_diverged_infeasible(tmp_path):
    c = tiny_sweep_config()
    c.grid.max_gmacs = 0.005  # k=4 (0.042 GMACs at 16 px) is over budget, k=1 is not
    sweep.validate(c, 8)
    out = sweep.run(c, str(tmp_path))
    with open(tmp_path / "results.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert rows["k1-lr0.1"]["status"] == "done"
    assert 0.0 <= float(rows["k1-lr0.1"]["val_top1"]) <= 1.0
    assert rows["k1-lr1e+06"]["status"] == "diverged"
    assert rows["k4-lr0.1"]["status"] == "infeasible" and rows["k4-lr1e+06"]["status"] == "infeasible"
    assert "grid.max_gmacs" in rows["k4-lr0.1"]["reason"]
    assert float(rows["k4-lr0.1"]["gmacs"]) > 0.005 > float(rows["k1-lr0.1"]["gmacs"])
    assert float(rows["k1-lr0.1"]["peak_memory_mb"]) > 0
    assert out["done"] == 1 and (tmp_path / "accuracy_vs_gmacs.png").stat().st_size > 1000
    # the trial's fit hit the compilation done by preflight: one set of files per trial
    assert json.loads((tmp_path / "trials" / "k1-lr0.1" / "result.json").read_text())["params"] > 0


def test_sweep_validation_names_the_trial_and_field():
    c = tiny_sweep_config()
    c.grid.targets.k = "model.widen"
    with pytest.raises(ValueError, match="no field 'model.widen'"):
        sweep.validate(c, 8)
    c = tiny_sweep_config()
    c.grid.axes.lr = (0.1, -1.0)
    with pytest.raises(ValueError, match="trial k1-lr-1: train.lr=-1.0"):
        sweep.validate(c, 8)


def test_efficientnet_search_trials_satisfy_the_constraint():
    c = efficientnet_grid.get_config()
    trials = efficientnet.search_trials(c)
    assert len(trials) >= 6
    for t in trials:
        v = t.values
        assert min(v["alpha"], v["beta"], v["gamma"]) >= 1.0
        assert abs(v["alpha"] * v["beta"] ** 2 * v["gamma"] ** 2 - c.search.target) <= c.search.tolerance
        assert t.config.model.width == pytest.approx(c.search.base_width * v["beta"])
        assert t.config.model.depth == pytest.approx(c.search.base_depth * v["alpha"])
        assert t.config.data.image_size == scaling_rules.scaled_resolution(
            c.search.base_resolution, v["gamma"], c.search.resolution_divisor)
    efficientnet.validate_search(c, 8)
    c.search.alpha = (0.9, 1.0)
    with pytest.raises(ValueError, match="search.alpha"):
        efficientnet.validate_search(c, 8)


def test_selection_by_accuracy_or_objective():
    rows = [{"trial": "a", "status": "done", "val_top1": 0.50, "gmacs": 1.0},
            {"trial": "b", "status": "done", "val_top1": 0.51, "gmacs": 4.0},
            {"trial": "c", "status": "failed"}]
    s = efficientnet.default_search_config()
    assert efficientnet.select_best(rows, s)["trial"] == "b"
    s.select, s.objective_target_gmacs = "objective", 1.0
    assert efficientnet.select_best(rows, s)["trial"] == "a"  # 0.51 * 4^-0.07 = 0.462 < 0.50


def test_family_trials_match_theoretical_flops(tmp_path):
    c = efficientnet_family.get_config()
    trials = {t.id: t for t in efficientnet.family_trials(c)}
    assert set(trials) == {"compound-phi0", *(f"{k}-phi{p}" for k in efficientnet.SCALINGS for p in (1, 2))}
    growth = scaling_rules.flops_factor(1.2, 1.1, 1.15)
    d = trials["depth-phi2"].values
    assert d["depth"] == pytest.approx(c.search.base_depth * growth ** 2, rel=1e-5)
    w = trials["width-phi1"].values
    assert w["width"] == pytest.approx(c.search.base_width * growth ** 0.5, rel=1e-5)
    (tmp_path / "best.json").write_text(json.dumps({"alpha": 1.4, "beta": 1.1, "gamma": 1.1}))
    c.family.coefficients_from = str(tmp_path)
    assert efficientnet.family_coefficients(c) == (1.4, 1.1, 1.1)
    c.family.coefficients_from = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="family.coefficients_from"):
        efficientnet.validate_family(c, 8)
