"""Auto-tuning of the CPU LUT kernels: a search over the schedule template's knobs, measured
locally or on a remote device through TVM's RPC, with records in ``tuning_logs/`` that ``compile()``
reuses. The CUDA kernels' records (measured on a GPU by ``scripts/gpu_check.sh``) are looked up here
too (``load_cuda_records``, ``tuned_cuda_knobs``).

Two kernel families, each with its own knobs, and a record of one never stands in for the other:

* ``float``: the float-table kernel (``schedules/lut_gemm.py: LutGemmKnobs``: rows per table
  vector, interleaved output rows, parallel chunks), what targets without an int8 ISA get;
* ``int8-<isa>``: the int8-table kernels (``schedules/lut_gemm_int8.py: Int8Knobs``: rows per
  weight load, parallel chunks of 32-row tiles, parallel table build) that ``compile()`` uses when
  the target's kernel ISA (``cpu_features.kernel_isa``) is avx512, avx512bw, avx2 or neon.

``tune(kernel="auto")`` tunes what ``compile()`` would use on the target, per configuration
(``kernel_family``). Records carry a ``kernel`` field; the Database is keyed by (kernel, config),
and records without the field (logs written before the int8 kernels were tuned) are ``float``.

Why not MetaSchedule: our kernels are TVMScript templates whose schedule is fixed by a few knobs,
not a generic loop nest for MetaSchedule's schedule rules to transform; its generic design
space gave no speedup on this kernel in 64 trials (``../shared/TVM_NOTES.md`` section 4). So the
search enumerates the knob grid, keeps the default schedule as the first candidate, measures a
seeded random sample of the rest (``trials`` per kernel), and keeps the fastest only when it beats
the default by more than the noise margin (so tuned is never slower than the default).

Builds run in parallel worker processes; measurement runs in this process (``runner=None``) or on
an RPC server (``host:port``) or a tracker (``tracker=host:port`` + ``key``). Records are written
atomically after every kernel, so an interrupted run loses at most the kernel in progress and a rerun
skips what is done.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ._files import write_text_atomic
from .errors import ConfigError
from .schedules import lut_gemm_cuda
from .schedules.lut_gemm import LutGemmConfig, LutGemmKnobs, default_knobs
from .schedules.lut_gemm_int8 import (
    ROWS,
    Int8Knobs,
    default_int8_knobs,
    int8_symbol,
    unsupported_reason,
)

log = logging.getLogger(__name__)

NOISE_MARGIN = 0.03  # a candidate must beat the default by 3% to replace it
FLOAT = "float"  # kernel family of the float-table kernel (and of records without a "kernel")
KERNEL_CHOICES = ("auto", "float", "int8")  # what ``tune(kernel=...)`` accepts


def int8_family(isa: str) -> str:
    """Kernel family (record ``kernel`` field) of ``isa``'s int8 kernel, e.g. ``int8-avx512``."""
    return f"int8-{isa}"


def kernel_family(cfg: LutGemmConfig, isa: str, kernel: str = "auto") -> str:
    """The family tuned for ``cfg`` on a target whose kernel ISA is ``isa``
    (``cpu_features.kernel_isa``): ``kernel="auto"`` gives what ``compile()`` builds (the int8
    kernel of ``isa`` unless ``isa`` is generic or that kernel cannot run ``cfg``), ``"float"`` the
    float-table kernel, ``"int8"`` the int8 kernel or ConfigError naming why there is none."""
    if kernel not in KERNEL_CHOICES:
        raise ConfigError(f"kernel={kernel!r}: one of {', '.join(KERNEL_CHOICES)}")
    if kernel == FLOAT:
        return FLOAT
    why = (
        "the target enables no AVX2, AVX-512 (VBMI+VNNI or BW) or NEON"
        if isa == "generic"
        else unsupported_reason(cfg, isa)
    )
    if why is None:
        return int8_family(isa)
    if kernel == "int8":
        raise ConfigError(f"{cfg.name}: no int8 kernel to tune ({why}); use --kernel float or auto")
    return FLOAT


def tuning_log_dir() -> Path:
    """``$SHIFTADD_TVM_TUNING_LOGS``, else the repository's ``tuning_logs/`` (a checkout or an
    editable install), else the copy a regular install carries as package data
    (``shiftadd_tvm/tuning_logs``)."""
    env = os.environ.get("SHIFTADD_TVM_TUNING_LOGS")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    repo, packaged = here.parent / "tuning_logs", here / "tuning_logs"
    return packaged if packaged.is_dir() and not repo.is_dir() else repo


def target_key(spec: dict) -> str:
    """File-name key of a target: kind, CPU and core count (e.g. ``llvm_znver4_2c``)."""
    if spec.get("kind") != "llvm":
        raise ConfigError(
            f"tuning covers the CPU (llvm) kernels; got target kind {spec.get('kind')}"
        )
    return f"llvm_{spec.get('mcpu', 'generic')}_{spec.get('num-cores', 1)}c"


def log_path(spec: dict) -> Path:
    """The tuning log of a target: ``tuning_log_dir() / <target_key>.json``."""
    return tuning_log_dir() / f"{target_key(spec)}.json"


def load_database(spec: dict) -> Database | None:
    """The target's records (``Database``) if its tuning log exists, else None."""
    path = log_path(spec)
    return Database(path) if path.is_file() else None


def threads_of(spec: dict) -> int:
    return int(spec.get("num-cores", 2))  # the default rule assumed 2 threads before tuning existed


# ----------------------------------------------------------------------------- database
def _config_key(config: dict) -> str:
    """A record's config as ``LutGemmConfig.to_json`` writes it (which leaves out fields at
    their defaults, so records written before a field existed keep their keys)."""
    return LutGemmConfig(**config).to_json()


def _log_threads(meta: dict) -> int | None:
    """Threads a log's records were measured on where a record does not say (its ``threads``):
    the log's ``measured_threads`` (tune writes it since session 19), else the cores of the log's
    target (older logs; what they were tuned for)."""
    measured = meta.get("measured_threads") or meta.get("target", {}).get("num-cores")
    return int(measured) if measured else None


class Database:
    """Tuning records of one target: ``{(kernel family, config JSON): record}``, saved atomically.

    A record's ``kernel`` field names its family (``"float"``, ``"int8-avx512"``, ...); records
    without one (older logs) are float-table records and get the field on load."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str], dict] = {}
        self.threads: int | None = None  # (_log_threads)
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.threads = _log_threads(data)
                for r in data["records"]:
                    r = {"kernel": r.get("kernel", FLOAT), **r}
                    self.records[(r["kernel"], _config_key(r["config"]))] = r
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ConfigError(
                    f"tuning log {path} is unreadable ({e}); delete it or restore it from git"
                ) from e

    def get(self, cfg: LutGemmConfig, kernel: str = FLOAT) -> dict | None:
        """The record of ``cfg``'s ``kernel`` family, or None."""
        return self.records.get((kernel, cfg.to_json()))

    def get_other_terms(self, cfg: LutGemmConfig, kernel: str) -> dict | None:
        """A record of ``kernel`` for ``cfg``'s shapes, bits, group size and scale form with other
        term counts (e.g. tuned with ``--terms auto`` and built with 3 on every plane), or None;
        of several, the one with the most term slots."""
        fields = ("m", "n", "k", "bits", "group_size", "shared_exp")
        same = []
        for (fam, _), r in self.records.items():
            other = LutGemmConfig(**r["config"])
            if fam == kernel and all(getattr(other, f) == getattr(cfg, f) for f in fields):
                same.append((sum(other.term_counts), r))
        return max(same, key=lambda t: t[0])[1] if same else None

    def put(self, cfg: LutGemmConfig, record: dict, meta: dict) -> None:
        """Store ``record`` under its ``kernel`` field (absent: float) and rewrite the file."""
        record = {
            "kernel": record.get("kernel", FLOAT),
            **record,
            "config": json.loads(cfg.to_json()),
        }
        self.records[(record["kernel"], cfg.to_json())] = record
        self.threads = _log_threads(meta)  # the file's meta is now ``meta``
        body = {
            **meta,
            "records": sorted(
                self.records.values(), key=lambda r: (r["kernel"], json.dumps(r["config"]))
            ),
        }
        write_text_atomic(self.path, json.dumps(body, indent=1) + "\n")


def _lookup(
    cfg: LutGemmConfig,
    db: Database | None,
    kernel: str,
    knobs_type,
    default,
    threads: int,
    borrow: bool = True,
):
    """(knobs, how): ``cfg``'s record of the ``kernel`` family if it fits, else ``default``
    (the default rule for ``threads``). ``borrow=False``: a shared-exponent config does not take
    the per-term config's record. Records measured on another thread count than ``threads`` are
    not used: the thread knobs of a two-thread record ran 10-20% slower on one thread than the
    one-thread rule (Zen 5, ``bench kernel`` M = 8 and 128 on the default model's shapes)."""
    if db is None:
        return default, "default rule (no tuning log for this target)"
    rec, note = db.get(cfg, kernel), ""
    if rec is None and (cfg.plane_terms or cfg.shared_exp) and (borrow or not cfg.shared_exp):
        # a per-plane plan or a shared exponent changes only the epilogue: the record of the same
        # shapes with every plane's term slots (the knobs are tile and thread choices, valid for
        # both)
        rec = db.get(dataclasses.replace(cfg, plane_terms=(), shared_exp=False), kernel)
        note = ", measured with every term slot" + (" per term" if cfg.shared_exp else "")
    if rec is None:
        # the same kernel with other term counts: the knobs are tile and thread choices
        rec, note = db.get_other_terms(cfg, kernel), ", measured with other term counts"
    if rec is None:
        family = "" if kernel == FLOAT else f"{kernel} "
        return default, f"default rule (no {family}record for this kernel)"
    # the record's own thread count (tune writes it), else the log's
    measured = rec.get("threads", db.threads)
    if measured is not None and measured != threads:
        return default, (
            f"default rule (the record in {db.path.name} was measured on {measured} thread(s), "
            f"this kernel runs on {threads})"
        )
    try:
        kn = knobs_type(**rec["knobs"])
        kn.validate(cfg)
        times = f"{rec['us']:.0f} us vs default {rec['default_us']:.0f} us"
    except (TypeError, ValueError, KeyError) as e:
        return default, f"default rule (record in {db.path.name} is incompatible: {e})"
    return kn, f"tuned ({db.path.name}: {times}{note})"


def lookup_knobs(cfg: LutGemmConfig, db: Database | None, threads: int):
    """(knobs, how) for ``cfg``'s float-table kernel: the tuned record, else the default rule
    with the reason."""
    return _lookup(cfg, db, FLOAT, LutGemmKnobs, default_knobs(cfg, threads), threads)


def lookup_int8_knobs(cfg: LutGemmConfig, db: Database | None, threads: int, isa: str):
    """(knobs, how) for ``cfg``'s ``isa`` int8 kernel: the tuned ``int8-<isa>`` record, else the
    default rule (``default_int8_knobs``) with the reason, as ``lookup_knobs``."""
    default = default_int8_knobs(cfg, isa, threads)
    # avx512bw's shared-exponent kernel is another loop (planes inside vpdpbusd, broadcast table
    # registers, one sum per row), so the per-term kernel's knobs do not carry over (VBMI's
    # variant only changes the epilogue)
    borrow = not (isa == "avx512bw" and cfg.shared_exp)
    return _lookup(cfg, db, int8_family(isa), Int8Knobs, default, threads, borrow)


# ----------------------------------------------------------------------------- CUDA records
def load_cuda_records(arch: str) -> tuple[dict, str | None]:
    """Tuned knobs per configuration from ``tuning_logs/cuda_<arch>.json`` (written from a GPU run
    of ``scripts/gpu_check.sh``): ({config JSON: knobs}, description) or ({}, None)."""
    path = tuning_log_dir() / f"cuda_{arch}.json"
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        records = {
            json.dumps(r["config"], sort_keys=True): lut_gemm_cuda.CudaKnobs(**r["knobs"])
            for r in data["records"]
        }
    except (ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable tuning log %s (%s); using default schedules", path, e)
        return {}, None
    return records, f"{path.name} (measured on {data.get('measured_on', 'unknown GPU')})"


def tuned_cuda_knobs(cfg: LutGemmConfig, records: dict) -> tuple:
    """Knobs for ``cfg``: the record of the same configuration, else the record of the same weight
    shape at the nearest M on the same side of ``lut_gemm_cuda.DENSE_FROM_M``, else the default rule; with where
    they came from."""
    exact = records.get(cfg.to_json())
    if exact is not None:
        return exact, "tuned"
    same_shape = []
    regime = (
        cfg.m >= lut_gemm_cuda.DENSE_FROM_M
    )  # a record at M=1 says nothing about LUT vs GEMM at M=512
    for key, kn in records.items():
        c = json.loads(key)
        if (c["n"], c["k"], c["bits"], c["group_size"], c["terms"]) == (
            cfg.n, cfg.k, cfg.bits, cfg.group_size, cfg.terms,
        ) and (c["m"] >= lut_gemm_cuda.DENSE_FROM_M) == regime:  # fmt: skip
            same_shape.append((abs(c["m"] - cfg.m), c["m"], kn))
    if same_shape:
        _, m, kn = min(same_shape, key=lambda t: t[:2])
        try:
            kn.validate(cfg)
            return kn, f"tuned at M={m}"
        except ValueError:
            pass
    return lut_gemm_cuda.default_cuda_knobs(cfg), "default rule (no tuning record)"


# ----------------------------------------------------------------------------- search space
def candidates(cfg: LutGemmConfig, threads: int, trials: int, seed: int = 0) -> list[LutGemmKnobs]:
    """The default knobs first, then a seeded sample of the rest of the grid."""
    default = default_knobs(cfg, threads)
    grid = []
    for mi in (v for v in (1, 2, 4, 8, 16) if cfg.m % v == 0):
        for u in (2, 4, 8, 16):
            n_tiles = -(-cfg.n // u)
            for c in sorted({threads, 2 * threads, 4 * threads, 8 * threads, 16 * threads}):
                kn = LutGemmKnobs(m_inner=mi, n_unroll=u, n_chunks=min(c, n_tiles))
                if kn != default and kn not in grid:
                    grid.append(kn)
    random.Random(seed).shuffle(grid)
    return [default] + grid[: max(0, trials - 1)]


def int8_candidates(
    cfg: LutGemmConfig, isa: str, threads: int, trials: int, seed: int = 0
) -> list[Int8Knobs]:
    """The int8 kernel's default knobs (``default_int8_knobs``) first, then a seeded sample of the
    rest of the grid: ``m_inner`` dividing M in (1, 2, 4, 8, 16), ``n_chunks`` in
    {1, threads, 2, 4, 8 x threads} capped at the number of 32-row tiles, ``build_parallel``."""
    default = default_int8_knobs(cfg, isa, threads)
    n_tiles = -(-cfg.n // ROWS)
    chunks = sorted({min(c, n_tiles) for c in (1, threads, 2 * threads, 4 * threads, 8 * threads)})
    grid = []
    for mi in (v for v in (1, 2, 4, 8, 16) if cfg.m % v == 0):
        for c in chunks:
            for bp in (False, True):
                kn = Int8Knobs(m_inner=mi, n_chunks=c, build_parallel=bp)
                if kn != default and kn not in grid:
                    grid.append(kn)
    random.Random(seed).shuffle(grid)
    return [default] + grid[: max(0, trials - 1)]


def _candidates(cfg: LutGemmConfig, family: str, threads: int, trials: int) -> list:
    if family == FLOAT:
        return candidates(cfg, threads, trials)
    return int8_candidates(cfg, _isa_of(family), threads, trials)


def _isa_of(family: str) -> str:
    return family.removeprefix("int8-")


def _function_name(cfg: LutGemmConfig, family: str) -> str:
    """The exported function of a candidate: ``make_int8_primfunc``'s ``int8_symbol``."""
    return cfg.name if family == FLOAT else int8_symbol(cfg, _isa_of(family))


# ----------------------------------------------------------------------------- build + measure
def _build(cfg_json: str, knobs_json: str, target_json: str, out: str, family: str = FLOAT) -> str:
    """Worker: build one candidate of ``family``'s kernel to a shared library (runs in a separate
    process); its function is named as ``_function_name`` says."""
    import tvm

    cfg = LutGemmConfig(**json.loads(cfg_json))
    if family == FLOAT:
        from .schedules.lut_gemm import make_primfunc

        func = make_primfunc(cfg, LutGemmKnobs(**json.loads(knobs_json)))
    else:
        from .schedules.lut_gemm_int8 import make_int8_primfunc

        func = make_int8_primfunc(cfg, Int8Knobs(**json.loads(knobs_json)), _isa_of(family))
    lib = tvm.compile(
        tvm.IRModule({_function_name(cfg, family): func}),
        target=tvm.target.Target(json.loads(target_json)),
    )
    lib.export_library(out)
    return out


class Runner:
    """Times a built kernel here or on an RPC server / tracker (TVM's device-farm engine)."""

    def __init__(self, rpc: str | None = None, tracker: str | None = None, key: str | None = None):
        self.remote = None
        self.where = "local"
        self._libs: dict[str, object] = {}  # built file -> its loaded module (see _load)
        self._uploads = 0
        if rpc or tracker:
            from tvm import rpc as tvm_rpc

            if tracker:
                host, port = tracker.rsplit(":", 1)
                if not key:
                    raise ConfigError("--rpc-tracker needs --rpc-key (the device key to request)")
                self.remote = tvm_rpc.connect_tracker(host, int(port)).request(key)
                self.where = f"tracker {tracker} key {key}"
            else:
                host, port = rpc.rsplit(":", 1)
                self.remote = tvm_rpc.connect(host, int(port))
                self.where = f"rpc {rpc}"

    def time_us(
        self, so_path: str, cfg: LutGemmConfig, number: int, repeat: int, family: str = FLOAT
    ) -> float:
        """Median time of one call of the built kernel on random weights, in microseconds."""
        import tvm

        from .bench_kernel import random_packed

        x = np.random.default_rng(0).standard_normal((cfg.m, cfg.k)).astype(np.float32)
        # the bench's random weights: each plane's term slots past its count absent, which the
        # int8 kernels require (per-plane counts such as auto's 3,2,2)
        planes, scales = random_packed(
            cfg.n, cfg.k, cfg.bits, cfg.group_size, cfg.terms, 0, cfg.term_counts, cfg.shared_exp
        )
        if family == FLOAT:
            weights = [planes, scales]
        else:
            from .schedules.lut_gemm_int8 import pack_int8

            weights = list(pack_int8(planes, scales, cfg, _isa_of(family)))
        arrays = [x, *weights, np.zeros((cfg.m, cfg.n), np.float32)]
        lib = self._load(so_path)
        dev = self.remote.cpu() if self.remote is not None else tvm.cpu()
        args = [tvm.runtime.tensor(a, dev) for a in arrays]
        timer = lib.time_evaluator(
            _function_name(cfg, family), dev, number=number, repeat=repeat, min_repeat_ms=50
        )
        return float(np.median(timer(*args).results)) * 1e6

    def _load(self, so_path: str):
        """The module of a built file, loaded once per file and uploaded under a name used once:
        uploading a file again over one the RPC server has loaded rewrites a mapped library and
        the server dies (SIGSEGV), so the second measurement round and any later ``tune`` call
        on the same session (whose files have the same names) used to fail."""
        import tvm

        lib = self._libs.get(so_path)
        if lib is None:
            if self.remote is not None:
                self._uploads += 1
                name = f"u{self._uploads}_{Path(so_path).name}"
                self.remote.upload(so_path, name)
                lib = self.remote.load_module(name)
            else:
                lib = tvm.runtime.load_module(so_path)
            self._libs[so_path] = lib
        return lib

    def release(self) -> None:
        """Drop the loaded modules (``tune`` does after each kernel: their files are deleted)."""
        self._libs.clear()


def _size_thread_pool(threads: int) -> int:
    """Run this process's TVM kernels on ``threads`` threads (the target's cores) for local
    measurements; returns the count in effect. Unset, TVM's pool has half the logical CPUs on x86
    (one on a 2-vCPU machine), so the thread knobs (``n_chunks``, ``build_parallel``) were timed
    on one thread and the records did not hold on two (Zen 5: a tuned M=128 kernel 2.6x slower
    than the default rule on two threads). The pool is created once per process; if it already
    has fewer threads, says so."""
    from .bench_kernel import resize_tvm_pool

    os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # sizes the pool if none exists yet
    got = resize_tvm_pool(threads)
    if got != threads:
        log.warning(
            "measuring on %d TVM thread(s), not the target's %d: the records will hold only on %d "
            "thread(s), not for this target's kernels (start a fresh process with "
            "TVM_NUM_THREADS=%d)",
            got,
            threads,
            got,
            threads,
        )
    return got


def tune(
    configs: list[LutGemmConfig],
    target: dict,
    trials: int = 16,
    runner: Runner | None = None,
    workers: int = 2,
    retune: bool = False,
    max_tasks: int | None = None,
    progress: bool = True,
    kernel: str = "auto",
) -> dict:
    """Tune each distinct configuration; returns a summary (per kernel: default vs tuned time).

    ``kernel``: which kernel family to tune (``kernel_family``): ``"auto"`` what ``compile()``
    builds for ``target`` (the int8 kernel of its ISA where it has one), ``"float"`` the
    float-table kernel, ``"int8"`` the int8 kernel (ConfigError where the target has none)."""
    from .cpu_features import kernel_isa, require_host_isa

    key = target_key(target)
    if kernel not in KERNEL_CHOICES:
        raise ConfigError(f"kernel={kernel!r}: one of {', '.join(KERNEL_CHOICES)}")
    isa = kernel_isa(target)  # as compile() detects it: what LLVM enables for the target
    configs = list(dict.fromkeys(configs))
    int16 = _int16_routed(configs, target, isa) if kernel == "auto" else []
    for cfg in int16:
        log.info(
            "skip %s: compile() runs it on the int16 GEMM (many rows, AVX-512 BW + VNNI), "
            "which has no tuned knobs",
            cfg.name,
        )
    families = {cfg: kernel_family(cfg, isa, kernel) for cfg in configs if cfg not in int16}
    db = Database(log_path(target))
    threads = threads_of(target)
    runner = runner or Runner()
    if runner.remote is None:  # LLVM emits the target's ISA in every kernel, float-table ones too
        require_host_isa(
            isa,
            f"tuning locally for target {target}",
            "tune on a machine that has them (--rpc / --rpc-tracker) or for a target this CPU "
            "supports",
        )
    measured_threads = _size_thread_pool(threads) if runner.remote is None else threads
    meta = {
        "target": target,
        "key": key,
        "cpu": _cpu_name(),
        "measured_with": runner.where,
        "measured_threads": measured_threads,
        "source": "shiftadd-tvm tune (random search over the knobs of schedules/lut_gemm.py "
        "(kernel float) and schedules/lut_gemm_int8.py (kernel int8-<isa>))",
    }
    todo = []
    for cfg, family in families.items():  # distinct, in order
        if db.get(cfg, family) is not None and not retune:
            log.info("skip %s (%s): already tuned (%s)", cfg.name, family, db.path.name)
            continue
        todo.append((cfg, family))
    if max_tasks is not None:
        todo = todo[:max_tasks]
    summary = {
        "target_key": key,
        "log": str(db.path),
        "runner": runner.where,
        "kernel": kernel,
        "isa": isa,
        "int16_gemm": [cfg.name for cfg in int16],
        "kernels": [],
    }
    t_start = time.time()
    spec_json = json.dumps(target, sort_keys=True)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding TVM's threads
    with (
        tempfile.TemporaryDirectory() as tmp,
        ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool,
    ):
        bar = tqdm(total=len(todo) * trials, desc="tuning", unit="trial", disable=not progress)
        for ti, (cfg, family) in enumerate(todo):
            cands = _candidates(cfg, family, threads, trials)
            futures = [
                pool.submit(
                    _build,
                    cfg.to_json(),
                    json.dumps(dataclasses.asdict(kn)),
                    spec_json,
                    str(Path(tmp) / f"t{ti}_c{ci}.so"),
                    family,
                )  # fmt: skip
                for ci, kn in enumerate(cands)
            ]
            built: list[str | None] = []
            # every build finishes first: no build process competes with the measurements
            for kn, fut in zip(cands, futures, strict=True):
                try:
                    built.append(fut.result())
                except Exception as e:  # noqa: BLE001 - a failed candidate is skipped, and logged
                    log.warning("%s (%s) %s failed to build: %s", cfg.name, family, kn, e)
                    built.append(None)
            times = [float("inf")] * len(cands)
            for _round in range(2):  # two rounds in alternating order: no order bias
                order = range(len(cands)) if _round == 0 else reversed(range(len(cands)))
                for i in order:
                    if built[i] is None:
                        continue
                    try:
                        us = runner.time_us(built[i], cfg, number=5, repeat=5, family=family)
                    except Exception as e:  # noqa: BLE001
                        log.warning("%s (%s) %s failed to run: %s", cfg.name, family, cands[i], e)
                        built[i] = None
                        continue
                    times[i] = min(times[i], us)
                    if _round == 0:
                        bar.update(1)
            runner.release()
            default_us = times[0]
            if default_us == float("inf"):  # no baseline to beat: record nothing (a rerun retries)
                log.warning("%s (%s): the default schedule failed; no record", cfg.name, family)
                continue
            best = min(range(len(cands)), key=lambda i: times[i])
            if not times[best] < default_us * (1 - NOISE_MARGIN):
                best = 0  # within noise of the default: keep the default
            rec = {
                "kernel": family,
                "knobs": dataclasses.asdict(cands[best]),
                "us": times[best],
                "default_us": default_us,
                "trials": len(cands),
                "threads": measured_threads,
            }
            db.put(cfg, rec, meta)
            summary["kernels"].append({**rec, "name": cfg.name})
            log.info(
                "%s (%s): default %.0f us -> tuned %.0f us (%s)",
                cfg.name, family, default_us, times[best], cands[best],
            )  # fmt: skip
        bar.close()
    summary["tuning_s"] = round(time.time() - t_start, 1)
    return summary


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _int16_routed(configs, target: dict, isa: str) -> list:
    """The configurations ``compile()`` (tables "auto") runs on the int16 GEMM for ``target``."""
    from .cpu_features import int16_gemm_target
    from .schedules import int16_gemm

    if not int16_gemm_target(target, isa):
        return []
    return [c for c in configs if int16_gemm.picks(c)]


def model_configs(
    model, bits: list[int], group_size: int, terms, seq_len: int, shared_exp: bool = False
) -> list[LutGemmConfig]:
    """The distinct LUT kernel configurations ``compile()`` builds for ``model`` (a HF causal LM)
    at these bit widths: one per distinct Linear shape of the transformer blocks, M = ``seq_len``.
    ``terms``: as ``compile(terms=...)`` (a count, or per-plane counts such as ``"3,2"``).
    ``shared_exp``: the configs of a windowed fit (``compile(scale_window=8)``) on a target with
    a shared-exponent kernel (``cpu_features.shared_exp_target``)."""
    from .calibrate import target_linears
    from .quant import kernel_terms

    shapes = {(lin.out_features, lin.in_features) for lin in target_linears(model).values()}
    out = []
    for b in bits:
        width, counts = kernel_terms(b, group_size, terms)
        for n, k in sorted(shapes):
            out.append(LutGemmConfig(seq_len, n, k, b, group_size, width, counts, shared_exp))
    return out
