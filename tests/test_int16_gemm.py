"""The large-M int16 GEMM (schedules/int16_gemm.py): kernel vs its numpy model on random and ragged
shapes, the model vs the exact weights, the weight-range check, and the rewrite pass's dispatch."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from shiftadd_tvm.schedules import int16_gemm as I
from shiftadd_tvm.schedules import lut_gemm_int8 as L
from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig, reference
from shiftadd_tvm.schedules.packing import encode_terms, pack_planes

from shiftadd_tvm import cpu_features

RTOL_MODEL = 2e-6  # kernel vs model: same integers, float32 vs float64 sums (relative L2)
RTOL_EXACT = 2e-3  # model vs exact weights: 12-bit activations, terms > CUT octaves down dropped
TARGET = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
SHAPES = [  # m, n, k, bits, group_size, terms
    (16, 64, 128, 2, 32, 1),
    (7, 70, 576, 3, 128, 3),  # ragged N, K not a multiple of 128, M not a multiple of m_inner
    (13, 100, 100, 4, 32, 3),  # ragged K (group 32)
    (24, 33, 256, 1, 64, 3),  # one bit, N below one tile
    (128, 96, 192, 2, 64, 2),
]
needs_vnni = pytest.mark.skipif(
    bool(cpu_features.host_missing("int16")), reason="needs AVX-512 BW and VNNI to run the kernel"
)


def _host_builds_int16() -> bool:
    """Whether compile(target="llvm") on this host runs many-row matmuls on the int16 GEMM: its
    table kernel is avx512bw (the packing the GEMM reads) with VNNI; a VBMI host's avx512 kernel
    keeps its own packing and runs every M itself."""
    from shiftadd_tvm.targets import resolve_target

    spec = resolve_target("llvm").to_dict()
    return cpu_features.int16_gemm_target(spec, cpu_features.kernel_isa(spec))


host_builds_int16 = pytest.mark.skipif(
    not _host_builds_int16(),
    reason="compile() on this host does not use the int16 GEMM (its table kernel is not avx512bw)",
)


def random_case(cfg, seed, span=14):
    """Activations with an outlier channel; random planes; terms with absent slots and exponents
    spread over ``span`` octaves (more than CUT: some terms are dropped)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg.m, cfg.k)).astype(np.float32)
    x[:, rng.integers(0, cfg.k)] *= 30
    codes = rng.random((cfg.bits, cfg.n, cfg.k)) < 0.5
    signs = rng.choice([-1, 0, 1], (cfg.bits, cfg.n, cfg.groups, cfg.terms))
    signs[..., 0] = 1  # every plane has a leading term
    exps = rng.integers(-12, -12 + span + 1, (cfg.bits, cfg.n, cfg.groups, cfg.terms))
    return x, pack_planes(codes, cfg.group_size), encode_terms(signs, exps)


def run(cfg, x, planes, scales, knobs=None):
    func = I.make_primfunc(cfg, knobs)
    ex = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(TARGET))
    w, dl = L.pack_int8(planes, scales, cfg, "avx512bw")  # the table kernel's weights, as they are
    args = [tvm.runtime.tensor(a) for a in (x, w, dl, np.full((cfg.m, cfg.n), np.nan, np.float32))]
    ex.jit()[I.symbol(cfg)](*args)
    return args[-1].numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@needs_vnni
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_model_and_exact_weights(shape):
    cfg = LutGemmConfig(*shape)
    x, planes, scales = random_case(cfg, sum(shape))
    assert I.misfit_reason(scales) is None
    y = run(cfg, x, planes, scales)
    model = I.reference(x, planes, scales, cfg)
    assert np.isfinite(y).all()
    assert rel(y, model) < RTOL_MODEL
    assert rel(model, reference(x, planes, scales, cfg)) < RTOL_EXACT


@needs_vnni
@pytest.mark.parametrize("m_inner", [1, 4, 7])
def test_row_tiles(m_inner):
    cfg = LutGemmConfig(10, 64, 128, 3, 64, 2)
    x, planes, scales = random_case(cfg, 3)
    y = run(cfg, x, planes, scales, I.Int16Knobs(m_inner))
    assert rel(y, I.reference(x, planes, scales, cfg)) < RTOL_MODEL


@needs_vnni
def test_zero_rows_and_absent_scales():
    """A zero activation row gives zeros (no division by its zero max); a row whose scales are all
    absent gives zeros."""
    cfg = LutGemmConfig(16, 40, 64, 2, 32, 2)
    x, planes, scales = random_case(cfg, 5)
    x[3] = 0
    scales[:, 7] = 0
    y = run(cfg, x, planes, scales)
    assert np.all(y[3] == 0) and np.all(y[:, 7] == 0)
    assert rel(y, I.reference(x, planes, scales, cfg)) < RTOL_MODEL


def test_model_drops_only_terms_more_than_cut_octaves_down():
    """The model's weights: exact when a (row, group)'s terms span at most CUT octaves, and within
    2^-CUT of the largest term per dropped term otherwise."""
    signs = np.ones((2, 8, 2, 3), int)
    exps = np.broadcast_to(np.array([-2, -5, -12]), (2, 8, 2, 3)).copy()  # span 10: all kept
    c, lo = I.multipliers(encode_terms(signs, exps))
    assert np.array_equal(c * 2.0 ** lo[None], np.full((2, 8, 2), 2.0**-2 + 2.0**-5 + 2.0**-12))
    exps[..., 2] = -13  # 11 octaves below: dropped
    c, lo = I.multipliers(encode_terms(signs, exps))
    assert np.array_equal(c * 2.0 ** lo[None], np.full((2, 8, 2), 2.0**-2 + 2.0**-5))


def test_misfit_is_detected_and_named():
    """Twelve terms at one exponent sum to 12 * 2^CUT > WMAX: refused by name."""
    signs = np.ones((4, 8, 2, 3), int)
    exps = np.full((4, 8, 2, 3), -3)
    why = I.misfit_reason(encode_terms(signs, exps))
    assert why and str(I.WMAX) in why and "octaves" in why


def test_unsupported_configs_and_the_dispatch_rule():
    assert "group_size" in I.unsupported_reason(LutGemmConfig(32, 64, 512, 2, 256, 1))
    assert I.unsupported_reason(LutGemmConfig(32, 64, 256, 2, 128, 1, shared_exp=True)) is None
    assert "4 planes" in I.unsupported_reason(
        LutGemmConfig(32, 64, 256, 5, 128, 1, shared_exp=True)
    )
    assert I.unsupported_reason(LutGemmConfig(32, 64, 256, 2, 128, 1)) is None
    assert not I.prefers(1, 4) and not I.prefers(8, 4) and not I.prefers(16, 2)
    assert I.prefers(16, 3) and I.prefers(32, 2) and I.prefers(128, 1)


def _rewrite(m, scales_fn=None, **kw):
    from shiftadd_tvm.passes.lut_rewrite import PackedLinear, rewrite_matmuls
    from tvm.script import relax as R

    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((m, 128), "float32"), wt: R.Tensor((64, 128), "float32")):
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(wt, [1, 0]))
                R.output(y)
            return y

    cfg = LutGemmConfig(m, 64, 128, 3, 32, 3)
    x, planes, scales = random_case(cfg, 1)
    if scales_fn:
        scales = scales_fn(scales)

    def quant(_key, w_nk):
        return PackedLinear(planes, scales, 64, 128, 32)

    mod, rec = rewrite_matmuls(Mod, quant, params={"wt": w}, cpu_isa="avx512bw", **kw)
    return mod, rec, (cfg, x, planes, scales)


def test_pass_dispatches_large_m_to_the_int16_gemm():
    _, rec, _ = _rewrite(32, int16_gemm_ok=True)
    (info,) = rec.kernels.values()
    assert info["kind"] == "int16-gemm" and rec.rewritten[0]["kernel"].endswith("_int16")
    _, rec, _ = _rewrite(2, int16_gemm_ok=True)  # few rows: the table kernel
    assert [k["kind"] for k in rec.kernels.values()] == ["lut-int8"]
    _, rec, _ = _rewrite(32)  # a target without VNNI: the table kernel
    assert [k["kind"] for k in rec.kernels.values()] == ["lut-int8"]


def test_pass_keeps_a_misfit_layer_on_the_table_kernel(caplog):
    def wide(scales):
        s = scales.copy()
        s[...] = encode_terms(np.ones(s.shape, int), np.full(s.shape, -3))
        return s

    _, rec, _ = _rewrite(32, wide, int16_gemm_ok=True)
    assert [k["kind"] for k in rec.kernels.values()] == ["lut-int8"]
    assert rec.int16_misfits == 1 and "too wide for int16" in rec.summary()
    assert "table kernel instead of the int16 GEMM" in caplog.text


@needs_vnni
def test_pass_output_runs_and_matches_the_model():
    import tvm.relax as relax

    mod, _, (cfg, x, planes, scales) = _rewrite(32, int16_gemm_ok=True)
    ex = tvm.compile(mod, target=tvm.target.Target(TARGET))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    y = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    assert rel(y, I.reference(x, planes, scales, cfg)) < RTOL_MODEL


def test_compiles_for_a_vnni_target_on_any_x86_host():
    """The kernel compiles for a VNNI target on any x86 host (the runtime checks the features)."""
    cfg = LutGemmConfig(16, 40, 100, 2, 32, 2)
    ex = tvm.compile(tvm.IRModule({"k": I.make_primfunc(cfg)}), target=tvm.target.Target(TARGET))
    assert "vpdpwssd" in ex.mod.inspect_source("asm")


@needs_vnni
@host_builds_int16
def test_prefill_build_is_closer_to_torch_than_int8_tables(tmp_path):
    """compile(tables="auto") on this host: main's many-row matmuls run the int16 GEMM, the
    one-row steps the int8 tables; main's logits are much closer to torch (same dequantized
    weights) than those of the tables="int8" build, and its steps still decode."""
    from test_decode import SEQ, _compile_decode, spread_llama

    from shiftadd_tvm import runtime
    from shiftadd_tvm.compiler import logits_tolerance, verify_against_torch

    model = spread_llama()
    ids = np.random.default_rng(5).integers(0, 512, (1, SEQ))
    errs = {}
    for tables in ("auto", "int8"):
        art = _compile_decode(model, tables=tables)
        kinds = {k["kind"] for k in art.manifest["rewrite"]["kernels"].values()}
        assert ("int16-gemm" in kinds) == (tables == "auto"), kinds
        path = art.export(tmp_path / f"{tables}.so")
        errs[tables] = verify_against_torch(path, art, model, ids)
        assert errs[tables] < 2 * logits_tolerance(art.manifest)  # as test_decode's head test
        rt = runtime.load(path)
        rt.prefill(ids[0, :5])
        assert np.isfinite(rt.decode(ids[0, 5])).all()
    # measured on the Xeon: auto 2.7e-3, int8 4.3e-2 (float tables 1.1e-3)
    assert errs["auto"] < 0.25 * errs["int8"], errs


# ------------------------------------------------ the shared-exponent packing (--scale-window)
def shared_case(cfg, seed):
    """Activations with an outlier channel; scales with a shared-exponent form (each (row,
    group)'s terms within 8 exponents, signed, some absent, one group without any)."""
    from test_kernel_int8 import shared_case as table_case

    return table_case(cfg, seed)


SHARED_SHAPES = [  # m, n, k, bits, group_size, terms
    (16, 64, 256, 3, 128, 3),
    (20, 70, 576, 2, 128, 3),  # ragged N, K = 576 with group 128
    (33, 100, 100, 4, 32, 3),  # ragged K, M not a multiple of m_inner
    (6, 33, 256, 1, 64, 3),  # one bit, N below one tile
]


@needs_vnni
@pytest.mark.parametrize("shape", SHARED_SHAPES, ids=lambda s: "m{}_n{}_k{}_b{}".format(*s[:4]))
def test_shared_exponent_packing_matches_model_and_exact_weights(shape):
    """With a windowed fit the GEMM reads the avx512bw shared-exponent table kernel's packing
    (the same constants): exact integer weights ``sum_b c_b (2 bit - 1)``, one shift per group."""
    cfg = LutGemmConfig(*shape, shared_exp=True)
    x, planes, scales = shared_case(cfg, sum(shape))
    assert I.misfit_reason(scales, shared=True) is None
    y = run(cfg, x, planes, scales)
    model = I.reference(x, planes, scales, cfg)
    assert np.isfinite(y).all() and rel(y, model) < RTOL_MODEL
    assert rel(model, reference(x, planes, scales, cfg)) < RTOL_EXACT
    for m_inner in (1, 2):
        assert rel(run(cfg, x, planes, scales, I.Int16Knobs(m_inner)), y) < 1e-6


def test_pass_dispatches_a_shared_exponent_layer_to_the_int16_gemm():
    """rewrite_matmuls(shared_exp=True, vnni=True): many rows go to the int16 GEMM on the
    shared-exponent packing, one row to the shared-exponent table kernel."""

    def windowed(_scales):
        cfg = LutGemmConfig(32, 64, 128, 3, 32, 3, shared_exp=True)
        return shared_case(cfg, 5)[2]

    for m, kind in ((32, "int16-gemm"), (1, "lut-int8")):
        _, rec, _ = _rewrite(m, windowed, int16_gemm_ok=True, shared_exp=True, vnni=True)
        (info,) = rec.kernels.values()
        assert info["kind"] == kind and info["config"].get("shared_exp") is True
        assert rec.shared_exp_missed == 0
