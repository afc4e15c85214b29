"""Minimal runtime: fresh process without torch/compiler, input validation, artifact integrity."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import TINY_SEQ

import shiftadd_tvm
from shiftadd_tvm.errors import ArtifactError, InputError

FRESH = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import shiftadd_tvm.runtime as r
    rt = r.load(sys.argv[1])
    ids = np.arange(12, dtype=np.int64)[None] % 256
    out = rt(ids)
    np.save(sys.argv[2], out)
    maps = open("/proc/self/maps").read()
    print(json.dumps({
        "torch": "torch" in sys.modules,
        "transformers": "transformers" in sys.modules,
        "tvm": "tvm" in sys.modules,
        "compiler_lib": "libtvm_compiler" in maps,
        "runtime_lib": "libtvm_runtime" in maps,
        "shape": list(out.shape),
    }))
    """
)


def test_runtime_in_fresh_process_without_torch_or_compiler(tiny_artifact, tmp_path):
    _, path = tiny_artifact
    out_file = tmp_path / "out.npy"
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(path), str(out_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {
        "torch": False,
        "transformers": False,
        "tvm": False,
        "compiler_lib": False,
        "runtime_lib": True,
        "shape": [1, 12, 256],
    }
    in_proc = shiftadd_tvm.runtime.load(path)(np.arange(12, dtype=np.int64)[None] % 256)
    np.testing.assert_array_equal(np.load(out_file), in_proc)


@pytest.fixture(scope="module")
def rt(tiny_artifact):
    return shiftadd_tvm.runtime.load(tiny_artifact[1])


@pytest.mark.parametrize(
    "ids,match",
    [
        (np.zeros((1, 4), np.float32), "integer token ids"),
        (np.zeros((1, 2, 3), np.int64), r"\[batch, seq\]"),
        (np.zeros((1, 0), np.int64), "empty"),
        (np.zeros((1, TINY_SEQ + 1), np.int64), "longer than"),
        (np.array([[1, 2, 256]]), r"\[0, 256\)"),
        (np.array([[-1, 2]]), r"\[0, 256\)"),
    ],
)
def test_bad_inputs_rejected(rt, ids, match):
    with pytest.raises(InputError, match=match):
        rt(ids)


def test_non_contiguous_and_int32_inputs_are_copied(rt):
    base = np.random.default_rng(0).integers(0, 256, (2, 20))
    view = base[:, ::2]  # non-contiguous, 10 tokens
    np.testing.assert_array_equal(rt(view), rt(np.ascontiguousarray(view)))
    np.testing.assert_array_equal(rt(view.astype(np.int32)), rt(np.ascontiguousarray(view)))
    np.testing.assert_array_equal(rt(view[0]), rt(view[:1]))


def _corrupt(src, dst, fn):
    data = bytearray(src.read_bytes())
    dst.write_bytes(bytes(fn(data)))
    return dst


@pytest.mark.parametrize(
    "how,match",
    [
        ("flip_library_byte", "checksum"),
        ("truncate", "no shiftadd-tvm manifest"),
        ("bad_length", "corrupt manifest"),
        ("tiny", "too small"),
        ("not_artifact", "no shiftadd-tvm manifest"),
    ],
)
def test_corrupt_artifacts_refused(tiny_artifact, tmp_path, how, match):
    _, path = tiny_artifact

    def mutate(d):
        if how == "flip_library_byte":
            d[len(d) // 3] ^= 0xFF
        elif how == "truncate":
            del d[-100:]
        elif how == "bad_length":
            d[-16:-8] = (10**9).to_bytes(8, "little")
        elif how == "tiny":
            d = d[:10]
        elif how == "not_artifact":
            d = bytearray(b"\x7fELF" + b"\0" * 4096)
        return d

    bad = _corrupt(path, tmp_path / "bad.so", mutate)
    with pytest.raises(ArtifactError, match=match):
        shiftadd_tvm.runtime.load(bad)


def test_missing_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        shiftadd_tvm.runtime.load(tmp_path / "nope.so")


def _rewrite_manifest(data: bytes, edit) -> bytes:
    import hashlib

    n = int.from_bytes(data[-16:-8], "little")
    man = json.loads(data[-48 - n : -48])
    edit(man)
    blob = json.dumps(man).encode()
    return (
        data[: -48 - n]
        + blob
        + hashlib.sha256(blob).digest()
        + len(blob).to_bytes(8, "little")
        + data[-8:]
    )


def test_manifest_version_mismatch(tiny_artifact, tmp_path):
    _, path = tiny_artifact
    bad = tmp_path / "v99.so"
    bad.write_bytes(_rewrite_manifest(path.read_bytes(), lambda m: m.update(version=99)))
    with pytest.raises(ArtifactError, match="version 99"):
        shiftadd_tvm.runtime.load(bad)


def test_edited_manifest_refused(tiny_artifact, tmp_path):
    """A manifest edited in place (seq_len 16 -> 96) fails the manifest checksum."""
    _, path = tiny_artifact
    data = bytearray(path.read_bytes())
    i = data.rfind(b'"seq_len": 16')
    assert i > 0
    data[i + 11 : i + 13] = b"96"
    bad = tmp_path / "edited.so"
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        shiftadd_tvm.runtime.load(bad)


def test_cuda_artifact_refused_without_gpu(tiny_artifact, tmp_path):
    _, path = tiny_artifact
    bad = tmp_path / "cuda.so"
    bad.write_bytes(
        _rewrite_manifest(path.read_bytes(), lambda m: m.update(target={"kind": "cuda"}))
    )
    with pytest.raises(ArtifactError, match="no NVIDIA GPU"):
        shiftadd_tvm.runtime.load(bad)


def test_artifact_for_missing_cpu_features_refused(tiny_artifact, tmp_path):
    _, path = tiny_artifact
    bad = tmp_path / "cpu.so"
    edit = lambda m: m.update(cpu_features=["avx512f", "amx_tile_not_here"])  # noqa: E731
    bad.write_bytes(_rewrite_manifest(path.read_bytes(), edit))
    with pytest.raises(ArtifactError, match="amx_tile_not_here"):
        shiftadd_tvm.runtime.load(bad)


def test_misaligned_input_is_copied(rt):
    buf = np.zeros(8 * 12 + 4, dtype=np.uint8)
    view = buf[4:].view(np.int64)  # 4-byte misaligned int64 array
    view[:] = np.arange(12) % 256
    assert view.ctypes.data % 8 != 0
    np.testing.assert_array_equal(rt(view[None]), rt(np.arange(12)[None] % 256))


def test_runtime_sizes_the_thread_pool_to_the_usable_cpus():
    """Unset, TVM would take half the logical CPUs on x86 (one thread on a 2-vCPU machine)."""
    import os
    import subprocess
    import sys

    code = (
        "import os\n"
        "from shiftadd_tvm import runtime\n"
        "n = runtime.default_threads()\n"
        "runtime._load_runtime_lib(runtime.runtime_library_path())\n"
        "ffi = runtime._import_tvm_ffi()\n"
        "print(n, int(ffi.get_global_func('runtime.NumThreads')()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    cpus = len(os.sched_getaffinity(0))
    assert [int(v) for v in out] == [cpus, cpus]
    env["TVM_NUM_THREADS"] = "1"  # the user's choice wins
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert [int(v) for v in out] == [1, 1]
