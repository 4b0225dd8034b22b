"""Compound model scaling (Tan & Le 2019, EfficientNet): rounding rules and coefficients.

A network is scaled by a depth multiplier d, a width multiplier w and an input resolution
factor r. Compound scaling ties all three to one exponent phi:

    d = alpha ** phi,   w = beta ** phi,   r = gamma ** phi,
    alpha * beta ** 2 * gamma ** 2 ~= 2,   alpha, beta, gamma >= 1,

so FLOPs grow by about 2 ** phi (FLOPs are linear in depth and quadratic in width and
resolution). The paper's grid search on B0 found alpha = 1.2, beta = 1.1, gamma = 1.15.
The released B1-B7 were then hand-tuned: `EFFICIENTNET_PARAMS` is their table, not
`compound_coefficients(phi, 1.2, 1.1, 1.15)`.

Channel and repeat rounding follow the official TensorFlow code (also torchvision and timm):
`round_filters` rounds `channels * width` to the nearest multiple of 8 (at least 8) and
adds 8 if that lost more than 10 %; `round_repeats` takes the ceiling of `repeats * depth`.
Products are first snapped to 1e-9, so that an exact product is not pushed across a
rounding boundary by floating-point error (2.2 * 25 -> 55 repeats, where a plain
`ceil(2.2 * 25)` gives 56); for every B0-B7 value the result is the reference's.
"""
from __future__ import annotations

import math
from typing import NamedTuple

# The compound coefficients found by the paper's grid search at phi = 1.
PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA = 1.2, 1.1, 1.15


class EfficientNetParams(NamedTuple):
    width: float        # width coefficient (channel multiplier)
    depth: float        # depth coefficient (repeat multiplier)
    resolution: int     # input resolution, pixels
    dropout: float      # dropout before the classifier


# The official B0-B7 table (width, depth, resolution, dropout).
EFFICIENTNET_PARAMS: dict[str, EfficientNetParams] = {
    "b0": EfficientNetParams(1.0, 1.0, 224, 0.2),
    "b1": EfficientNetParams(1.0, 1.1, 240, 0.2),
    "b2": EfficientNetParams(1.1, 1.2, 260, 0.3),
    "b3": EfficientNetParams(1.2, 1.4, 300, 0.3),
    "b4": EfficientNetParams(1.4, 1.8, 380, 0.4),
    "b5": EfficientNetParams(1.6, 2.2, 456, 0.4),
    "b6": EfficientNetParams(1.8, 2.6, 528, 0.5),
    "b7": EfficientNetParams(2.0, 3.1, 600, 0.5),
}


class CompoundCoefficients(NamedTuple):
    depth: float              # alpha ** phi
    width: float              # beta ** phi
    resolution_factor: float  # gamma ** phi


def _snap(x: float) -> float:
    return round(x, 9)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}: must be > 0, got {value!r}.")


def round_filters(channels: int, width: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Channels after width scaling: `channels * width` rounded to the nearest multiple of
    `divisor` (halves round up), at least `min_value` (default `divisor`), plus `divisor`
    if rounding went below 90 % of `channels * width`.

    round_filters(32, 1.1) == 32, round_filters(32, 2.0) == 64, round_filters(1280, 1.4) == 1792,
    round_filters(20, 0.5) == 16 (10 -> 8 is below 90 %, so 8 + 8).
    """
    _positive("width", width)
    if divisor < 1:
        raise ValueError(f"divisor: must be a positive integer, got {divisor!r}.")
    v = _snap(channels * width)
    min_value = divisor if min_value is None else min_value
    new = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return int(new)


def round_repeats(repeats: int, depth: float) -> int:
    """Blocks in a stage after depth scaling: ceil(depth * repeats)."""
    _positive("depth", depth)
    return int(math.ceil(_snap(depth * repeats)))


def scaled_resolution(base: int, factor: float, divisor: int = 1, *, phi: float = 1.0) -> int:
    """`base * factor ** phi` rounded to the nearest multiple of `divisor` (halves up), at
    least `divisor`. Pass the resolution factor (gamma ** phi) as `factor`, or gamma as
    `factor` with `phi`: scaled_resolution(224, 1.15, phi=2) == scaled_resolution(224, 1.3225).
    """
    _positive("resolution factor", factor)
    if base < 1 or divisor < 1:
        raise ValueError(f"resolution: base ({base!r}) and divisor ({divisor!r}) must be positive integers.")
    r = _snap(base * factor ** phi)
    return max(divisor, int(math.floor(r / divisor + 0.5)) * divisor)


def compound_coefficients(phi: float, alpha: float = PAPER_ALPHA, beta: float = PAPER_BETA,
                          gamma: float = PAPER_GAMMA) -> CompoundCoefficients:
    """(depth, width, resolution_factor) = (alpha ** phi, beta ** phi, gamma ** phi).

    phi may be negative (or fractional) to scale a baseline down.
    """
    for name, value in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        _positive(name, value)
    return CompoundCoefficients(alpha ** phi, beta ** phi, gamma ** phi)


def flops_factor(alpha: float, beta: float, gamma: float) -> float:
    """FLOPs multiplier of one unit of phi: alpha * beta ** 2 * gamma ** 2 (the paper's
    coefficients give 1.92; FLOPs then grow by flops_factor ** phi)."""
    return alpha * beta ** 2 * gamma ** 2


def check_constraint(alpha: float, beta: float, gamma: float, target: float = 2.0,
                     tol: float = 0.1, *, prefix: str = "") -> float:
    """Validates the compound-scaling constraint and returns alpha * beta^2 * gamma^2.

    Raises ValueError naming the offending field (`prefix + 'alpha'`, ...) when a
    coefficient is below 1 (scaling would shrink that dimension) or when the product is
    further than `tol` from `target`. The default tolerance admits the paper's 1.92.
    """
    values = {"alpha": alpha, "beta": beta, "gamma": gamma}
    for name, value in values.items():
        if not value >= 1.0:
            raise ValueError(f"{prefix}{name}: compound scaling needs alpha, beta, gamma >= 1, "
                             f"got {name}={value!r}.")
    if tol < 0:
        raise ValueError(f"{prefix}tol: must be >= 0, got {tol!r}.")
    product = flops_factor(alpha, beta, gamma)
    if abs(product - target) > tol:
        fields = ", ".join(prefix + n for n in values)
        raise ValueError(f"{fields}: alpha * beta^2 * gamma^2 = {product:.4f} with alpha={alpha}, "
                         f"beta={beta}, gamma={gamma}; it must be within {tol} of {target} "
                         f"(allowed: {target - tol:.4g} to {target + tol:.4g}; the paper's "
                         f"{PAPER_ALPHA}, {PAPER_BETA}, {PAPER_GAMMA} give "
                         f"{flops_factor(PAPER_ALPHA, PAPER_BETA, PAPER_GAMMA):.4f}).")
    return product
