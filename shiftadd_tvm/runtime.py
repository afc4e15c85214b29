"""Minimal runtime: load an exported artifact and run it.

Needs only numpy, ``apache-tvm-ffi`` and ``libtvm_runtime.so`` (3 MB, from the installed
``apache-tvm`` wheel, a deployment bundle, or ``$SHIFTADD_TVM_RUNTIME_LIB``). It never imports
torch, transformers or the TVM compiler library.

Artifact file layout (``Artifact.export``): ``<shared library> <manifest JSON> <32-byte SHA-256 of
the JSON> <u64 LE length of the JSON> <8-byte magic b"SHADDTVM">``. The manifest records the
library's byte length and SHA-256; a file whose trailer, manifest checksum, length or library
checksum does not match is refused before anything is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import ArtifactError, InputError

TRAILER_MAGIC = b"SHADDTVM"
TRAILER_BYTES = 32 + 8 + 8  # sha256(manifest) + u64 manifest length + magic
ARTIFACT_FORMAT = "shiftadd-tvm-artifact"
KERNELS_FORMAT = "shiftadd-tvm-kernels"  # a library of kernels without a model (gpu_check)
SUPPORTED_VERSIONS = (1,)
_KDL_CPU = 1
_KDL_CUDA = 2
_POOLED_ALLOCATOR = 2

_tvm_ffi = None


def host_cpu_flags() -> set[str] | None:
    """The CPU flags of this machine from /proc/cpuinfo (None where that file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def check_host(manifest: dict, path: Path) -> None:
    """Refuse an artifact this machine cannot run (a clear error instead of SIGILL or a crash)."""
    kind = manifest.get("target", {}).get("kind")
    if kind == "cuda" and not any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl")):
        raise ArtifactError(
            f"'{path}' was compiled for CUDA but this machine has no NVIDIA GPU; run it on a GPU "
            "machine or recompile with --target llvm"
        )
    need = manifest.get("cpu_features") or []
    flags = host_cpu_flags()
    if need and flags is not None:
        # /proc/cpuinfo spells a few LLVM feature names differently
        alias = {"avx512vnni": "avx512_vnni", "avx512vbmi": "avx512vbmi"}
        missing = [f for f in need if f not in flags and alias.get(f, f) not in flags]
        if missing:
            raise ArtifactError(
                f"'{path}' was compiled for CPU '{manifest['target'].get('mcpu')}' and needs "
                f"{missing}, which this CPU lacks; recompile here with --target llvm"
            )


def _import_tvm_ffi():
    """Import tvm_ffi without letting it import torch (it tries to, for a DLPack fast path)."""
    global _tvm_ffi
    if _tvm_ffi is None:
        blocked = "torch" not in sys.modules
        if blocked:
            sys.modules["torch"] = None  # makes `import torch` raise ImportError inside tvm_ffi
        try:
            import tvm_ffi
        finally:
            if blocked and sys.modules.get("torch", 0) is None:
                del sys.modules["torch"]
        _tvm_ffi = tvm_ffi
    return _tvm_ffi


def runtime_library_path(artifact: Path | None = None) -> Path:
    """Locate libtvm_runtime.so: env override, a bundle beside the artifact, or the apache-tvm wheel."""
    env = os.environ.get("SHIFTADD_TVM_RUNTIME_LIB")
    if env:
        if not Path(env).is_file():
            raise ArtifactError(f"SHIFTADD_TVM_RUNTIME_LIB={env} does not exist")
        return Path(env)
    if artifact is not None:
        bundled = artifact.parent / "tvm_runtime" / "libtvm_runtime.so"
        if bundled.is_file():
            return bundled
    spec = importlib.util.find_spec("tvm")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        lib = Path(list(spec.submodule_search_locations)[0]) / "lib" / "libtvm_runtime.so"
        if lib.is_file():
            return lib
    raise ArtifactError(
        "libtvm_runtime.so not found: install apache-tvm==0.27.0.post1, or set "
        "SHIFTADD_TVM_RUNTIME_LIB to its path"
    )


_loaded_runtime: dict[str, ctypes.CDLL] = {}
_cuda_images: dict[str, bytes] = {}  # sha256 of CUDA source -> fatbin compiled ahead of time


def _load_runtime_lib(path: Path) -> None:
    key = str(path.resolve())
    if not _loaded_runtime:
        _import_tvm_ffi()  # libtvm_ffi.so first: libtvm_runtime.so links against it
        _loaded_runtime[key] = ctypes.CDLL(key, mode=ctypes.RTLD_GLOBAL)


def _load_cuda_runtime(runtime_lib: Path) -> None:
    """libtvm_runtime_cuda.so (beside libtvm_runtime.so) and the CUDA runtime it links against
    (``libcudart.so.13``: from the bundle if it has one, else the system's)."""
    cuda_lib = runtime_lib.parent / "libtvm_runtime_cuda.so"
    if str(cuda_lib.resolve()) in _loaded_runtime:
        return
    if not cuda_lib.is_file():
        raise ArtifactError(
            f"{cuda_lib} not found: a CUDA artifact needs libtvm_runtime_cuda.so beside "
            "libtvm_runtime.so (use a bundle from `shiftadd-tvm bundle`)"
        )
    cudart = runtime_lib.parent / "libcudart.so.13"
    candidates = [str(cudart)] if cudart.is_file() else []
    candidates += ["libcudart.so.13", "/usr/local/cuda/lib64/libcudart.so.13"]
    errors = []
    for cand in candidates:
        try:
            _loaded_runtime[cand] = ctypes.CDLL(cand, mode=ctypes.RTLD_GLOBAL)
            break
        except OSError as e:
            errors.append(str(e))
    else:
        raise ArtifactError(
            "the CUDA runtime libcudart.so.13 was not found (" + "; ".join(errors) + "): use a "
            "bundle from `shiftadd-tvm bundle`, which carries it"
        )
    try:
        _loaded_runtime[str(cuda_lib.resolve())] = ctypes.CDLL(
            str(cuda_lib), mode=ctypes.RTLD_GLOBAL
        )
    except OSError as e:
        raise ArtifactError(f"cannot load {cuda_lib} (NVIDIA driver missing?): {e}") from e
    ffi = _import_tvm_ffi()

    def serve_fatbin(code, *_args):
        digest = hashlib.sha256(str(code).encode("utf-8")).hexdigest()
        fat = _cuda_images.get(digest)
        if fat is None:
            raise RuntimeError(
                f"no precompiled fatbin for CUDA source {digest[:12]}: the artifact is not from "
                "`shiftadd-tvm compile --target cuda`, or it is corrupt; recompile it"
            )
        return fat

    # TVM compiles a module's CUDA source when the module is loaded, through this callback; ours
    # answers with the fatbin nvcc built at compile time (no compiler on the GPU machine)
    ffi.register_global_func("tvm_callback_cuda_compile", serve_fatbin, override=True)


def _register_cuda_images(manifest: dict, path: Path) -> None:
    import base64

    images = manifest.get("cuda_images") or []
    if not images:
        raise ArtifactError(f"'{path}' targets CUDA but carries no compiled device code")
    for img in images:
        fat = base64.b64decode(img["fatbin_b64"])
        if hashlib.sha256(fat).hexdigest() != img["fatbin_sha256"]:
            raise ArtifactError(f"'{path}' has a corrupt CUDA fatbin; re-export the artifact")
        _cuda_images[img["source_sha256"]] = fat


def default_threads() -> int:
    """Size TVM's CPU thread pool to every CPU this process may use, unless the user chose.

    TVM creates its pool once per process, at the first parallel call, with ``TVM_NUM_THREADS``
    workers; unset, it takes half the logical CPUs on x86 (it assumes hyper-threads), which is one
    thread on a 2-vCPU machine: the kernels' parallel loops would silently run on one core. Set
    ``TVM_NUM_THREADS`` yourself to use fewer. Returns the count in effect (if the pool already
    exists, the value it was created with wins)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return int(os.environ.setdefault("TVM_NUM_THREADS", str(cpus)))


def load_libraries(manifest: dict, path: Path):
    """Load what running ``path`` needs (TVM runtime, CUDA parts for a CUDA artifact); returns
    the device (type, id) its code runs on."""
    default_threads()
    lib = runtime_library_path(path)
    _load_runtime_lib(lib)
    if manifest.get("target", {}).get("kind") == "cuda":
        _load_cuda_runtime(lib)
        _register_cuda_images(manifest, path)
        return (_KDL_CUDA, 0)
    return (_KDL_CPU, 0)


def read_manifest(path: str | os.PathLike, verify: bool = True, fmt: str = ARTIFACT_FORMAT) -> dict:
    """The manifest of an artifact file; with ``verify`` also checks the library checksum."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"artifact '{p}' does not exist; create it with `shiftadd-tvm compile`")
    size = p.stat().st_size
    with open(p, "rb") as f:
        if size < TRAILER_BYTES:
            raise ArtifactError(f"'{p}' is too small to be an artifact ({size} bytes): truncated?")
        f.seek(size - TRAILER_BYTES)
        tail = f.read(TRAILER_BYTES)
        if tail[-8:] != TRAILER_MAGIC:
            raise ArtifactError(
                f"'{p}' has no shiftadd-tvm manifest (truncated, or not made by `shiftadd-tvm compile`)"
            )
        digest, n = tail[:32], int.from_bytes(tail[32:40], "little")
        if n <= 0 or n > size - TRAILER_BYTES:
            raise ArtifactError(
                f"'{p}' has a corrupt manifest length ({n}); re-export the artifact"
            )
        f.seek(size - TRAILER_BYTES - n)
        blob = f.read(n)
        if hashlib.sha256(blob).digest() != digest:
            raise ArtifactError(
                f"'{p}' has a corrupt manifest (checksum mismatch); re-export the artifact"
            )
        try:
            manifest = json.loads(blob.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(
                f"'{p}' has a corrupt manifest ({e}); re-export the artifact"
            ) from e
        formats = (fmt,) if isinstance(fmt, str) else fmt
        if not isinstance(manifest, dict) or manifest.get("format") not in formats:
            raise ArtifactError(
                f"'{p}' is not a shiftadd-tvm {' or '.join(formats)} file "
                f"(format {manifest.get('format')!r})"
            )
        if manifest.get("version") not in SUPPORTED_VERSIONS:
            raise ArtifactError(
                f"'{p}' has artifact version {manifest.get('version')}, this runtime reads "
                f"{SUPPORTED_VERSIONS}; recompile it or update shiftadd-tvm"
            )
        body_len = manifest.get("library_bytes")
        if body_len != size - TRAILER_BYTES - n:
            raise ArtifactError(
                f"'{p}' library length {size - TRAILER_BYTES - n} differs from the manifest's {body_len}: the file is corrupt"
            )
        if verify:
            f.seek(0)
            h = hashlib.sha256()
            remaining = body_len
            while remaining:
                chunk = f.read(min(1 << 22, remaining))
                if not chunk:
                    break
                h.update(chunk)
                remaining -= len(chunk)
            if h.hexdigest() != manifest.get("library_sha256"):
                raise ArtifactError(f"'{p}' fails its checksum: the file is corrupt; re-export it")
    return manifest


def _aligned(shape: tuple[int, ...], dtype, align: int = 64) -> np.ndarray:
    """A zeroed array whose data pointer is ``align``-byte aligned (TVM kernels require it)."""
    dt = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dt.itemsize
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + nbytes].view(dt).reshape(shape)


class Runtime:
    """A loaded artifact: ``rt(input_ids)`` -> logits ``float32[batch, seq, vocab]``."""

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify)
        check_host(self.manifest, self.path)
        self._device = load_libraries(self.manifest, self.path)
        ffi = _import_tvm_ffi()
        try:
            lib = ffi.load_module(str(self.path.resolve()))
            self._vm = lib["vm_load_executable"]()
            init = [*self._device, _POOLED_ALLOCATOR]
            if self._device[0] != _KDL_CPU:
                init += [_KDL_CPU, 0, _POOLED_ALLOCATOR]  # the host device comes last
            self._vm["vm_initialization"](*init)
            self._main = self._vm["main"]
        except Exception as e:
            raise ArtifactError(f"TVM could not load '{self.path}': {e}") from e
        self._lib = lib
        self.seq_len = int(self.manifest["input"]["seq_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self._ids = _aligned((1, self.seq_len), np.int64)
        self._ffi = ffi
        self._gpu_ids = self._gpu_logits = None
        if self._device[0] != _KDL_CPU:
            alloc = ffi.get_global_func("runtime.TVMTensorAllocWithScope")
            dev = ffi.device("cuda", self._device[1])
            self._copy = ffi.get_global_func("runtime.TVMTensorCopyFromTo")
            self._gpu_ids = alloc(ffi.Shape((1, self.seq_len)), ffi.dtype("int64"), dev, None)
            self._logits = _aligned((1, self.seq_len, self.vocab_size), np.float32)

    def _check(self, input_ids, longest: int | None = None) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.dtype.kind not in "iu":
            raise InputError(f"input_ids must be integer token ids, got dtype {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, seq] (or [seq]), got shape {ids.shape}")
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise InputError(f"input_ids is empty (shape {ids.shape})")
        if longest is None and ids.shape[1] > self.seq_len:  # KV-cache paths check their own
            raise InputError(
                f"sequence of {ids.shape[1]} tokens is longer than the {self.seq_len} this artifact "
                "was compiled for; split the input or recompile with a larger --seq-len"
            )
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise InputError(
                f"token ids must lie in [0, {self.vocab_size}), got range [{lo}, {hi}]"
            )
        return ids.astype(np.int64, copy=False)

    def __call__(self, input_ids) -> np.ndarray:
        """Logits for each row; rows shorter than ``seq_len`` are right-padded (causal: exact)."""
        ids = self._check(input_ids)
        batch, seq = ids.shape
        out = np.empty((batch, seq, self.vocab_size), dtype=np.float32)
        for b in range(batch):
            self._ids[...] = 0
            self._ids[0, :seq] = ids[b]
            out[b] = self._forward()[0, :seq]
        return out

    # -- KV-cache decoding (artifacts compiled with step functions) --------------------------
    @property
    def max_context(self) -> int:
        """Tokens the KV cache holds (prompt + generated); 0 without decode functions."""
        spec = self.manifest.get("decode")
        return int(spec["max_context"]) if spec else 0

    @property
    def cache_len(self) -> int:
        """Tokens now in the KV cache."""
        return self._cache.pos if getattr(self, "_kv", None) is not None else 0

    @property
    def _cache(self) -> _KVCache:
        if getattr(self, "_kv", None) is None:
            spec = self.manifest.get("decode")
            if not spec:
                raise ArtifactError(
                    f"'{self.path}' was compiled without KV-cache step functions; recompile it "
                    "with decode on (the default for LLaMA-family models on CPU targets)"
                )
            if self._device[0] != _KDL_CPU:
                raise ArtifactError("KV-cache decoding runs on CPU artifacts only")
            self._kv = _KVCache(self, spec)
        return self._kv

    def reset(self) -> None:
        """Empty the KV cache (the next ``prefill`` starts a new sequence)."""
        self._cache.pos = 0

    def _tokens(self, ids, what: str) -> np.ndarray:
        arr = self._check(ids, longest=self._cache.max_context)
        if arr.shape[0] != 1:
            raise InputError(f"{what} runs batch 1; got {arr.shape[0]} rows")
        cache = self._cache
        if cache.pos + arr.shape[1] > cache.max_context:
            raise InputError(
                f"{what}: {cache.pos} cached + {arr.shape[1]} new tokens exceed the KV cache of "
                f"{cache.max_context} tokens this artifact was compiled for; reset(), shorten "
                "the input or recompile with a larger --max-context"
            )
        return arr[0]

    def prefill(self, input_ids) -> np.ndarray:
        """Append the prompt ``input_ids`` ([n] or [1, n]) to the KV cache (after ``reset()`` for a
        new sequence); returns the logits float32[vocab] that follow its last token."""
        return self._cache.append(self._tokens(input_ids, "prefill"))

    def decode(self, token: int) -> np.ndarray:
        """Append one token; returns the logits float32[vocab] of the next one."""
        return self._cache.run(self._tokens(np.asarray([int(token)]), "decode"), 1)

    def generate(self, input_ids, max_new_tokens: int, eos_token_id: int | None = None):
        """Greedy continuation of ``input_ids`` ([n] or [1, n]) by up to ``max_new_tokens`` tokens
        (fewer if ``eos_token_id`` comes); returns the new token ids int64[m]. Starts a new
        sequence (the cache is reset)."""
        prompt = self._check(input_ids, longest=self._cache.max_context)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens={max_new_tokens} must be >= 1")
        need = prompt.shape[1] + max_new_tokens - 1  # the last new token is never fed back
        if need > self._cache.max_context:
            raise InputError(
                f"{prompt.shape[1]} prompt tokens + {max_new_tokens} new tokens need a KV cache of "
                f"{need} tokens; this artifact holds {self._cache.max_context}: shorten the prompt, "
                "generate fewer tokens or recompile with a larger --max-context"
            )
        self.reset()
        logits = self.prefill(prompt)
        out = []
        for i in range(max_new_tokens):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if nxt == eos_token_id or i == max_new_tokens - 1:
                break
            logits = self.decode(nxt)
        return np.asarray(out, dtype=np.int64)

    def _forward(self) -> np.ndarray:
        """One call of the compiled ``main`` on ``self._ids``; logits as a host array."""
        ids = self._ffi.from_dlpack(self._ids)
        if self._gpu_ids is not None:
            self._copy(ids, self._gpu_ids)
            ids = self._gpu_ids
        res = self._main(ids)
        logits = res[0] if not hasattr(res, "__dlpack__") else res
        if self._gpu_ids is not None:
            self._copy(logits, self._ffi.from_dlpack(self._logits))
            return self._logits
        return np.from_dlpack(logits)


class _KVCache:
    """The runtime side of the KV-cache step functions (``shiftadd_tvm/decode.py``).

    Holds ``k`` float32[layers, kv_heads, head_dim, max_context] (transposed) and ``v``
    float32[layers, kv_heads, max_context, head_dim] (64-byte aligned; each layer's slice is passed
    to the module zero-copy through DLPack, wrapped once) and the position.
    A step runs the compiled attention over the cache and returns the new rows, which are copied
    into the cache here (a few KB per token)."""

    SMALL_TAIL = 8  # a prompt tail this short runs as single-token steps instead of a padded chunk

    def __init__(self, rt: Runtime, spec: dict):
        ffi = rt._ffi
        self.layers, self.kv_heads = int(spec["layers"]), int(spec["kv_heads"])
        self.max_context, self.head_dim = int(spec["max_context"]), int(spec["head_dim"])
        shape = (self.layers, self.kv_heads, self.max_context, self.head_dim)
        self.v = _aligned(shape, np.float32)
        self.k = _aligned((self.layers, self.kv_heads, self.head_dim, self.max_context), np.float32)
        if any(a[i].ctypes.data % 64 for a in (self.k, self.v) for i in range(self.layers)):
            raise ArtifactError(f"'{rt.path}': cache layers are not 64-byte aligned ({shape})")
        self._cache_args = [
            ffi.from_dlpack(a[i]) for i in range(self.layers) for a in (self.k, self.v)
        ]
        self._scalars = _aligned((2, 1), np.int64)  # pos, last
        self._pos_arg = ffi.from_dlpack(self._scalars[0])
        self._last_arg = ffi.from_dlpack(self._scalars[1])
        self.steps: dict[int, tuple] = {}
        for name, fspec in spec["functions"].items():
            tokens = int(fspec["tokens"])
            ids = _aligned((1, tokens), np.int64)
            try:
                fn = rt._vm[name]
            except Exception as e:
                raise ArtifactError(f"'{rt.path}' lacks its step function {name}: {e}") from e
            self.steps[tokens] = (fn, ids, ffi.from_dlpack(ids))
        if 1 not in self.steps:
            raise ArtifactError(f"'{rt.path}' has no single-token step function (step_t1)")
        self.pos = 0

    def run(self, tokens: np.ndarray, width: int) -> np.ndarray:
        """Append ``tokens`` (at most ``width``) with the step function of length ``width``;
        returns the logits float32[vocab] after the last of them."""
        n = len(tokens)
        fn, ids, ids_arg = self.steps[width]
        ids[0, :n] = tokens
        ids[0, n:] = 0  # padding after the real tokens: causal, and its cache rows are dropped
        self._scalars[0, 0] = self.pos
        self._scalars[1, 0] = n - 1
        logits, new_k, new_v = fn(ids_arg, self._pos_arg, self._last_arg, *self._cache_args)
        end = self.pos + n
        self.k[:, :, :, self.pos : end] = np.from_dlpack(new_k)[:, :, :n].transpose(0, 1, 3, 2)
        self.v[:, :, self.pos : end] = np.from_dlpack(new_v)[:, :, :n]
        self.pos = end
        return np.from_dlpack(logits)[0]

    def append(self, tokens: np.ndarray) -> np.ndarray:
        """Append any number of tokens: full chunks of the longest step, then the tail as a padded
        chunk of the shortest step that holds it (or single steps when it is short)."""
        widest = max(self.steps)
        logits = None
        i = 0
        while len(tokens) - i >= widest:
            logits = self.run(tokens[i : i + widest], widest)
            i += widest
        tail = len(tokens) - i
        if tail:
            width = min(t for t in self.steps if t >= tail)
            if width > 1 and tail <= self.SMALL_TAIL:
                width = 1
            for j in range(i, len(tokens), width):
                logits = self.run(tokens[j : j + width], width)
        return logits


class KernelLibrary:
    """A library of standalone kernels (``shiftadd_tvm.gpu_check``): ``lib[name](*tensors)``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path, fmt=KERNELS_FORMAT)
        check_host(self.manifest, self.path)
        load_libraries(self.manifest, self.path)
        try:
            self._lib = _import_tvm_ffi().load_module(str(self.path.resolve()))
        except Exception as e:
            raise ArtifactError(f"TVM could not load '{self.path}': {e}") from e

    def __getitem__(self, name: str):
        return self._lib[name]


def load(path: str | os.PathLike, verify: bool = True) -> Runtime:
    """Load an artifact written by ``Artifact.export`` / ``shiftadd-tvm compile``."""
    return Runtime(path, verify=verify)
