"""The online Hadamard kernel (``schedules/hadamard.py``) against its numpy reference: CPU runs
on random and ragged shapes, CUDA compile-only (numerics on a GPU: ``scripts/gpu_check.sh``)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from shiftadd_tvm.schedules.hadamard import (
    HADAMARD_ATTR,
    HadamardConfig,
    hadamard,
    make_primfunc,
    reference,
    retarget,
    split_order,
)

from shiftadd_tvm.cuda_build import cuda_sources


def _run_cpu(cfg: HadamardConfig, x: np.ndarray) -> np.ndarray:
    ex = tvm.compile(tvm.IRModule({cfg.name: make_primfunc(cfg)}), target="llvm")
    y = tvm.runtime.tensor(np.full_like(x, np.nan))
    ex[cfg.name](tvm.runtime.tensor(x), y)
    return y.numpy()


@pytest.mark.parametrize(
    "rows,width,block,transpose",
    [
        (1, 2, 2, False),  # one stage
        (3, 48, 24, False),  # Paley 12 x 2
        (5, 40, 20, True),  # Paley 20, no butterfly
        (7, 12, 12, True),
        (2, 64, 16, True),  # several blocks per row
        (3, 1536, 512, False),  # SmolLM2's down_proj input, blocks of 512
        (1, 1536, 1536, False),  # the full width: 12 x 128
        (2, 1536, 1536, True),
        (13, 96, 32, False),  # ragged row count
    ],
)
def test_cpu_kernel_matches_reference(rows, width, block, transpose):
    cfg = HadamardConfig(rows, width, block, transpose)
    x = np.random.default_rng(rows * width + block).standard_normal((rows, width)).astype("f4")
    got = _run_cpu(cfg, x)
    want = reference(x, block, transpose)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(block) * np.abs(x).max())


def test_reference_is_the_block_diagonal_matrix():
    x = np.random.default_rng(0).standard_normal((2, 72))
    h = hadamard(24).astype(np.float64)
    bd = np.kron(np.eye(3), h)
    np.testing.assert_allclose(reference(x, 24), x @ bd, atol=1e-12)
    np.testing.assert_allclose(reference(x, 24, transpose=True), x @ bd.T, atol=1e-12)
    np.testing.assert_allclose(reference(reference(x, 24), 24, True), 24 * x, atol=1e-10)


def test_kernel_has_no_float_multiply():
    """The transform is adds and subtracts: no ``fmul`` in the CPU kernel's LLVM IR, none in the
    CUDA kernel's source (its integer multiplies are index arithmetic)."""
    cfg = HadamardConfig(2, 1536, 1536, True)
    ex = tvm.compile(tvm.IRModule({cfg.name: make_primfunc(cfg)}), target="llvm")
    ll = ex.mod.inspect_source("ll")
    assert "fadd" in ll and "fsub" in ll
    assert "fmul" not in ll
    cu = retarget(tvm.IRModule({"k": make_primfunc(cfg, name="k")}), cuda=True)
    ex = tvm.compile(cu, target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    body = "".join(cuda_sources(ex.mod)).split("_kernel(", 2)[2]
    assert "float" in body and "__fmul" not in body and "fmaf" not in body
    assert " * ((float" not in body and "*(float" not in body


@pytest.mark.parametrize("block", [6, 36, 240, 1, 0])
def test_orders_without_a_transform_are_refused(block):
    with pytest.raises(ValueError, match="no online Hadamard of order"):
        split_order(block)


def test_width_must_be_a_multiple_of_the_block():
    with pytest.raises(ValueError, match="not a positive multiple of block 512"):
        HadamardConfig(1, 1000, 512)


def test_retarget_builds_cuda_kernels_with_block_syncs():
    cfg = HadamardConfig(4, 1536, 1536, True)
    mod = tvm.IRModule({"k": make_primfunc(cfg, name="k")})
    assert retarget(mod, cuda=False) is mod
    cu = retarget(tvm.IRModule(dict(mod.functions)), cuda=True)
    func = cu["k"]
    assert str(func.attrs[HADAMARD_ATTR]) == "4,1536,1536,1"
    assert bool(func.attrs["tirx.is_scheduled"])
    ex = tvm.compile(cu, target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    src = "".join(cuda_sources(ex.mod))
    assert "__shared__" in src and "blockIdx.x" in src
    # 7 butterfly stages (P = 128) then the 12-way mix: a barrier between consecutive stages
    assert src.count("__syncthreads()") == 7


def test_import_maps_each_online_hadamard_to_one_kernel_call():
    """A rotated model's ``BlockHadamard`` is imported as one ``call_tir`` per layer (one kernel
    per shape), not as a chain of butterfly ops."""
    from conftest import tiny_llama
    from tvm import tirx

    from shiftadd_tvm.frontend import import_causal_lm
    from shiftadd_tvm.rotate import rotate_down_inputs, rotate_model

    model = rotate_down_inputs(rotate_model(tiny_llama(intermediate=192)), 192)
    mod, _, _ = import_causal_lm(model, 1, 8)
    kernels = [
        str(f.attrs[HADAMARD_ATTR])
        for f in mod.functions.values()
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and HADAMARD_ATTR in f.attrs
    ]
    assert kernels == ["8,192,192,0"]
    main = mod["main"].script()
    assert main.count("R.call_tir(") == 2  # two layers, nothing else is a call_tir yet
