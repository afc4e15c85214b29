"""Binary-coding quantization (BCQ) with power-of-two scales: plain functions on tensors.

``W[N, K] ~= sum_b alpha_b * B_b`` with ``B_b in {-1,+1}`` and, per output row and group of
``group_size`` columns, each ``alpha`` a sum of ``terms`` signed powers of two.

Fit (ShiftAddLLM's alternating scheme, weighted by the activation energy of each column):

1. greedy start per group: ``B_b = sign(r)``, ``alpha_b = weighted mean |r|``, ``r -= alpha_b B_b``;
2. ``iters`` rounds of: least-squares ``alpha`` with ``B`` fixed (weights ``d_k``), rounding of
   ``alpha`` to sums of signed powers of two, re-pick of every code as the nearest of the ``2^bits``
   signed sums. The best round (weighted error) is kept.

``d_k`` is the diagonal of the calibration Hessian ``X^T X`` (mean squared activation of column k):
without it, outlier input channels get clipped (DESIGN.md section 3).
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import torch

from . import defaults
from .errors import ConfigError, WeightError
from .schedules.packing import EXP_MAX, EXP_MIN, encode_terms, pack_planes, padded_k

SUPPORTED_BITS = (1, 2, 3, 4)
METHODS = ("gptq", "bcq")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """The weight format and fit settings. Hashable and printable."""

    bits: int = 3
    group_size: int = 128
    terms: int = 3
    iters: int = 15
    method: str = "gptq"  # "gptq": output objective (GPTQ loop + BCQ); "bcq": weighted BCQ only
    rounds: int = 1  # gptq: column loops, each on the previous round's refitted scales
    sweeps: int = 0  # gptq: coordinate-descent passes over the codes after each loop
    # terms per bit-plane, most significant plane first (a layer with more planes repeats the
    # last count); () = ``terms`` for every plane. ``terms`` is then their maximum (the width of
    # the stored term arrays; a plane's unused slots are absent terms).
    plane_terms: tuple[int, ...] = ()
    # True: ``terms`` / ``plane_terms`` follow ``defaults.TERMS_AUTO`` for ``bits`` (also after
    # ``dataclasses.replace(cfg, bits=...)``, so each width of a mixed allocation gets its own)
    auto_terms: bool = False
    # > 0: every (row, group)'s terms, over all planes, lie within this many consecutive
    # exponents, so its scales are integers below ``2**scale_window`` times one power of two
    # (``packing.shared_exponent_form`` at 8: what the AVX-512 int8 kernel applies with one shift
    # per group instead of one per term). 0: free exponents.
    scale_window: int = 0

    def __post_init__(self) -> None:
        if self.auto_terms and self.bits in defaults.TERMS_AUTO:
            terms, plane_terms = parse_terms(defaults.TERMS_AUTO[self.bits])
            object.__setattr__(self, "terms", terms)
            object.__setattr__(self, "plane_terms", plane_terms)
        object.__setattr__(self, "plane_terms", tuple(int(t) for t in self.plane_terms))
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        gs = self.group_size
        if gs < 8 or gs & (gs - 1):
            raise ConfigError(
                f"group_size={gs} must be a power of two >= 8 (the kernel reads 8 columns per table)"
            )
        if not 1 <= self.terms <= 4:
            raise ConfigError(
                f"terms={self.terms} must be in 1..4 (signed powers of two per scale)"
            )
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {METHODS}")
        if self.iters < 0:
            raise ConfigError(f"iters={self.iters} must be >= 0")
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if self.sweeps < 0:
            raise ConfigError(f"sweeps={self.sweeps} must be >= 0")
        if self.scale_window and not max(self.term_counts) <= self.scale_window <= 8:
            raise ConfigError(
                f"scale_window={self.scale_window} must be 0 (off) or in "
                f"{max(self.term_counts)}..8 (at least the terms per plane, at most one byte)"
            )
        if self.plane_terms and (
            any(not 1 <= t <= 4 for t in self.plane_terms) or max(self.plane_terms) != self.terms
        ):
            raise ConfigError(
                f"plane_terms={self.plane_terms}: each count must be in 1..4 and terms={self.terms} "
                "their maximum (use parse_terms to build both from one spec such as '4,3,3,2')"
            )

    @property
    def term_counts(self) -> tuple[int, ...]:
        """Power-of-two terms of each of the ``bits`` planes (most significant first)."""
        if not self.plane_terms:
            return (self.terms,) * self.bits
        pt = self.plane_terms
        return tuple(pt[min(b, len(pt) - 1)] for b in range(self.bits))

    @property
    def terms_label(self) -> str:
        """``"3"``, or the per-plane counts such as ``"4,3,3,2"`` (``auto: ...`` when chosen by
        ``auto_terms``)."""
        label = ",".join(map(str, self.term_counts))
        return f"auto: {label}" if self.auto_terms else label

    def bits_per_weight(self) -> float:
        """Storage per weight including the scale codes (one byte per power-of-two term)."""
        return self.bits + sum(self.term_counts) * 8 / self.group_size


@dataclasses.dataclass
class BCQResult:
    codes: torch.Tensor  # bool[bits, N, K], True = +1
    term_signs: torch.Tensor  # int8[bits, N, G, terms] in {-1, 0, 1}
    term_exps: torch.Tensor  # int16[bits, N, G, terms]
    cfg: QuantConfig

    @property
    def alpha(self) -> torch.Tensor:
        """float64 scales [bits, N, G] (exact sums of the power-of-two terms)."""
        return (self.term_signs.double() * torch.exp2(self.term_exps.double())).sum(-1)

    def dequantize(self) -> torch.Tensor:
        """Dense float64 W[N, K] that the packed format means."""
        bits, n, k = self.codes.shape
        a = torch.repeat_interleave(self.alpha, self.cfg.group_size, dim=-1)[..., :k]
        return ((self.codes.double() * 2 - 1) * a).sum(0)

    def pack(self) -> tuple[np.ndarray, np.ndarray]:
        """(planes uint8[bits, N, Kp/8], scales int8[bits, N, G, terms]) in the kernel layout."""
        planes = pack_planes(self.codes.numpy(), self.cfg.group_size)
        scales = encode_terms(self.term_signs.numpy(), self.term_exps.numpy())
        return planes, scales


def round_pow2_terms(a: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy expansion of ``a`` into ``terms`` signed powers of two (nearest power each step).

    Returns ``(signs int8[..., terms], exps int16[..., terms])``; a term whose residual is below
    ``2**EXP_MIN`` (or zero) is absent (sign 0).
    """
    r = a.double().clone()
    signs, exps = [], []
    for _ in range(terms):
        mag = r.abs()
        e0 = torch.floor(torch.log2(mag.clamp_min(1e-300)))
        lo = torch.exp2(e0)
        e = torch.where(mag - lo > 2 * lo - mag, e0 + 1, e0).clamp(EXP_MIN, EXP_MAX)
        present = mag >= 2.0 ** (EXP_MIN - 1)
        s = torch.where(present, torch.sign(r), torch.zeros_like(r))
        r = r - s * torch.exp2(e)
        signs.append(s.to(torch.int8))
        exps.append(torch.where(present, e, torch.zeros_like(e)).to(torch.int16))
    return torch.stack(signs, -1), torch.stack(exps, -1)


def terms_kwargs(spec) -> dict:
    """``QuantConfig`` keyword arguments of a ``--terms`` value: ``"auto"`` (the per-width
    defaults), a count or per-plane counts (``parse_terms``)."""
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        return {"auto_terms": True}
    terms, plane_terms = parse_terms(spec)
    return {"terms": terms, "plane_terms": plane_terms}


def kernel_terms(bits: int, group_size: int, spec) -> tuple[int, tuple[int, ...]]:
    """A ``--terms`` value at ``bits``: (the widest plane's count, the count of every plane), as
    ``compile()`` resolves it; what a ``LutGemmConfig`` of that width takes."""
    counts = QuantConfig(bits=bits, group_size=group_size, **terms_kwargs(spec)).term_counts
    return max(counts), counts


def parse_terms(spec) -> tuple[int, tuple[int, ...]]:
    """``3``, ``"3"``, ``"4,3,3,2"`` or ``(4, 3, 3, 2)`` -> ``(terms, plane_terms)`` for
    ``QuantConfig`` (a single count gives ``plane_terms=()``)."""
    if isinstance(spec, str):
        try:
            counts = tuple(int(t) for t in spec.replace(" ", "").split(",") if t)
        except ValueError:
            counts = ()
        if not counts:
            raise ConfigError(
                f"terms={spec!r}: expected 'auto', a count (3) or per-plane counts, most "
                "significant plane first (4,3,3,2)"
            )
    elif isinstance(spec, int | np.integer):
        counts = (int(spec),)
    else:
        counts = tuple(int(t) for t in spec)
    if not counts or any(not 1 <= t <= 4 for t in counts):
        raise ConfigError(f"terms={spec!r}: every count must be in 1..4")
    if len(set(counts)) == 1:
        return counts[0], ()
    while len(counts) > 1 and counts[-1] == counts[-2]:  # canonical: the last count repeats
        counts = counts[:-1]
    return max(counts), counts


def round_scales(
    alpha: torch.Tensor, cfg: QuantConfig, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``round_pow2_terms`` with ``cfg``'s term count for each plane; ``dim``: the plane axis of
    ``alpha`` (``bits`` long). Outputs are ``[*alpha.shape, cfg.terms]``; a plane with fewer
    terms has absent (sign 0) trailing slots."""
    counts = cfg.term_counts
    if cfg.scale_window:
        return _round_windowed(alpha, cfg, dim)
    if len(set(counts)) == 1 and counts[0] == cfg.terms:
        return round_pow2_terms(alpha, cfg.terms)
    dim = dim % alpha.ndim
    if alpha.shape[dim] != len(counts):
        raise ValueError(f"alpha has {alpha.shape[dim]} planes on axis {dim}, cfg {len(counts)}")
    signs, exps = [], []
    for b, c in enumerate(counts):
        s, e = round_pow2_terms(alpha.select(dim, b), c)
        pad = (0, cfg.terms - c)
        signs.append(torch.nn.functional.pad(s, pad))
        exps.append(torch.nn.functional.pad(e, pad))
    return torch.stack(signs, dim), torch.stack(exps, dim)


def _round_windowed(
    alpha: torch.Tensor, cfg: QuantConfig, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``round_scales`` with ``cfg.scale_window = W``: the planes of one group (``dim``) share the
    unit ``2**E``, ``E = floor(log2 max_b |alpha_b|) - W + 1``; each ``alpha_b / 2**E`` is rounded
    to an integer, then expanded greedily into its plane's terms (an integer's greedy terms are
    integers), so every term lies in ``[E, E + W]`` and each plane's value ``|c| < 2**W`` (a group
    whose top plane rounds up to ``2**W`` takes ``E + 1``)."""
    dim = dim % alpha.ndim
    a = alpha.double()
    top = a.abs().amax(dim, keepdim=True)
    e = (torch.floor(torch.log2(top.clamp_min(1e-300))) - (cfg.scale_window - 1)).clamp_min(EXP_MIN)
    plain = dataclasses.replace(cfg, scale_window=0)
    for _ in range(2):
        signs, exps = round_scales(torch.round(a / torch.exp2(e)), plain, dim)
        over = (pow2_value(signs, exps).abs() >= 2**cfg.scale_window).any(dim, keepdim=True)
        if not over.any():
            break
        e = torch.where(over, e + 1, e)
    exps = exps.to(torch.int64) + e.to(torch.int64).unsqueeze(-1)
    present = (signs != 0) & (top.unsqueeze(-1) > 0)
    if torch.any(present & ((exps < EXP_MIN) | (exps > EXP_MAX))):
        raise ValueError(f"a windowed scale term is outside 2^{EXP_MIN}..2^{EXP_MAX}")
    return torch.where(present, signs, 0), torch.where(present, exps, 0).to(torch.int16)


def pow2_value(signs: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    return (signs.double() * torch.exp2(exps.double())).sum(-1)


def _nearest_codes(w: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """For w[R, gs] and alpha[R, bits]: bool codes[R, gs, bits] of the nearest signed sum.

    The 2^bits candidate values of each row are sorted once; each weight then finds its neighbours
    by binary search (ties go to the smaller value).
    """
    combos = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=w.dtype)
    values, order = torch.sort(alpha @ combos.T, dim=-1)  # [R, 2^bits]
    hi = torch.searchsorted(values, w).clamp(1, values.shape[-1] - 1)  # [R, gs]
    lo = hi - 1
    v_lo, v_hi = torch.gather(values, 1, lo), torch.gather(values, 1, hi)
    pick = torch.where((w - v_lo).abs() <= (v_hi - w).abs(), lo, hi)
    return combos[torch.gather(order, 1, pick)] > 0  # [R, gs, bits]


def bcq_quantize(
    w: torch.Tensor, cfg: QuantConfig, col_weight: torch.Tensor | None = None, name: str = "weight"
) -> BCQResult:
    """Fit binary planes with power-of-two group scales to ``w[N, K]``.

    ``col_weight[K]`` (>= 0) weights each column's squared error (the activation energy).
    """
    if w.ndim != 2 or min(w.shape) < 1:
        raise WeightError(
            f"{name}: expected a non-empty 2-D weight [N, K], got shape {tuple(w.shape)}"
        )
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise WeightError(
            f"{name}: {bad} weight(s) are NaN or inf; fix or re-export the checkpoint before compiling"
        )
    if col_weight is not None and not torch.isfinite(col_weight).all():
        raise WeightError(
            f"{name}: calibration activations contain NaN or inf; the float model overflows on the "
            "calibration text (check the model, or compile with calibration=None)"
        )
    n, k = w.shape
    gs, bits = cfg.group_size, cfg.bits
    kp = padded_k(k, gs)
    groups = kp // gs
    wd = torch.zeros(n, kp, dtype=torch.float64)
    wd[:, :k] = w.double()
    d = torch.zeros(kp, dtype=torch.float64)
    if col_weight is None:
        d[:k] = 1.0
    else:
        cw = col_weight.double().clamp_min(0)
        d[:k] = cw / cw[cw > 0].mean() if (cw > 0).any() else 1.0
        d[:k] += 1e-6  # dead columns still get a (tiny) say
    R = n * groups
    wg = wd.reshape(R, gs)
    dg = d.reshape(1, groups, gs).expand(n, groups, gs).reshape(R, gs)
    dsum = dg.sum(-1, keepdim=True).clamp_min(1e-30)

    # greedy start
    r = wg.clone()
    codes = torch.empty(R, gs, bits, dtype=torch.bool)
    alpha = torch.empty(R, bits, dtype=torch.float64)
    for b in range(bits):
        s = r >= 0
        a = (dg * r.abs()).sum(-1, keepdim=True) / dsum
        codes[:, :, b] = s
        alpha[:, b] = a[:, 0]
        r = r - a * (s.double() * 2 - 1)

    def sq_error(w, d, codes, alpha):
        """Weighted squared error of every weight, [rows, gs]."""
        approx = ((codes.double() * 2 - 1) * alpha[:, None, :]).sum(-1)
        return d * (w - approx) ** 2

    ts, te = round_scales(alpha, cfg, -1)
    codes = _nearest_codes(wg, pow2_value(ts, te), bits)
    sq = sq_error(wg, dg, codes, pow2_value(ts, te))
    best = (sq.sum(), codes.clone(), ts.clone(), te.clone())
    eye = torch.eye(bits, dtype=torch.float64)
    # Each (row, group) alternates on its own; one whose codes came out unchanged is at a fixed
    # point (the same codes give the same scales, hence the same codes), so later rounds skip it
    # and keep its state and error terms. The kept round is still the one with the lowest total
    # error, summed over every weight as before: the result is that of running every row.
    active = torch.arange(R)
    for _ in range(cfg.iters):
        if not len(active):
            break
        wa, da, ca = wg[active], dg[active], codes[active]
        S = ca.double() * 2 - 1  # [rows, gs, bits]
        A = S.transpose(1, 2) @ (S * da[:, :, None])  # [rows, bits, bits]
        rhs = (S * (da * wa)[:, :, None]).sum(1)  # [rows, bits]
        ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        alpha = torch.linalg.solve(A + ridge[:, None, None] * eye, rhs[:, :, None])[:, :, 0]
        tsa, tea = round_scales(alpha, cfg, -1)
        value = pow2_value(tsa, tea)
        new = _nearest_codes(wa, value, bits)
        codes[active], ts[active], te[active] = new, tsa, tea
        sq[active] = sq_error(wa, da, new, value)
        err = sq.sum()
        if err < best[0]:
            best = (err, codes.clone(), ts.clone(), te.clone())
        active = active[(new != ca).flatten(1).any(1)]
    _, codes, ts, te = best
    codes = codes.reshape(n, groups, gs, bits).permute(3, 0, 1, 2).reshape(bits, n, kp)[:, :, :k]
    ts = ts.reshape(n, groups, bits, cfg.terms).permute(2, 0, 1, 3).contiguous()
    te = te.reshape(n, groups, bits, cfg.terms).permute(2, 0, 1, 3).contiguous()
    return BCQResult(codes=codes.contiguous(), term_signs=ts, term_exps=te, cfg=cfg)
