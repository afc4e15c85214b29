"""LUT GEMM for binary-coded weights with power-of-two scales (CPU, LLVM), with its numpy reference.

``y[m, n] = sum_b sum_g alpha[b, n, g] * sum_{k in group g} B_b[n, k] * x[m, k]``

where ``B_b`` are {-1,+1} bit-planes and every ``alpha`` is a sum of signed powers of two (packed
format: ``schedules/packing.py``). The kernel never multiplies by a weight:

* table build: for each 8 consecutive activations ``x[m, 8j .. 8j+7]`` a table of all 256 signed
  sums ``lut[j, c] = sum_t (bit t of c ? +x : -x)[8j + t]``, built by doubling
  (``lut[c + 2^t] = lut[c] + 2 x_t``, one add per entry);
* lookup + add: each packed byte of a bit-plane indexes its table; the lookups of one scale group are
  summed per plane (``part``);
* shift: each power-of-two term of ``alpha`` is applied to ``part`` by adding to its float exponent
  (integer add on the bit pattern, with underflow to zero), and the terms are added.

Rows of ``x`` are processed ``m_inner`` at a time with the tables laid out ``[j, c, m_inner]`` so
one lookup index (a weight byte) serves ``m_inner`` activation rows with a single contiguous vector
load: prefill and batches vectorize over rows; batch 1 uses ``m_inner = 1`` and interleaves
``n_unroll`` output rows for instruction-level parallelism.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from .packing import EXP_BIAS, dequantize, padded_k

LUT_GROUP = 8  # activations per table (256 entries)
TABLE = 1 << LUT_GROUP


@dataclasses.dataclass(frozen=True)
class LutGemmConfig:
    """A LUT GEMM kernel instance: shapes and weight format. Hashable, JSON-able; key of tuning records."""

    m: int
    n: int
    k: int
    bits: int
    group_size: int
    terms: int
    # terms present in each plane (``packing.plane_term_counts``), when they differ from
    # ``terms``: the kernels that read it skip the absent slots; () = ``terms`` in every plane
    plane_terms: tuple[int, ...] = ()
    # every (row, group)'s scales are integers times one power of two (``packing.shared_exponent_form``):
    # the AVX-512 int8 kernel then adds a group's planes in its lookup loop and shifts once
    shared_exp: bool = False

    def __post_init__(self) -> None:
        for f in ("m", "n", "k", "bits", "terms"):
            if getattr(self, f) < 1:
                raise ValueError(f"LutGemmConfig.{f} must be >= 1, got {getattr(self, f)}")
        pt = tuple(int(t) for t in self.plane_terms)
        if pt and (len(pt) != self.bits or any(not 0 <= t <= self.terms for t in pt)):
            raise ValueError(
                f"LutGemmConfig.plane_terms={pt} needs one count in 0..{self.terms} per plane "
                f"({self.bits})"
            )
        if pt and all(t == self.terms for t in pt):
            pt = ()
        object.__setattr__(self, "plane_terms", pt)  # normalized (JSON gives a list)
        if self.group_size % LUT_GROUP or self.group_size < LUT_GROUP:
            raise ValueError(
                f"group_size must be a positive multiple of {LUT_GROUP}, got {self.group_size}"
            )

    @property
    def kp(self) -> int:
        return padded_k(self.k, self.group_size)

    @property
    def groups(self) -> int:
        return self.kp // self.group_size

    @property
    def term_counts(self) -> tuple[int, ...]:
        """Terms present in each plane."""
        return self.plane_terms or (self.terms,) * self.bits

    @property
    def name(self) -> str:
        t = "".join(map(str, self.plane_terms)) if self.plane_terms else self.terms
        x = "x" if self.shared_exp else ""
        return f"lut_gemm_b{self.bits}_g{self.group_size}_t{t}{x}_m{self.m}_n{self.n}_k{self.k}"

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        if not self.plane_terms:  # (records of uniform configs keep their keys)
            del d["plane_terms"]
        if not self.shared_exp:
            del d["shared_exp"]
        return json.dumps(d, sort_keys=True)


@dataclasses.dataclass(frozen=True)
class LutGemmKnobs:
    """Schedule knobs of the CPU template (explicit, so a tuner can search them)."""

    m_inner: int  # activation rows per table (vector lanes over m); must divide m
    n_unroll: int  # output rows interleaved in the inner loop
    n_chunks: int  # parallel chunks along n (per row block)

    def validate(self, cfg: LutGemmConfig) -> None:
        if cfg.m % self.m_inner:
            raise ValueError(f"m_inner={self.m_inner} does not divide m={cfg.m}")
        if self.n_unroll < 1 or self.n_chunks < 1:
            raise ValueError("n_unroll and n_chunks must be >= 1")


def default_knobs(cfg: LutGemmConfig, threads: int = 2) -> LutGemmKnobs:
    """Rule-based default schedule: widest row vector that divides M, enough parallel tasks."""
    m_inner = next(v for v in (16, 8, 4, 2, 1) if cfg.m % v == 0)
    n_unroll = 8 if m_inner == 1 else 4
    row_blocks = cfg.m // m_inner
    n_tiles = -(-cfg.n // n_unroll)
    n_chunks = max(1, min(n_tiles, -(-2 * threads // row_blocks)))
    return LutGemmKnobs(m_inner=m_inner, n_unroll=n_unroll, n_chunks=n_chunks)


# ----------------------------------------------------------------------------- numpy reference
def reference(
    x: np.ndarray, planes: np.ndarray, scales: np.ndarray, cfg: LutGemmConfig
) -> np.ndarray:
    """float64 ``x @ W.T`` with W the dense weights the packed format means."""
    w = dequantize(planes, scales, cfg.k, cfg.group_size)
    return np.asarray(x, np.float64) @ w.T


# ----------------------------------------------------------------------------- TensorIR kernel
def _shift(p, code):
    """``p * (sign * 2**e)`` for one int8 term code, by exponent arithmetic only (no multiply).

    Zero or denormal ``p`` and results below the normal range give 0; overflow gives +-inf; inf/nan
    pass through; an absent term (code 0) gives 0.
    """
    from tvm import tirx

    c = tirx.Cast("int32", code)
    e = tirx.Select(c < 0, 0 - c, c) - EXP_BIAS
    pb = tirx.reinterpret("int32", p)
    ex = tirx.bitwise_and(tirx.shift_right(pb, 23), 255)
    ne = ex + e
    shifted = tirx.reinterpret("float32", pb + tirx.shift_left(e, 23))
    signbit = tirx.bitwise_and(pb, tirx.const(-(2**31), "int32"))
    inf = tirx.reinterpret("float32", tirx.bitwise_or(signbit, tirx.const(0x7F800000, "int32")))
    zero = tirx.const(0.0, "float32")
    v = tirx.Select(
        ex == 255,
        p,
        tirx.Select(
            ex == 0, zero, tirx.Select(ne <= 0, zero, tirx.Select(ne >= 255, inf, shifted))
        ),
    )
    return tirx.Select(c == 0, zero, tirx.Select(c < 0, zero - v, v))


def make_primfunc(cfg: LutGemmConfig, knobs: LutGemmKnobs | None = None):
    """TensorIR PrimFunc ``(x f32[M,K], planes u8[bits,N,Kp/8], scales i8[bits,N,G,T]) -> y f32[M,N]``."""
    from tvm.script import tirx as T

    knobs = knobs or default_knobs(cfg)
    knobs.validate(cfg)
    M, N, K, BITS, TERMS = cfg.m, cfg.n, cfg.k, cfg.bits, cfg.terms
    GS, G, KB = cfg.group_size, cfg.groups, cfg.kp // LUT_GROUP
    J = GS // LUT_GROUP  # tables per scale group
    MI, U = knobs.m_inner, knobs.n_unroll
    MO = M // MI
    NT = -(-N // U)  # n tiles
    NC = min(knobs.n_chunks, NT)
    TPC = -(-NT // NC)  # tiles per chunk
    ragged_k = K % GS != 0
    shift = _shift

    def xv(xbuf, m, kk):
        """Activation x[m, kk], zero in the padding columns K <= kk < Kp."""
        if not ragged_k:
            return xbuf[m, kk]
        from tvm import tirx

        return tirx.if_then_else(kk < K, xbuf[m, tirx.min(kk, K - 1)], tirx.const(0.0, "float32"))

    @T.prim_func(s_tir=True)
    def lut_gemm(
        x: T.Buffer((M, K), "float32"),
        planes: T.Buffer((BITS, N, KB), "uint8"),
        scales: T.Buffer((BITS, N, G, TERMS), "int8"),
        y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            for task in T.parallel(MO * NC):
                lut = T.sblock_alloc_buffer((J, TABLE, MI), "float32")
                yl = T.sblock_alloc_buffer((TPC * U, MI), "float32")
                acc = T.sblock_alloc_buffer((U, MI), "float32")
                for r in range(TPC * U):
                    for mi in T.vectorized(MI):
                        yl[r, mi] = T.float32(0)
                for g in range(G):
                    # tables of this scale group, by doubling: lut[c + 2^t] = lut[c] + 2 x_t
                    for jj in range(J):
                        for mi in T.vectorized(MI):
                            lut[jj, 0, mi] = T.float32(0)
                        for t in range(LUT_GROUP):
                            for mi in T.vectorized(MI):
                                lut[jj, 0, mi] = lut[jj, 0, mi] - xv(
                                    x, task // NC * MI + mi, g * GS + jj * LUT_GROUP + t
                                )
                        for t in range(LUT_GROUP):
                            for c in range(1 << t):
                                for mi in T.vectorized(MI):
                                    lut[jj, c + (1 << t), mi] = (
                                        lut[jj, c, mi]
                                        + xv(x, task // NC * MI + mi, g * GS + jj * LUT_GROUP + t)
                                        + xv(x, task // NC * MI + mi, g * GS + jj * LUT_GROUP + t)
                                    )
                    # lookups + adds per bit-plane, then the power-of-two scale terms as shifts
                    for tile in range(TPC):
                        for b in range(BITS):
                            for u in T.unroll(U):
                                for mi in T.vectorized(MI):
                                    acc[u, mi] = T.float32(0)
                            for jj in range(J):
                                for u in T.unroll(U):
                                    for mi in T.vectorized(MI):
                                        acc[u, mi] = (
                                            acc[u, mi]
                                            + lut[
                                                jj,
                                                T.Cast(
                                                    "int32",
                                                    planes[
                                                        b,
                                                        T.min(
                                                            (task % NC * TPC + tile) * U + u, N - 1
                                                        ),
                                                        g * J + jj,
                                                    ],
                                                ),
                                                mi,
                                            ]
                                        )
                            for u in T.unroll(U):
                                for t in range(TERMS):
                                    for mi in T.vectorized(MI):
                                        yl[tile * U + u, mi] = yl[tile * U + u, mi] + shift(
                                            acc[u, mi],
                                            scales[
                                                b,
                                                T.min((task % NC * TPC + tile) * U + u, N - 1),
                                                g,
                                                t,
                                            ],
                                        )
                for r in range(TPC * U):
                    for mi in range(MI):
                        if (task % NC * TPC) * U + r < N:
                            y[task // NC * MI + mi, (task % NC * TPC) * U + r] = yl[r, mi]

    return lut_gemm.with_attr("global_symbol", cfg.name)
