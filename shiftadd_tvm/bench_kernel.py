"""``shiftadd-tvm bench kernel``: our LUT kernel against the CPU competitors, side by side.

For every weight shape ``N x K``, batch ``M``, bit width and thread count it measures, in one run
and one process:

* ours: the CPU LUT kernel the compiler would emit for this machine (``--isa auto``: the kernel
  chosen from the CPU features; ``avx512``/``avx512bw``/``avx2``/``generic`` force a variant; on an
  ``avx512bw`` target with VNNI, M large enough runs the int16 GEMM of ``schedules/int16_gemm.py``
  as ``compile()`` does, shown as "int16" in the sched column), on random binary planes and power-of-two scale codes of the packed format, checked against the
  float64 reference of the same weights before it is timed;
* torch ``F.linear`` in float32 and bfloat16 (dense weights);
* onnxruntime ``MatMulNBits`` (com.microsoft) at 4 bits and at 2 bits, in its fastest configuration
  (block size 32 or 128, ``accuracy_level`` 4 = int8 activations, the VNNI path; both block sizes
  are timed hot and the faster one is used), called with IO binding;
* the machine's read bandwidth (a vectorized TVM reduction over 512 MiB, per thread count), from
  which the "floor" column is the time our packed bytes take at that bandwidth over our time;
* a plain read of the same bytes (the same reduction over a buffer of our packed size, hot or
  cold as ours, timed in the same rounds): the "read" column is its time over ours, i.e. how
  close our kernel comes to a kernel that only loads its bytes from wherever they sit (L2, L3 or
  DRAM). Hot weights of a few MiB come from L3, where the floor column (DRAM) reads over 100%.

Hot = one weight buffer called in a loop (weights stay in cache when they fit); cold = calls
rotating over enough weight copies to exceed twice the last-level cache. Timings are the median
over repeats of the mean over a batch of calls, measured in alternating rounds (the machines here
are shared, so ratios from the same round are what to read). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SHAPES = "576x576,192x576,1536x576,576x1536,4096x4096,11008x4096"  # N x K
ORT_BLOCKS = (32, 128)


# ----------------------------------------------------------------------------- machine facts
def llc_bytes() -> int:
    """Size of the largest CPU cache level (sysfs), 32 MiB if unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or 32 << 20


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resize_tvm_pool(n: int) -> int:
    """Ask TVM's CPU thread pool in this process for ``n`` threads; returns the count it reports.

    TVM creates the pool once per process with ``TVM_NUM_THREADS`` workers (default on x86: half
    the logical CPUs, i.e. 1 on a 2-vCPU machine) and cannot grow it later."""
    import tvm  # noqa: F401 - registers the runtime's thread-pool functions
    import tvm_ffi

    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)  # 1 = big cores (all, here)
    return int(tvm_ffi.get_global_func("runtime.NumThreads")())


def set_tvm_threads(n: int) -> int:
    """``resize_tvm_pool``, refusing a count the pool cannot give instead of measuring fewer
    threads; returns the thread count TVM reports."""
    from .errors import ConfigError

    got = resize_tvm_pool(n)
    if got != n:
        raise ConfigError(
            f"TVM's thread pool runs {got} thread(s), not {n}: it is sized once per process; "
            f"set TVM_NUM_THREADS={n} (or more) in the environment before starting"
        )
    return got


# ----------------------------------------------------------------------------- timing
def time_calls(calls: list, budget_s: float = 0.02, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean seconds per call; calls rotate over ``calls`` (cold) or
    repeat one (hot). The batch size is chosen so one repeat lasts about ``budget_s``."""
    for c in calls[: max(2, min(len(calls), 4))]:
        c()
    t0 = time.perf_counter()
    calls[0]()
    one = max(time.perf_counter() - t0, 1e-7)
    number = max(len(calls), int(budget_s / one))
    number = -(-number // len(calls)) * len(calls)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(number):
            calls[i % len(calls)]()
        out.append((time.perf_counter() - t0) / number)
    return statistics.median(out)


def copies_for(nbytes: int, cold: bool, llc: int, cap: int = 64) -> int:
    """Weight copies to rotate over: 1 hot; enough to exceed 2x the last-level cache cold."""
    if not cold:
        return 1
    return int(min(cap, max(2, math.ceil(2 * llc / max(nbytes, 1)) + 1)))


# ----------------------------------------------------------------------------- bandwidth
def _read_bw_func(rows: int, cols: int, parallel: bool = True):
    """Sum of an int32 [rows, cols] buffer into [rows, 64]: one load per 64 bytes, nothing else;
    the rows in parallel (``parallel``) or in one thread (no launch cost where one thread runs)."""
    from tvm.script import tirx as T

    row_loop = T.parallel if parallel else T.serial

    @T.prim_func
    def read_bw(a: T.Buffer((rows, cols), "int32"), out: T.Buffer((rows, 64), "int32")):
        T.func_attr({"global_symbol": "read_bw", "tirx.noalias": True})
        for r in row_loop(rows):
            acc = T.alloc_buffer((64,), "int32", scope="local")
            for u in T.unroll(4):
                acc[T.Ramp(u * 16, 1, 16)] = T.Broadcast(T.int32(0), 16)
            for i in range(cols // 64):
                for u in T.unroll(4):
                    acc[T.Ramp(u * 16, 1, 16)] = (
                        acc[T.Ramp(u * 16, 1, 16)] + a[r, T.Ramp(i * 64 + u * 16, 1, 16)]
                    )
            for u in T.unroll(4):
                out[r, T.Ramp(u * 16, 1, 16)] = acc[T.Ramp(u * 16, 1, 16)]

    return read_bw


READ_ROWS = 16  # rows of the plain-read kernel of the same bytes (parallel over rows)


class PlainRead:
    """A plain vectorized read of ``nbytes`` (rounded up to whole steps of ``rows`` rows of 64
    int32: 4 KiB at the default 16 rows), compiled once per size: what the memory system gives a
    kernel that only loads the bytes ours loads, timed hot or cold exactly as ours is (same
    copies, same rotation); also the bandwidth measurement (``measure_read_bandwidth``)."""

    def __init__(self, target, rows: int = READ_ROWS):
        self.target = target
        self.rows = rows
        self._funcs: dict[tuple[int, bool], object] = {}  # (int32 columns, parallel) -> kernel

    def calls(self, nbytes: int, copies: int, parallel: bool) -> list:
        """One call per copy; the rows in parallel (more than one thread) or serial (one thread:
        no launch cost). The first copy's sum is checked before anything is timed."""
        import tvm

        rows = self.rows
        cols = max(64, -(-nbytes // (4 * rows * 64)) * 64)
        key = (cols, parallel)
        if key not in self._funcs:
            mod = tvm.IRModule({"read_bw": _read_bw_func(rows, cols, parallel)})
            self._funcs[key] = tvm.compile(mod, target=self.target)["read_bw"]
        f = self._funcs[key]
        dev = tvm.cpu()
        bufs = [tvm.runtime.tensor(np.ones((rows, cols), np.int32), dev) for _ in range(copies)]
        out = tvm.runtime.tensor(np.zeros((rows, 64), np.int32), dev)
        f(bufs[0], out)
        if int(out.numpy().sum()) != rows * cols:
            raise RuntimeError("plain-read kernel summed wrong: its time would be meaningless")
        return [lambda a=a: f(a, out) for a in bufs]


def measure_read_bandwidth(target, threads: list[int], mib: int = 512) -> dict[int, float]:
    """Read bandwidth in GB/s per thread count: a TVM vector reduction over ``mib`` MiB (64 rows
    in parallel)."""
    (call,) = PlainRead(target, rows=64).calls(mib << 20, copies=1, parallel=True)
    res = {}
    for t in threads:
        set_tvm_threads(t)
        sec = time_calls([call], budget_s=0.2, repeats=5)
        res[t] = (mib << 20) / sec / 1e9
    return res


# ----------------------------------------------------------------------------- our kernel
def random_packed(
    n: int, k: int, bits: int, group_size: int, terms: int, seed: int, counts=None, shared=False
):
    """Random planes and power-of-two scale codes in the packed format (speed does not depend on
    the values; correctness is checked against the reference of exactly these weights).
    ``counts``: terms present per plane (slots past a plane's count are absent). ``shared``: the
    terms of each (row, group) within 8 exponents (``packing.shared_exponent_form``)."""
    from .schedules.packing import encode_terms, pack_planes, padded_k

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2, size=(bits, n, k)).astype(bool)
    g = padded_k(k, group_size) // group_size
    if shared:  # plane b's top term 2^-(5 + min(b, 2)), every term of a group in [-12, -5]
        top = -5 - np.minimum(np.arange(bits), 2)[:, None, None, None]
        step = 2 * np.arange(terms) + rng.integers(0, 2, size=(bits, n, g, terms))
        exps = np.maximum(top - step, -12)
    else:
        exps = -rng.integers(4, 9, size=(bits, n, g, terms)) - np.arange(terms) * 2
    signs = np.where(np.arange(terms) == 0, 1, rng.choice([-1, 1], size=(bits, n, g, terms)))
    if counts is not None:
        signs = np.where(np.arange(terms) < np.asarray(counts)[:, None, None, None], signs, 0)
    return pack_planes(codes, group_size), encode_terms(signs, exps)


@dataclasses.dataclass
class OurKernel:
    isa: str
    func: object  # the compiled PackedFunc
    weights: list  # per copy: list of tvm tensors (kernel layout)
    nbytes: int  # packed bytes read per call (weights + scales)
    err: float  # relative L2 error vs the float64 reference of the same weights
    schedule: str  # where the knobs came from: "tuned (<log>: ...)" or "default rule (...)"


def resolve_isa(isa: str, target_spec: dict) -> str:
    if isa != "auto":
        return isa
    try:
        from .cpu_features import kernel_isa
    except ImportError:
        return "generic"
    return kernel_isa(target_spec)


def sched_label(schedule: str) -> str:
    """Table column: where our kernel's schedule came from, or 'int16' for the large-M GEMM."""
    if schedule.startswith("int16"):
        return "int16"
    return "tuned" if schedule.startswith("tuned") else "default"


def build_ours(
    cfg,
    isa: str,
    threads: int,
    target,
    copies: int,
    x: np.ndarray,
    seed: int,
    db=None,
    int16_ok: bool = False,
):
    """Compile our kernel for ``cfg`` and make ``copies`` weight copies in its layout. The knobs
    are ``db``'s tuned record for ``cfg`` where it has one (as ``compile()`` picks them), else the
    default rule for ``threads`` threads. ``int16_ok`` (an avx512bw target with VNNI): the int16
    GEMM where ``compile()`` picks it (``int16_gemm.prefers``; same packed weights)."""
    import tvm

    from . import tuning
    from .schedules import lut_gemm

    dev = tvm.cpu()
    if isa == "generic":
        knobs, how = tuning.lookup_knobs(cfg, db, threads)
        func = lut_gemm.make_primfunc(cfg, knobs)

        def pack(planes, scales):
            return (planes, scales)
    else:
        from .schedules import int16_gemm
        from .schedules import lut_gemm_int8 as k8

        pack_isa = isa  # the int16 GEMM reads the avx512bw table kernel's packing
        if int16_ok and isa == "avx512bw" and int16_gemm.picks(cfg):
            func, how = int16_gemm.make_primfunc(cfg), "int16 GEMM (int16_gemm.prefers)"
            isa = "int16"
        else:
            knobs, how = tuning.lookup_int8_knobs(cfg, db, threads, isa)
            func = k8.make_int8_primfunc(cfg, knobs, isa)

        def pack(planes, scales):
            return k8.pack_int8(planes, scales, cfg, pack_isa)

    name = (
        str(func.attrs["global_symbol"]) if func.attrs and "global_symbol" in func.attrs else None
    )
    name = name or cfg.name
    lib = tvm.compile(tvm.IRModule({name: func.with_attr("global_symbol", name)}), target=target)
    f = lib[name]
    weights, nbytes, err = [], 0, float("nan")
    for c in range(copies):
        planes, scales = random_packed(
            cfg.n,
            cfg.k,
            cfg.bits,
            cfg.group_size,
            cfg.terms,
            seed + c,
            cfg.term_counts,
            cfg.shared_exp,
        )
        arrs = pack(planes, scales)
        nbytes = int(sum(a.nbytes for a in arrs))
        weights.append([tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in arrs])
        if c == 0:
            y = tvm.runtime.tensor(np.zeros((cfg.m, cfg.n), np.float32), dev)
            f(tvm.runtime.tensor(x, dev), *weights[0], y)
            ref = lut_gemm.reference(x, planes, scales, cfg)
            err = float(np.linalg.norm(y.numpy() - ref) / max(np.linalg.norm(ref), 1e-30))
    return OurKernel(isa, f, weights, nbytes, err, how)


# ----------------------------------------------------------------------------- onnxruntime
def ort_matmulnbits_model(n: int, k: int, m: int, bits: int, block: int, seed: int, nodes: int = 1):
    """An ONNX model with ``nodes`` independent com.microsoft MatMulNBits nodes on the same input
    (random weights, the symmetric default zero point), and the float64 dense weights of node 0.
    Several nodes give the cold measurement one session and one thread pool."""
    import onnx
    from onnx import TensorProto, helper

    nb = -(-k // block)
    blob = block * bits // 8
    per = 8 // bits
    rng = np.random.default_rng(seed)
    graph_nodes, inits, outputs, w0, nbytes = [], [], [], None, 0
    for i in range(nodes):
        q = rng.integers(0, 1 << bits, size=(n, nb, block)).astype(np.uint8)
        q[:, -1, block - (nb * block - k) :] = 1 << (bits - 1)  # padding columns mean 0
        qq = q.reshape(n, nb, blob, per)
        packed = np.zeros((n, nb, blob), np.uint8)
        for j in range(per):
            packed |= (qq[..., j] << (bits * j)).astype(np.uint8)
        scales = (rng.random((n, nb)) * 0.01 + 0.001).astype(np.float32)
        if i == 0:
            w0 = ((q.astype(np.float64) - (1 << (bits - 1))) * scales[..., None]).reshape(n, -1)
            nbytes = packed.nbytes + scales.nbytes
        graph_nodes.append(
            helper.make_node(
                "MatMulNBits",
                ["A", f"B{i}", f"scales{i}"],
                [f"Y{i}"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=block,
                accuracy_level=4,
            )
        )
        inits += [
            helper.make_tensor(
                f"B{i}", TensorProto.UINT8, packed.shape, packed.tobytes(), raw=True
            ),
            helper.make_tensor(
                f"scales{i}", TensorProto.FLOAT, [n * nb], scales.tobytes(), raw=True
            ),
        ]
        outputs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [m, n]))
    graph = helper.make_graph(
        graph_nodes,
        "matmulnbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        outputs,
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    onnx.checker.check_model(model)
    return model.SerializeToString(), w0[:, :k], nbytes


def ort_calls(n, k, m, bits, block, threads, copies, x, seed):
    """(call, calls per call, rel. error of node 0, packed bytes per weight): one session with
    ``copies`` MatMulNBits nodes run through IO binding (sequentially: one inter-op thread)."""
    import onnxruntime as ort

    blob, w, nbytes = ort_matmulnbits_model(n, k, m, bits, block, seed, nodes=copies)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    io = sess.io_binding()
    io.bind_cpu_input("A", x)
    outs = [ort.OrtValue.ortvalue_from_numpy(np.zeros((m, n), np.float32)) for _ in range(copies)]
    for i, o in enumerate(outs):
        io.bind_ortvalue_output(f"Y{i}", o)
    sess.run_with_iobinding(io)
    ref = x.astype(np.float64) @ w.T
    err = float(np.linalg.norm(outs[0].numpy() - ref) / max(np.linalg.norm(ref), 1e-30))
    return (lambda: sess.run_with_iobinding(io)), copies, err, nbytes


# ----------------------------------------------------------------------------- the run
def parse_shapes(text: str) -> list[tuple[int, int]]:
    from .errors import ConfigError

    out = []
    for part in text.split(","):
        try:
            n, k = (int(v) for v in part.lower().split("x"))
        except ValueError as e:
            raise ConfigError(
                f"bad shape '{part}' in --shapes: write NxK pairs such as 4096x4096,576x1536"
            ) from e
        if n < 1 or k < 1:
            raise ConfigError(f"shape '{part}' must have positive N and K")
        out.append((n, k))
    return out


def parse_ints(text: str, what: str, allowed=None) -> list[int]:
    from .errors import ConfigError

    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ConfigError(f"--{what} takes comma-separated integers, got '{text}'") from e
    if not vals or any(v < 1 for v in vals) or (allowed and any(v not in allowed for v in vals)):
        raise ConfigError(
            f"--{what} values must be positive{f' and in {allowed}' if allowed else ''}"
        )
    return vals


def run(args) -> dict:
    import torch
    import torch.nn.functional as F  # noqa: N812
    import tvm
    from tqdm import tqdm

    from . import tuning
    from .quant import kernel_terms
    from .schedules.lut_gemm import LutGemmConfig
    from .targets import resolve_target

    shapes = parse_shapes(args.shapes)
    ms = parse_ints(args.m, "m")
    bits_list = parse_ints(args.bits, "bits", (1, 2, 3, 4))
    threads_list = parse_ints(args.threads, "threads")
    # the pool is created at its first use, with TVM_NUM_THREADS workers (set_tvm_threads)
    os.environ.setdefault("TVM_NUM_THREADS", str(max(threads_list)))
    modes = [m for m in ("hot", "cold") if m in args.modes.split(",")]
    spec = resolve_target(args.target)
    target = spec.tvm_target()
    isa = resolve_isa(args.isa, spec.to_dict())
    from .cpu_features import int16_gemm_target

    int16_ok = int16_gemm_target(spec.to_dict(), isa)
    llc = llc_bytes()
    log.info("CPU %s, last-level cache %d MiB, kernel variant %s", cpu_model(), llc >> 20, isa)
    from .cpu_features import shared_exp_target

    shared_ok = shared_exp_target(spec.to_dict(), isa)
    if args.scale_window and not shared_ok:
        log.warning(
            "--scale-window %d: the shared-exponent kernels are AVX-512 VBMI and AVX-512 BW + "
            "VNNI only; the %s kernel timed here applies the terms one by one",
            args.scale_window,
            isa,
        )
    db = None if args.default_schedules else tuning.load_database(spec.to_dict())
    log.info(
        "our kernels' schedules: %s",
        "default rule (--default-schedules)"
        if args.default_schedules
        else f"tuned records from {db.path.name} where they exist, else the default rule"
        if db
        else "default rule (no tuning log for this target)",
    )
    bw = measure_read_bandwidth(target, threads_list)
    plain = PlainRead(target)
    log.info("read bandwidth: %s", ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in bw.items()))

    rows = []
    groups = [(nk, m, t, mode) for nk in shapes for m in ms for t in threads_list for mode in modes]
    bar = tqdm(groups, desc="bench kernel", unit="case", disable=args.no_progress)
    for (n, k), m, t, mode in bar:
        bar.set_postfix_str(f"{n}x{k} M={m} thr={t} {mode}")
        rng = np.random.default_rng(args.seed + m)
        x = rng.standard_normal((m, k)).astype(np.float32)
        cold = mode == "cold"
        torch.set_num_threads(t)
        set_tvm_threads(t)
        case = {"n": n, "k": k, "m": m, "threads": t, "mode": mode}
        # competitors (independent of our bit width)
        dense_copies = copies_for(n * k * 4, cold, llc, cap=8)
        ws = [torch.randn(n, k) * 0.02 for _ in range(dense_copies)]
        xt = torch.from_numpy(x)
        wb = [w.bfloat16() for w in ws]
        xb = xt.bfloat16()
        timers: dict[str, list] = {
            "torch_fp32": [lambda w=w, a=xt: F.linear(a, w) for w in ws],
            "torch_bf16": [lambda w=w, a=xb: F.linear(a, w) for w in wb],
        }
        ort_info = {}
        per_call: dict[str, int] = {}  # calls that one timed call stands for (ORT cold: nodes)
        for ob in (4, 2) if not args.no_ort else ():
            best = None
            for block in ORT_BLOCKS:
                try:
                    call, _, err, nb = ort_calls(n, k, m, ob, block, t, 1, x, args.seed)
                except Exception as e:  # an unsupported configuration in this onnxruntime
                    log.warning("onnxruntime MatMulNBits %d-bit block %d: %s", ob, block, e)
                    continue
                sec = time_calls([call], repeats=3)
                if best is None or sec < best[0]:
                    best = (sec, block, err, nb)
            if best is None:
                continue
            copies = copies_for(best[3], cold, llc)
            call, per, err, _ = ort_calls(n, k, m, ob, best[1], t, copies, x, args.seed)
            timers[f"ort_{ob}bit"] = [call]
            per_call[f"ort_{ob}bit"] = per
            ort_info[f"ort_{ob}bit"] = {"block": best[1], "rel_err": err, "bytes": best[3]}
        ours = {}
        for bits in bits_list:
            width, counts = kernel_terms(bits, args.group_size, args.terms)
            shared = bool(args.scale_window) and shared_ok
            cfg = LutGemmConfig(m, n, k, bits, args.group_size, width, counts, shared)
            probe = random_packed(n, k, bits, args.group_size, width, 0, counts)
            copies = copies_for(probe[0].nbytes + probe[1].nbytes, cold, llc)
            ker = build_ours(cfg, isa, t, target, copies, x, args.seed, db, int16_ok)
            yv = tvm.runtime.tensor(np.zeros((m, n), np.float32), tvm.cpu())
            xv = tvm.runtime.tensor(x, tvm.cpu())
            ours[bits] = ker
            timers[f"ours_{bits}bit"] = [
                lambda w=w, f=ker.func, a=xv, y=yv: f(a, *w, y) for w in ker.weights
            ]
            timers[f"read_{bits}bit"] = plain.calls(ker.nbytes, len(ker.weights), parallel=t > 1)
        # alternating rounds: every timer once per round, medians over rounds
        samples: dict[str, list[float]] = {key: [] for key in timers}
        for _ in range(args.rounds):
            for key, calls in timers.items():
                time.sleep(0.05)  # let the previous library's spinning worker threads go idle
                sec = time_calls(calls, budget_s=args.budget_ms / 1e3)
                samples[key].append(sec / per_call.get(key, 1))
        med = {key: statistics.median(v) * 1e3 for key, v in samples.items()}  # ms
        for bits, ker in ours.items():
            ms_ours = med[f"ours_{bits}bit"]
            floor_ms = ker.nbytes / (bw[t] * 1e9) * 1e3
            read_ms = med[f"read_{bits}bit"]
            row = {
                **case,
                "bits": bits,
                "isa": ker.isa,
                "ours_ms": ms_ours,
                "ours_rel_err": ker.err,
                "ours_schedule": ker.schedule,
                "ours_bytes": ker.nbytes,
                "bw_floor_ms": floor_ms,
                "bw_floor_frac": floor_ms / ms_ours,
                "plain_read_ms": read_ms,
                "plain_read_frac": read_ms / ms_ours,
            }
            for key in ("torch_fp32", "torch_bf16", "ort_4bit", "ort_2bit"):
                if key in med:
                    row[f"{key}_ms"] = med[key]
                    row[f"speedup_vs_{key}"] = med[key] / ms_ours
            for key, info in ort_info.items():
                row[f"{key}_block"] = info["block"]
                row[f"{key}_rel_err"] = info["rel_err"]
            rows.append(row)
        del timers, ws, wb, ours
    return {
        "command": "shiftadd-tvm bench kernel " + " ".join(args.argv),
        "cpu": cpu_model(),
        "llc_bytes": llc,
        "target": spec.to_dict(),
        "isa": isa,
        "read_bandwidth_gbs": {str(t): v for t, v in bw.items()},
        "torch": torch.__version__,
        "onnxruntime": _ort_version(),
        "group_size": args.group_size,
        "terms": args.terms,
        "scale_window": args.scale_window,
        "rounds": args.rounds,
        "rows": rows,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_avg": os.getloadavg(),
    }


def _ort_version() -> str:
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return "not installed"


def format_table(result: dict) -> str:
    head = (
        "| N x K | M | bits | thr | mode | ours ms | fp32 ms | bf16 ms | ort4 ms | ort2 ms "
        "| x fp32 | x bf16 | x ort4 | x ort2 | BW floor | read | rel err | sched |"
    )
    lines = [head, "|" + "---|" * 18]

    def f(row, key, fmt="{:.3f}"):
        return fmt.format(row[key]) if key in row else "-"

    for r in result["rows"]:
        lines.append(
            f"| {r['n']}x{r['k']} | {r['m']} | {r['bits']} | {r['threads']} | {r['mode']} "
            f"| {r['ours_ms']:.3f} | {f(r, 'torch_fp32_ms')} | {f(r, 'torch_bf16_ms')} "
            f"| {f(r, 'ort_4bit_ms')} | {f(r, 'ort_2bit_ms')} "
            f"| {f(r, 'speedup_vs_torch_fp32', '{:.1f}x')} | {f(r, 'speedup_vs_torch_bf16', '{:.1f}x')} "
            f"| {f(r, 'speedup_vs_ort_4bit', '{:.2f}x')} | {f(r, 'speedup_vs_ort_2bit', '{:.2f}x')} "
            f"| {r['bw_floor_frac'] * 100:.0f}% | {f(r, 'plain_read_frac', '{:.0%}')} "
            f"| {r['ours_rel_err']:.1e} "
            f"| {sched_label(r.get('ours_schedule', ''))} |"
        )
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    """Three panels over the rows (one bar per bit width, cases along x): our speedup over torch
    fp32 and over onnxruntime's 4-bit kernel (log scale, 1x marked), and our speed as a fraction
    of a plain read of the same bytes (100% = only loading them). Written atomically."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._files import atomic_path

    rows = result["rows"]
    cases = list(dict.fromkeys((r["n"], r["k"], r["m"], r["threads"], r["mode"]) for r in rows))
    bits = sorted({r["bits"] for r in rows})
    at = {(r["n"], r["k"], r["m"], r["threads"], r["mode"], r["bits"]): r for r in rows}
    panels = [
        ("speedup_vs_torch_fp32", "x torch fp32 F.linear", True),
        ("speedup_vs_ort_4bit", "x onnxruntime MatMulNBits 4-bit", True),
        ("plain_read_frac", "speed / plain read of our bytes", False),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.55 * len(cases) * len(bits)), 10))
    width = 0.8 / len(bits)
    for ax, (key, label, log_scale) in zip(axes, panels, strict=True):
        for i, b in enumerate(bits):
            xs, ys = [], []
            for j, c in enumerate(cases):
                r = at.get((*c, b))
                if r is not None and key in r:
                    xs.append(j + (i - (len(bits) - 1) / 2) * width)
                    ys.append(r[key])
            ax.bar(xs, ys, width, label=f"{b} bits")
        ax.axhline(1.0, color="black", linewidth=0.8)
        if log_scale:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.yaxis.set_minor_formatter(  # 2x, 3x, 5x, 20x, ... between the decades
                matplotlib.ticker.FuncFormatter(
                    lambda v, _: f"{v:g}x" if f"{v:g}"[0] in "235" else ""
                )
            )
        else:
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_ylabel(label)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(
            [f"{n}x{k}\nM={m} t={t} {mode}" for n, k, m, t, mode in cases], fontsize=7
        )
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[0].set_title(
        f"bench kernel: {result['cpu']}, {result['isa']} ({result['date']})", fontsize=9
    )
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "kernel",
        help="our LUT kernel vs torch fp32/bf16 and onnxruntime MatMulNBits, hot and cold",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--shapes",
        default=DEFAULT_SHAPES,
        help="weight shapes N x K, comma-separated (default: the default model's four shapes, "
        "4096x4096 and 11008x4096)",
    )
    p.add_argument(
        "--m", default="1,8,128", help="activation rows (batch x tokens), comma-separated"
    )
    p.add_argument("--bits", default="2,3,4", help="bit widths of our kernel, comma-separated")
    p.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    p.add_argument("--modes", default="hot,cold", help="'hot', 'cold' or both (comma-separated)")
    p.add_argument(
        "--isa",
        default="auto",
        choices=["auto", "avx512", "avx512bw", "avx2", "generic"],
        help="our kernel variant; 'auto' = the one the compiler picks for this CPU",
    )
    p.add_argument("--target", default="llvm", help="TVM target: 'llvm' (this CPU) or a JSON dict")
    p.add_argument("--group-size", type=int, default=128, help="scale group size of our format")
    p.add_argument(
        "--terms",
        default="auto",
        help="power-of-two terms per scale: 'auto' (compile's per-width default), one count for "
        "every plane, or per-plane counts, most significant plane first, the last repeated "
        "(compile --terms)",
    )
    p.add_argument(
        "--scale-window",
        type=int,
        default=0,
        help="8: weights fitted with compile --scale-window 8, run by the shared-exponent AVX-512 "
        "kernels (VBMI, or BW + VNNI: one shift per group, the planes weighted inside vpdpbusd; "
        "at every M); ignored by the other kernels. 0: free exponents",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    p.add_argument(
        "--budget-ms", type=float, default=20.0, help="target duration of one timing repeat"
    )
    p.add_argument(
        "--default-schedules",
        action="store_true",
        help="time our kernels with the default schedule rule even where the target's tuning log "
        "(tuning_logs/, written by `shiftadd-tvm tune`) has a record; by default a kernel takes its "
        "record, as compile() does (each row's 'ours_schedule' says which)",
    )
    p.add_argument("--no-ort", action="store_true", help="skip onnxruntime (e.g. not installed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--json", default="reports/bench/kernel.json", help="where to write the JSON")
    p.add_argument("--md", help="also write the table as Markdown here")
    p.add_argument(
        "--png",
        help="also plot the rows here: speedup over torch fp32 and onnxruntime 4-bit, and the "
        "fraction of a plain read of the same bytes, per case and bit width",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench_kernel)


def cmd_bench_kernel(args) -> int:
    from ._files import write_text_atomic

    args.argv = getattr(args, "argv", [])
    result = run(args)
    table = format_table(result)
    bw = ", ".join(f"{t} thr {v:.1f} GB/s" for t, v in result["read_bandwidth_gbs"].items())
    print(f"CPU: {result['cpu']}; kernel variant: {result['isa']}; read bandwidth: {bw}")
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(result, indent=1) + "\n")
    if args.md:
        write_text_atomic(args.md, table + "\n")
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        plot(result, args.png)
        log.info("wrote %s", args.png)
    log.info("wrote %s", args.json)
    return 0
