"""Baseline quantizers of the accuracy report (RTN, uniform GPTQ, plain BCQ)."""

import pytest
import torch

from shiftadd_tvm.baselines import gptq_uniform, quantize_baseline, rtn
from shiftadd_tvm.gptq import _output_error


def _problem(n=16, k=96, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g, dtype=torch.float64) * 0.3 + torch.eye(
        k, dtype=torch.float64
    )
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64) @ mix
    x[:, 5] *= 15  # an outlier channel
    w = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.05
    return w, x.T @ x / tokens


def test_rtn_exact_on_grid_and_bounded():
    g = torch.Generator().manual_seed(1)
    # every group holds its grid's ends (0 and 15 steps), so min/max recover the grid exactly
    levels = torch.randint(0, 16, (8, 64), generator=g).double()
    levels[:, ::32] = 0
    levels[:, 1::32] = 15
    w = (levels - 6) * 0.01
    assert torch.allclose(rtn(w, 4, 32), w, atol=1e-12)
    w = torch.randn(8, 70, generator=g, dtype=torch.float64)  # ragged last group
    q = rtn(w, 3, 32)
    for g0 in range(0, 70, 32):
        blk = w[:, g0 : g0 + 32]
        step = (blk.max(1).values.clamp(min=0) - blk.min(1).values.clamp(max=0)) / 7
        assert ((q[:, g0 : g0 + 32] - blk).abs() <= step[:, None] / 2 + 1e-12).all()
    assert len(torch.unique(q[0, :32])) <= 8


@pytest.mark.parametrize("method", ["rtn", "gptq", "gptq_noact", "bcq_plain"])
def test_error_falls_with_bits(method):
    w, h = _problem()
    errs = [
        float(_output_error(w, quantize_baseline(method, w, h, b, 32)[0], h).sum())
        for b in (2, 3, 4)
    ]
    assert errs[0] > errs[1] > errs[2], errs


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_uniform_beats_rtn_on_output_error(act_order):
    w, h = _problem()
    e_rtn = _output_error(w, rtn(w, 3, 32), h).sum()
    e_gptq = _output_error(w, gptq_uniform(w, h, 3, 32, act_order=act_order), h).sum()
    assert e_gptq < 0.8 * e_rtn, (float(e_gptq), float(e_rtn))


def test_static_groups_keep_grids_of_original_weights():
    """With act-order each group's grid comes from the original weights: every value of the
    result is a point of that grid."""
    w, h = _problem(n=4, k=64)
    q = gptq_uniform(w, h, 2, 32, act_order=True)
    for g0 in (0, 32):
        blk = w[:, g0 : g0 + 32]
        lo, hi = blk.min(1).values.clamp(max=0), blk.max(1).values.clamp(min=0)
        scale = (hi - lo) / 3
        zero = torch.round(-lo / scale)
        grid = scale[:, None] * (torch.arange(4).double()[None] - zero[:, None])  # [N, 4]
        dist = (q[:, g0 : g0 + 32, None] - grid[:, None, :]).abs().min(-1).values
        assert (dist < 1e-12).all()


def test_bits_per_weight():
    w, h = _problem(n=4, k=64)
    assert quantize_baseline("rtn", w, h, 3, 128)[1] == 3.25
    assert quantize_baseline("bcq_plain", w, h, 3, 128)[1] == 3.5625
    with pytest.raises(ValueError, match="unknown baseline"):
        quantize_baseline("nope", w, h, 3)
