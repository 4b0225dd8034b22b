"""scaling.stats: seed summaries, Welch comparisons, Kendall tau, power-law fits, bootstrap,
extrapolation check, Pareto frontier and budget choice. Pure numpy/scipy, a few seconds."""
import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from scaling import stats

GMACS = np.logspace(-4, -1, 8)   # tiny CNNs: 1e-4 .. 1e-1 GMACs
PARAMS = np.logspace(5, 8, 8)    # 1e5 .. 1e8 parameters


def law(x, a, b, c, d=0.0):
    return a * (np.asarray(x, dtype=float) + d) ** (-b) + c


def noisy(x, *, a, b, c, d=0.0, seeds=3, sd=0.002, seed=0):
    """Several seeds per x: (x, y, point id) with gaussian noise of sd on y."""
    rng = np.random.default_rng(seed)
    xs = np.repeat(np.asarray(x, dtype=float), seeds)
    ys = law(xs, a, b, c, d) + rng.normal(0.0, sd, xs.size)
    return xs, ys, np.repeat(np.arange(len(x)), seeds)


# ----------------------------------------------------------------------------- summarize

def test_summarize_by_hand():
    s = stats.summarize([0.324, 0.3145, 0.330])
    mean = (0.324 + 0.3145 + 0.330) / 3
    std = math.sqrt(((0.324 - mean) ** 2 + (0.3145 - mean) ** 2 + (0.330 - mean) ** 2) / 2)
    assert s.n == 3 and s.ci_known
    assert s.mean == pytest.approx(0.3228333, abs=1e-7)
    assert s.std == pytest.approx(std, rel=1e-12) and s.std == pytest.approx(0.0078156, abs=1e-6)
    half = 4.303 * std / math.sqrt(3)  # t_{0.975, 2} from a table
    assert s.ci_low == pytest.approx(mean - half, abs=2e-5)
    assert s.ci_high == pytest.approx(mean + half, abs=2e-5)
    assert json.loads(json.dumps(s.to_dict()))["n"] == 3


def test_summarize_single_seed_and_bad_input():
    s = stats.summarize([0.71])
    assert (s.n, s.mean, s.std, s.ci_known) == (1, 0.71, 0.0, False)
    assert s.ci_low == s.ci_high == 0.71
    with pytest.raises(ValueError, match="values .*non-finite"):
        stats.summarize([0.3, float("nan")])
    with pytest.raises(ValueError, match="values needs at least 1"):
        stats.summarize([])


# ----------------------------------------------------------------------------- compare

def test_compare_separated_is_resolved_and_matches_scipy_welch():
    best = [0.80, 0.812, 0.79, 0.803]
    runner = [0.76, 0.775, 0.745, 0.762, 0.74]
    c = stats.compare(best, runner)
    ref = sps.ttest_ind(best, runner, equal_var=False).confidence_interval(0.95)
    assert c.difference == pytest.approx(np.mean(best) - np.mean(runner))
    assert c.interval == pytest.approx((ref.low, ref.high), rel=1e-9)
    assert c.resolved and c.interval[0] > 0
    text = c.sentence("alpha1-beta1-gamma1.4", "alpha1-beta1.1-gamma1.2")
    assert text == (f"alpha1-beta1-gamma1.4 beats alpha1-beta1.1-gamma1.2 by 0.045 val_top1 (95 % "
                    f"interval of the difference {ref.low:.3f} to {ref.high:.3f}): beyond the "
                    f"seed-to-seed noise.")
    assert json.loads(json.dumps(c.to_dict()))["resolved"] is True


def test_compare_overlapping_is_within_noise():
    c = stats.compare([0.800, 0.815, 0.790], [0.796, 0.808, 0.789])
    assert not c.resolved and c.ci_low < 0 < c.ci_high
    text = c.sentence("a", "b")
    assert "a beats b by 0.004 val_top1" in text
    assert "within the noise; the two are not distinguished by these seeds." in text
    assert "beyond" not in text


def test_compare_identical_seeds_tie():
    cmp = stats.compare([0.1, 0.1], [0.1, 0.1])
    assert not cmp.resolved
    assert cmp.sentence("a", "b") == "a and b tie: every seed of both has the same val_top1."
    assert "beats" in stats.compare([0.2, 0.2], [0.1, 0.1]).sentence("a", "b")


def test_compare_single_seed_cannot_be_judged():
    c = stats.compare([0.81], [0.78, 0.79, 0.77])
    assert c.interval is None and c.ci_low is None and c.df is None and not c.resolved
    text = c.sentence("big", "small")
    assert "cannot be judged" in text and "more seeds" in text and "big has a single seed" in text


def test_compare_lower_is_better():
    c = stats.compare([0.20, 0.21, 0.19], [0.30, 0.31, 0.29], higher_is_better=False)
    assert c.difference == pytest.approx(-0.10) and c.resolved and c.ci_high < 0
    assert "w beats l by 0.100 val_error" in c.sentence("w", "l", "val_error")
    wrong = stats.compare([0.30, 0.31, 0.29], [0.20, 0.21, 0.19], higher_is_better=False)
    assert not wrong.resolved and "in favour of l" in wrong.sentence("w", "l", "val_error")


# ----------------------------------------------------------------------------- kendall_tau

def test_kendall_tau_known_rankings():
    assert stats.kendall_tau([1, 2, 3, 4, 5], [10, 20, 30, 40, 50]) == 1.0
    assert stats.kendall_tau([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == -1.0
    # Pairs of x=[1,2,2,3], y=[1,3,2,2]: 3 concordant, 1 discordant, one tie in x, one in y:
    # tau_b = (3 - 1) / sqrt((6 - 1) * (6 - 1)) = 0.4.
    x, y = [1, 2, 2, 3], [1, 3, 2, 2]
    assert stats.kendall_tau(x, y) == pytest.approx(0.4, abs=1e-12)
    assert stats.kendall_tau(x, y) == pytest.approx(sps.kendalltau(x, y).statistic, abs=1e-12)


def test_kendall_tau_matches_scipy_with_many_ties():
    rng = np.random.default_rng(3)
    x, y = rng.integers(0, 4, 40), rng.integers(0, 5, 40)
    assert stats.kendall_tau(x, y) == pytest.approx(sps.kendalltau(x, y).statistic, abs=1e-12)


def test_kendall_tau_degenerate_inputs():
    assert math.isnan(stats.kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        stats.kendall_tau([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2 items, got 1"):
        stats.kendall_tau([1], [1])


# ----------------------------------------------------------------------------- fit_power_law

def test_fit_recovers_law_on_gmacs_scale():
    x, y, _ = noisy(GMACS, a=0.02, b=0.4, c=0.1, seed=0)
    fit = stats.fit_power_law(x, y, fit_offset=False)
    assert fit.a == pytest.approx(0.02, rel=0.05)
    assert fit.b == pytest.approx(0.4, abs=0.01)
    assert fit.c == pytest.approx(0.1, abs=0.005)
    assert fit.d == 0.0 and not fit.fit_offset
    assert fit.rmse < 0.003 and (fit.n_points, fit.n_distinct_x) == (24, 8)
    # Default rule: 8 distinct x >= 5, so d is fitted; it stays near its true value 0.
    free = stats.fit_power_law(x, y)
    assert free.fit_offset and free.d < 0.05 * GMACS.min()
    assert free.b == pytest.approx(0.4, abs=0.02) and free.c == pytest.approx(0.1, abs=0.01)


def test_fit_recovers_offset_with_six_points():
    x6 = np.logspace(-4, -1, 6)
    x, y, _ = noisy(x6, a=0.02, b=0.5, c=0.1, d=5e-4, seed=1)
    fit = stats.fit_power_law(x, y)
    assert fit.fit_offset
    assert fit.d == pytest.approx(5e-4, rel=0.1)
    assert fit.a == pytest.approx(0.02, rel=0.1)
    assert fit.b == pytest.approx(0.5, abs=0.02)
    assert fit.c == pytest.approx(0.1, abs=0.01)


def test_fit_recovers_law_on_params_scale_and_is_scale_free():
    x, y, _ = noisy(PARAMS, a=25.0, b=0.3, c=0.1, seed=2)
    fit = stats.fit_power_law(x, y, fit_offset=False)
    assert fit.a == pytest.approx(25.0, rel=0.05)
    assert fit.b == pytest.approx(0.3, abs=0.01)
    assert fit.c == pytest.approx(0.1, abs=0.005)
    # Same data in millions of params: same b and c, a rescaled by (1e6) ** b.
    fit_m = stats.fit_power_law(x / 1e6, y, fit_offset=False)
    assert fit_m.b == pytest.approx(fit.b, rel=1e-5) and fit_m.c == pytest.approx(fit.c, abs=1e-6)
    assert fit_m.a == pytest.approx(fit.a * 1e6 ** (-fit.b), rel=1e-4)


def test_three_points_interpolate():
    x, y = [1.0, 2.0, 4.0], [0.5, 0.42, 0.37]
    fit = stats.fit_power_law(x, y)
    assert not fit.fit_offset and fit.rmse < 1e-9
    pred = fit.predict(np.array(x))
    assert isinstance(pred, np.ndarray) and pred.shape == (3,)
    np.testing.assert_allclose(pred, y, atol=1e-9)
    assert json.loads(json.dumps(fit.to_dict()))["n_points"] == 3


def test_fit_input_errors():
    with pytest.raises(ValueError, match="at least 3 distinct x values, got 2"):
        stats.fit_power_law([1, 1, 2, 2], [0.5, 0.51, 0.4, 0.41])
    with pytest.raises(ValueError, match="needs at least 4 distinct x values, got 3"):
        stats.fit_power_law([1, 2, 4], [0.5, 0.42, 0.37], fit_offset=True)
    with pytest.raises(ValueError, match="x must be > 0"):
        stats.fit_power_law([0, 1, 2], [0.5, 0.4, 0.3])
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        stats.fit_power_law([1, 2, 3], [0.5, 0.4])


# ----------------------------------------------------------------------------- bootstrap

@pytest.mark.parametrize("grouped", [False, True])
def test_bootstrap_intervals_cover_truth(grouped):
    x, y, ids = noisy(GMACS, a=0.02, b=0.4, c=0.1, seed=0)
    res = stats.bootstrap_power_law(x, y, n_boot=100, seed=1, fit_offset=False,
                                    groups=ids if grouped else None)
    assert res["method"] == ("grouped" if grouped else "residual")
    assert res["n_ok"] == len(res["samples"]) == 100 and res["n_failed"] == 0
    assert set(res["intervals"]) == {"a", "b", "c"}
    for name, true in (("a", 0.02), ("b", 0.4), ("c", 0.1)):
        lo, hi = res["intervals"][name]
        assert lo < true < hi, (name, lo, hi)
        assert hi - lo > 0
    json.dumps({k: v for k, v in res.items()})
    # The band of the bootstrap curves holds the fitted curve, is narrower than the +-1 sd
    # spread of single seeds (24 points pin the mean curve down), and is near the truth: the
    # pointwise band may miss it at a few x, but not by more than its own width.
    grid = np.logspace(-3.5, -1.5, 5)
    low, high = stats.prediction_band(res["samples"], grid, 0.95)
    fitted = stats.PowerLawFit(**res["fit"]).predict(grid)
    assert np.all((low < fitted) & (fitted < high))
    assert np.all(high - low < 2 * 0.002)
    true = law(grid, 0.02, 0.4, 0.1)
    assert np.all(np.abs(true - (low + high) / 2) < 1.5 * (high - low))


def test_bootstrap_with_offset_reports_d():
    x, y, ids = noisy(np.logspace(-4, -1, 6), a=0.02, b=0.5, c=0.1, d=5e-4, seed=1)
    res = stats.bootstrap_power_law(x, y, n_boot=40, groups=ids)
    assert res["fit_offset"] and set(res["intervals"]) == {"a", "b", "c", "d"}
    lo, hi = res["intervals"]["d"]
    assert 0 < lo < hi


def test_grouped_resampling_keeps_every_x():
    ids = np.repeat(["p0", "p1", "p2"], 4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = stats.grouped_resample_indices(ids, rng)
        assert idx.size == ids.size
        for g in ("p0", "p1", "p2"):
            assert np.sum(ids[idx] == g) == 4
    # Only 3 distinct x: a resample that lost one x could not be fitted, yet all succeed.
    x, y, groups = noisy([1e-3, 1e-2, 1e-1], a=0.02, b=0.4, c=0.1, seeds=4, seed=5)
    res = stats.bootstrap_power_law(x, y, n_boot=30, groups=groups)
    assert res["n_ok"] == 30
    with pytest.raises(ValueError, match="single point"):
        stats.bootstrap_power_law(x, y, n_boot=5, groups=np.arange(x.size))


def test_prediction_band_rejects_bad_samples():
    with pytest.raises(ValueError, match="samples must be a non-empty list"):
        stats.prediction_band([], [1.0, 2.0])


# ----------------------------------------------------------------------------- leave_largest_out

def test_leave_largest_out_on_exact_law_is_accurate():
    x = np.repeat(GMACS[:6], 2)
    y = law(x, 0.02, 0.4, 0.1)
    out = stats.leave_largest_out(x, y, fit_offset=False)
    assert out["reason"] is None
    assert out["x"] == GMACS[5] and out["n_fit_points"] == 10 and out["n_fit_x"] == 5
    assert out["observed_mean"] == pytest.approx(law(GMACS[5], 0.02, 0.4, 0.1))
    assert out["abs_error"] < 1e-5


def test_leave_largest_out_catches_a_broken_trend():
    y = law(GMACS, 0.02, 0.4, 0.1)
    y[-1] = 0.5  # the largest model is far worse than the trend says
    out = stats.leave_largest_out(GMACS, y)
    assert out["abs_error"] > 0.3
    assert out["predicted"] == pytest.approx(law(GMACS[-1], 0.02, 0.4, 0.1), abs=0.01)


def test_leave_largest_out_with_too_few_points():
    out = stats.leave_largest_out([1.0, 2.0, 4.0, 4.0], [0.5, 0.42, 0.37, 0.38])
    assert out["predicted"] is None and out["abs_error"] is None and out["fit"] is None
    assert "only 2 distinct x" in out["reason"]
    assert out["observed_mean"] == pytest.approx(0.375) and out["n_fit_points"] == 2


# ----------------------------------------------------------------------------- frontier, budgets

def test_pareto_frontier():
    pts = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.45), (3.0, 0.42), (0.5, 0.6), (4.0, 0.3), (5.0, 0.3)]
    # (2, .45): same cost as (2, .4); (3, .42): costs more than (2, .4) and is worse;
    # (5, .3): costs more than (4, .3) without being better.
    assert stats.pareto_frontier(pts) == [4, 0, 1, 5]
    assert stats.pareto_frontier([(1.0, 0.5), (1.0, 0.5)]) == [0, 1]  # duplicates both survive
    assert stats.pareto_frontier([]) == []
    with pytest.raises(ValueError, match="non-finite values at index \\[1\\]"):
        stats.pareto_frontier([(1.0, 0.5), (2.0, float("nan"))])


def test_best_by_budget():
    def fit(a, c):
        return stats.PowerLawFit(a=a, b=0.5, c=c, d=0.0, n_points=5, n_distinct_x=5,
                                 fit_offset=False, rmse=0.0)
    # small: 0.5 / sqrt(x) + 0.3, large: 1 / sqrt(x) + 0.1; they cross at x = 6.25.
    fits = {"small": fit(0.5, 0.3), "large": fit(1.0, 0.1)}
    got = stats.best_by_budget(fits, [1.0, 4.0, 100.0])
    assert [(b, n) for b, n, _ in got] == [(1.0, "small"), (4.0, "small"), (100.0, "large")]
    assert [e for _, _, e in got] == pytest.approx([0.8, 0.55, 0.2])
    with pytest.raises(ValueError, match="fits is empty"):
        stats.best_by_budget({}, [1.0])
    with pytest.raises(ValueError, match="budgets must be > 0"):
        stats.best_by_budget(fits, [0.0])
