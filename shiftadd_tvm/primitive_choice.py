"""Per-layer choice of the multiplication primitive (LUT/BCQ at some bits, shift, dense) under a
budget: the post-training counterpart of ShiftAddViT's latency-aware router.

Input: for every layer and every allowed primitive, its measured error (here: the drop of the
model's output quality when only that layer uses the primitive, on calibration data) and its
measured latency (the compiled kernel for that layer's shape). Errors are treated as additive
across layers (the usual first-order assumption of mixed-precision allocation).

Two budgeted problems, both a multiple-choice knapsack solved by dynamic programming on the
budgeted quantity discretized into ``resolution`` steps (each option's cost rounded to the nearest
step; every state also carries its exact cost, and only states whose exact cost fits the budget
are returned, so a choice never exceeds the budget; the grid can cost at most half a step per
layer of optimality):

* ``minimize_error(..., latency_budget)``: least total error with total latency <= budget;
* ``minimize_latency(..., error_budget)``: least total latency with total error <= budget.
"""

from __future__ import annotations

import dataclasses
import math

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Option:
    primitive: str  # e.g. "lut3", "lut4", "shift", "dense"
    error: float
    latency: float


@dataclasses.dataclass
class Choice:
    picks: dict[str, Option]  # layer -> chosen option
    error: float
    latency: float
    budget: float
    budget_kind: str  # "latency" or "error"

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for o in self.picks.values():
            out[o.primitive] = out.get(o.primitive, 0) + 1
        return dict(sorted(out.items()))

    def to_dict(self) -> dict:
        return {
            "budget_kind": self.budget_kind,
            "budget": self.budget,
            "error": self.error,
            "latency": self.latency,
            "counts": self.counts(),
            "layers": {k: dataclasses.asdict(o) for k, o in self.picks.items()},
        }


def _solve(
    layers: dict[str, list[Option]], cost, value, budget: float, resolution: int, kind: str
) -> Choice:
    """min sum value(o) s.t. sum cost(o) <= budget, one option per layer (exact DP on the grid)."""
    if not layers:
        raise ConfigError("primitive choice: no layers given")
    for name, opts in layers.items():
        if not opts:
            raise ConfigError(f"primitive choice: layer {name} has no options")
        if any(cost(o) < 0 or not math.isfinite(cost(o)) for o in opts):
            raise ConfigError(f"primitive choice: layer {name} has a negative or infinite cost")
    floor = sum(min(cost(o) for o in opts) for opts in layers.values())
    if budget < floor:
        raise ConfigError(
            f"{kind} budget {budget:.6g} is below the least achievable {floor:.6g} "
            "(every layer on its cheapest primitive); raise the budget"
        )
    unit = budget / resolution if budget > 0 else 1.0
    names = list(layers)
    cap = resolution + len(names)  # rounding to the nearest step: slack of half a step per layer
    inf = math.inf
    # best[c] = (least value, its exact cost) over choices whose rounded cost sums to c
    best: list[tuple[float, float]] = [(0.0, 0.0)] + [(inf, inf)] * cap
    trail: list[list[tuple[int, int]]] = []  # per layer: (option index, previous c) per c
    for name in names:
        opts = layers[name]
        steps = [round(cost(o) / unit) if budget > 0 else 0 for o in opts]
        new = [(inf, inf)] * (cap + 1)
        back = [(-1, -1)] * (cap + 1)
        for c, (v, exact) in enumerate(best):
            if v == inf:
                continue
            for i, (o, st) in enumerate(zip(opts, steps, strict=True)):
                c2 = c + st
                cand = (v + value(o), exact + cost(o))
                if c2 <= cap and cand < new[c2]:
                    new[c2] = cand
                    back[c2] = (i, c)
        best = new
        trail.append(back)
    # the best state whose exact cost fits the budget (the exact check makes the budget hard)
    ok = [c for c in range(cap + 1) if best[c][1] <= budget * (1 + 1e-12)]
    if not ok:  # cannot happen when budget >= floor (the all-cheapest path fits), kept defensive
        picks = {n: min(layers[n], key=cost) for n in names}
    else:
        c = min(ok, key=lambda c: best[c][0])
        picks = {}
        for name, back in zip(reversed(names), reversed(trail), strict=True):
            i, prev = back[c]
            picks[name] = layers[name][i]
            c = prev
        picks = {n: picks[n] for n in names}
    return Choice(
        picks,
        error=sum(o.error for o in picks.values()),
        latency=sum(o.latency for o in picks.values()),
        budget=budget,
        budget_kind=kind,
    )


def minimize_error(
    layers: dict[str, list[Option]], latency_budget: float, resolution: int = 2000
) -> Choice:
    """Least total error with total latency within ``latency_budget``."""
    return _solve(
        layers, lambda o: o.latency, lambda o: o.error, latency_budget, resolution, "latency"
    )


def minimize_latency(
    layers: dict[str, list[Option]], error_budget: float, resolution: int = 2000
) -> Choice:
    """Least total latency with total error within ``error_budget``."""
    return _solve(
        layers, lambda o: max(o.error, 0.0), lambda o: o.latency, error_budget, resolution, "error"
    )
