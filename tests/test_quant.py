import numpy as np
import pytest
import torch
from shiftadd_tvm.schedules.packing import dequantize

from shiftadd_tvm.errors import ConfigError, WeightError
from shiftadd_tvm.quant import QuantConfig, bcq_quantize, pow2_value, round_pow2_terms


def test_pow2_rounding_exact_on_representable():
    vals = torch.tensor([0.5, -0.25, 0.75, 2.0**-20 + 2.0**-22, -(1 + 2.0**-3 + 2.0**-9), 0.0])
    s, e = round_pow2_terms(vals, 3)
    assert torch.equal(pow2_value(s, e), vals.double())


def test_pow2_rounding_error_falls_with_terms():
    a = torch.rand(10000, dtype=torch.float64) * 0.1 + 1e-4
    errs = [
        float(((pow2_value(*round_pow2_terms(a, t)) - a).abs() / a).max()) for t in (1, 2, 3, 4)
    ]
    assert errs[0] <= 1 / 3 + 1e-12  # nearest power of two: within a third
    assert all(errs[i + 1] < errs[i] for i in range(3))
    assert errs[2] < 0.05


def _representable(bits, n, k, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.rand(bits, n, k, generator=g) < 0.5
    exps = torch.randint(-9, -4, (bits, n, k // gs), generator=g).double()
    # distinct, decreasing magnitudes per plane so the code of each weight is unambiguous
    alpha = torch.exp2(exps - 3 * torch.arange(bits).double()[:, None, None])
    w = ((codes.double() * 2 - 1) * torch.repeat_interleave(alpha, gs, -1)).sum(0)
    return w


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_bcq_exact_on_representable_weights(bits):
    w = _representable(bits, 16, 64, 32)
    r = bcq_quantize(w, QuantConfig(bits=bits, group_size=32, terms=1, iters=20))
    assert torch.allclose(r.dequantize(), w, rtol=0, atol=1e-12)


def test_bcq_error_falls_with_bits_and_pack_matches():
    w = torch.randn(64, 200, dtype=torch.float64) * 0.02
    errs = []
    for bits in (1, 2, 3, 4):
        r = bcq_quantize(w, QuantConfig(bits=bits, group_size=64, terms=3, iters=10))
        errs.append(float(torch.norm(r.dequantize() - w) / torch.norm(w)))
        planes, scales = r.pack()
        np.testing.assert_array_equal(dequantize(planes, scales, 200, 64), r.dequantize().numpy())
    assert all(errs[i + 1] < errs[i] for i in range(3)), errs
    assert errs[2] < 0.25


def test_refinement_beats_greedy():
    w = torch.randn(32, 256, dtype=torch.float64)
    cfg0, cfg = (
        QuantConfig(bits=3, group_size=64, iters=0),
        QuantConfig(bits=3, group_size=64, iters=15),
    )
    e0 = torch.norm(bcq_quantize(w, cfg0).dequantize() - w)
    e1 = torch.norm(bcq_quantize(w, cfg).dequantize() - w)
    assert e1 < e0


def test_column_weights_protect_heavy_columns():
    w = torch.randn(32, 128, dtype=torch.float64)
    d = torch.ones(128, dtype=torch.float64)
    d[:4] = 1000.0  # outlier input channels
    cfg = QuantConfig(bits=2, group_size=128, terms=3, iters=10)
    plain = bcq_quantize(w, cfg).dequantize()
    weighted = bcq_quantize(w, cfg, d).dequantize()

    def werr(q):
        return float((((q - w) ** 2) * d).sum())

    assert werr(weighted) < werr(plain)
    assert float(((weighted - w)[:, :4] ** 2).sum()) < float(((plain - w)[:, :4] ** 2).sum())


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"bits": 5}, "bits=5"),
        ({"group_size": 48}, "power of two"),
        ({"terms": 0}, "terms"),
        ({"group_size": 4}, "power of two"),
        ({"scale_window": 9}, "scale_window=9"),
        ({"scale_window": 2, "terms": 3}, "scale_window=2"),
    ],
)
def test_invalid_config(kw, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kw)


def test_nan_weight_rejected():
    w = torch.zeros(4, 16)
    w[1, 2] = float("nan")
    with pytest.raises(WeightError, match="NaN"):
        bcq_quantize(w, QuantConfig(bits=2, group_size=8))


def test_all_zero_group_and_tiny_layer():
    w = torch.zeros(3, 5, dtype=torch.float64)  # smaller than one group, all zero
    r = bcq_quantize(w, QuantConfig(bits=2, group_size=8))
    assert torch.all(r.dequantize() == 0)
    w[0, 0] = 0.5
    r = bcq_quantize(w, QuantConfig(bits=2, group_size=8, terms=3))
    assert r.dequantize().shape == (3, 5)
    assert float((r.dequantize() - w).abs().max()) <= 0.5


def test_parse_terms_and_per_plane_config():
    from shiftadd_tvm.quant import parse_terms

    assert (
        parse_terms(3) == (3, ()) and parse_terms("3") == (3, ()) and parse_terms("2,2") == (2, ())
    )
    assert parse_terms("4,3,3,2") == (4, (4, 3, 3, 2)) == parse_terms((4, 3, 3, 2))
    assert parse_terms("3,2,2") == (3, (3, 2))  # canonical: a repeated last count is implied
    for bad in ("", "a,b", "5", "3,0"):
        with pytest.raises(ConfigError, match="terms"):
            parse_terms(bad)
    cfg = QuantConfig(bits=4, terms=4, plane_terms=(4, 3, 3, 2))
    assert cfg.term_counts == (4, 3, 3, 2) and cfg.terms_label == "4,3,3,2"
    assert cfg.bits_per_weight() == 4 + 12 * 8 / 128  # storage counts the used terms
    # a narrower layer takes the leading counts, a wider one repeats the last
    assert QuantConfig(bits=2, terms=4, plane_terms=(4, 3, 3, 2)).term_counts == (4, 3)
    assert QuantConfig(bits=3, terms=4, plane_terms=(4, 2)).term_counts == (4, 2, 2)
    with pytest.raises(ConfigError, match="maximum"):
        QuantConfig(bits=2, terms=3, plane_terms=(4, 2))


def test_per_plane_terms_are_respected_and_help_at_equal_storage():
    """Each plane's scales use at most its count; giving the largest plane a 4th term and the
    smallest a 2nd (same 12 terms) fits Gaussian weights better than 3 terms everywhere."""
    from shiftadd_tvm.quant import round_scales

    a = torch.rand(3, 4, 5, dtype=torch.float64) + 0.1  # [planes, N, G]
    cfg = QuantConfig(bits=3, terms=3, plane_terms=(3, 2, 1))
    s, e = round_scales(a, cfg, 0)
    assert s.shape == (3, 4, 5, 3)
    assert [int((s[b] != 0).sum(-1).max()) for b in range(3)] == [3, 2, 1]
    s2, _ = round_scales(a.permute(1, 2, 0), cfg, -1)  # the plane axis last: same counts
    assert torch.equal(s2.permute(2, 0, 1, 3), s)
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = {}
    for plan in ((3, 3, 3, 3), (4, 3, 3, 2)):
        t, pt = max(plan), plan if len(set(plan)) > 1 else ()
        r = bcq_quantize(w, QuantConfig(bits=4, group_size=128, terms=t, plane_terms=pt))
        used = (r.term_signs != 0).sum(-1).amax(dim=(1, 2)).tolist()
        assert all(u <= c for u, c in zip(used, plan, strict=True))
        errs[plan] = float(((r.dequantize() - w) ** 2).sum())
    assert errs[(4, 3, 3, 2)] < errs[(3, 3, 3, 3)]


def test_auto_terms_follow_the_width():
    """terms='auto': each width gets defaults.TERMS_AUTO, also through dataclasses.replace (the
    per-width configs of a budget allocation)."""
    import dataclasses

    from shiftadd_tvm import defaults
    from shiftadd_tvm.quant import terms_kwargs

    cfg = QuantConfig(bits=3, **terms_kwargs("auto"))
    assert cfg.term_counts == (3, 2, 2) and cfg.terms == 3
    for b in (1, 2, 3, 4):
        c = dataclasses.replace(cfg, bits=b)
        want = defaults.TERMS_AUTO[b]
        assert c.term_counts == tuple(want[min(i, len(want) - 1)] for i in range(b))
        assert c.terms == max(c.term_counts)
    assert dataclasses.replace(cfg, bits=4).term_counts == (4, 3, 2, 2)
    assert terms_kwargs("3,2,2") == {"terms": 3, "plane_terms": (3, 2)}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_scale_window_gives_the_shared_exponent_form(bits):
    """scale_window=8: every (row, group) of the fit has packing.shared_exponent_form (integer
    plane weights below 256 times one power of two), each plane keeps its term count, and the
    error stays within 1% (2, 3 bits) or 3% (4 bits) of the free-exponent fit (Gaussian weights with a few outlier
    rows, as real layers have)."""
    from shiftadd_tvm.schedules.packing import decode_scales, shared_exponent_form

    g = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 256, generator=g)
    w[::17] *= 40  # rows two orders of magnitude apart
    w[3, :128] = 0  # an all-zero group
    errs = {}
    for window in (0, 8):
        cfg = QuantConfig(bits=bits, group_size=64, auto_terms=True, scale_window=window)
        r = bcq_quantize(w, cfg)
        planes, scales = r.pack()
        counts = (scales != 0).sum(-1).max(axis=(1, 2))
        assert all(int(c) <= t for c, t in zip(counts, cfg.term_counts, strict=True))
        errs[window] = float(((r.dequantize().float() - w) ** 2).sum())
        form = shared_exponent_form(scales)
        if window:
            assert form is not None
            e, c = form
            assert np.abs(c).max() <= 255
            assert np.array_equal(c * np.exp2(e)[None], decode_scales(scales))
    assert errs[8] <= errs[0] * {2: 1.01, 3: 1.01, 4: 1.03}[bits]  # 4 bits: +1.7% here


def test_scale_window_in_the_gptq_loop():
    """The GPTQ loop with refits and sweeps keeps the window (every rounding goes through
    quant.round_scales)."""
    from shiftadd_tvm.schedules.packing import shared_exponent_form

    from shiftadd_tvm.gptq import gptq_bcq

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 128, generator=g)
    w = torch.randn(48, 128, generator=g)
    cfg = QuantConfig(bits=3, group_size=32, auto_terms=True, scale_window=8)
    r = gptq_bcq(w, x.T @ x / 512, cfg, sweeps=1)
    assert shared_exponent_form(r.pack()[1]) is not None


def _bcq_every_row(w, cfg, cw):
    """The alternating fit run on every (row, group) in every round (what ``bcq_quantize``
    computed before it skipped the rows at a fixed point): codes and scales of the round with
    the lowest total error."""
    from shiftadd_tvm.quant import _nearest_codes, round_scales

    n, k = w.shape
    gs, bits = cfg.group_size, cfg.bits
    groups = k // gs
    wg = w.double().reshape(n * groups, gs)
    d = cw.double() / cw.double().mean() + 1e-6
    dg = d.reshape(1, groups, gs).expand(n, groups, gs).reshape(-1, gs)
    r, codes = wg.clone(), torch.empty(n * groups, gs, bits, dtype=torch.bool)
    alpha = torch.empty(n * groups, bits, dtype=torch.float64)
    for b in range(bits):
        s = r >= 0
        a = (dg * r.abs()).sum(-1, keepdim=True) / dg.sum(-1, keepdim=True)
        codes[:, :, b], alpha[:, b] = s, a[:, 0]
        r = r - a * (s.double() * 2 - 1)

    def error(codes, alpha):
        return (dg * (wg - ((codes.double() * 2 - 1) * alpha[:, None, :]).sum(-1)) ** 2).sum()

    ts, te = round_scales(alpha, cfg, -1)
    codes = _nearest_codes(wg, pow2_value(ts, te), bits)
    best = (error(codes, pow2_value(ts, te)), codes, ts, te)
    eye = torch.eye(bits, dtype=torch.float64)
    for _ in range(cfg.iters):
        S = codes.double() * 2 - 1
        A = S.transpose(1, 2) @ (S * dg[:, :, None])
        rhs = (S * (dg * wg)[:, :, None]).sum(1)
        ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        alpha = torch.linalg.solve(A + ridge[:, None, None] * eye, rhs[:, :, None])[:, :, 0]
        ts, te = round_scales(alpha, cfg, -1)
        codes = _nearest_codes(wg, pow2_value(ts, te), bits)
        err = error(codes, pow2_value(ts, te))
        if err < best[0]:
            best = (err, codes, ts, te)
    return best[1:]


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=2),
        dict(bits=3, plane_terms=(3, 2)),
        dict(bits=4, terms=4, plane_terms=(4, 3, 2)),
        dict(bits=3, scale_window=8),
    ],
)
def test_skipping_rows_at_a_fixed_point_changes_nothing(kw):
    """bcq_quantize skips (row, group)s whose codes stopped changing; codes and scales are
    bit-identical to running every row in every round (heavy-tailed weights and column weights,
    so rows converge at different rounds)."""
    g = torch.Generator().manual_seed(3)
    n, k, gs = 48, 256, 64
    w = torch.randn(n, k, generator=g, dtype=torch.float64) ** 3 * 0.02
    cw = torch.rand(k, generator=g, dtype=torch.float64) ** 4 * 10
    cfg = QuantConfig(group_size=gs, **kw)
    codes, ts, te = _bcq_every_row(w, cfg, cw)
    got = bcq_quantize(w, cfg, cw)
    bits, terms = cfg.bits, cfg.terms
    assert torch.equal(
        got.codes, codes.reshape(n, k // gs, gs, bits).permute(3, 0, 1, 2).reshape(bits, n, k)
    )
    want_ts = ts.reshape(n, k // gs, bits, terms).permute(2, 0, 1, 3)
    want_te = te.reshape(n, k // gs, bits, terms).permute(2, 0, 1, 3)
    assert torch.equal(got.term_signs, want_ts) and torch.equal(got.term_exps, want_te)
