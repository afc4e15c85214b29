"""Int8-table LUT GEMM for the CPU (T-MAC style): AVX-512 VBMI/VNNI, AVX-512 BW, AVX2 and NEON
variants, with the numpy model of exactly what they compute.

Same math and packed weights as ``schedules/lut_gemm.py`` (``y = x @ W.T`` with W given by {-1,+1}
bit-planes and power-of-two scale terms, ``schedules/packing.py``), but the tables are 16-entry
int8 tables of 4 activations, so one byte-shuffle instruction does 16-64 lookups at once:

* table build (per row m of x, per scale group g of ``group_size`` activations):
  ``mx = max_quad (|x0| + |x1| + |x2| + |x3|)``, ``ls[m, g] = mx * f32(1/127)``,
  ``tab[m, q, c] = rint((127 / mx) * sum_t (bit t of c ? +x : -x)[4q + t])`` (int8, |tab| <= 127),
  all in float32 in exactly this order (``build_tables`` is the numpy twin, bit-exact);
* lookup + add: each 4-bit slice of a weight plane indexes its quad's table; the lookups of one
  scale group are summed per plane and row in integers (int32 / int16);
* shift: ``f = float(acc)`` is an integer-valued float (|f| < 2^15, possibly 0); each
  power-of-two term ``sign * 2^e`` of alpha is applied to the bit pattern of ``f`` as one integer
  add of the precomputed ``delta = ((e + SHIFT) << 23) + (sign < 0 ? 1 << 31 : 0)`` (mod 2^32),
  which gives ``sign * f * 2^(e + SHIFT)``; all ``bits * terms`` terms of one (row, group) are
  added in float32 (plane-major, then term) and the sum is scaled once by the table scale:
  ``y += (sum_b sum_t term_bt) * (ls[m, g] * 2^-SHIFT)`` (the kernel builds ``ls * 2^-SHIFT``:
  exact, normal down to ``ls = 2^-62``). No float multiply by a weight-derived value, no select:
  with ``SHIFT = 64`` and ``e >= -64`` the delta's exponent part is ``>= 0``, so ``f = 0`` turns
  into ``+-2^(e + SHIFT - 127)``, 2^-127 of what ``acc = 1`` gives (a zero in any output that is
  not itself ~1e-38); every other intermediate stays normal while ``e <= max_exp(cfg)`` (48 at
  group 128 and 6 terms; ``packing.py`` allows 62; ``kernel_deltas`` refuses more, naming the
  float-table kernel as the fix). An absent term has delta 0, i.e. the stand-in ``f * 2^-64``
  (an exact zero would cost a select per term): below float32 resolution of any output with a
  present term, ~1e-16 absolute in a row whose terms are all absent. ``reference_int8`` models
  exactly this, bit operations included.

Variants (``isa``), all one PrimFunc ``(x f32[M, K], w, codes, y f32[M, N])`` with the table build
inside, tiles of 32 output rows (N padded at pack time, only real rows of y stored), Kp = K padded
to the group size (activations past K read as 0):

``avx512`` (needs AVX-512 F/BW/VBMI/VNNI)
    ``w: uint8[NT, Kp/16, bits, 64]``: byte ``p = 4r + t`` of the vector for tile ``nt``, K-block
    ``kq``, plane b holds in its low nibble the 4 bits of quad ``4kq + t`` of row ``32nt + r`` and in
    its high nibble those of row ``32nt + 16 + r``. The four 16-entry tables of quads ``4kq..4kq+3``
    form one 64-byte register; ``vpermb`` with index ``nibble | 16 t`` does 64 lookups and
    ``vpdpbusd`` with all-ones adds the 4 adjacent bytes (4 quads, one row) into int32.
    K is split into chunks of whole scale groups whose tables take at most ``CHUNK_TABLE_BYTES``
    per row of x (``k_chunks``: 2 chunks at K = 4096, group 128); the kernel loops over chunks
    outside the tile loop (y = chunk 0's sums, then y += each later chunk's), and the weights and
    codes are stored as records of one (tile, group), chunk-major (``stream_order``: per chunk,
    tile by tile, the chunk's groups), so both stay one sequential stream.
``avx512bw`` (needs AVX-512 F/BW: Skylake-SP, Cascade Lake, ... without VBMI)
    ``w: uint8[NT, Kp/16, bits, 64]``: byte ``p = 32h + 2i + s`` of the vector for tile ``nt``,
    K-block ``kq``, plane b belongs to row ``32nt + 16s + i``; its low nibble holds the 4 bits of
    quad ``4kq + h``, its high nibble those of quad ``4kq + 2 + h``. Tables are stored as
    ``entry + 128`` (uint8, 1..255), each 16-entry table twice (32 bytes per quad), so the 64 bytes
    of quads ``4kq, 4kq+1`` (or ``4kq+2, 4kq+3``) give every 128-bit lane the table its bytes index:
    one in-lane ``vpshufb`` does 64 lookups. As 16-bit words, word ``16h + i`` of a lookup holds
    row i's entry in its low byte and row ``16 + i``'s in its high byte: per (row pair, group) the
    kernel sums the words (mod 2^16) and the high bytes (``word >> 8``), exact while
    ``255 * group_size / 8 < 2^16`` (``BW_MAX_GROUP``); at the group end the low-byte sums are
    ``words - (high << 8)``, both halves h are added and the bias ``128 * group_size / 4`` is
    removed, giving the same int32 sums as the other variants (same epilogue, same numerics).
    Measured on a Xeon (Cascade Lake, no VBMI) against ``avx2``, same machine, default schedules:
    M=1 1.03-1.3x (4096x4096) and 1.4-1.9x (the default model's shapes), M=8 and M=128 up to 2x
    (more rows per weight load: 32 zmm registers).
``avx2`` / ``neon`` (``vpshufb`` on 32 bytes / ``tbl`` on 16 bytes)
    ``w: uint8[NT, Kp/8, bits, 32]``: byte r = the packed-plane byte of row ``32nt + r``
    (low nibble quad ``2j``, high nibble quad ``2j + 1``). One shuffle looks up one quad's table
    for 32 (16) rows; lookups are widened to int16 and added (|acc| <= 127 * group_size / 4).

``codes: int16[PAD + NT * G * sum(counts) * 32]``: ``PAD = 32`` zero words, then per tile, group,
plane and term the 32 rows' ``delta >> 16`` (only the ``cfg.term_counts[b]`` slots plane b uses: a
per-plane term plan such as 4,3,3,2 costs 12 term applications, not 16) (``kernel_deltas``, ``encode_deltas``; pad rows of the
last tile absent), row ``i`` in word ``2i + 1`` and row ``16 + i`` in word ``2i``. Applying a term
to 16 rows is one masked 16-bit add to the high words of ``bits(f)`` with a memory operand (the
second half loads one word early, which the leading pad keeps in bounds) and one ``vaddps``.
Measured at M=1 (4096x4096, 2/3/4 bits, speedup over the former one-byte codes with a select per
plane, same run each): this 1.26/1.23/1.27x; int32 deltas (one ``vpaddd``, twice the bytes)
1.17/1.17/1.04x; int16 widened by and/shift 1.19/1.20/1.16x; one byte decoded by
sign-extend/shift/and 1.08/1.06/1.07x. At M = 1 the ``avx512`` kernel prefetches every line of
the next group's codes at the start of each group (``PREFETCH_CODES``).

Shared exponent (``cfg.shared_exp``, AVX-512 only): when every (row, group)'s scales are
``c_b * 2^E`` with integers ``|c_b| <= 255`` (``packing.shared_exponent_form``; a fit with
``QuantConfig.scale_window = 8`` has it), a negative ``c_b`` is folded into plane b's bits of that
group (``-c B = c (-B)``) and ``vpdpbusd`` takes the byte ``|c_b|`` of each row as its unsigned
operand instead of 1: the lookups of all planes are weighted and summed in int32 inside the lookup
loop (``|sum| <= 127 * 255 * group_size / 4 * bits``, exact in float32 up to group 128 at 4
bits), and the epilogue is one conversion, one exponent add of ``(E + SHIFT) << 23`` and one
multiply-add by the table scale per 16 rows, instead of one exponent add and one add per term.
``c_b`` is still a sum of the plane's power-of-two terms (shifts of the lookups); the byte operand
applies them in the instruction that already adds the lookups. Codes: ``PAD`` words, per tile and
group the 32 rows' exponent words (as a term's) and then each plane's 32 bytes ``|c_b|`` (at 2 bits
followed by ``GAP_WORDS`` zero words, ``code_gap``), then ``PAD`` words (a plane's bytes are loaded
as 64 and expanded to the ``p = 4r + t`` layout with one ``vpermb`` per half). Compiled and checked
against the model's asm shape on x86 hosts; run only on hosts with VBMI.

AVX-512 BW + VNNI, shared exponent (``isa="avx512bw"``, ``cfg.shared_exp``; no VBMI needed)
    An in-lane ``vpshufb`` looks up one table per 128-bit lane, and ``vpdpbusd`` adds the 4 bytes
    of an int32, which therefore come from one quad's table. Here those 4 bytes are one row's
    planes of that quad, and ``vpdpbusd`` weights each by the row's ``|c_b|`` (signs folded into
    the bits, as above): no per-plane sums, no per-term epilogue. Tables: 16 bytes per quad
    (int8). Each lookup's table register is a broadcast load, so every int32 of the accumulators
    stays one row for the whole group and the group end needs no lane reduction:
    * one quad per lookup (``pd_quads`` = 1; 1, 2 and 4 bits): the quad's 16 bytes in all 4 lanes;
      int32 ``(L, d)`` (``4L + d``) of row block v is row ``16v + 4L + d`` (2 row blocks of 16);
    * two quads per lookup (3 bits): the pair's 32 bytes twice, lane L holding quad ``L % 2``;
      int32 ``(L, d)`` of row block v is row ``8v + 4 (L // 2) + d`` of quad ``L % 2`` (4 row
      blocks of 8: the 3-nibble chain below needs 4), and the group end adds the two quads' lanes
      (two lane shuffles and an add per 16 rows, ``pd_rows``).
    A unit is ``pd_quads`` quads; its lookups j (``pd_lookups``: 1 per quad at 2 bits, 2 at 4, 3 per
    pair at 3) hold in byte k of every int32 the (row block v, plane b) of ``pd_slots[j][k]``: 4
    bits, one row block per int32 (planes 0-3); 1-2 bits, two (bytes 0-1, 2-3); 3 bits, the chain
    ``(a0 a1 a2 b0) (b1 b2 c0 c1) (c2 d0 d1 d2)`` over the pair's 4 row blocks. Where an int32
    holds two row blocks, each lookup feeds two ``vpdpbusd`` whose byte weights are 0 in the other
    row block's bytes (``pd_parts``).
    ``w: uint8[NT, Kp/16, PV, 64]`` (PV = 2, 3, 4 at 1-2, 3, 4 bits): nibble ``n % 2`` of byte
    ``4(4L + d) + k`` of vector ``n // 2`` of K-block kq is the index of lookup ``n % LU`` of unit
    ``n // LU`` for its int32 ``(L, d)`` and byte k (quad ``4kq + QL (n // LU) + L % QL``).
    ``codes: int16[PAD + NT * G * (32 + 16 PV)]``: per tile and group the 32 rows' exponent words
    (as a term's), then per lookup j of a unit its byte weights, byte ``4(4L + d) + k`` = ``|c_b|``
    of that int32's row and byte k's plane (two quads per lookup: lanes 0 and 2 only, 32 bytes,
    repeated into lanes 1 and 3 by one shuffle per group). Accumulators: with one row of x, 2 or 4
    copies of each row block's sums (units alternate between them: consecutive ``vpdpbusd`` into
    one int32 chain ran at its 5-cycle latency); with several, one per row of x.
    Measured on the Xeon (Cascade Lake, no VBMI), one thread, same weights and process, against
    the previous layout (one quad per lane, 4-row blocks, a 4-lane reduction per 16 rows and
    group; bit-identical output): M = 1 4096x4096 2 / 3 / 4 bits 0.250 -> 0.228, 0.391 -> 0.350,
    0.443 -> 0.428 ms; M = 8 576x576 29.6 -> 23.4, 39.0 -> 33.0, 34.7 -> 28.7 us, 192x576 2 bits
    14.1 -> 11.4 us, 4096x4096 1.32 -> 0.88, 1.66 -> 1.43, 1.67 -> 1.31 ms (both kernels compiled
    in one process, timed in alternating rounds, medians). Earlier: this
    family against the per-term avx512bw kernel, M = 1 4096x4096: 2 bits 0.301 -> 0.237 ms, 4
    bits 0.586 -> 0.409; the 3-bit chain against a zero fourth plane 0.369 against 0.423 ms
    (25% fewer bytes); not kept: a third vector of plane-2 nibbles of 4 rows per int32 (four
    ``vpdpbusd`` per lookup).

M > 1: ``m_inner`` rows of x share each loaded weight vector (their tables differ); threads run
``T.parallel`` over (row block, chunk of N tiles).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .dense_gemm import prefetch_read
from .lut_gemm import LutGemmConfig
from .packing import EXP_BIAS, MULT_MAX, shared_exponent_form

ROWS = 32  # output rows per tile
QMAX = 127  # int8 table range
ISAS = ("avx512", "avx512bw", "avx2", "neon")
SHIFT = 64  # term exponents are applied as e + SHIFT; the kernel's table scale carries 2^-SHIFT
PAD = 32  # int16 words before the first term vector (the high half's load starts one word early)
_SHUFFLE_BYTES = {"avx2": 32, "neon": 16}
_TABLE_BYTES = {"avx512": 16, "avx512bw": 32, "avx2": 32, "neon": 16}  # stored bytes per quad table
_ACC_REGS = {"avx512": 24, "avx512bw": 24, "avx2": 10, "neon": 24}  # registers for accumulators
# Below this many plane bytes (times M) the default rule does not split N over threads. M = 1, 2
# threads, one task against 2 chunks in one process (Zen 5, avx512): 576x1536 2 / 4 bits (0.21 /
# 0.42 MiB) 3.3 / 5.6 us against 5.2 / 6.5; 1536x1536 2 bits (0.56 MiB) 8.1 against 7.3; 2048x2048
# and up 1.5-1.8x faster in 2 chunks (all with TVM_NUM_THREADS=2). M = 2 (no
# parallel table build either): 192x576 1.3 / 1.5 us against 2.0 / 2.1 (2 / 3 bits), 576x576 the
# same; from M = 2 x threads the table build is parallel anyway and 2 chunks were as fast or
# faster (M = 4, 576x576: 3.8 against 4.6 us), so the rule applies below that only.
PARALLEL_MIN_BYTES = 512 << 10
BW_MAX_GROUP = 2048  # avx512bw: a (row, group)'s biased byte sums must fit 16 bits
_WIDE = ("avx512", "avx512bw")  # 64-byte weight vectors of 4 quads, int32 group sums
PD_PLANES = 4  # avx512bw shared exponent: the bytes of one int32 (one row, 4 planes)
# Zero words after each (tile, group)'s codes of the avx512 shared-exponent kernel at 2 bits
# (``code_gap``): 136 bytes per group instead of 128. Measured on Zen 5 (one process, alternating
# rounds, same weights, bit-identical output; reports/bench/zen5-code-gap-s21.txt): weights
# streamed from DRAM (cold), 4096x4096 M = 1 one thread 1.22-1.33x faster in five runs (e.g.
# 176.6 -> 135.2 us), two threads 1.18-1.23x, 11008x4096 1.26-1.32x; hot (L3) and the default
# model's 576-wide shapes unchanged (0.98-1.02x). Not understood: a plain read of two streams with
# the same strides is as fast at 128 as at 136 bytes; 3 and 4 bits (160 and 192 bytes) gained
# nothing consistent (0.95-1.13x), nor did the per-term kernel (1.04-1.10x cold at 4096 and
# 11008 columns, 0.87-1.07x at the model's shapes), so only 2 bits has the gap.
GAP_WORDS = 4
# The avx512 per-term kernel at M = 1 prefetches the next group's codes (``make_int8_primfunc``,
# ``PREFETCH_CODES``: the measurements); False builds it without (for A/B runs).
PREFETCH_NEXT_CODES = True
# The avx512 kernel splits K into chunks whose tables (16 bytes per quad: 4 per column) take at
# most this many bytes per row of x, loops over the chunks outside the tile loop, and stores its
# weights and codes chunk-major (``k_chunks``, ``stream_order``; 0 = one chunk). Without the split
# a tile streams its whole K (48 KiB at 4096 columns and 3 bits) between two reads of the same
# table (16 KiB): the tables cannot stay in L1 (inferred, this VM has no cache counters: at the
# same bytes, K = 2048 ran 15% faster than K = 4096).
# Measured on Zen 5 (48 KiB L1 per core; one process, alternating rounds, same weights, chunked
# against one chunk; reports/bench/zen5-k-chunks-s22.txt and an earlier run of the same A/B):
# 4096x4096 M = 1 one thread, windowed fit, hot 1.15-1.18 / 1.16-1.17 / 1.08-1.12x at 2 / 3 / 4
# bits (3 bits 77.4 -> 65.9 us), cold 1.05-1.09x; default fit hot 1.03-1.14x, cold 0.99-1.18x;
# 11008x4096 two threads hot 1.01-1.13x (4 bits 2.6x), cold 0.99-1.21x; M = 8 hot 1.00-1.05x, cold
# 1.15-1.26x; M = 128 1.02-1.09x. 4096 bytes gained less hot (1.02-1.16x), 6144 about the same as
# 8192. Not measured on Zen 4 (32 KiB L1).
CHUNK_TABLE_BYTES = 8192
# With ``build_parallel`` and one chunk of N tiles per row block (``n_chunks`` = 1), each
# parallel task builds its own rows' tables before its tiles: one parallel launch instead of two
# (the build's, then the lookups'). Measured on Zen 5, two threads, default rule (one process,
# alternating rounds, same weights): M = 8 windowed fit 192x576 3.8 / 4.4 / 4.9 -> 2.8 / 3.5 / 3.9
# us at 2 / 3 / 4 bits (1.22-1.35x hot and cold), 576x576 1.11-1.24x, 1536x576 1.01-1.12x,
# 4096x4096 0.99x; default fit 192x576 1.17-1.50x; M = 128 576x576 1.05-1.19x
# (reports/bench/zen5-fused-build-s22.txt). False: the separate parallel build (A/B runs).
FUSED_BUILD = True


def k_chunks(cfg: LutGemmConfig, isa: str) -> int:
    """K chunks of ``isa``'s kernel for ``cfg`` (``CHUNK_TABLE_BYTES``; 1 = no split). Chunks are
    whole scale groups; the last may hold fewer."""
    if isa != "avx512" or not CHUNK_TABLE_BYTES:
        return 1
    per_group = cfg.group_size // 4 * _TABLE_BYTES[isa]
    gpc = max(1, CHUNK_TABLE_BYTES // per_group)  # groups per chunk
    return -(-cfg.groups // gpc)


def chunk_groups(cfg: LutGemmConfig, isa: str) -> int:
    """Scale groups per K chunk (``k_chunks``); the last chunk may hold fewer."""
    return -(-cfg.groups // k_chunks(cfg, isa))


def stream_order(per_group: np.ndarray, cfg: LutGemmConfig, isa: str) -> np.ndarray:
    """``[nt, G, ...]`` records (one per tile and scale group) in the order the kernel reads them:
    per K chunk (``k_chunks``), tile by tile, the chunk's groups in order."""
    gpc = chunk_groups(cfg, isa)
    if gpc >= cfg.groups:  # one chunk: tile-major, no copy
        return per_group.reshape(-1, *per_group.shape[2:])
    parts = [per_group[:, g0 : g0 + gpc] for g0 in range(0, cfg.groups, gpc)]
    return np.concatenate([p.reshape(-1, *per_group.shape[2:]) for p in parts])


def pd_planes(cfg: LutGemmConfig) -> int:
    """Nibbles stored per (row, quad) by the avx512bw shared-exponent layout: 2 up to 2 bits, 3 at
    3 bits (chains of row blocks over the int32s), 4 at 4 (module docstring "AVX-512 BW + VNNI")."""
    return 2 if cfg.bits <= 2 else cfg.bits


def pd_vecs(cfg: LutGemmConfig) -> int:
    """64-byte weight vectors per tile and K-block of 16 in the avx512bw shared-exponent layout."""
    return ROWS * 4 * pd_planes(cfg) // 128


def pd_quads(pp: int) -> int:
    """Quads per lookup (QL) of the avx512bw shared-exponent layout: 1 (every 128-bit lane holds the
    same quad's table, 16 rows per row block) at 2 and 4 nibbles, 2 at 3 (lanes alternate between
    the quads of a pair, 8 rows per row block: a 3-nibble chain needs 4 row blocks per tile)."""
    return 2 if pp == 3 else 1


def pd_lookups(cfg: LutGemmConfig) -> tuple[int, int, int]:
    """(nibbles per (row, quad), lookups per unit of ``pd_quads`` quads, parts per lookup) of the
    avx512bw shared-exponent layout; lookups x parts is the number of byte-weight vectors."""
    pp = pd_planes(cfg)
    return pp, pd_quads(pp) * pp // 2, 1 if pp == PD_PLANES else 2


def pd_parts(pp: int, j, part):
    """(row block, first byte, bytes, first plane) of part ``part`` of lookup j of a unit: byte
    ``first + i`` of every int32 holds plane ``plane + i`` of that row block. 4 nibbles: one row
    block per int32 (lookup j: row block j). 2: two (bytes 0-1 row block 0, 2-3 row block 1). 3:
    a chain of 4 row blocks over the unit's 3 lookups, ``(a0 a1 a2 b0) (b1 b2 c0 c1) (c2 d0 d1
    d2)``, each int32 two row blocks. j and part may be TIR expressions (unrolled loop
    variables)."""
    if pp == PD_PLANES:
        return j, 0, 4, 0
    if pp == 3:  # part 0: row block j from plane j; part 1: row block j + 1 from plane 0
        return j + part, part * (3 - j), 3 - j + part * (2 * j - 2), (1 - part) * j
    return part, 2 * part, 2, 0


def pd_slots(pp: int) -> list[list[tuple[int, int]]]:
    """``[j][k] = (v, b)``: byte k of every int32 of a unit's lookup j holds plane b of row block
    v (``pd_parts`` spelled out per byte, for the numpy packing)."""
    parts = 1 if pp == PD_PLANES else 2
    slots = []
    for j in range(pd_quads(pp) * pp // 2):
        row = {}
        for part in range(parts):
            v, first, count, plane = pd_parts(pp, j, part)
            row.update({first + i: (v, plane + i) for i in range(count)})
        slots.append([row[k] for k in range(4)])
    return slots


def pd_position(pp: int) -> tuple[np.ndarray, np.ndarray]:
    """(row offset within its row block, quad within the unit) of each int32 ``(L, d)`` of a
    lookup (``[16]`` each, int32 ``4L + d``): row ``4 (L // QL) + d`` of quad ``L % QL``."""
    ql = pd_quads(pp)
    lane, d = np.divmod(np.arange(16), 4)
    return 4 * (lane // ql) + d, lane % ql


def pd_mults(dl, base, j, part, pp: int):
    """TIR uint8x64: the byte weights of part ``part`` of lookup j (``pd_parts``; 0 in the other
    row block's bytes); ``base``: the (tile, group)'s first word of the codes after ``PAD``
    (``_pd_codes``). One quad per lookup: 64 stored bytes. Two: 32 stored bytes (the rows of lanes
    0-1 and of lanes 2-3), each 16 repeated for the two quads of the pair."""
    from tvm import tirx

    ql = pd_quads(pp)
    nb = 64 // ql  # stored bytes per lookup
    raw = tirx.reinterpret(
        f"uint8x{nb}", dl[tirx.Ramp(base + PAD + ROWS + nb // 2 * j, 1, nb // 2)]
    )
    if ql == 2:
        raw = tirx.Shuffle(
            [raw, raw], [tirx.const(16 * (i // 32) + i % 16, "int32") for i in range(64)]
        )
    if pp == PD_PLANES:
        return raw
    _, first, count, _ = pd_parts(pp, j, part)
    ones = tirx.const(0xFFFFFFFF, "uint32")
    mask = tirx.shift_left(
        tirx.shift_right(ones, tirx.Cast("uint32", 32 - 8 * count)),
        tirx.Cast("uint32", 8 * first),
    )
    words = tirx.bitwise_and(tirx.reinterpret("uint32x16", raw), tirx.Broadcast(mask, 16))
    return tirx.reinterpret("uint8x64", words)


def pd_table(tab, base, pp: int):
    """TIR int8x64: the table register of a lookup at quad ``base / 16``: that quad's 16 entries in
    every lane (one quad per lookup), or the pair's 32 bytes twice (two: lane L holds quad L % 2);
    a broadcast load either way."""
    from tvm import tirx

    nb = 16 * pd_quads(pp)
    raw = tab[tirx.Ramp(base, 1, nb)]
    return tirx.Shuffle([raw] * (64 // nb), [tirx.const(i, "int32") for i in range(64)])


def vpdpbusd(acc, a, b):
    """TIR int32x16: ``acc`` + the 4-byte sums of ``a`` (uint8) times ``b`` (int8)."""
    from tvm import tirx

    return tirx.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc, a, b)


def pd_lanes(a, b, sel):
    """TIR int32x16: 128-bit lanes ``sel`` of a, then the same lanes of b."""
    from tvm import tirx

    idx = [16 * src + 4 * lane + i for src in (0, 1) for lane in sel for i in range(4)]
    return tirx.Shuffle([a, b], [tirx.const(i, "int32") for i in idx])


def pd_rows(blocks, pp: int, parity=None):
    """TIR int32x16: 16 rows in row order from the row blocks ``blocks`` that hold them (int32 ``(L,
    d)`` of block v: row ``4 (L // QL) + d`` of the block). One quad per lookup: the one 16-row
    block. Two: blocks (a, b) of 8 rows, lanes 0-1 the first 4 rows, 2-3 the next 4, with the pair's
    two quads in lanes L % 2: their sums (``parity`` None) or quad ``parity``'s values only."""
    if pd_quads(pp) == 1:
        return blocks[0]
    a, b = blocks
    if parity is not None:
        return pd_lanes(a, b, (parity, parity + 2))
    return pd_lanes(a, b, (0, 2)) + pd_lanes(a, b, (1, 3))


@dataclasses.dataclass(frozen=True)
class Int8Knobs:
    """Schedule knobs of the int8 kernels."""

    m_inner: int  # rows of x sharing one weight vector load; must divide M
    n_chunks: int  # parallel chunks of N tiles per row block
    build_parallel: bool  # build the tables of different rows in parallel (n_chunks = 1: in the
    # lookups' parallel loop, each task its own rows', FUSED_BUILD)

    def validate(self, cfg: LutGemmConfig) -> None:
        if self.m_inner < 1 or cfg.m % self.m_inner:
            raise ValueError(f"m_inner={self.m_inner} does not divide m={cfg.m}")
        if self.n_chunks < 1:
            raise ValueError("n_chunks must be >= 1")


def as_root_block(func, symbol: str):
    """``func`` with its body under a root block (Relax dataflow needs one) and ``symbol`` as its
    global symbol."""
    from tvm import s_tir

    body = s_tir.SBlockRealize([], True, s_tir.SBlock([], [], [], "root", func.body))
    return func.with_body(body).with_attr("global_symbol", symbol)


def int8_symbol(cfg: LutGemmConfig, isa: str) -> str:
    """Global symbol of ``isa``'s int8 kernel for ``cfg`` (``make_int8_primfunc``)."""
    return f"{cfg.name}_{isa}"


def unsupported_reason(cfg: LutGemmConfig, isa: str) -> str | None:
    """Why ``isa``'s int8 kernel cannot run ``cfg`` (None if it can)."""
    if isa not in ISAS:
        return f"no int8 kernel for ISA '{isa}'"
    if isa in _WIDE and cfg.group_size % 16:
        return f"group_size={cfg.group_size} is not a multiple of 16 (AVX-512 int8 kernel)"
    if isa == "avx512bw" and cfg.group_size > BW_MAX_GROUP:
        return (
            f"group_size={cfg.group_size} > {BW_MAX_GROUP} overflows the avx512bw kernel's "
            "16-bit byte sums"
        )
    if cfg.shared_exp and isa not in _WIDE:
        return (
            f"shared-exponent scales are applied by the AVX-512 kernels only (vpdpbusd byte "
            f"weights), not {isa}; build the config with shared_exp=False"
        )
    if cfg.shared_exp and isa == "avx512bw" and cfg.bits > PD_PLANES:
        return (
            f"bits={cfg.bits} > {PD_PLANES}: the avx512bw shared-exponent kernel holds 4 planes "
            "per row; build the config with shared_exp=False"
        )
    if cfg.shared_exp and QMAX * MULT_MAX * (cfg.group_size // 4) * cfg.bits >= 2**31:
        return f"group_size={cfg.group_size} overflows the shared-exponent kernel's int32 sums"
    if isa not in _WIDE and cfg.group_size > 1024:
        return f"group_size={cfg.group_size} > 1024 overflows the int16 accumulators"
    return None


def default_int8_knobs(cfg: LutGemmConfig, isa: str, threads: int = 2) -> Int8Knobs:
    """Rule: as many rows per weight load as the accumulator registers allow (dividing M), and
    enough parallel tasks that every thread gets the same number, except that a small kernel
    with few rows (``PARALLEL_MIN_BYTES``) does not split N."""
    vreg = {"avx512": 64, "avx512bw": 64, "avx2": 32, "neon": 16}.get(isa, 16)
    # int32 sums (avx512); two 16-bit sums of byte pairs (avx512bw); int16 sums (avx2, neon)
    acc_per_row = cfg.bits * ROWS * (4 if isa in _WIDE else 2) // vreg
    regs = _ACC_REGS.get(isa, 8) - (2 * cfg.bits if cfg.shared_exp else 0)  # byte weights
    if isa == "avx512bw" and cfg.shared_exp:  # one int32 sum per (row, quad of the lookup)
        pp, lookups, parts = pd_lookups(cfg)
        acc_per_row = 2 * pd_quads(pp)
        # each row of x also holds its table registers: at most 8 rows (measured up to M = 8)
        regs = min(_ACC_REGS[isa] - lookups * parts, 8 * acc_per_row)
    cap = max(1, regs // acc_per_row)
    m_inner = max(d for d in range(1, min(cap, cfg.m) + 1) if cfg.m % d == 0)
    blocks = cfg.m // m_inner
    n_tiles = -(-cfg.n // ROWS)
    n_chunks = max(1, min(n_tiles, threads // math.gcd(blocks, threads)))
    # one thread: a parallel launch only costs (32x576, M = 8: 2 us of 10)
    build_parallel = threads > 1 and cfg.m >= 2 * threads
    if not build_parallel and cfg.m * cfg.n * cfg.k * cfg.bits // 8 < PARALLEL_MIN_BYTES:
        n_chunks = 1  # a small kernel: one task per row block (PARALLEL_MIN_BYTES)
    return Int8Knobs(m_inner=m_inner, n_chunks=n_chunks, build_parallel=build_parallel)


# ----------------------------------------------------------------------------- packing
def _nibbles(planes: np.ndarray, n_pad: int) -> np.ndarray:
    """uint8 planes [bits, N, Kp/8] -> 4-bit quad indices uint8 [bits, n_pad, Kp/4] (rows past N: 0)."""
    bits, n, kb = planes.shape
    nib = np.zeros((bits, n_pad, kb * 2), np.uint8)
    nib[:, :n, 0::2] = planes & 15
    nib[:, :n, 1::2] = planes >> 4
    return nib


def max_exp(cfg: LutGemmConfig) -> int:
    """Largest term exponent the kernel applies without float32 overflow: ``|acc| < 2^A``
    (``A`` = bits of ``QMAX * group_size / 4``), a term is below ``2^(A + e + SHIFT)`` and the sum
    of ``bits * terms`` of them must stay below ``2^128``."""
    a = (QMAX * (cfg.group_size // 4)).bit_length()
    return 127 - SHIFT - a - max(0, (sum(cfg.term_counts) - 1).bit_length())


def max_shared_exp(cfg: LutGemmConfig) -> int:
    """``max_exp`` of the shared-exponent kernel: one shift of ``|sum_b c_b acc_b| < 2^A``."""
    a = (QMAX * MULT_MAX * (cfg.group_size // 4) * cfg.bits).bit_length()
    return 127 - SHIFT - a


def shared_deltas(exps: np.ndarray, cfg: LutGemmConfig) -> np.ndarray:
    """Group exponents E (``packing.shared_exponent_form``) -> int32 deltas ``(E + SHIFT) << 23``.
    Raises ValueError outside the kernel's range."""
    e = np.asarray(exps).astype(np.int64)
    lim = max_shared_exp(cfg)
    if np.any(e > lim) or np.any(e < -SHIFT):
        raise ValueError(
            f"a group exponent in [{int(e.min())}, {int(e.max())}] is outside the shared-exponent "
            f"kernel's [-{SHIFT}, {lim}]; use the float-table kernel"
        )
    return ((e + SHIFT) << 23).astype(np.int32)


def shared_form(scales: np.ndarray, cfg: LutGemmConfig) -> tuple[np.ndarray, np.ndarray]:
    """``packing.shared_exponent_form`` of ``scales`` for a ``shared_exp`` config; ValueError
    (naming the fix) when the scales do not have it."""
    form = shared_exponent_form(scales)
    if form is None:
        raise ValueError(
            f"{cfg.name}: some (row, group) scales span more than a byte of exponents, so they "
            "have no shared-exponent form; build the config with shared_exp=False (or fit with "
            "QuantConfig.scale_window)"
        )
    return form


def kernel_deltas(codes: np.ndarray, cfg: LutGemmConfig) -> np.ndarray:
    """Term codes (``packing.py``) -> the kernel's int32 deltas ``((e + SHIFT) << 23)``, plus
    ``1 << 31`` for a negative term (mod 2^32); an absent term is 0 (``e = -SHIFT``). Raises
    ValueError for an exponent above ``max_exp(cfg)``."""
    c = np.asarray(codes).astype(np.int32)
    e = np.where(c == 0, -SHIFT, np.abs(c) - EXP_BIAS)
    lim = max_exp(cfg)
    if np.any(e > lim):
        raise ValueError(
            f"a scale term 2^{int(e.max())} exceeds the int8 kernel's limit 2^{lim} (group size "
            f"{cfg.group_size}, {sum(cfg.term_counts)} terms: the shifted sums would overflow "
            "float32; weights that large are not a trained network's); use the float-table kernel"
        )
    if np.any(e < -SHIFT):
        raise ValueError(f"a scale term 2^{int(e.min())} is below the kernel's 2^-{SHIFT}")
    delta = ((e + SHIFT).astype(np.int64) << 23) + np.where(c < 0, 1 << 31, 0)
    return (delta & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


def encode_deltas(delta: np.ndarray) -> np.ndarray:
    """int32 deltas ``[..., 32 rows]`` -> the stored int16 words ``[..., 32]``: ``delta >> 16``
    (its low 16 bits are 0) of row ``i`` in word ``2i + 1`` and of row ``16 + i`` in word ``2i``."""
    hi = (np.asarray(delta, np.int32).view(np.uint32) >> 16).astype(np.uint16)
    out = np.empty(hi.shape, np.uint16)
    out[..., 1::2] = hi[..., :16]
    out[..., 0::2] = hi[..., 16:]
    return out.view(np.int16)


def pack_int8(
    planes: np.ndarray, scales: np.ndarray, cfg: LutGemmConfig, isa: str
) -> tuple[np.ndarray, ...]:
    """Packed planes + scale codes (``packing.py``) -> the kernel's weight args ``(w, codes)``."""
    reason = unsupported_reason(cfg, isa)
    if reason:
        raise ValueError(reason)
    bits, n, kb = planes.shape
    if (bits, n, kb * 8) != (cfg.bits, cfg.n, cfg.kp):
        raise ValueError(f"planes shape {planes.shape} does not match {cfg}")
    if scales.shape != (bits, n, cfg.groups, cfg.terms):
        raise ValueError(f"scales shape {scales.shape} does not match {cfg}")
    nt = -(-n // ROWS)
    if cfg.shared_exp:
        exps, mult = shared_form(scales, cfg)
        planes = _fold_signs(planes, mult < 0, cfg)
        mult = np.abs(mult)
    if isa == "avx512":
        nib = _nibbles(planes, nt * ROWS).reshape(bits, nt, 2, 16, cfg.kp // 16, 4)
        v = nib.transpose(1, 4, 0, 3, 5, 2)  # [nt, kq, b, r, t, h]
        w = (v[..., 0] | (v[..., 1] << 4)).astype(np.uint8).reshape(nt, cfg.groups, -1)
        w = stream_order(w, cfg, isa)
    elif isa == "avx512bw" and cfg.shared_exp:
        pp, lu, _ = pd_lookups(cfg)
        ql = pd_quads(pp)
        kq = cfg.kp // 16
        nib = np.zeros((pp, nt * ROWS, cfg.kp // 4), np.uint8)
        nib[:bits] = _nibbles(planes, nt * ROWS)
        nib = nib.reshape(pp, nt, ROWS, kq, 4).transpose(1, 3, 0, 2, 4)  # [nt, kq, b, row, quad]
        # nibble h of byte 4L + d, k of vector p: lookup n = 2p + h, unit n // lu, lookup n % lu
        slots = np.array(pd_slots(pp))  # [lu, 4 (k), 2 (v, b)]
        roff, qoff = pd_position(pp)  # [16]
        n = 2 * np.arange(pp)[:, None, None, None] + np.arange(2)  # [p, 1, 1, h]
        n = np.broadcast_to(n, (pp, 16, 4, 2))
        k = np.broadcast_to(np.arange(4)[None, None, :, None], n.shape)
        v, b = slots[n % lu, k, 0], slots[n % lu, k, 1]
        row = 16 // ql * v + roff[None, :, None, None]
        quad = (n // lu) * ql + qoff[None, :, None, None]
        val = nib[:, :, b, row, quad]  # [nt, kq, p, 16 (L, d), 4 (k), 2 (h)]
        w = (val[..., 0] | (val[..., 1] << 4)).astype(np.uint8).reshape(nt, kq, pp, 64)
        return np.ascontiguousarray(w).reshape(-1), _pd_codes(exps, mult, cfg, nt)
    elif isa == "avx512bw":
        # [b, nt, s, i, kq, hi, h]: row 32nt + 16s + i, quad 4kq + 2hi + h
        nib = _nibbles(planes, nt * ROWS).reshape(bits, nt, 2, 16, cfg.kp // 16, 2, 2)
        v = nib.transpose(1, 4, 0, 6, 3, 2, 5)  # [nt, kq, b, h, i, s, hi]
        w = (v[..., 0] | (v[..., 1] << 4)).astype(np.uint8).reshape(nt, cfg.kp // 16, bits, 64)
    else:
        p = np.zeros((bits, nt * ROWS, kb), np.uint8)
        p[:, :n] = planes
        w = p.reshape(bits, nt, ROWS, kb).transpose(1, 3, 0, 2)  # [nt, kb, b, r]
    if cfg.shared_exp:
        return np.ascontiguousarray(w).reshape(-1), _shared_codes(exps, mult, cfg, nt)
    for b, c in enumerate(cfg.term_counts):
        if np.any(scales[b, ..., c:]):
            raise ValueError(
                f"plane {b} has terms in slots past its count {c} (config {cfg.term_counts}); "
                "build the config from packing.plane_term_counts(scales)"
            )
    sc = np.zeros((bits, nt * ROWS, cfg.groups, cfg.terms), np.int8)  # pad rows: absent terms
    sc[:, :n] = scales
    d = kernel_deltas(sc, cfg).reshape(bits, nt, ROWS, cfg.groups, cfg.terms)
    d = d.transpose(1, 3, 0, 4, 2)  # [nt, G, bits, terms, 32]
    # only each plane's present slots (cfg.term_counts), plane-major: [nt, G, sum(counts), 32]
    d = np.concatenate([d[:, :, b, :c] for b, c in enumerate(cfg.term_counts)], axis=2)
    d = stream_order(encode_deltas(d).reshape(nt, cfg.groups, -1), cfg, isa)
    codes = np.concatenate([np.zeros(PAD, np.int16), d.reshape(-1)])
    return np.ascontiguousarray(w).reshape(-1), codes  # 1-D args


def _fold_signs(planes: np.ndarray, neg: np.ndarray, cfg: LutGemmConfig) -> np.ndarray:
    """Planes with the bits of every (plane, row, group) in ``neg`` [bits, N, G] inverted:
    ``-c * B == c * (-B)``, so the kernel's byte weights are ``|c|``."""
    mask = np.repeat(neg, cfg.group_size // 8, axis=-1).astype(np.uint8) * np.uint8(255)
    return planes ^ mask


def _exp_words(exps, cfg: LutGemmConfig, nt: int) -> np.ndarray:
    """int16 ``[nt, G, 32]``: each tile's and group's exponent deltas of its 32 rows
    (``shared_deltas``, stored as ``encode_deltas``; pad rows: E = 0)."""
    e = np.zeros((nt * ROWS, cfg.groups), np.int32)
    e[: exps.shape[0]] = exps
    d = shared_deltas(e, cfg).reshape(nt, ROWS, cfg.groups).transpose(0, 2, 1)
    return encode_deltas(d)


def _shared_codes(exps, mult, cfg: LutGemmConfig, nt: int) -> np.ndarray:
    """The shared-exponent kernel's int16 words: ``PAD`` zeros, then per tile and group the 32
    rows' exponent deltas (as ``encode_deltas``), each plane's 32 byte weights ``|c|`` and
    ``code_gap`` zeros, then ``PAD`` zeros (a plane's 64-byte load reads past its 32 bytes)."""
    c = np.zeros((cfg.bits, nt * ROWS, cfg.groups), np.uint8)  # pad rows: weight 0
    c[:, : exps.shape[0]] = mult
    c = c.reshape(cfg.bits, nt, ROWS, cfg.groups).transpose(1, 3, 0, 2)  # [nt, G, bits, 32]
    words = np.ascontiguousarray(c).reshape(nt, cfg.groups, cfg.bits * ROWS).view(np.int16)
    gap = np.zeros((nt, cfg.groups, code_gap(cfg)), np.int16)
    per_group = np.concatenate([_exp_words(exps, cfg, nt), words, gap], axis=-1)  # [nt, G, SW]
    pad = np.zeros(PAD, np.int16)
    return np.concatenate([pad, stream_order(per_group, cfg, "avx512").reshape(-1), pad])


def _pd_codes(exps, mult, cfg: LutGemmConfig, nt: int) -> np.ndarray:
    """The avx512bw shared-exponent kernel's int16 words: ``PAD`` zeros, then per tile and group
    the 32 rows' exponent deltas (as ``encode_deltas``) and, per lookup j of a unit, its byte
    weights: byte ``4L + d, k`` is ``|c_b|`` of the row of int32 ``(L, d)`` (``pd_position``) in row
    block v, ``(v, b) = pd_slots[j][k]``; with two quads per lookup only lanes 0 and 2 are stored
    (lane 1 repeats lane 0's rows, lane 3 lane 2's)."""
    pp, lu, _ = pd_lookups(cfg)
    ql = pd_quads(pp)
    c = np.zeros((pp, nt, ROWS, cfg.groups), np.uint8)  # pad rows and planes: weight 0
    c[: cfg.bits].reshape(cfg.bits, -1, cfg.groups)[:, : exps.shape[0]] = mult
    slots = np.array(pd_slots(pp))  # [lu, 4, 2]
    roff, _ = pd_position(pp)
    lanes = np.arange(16)[(np.arange(16) // 4) % ql == 0]  # int32s of the stored lanes
    v, b = slots[:, None, :, 0], slots[:, None, :, 1]  # [lu, 1, 4]
    row = 16 // ql * v + roff[lanes][None, :, None]  # [lu, 16 / ql, 4]
    cj = c[b, :, row]  # [lu, 16 / ql, 4, nt, G]
    cj = cj.transpose(3, 4, 0, 1, 2)  # [nt, G, j, int32, k]
    words = np.ascontiguousarray(cj).reshape(nt, cfg.groups, -1).view(np.int16)
    per_group = np.concatenate([_exp_words(exps, cfg, nt), words], axis=-1)  # [nt, G, SW]
    return np.concatenate([np.zeros(PAD, np.int16), per_group.reshape(-1)])


def code_gap(cfg: LutGemmConfig, isa: str = "avx512") -> int:
    """Zero int16 words at the end of each (tile, group)'s codes (``GAP_WORDS``: the avx512
    shared-exponent kernel at 2 bits only)."""
    return GAP_WORDS if isa == "avx512" and cfg.shared_exp and cfg.bits == 2 else 0


def shared_words(cfg: LutGemmConfig, isa: str = "avx512") -> int:
    """int16 words per (tile, group) of ``isa``'s shared-exponent layout (``code_gap`` included)."""
    planes = pd_planes(cfg) if isa == "avx512bw" else cfg.bits
    return ROWS + planes * ROWS // 2 + code_gap(cfg, isa)


# ----------------------------------------------------------------------------- numpy model
def build_tables(x: np.ndarray, cfg: LutGemmConfig) -> tuple[np.ndarray, np.ndarray]:
    """Int8 tables ``[M, Kp/4, 16]`` and scales ``f32[M, G]``, bit-exact with the kernel's build."""
    f32 = np.float32
    xp = np.zeros((cfg.m, cfg.kp), f32)
    xp[:, : cfg.k] = x
    q = xp.reshape(cfg.m, cfg.groups, cfg.group_size // 4, 4)
    a = np.abs(q)
    mx = (((a[..., 0] + a[..., 1]) + a[..., 2]) + a[..., 3]).max(-1)  # [M, G]
    ls = (mx * f32(1.0 / QMAX)).astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, f32(QMAX) / mx, f32(0)).astype(f32)
    c = np.arange(16)
    s = (((c[:, None] >> np.arange(4)) & 1) * 2 - 1).astype(f32)  # [16, 4] signs
    sx = q[..., None, :] * s  # [M, G, J, 16, 4]
    tot = ((sx[..., 0] + sx[..., 1]) + sx[..., 2]) + sx[..., 3]
    tab = np.rint(inv[:, :, None, None] * tot).astype(np.int8)
    return tab.reshape(cfg.m, cfg.kp // 4, 16), ls


def reference_int8(
    x: np.ndarray, planes: np.ndarray, scales: np.ndarray, cfg: LutGemmConfig
) -> np.ndarray:
    """What the int8 kernels compute (float64 output; the kernels' float32 sums differ ~1e-7)."""
    x = np.asarray(x, np.float32)
    tab, ls = build_tables(x, cfg)
    if cfg.shared_exp:
        exps, mult = shared_form(scales, cfg)
        planes = _fold_signs(planes, mult < 0, cfg)
        mult, sdelta = np.abs(mult).astype(np.int64), shared_deltas(exps, cfg)
    else:
        delta = kernel_deltas(scales, cfg)  # [bits, N, G, T]
    nib = _nibbles(planes, cfg.n).astype(np.int64)  # [bits, N, Q]
    qpg = cfg.group_size // 4
    lsk = (ls * np.float32(2.0**-SHIFT)).astype(np.float32)  # the kernel's table scale
    y = np.zeros((cfg.m, cfg.n), np.float64)
    for m in range(cfg.m):
        look = np.take_along_axis(tab[m][None].astype(np.int64), nib.transpose(0, 2, 1), axis=2)
        # look[b, q, n] -> per group sums acc[b, n, g]
        acc = look.reshape(cfg.bits, cfg.groups, qpg, cfg.n).sum(2).transpose(0, 2, 1)
        if cfg.shared_exp:  # integer plane weights, one shift: exact up to the float conversion
            fb = (mult * acc).sum(0).astype(np.float32).view(np.int32)
            s = (fb + sdelta).view(np.float32)
            y[m] = (s.astype(np.float64) * lsk[m][None, :]).sum(1)
            continue
        fb = acc.astype(np.float32).view(np.int32)
        s = None
        for b in range(cfg.bits):
            for t in range(cfg.term_counts[b]):
                term = (fb[b] + delta[b, ..., t]).view(np.float32)  # int32 add wraps mod 2^32
                s = term if s is None else (s + term).astype(np.float32)
        y[m] = (s.astype(np.float64) * lsk[m][None, :]).sum(1)
    return y


# ----------------------------------------------------------------------------- TensorIR kernels
def make_int8_primfunc(cfg: LutGemmConfig, knobs: Int8Knobs | None, isa: str):
    """PrimFunc ``(x f32[M,K], w, codes, y f32[M,N])`` of ``isa``'s kernel (table build inside),
    global symbol ``<cfg.name>_<isa>``, body under a root block (Relax dataflow needs one)."""
    from tvm import tirx
    from tvm.script import tirx as T

    reason = unsupported_reason(cfg, isa)
    if reason:
        raise ValueError(reason)
    knobs = knobs or default_int8_knobs(cfg, isa)
    knobs.validate(cfg)
    M, N, K, BITS = cfg.m, cfg.n, cfg.k, cfg.bits
    COUNTS = cfg.term_counts  # terms applied per plane
    OFF = [sum(COUNTS[:b]) for b in range(BITS)]  # a plane's first term slot
    NTERM = sum(COUNTS)  # term slots per (tile, group)
    GS, G, KP = cfg.group_size, cfg.groups, cfg.kp
    Q = KP // 4  # quads per row
    JG = GS // 4  # quads per group
    NT = -(-N // ROWS)
    MI, NC = knobs.m_inner, knobs.n_chunks
    MB = M // MI
    TPC = -(-NT // NC)
    SHARED = cfg.shared_exp  # (AVX-512 only: unsupported_reason)
    PD = SHARED and isa == "avx512bw"  # planes in the bytes of one int32 (module docstring)
    TB = 16 if PD else _TABLE_BYTES[isa]  # table bytes per quad (16 entries, repeated per lane)
    avx512 = isa == "avx512"
    wide = isa in _WIDE
    W = 64 if wide else _SHUFFLE_BYTES[isa]  # weight bytes per vector
    KV = KP // 16 if wide else KP // 8  # weight vectors per row tile and plane
    VPG = GS // 16 if wide else GS // 8  # weight vectors per group
    PV = pd_vecs(cfg) if PD else 0  # weight vectors per tile and K-block (shared-exp avx512bw)
    PP, LU, NPART = pd_lookups(cfg) if PD else (0, 0, 0)  # (pd_lookups, pd_parts)
    QL = pd_quads(PP) if PD else 1  # quads per lookup
    NBK = 2 * QL  # row blocks per tile (of 16 / QL rows)
    UPK = 4 // QL  # units (of QL quads) per K-block of 16
    COPIES = UPK if PD and MI == 1 else 1  # sums per row block: units alternate between them
    # avx512 at M = 1 and 4 bits: two copies of the sums, consecutive K-blocks alternate between
    # them (the group loop is then not fully unrolled). Measured on Zen 5 (one thread, both
    # compiled in one process, alternating rounds, bit-identical output;
    # reports/bench/zen5-ab-copies-s19.txt): windowed fit 4096x4096 cold 480 -> 250 us, hot 116 ->
    # 106 us, 11008x4096 cold 1323 -> 733 us; free fit 4096x4096 cold 601 -> 531 us, hot 129 ->
    # 123 us. At 2 and 3 bits the copies were 1-7% slower, so they stay single there.
    VC = 2 if avx512 and MI == 1 and BITS == 4 else 1
    # avx512 per-term kernel at M = 1: at the start of each group, prefetch (prefetcht0) every
    # line of the next group's codes (NTERM lines of 64 bytes; they are 27-34% of its bytes).
    # Measured on Zen 5 (one process, alternating rounds, same weights; reports/bench/
    # zen5-prefetch-codes-s21.txt): weights from DRAM 4096x4096 one thread 268 -> 166 / 377 -> 230
    # / 536 -> 272 us at 2 / 3 / 4 bits (52-55% -> 85-100% of the DRAM floor), 11008x4096
    # 1.65-1.97x, two threads 1.32-1.39x, the model's 1536x576 and 576x1536 1.11-1.58x, its
    # smaller shapes unchanged; hot (L3) 0.95-1.01x. Not at M > 1 (M = 8: 0.76-1.18x, M = 128:
    # 0.91x) nor in the shared-exponent kernel (its codes are 9-12% of the bytes: 0.96-1.01x);
    # every other line only, or distances of 2 and 4 groups, gave less.
    PREFETCH_CODES = PREFETCH_NEXT_CODES and avx512 and not SHARED and M == 1
    KC = k_chunks(cfg, isa)  # K chunks, outside the tile loop (CHUNK_TABLE_BYTES)
    GPC = chunk_groups(cfg, isa)  # groups per chunk
    WSIZE = NT * KV * (PV if PD else BITS) * W
    acc_t = "int32" if wide else "int16"
    # avx512bw (per term): entries + 128 (module docstring)
    tab_t = "uint8" if isa == "avx512bw" and not PD else "int8"
    SW = shared_words(cfg, isa) if SHARED else NTERM * ROWS  # int16 words per (tile, group)
    DSIZE = PAD + NT * G * SW + (PAD if SHARED and not PD else 0)
    full_n = N % ROWS == 0
    build_loop = T.parallel if knobs.build_parallel else T.serial
    # each task builds its own rows' tables (FUSED_BUILD)
    FUSED = bool(FUSED_BUILD and knobs.build_parallel and NC == 1)

    def record(task, tt, g):
        """Index of the (tile, group) record of the task's tile tt and group g in the weights and
        codes as stored (avx512: chunk-major, ``stream_order``; otherwise tile-major)."""
        nt = (task % NC) * TPC + tt
        if KC == 1:
            return nt * G + g
        c = g // GPC
        return c * GPC * NT + nt * T.min(GPC, G - c * GPC) + g - c * GPC

    def sgn(c, t):
        return tirx.Cast("float32", tirx.bitwise_and(tirx.shift_right(c, t), 1) * 2 - 1)

    def i32x16(v):
        return v if wide else tirx.Cast("int32x16", v)

    odd = tirx.EQ(
        tirx.bitwise_and(tirx.Ramp(0, 1, 32), tirx.Broadcast(1, 32)), tirx.Broadcast(1, 32)
    )

    def shift(fb, dl, base, h):
        """bits(f) + delta of 16 rows (half h of the tile): a 16-bit add to the high words only
        (one masked ``vpaddw``; delta's low 16 bits are 0, so no carry is lost). The words of both
        halves are interleaved; half 1 loads them one word early, so its words land in the odd
        (high) positions too."""
        f16 = tirx.reinterpret("int16x32", fb)
        words = dl[tirx.Ramp(base + PAD - h, 1, 32)]
        return tirx.reinterpret("int32x16", tirx.Select(odd, f16 + words, f16))

    def epilogue(acc, dl, dbase, accbase, h, lsv, yv):
        """yv + (sum_b sum_t shift(float(acc_b), delta_bt)) * lsv (module docstring); shared
        exponent: yv + shift(float(sum_b acc_b), delta) * lsv (the byte weights are in acc_b)."""
        if SHARED:
            tot = None
            for c in range(VC):
                for b in range(BITS):
                    v = acc[tirx.Ramp(accbase + (c * BITS + b) * MI * ROWS, 1, 16)]
                    tot = v if tot is None else tot + v
            fb = tirx.reinterpret("int32x16", tirx.Cast("float32x16", tot))
            term = tirx.reinterpret("float32x16", shift(fb, dl, dbase, h))
            return yv + term * tirx.Broadcast(lsv, 16)
        s = None
        for b in range(BITS):
            isum = acc[tirx.Ramp(accbase + b * MI * ROWS, 1, 16)]
            for c in range(1, VC):
                isum = isum + acc[tirx.Ramp(accbase + (c * BITS + b) * MI * ROWS, 1, 16)]
            f = tirx.Cast("float32x16", i32x16(isum))
            fb = tirx.reinterpret("int32x16", f)
            for t in range(COUNTS[b]):
                term = tirx.reinterpret("float32x16", shift(fb, dl, dbase + (OFF[b] + t) * ROWS, h))
                s = term if s is None else s + term
        if s is None:  # every scale of the layer is 0
            return yv
        return yv + s * tirx.Broadcast(lsv, 16)

    def nibbles64(wv, hi):
        """Nibble ``hi`` (0: low, 1: high; the unrolled half) of each of 64 bytes. A 16-bit shift
        (vpsrlw; the neighbour byte's bits are masked off) measured faster than a byte shift
        (gf2p8affineqb)."""
        sh = tirx.reinterpret(
            "uint8x64",
            tirx.shift_right(
                tirx.reinterpret("uint16x32", wv), tirx.Broadcast(tirx.Cast("uint16", hi * 4), 32)
            ),
        )
        return tirx.bitwise_and(sh, tirx.Broadcast(tirx.const(15, "uint8"), 64))

    def lookup_avx512(tab, tbase, wv, hi):
        offs = tirx.Cast(
            "uint8x64",
            tirx.bitwise_and(tirx.Ramp(0, 1, 64), tirx.Broadcast(3, 64)) * tirx.Broadcast(16, 64),
        )
        nib = nibbles64(wv, hi)
        return tirx.call_llvm_pure_intrin(
            "int8x64",
            "llvm.x86.avx512.permvar.qi.512",
            tab[tirx.Ramp(tbase, 1, 64)],
            tirx.bitwise_or(nib, offs),
        )

    def dpbusd(accv, mv, b, hh, lookups):
        """accv + the 4-byte sums of ``lookups`` (one int32 per row), each byte times its row's
        byte weight of plane b (shared exponent: ``mv``, loaded by ``load_mults``) or 1."""
        weights = (
            mv[tirx.Ramp((b * 2 + hh) * 64, 1, 64)]
            if SHARED
            else tirx.Broadcast(tirx.const(1, "uint8"), 64)
        )
        return vpdpbusd(accv, weights, lookups)

    def expand_mults(dl, base, b, hh):
        """Plane b's byte weights of half hh's 16 rows, each repeated for its 4 bytes (p = 4r + t)
        of a weight vector: one vpermb of the 64 bytes that start with the plane's 32."""
        idx = tirx.Cast(
            "uint8x64",
            tirx.shift_right(tirx.Ramp(0, 1, 64), tirx.Broadcast(2, 64))
            + tirx.Broadcast(hh * 16, 64),
        )
        raw = tirx.reinterpret("uint8x64", dl[tirx.Ramp(base + PAD + ROWS + b * 16, 1, 32)])
        return tirx.call_llvm_pure_intrin("uint8x64", "llvm.x86.avx512.permvar.qi.512", raw, idx)

    @T.macro
    def load_mults(dl, mv, task, tt, g):
        if SHARED:
            for b in T.unroll(BITS):
                for hh in T.unroll(2):
                    mv[T.Ramp((b * 2 + hh) * 64, 1, 64)] = expand_mults(
                        dl, record(task, tt, g) * SW, b, hh
                    )

    def shuffle(tab, tbase, wv, hi):
        """int16 lookups of one quad's table for W rows (wv: W weight bytes)."""
        nib = (
            tirx.shift_right(wv, tirx.Broadcast(tirx.const(4, "uint8"), W))
            if hi
            else tirx.bitwise_and(wv, tirx.Broadcast(tirx.const(15, "uint8"), W))
        )
        name = "llvm.x86.avx2.pshuf.b" if isa == "avx2" else "llvm.aarch64.neon.tbl1.v16i8"
        look = tirx.call_llvm_pure_intrin(f"int8x{W}", name, tab[tirx.Ramp(tbase, 1, W)], nib)
        return tirx.Cast(f"int16x{W}", look)

    @T.macro
    def apply_epilogues(acc, dl, ls, yacc, task, tt, g):
        """yacc += the epilogue of scale group g for both 16-row halves of every row block."""
        for mi in T.unroll(MI):
            for h in T.unroll(2):
                yacc[T.Ramp(mi * ROWS + h * 16, 1, 16)] = epilogue(
                    acc,
                    dl,
                    record(task, tt, g) * SW,
                    mi * ROWS + h * 16,
                    h,
                    ls[((task // NC) * MI + mi) * G + g],
                    yacc[T.Ramp(mi * ROWS + h * 16, 1, 16)],
                )

    def biased(v):
        """avx512bw stores each entry + 128 (exact in float32: the entries are integers)."""
        return v + tirx.Broadcast(tirx.const(128.0, "float32"), TB) if tab_t == "uint8" else v

    def quad_sum(x, xr, m, g, j, c):
        """Entry c of quad j's float table: sum_t (bit t of c ? +x : -x)[4j + t] of group g of
        row m (read from the zero-padded copy ``xr`` when K is not a multiple of the group)."""

        def xv(k):
            return xr[k] if PADX else x[m, k]

        return (
            sgn(c, 0) * xv(g * GS + 4 * j)
            + sgn(c, 1) * xv(g * GS + 4 * j + 1)
            + sgn(c, 2) * xv(g * GS + 4 * j + 2)
            + sgn(c, 3) * xv(g * GS + 4 * j + 3)
        )

    # pass 1 keeps NMX lane-wise maxima (independent vmaxps chains: one chain held it to the
    # 4-cycle vmaxps latency per quad)
    NMX = max(d for d in (4, 2, 1) if JG % d == 0)
    CVT = wide and TB == 16  # int8 entries via vcvtps2dq (round to nearest even, as rint)
    K16 = K // 16 * 16
    PADX = K % GS != 0  # the row is copied into a zero-padded buffer first
    XR = KP if PADX else 1
    # the last group's weight vectors past K (zero-padded columns) are skipped, in the lookups
    # and in the table build: K = 576 with group 128 pads 64 of 640 columns
    KQ_LAST = -(-(K - (G - 1) * GS) // (GS // VPG))  # weight vectors of the last group
    J_LAST = -(-KQ_LAST * (GS // VPG // 4) // NMX)  # their quads' tables, NMX at a time

    def lane_max(v):
        """TB lanes, each the max of v's lanes: log2(TB) folds of lane i with lane i ^ half (a
        scalar max over the lanes was a 16-deep chain of vmaxss per group)."""
        half = TB // 2
        while half:
            v = tirx.max(v, tirx.Shuffle([v], [tirx.const(i ^ half, "int32") for i in range(TB)]))
            half //= 2
        return v

    def entries(v):
        """The stored table entries of TB float entries ``v`` (already times 127 / mx)."""
        if CVT:  # one conversion instead of vrndscaleps + vcvttps2dq; the same integers
            i32 = tirx.call_llvm_pure_intrin(
                "int32x16",
                "llvm.x86.avx512.mask.cvtps2dq.512",
                v,
                tirx.Broadcast(tirx.const(0, "int32"), 16),
                tirx.const(-1, "int16"),
                tirx.const(4, "int32"),
            )
            return tirx.Cast(f"{tab_t}x{TB}", i32)
        return tirx.Cast(f"{tab_t}x{TB}", biased(tirx.nearbyint(v)))

    @T.macro
    def build_tables_into(x, tab, ls, m0, rows, loop):
        """Per row m of x: the scale ls[m, g] and the int8 tables of every quad (build_tables).

        Two passes per group: the float entries of every quad's table (into ``tot``) and their
        lane-wise max, then the int8 entries. A quad's largest entry is the one whose signs match
        the activations': exactly ``((|x0| + |x1|) + |x2|) + |x3|`` (same order, and rounding is
        symmetric in the sign), so ``mx`` is bit-exact with ``build_tables``. The second pass is
        written as explicit vector ops: inside ``T.vectorized`` TVM 0.27 scalarized it (a load of
        ``tot`` next to the store to ``tab``) and LLVM then vectorized over j with gathers.
        When K is not a multiple of the group, the row is first copied into a zero-padded buffer
        (reading x behind a bounds test per activation cost branches in the quad loop).
        Measured against the former one-pass build (max of |x| sums in a scalar loop, entries
        computed once), M=1, one thread, bit-identical output: 576x576 2 bits 5.47 -> 3.05 us,
        1536x576 8.99 -> 6.55 us, 4096x4096 unchanged (102.7 us). Then NMX maxima, the padded
        row, a lane-fold max, vcvtps2dq, no parallel launch on one thread and the last group's
        padded K-blocks skipped, against the former build in the same process, bit-identical
        output, one thread, Xeon (Cascade Lake), avx512bw shared exponent: 32x576 M=8 (the build
        dominates) 13.3 -> 7.6 us, 576x576 M=8 36.9 -> 29.5 us (2 bits) and 44.9 -> 36.7 us (3
        bits), 576x576 M=1 6.0 -> 5.2 us, 4096x4096 M=1 unchanged."""
        for mm in loop(rows):
            m = m0 + mm
            mx = T.alloc_buffer((1,), "float32", scope="local")
            inv = T.alloc_buffer((1,), "float32", scope="local")
            vmx = T.alloc_buffer((NMX * TB,), "float32", scope="local")
            tot = T.alloc_buffer((JG * TB,), "float32")
            xr = T.alloc_buffer((XR,), "float32")
            if PADX:
                for k0 in range(K // 16):
                    for k1 in T.vectorized(16):
                        xr[k0 * 16 + k1] = x[m, k0 * 16 + k1]
                for k in range(K - K16):
                    xr[K16 + k] = x[m, K16 + k]
                for k in T.vectorized(KP - K):
                    xr[K + k] = T.float32(0)
            for g in range(G):
                for u in T.unroll(NMX):
                    vmx[T.Ramp(u * TB, 1, TB)] = T.Broadcast(T.float32(0), TB)
                for j0 in range(T.if_then_else(g == G - 1, J_LAST, JG // NMX)):
                    for u in T.unroll(NMX):
                        for c in T.vectorized(TB):
                            tot[(j0 * NMX + u) * TB + c] = quad_sum(x, xr, m, g, j0 * NMX + u, c)
                        for c in T.vectorized(TB):
                            vmx[u * TB + c] = T.max(vmx[u * TB + c], tot[(j0 * NMX + u) * TB + c])
                for u in T.unroll(NMX - 1):
                    vmx[T.Ramp(0, 1, TB)] = T.max(
                        vmx[T.Ramp(0, 1, TB)], vmx[T.Ramp((u + 1) * TB, 1, TB)]
                    )
                vmx[T.Ramp(0, 1, TB)] = lane_max(vmx[T.Ramp(0, 1, TB)])
                mx[0] = vmx[0]
                ls[m * G + g] = mx[0] * T.float32(2.0**-SHIFT / QMAX)  # ls * 2^-SHIFT, exact
                inv[0] = T.if_then_else(mx[0] > T.float32(0), T.float32(QMAX) / mx[0], T.float32(0))
                for j in range(T.if_then_else(g == G - 1, J_LAST * NMX, JG)):
                    tab[T.Ramp((m * Q + g * JG + j) * TB, 1, TB)] = entries(
                        T.Broadcast(inv[0], TB) * tot[T.Ramp(j * TB, 1, TB)]
                    )

    def bw_sum(acc, tab, w, task, tt, g, kq, b, mi, which):
        """avx512bw: the new value of the byte-pair sums (which=0: whole words, 1: high bytes) of
        the two 64-byte lookups of plane b's weight vector kq (group g, tile tt) for row mi of the
        row block, added to ``acc[(b * MI + mi) * 64 + 32 * which : + 32]``. Low nibbles look up
        quads 4kq, 4kq+1 (the table bytes at ``tbase``), high nibbles 4kq+2, 4kq+3
        (``tbase + 2 * TB``); a word holds row i's biased entry in its low byte and row 16 + i's in
        its high byte, so the word sums wrap mod 2^16 while the high-byte sums stay exact."""
        tbase = (((task // NC) * MI + mi) * Q + g * JG + 4 * kq) * TB
        wv = w[tirx.Ramp(((((task % NC) * TPC + tt) * KV + g * VPG + kq) * BITS + b) * 64, 1, 64)]
        base = (b * MI + mi) * 64
        mask = tirx.Broadcast(tirx.const(15, "uint8"), 64)
        four = tirx.Broadcast(tirx.const(4, "uint16"), 32)
        eight = tirx.Broadcast(tirx.const(8, "uint16"), 32)
        nibs = (
            tirx.bitwise_and(wv, mask),
            tirx.bitwise_and(
                tirx.reinterpret(
                    "uint8x64", tirx.shift_right(tirx.reinterpret("uint16x32", wv), four)
                ),
                mask,
            ),
        )
        tot = acc[tirx.Ramp(base + 32 * which, 1, 32)]
        for i, nib in enumerate(nibs):
            look = tirx.call_llvm_pure_intrin(
                "uint8x64",
                "llvm.x86.avx512.pshuf.b.512",
                tab[tirx.Ramp(tbase + 2 * TB * i, 1, 64)],
                nib,
            )
            words = tirx.reinterpret("uint16x32", look)
            tot = tot + (tirx.shift_right(words, eight) if which else words)
        return tot

    def bw_fold(acc, base, s, g):
        """int32 sums of rows ``16 s + i`` (i < 16) of one plane and row: both halves (quads
        4kq + h) added, the high-byte sums (s = 1) or the low-byte sums recovered from the word sums
        (s = 0: ``words - (high << 8)``, exact below 2^16), less the bias 128 per lookup (the
        last group looks up KQ_LAST K-blocks of 4 quads)."""
        parts = []
        for h in range(2):
            hs = acc[tirx.Ramp(base + 32 + 16 * h, 1, 16)]
            if s == 0:
                ws = acc[tirx.Ramp(base + 16 * h, 1, 16)]
                hs = ws - tirx.shift_left(hs, tirx.Broadcast(tirx.const(8, "uint16"), 16))
            parts.append(tirx.Cast("int32x16", hs))
        bias = tirx.if_then_else(
            g == G - 1, tirx.const(128 * 4 * KQ_LAST, "int32"), tirx.const(128 * (GS // 4), "int32")
        )
        return parts[0] + parts[1] - tirx.Broadcast(bias, 16)

    @T.macro
    def bw_accumulate(acc, tab, w, task, tt, g, kq):
        for b in T.unroll(BITS):
            for mi in T.unroll(MI):
                # the word sums and the high-byte sums (Python constants: bw_sum branches on them)
                acc[T.Ramp((b * MI + mi) * 64, 1, 32)] = bw_sum(
                    acc, tab, w, task, tt, g, kq, b, mi, 0
                )
                acc[T.Ramp((b * MI + mi) * 64 + 32, 1, 32)] = bw_sum(
                    acc, tab, w, task, tt, g, kq, b, mi, 1
                )

    @T.macro
    def bw_fold_all(acc, acc32, g):
        for b in T.unroll(BITS):
            for mi in T.unroll(MI):
                acc32[T.Ramp((b * MI + mi) * ROWS, 1, 16)] = bw_fold(acc, (b * MI + mi) * 64, 0, g)
                acc32[T.Ramp((b * MI + mi) * ROWS + 16, 1, 16)] = bw_fold(
                    acc, (b * MI + mi) * 64, 1, g
                )

    @T.macro
    def store_tile(y, yacc, ybuf, task, tt, kc):
        """y = the tile's sums (K chunk 0) or y + them (later chunks, ``k_chunks``)."""
        for mi in T.unroll(MI):
            if full_n:
                if kc == 0:
                    y[(task // NC) * MI + mi, T.Ramp(((task % NC) * TPC + tt) * ROWS, 1, ROWS)] = yacc[T.Ramp(mi * ROWS, 1, ROWS)]  # fmt: skip
                else:
                    y[(task // NC) * MI + mi, T.Ramp(((task % NC) * TPC + tt) * ROWS, 1, ROWS)] = y[(task // NC) * MI + mi, T.Ramp(((task % NC) * TPC + tt) * ROWS, 1, ROWS)] + yacc[T.Ramp(mi * ROWS, 1, ROWS)]  # fmt: skip
            else:
                ybuf[T.Ramp(0, 1, ROWS)] = yacc[T.Ramp(mi * ROWS, 1, ROWS)]
                for r in range(ROWS):
                    if ((task % NC) * TPC + tt) * ROWS + r < N:
                        if kc == 0:
                            y[(task // NC) * MI + mi, ((task % NC) * TPC + tt) * ROWS + r] = ybuf[r]  # fmt: skip
                        else:
                            y[(task // NC) * MI + mi, ((task % NC) * TPC + tt) * ROWS + r] = y[(task // NC) * MI + mi, ((task % NC) * TPC + tt) * ROWS + r] + ybuf[r]  # fmt: skip

    def n_kq(g):
        """Weight vectors (K-blocks of 16) of group g: fewer in the last group of a ragged K."""
        return tirx.if_then_else(g == G - 1, KQ_LAST, VPG)

    def vbmi_sums(c, b, mi, hh):
        """avx512: the int32 sums of copy c (``VC``), plane b, row mi, nibble hh (16 rows each)."""
        return tirx.Ramp((((c * BITS + b) * MI + mi) * 2 + hh) * 16, 1, 16)

    def vbmi_table(task, mi, g, kq):
        """avx512: the first byte of the 64-byte table (4 quads) of K-block kq of group g, row mi."""
        return (((task // NC) * MI + mi) * (KP // 16) + g * VPG + kq) * 64

    def vbmi_weights(task, tt, g, kq, b):
        """avx512: the 64 weight bytes of K-block kq of group g, plane b, of the task's tile tt."""
        return tirx.Ramp(((record(task, tt, g) * VPG + kq) * BITS + b) * 64, 1, 64)

    @T.macro
    def prefetch_codes(dl, task, tt, g):
        """Prefetch the lines of the next (tile, group)'s codes (``PREFETCH_CODES``); past the
        last group the address is clamped to the buffer's last word."""
        if PREFETCH_CODES:
            for ln in T.unroll(SW * 2 // 64):
                T.evaluate(
                    prefetch_read(
                        T.address_of(
                            dl[
                                T.min(
                                    (record(task, tt, g) + 1) * SW + PAD + ln * 32,
                                    DSIZE - 1,
                                )
                            ]
                        )
                    )
                )

    @T.macro
    def vbmi_group(acc, mv, tab, w, dl, task, tt, g):
        """avx512: the group's lookups, vpermb over 4 quads' tables, vpdpbusd into int32. With
        ``VC`` copies of the sums, consecutive K-blocks alternate between them."""
        prefetch_codes(dl, task, tt, g)
        load_mults(dl, mv, task, tt, g)
        for kq2 in range((n_kq(g) + VC - 1) // VC):
            for c in T.unroll(VC):
                if kq2 * VC + c < n_kq(g):
                    for b in T.unroll(BITS):
                        for mi in T.unroll(MI):
                            # high nibble first: its shift reads the loaded vector, the low
                            # nibble's ternlog may then overwrite it
                            for h in T.unroll(2):
                                acc[vbmi_sums(c, b, mi, 1 - h)] = dpbusd(
                                    acc[vbmi_sums(c, b, mi, 1 - h)],
                                    mv,
                                    b,
                                    1 - h,
                                    lookup_avx512(
                                        tab,
                                        vbmi_table(task, mi, g, kq2 * VC + c),
                                        w[vbmi_weights(task, tt, g, kq2 * VC + c, b)],
                                        1 - h,
                                    ),
                                )

    @T.macro
    def shuffle_group(acc, tab, w, task, tt, g):
        """avx2 / neon: the group's lookups, one byte shuffle per quad, widened int16 adds."""
        for j8 in range(T.if_then_else(g == G - 1, KQ_LAST, VPG)):
            for b in T.unroll(BITS):
                for mi in T.unroll(MI):
                    for s in T.unroll(ROWS // W):
                        acc[T.Ramp((b * MI + mi) * ROWS + s * W, 1, W)] = (
                            acc[T.Ramp((b * MI + mi) * ROWS + s * W, 1, W)]
                            + shuffle(
                                tab,
                                (((task // NC) * MI + mi) * Q + g * JG + 2 * j8) * TB,
                                w[
                                    T.Ramp(
                                        ((((task % NC) * TPC + tt) * KV + g * VPG + j8) * BITS + b)
                                        * W
                                        + s * W,
                                        1,
                                        W,
                                    )
                                ],  # fmt: skip
                                False,
                            )
                            + shuffle(
                                tab,
                                (((task // NC) * MI + mi) * Q + g * JG + 2 * j8 + 1) * TB,
                                w[
                                    T.Ramp(
                                        ((((task % NC) * TPC + tt) * KV + g * VPG + j8) * BITS + b)
                                        * W
                                        + s * W,
                                        1,
                                        W,
                                    )
                                ],  # fmt: skip
                                True,
                            )
                        )

    def pd_lookup(tab, tbase, wv, hi):
        """64 lookups: nibble ``hi`` of every byte of ``wv`` indexes its lane's quad table."""
        return tirx.call_llvm_pure_intrin(
            "int8x64", "llvm.x86.avx512.pshuf.b.512", pd_table(tab, tbase, PP), nibbles64(wv, hi)
        )

    def pd_sums(mi, copy, v):
        """The int32 sums of row block v, copy ``copy``, of row mi."""
        return tirx.Ramp(((mi * COPIES + copy) * NBK + v) * 16, 1, 16)

    def pd_half(acc, mi, h):
        """int32x16: rows 16h.. of row mi in row order, summed over the copies (``pd_rows``)."""
        blocks = []
        for i in range(QL):
            v = h * QL + i
            s = acc[pd_sums(mi, 0, v)]
            for copy in range(1, COPIES):
                s = s + acc[pd_sums(mi, copy, v)]
            blocks.append(s)
        return pd_rows(blocks, PP)

    @T.macro
    def pd_group(acc, mv, tab, w, dl, ls, yacc, task, tt, g):
        """avx512bw, shared exponent: per K-block of 16, PV weight vectors give 2 PV lookups of
        64 bytes (units of QL quads, LU lookups each); vpdpbusd weights each plane's byte by
        ``|c_b|`` into one int32 per (row, quad of the lookup). Group end: rows in order with at
        most one lane fold (two quads per lookup), one conversion, exponent add and multiply-add
        per 16 rows."""
        dbase = (((task % NC) * TPC + tt) * G + g) * SW
        for jj in T.unroll(LU):
            for part in T.unroll(NPART):
                mv[T.Ramp((jj * NPART + part) * 64, 1, 64)] = pd_mults(dl, dbase, jj, part, PP)
        for i in T.unroll(MI * COPIES * NBK):
            acc[T.Ramp(i * 16, 1, 16)] = T.Broadcast(T.int32(0), 16)
        for kq in range(T.if_then_else(g == G - 1, KQ_LAST, VPG)):
            for u in T.unroll(UPK):
                for jj in T.unroll(LU):  # lookup n = u LU + jj: nibble n % 2 of vector n // 2
                    for mi in T.unroll(MI):
                        for part in T.unroll(NPART):  # the row blocks of its int32s (pd_parts)
                            acc[pd_sums(mi, u % COPIES, pd_parts(PP, jj, part)[0])] = vpdpbusd(
                                acc[pd_sums(mi, u % COPIES, pd_parts(PP, jj, part)[0])],
                                mv[T.Ramp((jj * NPART + part) * 64, 1, 64)],
                                pd_lookup(
                                    tab,
                                    (((task // NC) * MI + mi) * Q + g * JG + 4 * kq + u * QL) * TB,
                                    w[
                                        T.Ramp(
                                            (
                                                (((task % NC) * TPC + tt) * KV + g * VPG + kq) * PV
                                                + (u * LU + jj) // 2
                                            )
                                            * 64,
                                            1,
                                            64,
                                        )
                                    ],  # fmt: skip
                                    (u * LU + jj) % 2,
                                ),
                            )
        for mi in T.unroll(MI):
            for h in T.unroll(2):
                yacc[T.Ramp(mi * ROWS + h * 16, 1, 16)] = yacc[
                    T.Ramp(mi * ROWS + h * 16, 1, 16)
                ] + T.reinterpret(
                    "float32x16",
                    shift(
                        T.reinterpret("int32x16", T.Cast("float32x16", pd_half(acc, mi, h))),
                        dl,
                        dbase,
                        h,
                    ),
                ) * T.Broadcast(ls[((task // NC) * MI + mi) * G + g], 16)

    @T.macro
    def group(acc, aux, tab, w, dl, ls, yacc, task, tt, g):
        """One scale group of one tile: zero the sums, look up and add, apply the epilogue.
        ``aux``: avx512's byte weights, avx512bw's int32 sums (unused otherwise)."""
        if PD:
            pd_group(acc, aux, tab, w, dl, ls, yacc, task, tt, g)
        elif isa == "avx512bw":
            for i in T.unroll(BITS * MI * 2):
                acc[T.Ramp(i * 32, 1, 32)] = T.Broadcast(T.uint16(0), 32)
            for kq in range(T.if_then_else(g == G - 1, KQ_LAST, VPG)):
                bw_accumulate(acc, tab, w, task, tt, g, kq)
            bw_fold_all(acc, aux, g)
            apply_epilogues(aux, dl, ls, yacc, task, tt, g)
        else:
            for i in T.unroll(BITS * MI * 2 * VC):
                acc[T.Ramp(i * 16, 1, 16)] = T.Broadcast(tirx.const(0, acc_t), 16)
            if avx512:
                vbmi_group(acc, aux, tab, w, dl, task, tt, g)
            else:
                shuffle_group(acc, tab, w, task, tt, g)
            apply_epilogues(acc, dl, ls, yacc, task, tt, g)

    if PD:  # int32 sums per (row, quad of the lookup) of each row block; the byte weights in aux
        ACC_N, ACC_T, AUX_N, AUX_T = MI * COPIES * NBK * 16, "int32", LU * NPART * 64, "uint8"
    elif isa == "avx512bw":  # biased byte pairs in uint16 words; their int32 sums in aux
        ACC_N, ACC_T, AUX_N, AUX_T = BITS * MI * 64, "uint16", BITS * MI * ROWS, "int32"
    elif avx512:  # int32 sums; the shared-exponent byte weights in aux
        ACC_N, ACC_T, AUX_N, AUX_T = BITS * MI * ROWS * VC, acc_t, BITS * 2 * 64, "uint8"
    else:  # int16 sums; aux unused
        ACC_N, ACC_T, AUX_N, AUX_T = BITS * MI * ROWS, acc_t, 1, "uint8"

    @T.prim_func
    def kernel(
        x: T.Buffer((M, K), "float32"),
        w: T.Buffer((WSIZE,), "uint8"),
        dl: T.Buffer((DSIZE,), "int16"),
        y: T.Buffer((M, N), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        tab = T.alloc_buffer((M * Q * TB,), tab_t)
        ls = T.alloc_buffer((M * G,), "float32")
        if not FUSED:
            build_tables_into(x, tab, ls, 0, M, build_loop)
        for task in T.parallel(MB * NC):
            if FUSED:
                build_tables_into(x, tab, ls, task * MI, MI, T.serial)
            acc = T.alloc_buffer((ACC_N,), ACC_T, scope="local")
            aux = T.alloc_buffer((AUX_N,), AUX_T, scope="local")
            yacc = T.alloc_buffer((MI * ROWS,), "float32", scope="local")
            ybuf = T.alloc_buffer((ROWS,), "float32", scope="local")
            for kc in range(KC):
                for tt in range(TPC):
                    if (task % NC) * TPC + tt < NT:
                        for i in T.unroll(MI * 2):
                            yacc[T.Ramp(i * 16, 1, 16)] = T.Broadcast(T.float32(0), 16)
                        for g in range(T.min(GPC, G - kc * GPC)):
                            group(acc, aux, tab, w, dl, ls, yacc, task, tt, kc * GPC + g)
                        store_tile(y, yacc, ybuf, task, tt, kc)

    return as_root_block(kernel, int8_symbol(cfg, isa))
