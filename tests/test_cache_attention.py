"""The decode attention kernel (``schedules/cache_attention.py``) against its numpy reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from shiftadd_tvm.schedules.cache_attention import (
    EXP_CEIL,
    EXP_FLOOR,
    LANES,
    CacheAttentionConfig,
    fast_exp,
    make_primfunc,
    reference,
)

from shiftadd_tvm.targets import resolve_target


def _target():
    return tvm.target.Target(json.loads(resolve_target("llvm").spec_json))


def _build(cfg: CacheAttentionConfig):
    return tvm.compile(tvm.IRModule({cfg.name: make_primfunc(cfg)}), target=_target())[cfg.name]


def _inputs(cfg: CacheAttentionConfig, seed: int, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    h, r, t, d, s = cfg.kv_heads, cfg.rows, cfg.tokens, cfg.head_dim, cfg.max_context
    q = (spread * rng.standard_normal((h, r, d))).astype(np.float32)
    kc = rng.standard_normal((h, d, s)).astype(np.float32)
    vc = rng.standard_normal((h, s, d)).astype(np.float32)
    kn = rng.standard_normal((h, t, d)).astype(np.float32)
    vn = rng.standard_normal((h, t, d)).astype(np.float32)
    return q, kc, vc, kn, vn


def _run(fn, cfg, q, kc, vc, kn, vn, pos: int) -> np.ndarray:
    out = tvm.runtime.tensor(np.full((cfg.kv_heads, cfg.rows, cfg.head_dim), 7.0, np.float32))
    args = [tvm.runtime.tensor(a) for a in (q, kc, vc, kn, vn, np.array([pos], np.int64))]
    fn(*args, out)
    return out.numpy()


@pytest.mark.parametrize(
    "h, g, t, d, s, positions",
    [
        (3, 3, 1, 64, 256, (0, 1, 63, 64, 65, 192, 255)),  # SmolLM2's decode step (chunks of 64)
        (2, 3, 8, 16, 48, (0, 5, 16, 17, 40)),  # a prefill chunk of 8 (chunks of 16)
        (1, 1, 3, 20, 96, (0, 31, 33, 93)),  # head_dim not a multiple of 16, chunks of 32
        (4, 2, 1, 8, 16, (0, 7, 15)),  # one vector of slots
        (1, 3, 128, 64, 256, (0, 128)),  # SmolLM2's prefill chunk (64 new tokens per chunk)
        (2, 2, 40, 24, 64, (0, 9, 24)),  # new tokens padded from 40 to 48 (chunks of 16)
    ],
)
def test_matches_reference_on_random_and_ragged_shapes(h, g, t, d, s, positions):
    """Every fill level, including an empty cache, one slot, chunk boundaries +-1 and a full cache.
    The slots at and past ``pos`` hold NaN: the kernel must neither use nor multiply them (a NaN
    times a zero probability would still be NaN)."""
    cfg = CacheAttentionConfig(h, g, t, d, s, scale=float(d) ** -0.5)
    fn = _build(cfg)
    for i, pos in enumerate(positions):
        q, kc, vc, kn, vn = _inputs(cfg, seed=i)
        kc[:, :, pos:] = np.nan
        vc[:, pos:] = np.nan
        got = _run(fn, cfg, q, kc, vc, kn, vn, pos)
        want = reference(q, np.nan_to_num(kc), np.nan_to_num(vc), kn, vn, pos, cfg.scale)
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err < 2e-6, (pos, err)


def test_peaked_softmax_underflows_to_zero_cleanly():
    """Scores spread over hundreds: most probabilities fall below ``exp(-87)`` (taken as exactly
    0) and the output is the value row of the largest score (and its few rivals)."""
    cfg = CacheAttentionConfig(2, 2, 1, 32, 128, scale=1.0)
    fn = _build(cfg)
    q, kc, vc, kn, vn = _inputs(cfg, seed=3, spread=40.0)
    got = _run(fn, cfg, q, kc, vc, kn, vn, 100)
    want = reference(q, kc, vc, kn, vn, 100, cfg.scale)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_matches_the_torch_op_the_step_functions_export():
    """The kernel computes what ``decode.cache_attention_op`` (the torch side of the import)
    computes, in the layout ``KVStep`` passes."""
    from shiftadd_tvm.decode import cache_attention_op

    cfg = CacheAttentionConfig(3, 3, 2, 16, 32, scale=0.25)
    fn = _build(cfg)
    q, kc, vc, kn, vn = _inputs(cfg, seed=4)
    pos = 21
    got = _run(fn, cfg, q, kc, vc, kn, vn, pos)
    tens = [torch.from_numpy(a) for a in (q, kc, vc, kn, vn)]
    want = cache_attention_op(*tens, torch.tensor([pos]), cfg.scale).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_fast_exp_accuracy():
    """``fast_exp`` over the range it serves, [EXP_FLOOR, EXP_CEIL]: relative error < 1e-6 (the
    two-step ``z - n ln 2`` keeps it flat at large ``|z|``); exactly 0 below EXP_FLOOR (masked
    scores of -3e38 included: never a denormal), saturated above EXP_CEIL."""
    from tvm.script import tirx as T

    n = 4096

    @T.prim_func(s_tir=True)
    def exp(x: T.Buffer((n,), "float32"), y: T.Buffer((n,), "float32")):
        for i in T.vectorized(n):
            y[i] = fast_exp(x[i], T)

    fn = tvm.compile(tvm.IRModule({"exp": exp.with_attr("global_symbol", "exp")}), _target())
    x = np.linspace(EXP_FLOOR, EXP_CEIL, n).astype(np.float32)
    x[:6] = [0.0, -1e-7, 0.3465, -0.3466, 1.0, -50.5]
    y = tvm.runtime.tensor(np.zeros(n, np.float32))
    fn["exp"](tvm.runtime.tensor(x), y)
    want = np.exp(x.astype(np.float64))
    rel = np.abs(y.numpy() - want) / want
    assert rel.max() < 1e-6, (rel.max(), x[rel.argmax()])
    low = np.concatenate([np.linspace(-3e38, EXP_FLOOR - 1e-3, n - 2), [-87.5, -1e30]])
    fn["exp"](tvm.runtime.tensor(low.astype(np.float32)), y)
    assert (y.numpy() == 0).all()
    fn["exp"](tvm.runtime.tensor(np.full(n, 200.0, np.float32)), y)
    assert np.isfinite(y.numpy()).all() and y.numpy().min() > 1e38


def test_config_rejects_a_cache_that_is_not_whole_vectors():
    with pytest.raises(ValueError, match=f"multiple of {LANES}"):
        CacheAttentionConfig(1, 1, 1, 16, 40, scale=1.0)
