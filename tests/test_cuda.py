"""CUDA target, compile-only (no GPU here): layouts, kernel build + nvcc, model artifact, bundle.

Numerical checks of the CUDA kernels run on a GPU machine: ``bash scripts/gpu_check.sh``.
"""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SEQ, tiny_llama
from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig, reference
from shiftadd_tvm.schedules.lut_gemm_cuda import (
    CudaKnobs,
    candidate_cuda_knobs,
    make_cuda_primfunc,
    reference_cuda,
)
from shiftadd_tvm.schedules.packing import (
    encode_terms,
    pack_planes,
    planes_to_cuda,
    scales_to_cuda,
)

import shiftadd_tvm
from shiftadd_tvm.errors import ArtifactError, ConfigError
from shiftadd_tvm.tuning import tuned_cuda_knobs

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")


def _random(cfg, seed):
    rng = np.random.default_rng(seed)
    g = -(-cfg.k // cfg.group_size)
    codes = rng.random((cfg.bits, cfg.n, cfg.k)) < 0.5
    scales = encode_terms(
        rng.choice([-1, 0, 1], (cfg.bits, cfg.n, g, cfg.terms)),
        rng.integers(-8, -2, (cfg.bits, cfg.n, g, cfg.terms)),
    )
    x = rng.standard_normal((cfg.m, cfg.k)).astype(np.float32)
    return x, pack_planes(codes, cfg.group_size), scales


@pytest.mark.parametrize(
    "m,n,k,bits,gs", [(1, 33, 200, 3, 64), (3, 96, 576, 2, 128), (2, 5, 32, 4, 32)]
)
def test_cuda_layouts_mean_the_same_weights(m, n, k, bits, gs):
    cfg = LutGemmConfig(m, n, k, bits, gs, 3)
    x, planes, scales = _random(cfg, seed=n + k)
    pc, sc = planes_to_cuda(planes), scales_to_cuda(scales)
    assert pc.dtype == np.uint32 and pc.shape == (bits, cfg.kp // 32, n)
    assert sc.shape == (bits, cfg.groups, 3, n)
    # word w of row n holds columns 32w..32w+31, bit i = column 32w + i
    bit = (pc[:, :, :] >> np.uint32(5)) & 1  # column 32w + 5
    np.testing.assert_array_equal(bit.transpose(0, 2, 1), (planes[:, :, ::4] >> 5) & 1)
    np.testing.assert_allclose(reference_cuda(x, pc, sc, cfg), reference(x, planes, scales, cfg))


def test_cuda_layout_rejects_partial_words():
    with pytest.raises(ValueError, match="multiple of 32"):
        planes_to_cuda(np.zeros((2, 4, 2), np.uint8))


def test_cuda_knobs_validated_and_searched():
    cfg = LutGemmConfig(1, 4096, 4096, 3, 128, 3)
    with pytest.raises(ValueError, match="shared memory"):
        CudaKnobs(k_slices=32).validate(cfg)
    cands = candidate_cuda_knobs(cfg)
    assert [c.k_slices for c in cands] == [16, 2, 4, 8]  # default first: most warps that fit
    batched = candidate_cuda_knobs(LutGemmConfig(128, 4096, 4096, 3, 128, 3))
    assert batched[0] == CudaKnobs(dense="float16")  # default rule from M=64 on
    assert {c.dense for c in batched} == {"", "float16", "float32"}
    small = LutGemmConfig(1, 64, 200, 2, 64, 3)  # 4 groups: never more warps than groups
    assert max(c.k_slices for c in candidate_cuda_knobs(small)) == 4


def test_tuning_records_exact_nearest_and_default():
    rec = {
        LutGemmConfig(1, 576, 1536, 3, 128, 3).to_json(): CudaKnobs(12),
        LutGemmConfig(128, 576, 1536, 3, 128, 3).to_json(): CudaKnobs(dense="float32"),
    }
    assert tuned_cuda_knobs(LutGemmConfig(1, 576, 1536, 3, 128, 3), rec) == (CudaKnobs(12), "tuned")
    kn, how = tuned_cuda_knobs(LutGemmConfig(512, 576, 1536, 3, 128, 3), rec)
    assert kn == CudaKnobs(dense="float32") and how == "tuned at M=128"
    kn, how = tuned_cuda_knobs(LutGemmConfig(4, 576, 1536, 3, 128, 3), rec)
    assert kn == CudaKnobs(12) and how == "tuned at M=1"
    # only M=1 measured: M=512 is another regime (LUT vs dequantize + GEMM), so the default rule
    kn, how = tuned_cuda_knobs(
        LutGemmConfig(512, 576, 1536, 3, 128, 3), dict(list(rec.items())[:1])
    )
    assert how.startswith("default") and kn.dense == "float16"
    kn, how = tuned_cuda_knobs(LutGemmConfig(1, 64, 64, 3, 32, 3), rec)
    assert how.startswith("default") and kn.k_slices == 2


@needs_nvcc
def test_cuda_kernel_builds_for_ragged_shapes_and_both_archs():
    import tvm

    from shiftadd_tvm.cuda_build import compile_fatbin, cuda_sources

    cfgs = [LutGemmConfig(3, 70, 200, 3, 64, 3), LutGemmConfig(1, 576, 576, 2, 128, 2)]
    mod = tvm.IRModule(
        {c.name: make_cuda_primfunc(c).with_attr("global_symbol", c.name) for c in cfgs}
    )
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    (src,) = cuda_sources(ex.mod)
    for c in cfgs:
        assert f"{c.name}_kernel" in src
    assert "__shared__" in src and "__syncthreads" in src
    for arch in ("sm_80", "sm_90"):
        fat = compile_fatbin(src, arch)
        assert len(fat) > 1000


@needs_nvcc
def test_compile_tiny_model_for_cuda(tmp_path):
    calib = np.random.default_rng(0).integers(0, 256, (2, TINY_SEQ))
    # intermediate 192: the rotation's add/subtract Hadamard (blocks of 64) runs on the GPU too
    art = shiftadd_tvm.compile(
        tiny_llama(intermediate=192), target="cuda", bits=3, group_size=32, seq_len=TINY_SEQ,
        calib_ids=calib, method="bcq", progress=False, rotate=True,  # bcq: off unless asked
    )  # fmt: skip
    m = art.manifest
    assert m["target"] == {"kind": "cuda", "arch": "sm_90", "host": {"kind": "llvm"}}
    assert m["rotation"] == {"seed": 0, "down_block": 64}
    assert m["rewrite"]["rewritten"] == 14 and m["rewrite"]["dense_fallbacks"] == 0
    kinds = [k["kind"] for k in m["rewrite"]["kernels"].values()]
    # dense: the head and the rotation's mix matrix
    assert kinds.count("lut-cuda") == 4 and kinds.count("dense") == 2
    (img,) = m["cuda_images"]
    from shiftadd_tvm.cuda_build import cuda_sources

    (src,) = cuda_sources(art.executable.mod)
    # the online Hadamard: one kernel (retargeted for CUDA: a thread block per row, shared memory)
    assert f"hadamard_r{TINY_SEQ}_n192_b64_kernel" in src
    path = art.export(tmp_path / "tiny_cuda.so")
    manifest = shiftadd_tvm.runtime.read_manifest(path)
    assert manifest["cuda_images"][0]["fatbin_sha256"] == img["fatbin_sha256"]
    import hashlib

    blob = path.read_bytes()
    # the library holds the CUDA source whose fatbin the manifest carries (served at load time)
    start = blob.find(b"#ifdef __CUDACC_RTC__")
    assert start > 0
    n = int.from_bytes(blob[start - 9 : start - 1], "little")  # u64 length before "\n#ifdef"
    src = blob[start - 1 : start - 1 + n]
    assert hashlib.sha256(src).hexdigest() == img["source_sha256"]
    for name, k in m["rewrite"]["kernels"].items():
        assert (f"{name}_cuda_kernel" if k["kind"] == "lut-cuda" else name).encode() in src
    if not any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0")):
        with pytest.raises(ArtifactError, match="no NVIDIA GPU"):
            shiftadd_tvm.runtime.load(path)


@pytest.mark.parametrize(
    "target,kw,match",
    [
        ('{"kind": "cuda", "arch": "sm_20"}', {}, "unsupported CUDA arch"),
        ("cuda", {"group_size": 16}, "multiple of 32"),
    ],
)
def test_cuda_bad_options(target, kw, match):
    with pytest.raises(ConfigError, match=match):
        shiftadd_tvm.compile(tiny_llama(), target=target, calibration=None, progress=False, **kw)


BUNDLED = textwrap.dedent(
    """
    import importlib.metadata as im, json, sys
    import numpy as np
    # a machine without the compiler has no apache-tvm-ffi installed: hide this venv's copy (tvm_ffi
    # looks its library up through the installed distribution first)
    _dist = im.distribution
    def hidden(name):
        if name == "apache-tvm-ffi":
            raise im.PackageNotFoundError(name)
        return _dist(name)
    im.distribution = hidden
    sys.path.insert(0, sys.argv[1] + "/python")
    import shiftadd_tvm.runtime as r
    assert r.__file__.startswith(sys.argv[1]), r.__file__
    rt = r.load(sys.argv[1] + "/tiny.so")
    out = rt(np.arange(12, dtype=np.int64)[None] % 256)
    np.save(sys.argv[2], out)
    maps = open("/proc/self/maps").read()
    libs = sorted({l.split()[-1] for l in maps.splitlines() if "libtvm" in l})
    print(json.dumps({"tvm": "tvm" in sys.modules, "libs": libs}))
    """
)


def test_bundle_runs_without_the_compiler(tiny_artifact, tmp_path):
    """`shiftadd-tvm bundle`: the artifact runs from the folder alone (its runtime, its libs)."""
    from shiftadd_tvm.cli import main

    _, path = tiny_artifact
    bundle = tmp_path / "bundle"
    assert main(["bundle", str(path), "--out", str(bundle)]) == 0
    assert (bundle / "tvm_runtime" / "libtvm_runtime.so").is_file()
    assert not (bundle / "tvm_runtime" / "libtvm_runtime_cuda.so").exists()  # CPU artifact
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size < 64 * 2**20
    out = tmp_path / "out.npy"
    proc = subprocess.run(
        [sys.executable, "-c", BUNDLED, str(bundle), str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["tvm"] is False
    assert info["libs"] and all(lib.startswith(str(bundle)) for lib in info["libs"]), info
    ref = shiftadd_tvm.runtime.load(path)(np.arange(12, dtype=np.int64)[None] % 256)
    np.testing.assert_array_equal(np.load(out), ref)


@pytest.mark.parametrize("dense", ["float16", "float32"])
def test_pass_emits_dequantize_and_gemm_for_large_m(dense):
    """With dense knobs the CUDA rewrite emits dequantize (call_tir) + a dense matmul per weight."""
    from shiftadd_tvm.passes.lut_rewrite import PackedLinear, rewrite_matmuls

    from shiftadd_tvm.compiler import import_torch

    imp = import_torch(tiny_llama(), None, TINY_SEQ, None, None, False, False)

    def quantize(key, w):
        if key not in imp.candidates:
            return "head"
        cfg = LutGemmConfig(1, w.shape[0], w.shape[1], 2, 32, 3)
        _, planes, scales = _random(cfg, seed=1)
        return PackedLinear(planes, scales, cfg.n, cfg.k, 32)

    mod, rec = rewrite_matmuls(
        imp.mod, quantize, params=imp.params, target_kind="cuda",
        cuda_knobs=lambda cfg: (CudaKnobs(dense=dense), "test"),
    )  # fmt: skip
    assert len(rec.rewritten) == 14
    assert {k["kind"] for k in rec.kernels.values()} == {"dequant+gemm", "dense"}  # dense: head
    text = mod.script(show_meta=False)
    assert text.count("R.call_tir(") == 15  # 14 dequantize + the head's dense kernel
    assert text.count('out_dtype="float32"') >= 14
    # float16: activations cast once per rewritten matmul; float32: no half-precision anywhere
    f16 = text.count('dtype="float16"')
    assert f16 >= 14 if dense == "float16" else f16 == 0


@needs_nvcc
def test_dequantize_kernel_builds():
    import tvm
    from shiftadd_tvm.schedules.lut_gemm_cuda import make_dequant_primfunc

    from shiftadd_tvm.cuda_build import cuda_sources

    cfg = LutGemmConfig(64, 70, 200, 3, 64, 3)
    f = make_dequant_primfunc(cfg, "float16")
    ex = tvm.compile(
        tvm.IRModule({"dq": f}), target=tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    )
    src = cuda_sources(ex.mod)[0]
    assert "half* __restrict__ wt_ptr" in src and "<< 23" in src  # exponent bits, no multiply
