"""Attention of the new tokens of a step over the KV cache and over each other (the step
functions of ``shiftadd_tvm/decode.py``, CPU), as one TensorIR kernel, with its numpy reference.

The step functions pass the whole static cache (``max_context`` slots) to the module, of which
only the first ``pos`` are filled. Expressed as Relax operators, a step's attention computed
scores, softmax and the weighted sum of values over all slots and masked the empty ones: its cost
grew with ``max_context``, not with the tokens cached, and the default CPU legalization ran it as
unvectorized loops with one libm ``expf`` per score (SmolLM2, 512 slots: 5.4 ms of a 21 ms decode
step, one thread; at 128 tokens, about 30% of a prefill chunk). This kernel reads ``pos`` at run
time and only touches the filled slots.

Per KV head ``h`` and query row ``r`` (row ``r`` of a KV head's group block is token ``t = r % T``,
the order ``decode.KVStep`` folds grouped query heads in), one parallel work item:

* scores over the cache, up to 64 slots (four vectors: independent FMA chains) per chunk:
  ``sum_d q[d] * k[h, d, s]`` (``K`` is cached transposed, ``[kv_heads, head_dim, S]``, so a vector
  of slots is one contiguous load per ``d``); slots ``>= pos`` in the last chunk are masked (the
  chunk divides ``S``, so it never reads past the cache);
* scores over the new tokens ``j <= t`` (causal), the same way: a prologue copies the new keys
  transposed (``[kv_heads, head_dim, T]``, zero-padded to whole vectors);
* one softmax over both (max, ``exp`` as ``fast_exp``: vectorized, no libm call, sum),
  then ``sum_s p[s] * v[h, s, :]`` over the filled slots and the visible new tokens (even and odd
  slots in two accumulators), divided by the sum.

``q`` arrives unscaled; ``scale`` (``1 / sqrt(head_dim)`` for LLaMA) multiplies the scores.
"""

from __future__ import annotations

import dataclasses

import numpy as np

LANES = 16  # float32 slots per vector; the cache length must be a multiple of it
# fast_exp returns exactly 0 below EXP_FLOOR: e^-80 ~ 1.8e-35, so a value it returns, divided by
# a softmax sum of up to ~1000 terms, is still a normal float32 (>= 1.2e-38). Denormal results
# (and 2^-126-sized ones for masked scores) made the products that read them ~50x slower: the
# attention matmul of `main` read a softmax with e^-87 in every masked slot and took 300 ms
# instead of 6 ms per layer on the Xeon.
EXP_FLOOR = -80.0
EXP_CEIL = 88.0  # fast_exp saturates here (e^88 ~ 1.65e38; float32 ends at 3.4e38)
# e^r for |r| <= ln(2) / 2: Taylor coefficients 1 / i!, degree 6 (relative error < 2e-7)
EXP_COEFFS = tuple(1.0 / float(np.prod(np.arange(1, i + 1))) for i in range(7))
LN2_HI, LN2_LO = 0.693145751953125, 1.4286068203094172e-06  # ln 2 = HI + LO, HI in 11 bits


def fast_exp(z, T):
    """``e^z`` of a float32 expression as a vectorizable expression (no libm call): ``n =
    round(z / ln 2)``, ``r = z - n ln 2`` in two steps (``n * LN2_HI`` is exact, so ``r`` keeps
    float32 precision at any ``n``), a polynomial of ``r`` times ``2^n`` built in the exponent
    bits. Exactly 0 below EXP_FLOOR (never a denormal), saturated at ``e^EXP_CEIL`` above it.
    ``z`` appears several times (no let binding, which ``T.vectorized`` loops do not keep): pass a
    load or a cheap expression."""
    zc = T.max(T.min(z, T.float32(EXP_CEIL)), T.float32(EXP_FLOOR))
    n = T.round(zc * T.float32(1.0 / np.log(2.0)))
    r = zc - n * T.float32(LN2_HI) - n * T.float32(LN2_LO)
    p = T.float32(EXP_COEFFS[-1])
    for c in reversed(EXP_COEFFS[:-1]):
        p = p * r + T.float32(c)
    e = p * T.reinterpret("float32", T.shift_left(T.Cast("int32", n) + 127, 23))
    return T.Select(z < T.float32(EXP_FLOOR), T.float32(0), e)


@dataclasses.dataclass(frozen=True)
class CacheAttentionConfig:
    kv_heads: int
    groups: int  # query heads per KV head
    tokens: int  # T: new tokens of the step
    head_dim: int
    max_context: int  # S: cache slots (a multiple of LANES)
    scale: float

    def __post_init__(self):
        if self.max_context % LANES:
            raise ValueError(f"max_context={self.max_context} must be a multiple of {LANES}")
        if min(self.kv_heads, self.groups, self.tokens, self.head_dim, self.max_context) < 1:
            raise ValueError(f"every size must be >= 1: {self}")

    @property
    def rows(self) -> int:
        return self.groups * self.tokens

    @property
    def name(self) -> str:
        return (
            f"cache_attention_h{self.kv_heads}_g{self.groups}_t{self.tokens}"
            f"_d{self.head_dim}_s{self.max_context}"
        )


def reference(q, k_cache, v_cache, k_new, v_new, pos: int, scale: float) -> np.ndarray:
    """float64 attention: ``q [KVH, G*T, D]`` over cache slots ``< pos`` of ``k_cache
    [KVH, D, S]`` / ``v_cache [KVH, S, D]`` and causally over ``k_new``/``v_new [KVH, T, D]``."""
    q, kc, vc = (np.asarray(a, np.float64) for a in (q, k_cache, v_cache))
    kn, vn = np.asarray(k_new, np.float64), np.asarray(v_new, np.float64)
    t = kn.shape[1]
    rows = q.shape[1]
    keys = np.concatenate([kc[:, :, :pos].transpose(0, 2, 1), kn], axis=1)  # [KVH, pos + T, D]
    vals = np.concatenate([vc[:, :pos], vn], axis=1)
    s = np.einsum("hrd,hsd->hrs", q, keys) * scale
    tok = np.arange(rows) % t
    visible = np.concatenate(
        [np.ones((rows, pos), bool), np.arange(t)[None, :] <= tok[:, None]], axis=1
    )
    s = np.where(visible[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hrs,hsd->hrd", p, vals)


def make_primfunc(cfg: CacheAttentionConfig, name: str = ""):
    """TensorIR PrimFunc ``(q f32[KVH, R, D], k_cache f32[KVH, D, S], v_cache f32[KVH, S, D],
    k_new f32[KVH, T, D], v_new f32[KVH, T, D], pos int64[1]) -> out f32[KVH, R, D]``."""
    from tvm.script import tirx as T

    H, R, TT, D, S, V = cfg.kv_heads, cfg.rows, cfg.tokens, cfg.head_dim, cfg.max_context, LANES
    SC = float(cfg.scale)
    CH = next(w for w in (4 * V, 2 * V, V) if S % w == 0)  # slots per chunk of the score loops
    TP = -(-TT // V) * V  # new tokens padded to whole vectors
    CHN = next(w for w in (4 * V, 2 * V, V) if TP % w == 0)  # new tokens per score chunk
    NEG = -3.0e38  # below every finite score; exp(NEG - max) is 0

    @T.macro
    def scores(sbuf, rbuf, qs, keys, h, W, nvalid):
        """sbuf[s] = <qs, keys[h, :, s]> for s < nvalid, W slots (W / 16 vectors: independent FMA
        chains) per chunk; the chunk's slots >= nvalid get NEG (W divides the keys' length)."""
        for c in range((nvalid + (W - 1)) // W):
            for v in T.vectorized(W):
                rbuf[v] = T.float32(0)
            for d in range(D):
                for v in T.vectorized(W):
                    rbuf[v] = rbuf[v] + qs[d] * keys[h, d, c * W + v]
            for v in T.vectorized(W):
                sbuf[c * W + v] = T.Select(c * W + v < nvalid, rbuf[v], T.float32(NEG))

    @T.macro
    def fold_max(sbuf, rbuf, stat, W, nvalid):
        """stat[0] = max(stat[0], the scores of the chunks that hold slots < nvalid)."""
        for v in T.vectorized(W):
            rbuf[v] = T.float32(NEG)
        for c in range((nvalid + (W - 1)) // W):
            for v in T.vectorized(W):
                rbuf[v] = T.max(rbuf[v], sbuf[c * W + v])
        for v in range(W):
            stat[0] = T.max(stat[0], rbuf[v])

    @T.macro
    def exp_sum(sbuf, rbuf, stat, W, nvalid):
        """sbuf[s] = exp(sbuf[s] - stat[0]) (0 below EXP_FLOOR: the masked slots among them);
        stat[1] += the sum."""
        for v in T.vectorized(W):
            rbuf[v] = T.float32(0)
        for c in range((nvalid + (W - 1)) // W):
            for v in T.vectorized(W):
                sbuf[c * W + v] = sbuf[c * W + v] - stat[0]
            for v in T.vectorized(W):
                sbuf[c * W + v] = fast_exp(sbuf[c * W + v], T)
            for v in T.vectorized(W):
                rbuf[v] = rbuf[v] + sbuf[c * W + v]
        for v in range(W):
            stat[1] = stat[1] + rbuf[v]

    @T.macro
    def weigh_values(acc, pbuf, vals, h, nvalid):
        """acc[e, :] += pbuf[s] * vals[h, s, :] for s < nvalid, even and odd s into e = 0, 1."""
        for s2 in range(nvalid // 2):
            for e in T.unroll(2):
                for d in T.vectorized(D):
                    acc[e, d] = acc[e, d] + pbuf[2 * s2 + e] * vals[h, 2 * s2 + e, d]
        for _odd in range(nvalid % 2):  # the odd last slot
            for d in T.vectorized(D):
                acc[0, d] = acc[0, d] + pbuf[nvalid - 1] * vals[h, nvalid - 1, d]

    @T.prim_func(s_tir=True)
    def cache_attention(
        q: T.Buffer((H, R, D), "float32"),
        kc: T.Buffer((H, D, S), "float32"),
        vc: T.Buffer((H, S, D), "float32"),
        kn: T.Buffer((H, TT, D), "float32"),
        vn: T.Buffer((H, TT, D), "float32"),
        pos: T.Buffer((1,), "int64"),
        out: T.Buffer((H, R, D), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        with T.sblock("root"):
            T.reads()
            T.writes()
            # the new keys transposed like the cache ([KVH, D, T], zero-padded to TP tokens)
            knt = T.sblock_alloc_buffer((H, D, TP), "float32")
            for h in T.parallel(H):
                for d in range(D):
                    for j in T.vectorized(TP):
                        knt[h, d, j] = T.if_then_else(j < TT, kn[h, T.min(j, TT - 1), d], 0.0)
            for item in T.parallel(H * R):
                sc = T.sblock_alloc_buffer((S,), "float32", scope="local")  # scores, then probs
                sn = T.sblock_alloc_buffer((TP,), "float32", scope="local")  # same, new tokens
                qs = T.sblock_alloc_buffer((D,), "float32", scope="local")
                red = T.sblock_alloc_buffer((CH,), "float32", scope="local")
                redn = T.sblock_alloc_buffer((CHN,), "float32", scope="local")
                acc = T.sblock_alloc_buffer((2, D), "float32", scope="local")  # even, odd slots
                stat = T.sblock_alloc_buffer((2,), "float32", scope="local")  # max, sum
                for d in T.vectorized(D):
                    qs[d] = q[item // R, item % R, d] * T.float32(SC)
                # the filled cache slots (< pos) and the new tokens this row's token sees (<= it)
                scores(sc, red, qs, kc, item // R, CH, T.Cast("int32", pos[0]))
                scores(sn, redn, qs, knt, item // R, CHN, (item % R) % TT + 1)
                stat[0] = sn[0]  # a real score: new token 0 is visible to every row
                fold_max(sc, red, stat, CH, T.Cast("int32", pos[0]))
                fold_max(sn, redn, stat, CHN, (item % R) % TT + 1)
                stat[1] = T.float32(0)
                exp_sum(sc, red, stat, CH, T.Cast("int32", pos[0]))
                exp_sum(sn, redn, stat, CHN, (item % R) % TT + 1)
                for e in T.unroll(2):
                    for d in T.vectorized(D):
                        acc[e, d] = T.float32(0)
                weigh_values(acc, sc, vc, item // R, T.Cast("int32", pos[0]))
                weigh_values(acc, sn, vn, item // R, (item % R) % TT + 1)
                for d in T.vectorized(D):
                    out[item // R, item % R, d] = (acc[0, d] + acc[1, d]) / stat[1]

    return cache_attention.with_attr("global_symbol", name or cfg.name)
