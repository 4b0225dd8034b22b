"""The declarative sweep end to end at tiny size (a real sweep with a diverging and an
over-budget trial), the sweep schema (combine, constraint, derive, seeds), realized-cost
control, the shipped study configs and the study report."""
import csv
import logging
import shutil

import ml_collections
import pytest

from configs import (compare, efficientnet_family, efficientnet_grid, mobilenet_width, resolution,
                     train, wrn_grid)
from experiments import report, sweep
from experiments.grid import default_grid_config
from scaling import scaling_rules


def tiny_sweep_config():
    c = train.get_config("test")
    c.experiment = "sweep"
    c.grid = default_grid_config()
    c.sweep = sweep.default_sweep_config()
    c.sweep.axes = ml_collections.ConfigDict(dict(lr=(0.1, 1e6), k=(1, 4)))
    c.sweep.targets = ml_collections.ConfigDict(dict(lr="train.lr", k="model.widen_factor"))
    c.sweep.report.heatmap = ("lr", "k")
    return c


def test_more_seeds_train_only_the_new_seeds(tmp_path):
    """A single-seed study relaunched with two seeds keeps its trial as seed 0."""
    c = tiny_sweep_config()
    c.sweep.axes = ml_collections.ConfigDict(dict(lr=(0.1,), k=(1,)))
    sweep.run(c, str(tmp_path))
    first = (tmp_path / "trials" / "k1-lr0.1" / "result.json").read_text()
    c.sweep.seeds = 2
    out = sweep.run(c, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["k1-lr0.1", "k1-lr0.1-seed1"]
    assert (tmp_path / "trials" / "k1-lr0.1" / "result.json").read_text() == first
    with open(tmp_path / "results.csv") as f:
        assert [(r["trial"], r["seed"]) for r in csv.DictReader(f)] == [("k1-lr0.1", "0"),
                                                                       ("k1-lr0.1-seed1", "1")]
    assert out["trials"] == 2 and out["done"] == 2


def test_sweep_records_done_diverged_infeasible(tmp_path, caplog):
    c = tiny_sweep_config()
    c.grid.max_gmacs = 0.005  # k=4 (0.042 GMACs at 16 px) is over budget, k=1 is not
    c.sweep.report.update(curves=("eval/top1", "eval/acc"), columns=("size_mb", "sizemb"))
    sweep.validate(c, 8)
    with caplog.at_level(logging.WARNING, logger="experiments.report"):
        out = sweep.run(c, str(tmp_path))
    warned = [r.getMessage() for r in caplog.records if r.name == "experiments.report"]
    assert len(warned) == 2 and "sweep.report.curves: no trial logged 'eval/acc'; the trials log " \
        "eval/loss, eval/top1" in warned[0] and warned[1] == "sweep.report.columns: no trial has 'sizemb'"
    with open(tmp_path / "results.csv") as f:
        rows = {r["trial"]: r for r in csv.DictReader(f)}
    assert rows["k1-lr0.1"]["status"] == "done"
    assert 0.0 <= float(rows["k1-lr0.1"]["val_top1"]) <= 1.0
    assert rows["k1-lr1e+06"]["status"] == "diverged"
    assert rows["k4-lr0.1"]["status"] == "infeasible" and rows["k4-lr1e+06"]["status"] == "infeasible"
    assert "grid.max_gmacs" in rows["k4-lr0.1"]["reason"]
    assert float(rows["k4-lr0.1"]["gmacs"]) > 0.005 > float(rows["k1-lr0.1"]["gmacs"])
    assert float(rows["k1-lr0.1"]["peak_memory_mb"]) > 0
    assert out["done"] == 1 and out["best"] == "k1-lr0.1"
    study = (tmp_path / "study.md").read_text()
    assert "Best: **k1-lr0.1**" in study and "1 seed" in study
    assert (tmp_path / "val_top1_vs_gmacs.png").stat().st_size > 1000
    # the study can be re-analysed from the workdir alone
    (tmp_path / "study.md").unlink()
    report.main([str(tmp_path)])
    assert (tmp_path / "study.md").read_text() == study
    # relaunching the finished sweep runs nothing and rewrites the same tables
    results = (tmp_path / "results.csv").read_text()
    assert sweep.run(c, str(tmp_path)) == out
    assert (tmp_path / "results.csv").read_text() == results
    # a sweep stopped half-way (a trial not started yet, no results.json) is analysed too
    shutil.rmtree(tmp_path / "trials" / "k1-lr0.1")
    (tmp_path / "results.json").unlink()
    report.main([str(tmp_path)])
    with open(tmp_path / "results.csv") as f:
        status = {r["trial"]: r["status"] for r in csv.DictReader(f)}
    assert status == {"k1-lr0.1": "pending", "k1-lr1e+06": "diverged", "k4-lr0.1": "infeasible",
                      "k4-lr1e+06": "infeasible"}
    assert "No point finished; nothing to conclude yet." in (tmp_path / "study.md").read_text()


def test_sweep_validation_names_the_point_and_field():
    c = tiny_sweep_config()
    c.sweep.targets.k = "model.widen"
    with pytest.raises(ValueError, match="no field 'model.widen'"):
        sweep.validate(c, 8)
    c = tiny_sweep_config()
    c.sweep.axes.lr = (0.1, -1.0)
    with pytest.raises(ValueError, match="point k1-lr-1: train.lr=-1.0"):
        sweep.validate(c, 8)
    c = tiny_sweep_config()
    c.sweep.combine = "product(lr, kk)"
    with pytest.raises(ValueError, match="sweep.combine.*the axes are k, lr"):
        sweep.validate(c, 8)
    c = tiny_sweep_config()
    c.sweep.derive = "magic"
    with pytest.raises(ValueError, match="sweep.derive: unknown 'magic'"):
        sweep.validate(c, 8)


def test_combine_product_zip_chain_and_constraint():
    axes = {"a": (1, 2), "b": (3, 4), "c": (5,)}
    assert sweep.combine_points(axes, "product") == [
        {"a": 1, "b": 3, "c": 5}, {"a": 1, "b": 4, "c": 5}, {"a": 2, "b": 3, "c": 5}, {"a": 2, "b": 4, "c": 5}]
    assert sweep.combine_points({"a": (1, 2), "b": (3, 4)}, "zip") == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert sweep.combine_points(axes, "chain(zip(a, b), c)") == [{"a": 1, "b": 3}, {"a": 2, "b": 4}, {"c": 5}]
    with pytest.raises(ValueError, match="one length"):
        sweep.combine_points({"a": (1,), "b": (1, 2)}, "zip")
    check = sweep.make_constraint("(depth - 4) % (3 * l) == 0")
    assert check({"depth": 10, "l": 2}) and not check({"depth": 10, "l": 4})


def test_seeds_make_trials_of_a_point():
    c = tiny_sweep_config()
    c.sweep.seeds = 3
    trials = sweep.trials_of(c, sweep.build_points(c))
    assert len(trials) == 12
    first = [t for t in trials if t.point == "k1-lr0.1"]
    assert [t.id for t in first] == [f"k1-lr0.1-seed{i}" for i in range(3)]
    assert [t.config.seed for t in first] == [0, 1, 2]
    assert first[1].hparams == {"k": 1, "lr": 0.1, "seed": 1}
    # an axis of one value is no column of the HParams tab (it only holds the first five)
    c.sweep.axes.k = (1,)
    assert sweep.trials_of(c, sweep.build_points(c))[0].hparams == {"lr": 0.1, "seed": 0}


def test_compound_points_satisfy_the_constraint_and_rounding():
    c = efficientnet_grid.get_config()
    points = sweep.build_points(c)
    assert len(points) >= 9  # the default search considers 9+ points on the surface
    cc = c.sweep.compound
    for p in points:
        v = p.values
        assert min(v["alpha"], v["beta"], v["gamma"]) >= 1.0
        assert abs(v["alpha"] * v["beta"] ** 2 * v["gamma"] ** 2 - 2.0) <= 0.1
        assert p.config.model.width == pytest.approx(cc.base_width * v["beta"])
        assert p.config.model.depth == pytest.approx(cc.base_depth * v["alpha"])
        assert p.config.data.image_size == scaling_rules.scaled_resolution(
            cc.base_resolution, v["gamma"], cc.resolution_divisor)
        assert v["cost_factor_theory"] == pytest.approx(scaling_rules.flops_factor(
            v["alpha"], v["beta"], v["gamma"]), abs=1e-4)
    c.sweep.axes.alpha = (0.9, 1.0)
    with pytest.raises(ValueError, match="sweep.axes.alpha"):
        sweep.build_points(c)


def _tiny_compound(**sweep_kw):
    c = efficientnet_grid.get_config()
    c.sweep.axes = ml_collections.ConfigDict(dict(alpha=(1.0, 1.1, 1.2), beta=(1.0,), gamma=(1.0, 1.4)))
    c.sweep.constraint = "alpha * beta**2 * gamma**2 < 2.3"
    c.sweep.update(**sweep_kw)
    return c


def test_realized_cost_filtering_drops_exactly_the_points_outside_the_tolerance(tmp_path):
    c = _tiny_compound(cost_tolerance=0.15)
    points = sweep.study_points(c, str(tmp_path))
    by_id = {p.id: p for p in points}
    assert set(by_id) == {"alpha1-beta1-gamma1", "alpha1.1-beta1-gamma1", "alpha1.2-beta1-gamma1",
                          "alpha1-beta1-gamma1.4", "alpha1.1-beta1-gamma1.4"}
    for p in points:
        v = p.values
        assert v["cost_factor"] > 0 and v["params"] > 0 and v["gmacs"] > 0
        off = abs(v["cost_factor"] / v["cost_factor_theory"] - 1)
        if p.excluded and "same network" not in p.excluded:
            assert off > 0.15 and "sweep.cost_tolerance=0.15" in p.excluded
        elif not p.excluded:
            assert off <= 0.15
    assert by_id["alpha1-beta1-gamma1"].values["cost_factor"] == 1.0
    assert not by_id["alpha1-beta1-gamma1"].excluded
    # depth 0.55 and 0.6 round to the same block repeats: the second is a duplicate
    assert by_id["alpha1.2-beta1-gamma1"].excluded == "builds the same network as alpha1.1-beta1-gamma1"
    assert "outside sweep.cost_tolerance" in by_id["alpha1.1-beta1-gamma1.4"].excluded
    # cached: a relaunch reads the realized figures instead of counting again
    again = sweep.study_points(c, str(tmp_path))
    assert [(p.id, p.excluded, p.values) for p in again] == [(p.id, p.excluded, p.values) for p in points]
    # excluded points become excluded trials, never trained
    trials = sweep.trials_of(c, points)
    assert {t.point for t in trials if t.excluded} == {p.id for p in points if p.excluded}


def test_family_single_dimension_points_match_the_compound_cost():
    c = efficientnet_family.get_config()
    c.sweep.axes.phi = (0, 1)
    points = {p.id: p for p in sweep.study_points(c)}
    assert set(points) == {f"phi{p}-scaling{k}" for k, p in
                           [("compound", 0), ("compound", 1), ("depth", 1), ("width", 1), ("resolution", 1)]}
    compound = points["phi1-scalingcompound"].values
    growth = scaling_rules.flops_factor(1.2, 1.1, 1.15)
    assert compound["cost_factor_theory"] == pytest.approx(growth, abs=1e-4)
    for kind in ("depth", "width", "resolution"):
        v = points[f"phi1-scaling{kind}"].values
        assert v["matched_to"] == "compound"
        # matched to the compound point's realized GMACs more closely than the formula would be
        assert abs(v["gmacs"] / compound["gmacs"] - 1) < 0.25, (kind, v)


def test_published_table_option():
    c = efficientnet_family.get_config()
    c.sweep.compound.update(published=True, base_width=1.0, base_depth=1.0, base_resolution=224)
    c.sweep.axes = ml_collections.ConfigDict(dict(scaling=("compound",), phi=(0, 3)))
    c.sweep.constraint = ""
    points = {p.id: p for p in sweep.build_points(c)}
    b3 = scaling_rules.EFFICIENTNET_PARAMS["b3"]
    cfg = points["phi3-scalingcompound"].config
    assert (cfg.model.width, cfg.model.depth, cfg.data.image_size) == (b3.width, b3.depth, b3.resolution)


def test_objective_column_reaches_results_csv(tmp_path):
    c = tiny_sweep_config()
    c.sweep.report.update(select="objective", objective_target_gmacs=1.0)
    rows = [{"trial": "a", "point": "a", "lr": 0.1, "k": 1, "status": "done", "val_top1": 0.50, "gmacs": 1.0},
            {"trial": "b", "point": "b", "lr": 0.1, "k": 4, "status": "done", "val_top1": 0.51, "gmacs": 4.0},
            {"trial": "c", "point": "c", "lr": 1e6, "k": 1, "status": "failed"}]
    study = report.write_study(c, str(tmp_path), rows)
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert "objective" in table[0]
    assert float(table[1]["objective"]) == pytest.approx(0.51 * 4 ** -0.07)
    assert study["best"]["point"] == "a"  # 0.51 * 4^-0.07 = 0.462 < 0.50


def test_study_report_with_seeds_groups_and_fits(tmp_path):
    c = tiny_sweep_config()
    c.sweep.update(seeds=2)
    c.sweep.axes = ml_collections.ConfigDict(dict(kind=("a", "b"), size=(1, 2, 3, 4)))
    c.sweep.targets = ml_collections.ConfigDict(dict(kind="model.name", size="model.widen_factor"))
    c.sweep.report.update(group="kind", heatmap=(), x=("gmacs",))
    rows = []
    for kind, (a, b, cc) in (("a", (0.5, 0.5, 0.1)), ("b", (0.6, 0.3, 0.1))):
        for size in (1, 2, 3, 4):
            for seed in (0, 1):
                g = 0.01 * size
                err = a * g ** -0.0 * (size ** -b) + cc + 0.003 * (seed - 0.5)
                rows.append({"trial": f"kind{kind}-size{size}-seed{seed}", "point": f"kind{kind}-size{size}",
                             "kind": kind, "size": size, "seed": seed, "status": "done",
                             "val_top1": 1 - err, "gmacs": g, "params": 1000 * size, "rung": 0})
    study = report.write_study(c, str(tmp_path), rows)
    fits = study["fits"]["gmacs"]
    assert set(fits) == {"a", "b"} and fits["a"]["fit"]["b"] == pytest.approx(0.5, abs=0.1)
    assert fits["a"]["intervals"]["b"][0] < 0.5 < fits["a"]["intervals"]["b"][1]
    assert study["best"]["point"] == "kinda-size4"
    assert "beyond the seed-to-seed noise" in study["best"]["sentence"]
    assert [r["group"] for r in study["best_by_budget"]["gmacs"]] == ["a"] * 4
    text = (tmp_path / "study.md").read_text()
    for part in ("## Conclusion", "## Points", "## Scaling laws", "Frontier against gmacs",
                 "![val_top1_vs_gmacs.png]"):
        assert part in text
    points = list(csv.DictReader(open(tmp_path / "points.csv")))
    assert len(points) == 8 and float(points[0]["std"]) > 0 and float(points[0]["ci_low"]) < float(points[0]["mean"])


@pytest.mark.parametrize("module,preset", [(wrn_grid, "default"), (compare, "default"),
                                           (resolution, "default"), (mobilenet_width, "default"),
                                           (efficientnet_grid, "cifar10"), (efficientnet_family, "default")])
def test_shipped_study_configs_validate(module, preset):
    c = module.get_config(preset)
    assert c.experiment == "sweep"
    if c.data.source != "tfds":
        sweep.validate(c, 8)
        return
    # Validation opens the data; TFDS's mock stands in for a prepared cifar10.
    from scaling.data.tfds_source import import_tfds

    with import_tfds().testing.mock_data(num_examples=20):
        c.data.download = True
        sweep.validate(c, 8)


def test_compute_optimal_winners_are_told_as_runs_of_one_strategy():
    from experiments.report import _winner_runs

    rows = [{"gmacs": b, "group": g} for b, g in
            [(0.1, "compound"), (0.2, "width"), (0.3, "width"), (0.4, "width"), (0.5, "compound")]]
    assert _winner_runs(rows, "gmacs") == [("compound", "at 0.1"), ("width", "from 0.2 to 0.4"),
                                           ("compound", "at 0.5")]
    assert _winner_runs(rows[1:4], "gmacs") == [("width", "from 0.2 to 0.4")]


def test_report_of_a_workdir_that_is_no_sweep_is_a_one_line_error(tmp_path, capsys):
    from scaling import rundir

    for workdir, what in ((tmp_path / "none", "no config.json"), (tmp_path / "train", "a train run")):
        workdir.mkdir()
        if what != "no config.json":
            rundir.write_config(str(workdir), train.get_config("test"))
        with pytest.raises(SystemExit) as exit_info:
            report.main([str(workdir)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == (f"error: {workdir}: not a sweep workdir ({what}); give the "
                                           "--workdir of a launch.py sweep or transfer study.\n")
