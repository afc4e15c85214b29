"""Bit allocation under an average budget: budget respected, sensitive layers preferred."""

import itertools
import random

import pytest

from shiftadd_tvm.allocate import allocate_bits, parse_bits
from shiftadd_tvm.errors import ConfigError

WIDTHS = (2, 3, 4)


def _problem(seed, layers=12):
    rng = random.Random(seed)
    sizes = {f"l{i}": rng.choice([1, 3, 8]) * 1000 for i in range(layers)}
    errors = {}
    for n in sizes:
        e2 = rng.uniform(0.1, 100.0)
        # error roughly quarters per extra bit, with some spread
        errors[n] = {2: e2, 3: e2 * rng.uniform(0.15, 0.4), 4: e2 * rng.uniform(0.02, 0.1)}
    return sizes, errors


def _bpw(b):  # 3 one-byte scale terms per group of 128
    return b * (1 + 24 / 128)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [2.0, 2.3, 2.5, 3.0, 3.5, 3.9, 4.0])
@pytest.mark.parametrize("solver", ["dp", "lagrangian"])
def test_budget_respected(seed, budget, solver):
    sizes, errors = _problem(seed)
    a = allocate_bits(sizes, errors, budget * _bpw(1), cost=_bpw, solver=solver)
    total = sum(sizes.values())
    avg_bits = sum(sizes[n] * b for n, b in a.bits.items()) / total
    assert avg_bits <= budget + 1e-9
    assert a.average <= budget * _bpw(1) * (1 + 1e-12)
    assert set(a.bits) == set(sizes) and set(a.bits.values()) <= set(WIDTHS)
    # nothing is left on the table: no single upgrade fits the remaining budget and lowers error
    left = budget * total - avg_bits * total
    for n, b in a.bits.items():
        if b < 4:
            assert sizes[n] > left + 1e-6 or errors[n][b + 1] >= errors[n][b]


def test_extreme_budgets_are_uniform():
    sizes, errors = _problem(0)
    assert set(allocate_bits(sizes, errors, 2.0).bits.values()) == {2}
    assert set(allocate_bits(sizes, errors, 4.0).bits.values()) == {4}
    assert set(allocate_bits(sizes, errors, 9.0).bits.values()) == {4}


def test_prefers_sensitive_layers():
    sizes = {f"s{i}": 1000 for i in range(5)} | {f"r{i}": 1000 for i in range(5)}
    errors = {}
    for n in sizes:
        scale = 100.0 if n.startswith("s") else 1.0  # "s" layers are 100x as sensitive
        errors[n] = {2: 16 * scale, 3: 4 * scale, 4: 1 * scale}
    a = allocate_bits(sizes, errors, 3.0)
    assert all(a.bits[f"s{i}"] == 4 for i in range(5))
    assert all(a.bits[f"r{i}"] == 2 for i in range(5))
    # a parameter-heavy layer costs more: with equal errors the small layers get the bits
    sizes = {"big": 8000, "small": 1000}
    errors = {n: {2: 10.0, 3: 3.0, 4: 1.0} for n in sizes}
    a = allocate_bits(sizes, errors, (8000 * 2 + 1000 * 4) / 9000)
    assert a.bits == {"big": 2, "small": 4}


@pytest.mark.parametrize("seed", range(8))
def test_dp_matches_brute_force(seed):
    sizes, errors = _problem(100 + seed, layers=6)
    total = sum(sizes.values())
    for budget in (2.4, 3.0, 3.6):
        best = min(
            sum(errors[n][b] for n, b in zip(sizes, combo, strict=True))
            for combo in itertools.product(WIDTHS, repeat=len(sizes))
            if sum(sizes[n] * b for n, b in zip(sizes, combo, strict=True)) <= budget * total
        )
        a = allocate_bits(sizes, errors, budget * _bpw(1), cost=_bpw)  # rational costs: DP
        assert a.solver == "dp"
        assert a.error == pytest.approx(best, rel=1e-12), (budget, a.error, best)


@pytest.mark.parametrize("seed", range(3))
def test_lagrangian_close_to_exact_on_many_layers(seed):
    sizes, errors = _problem(seed, layers=210)
    for budget in (2.5, 3.0, 3.5):
        exact = allocate_bits(sizes, errors, budget)
        relaxed = allocate_bits(sizes, errors, budget, solver="lagrangian")
        assert exact.solver == "dp" and relaxed.solver == "lagrangian"
        assert relaxed.average <= budget + 1e-9
        assert exact.error <= relaxed.error <= 1.01 * exact.error


def test_irrational_costs_fall_back_to_lagrangian():
    sizes, errors = _problem(0)
    a = allocate_bits(sizes, errors, 3.0 * 2**0.5, cost=lambda b: b * 2**0.5)
    assert a.solver == "lagrangian" and a.average <= 3.0 * 2**0.5 * (1 + 1e-12)


def test_infeasible_budget_and_bad_input():
    sizes, errors = _problem(0)
    with pytest.raises(ConfigError, match="below the smallest"):
        allocate_bits(sizes, errors, 1.5)
    with pytest.raises(ConfigError, match="below the smallest"):
        allocate_bits(sizes, errors, 1.5, solver="lagrangian")
    with pytest.raises(ConfigError, match="same layers"):
        allocate_bits(sizes, {"x": {2: 1.0}}, 3.0)


@pytest.mark.parametrize(
    "value,expected",
    [
        (3, (3, None)),
        ("3", (3, None)),
        (3.0, (3, None)),
        ("0", (0, None)),  # a width: QuantConfig rejects it with the supported list
        ("2.5", (None, 2.5)),
        (3.5, (None, 3.5)),
    ],
)
def test_parse_bits(value, expected):
    assert parse_bits(value) == expected


@pytest.mark.parametrize("value", ["x", "nan", "inf", None, "1.5", "-0.5"])
def test_parse_bits_rejects(value):
    with pytest.raises(ConfigError):
        parse_bits(value)


def test_budget_storage_with_per_plane_terms():
    """A budget in bit-planes is charged the storage of its neighbouring widths: linear in the
    width when every plane has the same terms, interpolated when the counts differ by plane."""
    import numpy as np

    from shiftadd_tvm.allocate import _budget_planes, _storage_budget, allocate_for
    from shiftadd_tvm.quant import QuantConfig

    uni = QuantConfig(bits=1, terms=3)
    assert _storage_budget(uni, 2.5) == pytest.approx(2.5 * uni.bits_per_weight())
    plan = QuantConfig(bits=1, terms=3, plane_terms=(3, 2))  # plane costs 1 + 3/16, 1 + 2/16
    c2, c3 = (QuantConfig(bits=b, terms=3, plane_terms=(3, 2)).bits_per_weight() for b in (2, 3))
    assert _storage_budget(plan, 2.5) == pytest.approx((c2 + c3) / 2)
    assert _budget_planes(plan, _storage_budget(plan, 2.5)) == pytest.approx(2.5)
    assert (
        _storage_budget(plan, 4.0)
        == QuantConfig(bits=4, terms=3, plane_terms=(3, 2)).bits_per_weight()
    )
    rng = np.random.default_rng(0)
    cands = {f"l{i}": (f"l{i}", np.zeros((64, 128))) for i in range(6)}
    errors = {k: {b: float(rng.random()) * 4.0**-b for b in (2, 3, 4)} for k in cands}
    alloc = allocate_for(cands, errors, plan, 3.0)
    assert alloc.average <= _storage_budget(plan, 3.0) + 1e-9
