"""Bits per layer under an average budget (multiple-choice knapsack: exact DP, or Lagrangian).

Each layer ``l`` has ``size_l`` weights and, for every candidate width ``b``, a measured error
``err_l(b)`` (its output error ``tr((W - Q_b) H (W - Q_b)^T)`` on the calibration activations) and
a storage cost ``size_l * cost(b)`` (bits per weight including the scale codes). The allocation
minimizes ``sum_l err_l(b_l)`` subject to ``sum_l size_l * cost(b_l) <= budget * sum_l size_l``.

When the costs are integer multiples of a common unit with a small total (transformer layer sizes
share a large divisor, e.g. 576 x 192 on SmolLM2: about 4000 states), a dynamic program over the
spent budget solves it exactly. Otherwise:

1. Lagrangian relaxation: for a multiplier ``lam`` each layer independently takes
   ``argmin_b err_l(b) + lam * size_l * cost(b)``; bisection finds the smallest ``lam`` whose
   choice fits the budget (the optimum of the convex hull of each layer's error/cost curve);
2. greedy fill: the budget left over is spent on the single-layer upgrades with the largest error
   reduction per extra bit that still fit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Allocation:
    bits: dict[str, int]  # layer -> chosen width
    budget: float  # target average cost per weight (same unit as ``cost``)
    average: float  # achieved average cost per weight
    error: float  # total error of the choice
    lam: float | None  # the Lagrange multiplier of the relaxed solution (None: exact DP)
    solver: str = "dp"  # "dp" (exact) or "lagrangian" (relaxation + greedy fill)

    def histogram(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for b in self.bits.values():
            out[b] = out.get(b, 0) + 1
        return dict(sorted(out.items()))


def allocate_bits(
    sizes: Mapping[str, int],
    errors: Mapping[str, Mapping[int, float]],
    budget: float,
    cost: Callable[[int], float] = float,
    solver: str = "auto",
    max_states: int = 2_000_000,
) -> Allocation:
    """Choose one width per layer from ``errors[layer]`` keys (see the module docstring).

    ``budget`` is the allowed average ``cost`` per weight, weighted by ``sizes``. ``solver``:
    ``"auto"`` (exact DP where the costs allow, else Lagrangian), ``"dp"`` or ``"lagrangian"``.
    """
    names = list(sizes)
    if not names:
        raise ConfigError("bit allocation needs at least one layer")
    if set(errors) != set(names):
        raise ConfigError("bit allocation: sizes and errors must name the same layers")
    total = float(sum(sizes[n] for n in names))
    limit = budget * total
    opts = {n: sorted(errors[n]) for n in names}
    for n in names:
        if not opts[n]:
            raise ConfigError(f"bit allocation: layer {n} has no candidate width")
        for b in opts[n]:
            if not math.isfinite(errors[n][b]) or errors[n][b] < 0:
                raise ConfigError(f"bit allocation: error of {n} at {b} bits is {errors[n][b]}")

    def c(n: str, b: int) -> float:
        return sizes[n] * cost(b)

    cheapest = sum(min(c(n, b) for b in opts[n]) for n in names)
    if cheapest > limit * (1 + 1e-12):
        lo_avg = cheapest / total
        raise ConfigError(
            f"bit budget {budget:g} is below the smallest possible average {lo_avg:.4g}; "
            "raise the budget or allow narrower widths"
        )

    if solver not in ("auto", "dp", "lagrangian"):
        raise ConfigError(f"bit allocation: unknown solver {solver!r}")
    if solver != "lagrangian":
        exact = _exact_dp(names, opts, errors, c, limit, max_states)
        if exact is not None:
            return _finish(exact, sizes, errors, c, budget, total, None, "dp")
        if solver == "dp":
            raise ConfigError(
                "bit allocation: costs share no small common unit; use the Lagrangian"
            )

    def choose(lam: float) -> dict[str, int]:
        # ties go to the cheaper width
        return {
            n: min(opts[n], key=lambda b, n=n: (errors[n][b] + lam * c(n, b), c(n, b)))
            for n in names
        }

    def spent(ch: dict[str, int]) -> float:
        return sum(c(n, b) for n, b in ch.items())

    # bisection on lam: large lam -> cheapest choice (fits); lam = 0 -> lowest error
    choice = choose(0.0)
    lam = 0.0
    if spent(choice) > limit:
        lo, hi = 0.0, 1.0
        while spent(choose(hi)) > limit:
            hi *= 4.0
            if hi > 1e300:
                raise ConfigError("bit allocation: no multiplier meets the budget")
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            if spent(choose(mid)) > limit:
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-12 * hi:
                break
        lam = hi
        choice = choose(hi)

    # greedy fill with what is left
    left = limit - spent(choice)
    while True:
        best, best_gain = None, 0.0
        for n in names:
            cur = choice[n]
            for b in opts[n]:
                extra = c(n, b) - c(n, cur)
                gain = errors[n][cur] - errors[n][b]
                if extra <= 0 or gain <= 0 or extra > left + 1e-9 * total:
                    continue
                if gain / extra > best_gain:
                    best, best_gain = (n, b, extra), gain / extra
        if best is None:
            break
        n, b, extra = best
        choice[n] = b
        left -= extra
    return _finish(choice, sizes, errors, c, budget, total, lam, "lagrangian")


def _finish(choice, sizes, errors, c, budget, total, lam, solver) -> Allocation:
    avg = sum(c(n, b) for n, b in choice.items()) / total
    err = sum(errors[n][b] for n, b in choice.items())
    alloc = Allocation(bits=choice, budget=budget, average=avg, error=err, lam=lam, solver=solver)
    log.info(
        "bit allocation (%s): budget %.4g -> average %.4g, widths %s, total error %.4g",
        solver,
        budget,
        avg,
        alloc.histogram(),
        err,
    )
    return alloc


def _exact_dp(names, opts, errors, c, limit, max_states) -> dict[str, int] | None:
    """Exact multiple-choice knapsack over integer cost units; None when the costs have no
    common unit that keeps the table under ``max_states`` entries."""
    from fractions import Fraction

    costs = {(n, b): Fraction(c(n, b)).limit_denominator(1 << 20) for n in names for b in opts[n]}
    for (n, b), f in costs.items():
        if abs(float(f) - c(n, b)) > 1e-9 * max(1.0, c(n, b)):
            return None
    unit = Fraction(0)
    for f in costs.values():  # gcd of rationals
        num = math.gcd(unit.numerator * f.denominator, f.numerator * unit.denominator)
        unit = Fraction(num, unit.denominator * f.denominator)
    if unit <= 0:
        return None
    units = {k: int(f / unit) for k, f in costs.items()}
    cap = math.floor(Fraction(limit).limit_denominator(1 << 40) / unit + Fraction(1, 10**9))
    cap = min(cap, sum(max(units[n, b] for b in opts[n]) for n in names))
    if (cap + 1) * len(names) > max_states:
        return None
    inf = float("inf")
    dp = np.full(cap + 1, inf)
    dp[0] = 0.0
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)
    for i, n in enumerate(names):
        new = np.full(cap + 1, inf)
        for j, b in enumerate(opts[n]):
            u = units[n, b]
            if u > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[u:] = dp[: cap + 1 - u] + errors[n][b]
            better = cand < new
            new[better] = cand[better]
            picks[i][better] = j
        dp = new
    end = int(np.argmin(dp))
    if not math.isfinite(dp[end]):
        return None
    choice = {}
    for i in range(len(names) - 1, -1, -1):
        n = names[i]
        b = opts[n][picks[i][end]]
        choice[n] = b
        end -= units[n, b]
    return {n: choice[n] for n in names}


def parse_bits(value) -> tuple[int | None, float | None]:
    """``--bits`` value -> (uniform width, None) or (None, average budget).

    An integral value (``3``, ``"3"``, ``3.0``) is a uniform width; anything else an average
    budget in bit-planes per weight (``2.5``, ``3.5``).
    """
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bits={value!r} is neither a width (2, 3, 4) nor a budget (2.5)") from e
    if not math.isfinite(v):
        raise ConfigError(f"bits={value!r} must be a finite number")
    if v == int(v):  # a width: QuantConfig says which widths exist
        return int(v), None
    if v < min(CANDIDATE_WIDTHS):
        raise ConfigError(
            f"bit budget {v:g} is below the smallest possible average {min(CANDIDATE_WIDTHS)} "
            f"(layers are fitted at {CANDIDATE_WIDTHS} bits); raise the budget"
        )
    return None, v


CANDIDATE_WIDTHS = (2, 3, 4)


def output_error(
    w: torch.Tensor,
    q: torch.Tensor,
    stat: torch.Tensor | None,
    row_weight: torch.Tensor | None = None,
) -> float:
    """``sum_i r_i [(W - Q) H (W - Q)^T]_ii`` with ``stat`` the layer's ``X^T X / n`` ([K, K]);
    with only its diagonal ([K]) the diagonal approximation; without statistics the squared weight
    error. ``row_weight`` ``r`` ([N], default 1): the loss sensitivity of each output channel
    (``calibrate.output_fisher``), which makes errors of different layers comparable."""
    e = w.double() - q.double()
    if stat is None:
        rows = (e * e).sum(1)
    elif stat.ndim == 1:
        rows = (e * e * stat.double()[None, :]).sum(1)
    else:
        rows = ((e @ stat.double()) * e).sum(1)
    if row_weight is not None:
        rows = rows * row_weight.double()
    return float(rows.sum())


def fit_with_budget(
    candidates: Mapping[str, tuple[str, object]],
    qcfg,
    stats: Mapping[str, torch.Tensor] | None,
    budget: float,
    fit: Callable,
    progress: bool = True,
    widths: tuple[int, ...] = CANDIDATE_WIDTHS,
    row_weights: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict, dict]:
    """Fit every candidate at every width, measure each layer's output error at each, and keep
    per layer the width the budgeted allocation picks.

    ``candidates``: key -> (readable name, W[N, K]); ``fit(candidates, qcfg, stats, progress)``
    returns key -> ``BCQResult`` (``compiler.quantize_candidates``). ``budget`` is in bit-planes per
    weight (the unit of an integer ``--bits``); the allocation charges each width its storage
    including the scale codes. ``row_weights``: key -> loss sensitivity per output channel
    (``calibrate.output_fisher``) weighting the errors. Returns ``(key -> BCQResult, allocation
    report)``.
    """
    per_width = {
        b: fit(candidates, dataclasses.replace(qcfg, bits=b), stats, progress) for b in widths
    }
    errors = {
        key: {
            b: output_error(
                torch.as_tensor(np.asarray(w)),
                per_width[b][key].dequantize(),
                stats.get(key) if stats is not None else None,
                row_weights.get(key) if row_weights is not None else None,
            )
            for b in widths
        }
        for key, (_, w) in candidates.items()
    }
    alloc = allocate_for(candidates, errors, qcfg, budget)
    fitted = {key: per_width[alloc.bits[key]][key] for key in candidates}
    report = allocation_report(candidates, errors, alloc, qcfg)
    report["error_weighting"] = "loss gradient (Fisher)" if row_weights else "none"
    return fitted, report


def allocate_for(candidates, errors, qcfg, budget) -> Allocation:
    """The allocation for ``candidates`` (key -> (name, W[N, K])) under ``budget`` bit-planes per
    weight, charging each width ``QuantConfig.bits_per_weight`` (scale codes included)."""
    sizes = {key: int(np.asarray(w).size) for key, (_, w) in candidates.items()}

    return allocate_bits(
        sizes, errors, _storage_budget(qcfg, budget), cost=lambda b: _width_cost(qcfg, b)
    )


def _width_cost(qcfg, b: int) -> float:
    return dataclasses.replace(qcfg, bits=b).bits_per_weight() if b > 0 else 0.0


def _storage_budget(qcfg, budget: float) -> float:
    """Storage bits per weight of ``budget`` bit-planes: the cost of its two neighbouring widths,
    interpolated (``budget * cost(1)`` when every plane has the same number of scale terms)."""
    lo = math.floor(budget)
    c0 = _width_cost(qcfg, lo)
    if budget == lo:
        return c0
    return c0 + (budget - lo) * (_width_cost(qcfg, lo + 1) - c0)


def _budget_planes(qcfg, storage: float) -> float:
    """The inverse of ``_storage_budget``: bit-planes per weight of a storage budget."""
    lo = 0
    while _width_cost(qcfg, lo + 1) < storage:
        lo += 1
    c0, c1 = _width_cost(qcfg, lo), _width_cost(qcfg, lo + 1)
    return lo + (storage - c0) / (c1 - c0)


def allocation_report(candidates, errors, alloc: Allocation, qcfg) -> dict:
    """Manifest/report fields of an allocation, keyed by the layers' readable names."""
    sizes = {key: int(np.asarray(w).size) for key, (_, w) in candidates.items()}
    total = sum(sizes.values())
    avg_bits = sum(sizes[k] * b for k, b in alloc.bits.items()) / total
    return {
        "budget_bits": round(_budget_planes(qcfg, alloc.budget), 6),
        "average_bits": round(avg_bits, 6),
        "bits_per_weight": round(alloc.average, 6),
        "solver": alloc.solver,
        "widths": sorted({b for e in errors.values() for b in e}),
        "histogram": {str(b): n for b, n in alloc.histogram().items()},
        "total_output_error": alloc.error,
        "layers": {
            candidates[k][0]: {
                "bits": alloc.bits[k],
                "output_error": {str(b): e for b, e in errors[k].items()},
            }
            for k in candidates
        },
    }


def loss_sensitivity(model, windows, candidates, progress: bool = True) -> dict:
    """key -> loss sensitivity per output channel of each candidate (``output_fisher`` on the
    calibration windows); ``candidates``: key -> (Linear name, W)."""
    from .calibrate import output_fisher, target_linears

    layers = target_linears(model)
    names = {name for name, _ in candidates.values()}
    fisher = output_fisher(
        model, windows, {n: m for n, m in layers.items() if n in names}, progress
    )
    return {key: fisher[name] for key, (name, _) in candidates.items()}
