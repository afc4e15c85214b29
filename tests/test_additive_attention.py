"""Hamming (additive) attention: kernels against the numpy reference, and the Relax rewrite on an
encoder against the torch simulation of the same arithmetic."""

import numpy as np
import pytest
import torch
import tvm
from shiftadd_tvm.schedules import hamming_attention as ha

TARGET = {"kind": "llvm", "num-cores": 2}
TOL = 2e-6  # float32 sums against the float64 reference, relative to max |v|


def run(b, s, h, d, bits, pv, seed, target=TARGET):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    v[0, 0, 0, :2] = 0.0  # zero values: the exponent add must keep them 0
    km = np.zeros((b, s), np.float32)
    km[0, s // 2 :] = -1e9  # padded keys
    plan = ha.AttentionPlan(ha.random_projection(h, d, bits, seed), rng.uniform(1, 30, h), pv)
    cc, ac = ha.CodesConfig(b, s, h, d, bits), ha.AttentionConfig(b, s, h, d, bits, pv)
    mod = tvm.IRModule(
        {cc.name: ha.make_codes_primfunc(cc), ac.name: ha.make_attention_primfunc(ac)}
    )
    rt = tvm.compile(mod, target=tvm.target.Target(target)).jit()
    T = tvm.runtime.tensor
    qc = T(np.zeros((b, h, s, cc.words), np.uint64))
    kc = T(np.zeros((b, h, s, cc.words), np.uint64))
    rt[cc.name](T(q), T(plan.proj), qc)
    rt[cc.name](T(k), T(plan.proj), kc)
    out = T(np.zeros((b, s, h, d), np.float32))
    rt[ac.name](qc, kc, T(v), T(km), T(plan.table()), out)
    rq, rk = ha.binary_codes(q, plan.proj), ha.binary_codes(k, plan.proj)
    return (
        qc.numpy(),
        kc.numpy(),
        rq,
        rk,
        out.numpy(),
        ha.reference(rq, rk, v, km, plan.table(), pv),
        rt,
    )


@pytest.mark.parametrize(
    "b,s,h,d,bits,pv",
    [
        (1, 5, 1, 8, 64, "pow2"),
        (2, 13, 3, 16, 128, "pow2"),
        (2, 9, 2, 12, 192, "float"),
        (1, 33, 4, 32, 64, "float"),
        (3, 17, 2, 32, 256, "pow2"),
    ],
)
def test_kernels_match_reference(b, s, h, d, bits, pv):
    qc, kc, rq, rk, out, ref, _ = run(b, s, h, d, bits, pv, seed=b * 100 + s)
    assert np.array_equal(qc, rq) and np.array_equal(kc, rk)
    assert np.abs(out - ref).max() <= TOL * 4
    assert np.isfinite(out).all()


def test_pow2_table_and_no_float_multiply_in_scores():
    plan = ha.AttentionPlan(np.ones((2, 4, 64), np.float32), np.array([3.0, 20.0]), "pow2")
    t = plan.table()
    assert t.dtype == np.int32 and t.shape == (2, 65)
    assert t[:, 0].tolist() == [0, 0] and np.all(np.diff(t, axis=1) <= 0)
    assert t[1, -1] == round(-40 / np.log(2))
    *_, rt = run(1, 8, 2, 16, 128, "pow2", seed=1)
    ll = rt.inspect_source("ll")
    body = ll[ll.find("hamming_attention") :]
    assert "fmul" not in body.split("define")[1]  # the attention kernel itself: adds only
    assert "ctpop" in ll


def test_hamming_reference_counts_bits():
    a = np.array([[[[0b1011, 0]]]], np.uint64)
    b = np.array([[[[0b0001, 1 << 63]]]], np.uint64)
    assert ha.hamming(a, b)[0, 0, 0, 0] == 3


def test_calibrated_projection_shapes_and_orthogonal_blocks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 200, 8))
    p = ha.calibrated_projection(x, 24)
    assert p.shape == (2, 8, 24)
    blk = p[0, :, :8].astype(np.float64)
    assert np.allclose(blk.T @ blk, np.eye(8), atol=1e-5)


def test_rewrite_on_encoder_matches_torch_simulation():
    from shiftadd_tvm.passes.additive_attention import decompose_attention, rewrite_attention
    from transformers import BertConfig, BertModel
    from tvm import relax

    from shiftadd_tvm import encoder, minilm
    from shiftadd_tvm.targets import resolve_target

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    model = BertModel(cfg).eval()
    b, s = 2, 12
    imp = encoder.import_encoder(model, b, s)
    ids = np.random.default_rng(0).integers(1, 100, (b, s))
    mask = np.ones((b, s), np.int64)
    mask[1, 7:] = 0
    wrapper = encoder.SentenceEncoder.wrap(model)
    plans = {
        i: ha.AttentionPlan(ha.random_projection(3, 16, 64, i), np.array([4.0, 8.0, 16.0]), pv)
        for i, pv in ((0, "pow2"), (1, "float"))
    }
    mod, rec = rewrite_attention(imp.mod, plans)
    assert len(rec.rewritten) == 2
    mod, n = decompose_attention(mod)
    assert n == 0
    mod = encoder.bind_weights(mod, imp.params)
    ex = encoder.build(mod, resolve_target({"kind": "llvm", "num-cores": 2}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(ids), tvm.runtime.tensor(mask))[0].numpy()

    def replace(site, q, k, v, km):
        return minilm._torch_hamming_attention(q, k, v, km, plans[site])

    encoder.ATTENTION_HOOKS["replace"] = replace
    try:
        with torch.no_grad():
            ref = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    finally:
        encoder.ATTENTION_HOOKS.pop("replace")
    assert np.abs(got - ref).max() < 1e-4
    with torch.no_grad():
        exact = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert np.abs(got - exact).max() > 1e-3  # the rewrite changed the attention
