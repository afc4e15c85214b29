"""CUDA builds: device code compiled ahead of time with nvcc, so GPU machines need no compiler.

TVM 0.27's ``tvm.compile`` for CUDA stores the kernels' CUDA *source* in the module and compiles it
when the module is loaded, through a Python callback (``tvm_callback_cuda_compile``) that needs the
TVM compiler package and nvcc or NVRTC on the GPU machine. We compile that source here with nvcc
into a fatbin (SASS for the target's arch plus PTX for newer GPUs) and store it in the artifact's
manifest, keyed by the SHA-256 of the source; ``shiftadd_tvm.runtime`` registers a callback that
hands TVM the stored fatbin for exactly that source (and refuses any other source).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import time

from .errors import ConfigError

log = logging.getLogger(__name__)


def cuda_sources(module) -> list[str]:
    """CUDA source of every CUDA module imported (at any depth) by a built runtime module."""
    out, stack, seen = [], [module], set()
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if m.kind == "cuda":
            out.append(m.inspect_source())
        stack.extend(m.imports)
    return out


def nvcc_available() -> bool:
    return shutil.which("nvcc") is not None


def compile_fatbin(source: str, arch: str) -> bytes:
    """nvcc: CUDA source -> fatbin with SASS for ``arch`` and PTX of the same compute level."""
    from tvm.support import nvcc

    if not nvcc_available():
        raise ConfigError(
            "nvcc was not found on PATH: the CUDA target compiles its kernels ahead of time; "
            "install the CUDA toolkit (nvcc) or compile for target 'llvm'"
        )
    num = arch.removeprefix("sm_")
    virt = num.rstrip("a")
    flags = [
        "-gencode",
        f"arch=compute_{num},code=sm_{num}",
        "-gencode",
        f"arch=compute_{virt},code=compute_{virt}",
    ]
    import tvm

    # TVM passes --use_fast_math to nvcc unless told not to; fast powf(x, 2) is exp2(2 log2 x),
    # NaN for every negative x (RMSNorm's square of the hidden state turned the whole model NaN)
    saved = os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH")
    os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = "1"
    try:
        with tvm.target.Target({"kind": "cuda", "arch": arch}):  # nvcc.py reads the target
            fat = nvcc.compile_cuda(source, target_format="fatbin", arch=flags, compiler="nvcc")
    finally:
        if saved is None:
            del os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"]
        else:
            os.environ["TVM_CUDA_NVCC_NO_FAST_MATH"] = saved
    return bytes(fat)


def cuda_images(executable, arch: str) -> list[dict]:
    """Compile every CUDA module of ``executable`` (a ``tvm.compile`` result) to a fatbin; the
    manifest entries that ``shiftadd_tvm.runtime`` serves back at load time."""
    images = []
    for src in cuda_sources(executable.mod):
        t0 = time.time()
        fat = compile_fatbin(src, arch)
        images.append(
            {
                "source_sha256": hashlib.sha256(src.encode("utf-8")).hexdigest(),
                "arch": arch,
                "fatbin_sha256": hashlib.sha256(fat).hexdigest(),
                "fatbin_b64": base64.b64encode(fat).decode("ascii"),
            }
        )
        log.info(
            "nvcc: %d bytes of CUDA source -> %d-byte fatbin for %s in %.1fs",
            len(src),
            len(fat),
            arch,
            time.time() - t0,
        )
    if not images:
        raise RuntimeError("the CUDA build produced no CUDA module")
    return images
