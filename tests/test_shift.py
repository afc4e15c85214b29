"""Shift GEMM (power-of-two weights): format, fit, kernel against the numpy reference, Relax pass."""

import numpy as np
import pytest
import torch
import tvm
from shiftadd_tvm.passes.shift_rewrite import rewrite_shift
from shiftadd_tvm.schedules import shift_gemm as sg
from shiftadd_tvm.schedules.packing import EXP_MIN

TARGET = {"kind": "llvm", "num-cores": 2}
REL_TOL = 2e-6  # float32 accumulation against the float64 reference, relative to max |ref|


def run_kernel(cfg, x, packed, knobs=None, target=TARGET):
    ex = tvm.compile(
        tvm.IRModule({cfg.name: sg.make_primfunc(cfg, knobs)}), target=tvm.target.Target(target)
    )
    y = tvm.runtime.tensor(np.zeros((cfg.m, cfg.n), np.float32))
    rt = ex.jit()
    rt[cfg.name](
        tvm.runtime.tensor(np.ascontiguousarray(x, np.float32)),
        tvm.runtime.tensor(packed.codes),
        tvm.runtime.tensor(packed.base),
        y,
    )
    return y.numpy(), rt


def test_pack_round_trip():
    rng = np.random.default_rng(0)
    n, k, gs = 5, 19, 8
    mags = rng.integers(0, 8, (n, k))
    neg = rng.random((n, k)) < 0.5
    be = rng.integers(-10, 5, (n, 3))
    be[1, 2] = EXP_MIN - 1  # an all-zero group
    codes, base = sg.pack(neg, mags, be, gs)
    assert codes.shape == (n, 12) and base.shape == (n, 3)
    neg2, mags2 = sg.unpack(codes, k)
    assert np.array_equal(mags2, mags)
    assert np.array_equal(neg2 & (mags > 0), neg & (mags > 0))
    w = sg.dequantize(codes, base, k, gs)
    expect = np.where(mags == 0, 0.0, np.exp2(mags - 7 + np.repeat(be, gs, 1)[:, :k]))
    expect[1, 16:] = 0.0
    assert np.array_equal(w, np.where(neg, -expect, expect))


def test_fit_values_are_signed_powers_of_two_and_beat_log_rounding():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 200)) * 0.05
    lin = sg.fit_shift(w, 64, "linear").dequantize()
    log = sg.fit_shift(w, 64, "log").dequantize()
    nz = lin[lin != 0]
    assert np.allclose(np.exp2(np.round(np.log2(np.abs(nz)))), np.abs(nz))
    assert np.array_equal(np.sign(lin[lin != 0]), np.sign(w[lin != 0]))
    e_lin, e_log = np.linalg.norm(lin - w), np.linalg.norm(log - w)
    assert e_lin < e_log  # nearest value minimises the squared error
    assert e_lin / np.linalg.norm(w) < 0.25  # one power of two per weight: ~20% for Gaussians


def test_gptq_fit_lowers_output_error():
    rng = np.random.default_rng(2)
    k, n = 96, 48
    x = rng.standard_normal((512, k)) * np.exp(rng.standard_normal(k))  # uneven channels
    x[:, 1] = x[:, 0] + 0.1 * rng.standard_normal(512)  # correlated inputs: feedback helps
    h = x.T @ x / len(x)
    w = rng.standard_normal((n, k)) * 0.05
    plain = sg.fit_shift(w, 32, col_weight=np.diag(h)).dequantize()
    fed = sg.fit_shift_gptq(w, h, 32).dequantize()

    def out_err(q):
        return np.linalg.norm(x @ (q - w).T)

    assert out_err(fed) < 0.95 * out_err(plain)  # measured 0.92


@pytest.mark.parametrize(
    "m,n,k,gs",
    [(1, 5, 13, 8), (3, 17, 40, 16), (16, 33, 128, 128), (6, 9, 200, 64), (32, 24, 72, 32)],
)
def test_kernel_matches_reference(m, n, k, gs):
    rng = np.random.default_rng(m * 1000 + n + k)
    w = rng.standard_normal((n, k)) * np.exp(rng.uniform(-3, 3, (n, 1)))
    w[0, : k // 2] = 0.0  # an all-zero group in row 0
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[0, 0] = 0.0
    x[-1, -1] = 1e-39  # denormal: flushed
    packed = sg.fit_shift(w, gs)
    y, _ = run_kernel(sg.ShiftGemmConfig(m, n, k, gs), x, packed)
    ref = sg.reference(x, packed)
    assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max()


def test_kernel_knobs_and_no_weight_multiply():
    rng = np.random.default_rng(3)
    m, n, k, gs = 8, 21, 48, 16
    w = rng.standard_normal((n, k))
    x = rng.standard_normal((m, k)).astype(np.float32)
    packed = sg.fit_shift(w, gs)
    cfg = sg.ShiftGemmConfig(m, n, k, gs)
    ref = sg.reference(x, packed)
    for kn in (sg.ShiftGemmKnobs(1, 3, 4), sg.ShiftGemmKnobs(8, 8, 1), sg.ShiftGemmKnobs(4, 5, 2)):
        y, rt = run_kernel(cfg, x, packed, kn)
        assert np.abs(y - ref).max() <= REL_TOL * np.abs(ref).max(), kn
    ll = rt.inspect_source("ll")
    assert "fmul" not in ll  # integer multiplies remain only in address arithmetic
    with pytest.raises(ValueError, match="does not divide"):
        sg.make_primfunc(cfg, sg.ShiftGemmKnobs(3, 4, 1))


def test_pass_rewrites_chosen_linears():
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(40, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8, bias=False)
    ).eval()
    x = torch.randn(2, 3, 40)
    ep = torch.export.export(mlp, (x,))
    mod = from_exported_program(ep)
    packs = {}

    def choose(key, w):
        if w.shape != (24, 40):  # only the first layer
            return None
        packs[key] = sg.fit_shift(w, 16)
        return packs[key]

    mod2, rec = rewrite_shift(mod, choose)
    assert len(rec.rewritten) == 1 and len(rec.skipped) == 1
    ex = tvm.compile(mod2, target=tvm.target.Target(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy()))[0].numpy()
    wq = torch.from_numpy(next(iter(packs.values())).dequantize()).float()
    with torch.no_grad():
        ref = mlp[2](torch.relu(torch.nn.functional.linear(x, wq, mlp[0].bias)))
    assert np.abs(got - ref.numpy()).max() < 1e-4 * max(1.0, float(ref.abs().max()))
