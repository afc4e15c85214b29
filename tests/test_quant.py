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
