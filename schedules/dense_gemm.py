"""Dense float32 GEMM ``y[m, n] = sum_k x[m, k] * W[n, k]`` for weights the rewrite keeps dense (CPU).

Used for matmuls that stay dense on purpose (the output head); without it, Relax's default CPU
legalization runs them as unscheduled single-thread loops (23 s for SmolLM2's head at 128 tokens).
``W`` keeps its ``[N, K]`` layout (no transposed copy). ``x`` is first transposed into row blocks
``xt[mo, k, mi]`` so that each weight element is a scalar broadcast against ``m_inner`` rows in one
vector FMA; ``n_unroll`` weight rows are interleaved for register reuse. This is the multiply path
the project exists to avoid, and the compile record lists every matmul that takes it.
Weights may be stored as float16 (``DenseGemmConfig.w_dtype``; products and sums in float32):
the decode steps' one-row GEMV then streams half the bytes (``compile(head_storage=...)``).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class DenseGemmConfig:
    m: int
    n: int
    k: int
    w_dtype: str = "float32"  # storage of W; "float16" is widened to float32 in the inner loop

    def __post_init__(self):
        if self.w_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"w_dtype={self.w_dtype!r}: one of {WEIGHT_DTYPES}")

    @property
    def name(self) -> str:
        wt = "" if self.w_dtype == "float32" else "_wf16"
        return f"dense_gemm_m{self.m}_n{self.n}_k{self.k}{wt}"


WEIGHT_DTYPES = ("float32", "float16")


def prefetch_read(address):
    """``llvm.prefetch`` of the cache line at ``address``: a read, kept in every cache level
    (``prefetcht0`` on x86), data. Wrap in ``T.evaluate``; the address must lie in its buffer."""
    from tvm import tirx

    i32 = "int32"
    return tirx.call_llvm_intrin(
        "void",
        "llvm.prefetch.p0",
        address,
        tirx.const(0, i32),
        tirx.const(3, i32),
        tirx.const(1, i32),
    )


def reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """float64 ``x @ W.T`` of the values as stored (a float16 ``W`` is widened exactly)."""
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


def make_primfunc(cfg: DenseGemmConfig, m_inner: int | None = None, n_unroll: int = 4):
    """TensorIR PrimFunc ``(x f32[M, K], w f32|f16[N, K]) -> y f32[M, N]`` (float32 products and
    sums). Each ``n_unroll``-row tile of ``w`` is first copied (widened) into a float32 buffer
    that all row blocks of ``x`` then read."""
    from tvm.script import tirx as T

    if cfg.m == 1 and m_inner is None:
        return make_gemv_primfunc(cfg)
    M, N, K, WD = cfg.m, cfg.n, cfg.k, cfg.w_dtype
    MI = m_inner or next(v for v in (16, 8, 4, 2, 1) if M % v == 0)
    if M % MI:
        raise ValueError(f"m_inner={MI} does not divide m={M}")
    MO, U = M // MI, n_unroll
    NT = -(-N // U)

    @T.prim_func(s_tir=True)
    def dense_gemm(
        x: T.Buffer((M, K), "float32"),
        w: T.Buffer((N, K), WD),
        y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            xt = T.sblock_alloc_buffer((MO, K, MI), "float32")
            for mo in T.parallel(MO):
                for k in range(K):
                    for mi in T.vectorized(MI):
                        xt[mo, k, mi] = x[mo * MI + mi, k]
            for nt in T.parallel(NT):
                acc = T.sblock_alloc_buffer((U, MI), "float32")
                wt = T.sblock_alloc_buffer((U, K), "float32")  # this tile's rows, widened once
                for u in T.unroll(U):
                    for k in T.vectorized(K):
                        wt[u, k] = T.Cast("float32", w[T.min(nt * U + u, N - 1), k])
                for mo in range(MO):
                    for u in T.unroll(U):
                        for mi in T.vectorized(MI):
                            acc[u, mi] = T.float32(0)
                    for k in range(K):
                        for u in T.unroll(U):
                            for mi in T.vectorized(MI):
                                acc[u, mi] = acc[u, mi] + xt[mo, k, mi] * wt[u, k]
                    for u in T.unroll(U):
                        for mi in range(MI):
                            if nt * U + u < N:
                                y[mo * MI + mi, nt * U + u] = acc[u, mi]

    return dense_gemm.with_attr("global_symbol", cfg.name)


PREFETCH_ROWS = 64  # the GEMV prefetches the weight rows this far ahead of its tile


def make_gemv_primfunc(
    cfg: DenseGemmConfig, lanes: int = 16, n_unroll: int = 4, prefetch_rows: int = PREFETCH_ROWS
):
    """``M = 1`` (one decode token): ``y[0, n] = <x, W[n, :]>`` reading each weight row once,
    contiguously, ``lanes`` columns per vector FMA into ``n_unroll`` rows' accumulators, then one
    horizontal sum per row; a ``K % lanes`` tail is done per element. The GEMM above keeps
    ``m_inner = 1`` lanes at M = 1 (scalar FMAs; 3-4 GB/s on SmolLM2's 113 MB head).

    The GEMV only streams ``W`` (memory-bound at one thread), so a float16 ``W``
    (``cfg.w_dtype``) halves its time: each vector of ``lanes`` halves is widened to float32
    (x86 ``vcvtph2ps``, F16C / AVX-512F; no half arithmetic) before the float32 FMA.

    Each tile first prefetches (``llvm.prefetch``, one per cache line) the rows ``prefetch_rows``
    ahead, so the loads of a tile find them in cache; 0 turns it off. On the 2-vCPU Xeon (no VBMI),
    one thread, SmolLM2's float16 head (49152 x 576): 7.1 -> 5.8 ms (8.0 -> 9.8 GB/s, against
    ~10.9 GB/s measured read bandwidth); 16 to 64 rows ahead gave 5.7-6.2 ms, 256 rows 6.0-6.3 ms
    (two runs, 3 alternating rounds each)."""
    from tvm.script import tirx as T

    N, K, V, U, WD = cfg.n, cfg.k, lanes, n_unroll, cfg.w_dtype
    KV, TAIL = K // lanes, K % lanes
    NT = -(-N // U)
    per_line = 64 // (2 if WD == "float16" else 4)  # weights per 64-byte cache line
    LINES = -(-U * K // per_line) if prefetch_rows > 0 else 0  # lines of one row tile
    AHEAD = prefetch_rows

    @T.prim_func(s_tir=True)
    def dense_gemv(
        x: T.Buffer((1, K), "float32"),
        w: T.Buffer((N, K), WD),
        y: T.Buffer((1, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            for nt in T.parallel(NT):
                acc = T.sblock_alloc_buffer((U, V), "float32")
                for u in T.unroll(U):
                    for v in T.vectorized(V):
                        acc[u, v] = T.float32(0)
                for line in range(LINES):  # the tile AHEAD rows on (clamped: any valid address)
                    T.evaluate(
                        prefetch_read(
                            T.address_of(
                                w[
                                    T.min(nt * U + AHEAD + (line * per_line) // K, N - 1),
                                    (line * per_line) % K,
                                ]
                            )
                        )
                    )
                for ko in range(KV):
                    for u in T.unroll(U):
                        for v in T.vectorized(V):
                            acc[u, v] = acc[u, v] + x[0, ko * V + v] * T.Cast(
                                "float32", w[T.min(nt * U + u, N - 1), ko * V + v]
                            )
                for u in T.unroll(U):
                    for t in range(TAIL):
                        acc[u, 0] = acc[u, 0] + x[0, KV * V + t] * T.Cast(
                            "float32", w[T.min(nt * U + u, N - 1), KV * V + t]
                        )
                for u in T.unroll(U):
                    if nt * U + u < N:
                        y[0, nt * U + u] = T.float32(0)
                        for v in range(V):
                            y[0, nt * U + u] = y[0, nt * U + u] + acc[u, v]

    return dense_gemv.with_attr("global_symbol", cfg.name)


def make_nt_primfunc(cfg: DenseGemmConfig):
    """Unscheduled ``(x f32[M, K], w f32[N, K]) -> y f32[M, N]`` for GPU targets, where Relax's dlight
    rules schedule it: reading ``W[N, K]`` in place keeps constant folding from storing a transposed
    copy of the weight (113 MB for SmolLM2's head, which is also its embedding table)."""
    from tvm import te

    x = te.placeholder((cfg.m, cfg.k), "float32", name="x")
    w = te.placeholder((cfg.n, cfg.k), "float32", name="w")
    r = te.reduce_axis((0, cfg.k), "r")
    y = te.compute((cfg.m, cfg.n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="y")
    return te.create_prim_func([x, w, y]).with_attr("global_symbol", cfg.name)
