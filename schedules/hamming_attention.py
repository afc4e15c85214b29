"""Additive (Hamming) attention: binary codes for Q and K, scores from XOR + popcount, and the
``(.)V`` product by exponent adds. CPU kernels (TensorIR) with their numpy references.

Per head ``h`` with ``b`` code bits (a multiple of 64) and projection ``R_h [D, b]``:

* codes: ``c(x) = pack(sign(x R_h) > 0)`` as ``uint64[words]`` (bit ``t`` of word ``w`` is
  projection ``64 w + t``). The projection is a float product (``D * b`` multiply-adds per token
  and head): the one multiplication left in the score path. A data-free ``R`` is random +-1
  (then the products are sign flips and adds; the kernel does not special-case it).
* scores: ``ham(i, j) = popcount(c(q_i) XOR c(k_j))`` (LLVM ``ctpop`` on uint64: ``vpopcntq`` with
  AVX-512 VPOPCNTDQ, a bit-trick sequence elsewhere); the logit is
  ``t_h (b - 2 ham) / b`` (``t_h`` a calibrated temperature), so the softmax weight of key ``j`` is
  a per-head table lookup ``table[h, ham]`` (``b + 1`` entries, built at compile time): no
  multiply and no ``exp`` at run time.
* ``pv = "pow2"`` (multiplication-free): the table holds integer exponents
  ``E[h, ham] = round(log2 e * t_h ((b - 2 ham) / b - 1))``; each query row subtracts its largest
  ``E`` (integer), and ``sum_j 2^E_j v_j`` is formed by adding ``E_j << 23`` to the bits of ``v_j``
  (exponent add, underflow to 0) and float adds; the normalizer ``sum_j 2^E_j`` is built from
  exponent bits. One division per output element remains.
* ``pv = "float"``: the table holds the float weights ``exp(t_h ((b - 2 ham) / b - 1))`` and the
  product is a float multiply-add (Hamming scores alone, for measuring their error).

Padded keys (``keymask[b, j] <= -1e4``, the additive bias of ``encoder.py``) are skipped.
"""

from __future__ import annotations

import dataclasses

import numpy as np

WORD = 64
PV_MODES = ("pow2", "float")
MASK_LIMIT = -1e4  # bias above this is a token, below a padded key
MIN_EXP = -126  # pow2 weights below 2^-126 are dropped


@dataclasses.dataclass(frozen=True)
class CodesConfig:
    b: int
    s: int
    h: int
    d: int
    bits: int

    def __post_init__(self) -> None:
        if self.bits < WORD or self.bits % WORD:
            raise ValueError(f"bits must be a positive multiple of {WORD}, got {self.bits}")

    @property
    def words(self) -> int:
        return self.bits // WORD

    @property
    def name(self) -> str:
        return f"binary_codes_b{self.bits}_B{self.b}_s{self.s}_h{self.h}_d{self.d}"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    b: int
    s: int
    h: int
    d: int
    bits: int
    pv: str = "pow2"

    def __post_init__(self) -> None:
        if self.bits < WORD or self.bits % WORD:
            raise ValueError(f"bits must be a positive multiple of {WORD}, got {self.bits}")
        if self.pv not in PV_MODES:
            raise ValueError(f"pv={self.pv!r} is not one of {PV_MODES}")

    @property
    def words(self) -> int:
        return self.bits // WORD

    @property
    def name(self) -> str:
        return f"hamming_attention_{self.pv}_b{self.bits}_B{self.b}_s{self.s}_h{self.h}_d{self.d}"


@dataclasses.dataclass
class AttentionPlan:
    """What one attention site becomes: projection [H, D, bits], temperatures [H], PV mode."""

    proj: np.ndarray
    temp: np.ndarray
    pv: str = "pow2"

    @property
    def heads(self) -> int:
        return int(self.proj.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.proj.shape[1])

    @property
    def bits(self) -> int:
        return int(self.proj.shape[2])

    def logits(self) -> np.ndarray:
        """float64 [H, bits + 1]: the logit of each Hamming distance minus the largest (ham 0)."""
        ham = np.arange(self.bits + 1)
        return np.asarray(self.temp, np.float64)[:, None] * (-2.0 * ham / self.bits)[None, :]

    def table(self) -> np.ndarray:
        lg = self.logits()
        if self.pv == "float":
            return np.exp(lg).astype(np.float32)
        return np.maximum(np.rint(lg / np.log(2.0)), MIN_EXP).astype(np.int32)


# ----------------------------------------------------------------------------- projections
def random_projection(heads: int, d: int, bits: int, seed: int = 0) -> np.ndarray:
    """Data-free: i.i.d. random +-1 entries [H, D, bits] (sign random projection, SimHash)."""
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1.0, 1.0], np.float32), size=(heads, d, bits))


def calibrated_projection(
    samples: np.ndarray, bits: int, seed: int = 0, iters: int = 20
) -> np.ndarray:
    """Calibrated: per head, directions fitted to calibration vectors ``samples [H, n, D]`` (q and
    k rows together, normalized). Each block of ``D`` bits is an ITQ rotation (Gong & Lazebnik):
    start from a random orthogonal matrix and alternate ``B = sign(X R)`` and the orthogonal
    Procrustes step ``R = U V^T`` of ``X^T B`` (in the raw, unwhitened space, so the codes keep
    the angles that ``q k^T`` depends on); further blocks start from other random rotations.
    Returns [H, D, bits]."""
    h, _, d = samples.shape
    rng = np.random.default_rng(seed)
    out = np.empty((h, d, bits), np.float32)
    for hh in range(h):
        x = np.asarray(samples[hh], np.float64)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        cols = []
        while sum(c.shape[1] for c in cols) < bits:
            r, _ = np.linalg.qr(rng.standard_normal((d, d)))
            for _ in range(iters):
                b = np.sign(x @ r)
                b[b == 0] = 1
                u, _, vt = np.linalg.svd(x.T @ b)
                r = u @ vt
            cols.append(r)
        out[hh] = np.concatenate(cols, axis=1)[:, :bits]
    return out


def binary_codes(x: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Reference codes: x [B, S, H, D], proj [H, D, bits] -> uint64 [B, H, S, bits // 64]."""
    p = np.einsum("bshd,hdt->bhst", np.asarray(x, np.float64), np.asarray(proj, np.float64))
    bits = (p > 0).astype(np.uint64)
    b, h, s, nb = bits.shape
    w = bits.reshape(b, h, s, nb // WORD, WORD) << np.arange(WORD, dtype=np.uint64)
    return np.bitwise_or.reduce(w, axis=-1)


def hamming(qc: np.ndarray, kc: np.ndarray) -> np.ndarray:
    """[B, H, S, W] x [B, H, S, W] -> int [B, H, S, S] popcount(q XOR k)."""
    x = qc[:, :, :, None, :] ^ kc[:, :, None, :, :]
    by = x.view(np.uint8).reshape(*x.shape[:-1], -1)
    return np.unpackbits(by, axis=-1).sum(-1).astype(np.int64)


def reference(qc, kc, v, keymask, table, pv: str) -> np.ndarray:
    """Reference attention output [B, S, H, D] (float64) from codes, values, mask and table."""
    ham = hamming(qc, kc)  # [B, H, S, S]
    h_idx = np.arange(table.shape[0])[None, :, None, None]
    valid = (np.asarray(keymask) > MASK_LIMIT)[:, None, None, :]
    if pv == "float":
        wgt = np.asarray(table, np.float64)[h_idx, ham]
    else:
        e = np.asarray(table, np.int64)[h_idx, ham]
        e = e - np.where(valid, e, np.iinfo(np.int64).min // 2).max(-1, keepdims=True)
        wgt = np.where(e >= MIN_EXP, np.exp2(e.astype(np.float64)), 0.0)
    wgt = np.where(valid, wgt, 0.0)
    num = np.einsum("bhij,bjhd->bihd", wgt, np.asarray(v, np.float64))
    den = wgt.sum(-1).transpose(0, 2, 1)[..., None]  # [B, S, H, 1]
    return num / den


# ----------------------------------------------------------------------------- TensorIR kernels
def make_codes_primfunc(cfg: CodesConfig):
    """``(x f32[B, S, H, D], proj f32[H, D, bits]) -> codes u64[B, H, S, W]``."""
    from tvm import tirx
    from tvm.script import tirx as T

    B, S, H, D, NB, W = cfg.b, cfg.s, cfg.h, cfg.d, cfg.bits, cfg.words
    one = tirx.const(1, "uint64")
    zero = tirx.const(0, "uint64")

    @T.prim_func(s_tir=True)
    def codes(
        x: T.Buffer((B, S, H, D), "float32"),
        proj: T.Buffer((H, D, NB), "float32"),
        out: T.Buffer((B, H, S, W), "uint64"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            for task in T.parallel(B * S):
                acc = T.sblock_alloc_buffer((NB,), "float32")
                word = T.sblock_alloc_buffer((1,), "uint64")
                for hh in range(H):
                    for t in T.vectorized(NB):
                        acc[t] = T.float32(0)
                    for dd in range(D):
                        for t in T.vectorized(NB):
                            acc[t] = acc[t] + x[task // S, task % S, hh, dd] * proj[hh, dd, t]
                    for w in range(W):
                        word[0] = zero
                        for t in range(WORD):
                            word[0] = T.bitwise_or(
                                word[0],
                                T.shift_left(
                                    T.Select(acc[w * WORD + t] > T.float32(0), one, zero),
                                    T.Cast("uint64", t),
                                ),
                            )
                        out[task // S, hh, task % S, w] = word[0]

    return codes.with_attr("global_symbol", cfg.name)


def make_attention_primfunc(cfg: AttentionConfig):
    """``(qc u64[B,H,S,W], kc u64[B,H,S,W], v f32[B,S,H,D], keymask f32[B,S],
    table [H, bits+1]) -> out f32[B,S,H,D]`` (table int32 for pow2, float32 for float)."""
    from tvm import tirx
    from tvm.script import tirx as T

    B, S, H, D, NB, W = cfg.b, cfg.s, cfg.h, cfg.d, cfg.bits, cfg.words
    pow2 = cfg.pv == "pow2"
    tdtype = "int32" if pow2 else "float32"
    limit = tirx.const(MASK_LIMIT, "float32")
    fzero = tirx.const(0.0, "float32")

    def ham(qc, kc, b, hh, i, j):
        tot = None
        for w in range(W):
            c = tirx.Cast(
                "int32", tirx.popcount(tirx.bitwise_xor(qc[b, hh, i, w], kc[b, hh, j, w]))
            )
            tot = c if tot is None else tot + c
        return tot

    def exp2_bits(e):
        """2^e as float32 from exponent bits (e <= 0; 0 below 2^-126)."""
        return tirx.Select(
            e < MIN_EXP, fzero, tirx.reinterpret("float32", tirx.shift_left(e + 127, 23))
        )

    def scaled(vval, e):
        """v * 2^e by an exponent add (e <= 0); 0 when e < MIN_EXP (dropped weight) or the
        result leaves the normal range."""
        vb = tirx.reinterpret("int32", vval)
        ex = tirx.bitwise_and(tirx.shift_right(vb, 23), 255)
        return tirx.Select(
            tirx.Or(ex + e <= 0, e < MIN_EXP),
            fzero,
            tirx.reinterpret("float32", vb + tirx.shift_left(e, 23)),
        )

    @T.prim_func(s_tir=True)
    def attn(
        qc: T.Buffer((B, H, S, W), "uint64"),
        kc: T.Buffer((B, H, S, W), "uint64"),
        v: T.Buffer((B, S, H, D), "float32"),
        keymask: T.Buffer((B, S), "float32"),
        table: T.Buffer((H, NB + 1), tdtype),
        out: T.Buffer((B, S, H, D), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            for task in T.parallel(B * H):
                hv = T.sblock_alloc_buffer((S,), "int32")
                emax = T.sblock_alloc_buffer((1,), "int32")
                num = T.sblock_alloc_buffer((D,), "float32")
                den = T.sblock_alloc_buffer((1,), "float32")
                for i in range(S):
                    emax[0] = T.int32(-(2**30))
                    for j in range(S):
                        hv[j] = ham(qc, kc, task // H, task % H, i, j)
                        if pow2:
                            if keymask[task // H, j] > limit:
                                emax[0] = T.max(emax[0], table[task % H, hv[j]])
                    for dd in T.vectorized(D):
                        num[dd] = T.float32(0)
                    den[0] = T.float32(0)
                    for j in range(S):
                        if keymask[task // H, j] > limit:
                            if pow2:
                                den[0] = den[0] + exp2_bits(table[task % H, hv[j]] - emax[0])
                                for dd in T.vectorized(D):
                                    num[dd] = num[dd] + scaled(
                                        v[task // H, j, task % H, dd],
                                        table[task % H, hv[j]] - emax[0],
                                    )
                            else:
                                den[0] = den[0] + table[task % H, hv[j]]
                                for dd in T.vectorized(D):
                                    num[dd] = (
                                        num[dd]
                                        + table[task % H, hv[j]] * v[task // H, j, task % H, dd]
                                    )
                    for dd in T.vectorized(D):
                        out[task // H, i, task % H, dd] = num[dd] / den[0]

    return attn.with_attr("global_symbol", cfg.name)
