"""The int8-table LUT kernels (AVX-512 VBMI, AVX-512 BW, AVX2, NEON) against their numpy model and
the exact reference, on random and ragged shapes; CPU feature detection and refusal."""

import logging
import re

import numpy as np
import pytest
import tvm
from shiftadd_tvm.schedules import lut_gemm_int8 as L
from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig, make_primfunc, reference
from shiftadd_tvm.schedules.packing import encode_terms, pack_planes

from shiftadd_tvm import cpu_features
from shiftadd_tvm.errors import ConfigError

RTOL_MODEL = 2e-6  # kernel vs reference_int8: same integers, float32 vs float64 sums (relative L2)
RTOL_EXACT = 2e-2  # int8 tables vs exact float64 (the table quantization costs ~7e-3)
TARGETS = {
    "avx512": {"kind": "llvm", "mcpu": "znver4", "num-cores": 2},
    "avx512bw": {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2},
    "avx512bw+vnni": {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2},
    "avx2": {"kind": "llvm", "mcpu": "x86-64-v3", "num-cores": 2},
    "neon": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    "generic": {"kind": "llvm", "num-cores": 2},
}
SHAPES = [  # m, n, k, bits, group_size, terms
    (1, 64, 128, 2, 32, 1),
    (1, 70, 576, 3, 128, 3),  # ragged N (not a tile multiple), K not a multiple of 128
    (3, 100, 100, 4, 32, 3),  # K=100 with group 32: ragged K; M=3
    (8, 33, 256, 1, 64, 3),  # one bit, M=8
    (8, 96, 192, 2, 64, 1),
    # M = 1 at 4 bits (avx512: two copies of the sums over alternate K-blocks), an odd number
    # of K-blocks in the last group (K = 560: 3 of 16 columns; K = 100 with group 32: 1)
    (1, 70, 560, 4, 128, 3),
    (1, 40, 100, 4, 32, 2),
]


X86_ISAS = ("avx512", "avx512bw", "avx2")


def random_case(cfg, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg.m, cfg.k)).astype(np.float32)
    x[:, rng.integers(0, cfg.k)] *= 30  # an outlier channel, as real activations have
    codes = rng.random((cfg.bits, cfg.n, cfg.k)) < 0.5
    signs = rng.choice([-1, 0, 1], (cfg.bits, cfg.n, cfg.groups, cfg.terms))
    exps = rng.integers(-12, 3, (cfg.bits, cfg.n, cfg.groups, cfg.terms))
    return x, pack_planes(codes, cfg.group_size), encode_terms(signs, exps)


def run_int8(cfg, isa, x, planes, scales, knobs=None, target=None):
    func = L.make_int8_primfunc(cfg, knobs, isa)
    ex = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(TARGETS[target or isa]))
    args = [x, *L.pack_int8(planes, scales, cfg, isa), np.zeros((cfg.m, cfg.n), np.float32)]
    args = [tvm.runtime.tensor(a) for a in args]
    ex.jit()[f"{cfg.name}_{isa}"](*args)
    return args[-1].numpy()


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def runnable(isa):
    return pytest.mark.skipif(
        bool(cpu_features.host_missing(isa)), reason=f"this CPU cannot run {isa} code"
    )


@pytest.mark.parametrize("isa", [pytest.param(i, marks=runnable(i)) for i in X86_ISAS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}_n{}_k{}_b{}_g{}_t{}".format(*s))
def test_int8_kernel_matches_models(isa, shape):
    cfg = LutGemmConfig(*shape)
    x, planes, scales = random_case(cfg, seed=sum(shape))
    y = run_int8(cfg, isa, x, planes, scales)
    model = L.reference_int8(x, planes, scales, cfg)
    assert rel(y, model) < RTOL_MODEL
    assert rel(y, reference(x, planes, scales, cfg)) < RTOL_EXACT


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "m{}_n{}_k{}".format(*s[:3]))
def test_generic_kernel_same_cases(shape):
    """The generic (float-table) kernel on the same cases: exact up to float32 sums."""
    cfg = LutGemmConfig(*shape)
    x, planes, scales = random_case(cfg, seed=sum(shape))
    ex = tvm.compile(
        tvm.IRModule({cfg.name: make_primfunc(cfg)}), target=tvm.target.Target(TARGETS["generic"])
    )
    y = tvm.runtime.tensor(np.zeros((cfg.m, cfg.n), np.float32))
    args = [tvm.runtime.tensor(a) for a in (x, planes, scales)]
    ex.jit()[cfg.name](*args, y)
    assert rel(y.numpy(), reference(x, planes, scales, cfg)) < 1e-5


@pytest.mark.parametrize("isa", [pytest.param(i, marks=runnable(i)) for i in X86_ISAS])
def test_parallel_tasks_and_row_blocks(isa):
    """Several row blocks x N chunks x parallel table build give the same result."""
    cfg = LutGemmConfig(8, 200, 256, 3, 64, 3)
    x, planes, scales = random_case(cfg, seed=5)
    model = L.reference_int8(x, planes, scales, cfg)
    knobs = (L.Int8Knobs(2, 3, True), L.Int8Knobs(8, 1, False), L.Int8Knobs(1, 7, True))
    fused = (L.Int8Knobs(2, 1, True), L.Int8Knobs(1, 1, True))  # each task builds its rows' tables
    for kn in knobs + fused:
        assert rel(run_int8(cfg, isa, x, planes, scales, kn), model) < RTOL_MODEL, kn


@pytest.mark.parametrize("isa", X86_ISAS)
def test_fused_table_build_is_one_parallel_launch(isa, monkeypatch):
    """Compile-only (any x86 host): with build_parallel and one N chunk per row block the tables
    are built inside the lookups' parallel loop (one TVMBackendParallelLaunch, FUSED_BUILD); with
    several N chunks, or the switch off, the build is its own parallel loop (two)."""

    def launches(kn):
        cfg = LutGemmConfig(8, 64, 256, 3, 64, 3)
        func = L.make_int8_primfunc(cfg, kn, isa)
        ex = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(TARGETS[isa]))
        return ex.mod.inspect_source("ll").count("load ptr, ptr @__TVMBackendParallelLaunch")

    assert launches(L.Int8Knobs(2, 1, True)) == 1
    assert launches(L.Int8Knobs(2, 2, True)) == 2
    assert launches(L.Int8Knobs(2, 1, False)) == 1  # a serial build, then the lookups
    monkeypatch.setattr(L, "FUSED_BUILD", False)
    assert launches(L.Int8Knobs(2, 1, True)) == 2


@pytest.mark.parametrize("sign", [1, -1], ids=["all+127", "all-127"])
@pytest.mark.skipif(bool(cpu_features.host_missing("avx512bw")), reason="needs AVX-512 BW")
def test_avx512bw_16bit_sums_at_the_largest_group(sign):
    """avx512bw sums biased bytes (entry + 128) of two quads per 16-bit word: at group 2048 every
    lookup at +127 (255 biased) or -127 (1) is the extreme of both the high-byte and the recovered
    low-byte sums; the result is still the model's. A larger group is refused by name."""
    cfg = LutGemmConfig(2, 40, 4096, 2, L.BW_MAX_GROUP, 2)
    x = np.ones((cfg.m, cfg.k), np.float32)
    x[1] = -1.0  # row 1: every quad's top entry is -127
    codes = np.full((cfg.bits, cfg.n, cfg.k), sign > 0)
    planes = pack_planes(codes, cfg.group_size)
    scales = encode_terms(np.ones((cfg.bits, cfg.n, cfg.groups, 2), int), np.full((2,), -3))
    y = run_int8(cfg, "avx512bw", x, planes, scales)
    model = L.reference_int8(x, planes, scales, cfg)
    assert np.abs(model).min() > 0
    assert rel(y, model) < RTOL_MODEL
    big = LutGemmConfig(1, 40, 4096, 2, 2 * L.BW_MAX_GROUP, 2)
    assert "16-bit" in L.unsupported_reason(big, "avx512bw")


def test_table_model_and_codes():
    cfg = LutGemmConfig(2, 32, 40, 2, 32, 2)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    x[1] = 0  # an all-zero row: zero tables, no division by zero
    tab, ls = L.build_tables(x, cfg)
    assert tab.shape == (2, cfg.kp // 4, 16) and np.abs(tab).max() <= L.QMAX
    assert not tab[1].any() and not ls[1].any()
    # entry c of quad q is the signed sum of its 4 activations, quantized with the group's scale
    q = 3
    want = sum((1 if (5 >> t) & 1 else -1) * x[0, 4 * q + t] for t in range(4))
    assert abs(tab[0, q, 5] * ls[0, 0] - want) <= ls[0, 0] * 0.51


def test_codes_layout_and_absent_terms():
    """pack_int8 stores per term the int16 high half of delta = (e + SHIFT) << 23 (+ 1 << 31 when
    negative) after PAD zero words, rows i and 16 + i interleaved, pad rows absent (0); the model
    adds sign * 2^e * acc for a present term and the 2^-SHIFT stand-in when absent."""
    cfg = LutGemmConfig(1, 40, 64, 2, 32, 3)
    x, planes, scales = random_case(cfg, seed=3)
    _, codes = L.pack_int8(planes, scales, cfg, "avx512")
    n_words = 2 * cfg.groups * cfg.bits * cfg.terms * L.ROWS
    assert codes.dtype == np.int16 and codes.size == L.PAD + n_words
    assert not codes[: L.PAD].any()
    c = codes[L.PAD :].reshape(2, cfg.groups, cfg.bits, cfg.terms, L.ROWS)
    delta = L.kernel_deltas(scales, cfg)  # [bits, N, G, T]
    assert c[1, 1, 0, 2, 2 * 7 + 1] == delta[0, L.ROWS + 7, 1, 2] >> 16  # row 7 of tile 1
    assert c[0, 1, 1, 0, 2 * 3] == delta[1, 16 + 3, 1, 0] >> 16  # row 19 of tile 0
    assert not c[1, :, :, :, 2 * 8 :].any()  # tile 1: rows 40.. (8..31) are pad rows
    d = L.kernel_deltas(encode_terms(np.array([1, -1, 0]), np.array([-3, 27, 0])), cfg)
    assert d.view(np.uint32).tolist() == [(L.SHIFT - 3) << 23, (1 << 31) | (L.SHIFT + 27) << 23, 0]
    # one plane, one group, one term: y = acc * alpha * ls with alpha = -2^-3, then absent
    cfg1 = LutGemmConfig(1, 1, 32, 1, 32, 1)
    x1 = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)
    p1 = pack_planes(np.ones((1, 1, 32), bool), 32)
    tab, ls = L.build_tables(x1, cfg1)
    acc = int(tab[0, np.arange(8), 15].astype(np.int64).sum())  # all-ones nibbles: entry 15
    neg = encode_terms(np.array([[[[-1]]]]), np.array([[[[-3]]]]))
    assert L.reference_int8(x1, p1, neg, cfg1)[0, 0] == -acc * 2.0**-3 * float(ls[0, 0])
    absent = L.reference_int8(x1, p1, np.zeros_like(neg), cfg1)[0, 0]
    assert absent == acc * 2.0**-L.SHIFT * float(ls[0, 0])


def plan_case(cfg, seed):
    """random_case with the slots past each plane's count absent (what a per-plane fit stores)."""
    x, planes, scales = random_case(cfg, seed)
    for b, c in enumerate(cfg.term_counts):
        scales[b, ..., c:] = 0
        scales[b, 0, 0, :c] = encode_terms(np.ones(c), -np.arange(c) - 2)  # every slot used once
    return x, planes, scales


@pytest.mark.parametrize("isa", [pytest.param(i, marks=runnable(i)) for i in X86_ISAS])
@pytest.mark.parametrize("plan", [(4, 3, 3, 2), (2, 1, 0, 3)], ids=lambda p: "".join(map(str, p)))
def test_per_plane_term_counts(isa, plan):
    """A config with per-plane term counts (packing.plane_term_counts of the scales) stores and
    applies only the used slots, and gives the same result as the reference of the full array."""
    cfg = LutGemmConfig(3, 70, 200, 4, 32, 4, plan)
    x, planes, scales = plan_case(cfg, seed=11)
    from shiftadd_tvm.schedules.packing import plane_term_counts

    assert plane_term_counts(scales) == plan
    _, codes = L.pack_int8(planes, scales, cfg, isa)
    assert codes.size == L.PAD + 3 * cfg.groups * sum(plan) * L.ROWS  # 3 tiles of 32 rows
    y = run_int8(cfg, isa, x, planes, scales)
    assert rel(y, L.reference_int8(x, planes, scales, cfg)) < RTOL_MODEL
    assert rel(y, reference(x, planes, scales, cfg)) < RTOL_EXACT
    full = LutGemmConfig(3, 70, 200, 4, 32, 4)  # same weights, every slot applied
    assert rel(y, L.reference_int8(x, planes, scales, full)) < 1e-6
    assert cfg.name != full.name
    with pytest.raises(ValueError, match="past its count"):  # a plan that would drop terms
        L.pack_int8(planes, scales, LutGemmConfig(3, 70, 200, 4, 32, 4, (1, 1, 1, 1)), isa)


def test_plane_terms_config():
    assert LutGemmConfig(1, 8, 32, 2, 32, 3, [3, 3]).plane_terms == ()  # uniform: normalized
    assert LutGemmConfig(1, 8, 32, 2, 32, 3, [3, 1]).term_counts == (3, 1)
    for bad in ((3,), (4, 1), (-1, 2)):
        with pytest.raises(ValueError, match="plane_terms"):
            LutGemmConfig(1, 8, 32, 2, 32, 3, bad)


def test_exponent_limit():
    """Every exponent of the packed format up to max_exp passes; above it a clear ValueError."""
    cfg = LutGemmConfig(1, 32, 128, 2, 128, 3)
    assert L.max_exp(cfg) == 127 - L.SHIFT - 12 - 3  # |acc| < 2^12 at group 128, 6 terms
    assert L.max_exp(LutGemmConfig(1, 32, 1024, 4, 1024, 4)) == 127 - L.SHIFT - 15 - 4
    ok = encode_terms(np.array([1, -1, 1]), np.array([-64, L.max_exp(cfg), 0]))
    L.kernel_deltas(ok, cfg)
    with pytest.raises(ValueError, match=f"2\\^{L.max_exp(cfg) + 1} exceeds.*float-table kernel"):
        L.kernel_deltas(encode_terms(np.array([1]), np.array([L.max_exp(cfg) + 1])), cfg)


@pytest.mark.parametrize("isa", [pytest.param(i, marks=runnable(i)) for i in X86_ISAS])
def test_extreme_exponents_and_absent_rows(isa):
    """Term exponents at both ends of the kernel's range, rows whose terms are all absent, and
    zero accumulators (an all-zero activation group: f = 0, no select)."""
    cfg = LutGemmConfig(2, 64, 128, 2, 32, 3)
    x, planes, _ = random_case(cfg, seed=11)
    x[0, 32:64] = 0  # row 0, group 1: zero tables, every accumulator 0
    rng = np.random.default_rng(11)
    signs = rng.choice([-1, 1], (cfg.bits, cfg.n, cfg.groups, cfg.terms))
    top = L.max_exp(cfg)
    exps = rng.choice([-64, -63, top - 1, top, -5], signs.shape)
    signs[:, :5] = 0  # rows 0..4: alpha = 0 in every plane and group
    scales = encode_terms(signs, exps)
    y = run_int8(cfg, isa, x, planes, scales)
    model = L.reference_int8(x, planes, scales, cfg)
    assert np.isfinite(y).all()
    assert rel(y, model) < RTOL_MODEL
    assert np.abs(y[:, :5]).max() < 1e-12  # the 2^-64 stand-in only
    # moderate exponents: the zero group adds nothing visible, the rest matches the exact reference
    scales = encode_terms(signs, rng.integers(-12, 3, signs.shape))
    y = run_int8(cfg, isa, x, planes, scales)
    assert rel(y, L.reference_int8(x, planes, scales, cfg)) < RTOL_MODEL
    assert rel(y, reference(x, planes, scales, cfg)) < RTOL_EXACT


@pytest.mark.parametrize("isa", [pytest.param(i, marks=runnable(i)) for i in X86_ISAS])
def test_zero_input_gives_zero(isa):
    """x = 0: zero tables and scales, every accumulator 0; the output is exactly 0."""
    cfg = LutGemmConfig(3, 40, 96, 3, 32, 2)
    _, planes, scales = random_case(cfg, seed=2)
    x = np.zeros((cfg.m, cfg.k), np.float32)
    assert not run_int8(cfg, isa, x, planes, scales).any()


def test_unsupported_cases_are_named():
    assert "multiple of 16" in L.unsupported_reason(LutGemmConfig(1, 8, 64, 2, 8, 1), "avx512")
    assert L.unsupported_reason(LutGemmConfig(1, 8, 64, 2, 8, 1), "avx2") is None
    with pytest.raises(ValueError, match="multiple of 16"):
        L.make_int8_primfunc(LutGemmConfig(1, 8, 64, 2, 8, 1), None, "avx512")


def test_kernel_isa_from_target():
    assert cpu_features.kernel_isa({"kind": "llvm", "mcpu": "znver4"}) == "avx512"
    assert cpu_features.kernel_isa({"kind": "llvm", "mcpu": "x86-64-v3"}) == "avx2"
    # AVX-512 without VBMI (vpermb would abort LLVM): the in-lane vpshufb kernel
    assert cpu_features.kernel_isa({"kind": "llvm", "mcpu": "skylake-avx512"}) == "avx512bw"
    assert cpu_features.kernel_isa({"kind": "llvm", "mcpu": "cascadelake"}) == "avx512bw"
    assert cpu_features.kernel_isa({"kind": "llvm", "mattr": ["+avx2"]}) == "avx2"
    assert cpu_features.kernel_isa({"kind": "llvm"}) == "generic"
    assert cpu_features.kernel_isa(TARGETS["neon"]) == "neon"
    assert cpu_features.kernel_isa({"kind": "llvm", "mtriple": "aarch64-linux-gnu"}) == "neon"


def test_scale_window_hint_names_the_shared_exponent_kernel():
    """compile() suggests --scale-window 8 for a free fit exactly where a shared-exponent kernel
    would run it: VBMI, or BW with VNNI; not without VNNI, not on AVX2, not when already asked."""
    for name in ("avx512", "avx512bw+vnni"):
        spec = TARGETS[name]
        hint = cpu_features.scale_window_hint(spec, cpu_features.kernel_isa(spec), 0)
        assert hint and "--scale-window 8" in hint and cpu_features.kernel_isa(spec) in hint
        assert cpu_features.scale_window_hint(spec, cpu_features.kernel_isa(spec), 8) is None
    for spec in (TARGETS["avx512bw"], {"kind": "llvm", "mcpu": "x86-64-v3"}, TARGETS["neon"]):
        assert cpu_features.scale_window_hint(spec, cpu_features.kernel_isa(spec), 0) is None


def test_host_refuses_missing_features(monkeypatch):
    if cpu_features.host_flags() and "asimd" not in cpu_features.host_flags():  # an x86 host
        with pytest.raises(ConfigError, match="neon"):
            cpu_features.require_host_isa("neon")
    no_vbmi = frozenset(cpu_features.host_flags() - {"avx512vbmi", "avx512_vnni", "avx512vnni"})
    monkeypatch.setattr(cpu_features, "host_flags", lambda: no_vbmi)
    with pytest.raises(ConfigError, match="avx512vbmi"):
        cpu_features.require_host_isa("avx512", "artifact 'x.so'")
    cpu_features.require_host_isa("generic")  # nothing needed


def test_neon_compiles_to_tbl():
    """Compile-only (this machine is x86): the aarch64 code uses tbl lookups."""
    cfg = LutGemmConfig(2, 64, 128, 2, 32, 3)
    func = L.make_int8_primfunc(cfg, None, "neon")
    ex = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(TARGETS["neon"]))
    asm = ex.mod.inspect_source("asm")
    n_tbl = len(re.findall(r"\btbl\b", asm))
    assert n_tbl >= cfg.bits * 2 * 2  # 2 quads x 2 halves of a 32-row tile per plane


def _host_x86_isa():
    return next((i for i in X86_ISAS if not cpu_features.host_missing(i)), None)


@pytest.mark.skipif(_host_x86_isa() is None, reason="needs an x86 CPU with AVX2 or AVX-512")
def test_default_llvm_compile_uses_the_hosts_int8_kernel(tiny_artifact):
    """compile(target="llvm") runs every one-row LUT matmul on the int8 kernel of the best ISA this
    machine has (AVX-512 VBMI, else AVX-512 BW, else AVX2), says so in the manifest, and makes the
    runtime check that ISA's CPU features; many-row matmuls take the int16 GEMM on AVX-512 BW
    hosts with VNNI."""
    art, _ = tiny_artifact
    man = art.manifest
    isa = _host_x86_isa()
    kernels = man["rewrite"]["kernels"].values()
    lut = [k for k in kernels if k["kind"] == "lut-int8"]
    assert lut and all(k["isa"] == isa for k in lut)
    assert set(cpu_features.ISA_FEATURES[isa]) <= set(man["cpu_features"])
    assert "float-table" not in man["rewrite"]["summary"]
    # main's 16 rows at 3 bits: the int16 GEMM where the host has AVX-512 BW + VNNI (no VBMI)
    int16 = [k for k in kernels if k["kind"] == "int16-gemm"]
    vnni = isa == "avx512bw" and not cpu_features.host_missing("int16")
    assert bool(int16) == vnni
    assert {k["kind"] for k in kernels} <= {"lut-int8", "int16-gemm", "dense"}
    if vnni:
        assert "avx512vnni" in man["cpu_features"]


def test_pass_falls_back_to_float_kernel_and_counts_it():
    """A configuration the int8 kernel cannot run (group 8 on AVX-512) is logged and counted."""
    from shiftadd_tvm.passes.lut_rewrite import PackedLinear, rewrite_matmuls
    from tvm.script import relax as R

    w = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor((2, 24), "float32"), wt: R.Tensor((16, 24), "float32")):
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(wt, [1, 0]))
                R.output(y)
            return y

    def quant(_key, w_nk):
        cfg = LutGemmConfig(2, 16, 24, 2, 8, 1)
        _, planes, scales = random_case(cfg, 0)
        return PackedLinear(planes, scales, 16, 24, 8)

    _, rec = rewrite_matmuls(Mod, quant, params={"wt": w}, cpu_isa="avx512")
    (info,) = rec.kernels.values()
    assert info["kind"] == "lut-float" and "multiple of 16" in info["int8_fallback"]
    assert rec.int8_fallbacks == 1 and "1 on the float-table kernel" in rec.summary()


def test_tables_float_uses_the_float_kernel_on_any_target(tiny_model, tmp_path):
    """compile(tables="float") runs every LUT matmul on the float-table kernel even where the
    target has the int8 instructions, and its logits match torch at the float tolerance."""
    import shiftadd_tvm
    from shiftadd_tvm.compiler import logits_tolerance, verify_against_torch

    calib = np.random.default_rng(0).integers(0, 256, (4, 16))
    kw = dict(bits=3, group_size=32, seq_len=16, calib_ids=calib, progress=False, decode=False)
    with pytest.raises(ConfigError, match="tables='int4': one of auto, int8, float"):
        shiftadd_tvm.compile(tiny_model, tables="int4", **kw)
    art = shiftadd_tvm.compile(tiny_model, tables="float", **kw)
    lut = [k for k in art.manifest["rewrite"]["kernels"].values() if k.get("kind") != "dense"]
    assert lut and all(k["kind"] != "lut-int8" for k in lut)
    assert logits_tolerance(art.manifest) == 1e-3
    path = art.export(tmp_path / "float.so")
    ids = np.random.default_rng(1).integers(0, 256, (1, 16))
    # float32 activations and sums: the float16 head is the rounding left (int8: INT8_LOGITS_RTOL)
    assert verify_against_torch(path, art, tiny_model, ids) < 1e-3


# ----------------------------------------------------------------------------- shared exponent
def shared_case(cfg, seed):
    """random_case with each (row, group)'s terms inside 8 exponents (signed, some absent, some
    planes negative, one group with no term): scales that have packing.shared_exponent_form."""
    x, planes, _ = random_case(cfg, seed)
    rng = np.random.default_rng(seed)
    shape = (cfg.bits, cfg.n, cfg.groups, cfg.terms)
    base = rng.integers(-20, 4, (1, cfg.n, cfg.groups, 1))
    exps = base + np.sort(rng.integers(0, 6, shape), -1)[..., ::-1]
    signs = rng.choice([-1, 0, 1], shape)
    signs[..., 0] = rng.choice([-1, 1], shape[:3])
    signs[:, 0, 0] = 0  # row 0, group 0: no term at all
    return x, planes, encode_terms(signs, exps)


SHARED_SHAPES = [
    (1, 70, 576, 3, 128, 3),
    (3, 100, 100, 4, 32, 3),
    (8, 33, 256, 1, 64, 3),
    (1, 70, 560, 4, 128, 3),  # M = 1, 4 bits: the avx512 kernel's two copies; ragged last group
    (1, 70, 576, 2, 128, 3),  # 2 bits: the codes' gap (code_gap); ragged N and last group
    (2, 64, 256, 2, 64, 2),
]


def test_shared_exponent_form():
    from shiftadd_tvm.schedules.packing import decode_scales, shared_exponent_form

    cfg = LutGemmConfig(*SHARED_SHAPES[1])
    _, _, scales = shared_case(cfg, seed=3)
    e, c = shared_exponent_form(scales)
    assert np.array_equal(c * np.exp2(e)[None], decode_scales(scales))  # exact
    assert np.abs(c).max() <= 255 and (c < 0).any() and (c == 0).any()
    wide = encode_terms(np.array([[[[1, 1]]]]), np.array([[[[0, -8]]]]))  # 2^0 + 2^-8: 257
    assert shared_exponent_form(wide) is None
    assert shared_exponent_form(encode_terms(np.array([[[[1, -1]]]]), np.array([[[[0, -8]]]])))


@pytest.mark.parametrize("shape", SHARED_SHAPES, ids=lambda s: "m{}_n{}_k{}_b{}".format(*s[:4]))
def test_shared_exponent_model(shape):
    """The numpy model of the shared-exponent kernel (plane sums weighted by their integer
    multipliers, one shift) against the per-term model and the exact reference."""
    cfg = LutGemmConfig(*shape, shared_exp=True)
    x, planes, scales = shared_case(cfg, seed=sum(shape))
    model = L.reference_int8(x, planes, scales, cfg)
    per_term = L.reference_int8(x, planes, scales, LutGemmConfig(*shape))
    assert rel(model, per_term) < 1e-6  # the same integers, summed in another order
    assert rel(model, reference(x, planes, scales, cfg)) < RTOL_EXACT
    _, codes = L.pack_int8(planes, scales, cfg, "avx512")
    nt = -(-cfg.n // L.ROWS)
    assert codes.size == 2 * L.PAD + nt * cfg.groups * L.shared_words(cfg)
    gap = L.code_gap(cfg)
    assert gap == (L.GAP_WORDS if cfg.bits == 2 else 0)
    per_group = codes[L.PAD : -L.PAD].reshape(nt, cfg.groups, -1)
    assert per_group.shape[-1] == L.ROWS + cfg.bits * L.ROWS // 2 + gap
    assert not per_group[..., per_group.shape[-1] - gap :].any()  # the gap holds zeros
    assert per_group[..., L.ROWS :].view(np.uint8)[..., : cfg.bits * L.ROWS].any()  # |c_b| bytes
    assert "x_m" in cfg.name and '"shared_exp": true' in cfg.to_json()
    assert "shared_exp" not in LutGemmConfig(*shape).to_json()  # old record keys unchanged


def test_shared_exponent_refusals():
    cfg = LutGemmConfig(1, 32, 128, 2, 128, 3, shared_exp=True)
    x, planes, _ = random_case(cfg, seed=1)
    wide = np.zeros((2, 32, 1, 3), np.int8)
    wide[0, 5, 0, :2] = encode_terms(np.array([1, 1]), np.array([0, -9]))
    with pytest.raises(ValueError, match="no shared-exponent form.*shared_exp=False"):
        L.pack_int8(planes, wide, cfg, "avx512")
    assert "AVX-512 kernels only" in L.unsupported_reason(cfg, "avx2")
    five = LutGemmConfig(1, 32, 128, 5, 128, 3, shared_exp=True)
    assert "holds 4 planes" in L.unsupported_reason(five, "avx512bw")
    assert L.unsupported_reason(five, "avx512") is None
    big = encode_terms(np.ones((2, 32, 1, 1)), np.full((2, 32, 1, 1), L.max_shared_exp(cfg) + 1))
    with pytest.raises(ValueError, match="outside the shared-exponent"):
        L.pack_int8(
            planes, np.concatenate([big, np.zeros((2, 32, 1, 2), np.int8)], -1), cfg, "avx512"
        )


def test_per_term_kernel_prefetches_next_codes_at_m1(monkeypatch):
    """Compile-only (any x86 host): the avx512 per-term kernel at M = 1 prefetches every line of
    the next group's codes (one prefetcht0 per term slot, PREFETCH_CODES); at M = 8, in the
    shared-exponent kernel and with the switch off it does not."""

    def prefetches(cfg):
        func = L.make_int8_primfunc(cfg, None, "avx512")
        ex = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(TARGETS["avx512"]))
        return len(re.findall(r"\bprefetcht0\b", ex.mod.inspect_source("asm")))

    m1 = LutGemmConfig(1, 64, 512, 3, 128, 3, (3, 2, 2))
    assert prefetches(m1) >= sum(m1.term_counts)  # 7 lines of 64 bytes per group
    assert prefetches(LutGemmConfig(8, 64, 512, 3, 128, 3, (3, 2, 2))) == 0
    assert prefetches(LutGemmConfig(1, 64, 512, 3, 128, 3, (3, 2, 2), shared_exp=True)) == 0
    monkeypatch.setattr(L, "PREFETCH_NEXT_CODES", False)
    assert prefetches(m1) == 0


def test_shared_exponent_kernel_compiles_to_one_shift_per_group():
    """Compile-only (runs on any x86 host): the shared-exponent kernel's group loop applies one
    masked exponent add per 16 rows, where the per-term kernel applies one per term."""
    counts = {}
    for shared in (False, True):
        cfg = LutGemmConfig(1, 256, 512, 3, 128, 3, (3, 2, 2), shared_exp=shared)
        func = L.make_int8_primfunc(cfg, None, "avx512")
        ex = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(TARGETS["avx512"]))
        asm = ex.mod.inspect_source("asm")
        counts[shared] = (len(re.findall(r"\bvpaddw\b", asm)), len(re.findall(r"vpdpbusd", asm)))
    assert counts[True][0] == 2 and counts[False][0] == 2 * 7  # 2 halves x (1 | 3+2+2 terms)
    assert counts[True][1] == counts[False][1] > 0


@pytest.mark.skipif(bool(cpu_features.host_missing("avx512")), reason="needs AVX-512 VBMI/VNNI")
def test_k_chunks_rule():
    """avx512 splits K into chunks whose tables (16 bytes per quad) fit CHUNK_TABLE_BYTES, at
    every M; the other kernels and K up to 2048 (group 128) keep one chunk."""
    big = LutGemmConfig(1, 4096, 4096, 3, 128, 3)
    assert L.CHUNK_TABLE_BYTES == 8192
    assert (L.k_chunks(big, "avx512"), L.chunk_groups(big, "avx512")) == (2, 16)
    assert L.k_chunks(LutGemmConfig(8, 4096, 4096, 3, 128, 3), "avx512") == 2
    assert L.k_chunks(LutGemmConfig(1, 576, 11008, 3, 128, 3), "avx512") == 6  # 86 groups
    for isa in ("avx512bw", "avx2", "neon"):
        assert L.k_chunks(big, isa) == 1
    for k in (576, 1536, 2048):
        assert L.k_chunks(LutGemmConfig(1, 576, k, 3, 128, 3), "avx512") == 1


def test_stream_order_is_chunk_major(monkeypatch):
    """Records (tile, group) are stored per K chunk, tile by tile, the chunk's groups in order;
    the last chunk may be shorter. With one chunk the order is tile-major, as before."""
    cfg = LutGemmConfig(1, 96, 160, 2, 32, 1)  # 3 tiles, 5 groups of 32
    rec = np.array([[(t, g) for g in range(5)] for t in range(3)])  # [nt, G, 2]
    assert np.array_equal(L.stream_order(rec, cfg, "avx512"), rec.reshape(-1, 2))
    monkeypatch.setattr(L, "CHUNK_TABLE_BYTES", 256)  # 2 groups of 32 (128 table bytes each)
    assert L.k_chunks(cfg, "avx512") == 3
    want = [(t, g) for c in ((0, 1), (2, 3), (4,)) for t in range(3) for g in c]
    assert L.stream_order(rec, cfg, "avx512").tolist() == [list(r) for r in want]
    planes, scales = random_case(cfg, seed=2)[1:]
    w, codes = L.pack_int8(planes, scales, cfg, "avx512")
    monkeypatch.setattr(L, "CHUNK_TABLE_BYTES", 0)  # one chunk: tile-major
    assert L.k_chunks(cfg, "avx512") == 1
    w1, codes1 = L.pack_int8(planes, scales, cfg, "avx512")
    monkeypatch.setattr(L, "CHUNK_TABLE_BYTES", 256)
    assert np.array_equal(w, L.stream_order(w1.reshape(3, 5, -1), cfg, "avx512").reshape(-1))
    assert np.array_equal(codes[: L.PAD], codes1[: L.PAD])
    per_group = codes1[L.PAD :].reshape(3, 5, -1)  # 2 planes x 1 term x 32 rows per record
    assert np.array_equal(codes[L.PAD :], L.stream_order(per_group, cfg, "avx512").reshape(-1))


CHUNK_SHAPES = [  # m, n, k, bits, group_size, terms; chunks of 3 groups of 32 (CHUNK_TABLE_BYTES)
    (1, 70, 300, 3, 32, 2),  # 10 groups: chunks of 3, 3, 3, 1; ragged N and K
    (3, 64, 256, 2, 32, 3),  # M = 3, 8 groups: 3, 3, 2
    (1, 96, 512, 4, 32, 3),  # 4 bits at M = 1: two copies of the sums inside each chunk
]


@pytest.mark.parametrize("shared", [False, True], ids=["per_term", "shared_exp"])
@pytest.mark.parametrize("shape", CHUNK_SHAPES, ids=lambda s: "m{}_n{}_k{}_b{}".format(*s[:4]))
@runnable("avx512")
def test_chunked_kernel_matches_models(monkeypatch, shape, shared):
    """The avx512 kernel with K split into chunks (outer loop, y accumulated per chunk, weights
    and codes chunk-major) against its numpy model and the exact reference, one task and
    parallel tile chunks."""
    monkeypatch.setattr(L, "CHUNK_TABLE_BYTES", 384)
    cfg = LutGemmConfig(*shape, shared_exp=shared)
    assert L.k_chunks(cfg, "avx512") >= 3
    x, planes, scales = (shared_case if shared else random_case)(cfg, seed=sum(shape))
    model = L.reference_int8(x, planes, scales, cfg)
    for kn in (None, L.Int8Knobs(1, 3, False)):
        y = run_int8(cfg, "avx512", x, planes, scales, kn)
        assert rel(y, model) < RTOL_MODEL, kn
        assert rel(y, reference(x, planes, scales, cfg)) < RTOL_EXACT, kn


@pytest.mark.parametrize("shape", SHARED_SHAPES, ids=lambda s: "m{}_n{}_k{}_b{}".format(*s[:4]))
def test_shared_exponent_kernel_matches_model(shape):
    cfg = LutGemmConfig(*shape, shared_exp=True)
    x, planes, scales = shared_case(cfg, seed=sum(shape) + 1)
    y = run_int8(cfg, "avx512", x, planes, scales)
    assert rel(y, L.reference_int8(x, planes, scales, cfg)) < RTOL_MODEL
    assert rel(y, reference(x, planes, scales, cfg)) < RTOL_EXACT


def test_pass_picks_the_shared_exponent_kernel_and_counts_misses(caplog):
    """rewrite_matmuls(shared_exp=True) on AVX-512: a layer whose scales have the form gets the
    shared-exponent kernel; one without it keeps the per-term kernel, logged and counted; the
    module compiles for the AVX-512 target (compile-only: runs on any x86 host)."""
    from shiftadd_tvm.passes.lut_rewrite import PackedLinear, rewrite_matmuls
    from tvm.script import relax as R

    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((64, 128)).astype(np.float32) for _ in range(2))

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(
            x: R.Tensor((1, 128), "float32"),
            a: R.Tensor((64, 128), "float32"),
            b: R.Tensor((64, 128), "float32"),
        ):
            with R.dataflow():
                y = R.matmul(x, R.permute_dims(a, [1, 0]))
                z = R.matmul(x, R.permute_dims(b, [1, 0]))
                R.output(y, z)
            return y, z

    cfg = LutGemmConfig(1, 64, 128, 2, 64, 3)

    def quant(key, _w):
        _, planes, scales = (shared_case if key == "a" else random_case)(cfg, 1)
        return PackedLinear(planes, scales, 64, 128, 64)

    mod, rec = rewrite_matmuls(
        Mod, quant, params={"a": w1, "b": w2}, cpu_isa="avx512", shared_exp=True
    )
    shared = {n: i["config"].get("shared_exp", False) for n, i in rec.kernels.items()}
    assert sorted(shared.values()) == [False, True]
    assert rec.shared_exp_missed == 1 and "1 without a shared exponent" in rec.summary()
    with caplog.at_level(logging.WARNING, logger="shiftadd_tvm.passes.lut_rewrite"):
        _, rec2 = rewrite_matmuls(
            Mod, quant, params={"a": w1, "b": w2}, cpu_isa="avx512bw", shared_exp=True
        )
    assert all("shared_exp" not in i["config"] for i in rec2.kernels.values())  # needs VNNI
    assert rec2.shared_exp_missed == 2 and "2 without a shared exponent" in rec2.summary()
    assert "avx512bw (no VNNI) kernels apply them term by term" in caplog.text
    mod3, rec3 = rewrite_matmuls(
        Mod, quant, params={"a": w1, "b": w2}, cpu_isa="avx512bw", shared_exp=True, vnni=True
    )
    isas = sorted((i["isa"], i["config"].get("shared_exp", False)) for i in rec3.kernels.values())
    assert isas == [("avx512bw", False), ("avx512bw+vnni", True)]
    assert rec3.shared_exp_missed == 1
    from tvm import relax

    relax.build(mod, target=tvm.target.Target(TARGETS["avx512"]))
    relax.build(mod3, target=tvm.target.Target(TARGETS["avx512bw+vnni"]))


# ------------------------------------------------------- AVX-512 BW + VNNI: shared exponent
BW_SHARED_SHAPES = [
    (1, 64, 128, 2, 32, 1),
    (1, 70, 576, 3, 128, 3),  # ragged N, K = 576 with group 128
    (3, 100, 100, 4, 32, 3),  # ragged K, M = 3
    (8, 33, 256, 1, 64, 3),  # one bit, M = 8
    (8, 96, 192, 2, 64, 2),
    (2, 40, 256, 4, 128, 3),
    (4, 50, 168, 3, 64, 3),  # last group 40 of 64 columns (3 K-blocks of 16 looked up)
]


def test_one_thread_builds_tables_serially():
    """The default rule parallelizes the table build only when there are threads to share it (a
    parallel launch on one thread only adds its cost)."""
    cfg = LutGemmConfig(8, 576, 576, 3, 128, 3, shared_exp=True)
    assert not L.default_int8_knobs(cfg, "avx512bw", 1).build_parallel
    assert L.default_int8_knobs(cfg, "avx512bw", 2).build_parallel


@pytest.mark.skipif(bool(cpu_features.host_missing("int16")), reason="needs AVX-512 BW + VNNI")
@pytest.mark.parametrize("shape", BW_SHARED_SHAPES, ids=lambda s: "m{}_n{}_k{}_b{}".format(*s[:4]))
def test_avx512bw_shared_exponent_kernel_matches_model(shape):
    """The avx512bw shared-exponent kernel (planes in the bytes of one int32, weighted inside
    vpdpbusd) computes the shared-exponent model (the same integers as the per-term model)."""
    cfg = LutGemmConfig(*shape, shared_exp=True)
    x, planes, scales = shared_case(cfg, seed=sum(shape) + 2)
    y = run_int8(cfg, "avx512bw", x, planes, scales, target="avx512bw+vnni")
    assert rel(y, L.reference_int8(x, planes, scales, cfg)) < RTOL_MODEL
    assert rel(y, reference(x, planes, scales, cfg)) < RTOL_EXACT
    if cfg.m > 1:  # two rows per weight load
        y2 = run_int8(
            cfg,
            "avx512bw",
            x,
            planes,
            scales,
            L.Int8Knobs(2 if cfg.m % 2 == 0 else 1, 2, True),
            target="avx512bw+vnni",
        )
        assert rel(y2, y) < 1e-6


def test_avx512bw_shared_exponent_layout():
    """Packed bytes, decoded by the layout's definition (module docstring) one nibble at a time: 2
    nibbles per (row, quad) up to 2 bits (a zero plane at 1), 3 at 3 bits (chains of row blocks,
    two quads per lookup), 4 at 4; every (row, plane, quad) in exactly one nibble, an int32
    holding at most two row blocks in consecutive bytes, each with consecutive planes; per (row,
    group) one exponent word and the byte weights of the rows each lookup's int32s hold."""
    for bits, per, ql in ((1, 2, 1), (2, 2, 1), (3, 3, 2), (4, 4, 1)):
        cfg = LutGemmConfig(1, 70, 576, bits, 128, 3, shared_exp=True)
        _, planes, scales = shared_case(cfg, seed=bits)
        w, codes = L.pack_int8(planes, scales, cfg, "avx512bw")
        nt, kq = -(-cfg.n // L.ROWS), cfg.kp // 16
        assert (L.pd_planes(cfg), L.pd_quads(per)) == (per, ql)
        assert w.size == nt * L.ROWS * cfg.kp // 4 * per // 2  # one nibble per (row, quad, slot)
        assert codes.size == L.PAD + nt * cfg.groups * L.shared_words(cfg, "avx512bw")
        slots = L.pd_slots(per)
        lu = len(slots)
        assert lu == ql * per // 2
        assert sorted(sum(slots, [])) == [(v, b) for v in range(2 * ql) for b in range(per)]
        for j, sl in enumerate(slots):
            for part in range(1 if per == 4 else 2):
                v, first, count, plane = L.pd_parts(per, j, part)
                assert [sl[k] for k in range(first, first + count)] == [
                    (v, plane + i) for i in range(count)
                ]
        exps, c = L.shared_form(scales, cfg)
        folded = L._fold_signs(planes, c < 0, cfg)
        want = np.zeros((per, nt * L.ROWS, cfg.kp // 4), np.int64)
        want[:bits, : cfg.n] = L._nibbles(folded, cfg.n)
        got = np.full_like(want, -1)
        wb = w.reshape(nt, kq, per, 16, 4)  # [tile, K-block, vector, int32 (L, d), byte k]
        for n in range(2 * per):  # lookup n of a K-block: nibble n % 2 of vector n // 2
            u, j = divmod(n, lu)
            for i32 in range(16):
                lane, d = divmod(i32, 4)
                row = 4 * (lane // ql) + d  # within the row block
                for k, (v, b) in enumerate(slots[j]):
                    nib = (wb[:, :, n // 2, i32, k] >> (4 * (n % 2))) & 15  # [tile, K-block]
                    r = np.arange(nt)[:, None] * L.ROWS + 16 // ql * v + row
                    q = 4 * np.arange(kq)[None, :] + u * ql + lane % ql
                    assert (got[b, r, q] == -1).all()  # each nibble once
                    got[b, r, q] = nib
        assert np.array_equal(got, want)
        mult = codes[L.PAD :].reshape(nt, cfg.groups, -1)[..., L.ROWS :].view(np.uint8)
        mult = mult.reshape(nt, cfg.groups, lu, 16 // ql, 4)  # [tile, group, j, int32, k]
        for j, sl in enumerate(slots):
            for i32 in range(16 // ql):  # the stored lanes: 0-3 (one quad), 0 and 2 (two)
                lane, d = divmod(i32, 4)
                row = 4 * lane + d
                for k, (v, b) in enumerate(sl):
                    r = 16 // ql * v + row
                    if b < bits and r < cfg.n:
                        assert np.array_equal(mult[0, :, j, i32, k], np.abs(c[b, r]))


def test_avx512bw_shared_exponent_kernel_asm():
    """Compile-only (any x86 host): in-lane vpshufb lookups into vpdpbusd, no VBMI vpermb, and one
    masked exponent add per 16 rows and group, at every bit width."""
    for bits in (2, 3, 4):
        cfg = LutGemmConfig(1, 256, 512, bits, 128, 3, shared_exp=True)
        func = L.make_int8_primfunc(cfg, None, "avx512bw")
        target = tvm.target.Target(TARGETS["avx512bw+vnni"])
        asm = tvm.compile(tvm.IRModule({"k": func}), target=target).mod.inspect_source("asm")
        assert "vpermb" not in asm and "vpshufb" in asm and "vpdpbusd" in asm
        assert len(re.findall(r"\bvpaddw\b.*\{%k", asm)) == 2
