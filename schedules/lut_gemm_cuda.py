"""LUT GEMM for NVIDIA GPUs (CUDA), same packed weights as the CPU kernel in a coalesced layout.

``y[m, n] = sum_b sum_g alpha[b, n, g] * sum_{k in group g} B_b[n, k] * x[m, k]``

Mapping (one thread block per 32 output rows and one activation row ``m``):

* ``threadIdx.x`` (32 lanes, one warp) walks 32 consecutive output rows ``n``; ``threadIdx.y``
  (``k_slices`` warps) splits the scale groups along K (group ``g`` goes to warp ``g % k_slices``),
  and the warps' partial sums are added through shared memory at the end.
* Tables: for every 4 consecutive activations ``x[m, 4j .. 4j+3]`` a 16-entry table of all signed
  sums ``lut[j, c] = sum_t (bit t of c ? +x : -x)[4j + t]`` (sign patterns are compile-time
  constants, so each entry is 3 adds). Each lane builds whole tables in registers and stores them to
  shared memory with a row pitch of 17 words: the stores of 32 lanes (tables ``j .. j+31``, same
  entry) fall into 32 different banks, and the lookups of a warp (one table, entries 0..15) into 16
  different banks, so neither has bank conflicts.
* Weights: bit-planes as ``uint32[bits, Kp/32, N]`` (word ``w`` of row ``n`` holds columns
  ``32w .. 32w+31``, bit ``i`` = column ``32w + i``): the 32 lanes of a warp read 32 consecutive
  words, one 128-byte transaction. Each nibble of a word indexes one table (lookup + add).
* Scales: ``int8[bits, G, terms, N]`` (coalesced the same way); each power-of-two term is applied to
  the group's partial sum by adding to its float exponent (``lut_gemm._shift``), never a multiply.

Any M, N, K: rows past N and groups past G read clamped addresses and contribute nothing; columns
``K <= k < Kp`` read zero activations. ``group_size`` must be a multiple of 32 (whole words).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .lut_gemm import LutGemmConfig, _shift
from .packing import EXP_BIAS, planes_to_cuda, scales_to_cuda  # noqa: F401 - layouts read here

WARP = 32
NIBBLE = 4
ENTRIES = 1 << NIBBLE
PITCH = ENTRIES + 1  # padded table row: conflict-free stores and lookups
SMEM_LIMIT = 48 * 1024  # static shared memory per block


def table_bytes(k_slices: int, group_size: int) -> int:
    """Shared memory for the tables of ``k_slices`` warps (one scale group each)."""
    return k_slices * (group_size // NIBBLE) * PITCH * 4


@dataclasses.dataclass(frozen=True)
class CudaKnobs:
    """Schedule knobs of the CUDA template (data, so a tuner can search them)."""

    k_slices: int = 8  # warps per block splitting the scale groups along K
    # "" = the LUT kernel; "float16"/"float32" = dequantize (multiplication-free) to dense weights
    # of that dtype, then a dense GEMM scheduled by dlight (tensor cores for float16): for large M
    dense: str = ""

    def validate(self, cfg: LutGemmConfig) -> None:
        if self.dense not in ("", "float16", "float32"):
            raise ValueError(f"dense must be '', 'float16' or 'float32', got {self.dense!r}")
        if self.k_slices < 1 or self.k_slices > 32:
            raise ValueError(f"k_slices must be in 1..32, got {self.k_slices}")
        smem = table_bytes(self.k_slices, cfg.group_size)
        if smem > SMEM_LIMIT:
            raise ValueError(
                f"k_slices={self.k_slices} at group_size {cfg.group_size} needs {smem} bytes of "
                "shared memory for tables (at most 48 KiB)"
            )


# default rule: from this M on, dequantize + dense float16 GEMM. H200 (reports/gpu/): 4096x4096
# 3 bits, LUT vs dequantize + fp16 GEMM: M=8 43 vs 206 us, M=32 154 vs 219, M=128 579 vs 228
DENSE_FROM_M = 64


def default_cuda_knobs(cfg: LutGemmConfig) -> CudaKnobs:
    """Rule (from the H200 measurements in tuning_logs/): at M=1 the most warps per block that the
    scale groups and shared memory allow; from ``DENSE_FROM_M`` rows on, dequantize + dense GEMM."""
    if cfg.m >= DENSE_FROM_M:
        return CudaKnobs(dense="float16")
    ks = max(1, min(16, cfg.groups))
    while ks > 1 and table_bytes(ks, cfg.group_size) > SMEM_LIMIT:
        ks //= 2
    return CudaKnobs(k_slices=ks)


def candidate_cuda_knobs(cfg: LutGemmConfig) -> list[CudaKnobs]:
    """The search space a GPU tuning run measures (the default first). Up to 16 warps: the tables
    of 16 warps at group size 128 take 34 KiB of the 48 KiB of static shared memory."""
    default = default_cuda_knobs(cfg)
    out = [default]
    for ks in (2, 4, 8, 16):
        kn = CudaKnobs(k_slices=min(ks, cfg.groups))
        if kn not in out and table_bytes(kn.k_slices, cfg.group_size) <= SMEM_LIMIT:
            out.append(kn)
    if cfg.m > 1:
        out += [
            kn for kn in (CudaKnobs(dense="float16"), CudaKnobs(dense="float32")) if kn not in out
        ]
    return out


def check_cuda_config(cfg: LutGemmConfig) -> None:
    if cfg.group_size % WARP:
        raise ValueError(
            f"the CUDA kernel needs group_size to be a multiple of {WARP}, got {cfg.group_size}; "
            "quantize with --group-size 32, 64, 128 or 256"
        )


# ----------------------------------------------------------------------------- TensorIR kernel
def make_cuda_primfunc(cfg: LutGemmConfig, knobs: CudaKnobs | None = None):
    """TensorIR PrimFunc ``(x f32[M,K], planes u32[bits,Kp/32,N], scales i8[bits,G,T,N]) -> y
    f32[M,N]``, already bound to CUDA threads (marked scheduled so dlight leaves it alone)."""
    from tvm import tirx
    from tvm.script import tirx as T

    check_cuda_config(cfg)
    knobs = knobs or default_cuda_knobs(cfg)
    knobs.validate(cfg)
    if knobs.dense:
        raise ValueError("dense knobs select make_dequant_primfunc + a GEMM, not the LUT kernel")
    M, N, K, BITS, TERMS = cfg.m, cfg.n, cfg.k, cfg.bits, cfg.terms
    GS, G = cfg.group_size, cfg.groups
    KW = cfg.kp // WARP  # words per row and plane
    WG = GS // WARP  # words per group
    J = GS // NIBBLE  # tables per group
    JT = -(-J // WARP)  # table-building rounds per lane
    KS = knobs.k_slices
    GI = -(-G // KS)  # group rounds per warp
    NB = -(-N // WARP)
    ragged_k = K % GS != 0
    shift = _shift
    zero = tirx.const(0.0, "float32")

    def xv(xbuf, m, kk):
        if not ragged_k:
            return xbuf[m, tirx.min(kk, K - 1)]
        return tirx.if_then_else(kk < K, xbuf[m, tirx.min(kk, K - 1)], zero)

    def entry(xs, c):
        """Table entry c: sum_t (bit t of c ? +x_t : -x_t); c is an unrolled loop variable, so the
        selects fold to fixed signs."""
        e = tirx.Select(tirx.bitwise_and(c, 1) != 0, xs[0], zero - xs[0])
        for t in range(1, NIBBLE):
            e = e + tirx.Select(tirx.bitwise_and(c, 1 << t) != 0, xs[t], zero - xs[t])
        return e

    def word_sum(lutbuf, s, w, word):
        """Sum of the 8 table lookups one 32-bit weight word selects, as a balanced tree (short
        dependency chains)."""
        vals = [
            lutbuf[s, w * 8 + q, tirx.Cast("int32", (word >> tirx.const(4 * q, "uint32")) & 15)]
            for q in range(8)
        ]
        while len(vals) > 1:
            vals = [vals[i] + vals[i + 1] for i in range(0, len(vals), 2)]
        return vals[0]

    @T.prim_func(s_tir=True)
    def lut_gemm_cuda(
        x: T.Buffer((M, K), "float32"),
        planes: T.Buffer((BITS, KW, N), "uint32"),
        scales: T.Buffer((BITS, G, TERMS, N), "int8"),
        y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            lut = T.sblock_alloc_buffer((KS, J, PITCH), "float32", scope="shared")
            red = T.sblock_alloc_buffer((KS, WARP), "float32", scope="shared")
            xs = T.sblock_alloc_buffer((NIBBLE,), "float32", scope="local")
            acc = T.sblock_alloc_buffer((1,), "float32", scope="local")
            part = T.sblock_alloc_buffer((BITS,), "float32", scope="local")
            wv = T.sblock_alloc_buffer((BITS * WG,), "uint32", scope="local")
            sv = T.sblock_alloc_buffer((BITS * TERMS,), "int8", scope="local")
            for m in T.thread_binding(M, thread="blockIdx.y"):
                for nb in T.thread_binding(NB, thread="blockIdx.x"):
                    for s in T.thread_binding(KS, thread="threadIdx.y"):
                        for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                            acc[0] = T.float32(0)
                            for gi in range(GI):
                                # prefetch the group's weight words and scale codes: their
                                # latency overlaps the table build below
                                for b in T.unroll(BITS):
                                    for w in T.unroll(WG):
                                        wv[b * WG + w] = planes[
                                            b,
                                            T.min(gi * KS + s, G - 1) * WG + w,
                                            T.min(nb * WARP + lane, N - 1),
                                        ]
                                    for t in T.unroll(TERMS):
                                        sv[b * TERMS + t] = T.if_then_else(
                                            gi * KS + s < G,
                                            scales[
                                                b,
                                                T.min(gi * KS + s, G - 1),
                                                t,
                                                T.min(nb * WARP + lane, N - 1),
                                            ],
                                            T.int8(0),
                                        )
                                # this warp's group g = gi * KS + s: its tables, one per lane
                                for jt in range(JT):
                                    if jt * WARP + lane < J:
                                        for t in T.unroll(NIBBLE):
                                            xs[t] = xv(
                                                x,
                                                m,
                                                (gi * KS + s) * GS
                                                + (jt * WARP + lane) * NIBBLE
                                                + t,
                                            )
                                        for c in T.unroll(ENTRIES):
                                            lut[s, jt * WARP + lane, c] = entry(xs, c)
                                # lookups + adds: independent chains per bit-plane
                                for b in T.unroll(BITS):
                                    part[b] = T.float32(0)
                                    for w in T.unroll(WG):
                                        part[b] = part[b] + word_sum(lut, s, w, wv[b * WG + w])
                                # the power-of-two scale terms, as exponent adds
                                for b in T.unroll(BITS):
                                    for t in T.unroll(TERMS):
                                        acc[0] = acc[0] + shift(part[b], sv[b * TERMS + t])
                            red[s, lane] = acc[0]
                            if s == 0:
                                if nb * WARP + lane < N:
                                    acc[0] = red[0, lane]
                                    for s2 in range(1, KS):
                                        acc[0] = acc[0] + red[s2, lane]
                                    y[m, nb * WARP + lane] = acc[0]

    return lut_gemm_cuda.with_attr("global_symbol", cfg.name + "_cuda")


def reference_cuda(
    x: np.ndarray, planes_cuda: np.ndarray, scales_cuda: np.ndarray, cfg: LutGemmConfig
) -> np.ndarray:
    """float64 reference on the CUDA layouts (undoes the layout, then the dense product)."""
    from .lut_gemm import reference

    bits, kw, n = planes_cuda.shape
    planes = (
        np.ascontiguousarray(planes_cuda.transpose(0, 2, 1)).astype("<u4").view(np.uint8)
    ).reshape(bits, n, kw * 4)
    scales = np.ascontiguousarray(scales_cuda.transpose(0, 3, 1, 2))
    return reference(x, planes, scales, cfg)


# ----------------------------------------------------------------------------- M > 1: dequantize
def make_dequant_primfunc(cfg: LutGemmConfig, dtype: str = "float16", threads: int = 128):
    """TensorIR PrimFunc ``(planes u32[bits,Kp/32,N], scales i8[bits,G,T,N]) -> wt[K, N]``: the dense
    transposed weights the packed format means, for a dense GEMM when M is large.

    Multiplication-free: each power-of-two term is built from its exponent bits (``(e + 127) <<
    23`` reinterpreted as float32), the terms are added into ``alpha``, and each bit selects
    ``+alpha`` or ``-alpha`` (adds only). One thread per (32-column word, output row): the plane
    words are read and ``wt`` is written coalesced along N.
    """
    from tvm import tirx
    from tvm.script import tirx as T

    check_cuda_config(cfg)
    N, K, BITS, TERMS, GS, G = cfg.n, cfg.k, cfg.bits, cfg.terms, cfg.group_size, cfg.groups
    KW = cfg.kp // WARP
    NB = -(-N // threads)
    zero = tirx.const(0.0, "float32")

    def term(code):
        c = tirx.Cast("int32", code)
        mag = tirx.Select(c < 0, 0 - c, c)  # |code| = exponent + EXP_BIAS
        v = tirx.reinterpret("float32", tirx.shift_left(mag - EXP_BIAS + 127, 23))
        return tirx.Select(c == 0, zero, tirx.Select(c < 0, zero - v, v))

    def bit_sum(words, alpha, i):
        acc = None
        for b in range(BITS):
            bit = tirx.bitwise_and(tirx.shift_right(words[b], tirx.Cast("uint32", i)), 1)
            v = tirx.Select(bit != 0, alpha[b], zero - alpha[b])
            acc = v if acc is None else acc + v
        return acc

    @T.prim_func(s_tir=True)
    def dequant(
        planes: T.Buffer((BITS, KW, N), "uint32"),
        scales: T.Buffer((BITS, G, TERMS, N), "int8"),
        wt: T.Buffer((K, N), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            alpha = T.sblock_alloc_buffer((BITS,), "float32", scope="local")
            words = T.sblock_alloc_buffer((BITS,), "uint32", scope="local")
            for wb in T.thread_binding(KW, thread="blockIdx.y"):
                for nb in T.thread_binding(NB, thread="blockIdx.x"):
                    for t in T.thread_binding(threads, thread="threadIdx.x"):
                        if nb * threads + t < N:
                            for b in T.unroll(BITS):
                                words[b] = planes[b, wb, nb * threads + t]
                                alpha[b] = T.float32(0)
                                for tt in T.unroll(TERMS):
                                    alpha[b] = alpha[b] + term(
                                        scales[b, wb * WARP // GS, tt, nb * threads + t]
                                    )
                            for i in T.unroll(WARP):
                                if wb * WARP + i < K:
                                    wt[wb * WARP + i, nb * threads + t] = T.Cast(
                                        dtype, bit_sum(words, alpha, i)
                                    )

    return dequant.with_attr("global_symbol", f"dequant_{cfg.name}_{dtype}")


def make_dense_gemm_primfunc(m: int, n: int, k: int, dtype: str, target):
    """``y f32[M,N] = x[M,K] @ wt[K,N]`` in ``dtype`` with float32 accumulation, scheduled by dlight
    (the same schedule Relax's CUDA pipeline gives the matmul the pass emits)."""
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    x = te.placeholder((m, k), dtype, name="x")
    w = te.placeholder((k, n), dtype, name="wt")
    r = te.reduce_axis((0, k), "r")
    y = te.compute(
        (m, n),
        lambda i, j: te.sum(x[i, r].astype("float32") * w[r, j].astype("float32"), axis=r),
        name="y",
    )
    func = te.create_prim_func([x, w, y])
    with tvm.target.Target(target):
        mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(
            tvm.IRModule({"main": func})
        )
    return mod["main"]
