"""The LUT GEMM kernel against its numpy reference, on random and ragged shapes."""

import numpy as np
import pytest
import tvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shiftadd_tvm.schedules.lut_gemm import (
    LutGemmConfig,
    LutGemmKnobs,
    _shift,
    make_primfunc,
    reference,
)
from shiftadd_tvm.schedules.packing import encode_terms, pack_planes

RTOL = 2e-5  # float32 table sums against float64 reference (relative L2)
ABS_BOUND = 1e-5  # |y - ref| / (|x| @ |W|^T): float32 accumulation error relative to the term sizes
TARGET = {"kind": "llvm", "num-cores": 2}


def run_kernel(cfg, x, planes, scales, knobs=None):
    ex = tvm.compile(
        tvm.IRModule({cfg.name: make_primfunc(cfg, knobs)}), target=tvm.target.Target(TARGET)
    )
    y = tvm.runtime.tensor(np.zeros((cfg.m, cfg.n), np.float32))
    ex.jit()[cfg.name](
        tvm.runtime.tensor(x), tvm.runtime.tensor(planes), tvm.runtime.tensor(scales), y
    )
    return y.numpy()


def random_case(cfg, seed, exp_lo=-12, exp_hi=3, scale=1.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((cfg.m, cfg.k)) * scale).astype(np.float32)
    codes = rng.random((cfg.bits, cfg.n, cfg.k)) < 0.5
    signs = rng.choice([-1, 0, 1], (cfg.bits, cfg.n, cfg.groups, cfg.terms))
    exps = rng.integers(exp_lo, exp_hi, (cfg.bits, cfg.n, cfg.groups, cfg.terms))
    return x, pack_planes(codes, cfg.group_size), encode_terms(signs, exps)


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def accumulation_err(y, x, planes, scales, cfg):
    """max |y - ref| relative to the sum of |terms| (a cancellation-safe float32 error measure):
    every table entry, lookup and power-of-two term enters the bound with its magnitude."""
    from shiftadd_tvm.schedules.packing import decode_terms, dequantize

    w = dequantize(planes, scales, cfg.k, cfg.group_size)
    ref = np.asarray(x, np.float64) @ w.T
    term_abs = np.abs(decode_terms(scales)).sum(-1).sum(0)  # [N, G]
    w_abs = np.repeat(term_abs, cfg.group_size, axis=-1)[:, : cfg.k]
    size = np.abs(np.asarray(x, np.float64)) @ w_abs.T
    err = np.abs(y - ref)
    assert np.all(err[size == 0] == 0)
    return float((err[size > 0] / size[size > 0]).max(initial=0.0))


@pytest.mark.parametrize(
    "m,n,k,bits,gs,terms",
    [
        (1, 1, 8, 1, 8, 1),  # smallest
        (1, 33, 576, 3, 128, 3),  # K not a multiple of the group (576 = 4.5 x 128), N odd
        (3, 100, 200, 2, 64, 2),  # ragged M (no vector width divides 3), ragged K
        (16, 64, 128, 4, 32, 1),  # vector path, exact multiples
        (20, 17, 72, 3, 32, 3),  # M = 4 x 5 (vector width 4), ragged N and K
        (512, 40, 96, 2, 16, 3),  # prefill-sized M
    ],
)
def test_kernel_matches_reference(m, n, k, bits, gs, terms):
    cfg = LutGemmConfig(m, n, k, bits, gs, terms)
    x, planes, scales = random_case(cfg, seed=m * 1000 + n)
    y = run_kernel(cfg, x, planes, scales)
    assert rel_err(y, reference(x, planes, scales, cfg)) < RTOL


@pytest.mark.parametrize(
    "knobs", [LutGemmKnobs(1, 1, 1), LutGemmKnobs(2, 3, 5), LutGemmKnobs(4, 8, 2)]
)
def test_kernel_knobs_do_not_change_results(knobs):
    cfg = LutGemmConfig(8, 37, 136, 3, 64, 3)
    x, planes, scales = random_case(cfg, seed=7)
    y = run_kernel(cfg, x, planes, scales, knobs)
    assert rel_err(y, reference(x, planes, scales, cfg)) < RTOL


_COMPILED: dict = {}


def compiled(cfg):
    """Compile each kernel configuration once per test session."""
    if cfg not in _COMPILED:
        mod = tvm.IRModule({cfg.name: make_primfunc(cfg)})
        _COMPILED[cfg] = tvm.compile(mod, target=tvm.target.Target(TARGET)).jit()
    return _COMPILED[cfg]


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 48),
    k=st.integers(1, 260),
    bits=st.integers(1, 4),
    gs=st.sampled_from([8, 16, 32, 64, 128]),
    terms=st.integers(1, 3),
    scale=st.sampled_from([1e-4, 1e-2, 1.0, 1e2, 1e4]),
    exp_lo=st.sampled_from([-60, -20, -8]),
    exp_span=st.sampled_from([1, 6, 40]),
    seed=st.integers(0, 2**16),
)
def test_kernel_random_shapes(m, n, k, bits, gs, terms, scale, exp_lo, exp_span, seed):
    """Property: for any shape, width, group, term count, activation magnitude and scale exponents
    (2^-60 ... 2^-20+40), the kernel equals the float64 reference of the packed weights."""
    cfg = LutGemmConfig(m, n, k, bits, gs, terms)
    x, planes, scales = random_case(cfg, seed, exp_lo=exp_lo, exp_hi=exp_lo + exp_span, scale=scale)
    y = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    compiled(cfg)[cfg.name](
        tvm.runtime.tensor(x), tvm.runtime.tensor(planes), tvm.runtime.tensor(scales), y
    )
    assert accumulation_err(y.numpy(), x, planes, scales, cfg) < ABS_BOUND


def test_shift_is_exact_exponent_arithmetic():
    """_shift(p, code) == p * sign * 2**e for normal results, 0 on underflow, inf on overflow."""
    from tvm import te

    size = 4096
    p = te.placeholder((size,), "float32", name="p")
    c = te.placeholder((size,), "int8", name="c")
    out = te.compute((size,), lambda i: _shift(p[i], c[i]), name="out")
    ex = tvm.compile(
        tvm.IRModule({"main": te.create_prim_func([p, c, out])}), target=tvm.target.Target(TARGET)
    )
    rng = np.random.default_rng(0)
    pv = (rng.standard_normal(size) * 10.0 ** rng.integers(-30, 30, size)).astype(np.float32)
    pv[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-40, 3e38, -3e38]
    cv = rng.integers(-127, 128, size).astype(np.int8)
    cv[5:8] = [1, 127, -127]  # denormal * tiny, huge * 2^62, -huge * -2^62
    o = tvm.runtime.tensor(np.zeros(size, np.float32))
    ex.jit()["main"](tvm.runtime.tensor(pv), tvm.runtime.tensor(cv), o)
    got = o.numpy()
    e = np.abs(cv.astype(np.int64)) - 65
    with np.errstate(over="ignore", invalid="ignore"):
        exact = np.where(cv == 0, 0.0, np.sign(cv) * pv.astype(np.float64) * np.exp2(e))
    tiny = np.finfo(np.float32).tiny
    normal_in = np.abs(pv) >= tiny
    finite = np.isfinite(exact) & normal_in & (np.abs(exact) >= tiny) & (np.abs(exact) < 3.4e38)
    np.testing.assert_array_equal(got[finite], exact[finite].astype(np.float32))
    under = (cv != 0) & np.isfinite(pv) & ((np.abs(exact) < tiny) | ~normal_in)
    assert np.all(got[under] == 0)
    over = (cv != 0) & np.isfinite(pv) & normal_in & (np.abs(exact) >= 3.5e38)
    assert (
        over.any()
        and np.all(np.isinf(got[over]))
        and np.all(np.sign(got[over]) == np.sign(exact[over]))
    )
    assert np.all(got[cv == 0] == 0)
    assert np.isnan(got[4]) or cv[4] == 0
