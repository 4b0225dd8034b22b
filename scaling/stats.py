"""Statistics for scaling studies: seed summaries, comparisons, rank agreement, scaling-law fits.

The experiment layer runs each point of a study with several seeds and then asks: how noisy is
a point, does the best configuration really beat the runner-up, do two rankings agree, and how
does error fall with compute. This module answers those questions from plain lists/arrays; it
knows nothing about grids, trials or files.

  summarize(values)                 mean, sample std and Student-t interval of one point's seeds
  compare(best, runner_up)          Welch interval of a difference of means, and a sentence
  kendall_tau(x, y)                 Kendall's tau-b between two rankings (ties handled)
  fit_power_law(x, y)               error(x) = a * (x + d) ** (-b) + c, bounded least squares
  bootstrap_power_law(x, y)         percentile intervals for a, b, c (d) by refitting resamples
  prediction_band(samples, x_grid)  pointwise band of the bootstrap fits over a grid
  leave_largest_out(x, y)           fit without the largest x, predict it: a test of extrapolation
  pareto_frontier(points)           indices of (cost, error) pairs that nothing dominates
  best_by_budget(fits, budgets)     which fitted law predicts the lowest error at each budget

Conventions
  * Inputs are 1-D sequences of finite floats; NaN or inf (e.g. a diverged seed) is a
    ValueError, so drop failed runs before calling. Errors name the argument and the fix.
  * Intervals are two-sided at `level` (0.95 unless told). The std is the sample std (ddof=1).
  * Results are frozen dataclasses with `to_dict()` giving plain Python values for JSON.
  * Power laws: x > 0 is the cost (GMACs, params, ...), y the error (lower is better), and the
    constraints are a > 0, 0 < b <= MAX_EXPONENT, 0 <= c <= min(y) (c = 0 when min(y) <= 0),
    0 <= d <= MAX_OFFSET_FACTOR * max(x). The offset d is fitted by default only with at
    least MIN_DISTINCT_X_FOR_OFFSET distinct x values (d = 0 otherwise); a fit needs at least
    MIN_DISTINCT_X distinct x. Several seeds at one x are simply repeated points. Fitting is
    done on x divided by its geometric mean and y divided by max|y|, so the same code serves
    1e-4 GMACs and 1e9 params; the reported parameters are in the caller's units. Starting
    points come from a grid over b (and d) on which a and c are solved exactly (the law is
    linear in them); the lowest few local minima are polished with bounded
    scipy.optimize.least_squares and the best is kept.
  * With exactly 3 distinct x and 3 free parameters (a, b, c) the law passes through the
    points (rmse ~ 0 when they are single values): the fit is then a description, not evidence.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import optimize
from scipy import stats as _sps

MIN_DISTINCT_X = 3
MIN_DISTINCT_X_FOR_OFFSET = 5
MAX_EXPONENT = 10.0
MAX_OFFSET_FACTOR = 10.0

# Starting points of the multi-start fit (normalised units: x / geomean(x), y / max|y|).
_B_GRID = tuple(np.geomspace(0.02, 5.0, 25))
_N_STARTS = 3  # polished starts per fit; bootstrap refits use 1 plus the full fit's solution
_A_MIN = 1e-12
_B_MIN = 1e-6


# ----------------------------------------------------------------------------- validation

def _as_1d(values: Any, name: str, *, min_len: int = 1) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of numbers ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {arr.shape}; "
                         "pass a flat list")
    if arr.size < min_len:
        raise ValueError(f"{name} needs at least {min_len} value(s), got {arr.size}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"{name} holds {bad.size} non-finite value(s) (NaN/inf) at index "
                         f"{bad[:5].tolist()}; drop failed runs before calling")
    return arr


def _check_level(level: float) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level}")
    return level


def _xy(x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = _as_1d(x, "x")
    y = _as_1d(y, "y")
    if x.size != y.size:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    if np.any(x <= 0):
        raise ValueError(f"x must be > 0 (a cost such as GMACs or params), got min {x.min():g}")
    return x, y


# ----------------------------------------------------------------------------- seeds of one point

@dataclass(frozen=True)
class Summary:
    """Mean and spread of one point's seeds; the interval is for the mean (Student t)."""
    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    ci_known: bool
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(values: Sequence[float], *, level: float = 0.95) -> Summary:
    """n, mean, sample std (ddof=1) and the `level` Student-t interval of the mean.

    With one value the std is 0.0, the interval collapses to the mean and `ci_known` is False.
    """
    v = _as_1d(values, "values")
    level = _check_level(level)
    n = int(v.size)
    mean = float(v.mean())
    if n == 1:
        return Summary(n=1, mean=mean, std=0.0, ci_low=mean, ci_high=mean, ci_known=False,
                       level=level)
    std = float(v.std(ddof=1))
    half = float(_sps.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Summary(n=n, mean=mean, std=std, ci_low=mean - half, ci_high=mean + half,
                   ci_known=True, level=level)


# ----------------------------------------------------------------------------- best vs runner-up

@dataclass(frozen=True)
class Comparison:
    """Best minus runner-up, with a Welch interval of the difference of means.

    `difference` is always mean(best) - mean(runner_up). `resolved` is True when the interval
    lies entirely on the side where the best is better: ci_low > 0 when higher is better,
    ci_high < 0 when lower is better. With a single seed on either side the interval is None
    (ci_low, ci_high, df are None) and `resolved` is False.
    """
    difference: float
    ci_low: float | None
    ci_high: float | None
    df: float | None
    resolved: bool
    level: float
    n_best: int
    n_runner_up: int
    mean_best: float
    mean_runner_up: float
    higher_is_better: bool = True

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_low, self.ci_high)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self, best_name: str, runner_name: str, metric: str = "val_top1",
                 *, digits: int = 3) -> str:
        """One plain sentence: does `best_name` beat `runner_name` beyond the seed noise?

        The margin and its interval are quoted as an advantage of the best (positive = better),
        i.e. best - runner-up for a higher-is-better metric and runner-up - best otherwise.
        """
        pct = f"{self.level * 100:g} %"
        sign = 1.0 if self.higher_is_better else -1.0
        margin = sign * self.difference
        if self.interval is None:
            single = [name for name, n in ((best_name, self.n_best),
                                           (runner_name, self.n_runner_up)) if n < 2]
            who = " and ".join(single)
            return (f"{best_name} vs {runner_name}: a margin of {margin:+.{digits}f} {metric} "
                    f"cannot be judged (no {pct} interval: {who} "
                    f"{'have' if len(single) > 1 else 'has'} a single seed); more seeds "
                    f"are needed, at least 2 on each side, to tell it from the seed-to-seed noise.")
        lo, hi = sorted((sign * self.ci_low, sign * self.ci_high))
        if margin == 0 and lo == hi == 0:  # every seed of both the same value
            return (f"{best_name} and {runner_name} tie: every seed of both has the same "
                    f"{metric}.")
        if margin >= 0:
            head = f"{best_name} beats {runner_name} by {margin:.{digits}f} {metric}"
        else:
            head = f"{best_name} trails {runner_name} by {-margin:.{digits}f} {metric}"
        head += f" ({pct} interval of the difference {lo:.{digits}f} to {hi:.{digits}f})"
        if lo > 0:
            return head + ": beyond the seed-to-seed noise."
        if hi < 0:
            return head + f": beyond the seed-to-seed noise, in favour of {runner_name}."
        return head + ": within the noise; the two are not distinguished by these seeds."


def compare(best_values: Sequence[float], runner_up_values: Sequence[float],
            level: float = 0.95, *, higher_is_better: bool = True) -> Comparison:
    """Welch comparison of two sets of seeds (unequal variances, Welch-Satterthwaite df).

    If both sides have zero spread the interval collapses to the difference itself (df = inf).
    """
    b = _as_1d(best_values, "best_values")
    r = _as_1d(runner_up_values, "runner_up_values")
    level = _check_level(level)
    diff = float(b.mean() - r.mean())
    common = dict(difference=diff, level=level, n_best=int(b.size), n_runner_up=int(r.size),
                  mean_best=float(b.mean()), mean_runner_up=float(r.mean()),
                  higher_is_better=bool(higher_is_better))
    if b.size < 2 or r.size < 2:
        return Comparison(ci_low=None, ci_high=None, df=None, resolved=False, **common)
    vb = float(b.var(ddof=1)) / b.size
    vr = float(r.var(ddof=1)) / r.size
    se2 = vb + vr
    if se2 == 0.0:
        lo = hi = diff
        df = math.inf
    else:
        df = se2 ** 2 / (vb ** 2 / (b.size - 1) + vr ** 2 / (r.size - 1))
        half = float(_sps.t.ppf(0.5 + level / 2, df)) * math.sqrt(se2)
        lo, hi = diff - half, diff + half
    resolved = lo > 0 if higher_is_better else hi < 0
    return Comparison(ci_low=lo, ci_high=hi, df=float(df), resolved=bool(resolved), **common)


# ----------------------------------------------------------------------------- rank agreement

def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) / sqrt((n0 - ties_x) (n0 - ties_y)).

    n0 = n (n - 1) / 2 pairs; a pair tied in x (or y) counts in ties_x (ties_y) and is neither
    concordant nor discordant. Returns nan when x or y is constant. O(n^2) time and memory.
    """
    xa = _as_1d(x, "x")
    ya = _as_1d(y, "y")
    if xa.size != ya.size:
        raise ValueError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    if xa.size < 2:
        raise ValueError(f"kendall_tau needs at least 2 items, got {xa.size}")
    iu = np.triu_indices(xa.size, k=1)
    sx = np.sign(xa[:, None] - xa[None, :])[iu]
    sy = np.sign(ya[:, None] - ya[None, :])[iu]
    n0 = sx.size
    ties_x = int(np.count_nonzero(sx == 0))
    ties_y = int(np.count_nonzero(sy == 0))
    denom = (n0 - ties_x) * (n0 - ties_y)
    if denom == 0:
        return math.nan
    return float(np.sum(sx * sy) / math.sqrt(denom))


# ----------------------------------------------------------------------------- power law

@dataclass(frozen=True)
class PowerLawFit:
    """error(x) = a * (x + d) ** (-b) + c, in the caller's units of x and y."""
    a: float
    b: float
    c: float
    d: float
    n_points: int
    n_distinct_x: int
    fit_offset: bool
    rmse: float

    @property
    def params(self) -> tuple[float, float, float, float]:
        return (self.a, self.b, self.c, self.d)

    def predict(self, x: Any) -> np.ndarray:
        return _power_law(np.asarray(x, dtype=float), *self.params)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _power_law(x: np.ndarray, a: float, b: float, c: float, d: float) -> np.ndarray:
    with np.errstate(divide="ignore", over="ignore"):
        return a * (x + d) ** (-b) + c


@dataclass(frozen=True)
class _Scales:
    x: float  # geometric mean of x
    y: float  # max |y| (1 when y is all zero)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray) -> _Scales:
        ymax = float(np.max(np.abs(y)))
        return cls(x=float(np.exp(np.mean(np.log(x)))), y=ymax if ymax > 0 else 1.0)

    def to_normalized(self, a: float, b: float, c: float, d: float) -> np.ndarray:
        return np.array([a * self.x ** (-b) / self.y, b, c / self.y, d / self.x])

    def from_normalized(self, p: np.ndarray) -> tuple[float, float, float, float]:
        A, b, C, D = (float(v) for v in p)
        return (A * self.y * self.x ** b, b, C * self.y, D * self.x)


def _distinct_x_check(x: np.ndarray, fit_offset: bool | None) -> tuple[int, bool]:
    k = int(np.unique(x).size)
    if k < MIN_DISTINCT_X:
        raise ValueError(f"a power-law fit needs at least {MIN_DISTINCT_X} distinct x values, "
                         f"got {k}; add points at other costs")
    if fit_offset is None:
        fit_offset = k >= MIN_DISTINCT_X_FOR_OFFSET
    elif fit_offset and k < 4:
        raise ValueError(f"fit_offset=True fits 4 parameters and needs at least 4 distinct x "
                         f"values, got {k}; pass fit_offset=False")
    return k, bool(fit_offset)


def _linear_part(z: np.ndarray, yn: np.ndarray,
                 c_max: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of z = (xn + D) ** -b (shape (..., n)): the best A >= _A_MIN and
    0 <= C <= max(c_max, 0) of A * z + C ~ yn. Returns (cost, A, C), each of shape (...).

    A convex two-variable box problem: the optimum is the unconstrained one when it is
    feasible, else the best of the edge optima, so trying all of them and keeping the
    cheapest feasible one is exact.
    """
    n = yn.size
    zz = np.sum(z * z, axis=-1)
    zy = z @ yn
    zs = np.sum(z, axis=-1)
    zero = np.zeros_like(zz)
    cands = [(np.maximum(zy / zz, _A_MIN), zero)]  # C = 0
    if c_max > 0:
        zm, ym = zs / n, float(yn.mean())
        var_z = zz / n - zm * zm
        with np.errstate(divide="ignore", invalid="ignore"):
            A_free = np.where(var_z > 0, (zy / n - zm * ym) / var_z, np.nan)
        cands.append((A_free, ym - A_free * zm))  # interior
        cands.append((np.maximum((zy - c_max * zs) / zz, _A_MIN), zero + c_max))  # C = c_max
        cands.append((zero + _A_MIN, np.clip(ym - _A_MIN * zm, 0.0, c_max)))  # A = _A_MIN
    c_hi = max(c_max, 0.0)
    best_cost = np.full(zz.shape, np.inf)
    best_A, best_C = zero + _A_MIN, zero.copy()
    for A, C in cands:
        with np.errstate(invalid="ignore", over="ignore"):
            cost = np.sum((A[..., None] * z + C[..., None] - yn) ** 2, axis=-1)
            ok = (A >= _A_MIN) & (C >= 0) & (C <= c_hi) & np.isfinite(cost) & (cost < best_cost)
        best_cost = np.where(ok, cost, best_cost)
        best_A = np.where(ok, A, best_A)
        best_C = np.where(ok, C, best_C)
    return best_cost, best_A, best_C


def _screened_starts(xn: np.ndarray, yn: np.ndarray, fit_offset: bool,
                     k: int) -> list[np.ndarray]:
    """Up to k starts: the lowest local minima of the cost profiled over a (b, D) grid.

    For each (b, D) on the grid, A and C are solved exactly (the model is linear in them), so
    the grid covers c without enumerating it; least_squares then polishes the best candidates.
    """
    ds = np.zeros(1)
    if fit_offset:
        ds = np.concatenate([ds, np.geomspace(0.1 * float(xn.min()), float(xn.max()), 7)])
    bs = np.asarray(_B_GRID)
    with np.errstate(over="ignore"):
        z = (xn[None, None, :] + ds[None, :, None]) ** (-bs[:, None, None])
    cost, A, C = _linear_part(z, yn, float(yn.min()))
    padded = np.pad(cost, 1, constant_values=np.inf)
    centre = padded[1:-1, 1:-1]
    is_min = ((centre <= padded[:-2, 1:-1]) & (centre <= padded[2:, 1:-1])
              & (centre <= padded[1:-1, :-2]) & (centre <= padded[1:-1, 2:]) & np.isfinite(centre))
    minima = sorted(zip(*np.nonzero(is_min)), key=lambda ij: cost[ij])[:k]
    return [np.array([A[i, j], bs[i], C[i, j], ds[j]]) for i, j in minima]


def _solve(xn: np.ndarray, yn: np.ndarray, fit_offset: bool,
           starts: Iterable[np.ndarray]) -> np.ndarray:
    """Best bounded least-squares fit over the starts, in normalised units; (A, b, C, D)."""
    c_max = float(yn.min())
    free = [0, 1] + ([2] if c_max > 0 else []) + ([3] if fit_offset else [])
    lb = np.array([_A_MIN, _B_MIN, 0.0, 0.0])[free]
    ub = np.array([np.inf, MAX_EXPONENT, c_max, MAX_OFFSET_FACTOR * float(xn.max())])[free]
    fixed = np.zeros(4)

    def full(q: np.ndarray) -> np.ndarray:
        p = fixed.copy()
        p[free] = q
        return p

    def residuals(q: np.ndarray) -> np.ndarray:
        A, b, C, D = full(q)
        with np.errstate(over="ignore", invalid="ignore"):
            return A * (xn + D) ** (-b) + C - yn

    def jacobian(q: np.ndarray) -> np.ndarray:
        A, b, C, D = full(q)
        u = xn + D
        with np.errstate(over="ignore", invalid="ignore"):
            z = u ** (-b)
            cols = np.stack([z, -A * z * np.log(u), np.ones_like(u), -b * A * z / u], axis=1)
        return cols[:, free]

    best, best_cost = None, math.inf
    for p0 in starts:
        q0 = np.clip(np.asarray(p0, dtype=float)[free], lb, ub)
        try:
            res = optimize.least_squares(residuals, q0, jac=jacobian, bounds=(lb, ub),
                                         method="trf", x_scale="jac")
        except (ValueError, FloatingPointError, np.linalg.LinAlgError):
            continue
        if res.status > 0 and np.all(np.isfinite(res.x)) and res.cost < best_cost:
            best, best_cost = full(res.x), float(res.cost)
    if best is None:
        raise RuntimeError("the power-law fit did not converge from any starting point; "
                           "check that y decreases with x")
    return best


def _fit_scaled(x: np.ndarray, y: np.ndarray, fit_offset: bool | None, scales: _Scales,
                extra_starts: Sequence[np.ndarray] = (), n_starts: int = _N_STARTS) -> PowerLawFit:
    k, fit_offset = _distinct_x_check(x, fit_offset)
    xn, yn = x / scales.x, y / scales.y
    starts = list(extra_starts) + _screened_starts(xn, yn, fit_offset, n_starts)
    a, b, c, d = scales.from_normalized(_solve(xn, yn, fit_offset, starts))
    rmse = float(np.sqrt(np.mean((_power_law(x, a, b, c, d) - y) ** 2)))
    return PowerLawFit(a=a, b=b, c=c, d=d, n_points=int(x.size), n_distinct_x=k,
                       fit_offset=fit_offset, rmse=rmse)


def fit_power_law(x: Sequence[float], y: Sequence[float], *,
                  fit_offset: bool | None = None) -> PowerLawFit:
    """Fits error(x) = a * (x + d) ** (-b) + c by bounded least squares from many starts.

    x > 0 is the cost, y the error; repeated x (seeds of one point) are allowed and weigh as
    separate points. fit_offset=None fits d only with >= 5 distinct x values (else d = 0);
    True needs >= 4. At least 3 distinct x are required (ValueError naming the count). With
    3 free parameters and 3 distinct x the law interpolates the point means.
    """
    x, y = _xy(x, y)
    return _fit_scaled(x, y, fit_offset, _Scales.of(x, y))


def grouped_resample_indices(groups: Sequence[Any], rng: np.random.Generator) -> np.ndarray:
    """Indices resampled with replacement inside each group; every group keeps its size."""
    g = np.asarray(groups)
    parts = []
    for label in dict.fromkeys(g.tolist()):
        members = np.flatnonzero(g == label)
        parts.append(rng.choice(members, size=members.size, replace=True))
    return np.concatenate(parts)


def bootstrap_power_law(x: Sequence[float], y: Sequence[float], *, n_boot: int = 200,
                        seed: int = 0, level: float = 0.95, groups: Sequence[Any] | None = None,
                        fit_offset: bool | None = None) -> dict[str, Any]:
    """Percentile bootstrap of the power-law parameters.

    groups=None: residual bootstrap; the fitted curve plus centred residuals drawn with
    replacement, inflated by sqrt(n / (n - p)) for the p fitted parameters. (With a fit that
    interpolates, the residuals are ~0 and so are the intervals.)
    groups given (one label per point, e.g. the point id shared by its seeds): the points of
    each group are resampled with replacement inside the group, so every x stays present.
    Whether d is fitted is decided once, on the full data, and kept for every resample.
    Percentile intervals are unreliable for a parameter sitting on its bound (d ~ 0, or
    c ~ 0 or ~ min(y)): they then tend to exclude the bound; pass fit_offset=False when the
    data show no sign of an offset.

    Returns {"fit", "method", "fit_offset", "level", "n_boot", "n_ok", "n_failed",
    "intervals": {"a": (lo, hi), "b", "c"[, "d"]}, "samples": [(a, b, c, d), ...]}; resamples
    whose fit fails are skipped and counted in n_failed. With n_ok == 0 the intervals are None.
    Use `prediction_band(result["samples"], x_grid, level)` for a band around the curve.
    """
    x, y = _xy(x, y)
    level = _check_level(level)
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    scales = _Scales.of(x, y)
    base = _fit_scaled(x, y, fit_offset, scales)
    warm = [scales.to_normalized(*base.params)]
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups)
        if g.ndim != 1 or g.size != x.size:
            raise ValueError(f"groups must give one label per point ({x.size}), got shape "
                             f"{g.shape}")
        if np.unique(g).size == g.size:
            raise ValueError("every group holds a single point, so resampling within groups "
                             "changes nothing; pass groups=None for a residual bootstrap")
        method = "grouped"
    else:
        method = "residual"
        fitted = base.predict(x)
        resid = y - fitted
        n_params = 2 + int(y.min() > 0) + int(base.fit_offset)
        inflate = math.sqrt(x.size / (x.size - n_params)) if x.size > n_params else 1.0
        resid = (resid - resid.mean()) * inflate

    samples: list[tuple[float, float, float, float]] = []
    n_failed = 0
    for _ in range(int(n_boot)):
        if groups is not None:
            idx = grouped_resample_indices(g, rng)
            xb, yb = x[idx], y[idx]
        else:
            xb, yb = x, fitted + rng.choice(resid, size=resid.size, replace=True)
        try:
            fit = _fit_scaled(xb, yb, base.fit_offset, scales, extra_starts=warm, n_starts=1)
        except (ValueError, RuntimeError):
            n_failed += 1
            continue
        samples.append(fit.params)

    names = ["a", "b", "c"] + (["d"] if base.fit_offset else [])
    if samples:
        arr = np.array(samples)
        q = [0.5 - level / 2, 0.5 + level / 2]
        intervals = {n: tuple(float(v) for v in np.quantile(arr[:, i], q))
                     for i, n in enumerate(names)}
    else:
        intervals = {n: None for n in names}
    return {"fit": base.to_dict(), "method": method, "fit_offset": base.fit_offset,
            "level": level, "n_boot": int(n_boot), "n_ok": len(samples), "n_failed": n_failed,
            "intervals": intervals, "samples": samples}


def prediction_band(samples: Sequence[Sequence[float]], x_grid: Sequence[float],
                    level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise percentile band (low, high) of the bootstrap curves over x_grid."""
    level = _check_level(level)
    s = np.asarray(samples, dtype=float)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] != 4:
        raise ValueError(f"samples must be a non-empty list of (a, b, c, d), got shape {s.shape}; "
                         "pass bootstrap_power_law(...)['samples']")
    xg = _as_1d(x_grid, "x_grid")
    a, b, c, d = (s[:, i:i + 1] for i in range(4))
    curves = _power_law(xg[None, :], a, b, c, d)
    low, high = np.quantile(curves, [0.5 - level / 2, 0.5 + level / 2], axis=0)
    return low, high


def leave_largest_out(x: Sequence[float], y: Sequence[float], **fit_kw: Any) -> dict[str, Any]:
    """Fits without every point at the largest x and predicts that x: an extrapolation check.

    Returns {"x", "predicted", "observed_mean", "abs_error", "n_fit_points", "n_fit_x", "fit",
    "reason"}; n_fit_points counts the points (seeds included) used in the fit. When the
    remaining points cannot be fitted (fewer than 3 distinct x, or no convergence) predicted,
    abs_error and fit are None and "reason" says why; otherwise reason is None. `fit_kw` goes
    to fit_power_law, whose default d rule applies to the remaining points.
    """
    x, y = _xy(x, y)
    held = x == x.max()
    xr, yr = x[~held], y[~held]
    out: dict[str, Any] = {"x": float(x.max()), "predicted": None,
                           "observed_mean": float(y[held].mean()), "abs_error": None,
                           "n_fit_points": int(xr.size), "n_fit_x": int(np.unique(xr).size),
                           "fit": None, "reason": None}
    if out["n_fit_x"] < MIN_DISTINCT_X:
        out["reason"] = (f"only {out['n_fit_x']} distinct x remain without the largest; a fit "
                         f"needs {MIN_DISTINCT_X}")
        return out
    try:
        fit = fit_power_law(xr, yr, **fit_kw)
    except (ValueError, RuntimeError) as e:
        out["reason"] = str(e)
        return out
    pred = float(fit.predict(out["x"]))
    out.update(predicted=pred, abs_error=abs(pred - out["observed_mean"]), fit=fit.to_dict())
    return out


# ----------------------------------------------------------------------------- frontier, budgets

def pareto_frontier(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the (cost, error) points no other point dominates, sorted by cost.

    q is dominated when some p has cost_p <= cost_q and error_p < error_q; so at equal cost
    only the lowest error survives, and exact duplicates on the frontier are all kept.
    """
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return []
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must be (cost, error) pairs, got shape {pts.shape}")
    bad = np.flatnonzero(~np.all(np.isfinite(pts), axis=1))
    if bad.size:
        raise ValueError(f"points holds non-finite values at index {bad[:5].tolist()}; "
                         "drop failed trials first")
    order = np.lexsort((np.arange(len(pts)), pts[:, 1], pts[:, 0]))
    keep: list[int] = []
    best_err, best_cost = math.inf, math.nan
    for i in order:
        cost, err = pts[i]
        if err < best_err:
            keep.append(int(i))
            best_err, best_cost = err, cost
        elif err == best_err and cost == best_cost:
            keep.append(int(i))
    return keep


def best_by_budget(fits: Mapping[str, PowerLawFit],
                   budgets: Sequence[float]) -> list[tuple[float, str, float]]:
    """For each budget, (budget, name of the fit predicting the lowest error, that error).

    Ties go to the first name in `fits` order. Predictions beyond a fit's largest x are
    extrapolations; check them with leave_largest_out.
    """
    if not fits:
        raise ValueError("fits is empty; pass {name: fit_power_law(...)} for each family")
    b = _as_1d(budgets, "budgets")
    if np.any(b <= 0):
        raise ValueError(f"budgets must be > 0 (in the fits' x units), got min {b.min():g}")
    names = list(fits)
    preds = np.stack([np.asarray(fits[n].predict(b), dtype=float) for n in names])
    win = np.argmin(preds, axis=0)
    return [(float(b[j]), names[w], float(preds[w, j])) for j, w in enumerate(win)]
