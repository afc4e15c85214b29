"""Budgeted per-layer primitive choice: budgets respected, exact against brute force, sensible."""

import itertools

import numpy as np
import pytest

from shiftadd_tvm.errors import ConfigError
from shiftadd_tvm.primitive_choice import Option, minimize_error, minimize_latency


def random_layers(seed, n_layers=5):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_layers):
        out[f"l{i}"] = [
            Option(p, float(rng.uniform(0, 1) * s), float(rng.uniform(0.5, 2) / s))
            for p, s in (("lut3", 1.0), ("lut4", 0.5), ("shift", 0.8), ("dense", 0.0001))
        ]
    return out


def brute(layers, cost, value, budget):
    best = None
    for combo in itertools.product(*layers.values()):
        if sum(cost(o) for o in combo) <= budget + 1e-12:
            v = sum(value(o) for o in combo)
            if best is None or v < best:
                best = v
    return best


@pytest.mark.parametrize("seed", range(6))
def test_latency_budget_is_respected_and_near_optimal(seed):
    layers = random_layers(seed)
    lo = sum(min(o.latency for o in opts) for opts in layers.values())
    hi = sum(max(o.latency for o in opts) for opts in layers.values())
    budget = lo + 0.4 * (hi - lo)
    ch = minimize_error(layers, budget, resolution=4000)
    assert ch.latency <= budget
    opt = brute(layers, lambda o: o.latency, lambda o: o.error, budget)
    # costs rounded up to the grid: at most one step per layer lost
    assert ch.error >= opt - 1e-12
    relaxed = brute(layers, lambda o: o.latency, lambda o: o.error, budget - 5 * budget / 4000)
    assert ch.error <= relaxed + 1e-12


@pytest.mark.parametrize("seed", range(4))
def test_error_budget_is_respected(seed):
    layers = random_layers(seed)
    budget = 0.3 * sum(max(o.error for o in opts) for opts in layers.values())
    ch = minimize_latency(layers, budget, resolution=4000)
    assert ch.error <= budget
    opt = brute(layers, lambda o: o.error, lambda o: o.latency, budget)
    assert ch.latency >= opt - 1e-12


def test_sensitive_layer_gets_the_accurate_primitive():
    # two identical-cost layers; layer "a" is 10x more sensitive to the cheap primitive
    cheap_a, cheap_b = Option("lut3", 1.0, 1.0), Option("lut3", 0.1, 1.0)
    layers = {
        "a": [cheap_a, Option("lut4", 0.05, 2.0)],
        "b": [cheap_b, Option("lut4", 0.005, 2.0)],
    }
    ch = minimize_error(layers, latency_budget=3.0)
    assert ch.picks["a"].primitive == "lut4" and ch.picks["b"].primitive == "lut3"
    assert ch.counts() == {"lut3": 1, "lut4": 1}
    # generous budget: both accurate; tight budget: both cheap
    assert minimize_error(layers, 4.0).counts() == {"lut4": 2}
    assert minimize_error(layers, 2.0).counts() == {"lut3": 2}


def test_impossible_budget_is_a_clear_error():
    layers = {"a": [Option("lut3", 0.1, 1.0)]}
    with pytest.raises(ConfigError, match="below the least achievable"):
        minimize_error(layers, 0.5)
