"""Shift GEMM: weights rounded to ``sign * 2^p`` (one power of two per weight), CPU kernel + reference.

``y[m, n] = sum_g 2^base[n, g] * sum_{k in group g} s[n, k] * x[m, k] * 2^(e[n, k] - 7)``

Packed format (``ShiftPacked``):

``codes``: ``uint8[N, Kp // 2]``
    One 4-bit code per weight; column ``k`` lives in byte ``k // 2``, low nibble for even ``k``,
    high nibble for odd ``k``. A nibble ``c`` holds the magnitude ``e = c & 7`` and the sign
    ``c >> 3`` (1 = negative). ``e == 0`` is a zero weight (whatever the sign bit); otherwise the
    weight is ``(-1)^(c >> 3) * 2^(base[n, g] + e - 7)``: seven exponents ``base - 6 ... base``.
    ``Kp = ceil(K / group_size) * group_size``; padding nibbles are 0.
``base``: ``int8[N, Kp // group_size]``
    The power of two of each (row, column group) as one term code of ``packing.py``
    (``c = exponent + EXP_BIAS``, ``0`` = the whole group is zero).

Storage: ``4 + 8 / group_size`` bits per weight.

The kernel never multiplies by a weight. Activations are stored once as their float32 bit
patterns, transposed to ``xt[m_block, k, m_inner]``; values with ``|x| < 2^-120`` (including 0 and
the zero padding) are flushed to ``+2^-120`` so that the exponent field stays >= 7 and no
shift below can leave the normal range (their contribution is at most ``2^-120`` per term,
numerically zero). Per weight and activation the kernel does

* an integer add of ``(e - 7) << 23`` to the bit pattern (an exponent add = a right shift by
  ``7 - e``), a sign flip (``-v``, a sign-bit change) and a select for zero weights;
* a float add into the accumulator of its group.

Each group's sum is then scaled by ``2^base`` with the exponent-add helper of the LUT kernel
(``lut_gemm._shift``). Rows of ``x`` run ``m_inner`` at a time in vector lanes; ``n_unroll``
output rows share each activation vector load.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from .packing import EXP_BIAS, EXP_MAX, EXP_MIN, padded_k

MAG_LEVELS = 7  # magnitudes e = 1..7 -> 2^(base - 6) ... 2^base
FLUSH_BITS = 7 << 23  # bit pattern of 2^-120: the smallest activation magnitude kept
ROUNDINGS = ("linear", "log")


@dataclasses.dataclass(frozen=True)
class ShiftPacked:
    """A Linear weight ``W[N, K]`` in the shift format above."""

    codes: np.ndarray  # uint8[N, Kp // 2]
    base: np.ndarray  # int8[N, G]
    n: int
    k: int
    group_size: int

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.base.nbytes)

    def dequantize(self) -> np.ndarray:
        return dequantize(self.codes, self.base, self.k, self.group_size)


@dataclasses.dataclass(frozen=True)
class ShiftGemmConfig:
    """One shift GEMM kernel: shapes and group size. Hashable, JSON-able."""

    m: int
    n: int
    k: int
    group_size: int

    def __post_init__(self) -> None:
        for f in ("m", "n", "k"):
            if getattr(self, f) < 1:
                raise ValueError(f"ShiftGemmConfig.{f} must be >= 1, got {getattr(self, f)}")
        gs = self.group_size
        if gs < 2 or gs % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {gs}")

    @property
    def kp(self) -> int:
        return padded_k(self.k, self.group_size)

    @property
    def groups(self) -> int:
        return self.kp // self.group_size

    @property
    def name(self) -> str:
        return f"shift_gemm_g{self.group_size}_m{self.m}_n{self.n}_k{self.k}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@dataclasses.dataclass(frozen=True)
class ShiftGemmKnobs:
    m_inner: int  # activation rows per vector (must divide m)
    n_unroll: int  # output rows sharing one activation load
    n_chunks: int  # parallel chunks along n per row block


def default_knobs(cfg: ShiftGemmConfig, threads: int = 2) -> ShiftGemmKnobs:
    m_inner = next(v for v in (16, 8, 4, 2, 1) if cfg.m % v == 0)
    n_unroll = 4 if m_inner > 1 else 8
    row_blocks = cfg.m // m_inner
    n_tiles = -(-cfg.n // n_unroll)
    n_chunks = max(1, min(n_tiles, -(-2 * threads // row_blocks)))
    return ShiftGemmKnobs(m_inner, n_unroll, n_chunks)


# ----------------------------------------------------------------------------- format
def pack(signs: np.ndarray, mags: np.ndarray, base_exp: np.ndarray, group_size: int):
    """signs bool[N, K] (True = negative), mags int[N, K] in 0..7, base_exp int[N, G] (or None
    where a group is all zero: pass ``EXP_MIN - 1``) -> (codes uint8[N, Kp/2], base int8[N, G])."""
    n, k = mags.shape
    kp = padded_k(k, group_size)
    if np.any((mags < 0) | (mags > MAG_LEVELS)):
        raise ValueError(f"magnitude codes must lie in 0..{MAG_LEVELS}")
    nib = np.zeros((n, kp), np.uint8)
    nib[:, :k] = (mags.astype(np.uint8) & 7) | (np.asarray(signs, bool).astype(np.uint8) << 3)
    nib[:, :k][mags == 0] = 0
    codes = nib[:, 0::2] | (nib[:, 1::2] << 4)
    be = np.asarray(base_exp, np.int64)
    zero = be < EXP_MIN
    if np.any(be[~zero] > EXP_MAX):
        raise ValueError(f"base exponent above {EXP_MAX}")
    base = np.where(zero, 0, be + EXP_BIAS).astype(np.int8)
    return np.ascontiguousarray(codes), base


def unpack(codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """codes uint8[N, Kp/2] -> (negative bool[N, K], magnitude int[N, K] in 0..7)."""
    c = np.asarray(codes)
    nib = np.empty((c.shape[0], c.shape[1] * 2), np.uint8)
    nib[:, 0::2] = c & 15
    nib[:, 1::2] = c >> 4
    nib = nib[:, :k]
    return (nib >> 3).astype(bool), (nib & 7).astype(np.int64)


def dequantize(codes: np.ndarray, base: np.ndarray, k: int, group_size: int) -> np.ndarray:
    """Packed shift weights -> dense float64 ``W[N, K]`` (the weights the kernel means)."""
    neg, mag = unpack(codes, k)
    b = np.asarray(base).astype(np.int64)
    scale = np.where(b == 0, 0.0, np.exp2(b - EXP_BIAS))  # [N, G]
    per_col = np.repeat(scale, group_size, axis=1)[:, :k]
    val = np.where(mag == 0, 0.0, np.exp2(mag - MAG_LEVELS)) * per_col
    return np.where(neg, -val, val)


# ----------------------------------------------------------------------------- fit
def _round_to_grid(a: np.ndarray, base: np.ndarray, rounding: str) -> np.ndarray:
    """|w| [.., cols] with per-entry base exponent -> magnitude codes 0..7."""
    with np.errstate(divide="ignore"):
        rel = np.log2(np.maximum(a, 1e-300)) - base  # log2(|w| / 2^base), <= ~0.5
    if rounding == "log":
        e = np.rint(rel) + MAG_LEVELS
        # zero below the geometric middle of 0 and the smallest level: log-domain rounding
        zero = rel < (1 - MAG_LEVELS) - 0.5
    else:  # nearest value in the linear domain: thresholds at 1.5 * 2^p, zero below 2^(min)/2
        p = np.floor(rel)
        frac = np.exp2(rel - p)  # in [1, 2)
        e = p + (frac >= 1.5) + MAG_LEVELS
        zero = rel < (1 - MAG_LEVELS) - 1
    e = np.clip(e, 1, MAG_LEVELS)
    return np.where(zero | (a == 0), 0, e).astype(np.int64)


def fit_shift(
    w: np.ndarray,
    group_size: int = 128,
    rounding: str = "linear",
    col_weight: np.ndarray | None = None,
) -> ShiftPacked:
    """Round ``W[N, K]`` to ``sign * 2^p`` with a per-(row, group) window of seven exponents.

    The window's top exponent ``base`` is chosen per group among ``floor``/``ceil`` of
    ``log2 max|w|`` (and one below) by the (``col_weight``-weighted) squared error; ``rounding`` is
    ``linear`` (nearest value) or ``log`` (nearest exponent).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r} is not one of {ROUNDINGS}")
    w = np.asarray(w, np.float64)
    n, k = w.shape
    kp = padded_k(k, group_size)
    g = kp // group_size
    a = np.zeros((n, kp))
    a[:, :k] = np.abs(w)
    cw = np.ones(kp) if col_weight is None else np.concatenate([col_weight, np.zeros(kp - k)])
    ag = a.reshape(n, g, group_size)
    cwg = cw.reshape(1, g, group_size)
    amax = ag.max(-1)
    with np.errstate(divide="ignore"):
        top = np.floor(np.log2(np.maximum(amax, 1e-300)))
    best_err = np.full((n, g), np.inf)
    best_base = top.copy()
    best_mag = np.zeros((n, g, group_size), np.int64)
    for cand in (top - 1, top, top + 1):
        cand = np.clip(cand, EXP_MIN, EXP_MAX)
        mag = _round_to_grid(ag, cand[..., None], rounding)
        val = np.where(mag == 0, 0.0, np.exp2(mag - MAG_LEVELS + cand[..., None]))
        err = (((ag - val) ** 2) * cwg).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_base = np.where(better, cand, best_base)
        best_mag = np.where(better[..., None], mag, best_mag)
    mags = best_mag.reshape(n, kp)[:, :k]
    all_zero = (best_mag == 0).all(-1)
    base_exp = np.where(all_zero, EXP_MIN - 1, best_base).astype(np.int64)
    codes, base = pack(w < 0, mags, base_exp, group_size)
    return ShiftPacked(codes, base, n, k, group_size)


def fit_shift_gptq(
    w: np.ndarray, hessian: np.ndarray, group_size: int = 128, rounding: str = "linear"
) -> ShiftPacked:
    """``fit_shift``'s grid (per-group bases from the diag(H)-weighted fit), with GPTQ's error
    feedback choosing each weight's power of two (output objective, ``hessian = X^T X / n``)."""
    import torch

    from ..gptq import gptq_loop

    w = np.asarray(w, np.float64)
    n, k = w.shape
    init = fit_shift(w, group_size, rounding, np.diag(hessian))
    bexp = np.asarray(init.base).astype(np.int64)
    zero_group = bexp == 0
    base_e = np.where(zero_group, 0, bexp - EXP_BIAS)
    mags = np.zeros((n, k), np.int64)

    def pick(j: int, col: torch.Tensor) -> torch.Tensor:
        g = j // group_size
        c = col.numpy()
        m = _round_to_grid(np.abs(c), base_e[:, g], rounding)
        m[zero_group[:, g]] = 0
        mags[:, j] = m
        val = np.where(m == 0, 0.0, np.exp2(m - MAG_LEVELS + base_e[:, g]))
        return torch.from_numpy(np.where(c < 0, -val, val))

    q = gptq_loop(torch.from_numpy(w), torch.as_tensor(hessian), pick).numpy()
    base_exp = np.where(zero_group, EXP_MIN - 1, base_e)
    codes, base = pack(q < 0, np.where(q == 0, 0, mags), base_exp, group_size)
    return ShiftPacked(codes, base, n, k, group_size)


# ----------------------------------------------------------------------------- numpy reference
def reference(x: np.ndarray, packed: ShiftPacked) -> np.ndarray:
    """float64 ``x @ W.T`` with ``W`` the weights the packed format means."""
    return np.asarray(x, np.float64) @ packed.dequantize().T


# ----------------------------------------------------------------------------- TensorIR kernel
def make_primfunc(cfg: ShiftGemmConfig, knobs: ShiftGemmKnobs | None = None):
    """TensorIR ``(x f32[M, K], codes u8[N, Kp/2], base i8[N, G]) -> y f32[M, N]``."""
    from tvm import tirx
    from tvm.script import tirx as T

    from .lut_gemm import _shift

    knobs = knobs or default_knobs(cfg)
    if cfg.m % knobs.m_inner:
        raise ValueError(f"m_inner={knobs.m_inner} does not divide m={cfg.m}")
    M, N, K = cfg.m, cfg.n, cfg.k
    GS, G, KP = cfg.group_size, cfg.groups, cfg.kp
    MI, U = knobs.m_inner, knobs.n_unroll
    MO = M // MI
    NT = -(-N // U)
    NC = min(knobs.n_chunks, NT)
    TPC = -(-NT // NC)
    flush = tirx.const(FLUSH_BITS, "int32")
    zero = tirx.const(0.0, "float32")

    def x_bits(xbuf, m, kk):
        """float bits of x[m, kk] with |x| < 2^-120 (and the padding kk >= K) flushed to 2^-120."""
        v = xbuf[m, tirx.min(kk, K - 1)] if KP != K else xbuf[m, kk]
        b = tirx.reinterpret("int32", v)
        small = tirx.bitwise_and(b, tirx.const(0x7F800000, "int32")) < flush
        if KP != K:
            small = tirx.Or(small, kk >= K)
        return tirx.Select(small, flush, b)

    def term(xt_val, code):
        """s * x * 2^(e - 7) for one nibble: exponent add on the bits, sign flip, zero select."""
        c = tirx.Cast("int32", code)
        e = tirx.bitwise_and(c, 7)
        v = tirx.reinterpret("float32", xt_val + tirx.shift_left(e - 7, 23))
        return tirx.Select(e == 0, zero, tirx.Select(c >= 8, zero - v, v))

    def nibble(codes, n, kk):
        byte = codes[n, kk // 2]
        return tirx.bitwise_and(
            tirx.shift_right(byte, tirx.Cast("uint8", (kk % 2) * 4)), tirx.const(15, "uint8")
        )

    @T.prim_func(s_tir=True)
    def shift_gemm(
        x: T.Buffer((M, K), "float32"),
        codes: T.Buffer((N, KP // 2), "uint8"),
        base: T.Buffer((N, G), "int8"),
        y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            xt = T.sblock_alloc_buffer((MO, KP, MI), "int32")
            for mo in T.parallel(MO):
                for kk in range(KP):
                    for mi in T.vectorized(MI):
                        xt[mo, kk, mi] = x_bits(x, mo * MI + mi, kk)
            for task in T.parallel(MO * NC):
                acc = T.sblock_alloc_buffer((U, MI), "float32")
                yl = T.sblock_alloc_buffer((U, MI), "float32")
                for tile in range(TPC):
                    for u in T.unroll(U):
                        for mi in T.vectorized(MI):
                            yl[u, mi] = T.float32(0)
                    for g in range(G):
                        for u in T.unroll(U):
                            for mi in T.vectorized(MI):
                                acc[u, mi] = T.float32(0)
                        for kk in range(GS):
                            for u in T.unroll(U):
                                for mi in T.vectorized(MI):
                                    acc[u, mi] = acc[u, mi] + term(
                                        xt[task // NC, g * GS + kk, mi],
                                        nibble(
                                            codes,
                                            T.min((task % NC * TPC + tile) * U + u, N - 1),
                                            g * GS + kk,
                                        ),
                                    )
                        for u in T.unroll(U):
                            for mi in T.vectorized(MI):
                                yl[u, mi] = yl[u, mi] + _shift(
                                    acc[u, mi],
                                    base[T.min((task % NC * TPC + tile) * U + u, N - 1), g],
                                )
                    for u in range(U):
                        for mi in range(MI):
                            if (task % NC * TPC + tile) * U + u < N:
                                y[task // NC * MI + mi, (task % NC * TPC + tile) * U + u] = yl[
                                    u, mi
                                ]

    return shift_gemm.with_attr("global_symbol", cfg.name)
