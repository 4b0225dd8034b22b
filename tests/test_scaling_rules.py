"""Compound-scaling rules: rounding against the official formulas and published channel counts,
coefficients, and the alpha * beta^2 * gamma^2 constraint."""
import math

import pytest

from scaling import scaling_rules as sr

B0_CHANNELS = (32, 16, 24, 40, 80, 112, 192, 320, 1280)
B0_REPEATS = (1, 2, 2, 3, 3, 4, 1)


def official_round_filters(filters, multiplier, divisor=8):
    """The TF reference (efficientnet_model.round_filters), kept literal as the oracle."""
    filters *= multiplier
    new_filters = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new_filters < 0.9 * filters:
        new_filters += divisor
    return int(new_filters)


def test_params_table_is_the_official_one():
    assert {k: tuple(v) for k, v in sr.EFFICIENTNET_PARAMS.items()} == {
        "b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
        "b3": (1.2, 1.4, 300, 0.3), "b4": (1.4, 1.8, 380, 0.4), "b5": (1.6, 2.2, 456, 0.4),
        "b6": (1.8, 2.6, 528, 0.5), "b7": (2.0, 3.1, 600, 0.5)}
    assert sr.EFFICIENTNET_PARAMS["b3"].resolution == 300
    assert (sr.PAPER_ALPHA, sr.PAPER_BETA, sr.PAPER_GAMMA) == (1.2, 1.1, 1.15)


@pytest.mark.parametrize("b", sorted(sr.EFFICIENTNET_PARAMS))
def test_rounding_matches_the_reference_for_every_released_model(b):
    p = sr.EFFICIENTNET_PARAMS[b]
    for c in B0_CHANNELS:
        assert sr.round_filters(c, p.width) == official_round_filters(c, p.width), (b, c)
    assert [sr.round_repeats(r, p.depth) for r in B0_REPEATS] == [int(math.ceil(r * p.depth)) for r in B0_REPEATS]


@pytest.mark.parametrize("channels, width, want", [
    (32, 1.1, 32),     # 35.2 -> 32: the B2 stem stays at 32
    (32, 2.0, 64),     # B7 stem
    (1280, 1.4, 1792),  # B4 head
    (1280, 2.0, 2560),  # B7 head
    (320, 1.8, 576),
    (40, 1.1, 48),     # 44 is a tie: rounds up
    (112, 1.2, 136),   # 134.4 -> 136
    (16, 0.25, 8),     # never below the divisor
    (20, 0.5, 16),     # 10 -> 8 loses more than 10 %: add 8
    (3, 1.0, 8),
])
def test_round_filters_known_values(channels, width, want):
    assert sr.round_filters(channels, width) == want


def test_round_filters_divisor_and_min_value():
    assert sr.round_filters(20, 0.5, divisor=4) == 12     # 10 -> 12 (ties up)
    assert sr.round_filters(6, 1.0, divisor=4) == 8
    assert sr.round_filters(3, 1.0, divisor=8, min_value=2) == 10  # 0 -> 2 < 2.7: + 8
    assert sr.round_filters(100, 1.0, divisor=1) == 100
    with pytest.raises(ValueError, match="width"):
        sr.round_filters(32, 0.0)
    with pytest.raises(ValueError, match="divisor"):
        sr.round_filters(32, 1.0, divisor=0)


def test_round_repeats():
    assert [sr.round_repeats(r, 3.1) for r in B0_REPEATS] == [4, 7, 7, 10, 10, 13, 4]  # B7: 55 blocks
    assert [sr.round_repeats(r, 1.1) for r in B0_REPEATS] == [2, 3, 3, 4, 4, 5, 2]
    assert sr.round_repeats(4, 0.5) == 2 and sr.round_repeats(1, 0.1) == 1
    # An exact product is not pushed up by floating-point error (ceil(2.2 * 25) == 56 in floats).
    assert 2.2 * 25 > 55 and sr.round_repeats(25, 2.2) == 55
    with pytest.raises(ValueError, match="depth"):
        sr.round_repeats(2, -1.0)


def test_scaled_resolution():
    assert sr.scaled_resolution(224, 1.0) == 224
    assert sr.scaled_resolution(224, 1.15) == 258           # 257.6
    assert sr.scaled_resolution(224, 1.15, 8) == 256
    assert sr.scaled_resolution(224, 1.15, phi=2) == sr.scaled_resolution(224, 1.15 ** 2) == 296
    assert sr.scaled_resolution(32, 0.1, 8) == 8             # at least one divisor
    with pytest.raises(ValueError, match="resolution"):
        sr.scaled_resolution(224, 0.0)
    with pytest.raises(ValueError, match="resolution"):
        sr.scaled_resolution(0, 1.2)


def test_compound_coefficients_follow_the_paper():
    c = sr.compound_coefficients(1)
    assert c == (1.2, 1.1, 1.15) and c.depth == 1.2 and c.width == 1.1 and c.resolution_factor == 1.15
    d, w, r = sr.compound_coefficients(3, 1.2, 1.1, 1.15)
    assert (d, w, r) == pytest.approx((1.728, 1.331, 1.520875))
    assert sr.compound_coefficients(0, 1.3, 1.2, 1.1) == (1.0, 1.0, 1.0)
    assert sr.compound_coefficients(-1, 2.0, 2.0, 2.0) == (0.5, 0.5, 0.5)   # scaling down
    # FLOPs ~ d * w^2 * r^2 = flops_factor ** phi.
    assert d * w ** 2 * r ** 2 == pytest.approx(sr.flops_factor(1.2, 1.1, 1.15) ** 3)
    with pytest.raises(ValueError, match="beta"):
        sr.compound_coefficients(1, 1.2, 0.0, 1.15)


def test_flops_factor():
    assert sr.flops_factor(1.2, 1.1, 1.15) == pytest.approx(1.9203, abs=1e-4)
    assert sr.flops_factor(2.0, 1.0, 1.0) == 2.0
    assert sr.flops_factor(1.0, 2 ** 0.5, 1.0) == pytest.approx(2.0)


def test_check_constraint_accepts_the_paper_and_exact_values():
    assert sr.check_constraint(1.2, 1.1, 1.15) == pytest.approx(1.9203, abs=1e-4)
    assert sr.check_constraint(2.0, 1.0, 1.0, tol=0.0) == 2.0
    assert sr.check_constraint(1.0, 1.0, 1.0, target=1.0, tol=0.0) == 1.0


@pytest.mark.parametrize("kw, field", [
    (dict(alpha=0.9, beta=1.2, gamma=1.2), r"^alpha: .*>= 1"),
    (dict(alpha=1.2, beta=0.95, gamma=1.2), r"^beta: .*>= 1"),
    (dict(alpha=1.2, beta=1.1, gamma=float("nan")), r"^gamma: "),
    (dict(alpha=1.5, beta=1.0, gamma=1.2), r"^alpha, beta, gamma: .*2\.1600.*1\.9 to 2\.1"),
    (dict(alpha=1.0, beta=1.0, gamma=1.0), r"^alpha, beta, gamma: .*1\.0000"),
])
def test_check_constraint_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        sr.check_constraint(**kw)


def test_check_constraint_prefix_and_tolerance():
    with pytest.raises(ValueError, match=r"^search\.gamma: "):
        sr.check_constraint(1.2, 1.1, 0.5, prefix="search.")
    with pytest.raises(ValueError, match=r"search\.alpha, search\.beta, search\.gamma"):
        sr.check_constraint(1.2, 1.1, 1.15, tol=0.05, prefix="search.")
    with pytest.raises(ValueError, match="tol"):
        sr.check_constraint(1.2, 1.1, 1.15, tol=-1)
    assert sr.check_constraint(1.5, 1.0, 1.2, tol=0.2) == pytest.approx(2.16)
