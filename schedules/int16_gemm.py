"""Large-M CPU path: multiplication-free dequantize to 16-bit integer weights, then a VNNI GEMM.

For prefill and batches (``M`` rows of activations, ``M`` in the tens or more) the table kernels of
``lut_gemm_int8.py`` do one byte-shuffle per 64 lookups *per row*, so their cost grows with the bit
width and M. This kernel instead rebuilds each 32-row tile of the weights once per call, as exact
small integers, and multiplies them with 16-bit activations by ``vpdpwssd`` (AVX-512 VNNI: 32
multiply-adds per instruction, independent of the bit width), the "dequantize plus a dense GEMM"
route of the design for large M. It reads the weight arrays of the ``avx512bw`` table kernel as
they are (``lut_gemm_int8.pack_int8(..., "avx512bw")``): the same constants serve both kernels, so
a layer called with one row (decode) and with many (prefill) stores its weights once.

Math, per output row ``n`` and scale group ``g`` (``group_size`` columns):

* the scale of plane b is ``alpha_b = sum_t s_t 2^e_t`` (``packing.py``). With ``E`` the largest
  exponent of the (row, group)'s present terms and ``lo = E - CUT``, the integer multiplier is
  ``c_b = sum over terms with e_t >= lo of s_t 2^(e_t - lo)`` (a term more than ``CUT`` octaves
  below the group's largest is dropped: a relative change of at most ``2^-CUT`` per dropped term
  against that largest term). The weight is ``W[n, k] = 2^lo * sum_b (bit ? c_b : -c_b)``,
  computed as ``-sum_b c_b`` plus ``2 c_b`` for each set bit: a test and a masked add per plane
  (no multiply); ``|W / 2^lo| <= WMAX`` is checked per layer when the pass picks the kernel
  (``misfit_reason``);
* activations: per (row m, group) ``mx = max |x|``, ``xs = mx / XQ``, ``xq = rint(x * (XQ / mx))``
  (int16, ``|xq| <= XQ``);
* ``y[m, n] = sum_g float32(sum_k xq * W_int) * 2^lo * xs``: the integer sums are exact (``int32``:
  ``group_size * XQ * WMAX < 2^31``), so the only rounding is the 12-bit activations and the float32
  accumulation (``reference`` is the numpy model; ~4e-4 relative L2 against the exact product on
  random data, against ~7e-3 for the int8 tables).

Kernel layout (one PrimFunc ``(x f32[M, K], w, codes, y f32[M, N])``, ``w``/``codes`` as for the
``avx512bw`` kernel):

1. quantize x into int32 words holding the int16 pair ``(xq[k], xq[k + 1])`` (rows padded to a
   multiple of ``m_inner`` with zeros);
2. per 32-row tile (``T.parallel``): the multipliers ``c_b`` and ``2^lo`` of each group from the
   codes (int16 vector ops on the exponent fields), then the tile's weights as int16 pairs
   ``wb[k / 2, row]`` (32 x 2 bytes per column pair: 64 bytes per column of the tile, 256 KiB at
   K = 4096): per plane and bit position of the packed bytes one test and one masked add, then a
   word shuffle of two bit positions puts the columns ``k, k + 1`` of a row next to each other;
3. the GEMM: ``m_inner`` rows of x against the tile's two 16-row vectors, one ``vpdpwssd`` per
   (row, vector, column pair) into int32, and per group one conversion and scale into float32.

Shared-exponent configs (``cfg.shared_exp``, a ``--scale-window 8`` fit) read the avx512bw
shared-exponent table kernel's packing instead (``lut_gemm_int8``, "AVX-512 BW + VNNI"): the
weights are exactly ``2^E * sum_b c_b (2 bit - 1)`` (``|c_b| <= 255``, nothing dropped). Per tile,
plane bit t of each lookup byte is isolated (shift, and) and ``vpdpbusd`` with the byte weights
gives ``sum_b c_b bit_b`` per (row, column) in the packing's int32 order (each int32 one row of
one quad, ``lut_gemm_int8.pd_position``); ``2 s - sum_b c_b`` of columns t, t + 1 make an int16
pair, already in row order with one quad per lookup (1, 2, 4 bits) and after one lane shuffle per
16 rows and quad with two (3 bits), so step 3 is the same GEMM. Measured on the Xeon, M = 128,
one thread, same process (with the table kernel's previous packing, one quad per lane and a 4x4
lane transpose per 16 rows): 576x1536 1.45 / 1.49 ms (2 / 4 bits, per-term packing) and 1.43 /
1.46 (shared); 4096x4096 25.8 / 25.9 and 25.0 / 24.6. (A first version that kept the lane order
in the GEMM, one x shuffle per row and column pair and lane sums per group, ran 1.35-1.45x
slower.) On the current packing against that one (same process, M = 128, bit-identical output):
576x576 0.575 / 0.582 / 0.690 -> 0.554 / 0.592 / 0.643 ms at 2 / 3 / 4 bits, 4096x4096 25.2 /
25.7 / 25.3 -> 24.9 / 25.3 / 25.3 ms.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .lut_gemm import LutGemmConfig
from .lut_gemm_int8 import (
    PAD,
    ROWS,
    SHIFT,
    as_root_block,
    pd_lookups,
    pd_mults,
    pd_parts,
    pd_quads,
    pd_rows,
    pd_vecs,
    shared_words,
    vpdpbusd,
)
from .lut_gemm_int8 import unsupported_reason as int8_unsupported
from .packing import EXP_BIAS

XQ = 2047  # activation levels: |xq| <= XQ (12-bit)
WMAX = 8191  # |W / 2^lo| bound the int32 sums allow (module docstring)
CUT = 10  # terms more than CUT octaves below a (row, group)'s largest are dropped
MIN_M = 16  # fewest activation rows the compiler gives this kernel (``prefers``)
MIN_ROW_BITS = 48  # ... and rows x bits at least this


def prefers(m: int, bits: int) -> bool:
    """The compiler's choice between this kernel and the table kernel for ``m`` rows at ``bits``.
    Measured on the 2-vCPU Xeon (Cascade Lake), one thread, same process, ms int16 / table: M=8
    1536x576 0.24/0.16 (2 bits), 0.30/0.29 (4); M=16 576x1536 0.30/0.28 (2), 0.34/0.48 (4); M=32
    576x576 0.23/0.25 (2), 0.24/0.43 (4); M=128 576x576 0.66/0.95 (2), 0.64/1.60 (4)."""
    return m >= MIN_M and m * bits >= MIN_ROW_BITS


@dataclasses.dataclass(frozen=True)
class Int16Knobs:
    """Schedule knobs: rows of x per register tile (accumulators: 4 vectors per row)."""

    m_inner: int = 6

    def validate(self) -> None:
        if not 1 <= self.m_inner <= 7:
            raise ValueError(f"m_inner={self.m_inner}: 1..7 (4 vector registers per row)")


def picks(cfg: LutGemmConfig) -> bool:
    """Whether a target that runs this kernel gives it ``cfg`` (``prefers`` and supported); the
    pass also checks the layer's weights (``misfit_reason``)."""
    return prefers(cfg.m, cfg.bits) and unsupported_reason(cfg) is None


def symbol(cfg: LutGemmConfig) -> str:
    return f"{cfg.name}_int16"


def unsupported_reason(cfg: LutGemmConfig) -> str | None:
    """Why this kernel cannot run ``cfg`` (None if it can); independent of the weight values."""
    why = int8_unsupported(cfg, "avx512bw")  # it reads that kernel's packed weights
    if why:
        return why
    if cfg.group_size * XQ * WMAX >= 2**31:
        return (
            f"group_size={cfg.group_size} overflows the int16 GEMM's int32 sums "
            f"(needs group_size * {XQ} * {WMAX} < 2^31: group_size <= 128)"
        )
    return None


def _terms(scales: np.ndarray):
    """int8 codes [bits, N, G, T] -> (present, sign, exponent); a code of e = -SHIFT with a plus sign
    is stored by the table kernel as delta 0, i.e. absent, and is treated as absent here too."""
    c = np.asarray(scales).astype(np.int64)
    e = np.abs(c) - EXP_BIAS
    present = (c != 0) & ~((e == -SHIFT) & (c > 0))
    return present, np.sign(c), e


def multipliers(scales: np.ndarray, shared: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Codes -> (``c`` int64[bits, N, G], ``lo`` int64[N, G]): ``alpha_b ~= c_b * 2^lo`` (module
    docstring); ``lo = E - CUT`` with ``E`` the largest present exponent (``-SHIFT`` if none).
    ``shared`` (scales with ``packing.shared_exponent_form``): that form, exact (``lo`` = the
    group exponent, ``|c_b| <= 255``)."""
    if shared:
        from .packing import shared_exponent_form

        form = shared_exponent_form(scales)
        if form is None:
            raise ValueError("scales without a shared-exponent form (packing.shared_exponent_form)")
        e, c = form
        return c.astype(np.int64), e.astype(np.int64)
    present, sign, e = _terms(scales)
    emax = np.where(present, e, -SHIFT).max(axis=(0, 3))
    lo = emax - CUT
    keep = present & (e >= lo[None, :, :, None])
    sh = np.where(keep, e - lo[None, :, :, None], 0)
    c = np.where(keep, sign * (np.int64(1) << sh), 0).sum(-1)
    return c, lo


def misfit_reason(scales: np.ndarray, shared: bool = False) -> str | None:
    """Why these weights do not fit the kernel's 16-bit integer weights (None if they do; a
    shared-exponent form always fits: ``4 * 255 <= WMAX``)."""
    c, _ = multipliers(scales, shared)
    worst = int(np.abs(c).sum(0).max()) if c.size else 0
    if worst > WMAX:
        return (
            f"a (row, group)'s integer weights reach {worst} > {WMAX} (its plane scales span "
            f"more than the {CUT} octaves below its largest term that the int16 GEMM keeps)"
        )
    return None


def quantize_x(x: np.ndarray, cfg: LutGemmConfig) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's activations: (xq int64[M, Kp], xs float32[M, G]), bit-exact."""
    f32 = np.float32
    xp = np.zeros((cfg.m, cfg.kp), f32)
    xp[:, : cfg.k] = x
    g = xp.reshape(cfg.m, cfg.groups, cfg.group_size)
    mx = np.abs(g).max(-1)
    xs = (mx / f32(XQ)).astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, f32(XQ) / mx, f32(0)).astype(f32)
    xq = np.rint((g * inv[..., None]).astype(f32)).astype(np.int64)
    return xq.reshape(cfg.m, cfg.kp), xs


def reference(
    x: np.ndarray, planes: np.ndarray, scales: np.ndarray, cfg: LutGemmConfig
) -> np.ndarray:
    """What the kernel computes (float64; its float32 sums differ ~1e-7 relative)."""
    from .packing import unpack_planes

    xq, xs = quantize_x(np.asarray(x, np.float32), cfg)
    c, lo = multipliers(scales, cfg.shared_exp)  # [bits, N, G], [N, G]
    sgn = unpack_planes(planes, cfg.kp).astype(np.int64) * 2 - 1  # [bits, N, Kp]
    gs = cfg.group_size
    w = (sgn.reshape(cfg.bits, cfg.n, cfg.groups, gs) * c[..., None]).sum(0)  # [N, G, gs]
    acc = np.einsum("mgk,ngk->mng", xq.reshape(cfg.m, cfg.groups, gs), w)
    scale = np.exp2(lo.astype(np.float64))[None] * xs.astype(np.float64)[:, None, :]
    return (acc.astype(np.float64) * scale).sum(-1)


def make_primfunc(cfg: LutGemmConfig, knobs: Int16Knobs | None = None):
    """PrimFunc ``(x f32[M, K], w uint8, codes int16, y f32[M, N])`` (global symbol
    ``symbol(cfg)``), body under a root block."""
    from tvm import tirx
    from tvm.script import tirx as T

    why = unsupported_reason(cfg)
    if why:
        raise ValueError(why)
    knobs = knobs or Int16Knobs()
    knobs.validate()
    M, N, K, BITS = cfg.m, cfg.n, cfg.k, cfg.bits
    GS, G, KP = cfg.group_size, cfg.groups, cfg.kp
    COUNTS = cfg.term_counts
    NTERM = sum(COUNTS)
    OFF = [sum(COUNTS[:b]) for b in range(BITS)]
    NT = -(-N // ROWS)
    KV = KP // 16  # packed 64-byte vectors per tile and plane
    VPG = GS // 16
    KH, GH = KP // 2, GS // 2  # column pairs
    MR = knobs.m_inner
    MP = -(-M // MR) * MR
    SHARED = cfg.shared_exp  # the shared-exponent table kernel's packing (module docstring)
    PV = pd_vecs(cfg) if SHARED else BITS  # 64-byte vectors per tile and K-block of 16
    PP, LU, NPART = pd_lookups(cfg) if SHARED else (0, 0, 0)  # (lut_gemm_int8.pd_lookups)
    QL = pd_quads(PP) if SHARED else 1  # quads per lookup
    NBK, UPK = 2 * QL, 4 // QL  # row blocks per tile, units of QL quads per K-block
    SW = shared_words(cfg, "avx512bw") if SHARED else NTERM * ROWS  # int16 words per tile, group
    WSIZE = NT * KV * PV * 64
    DSIZE = PAD + NT * G * SW
    exact_x = M == MP and K == KP
    full_n = N % ROWS == 0

    def i16(v):
        return tirx.Broadcast(tirx.const(v, "int16"), ROWS)

    def term_words(dl, nt, g, slot):
        return dl[tirx.Ramp(PAD + ((nt * G + g) * NTERM + slot) * ROWS, 1, ROWS)]

    def exp_field(wd):
        """The biased exponent e + SHIFT of each code word (``delta >> 16``)."""
        u = tirx.reinterpret("uint16x32", wd)
        f = tirx.bitwise_and(
            tirx.shift_right(u, tirx.Broadcast(tirx.const(7, "uint16"), 32)),
            tirx.Broadcast(tirx.const(255, "uint16"), 32),
        )
        return tirx.reinterpret("int16x32", f)

    def plane_multiplier(dl, lq, nt, g, b):
        """c_b of the 32 rows (code word order): the sum of plane b's kept terms, each
        ``+-(1 << (e - lo))``. ``b`` is an unrolled loop variable: every slot is written, those of
        other planes are folded away as constants."""
        lo = lq[tirx.Ramp(0, 1, ROWS)]
        tot = i16(0)
        for plane, count in enumerate(COUNTS):
            for t in range(count):
                wd = term_words(dl, nt, g, OFF[plane] + t)
                ef = exp_field(wd)
                mag = tirx.shift_left(i16(1), ef - lo)
                term = tirx.Select(
                    tirx.all(wd != i16(0), ef >= lo),
                    tirx.Select(wd < i16(0), i16(0) - mag, mag),
                    i16(0),
                )
                tot = tot + tirx.Select(tirx.Broadcast(tirx.EQ(b, plane), ROWS), term, i16(0))
        return tot

    def code_rows(s):
        """Lanes of code-order words (word 2i + 1 = row i, 2i = row 16 + i) that hold rows 16s + i."""
        return [2 * i + 1 - s for i in range(16)]

    def halves(v, s):
        """Rows 16s + i of code-order words, repeated for both halves h of a packed vector
        (words (h, i))."""
        return tirx.Shuffle([v], code_rows(s) * 2)

    def pow2_rows(ef, s):
        """float32x16: 2^(e) of rows 16s + i from biased exponents ``e + SHIFT`` in code order."""
        e = T.Cast("int32x16", tirx.Shuffle([ef], code_rows(s)))
        return T.reinterpret(
            "float32x16",
            tirx.shift_left(
                e + T.Broadcast(T.int32(127 - SHIFT), 16), T.Broadcast(T.int32(23), 16)
            ),
        )

    @T.macro
    def multipliers_into(dl, cs, rs, cq, lq, nt):
        """Per group g, in the packed words' (h, i) order of rows 16s + i: cs[g, b, s] = 2 c_b,
        cs[g, BITS, s] = -sum_b c_b (so sum_b (bit ? c_b : -c_b) is one masked add per plane);
        rs[g, row] = 2^lo as float32 (row order)."""
        for g in range(G):
            lq[T.Ramp(0, 1, ROWS)] = i16(0)
            for slot in T.unroll(NTERM):
                lq[T.Ramp(0, 1, ROWS)] = T.max(
                    lq[T.Ramp(0, 1, ROWS)],
                    T.Select(
                        term_words(dl, nt, g, slot) != i16(0),
                        exp_field(term_words(dl, nt, g, slot)),
                        i16(0),
                    ),
                )
            lq[T.Ramp(0, 1, ROWS)] = lq[T.Ramp(0, 1, ROWS)] - i16(CUT)
            cq[T.Ramp(BITS * ROWS, 1, ROWS)] = i16(0)
            for b in T.unroll(BITS):
                cq[T.Ramp(b * ROWS, 1, ROWS)] = plane_multiplier(dl, lq, nt, g, b)
                cq[T.Ramp(BITS * ROWS, 1, ROWS)] = (
                    cq[T.Ramp(BITS * ROWS, 1, ROWS)] - cq[T.Ramp(b * ROWS, 1, ROWS)]
                )
                cq[T.Ramp(b * ROWS, 1, ROWS)] = (
                    cq[T.Ramp(b * ROWS, 1, ROWS)] + cq[T.Ramp(b * ROWS, 1, ROWS)]
                )
            for b in T.unroll(BITS + 1):
                for s in T.unroll(2):
                    cs[T.Ramp(((g * (BITS + 1) + b) * 2 + s) * 32, 1, 32)] = halves(
                        cq[T.Ramp(b * ROWS, 1, ROWS)], s
                    )
            for s in T.unroll(2):
                rs[T.Ramp(g * ROWS + s * 16, 1, 16)] = pow2_rows(lq[T.Ramp(0, 1, ROWS)], s)

    def plane_sum(w, cs, nt, kq, s, bit):
        """int16 weights / 2^lo of rows 16s + i at the column of packed bit ``bit`` (words (h, i)):
        ``-sum_b c_b`` plus ``2 c_b`` where plane b's bit is set (a test and a masked add)."""
        g = kq // VPG
        tot = cs[tirx.Ramp(((g * (BITS + 1) + BITS) * 2 + s) * 32, 1, 32)]
        one = tirx.Broadcast(tirx.const(1, "uint16"), 32)
        mask = tirx.shift_left(one, tirx.Broadcast(tirx.Cast("uint16", bit), 32))
        for b in range(BITS):
            v = tirx.reinterpret("uint16x32", w[tirx.Ramp(((nt * KV + kq) * BITS + b) * 64, 1, 64)])
            on = tirx.bitwise_and(v, mask) != tirx.Broadcast(tirx.const(0, "uint16"), 32)
            c2 = cs[tirx.Ramp(((g * (BITS + 1) + b) * 2 + s) * 32, 1, 32)]
            tot = tirx.Select(on, tot + c2, tot)
        return tot

    def pairs(a, b, h):
        """int32 x16: (a, b) words of half h, row by row: columns k, k + 1 of one row per int32."""
        return tirx.reinterpret(
            "int32x16",
            tirx.Shuffle([a, b], [h * 16 + j // 2 + (j % 2) * 32 for j in range(32)]),
        )

    @T.macro
    def dequantize_into(w, cs, wb, nt):
        """wb[kp, row] (int32: the int16 weights of columns 2kp, 2kp + 1) of tile nt. Packed bit
        8s + 4hi + t of word (h, i) is row 16s + i, column 16kq + 8hi + 4h + t."""
        for kq in range(KV):
            for s in T.unroll(2):
                for hi in T.unroll(2):
                    for tp in T.unroll(2):
                        for h in T.unroll(2):
                            wb[T.Ramp((8 * kq + 4 * hi + 2 * h + tp) * ROWS + s * 16, 1, 16)] = (
                                pairs(
                                    plane_sum(w, cs, nt, kq, s, 8 * s + 4 * hi + 2 * tp),
                                    plane_sum(w, cs, nt, kq, s, 8 * s + 4 * hi + 2 * tp + 1),
                                    h,
                                )
                            )

    # ---- the shared-exponent packing (lut_gemm_int8 "AVX-512 BW + VNNI"): W = sum_b c_b (2 bit - 1)
    def bit_bytes(w, nt, kq, n, t):
        """int8x64: bit t of nibble ``n % 2`` of every byte of weight vector ``n // 2`` (0 / 1)."""
        wv = tirx.reinterpret("uint16x32", w[tirx.Ramp(((nt * KV + kq) * PV + n // 2) * 64, 1, 64)])
        sh = tirx.shift_right(wv, tirx.Broadcast(tirx.Cast("uint16", (n % 2) * 4 + t), 32))
        one = tirx.bitwise_and(sh, tirx.Broadcast(tirx.const(0x0101, "uint16"), 32))
        return tirx.reinterpret("int8x64", one)

    @T.macro
    def sh_scales_into(dl, rs, csum, mvs, nt):
        """Per group g: rs[g, row] = 2^E (float32, row order) from the exponent words; the byte
        weights ``mvs[g, j, part]`` and their sums ``csum[g, v]`` (per int32 of row block v:
        sum_b c_b of its row)."""
        for g in range(G):
            for s in T.unroll(2):
                rs[T.Ramp(g * ROWS + s * 16, 1, 16)] = pow2_rows(
                    exp_field(dl[T.Ramp(PAD + (nt * G + g) * SW, 1, ROWS)]), s
                )
            for v in T.unroll(NBK):
                csum[T.Ramp((g * NBK + v) * 16, 1, 16)] = T.Broadcast(T.int32(0), 16)
            for j in T.unroll(LU):
                for part in T.unroll(NPART):
                    mvs[T.Ramp(((g * LU + j) * NPART + part) * 64, 1, 64)] = pd_mults(
                        dl, (nt * G + g) * SW, j, part, PP
                    )
                    csum[T.Ramp((g * NBK + pd_parts(PP, j, part)[0]) * 16, 1, 16)] = vpdpbusd(
                        csum[T.Ramp((g * NBK + pd_parts(PP, j, part)[0]) * 16, 1, 16)],
                        mvs[T.Ramp(((g * LU + j) * NPART + part) * 64, 1, 64)],
                        T.Broadcast(T.int8(1), 64),
                    )

    def sb_at(u, v, t):
        """``sb[u, v, t]``: the vector of ``sum_b c_b bit_b`` of column bit t of unit u's row
        block v (``sh_dequantize_into``)."""
        return tirx.Ramp(((u * NBK + v) * 4 + t) * 16, 1, 16)

    def sh_pair(sb, csum, g, u, v, tp):
        """int32x16: the int16 pair of each int32's weights at columns 2tp, 2tp + 1 of its quad,
        each ``2 sum_b c_b bit_b - sum_b c_b`` (``sb_at``)."""
        cs = csum[T.Ramp((g * NBK + v) * 16, 1, 16)]
        lo, hi = (sb[sb_at(u, v, 2 * tp + i)] for i in range(2))
        return T.bitwise_or(
            T.bitwise_and(lo + lo - cs, T.Broadcast(T.int32(0xFFFF), 16)),
            T.shift_left(hi + hi - cs, T.Broadcast(T.int32(16), 16)),
        )

    def sh_rows(pv, u, s, tp, p):
        """int32x16: rows 16s.. of pair tp of quad ``u QL + p`` in row order (``pd_rows``; p is an
        unrolled loop variable: both parities are built and the other folded away)."""
        blocks = [pv[tirx.Ramp(((u * NBK + s * QL + i) * 2 + tp) * 16, 1, 16)] for i in range(QL)]
        if QL == 1:
            return pd_rows(blocks, PP)
        return tirx.Select(p == 0, pd_rows(blocks, PP, parity=0), pd_rows(blocks, PP, parity=1))

    @T.macro
    def sh_dequantize_into(w, mvs, csum, wb, nt):
        """wb as the per-term layout (row order): per K-block, ``sum_b c_b bit_b`` of each unit's
        row blocks and column bits (``sb[u, v, t]``, a vpdpbusd per lookup part: a 3-bit chain
        puts a row block in two lookups), then the int16 pairs per int32 (``pv[u, v, tp]``) and
        the rows of each quad in row order (``pd_rows``: as they are with one quad per lookup,
        one lane shuffle per quad and 16 rows with two)."""
        pv = T.alloc_buffer((UPK * NBK * 2 * 16,), "int32", scope="local")
        sb = T.alloc_buffer((UPK * NBK * 4 * 16,), "int32", scope="local")
        for kq in range(KV):
            for i in T.unroll(UPK * NBK * 4):
                sb[T.Ramp(i * 16, 1, 16)] = T.Broadcast(T.int32(0), 16)
            for u in T.unroll(UPK):
                for j in T.unroll(LU):
                    for part in T.unroll(NPART):
                        for t in T.unroll(4):
                            sb[sb_at(u, pd_parts(PP, j, part)[0], t)] = vpdpbusd(
                                sb[sb_at(u, pd_parts(PP, j, part)[0], t)],
                                mvs[T.Ramp((((kq // VPG) * LU + j) * NPART + part) * 64, 1, 64)],
                                bit_bytes(w, nt, kq, u * LU + j, t),
                            )
            for u in T.unroll(UPK):
                for v in T.unroll(NBK):
                    for tp in T.unroll(2):
                        pv[T.Ramp(((u * NBK + v) * 2 + tp) * 16, 1, 16)] = sh_pair(
                            sb, csum, kq // VPG, u, v, tp
                        )
            for u in T.unroll(UPK):
                for p in T.unroll(QL):  # the quad u QL + p: columns 16kq + 4(u QL + p) + t
                    for s in T.unroll(2):
                        for tp in T.unroll(2):
                            wb[T.Ramp((8 * kq + 2 * (u * QL + p) + tp) * ROWS + s * 16, 1, 16)] = (
                                sh_rows(pv, u, s, tp, p)
                            )

    def row(x, xp, m, k0, lanes):
        """x[m, k0 : k0 + lanes] (from the padded copy for ragged shapes)."""
        if exact_x:
            return x[m, tirx.Ramp(k0, 1, lanes)]
        return xp[tirx.Ramp(m * KP + k0, 1, lanes)]

    def pack_pairs(v, inv):
        """32 activations -> 16 int32 words holding the int16 pairs (xq[2j], xq[2j + 1])."""
        q = T.Cast("int32x32", T.nearbyint(v * T.Broadcast(inv, 32)))
        return T.reinterpret("int32x16", T.Cast("int16x32", q))

    @T.macro
    def quantize_into(x, xp, xc, xs):
        """xs[m, g] and the int16 pairs xc of x (rows past M and columns past K: 0); ragged
        shapes go through a zero-padded copy ``xp`` (full vectors copied, the tail per element)."""
        for m in T.parallel(MP):
            vmx = T.alloc_buffer((16,), "float32", scope="local")
            inv = T.alloc_buffer((1,), "float32", scope="local")
            if not exact_x:
                for kv in range(KP // 16):
                    if m < M and kv < K // 16:
                        xp[T.Ramp(m * KP + kv * 16, 1, 16)] = x[m, T.Ramp(kv * 16, 1, 16)]
                    else:
                        for c in range(16):
                            xp[m * KP + kv * 16 + c] = T.if_then_else(
                                m < M and kv * 16 + c < K,
                                x[T.min(m, M - 1), T.min(kv * 16 + c, K - 1)],
                                T.float32(0),
                            )
            for g in range(G):
                vmx[T.Ramp(0, 1, 16)] = T.Broadcast(T.float32(0), 16)
                for j in range(GS // 16):
                    vmx[T.Ramp(0, 1, 16)] = T.max(
                        vmx[T.Ramp(0, 1, 16)], T.fabs(row(x, xp, m, g * GS + j * 16, 16))
                    )
                for c in range(1, 16):
                    vmx[0] = T.max(vmx[0], vmx[c])
                xs[m * G + g] = vmx[0] / T.float32(XQ)
                inv[0] = T.if_then_else(vmx[0] > T.float32(0), T.float32(XQ) / vmx[0], T.float32(0))
                for j in range(GH // 16):
                    xc[T.Ramp(m * KH + g * GH + j * 16, 1, 16)] = pack_pairs(
                        row(x, xp, m, g * GS + j * 32, 32), inv[0]
                    )

    @T.macro
    def gemm_tile(xc, xs, wb, rs, y, nt):
        acc = T.alloc_buffer((MR * ROWS,), "int32", scope="local")
        yacc = T.alloc_buffer((MR * ROWS,), "float32", scope="local")
        ybuf = T.alloc_buffer((ROWS,), "float32", scope="local")
        for mb in range(MP // MR):
            for i in T.unroll(MR * 2):
                yacc[T.Ramp(i * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
            for g in range(G):
                for i in T.unroll(MR * 2):
                    acc[T.Ramp(i * 16, 1, 16)] = T.Broadcast(T.int32(0), 16)
                for kp in range(GH):
                    for mi in T.unroll(MR):
                        for s in T.unroll(2):
                            acc[T.Ramp(mi * ROWS + s * 16, 1, 16)] = T.call_llvm_pure_intrin(
                                "int32x16",
                                "llvm.x86.avx512.vpdpwssd.512",
                                acc[T.Ramp(mi * ROWS + s * 16, 1, 16)],
                                T.reinterpret(
                                    "int16x32", wb[T.Ramp((g * GH + kp) * ROWS + s * 16, 1, 16)]
                                ),
                                T.reinterpret(
                                    "int16x32",
                                    T.Broadcast(xc[(mb * MR + mi) * KH + g * GH + kp], 16),
                                ),
                            )
                for mi in T.unroll(MR):
                    for s in T.unroll(2):
                        yacc[T.Ramp(mi * ROWS + s * 16, 1, 16)] = yacc[
                            T.Ramp(mi * ROWS + s * 16, 1, 16)
                        ] + T.Cast("float32x16", acc[T.Ramp(mi * ROWS + s * 16, 1, 16)]) * rs[
                            T.Ramp(g * ROWS + s * 16, 1, 16)
                        ] * T.Broadcast(xs[(mb * MR + mi) * G + g], 16)
            for mi in T.unroll(MR):
                if mb * MR + mi < M:
                    if full_n:
                        y[mb * MR + mi, T.Ramp(nt * ROWS, 1, ROWS)] = yacc[
                            T.Ramp(mi * ROWS, 1, ROWS)
                        ]
                    else:
                        ybuf[T.Ramp(0, 1, ROWS)] = yacc[T.Ramp(mi * ROWS, 1, ROWS)]
                        for r in range(ROWS):
                            if nt * ROWS + r < N:
                                y[mb * MR + mi, nt * ROWS + r] = ybuf[r]

    @T.prim_func
    def kernel(
        x: T.Buffer((M, K), "float32"),
        w: T.Buffer((WSIZE,), "uint8"),
        dl: T.Buffer((DSIZE,), "int16"),
        y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        xc = T.alloc_buffer((MP * KH,), "int32")
        xs = T.alloc_buffer((MP * G,), "float32")
        xp = T.alloc_buffer((1 if exact_x else MP * KP,), "float32")
        quantize_into(x, xp, xc, xs)
        for nt in T.parallel(NT):
            rs = T.alloc_buffer((G * ROWS,), "float32")
            wb = T.alloc_buffer((KH * ROWS,), "int32")
            if SHARED:
                csum = T.alloc_buffer((G * NBK * 16,), "int32")
                mvs = T.alloc_buffer((G * LU * NPART * 64,), "uint8")
                sh_scales_into(dl, rs, csum, mvs, nt)
                sh_dequantize_into(w, mvs, csum, wb, nt)
            else:
                cq = T.alloc_buffer(((BITS + 1) * ROWS,), "int16", scope="local")
                lq = T.alloc_buffer((ROWS,), "int16", scope="local")
                cs = T.alloc_buffer((G * (BITS + 1) * 2 * 32,), "int16")
                multipliers_into(dl, cs, rs, cq, lq, nt)
                dequantize_into(w, cs, wb, nt)
            gemm_tile(xc, xs, wb, rs, y, nt)

    return as_root_block(kernel, symbol(cfg))
