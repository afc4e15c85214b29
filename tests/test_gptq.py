"""The GPTQ loop with BCQ inside, on small synthetic problems."""

import pytest
import torch

from shiftadd_tvm.gptq import _dequant, _output_error, _refit_alpha, gptq_bcq, gptq_loop
from shiftadd_tvm.quant import QuantConfig, bcq_quantize


def _problem(n=24, k=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) * 0.3 + torch.eye(
        k, dtype=torch.float64
    )
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    x[:, 3] *= 20  # an outlier channel
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05
    return w, x, x.T @ x / tokens


def test_refit_equals_direct_least_squares():
    w, x, h = _problem()
    gs = 16
    codes = torch.rand(2, *w.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    alpha = _refit_alpha(w, codes, h, gs)
    # direct: for each row, min_a || X (w - B a) ||^2 with B[k, (b, g)] = s_b[k] [k in g]
    s = codes.double() * 2 - 1
    groups = w.shape[1] // gs
    for r in (0, 5, 23):
        B = torch.zeros(w.shape[1], 2 * groups, dtype=torch.float64)
        for b in range(2):
            for gi in range(groups):
                B[gi * gs : (gi + 1) * gs, b * groups + gi] = s[b, r, gi * gs : (gi + 1) * gs]
        sol = torch.linalg.lstsq(x @ B, x @ w[r]).solution.reshape(2, groups)
        assert torch.allclose(alpha[:, r], sol, rtol=1e-6, atol=1e-9)


def test_gptq_lowers_output_error_against_weight_fit():
    w, x, h = _problem()
    cfg = QuantConfig(bits=2, group_size=16, terms=3, iters=10)
    plain = bcq_quantize(w, cfg, torch.diagonal(h)).dequantize()
    ours = gptq_bcq(w, h, cfg).dequantize()
    e_plain = _output_error(w, plain, h).sum()
    e_ours = _output_error(w, ours, h).sum()
    assert e_ours < 0.8 * e_plain, (float(e_ours), float(e_plain))


def test_gptq_exact_on_representable_weights():
    g = torch.Generator().manual_seed(3)
    codes = torch.rand(2, 8, 32, generator=g) < 0.5
    alpha = torch.tensor([0.25, 0.0625], dtype=torch.float64)[:, None, None].expand(2, 8, 2)
    w = _dequant(codes, alpha, 16)
    _, _, h = _problem(n=8, k=32)
    res = gptq_bcq(w, h, QuantConfig(bits=2, group_size=16, terms=1, iters=5))
    assert torch.allclose(res.dequantize(), w, atol=1e-12)


def test_gptq_deterministic_and_format():
    w, _, h = _problem(n=10, k=40)  # K not a multiple of the group: ragged last group
    cfg = QuantConfig(bits=3, group_size=16, terms=3)
    a, b = gptq_bcq(w, h, cfg), gptq_bcq(w, h, cfg)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.term_exps, b.term_exps)
    planes, scales = a.pack()
    assert planes.shape == (3, 10, 6) and scales.shape == (3, 10, 3, 3)


def _lstsq_compensation(x, w, done, qvals):
    """Direct least squares: with columns ``done`` fixed at ``qvals``, the values of the other
    columns that minimize ||X w - X w'||^2."""
    k = w.shape[1]
    rest = [j for j in range(k) if j not in done]
    e_done = w[:, done] - qvals  # [N, |done|]
    # min over e_rest of || X_rest e_rest^T + X_done e_done^T ||
    sol = torch.linalg.lstsq(x[:, rest], -(x[:, done] @ e_done.T)).solution  # [|rest|, N]
    out = w.clone()
    out[:, rest] = w[:, rest] - sol.T
    return out


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("block", [3, 128])
def test_gptq_loop_matches_direct_least_squares(act_order, block):
    """Every column the loop quantizes has exactly the value that the least-squares compensation
    of the columns already quantized gives it (the OBS update GPTQ is built on)."""
    w, x, h = _problem(n=3, k=10, tokens=64, seed=7)
    seen = []

    def pick(j, col):
        q = torch.round(col / 0.05) * 0.05  # a coarse grid: large errors to compensate
        seen.append((j, col.clone(), q.clone()))
        return q

    qw = gptq_loop(w, h, pick, act_order=act_order, damp=0.0, block=block)
    order = [j for j, _, _ in seen]
    assert sorted(order) == list(range(10))
    if act_order:
        assert order == torch.argsort(torch.diagonal(h), descending=True).tolist()
    for t, (j, col, q) in enumerate(seen):
        done = order[:t]
        qvals = torch.stack([s[2] for s in seen[:t]], 1) if t else torch.zeros(3, 0).double()
        expected = _lstsq_compensation(x, w, done, qvals)[:, j]
        assert torch.allclose(col, expected, rtol=1e-8, atol=1e-10), (t, j)
        assert torch.equal(qw[:, j], q)


def test_gptq_loop_identity_quantizer_is_lossless():
    w, _, h = _problem(n=5, k=20)
    q = gptq_loop(w, h, lambda j, col: col.clone(), act_order=True)
    assert torch.allclose(q, w, atol=1e-12)


def test_cd_sweep_is_exact_coordinate_minimum():
    """After one pass no single code change lowers the output error (checked by brute force on
    the last-visited columns) and the pass never raises the error; the blocked bookkeeping of
    ``R = (w - q) H`` agrees with a direct recomputation."""
    import itertools

    from shiftadd_tvm.gptq import _cd_sweep, _group_values
    from shiftadd_tvm.quant import pow2_value

    w, _, h = _problem(n=12, k=40)
    gs, bits = 16, 2
    init = bcq_quantize(w, QuantConfig(bits=bits, group_size=gs), torch.diagonal(h))
    combos = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=torch.float64)
    values = _group_values(pow2_value(init.term_signs, init.term_exps), combos)  # [G, N, C]
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 2**bits, w.shape, generator=g)

    def dequant(i):
        return torch.stack(
            [values[j // gs][torch.arange(w.shape[0]), i[:, j]] for j in range(40)], 1
        )

    before = _output_error(w, dequant(idx), h).sum()
    _cd_sweep(w, h, idx, values, gs, block=7)  # a block that does not divide K
    q = dequant(idx)
    after = _output_error(w, q, h).sum()
    assert after < before
    last = torch.argsort(torch.diagonal(h), descending=True)[-1].item()  # visited last: optimal
    for c in range(2**bits):
        trial = idx.clone()
        trial[:, last] = c
        assert (_output_error(w, dequant(trial), h) >= _output_error(w, q, h) - 1e-12).all()


def test_sweeps_lower_the_output_error_and_stay_deterministic():
    w, _, h = _problem(n=16, k=64)
    cfg = QuantConfig(bits=3, group_size=16, terms=3)
    plain = _output_error(w, gptq_bcq(w, h, cfg).dequantize(), h).sum()
    a = gptq_bcq(w, h, cfg, sweeps=2)
    swept = _output_error(w, a.dequantize(), h).sum()
    assert swept < plain
    b = gptq_bcq(w, h, cfg, sweeps=2)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.term_exps, b.term_exps)
    with pytest.raises(Exception, match="sweeps"):
        QuantConfig(sweeps=-1)


def test_per_plane_terms_in_the_gptq_loop():
    """The loop, its refits and sweeps keep each plane within its term count."""
    w, _, h = _problem(n=16, k=64)
    cfg = QuantConfig(bits=3, group_size=16, terms=4, plane_terms=(4, 2, 1))
    r = gptq_bcq(w, h, cfg, sweeps=1)
    used = (r.term_signs != 0).sum(-1).amax(dim=(1, 2)).tolist()
    assert used[0] <= 4 and used[1] <= 2 and used[2] <= 1 and r.term_signs.shape[-1] == 4
    assert torch.isfinite(_output_error(w, r.dequantize(), h)).all()


def test_parallel_fit_equals_serial_fit_and_keeps_order(monkeypatch):
    """quantize_candidates in forked workers (one torch thread each) returns, in the candidates'
    order, exactly the fits of one process with one thread; a bad layer's error reaches the
    caller; SHIFTADD_FIT_WORKERS is checked."""
    from shiftadd_tvm.compiler import fit_workers, quantize_candidates
    from shiftadd_tvm.errors import ConfigError, WeightError

    cands, stats = {}, {}
    for i, (n, k) in enumerate([(8, 64), (40, 48), (24, 64)]):
        w, _, h = _problem(n=n, k=k, seed=i)
        cands[f"l{i}"] = (f"layer{i}", w.float().numpy())
        stats[f"l{i}"] = h
    stats["l1"] = torch.diagonal(stats["l1"]).clone()  # a layer with diag(H) only: weighted BCQ
    cfg = QuantConfig(bits=3, group_size=16, terms=3, plane_terms=(3, 2), sweeps=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = quantize_candidates(cands, cfg, stats, progress=False, workers=1)
    finally:
        torch.set_num_threads(threads)
    forked = quantize_candidates(cands, cfg, stats, progress=False, workers=2)
    assert list(forked) == list(cands) == list(serial)
    for key in cands:
        assert torch.equal(forked[key].codes, serial[key].codes)
        assert torch.equal(forked[key].term_signs, serial[key].term_signs)
        assert torch.equal(forked[key].term_exps, serial[key].term_exps)
    bad = dict(cands)
    bad["l1"] = ("broken", cands["l1"][1] * float("nan"))
    with pytest.raises(WeightError, match="broken"):
        quantize_candidates(bad, cfg, stats, progress=False, workers=2)
    monkeypatch.setenv("SHIFTADD_FIT_WORKERS", "3")
    assert fit_workers() == 3
    monkeypatch.setenv("SHIFTADD_FIT_WORKERS", "zero")
    with pytest.raises(ConfigError, match="SHIFTADD_FIT_WORKERS"):
        fit_workers()
