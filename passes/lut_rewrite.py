"""Relax pass: dense matmul with a constant weight -> call of the LUT/shift kernel.

Matches ``matmul(x, permute_dims(W[N, K]))`` (torch ``nn.Linear``) and ``matmul(x, W[K, N])`` (ONNX
MatMul/Gemm, HF Conv1D), where ``W`` is a constant or a function parameter the caller names. The
``quantize`` callback decides per weight: it returns the packed bit-planes and scale codes, or
``None`` with a reason to keep the matmul dense. The rewrite replaces the matmul by

    y2d = call_tir(lut_gemm_<config>, [reshape(x, [M, K]), const planes, const scales])
    y   = reshape(y2d, x.shape[:-1] + [N])

One kernel per distinct configuration is added to the module (call sites share it). Every matmul
seen is recorded as rewritten or left dense (with the reason), so compile reports can say exactly
what runs multiplication-free.

On llvm targets the kernel is the int8-table kernel of ``cpu_isa`` (``schedules/lut_gemm_int8.py``:
``avx512``, ``avx512bw``, ``avx2``, ``neon``; its weights re-laid out by ``pack_int8``) or the
float-table kernel (``generic``, ``schedules/lut_gemm.py``). A configuration the int8 kernel
cannot run falls back to the float kernel with a warning, and is counted in
``RewriteRecord.int8_fallbacks``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable

import numpy as np

from ..cpu_features import shared_exp_isa
from ..schedules import dense_gemm, int16_gemm, lut_gemm_cuda, lut_gemm_int8
from ..schedules.cpu_rules import KERNEL_ATTR
from ..schedules.lut_gemm import LutGemmConfig, LutGemmKnobs, default_knobs, make_primfunc
from ..schedules.packing import plane_term_counts, shared_exponent_form

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PackedLinear:
    """A reparameterized weight in the kernel format (see ``schedules/packing.py``)."""

    planes: np.ndarray  # uint8[bits, N, Kp // 8]
    scales: np.ndarray  # int8[bits, N, Kp // group_size, terms]
    n: int
    k: int
    group_size: int

    @property
    def bits(self) -> int:
        return int(self.planes.shape[0])

    @property
    def terms(self) -> int:
        return int(self.scales.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(self.planes.nbytes + self.scales.nbytes)


@dataclasses.dataclass
class RewriteRecord:
    """What the pass rewrote and what it left dense."""

    rewritten: list[dict] = dataclasses.field(default_factory=list)
    dense: list[dict] = dataclasses.field(default_factory=list)
    kernels: dict[str, dict] = dataclasses.field(default_factory=dict)
    int8_fallbacks: int = 0  # CPU kernels that could not use the int8 kernel of the target's ISA
    # layers whose scales lack the shared-exponent form the shared_exp option asked for
    shared_exp_missed: int = 0
    # large-M call sites kept on the table kernel because their weights do not fit the int16 GEMM
    int16_misfits: int = 0
    low_takes: int = 0  # embedding lookups moved to a dense weight's float16 table

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for d in self.dense:
            reasons[d["reason"]] = reasons.get(d["reason"], 0) + 1
        why = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())) or "none"
        slow = f"; {self.int8_fallbacks} on the float-table kernel" if self.int8_fallbacks else ""
        if self.shared_exp_missed:
            slow += f"; {self.shared_exp_missed} without a shared exponent (per-term kernel)"
        if self.int16_misfits:
            slow += (
                f"; {self.int16_misfits} large-M on the table kernel (weights too wide for int16)"
            )
        return (
            f"{len(self.rewritten)} matmuls rewritten to LUT kernels "
            f"({len({r['kernel'] for r in self.rewritten})} distinct kernels{slow}); "
            f"{len(self.dense)} left dense: {why}"
        )


def const_key(arr: np.ndarray) -> str:
    """Stable key of a constant weight as stored in the graph (content digest)."""
    import hashlib

    a = np.ascontiguousarray(arr)
    h = hashlib.sha1(f"{a.dtype}{a.shape}".encode() + a.tobytes()).hexdigest()[:16]
    return f"const:{h}"


def resolve_binding(expr, lookup):
    """Follow variable bindings (``lookup(var)`` -> bound expression or None) to the expression."""
    from tvm import relax

    while isinstance(expr, relax.Var):
        bound = lookup(expr)
        if bound is None:
            break
        expr = bound
    return expr


def weight_operand(expr, lookup, params: dict):
    """``(key, W[N, K], expr of W[N, K] or None)`` if ``expr`` (a matmul's right operand) is a
    constant weight, else None.

    Matches ``permute_dims(W[N, K])`` (torch ``nn.Linear``; the third item is W's expression) and
    ``W[K, N]`` itself (ONNX MatMul/Gemm, HF Conv1D; third item None). ``W`` is a function
    parameter named in ``params`` or a graph constant; keys are the parameter name or the content
    digest ``const_key`` so callers can map them back to the model's weights.
    """
    import tvm
    from tvm import relax

    permute_op = tvm.ir.Op.get("relax.permute_dims")

    def const_2d(e) -> tuple[str, np.ndarray] | None:
        e = resolve_binding(e, lookup)
        if isinstance(e, relax.Var) and str(e.name) in params:
            arr = params[str(e.name)]
            return (str(e.name), np.asarray(arr)) if np.ndim(arr) == 2 else None
        if isinstance(e, tvm.ir.Constant) and isinstance(e.value, tvm.runtime.Tensor):
            if len(e.value.shape) == 2:
                arr = e.value.numpy()
                return const_key(arr), arr
        return None

    e = resolve_binding(expr, lookup)
    if isinstance(e, relax.Call) and e.op.same_as(permute_op):
        axes = e.attrs.axes
        src = const_2d(e.args[0])
        if src is not None and (axes is None or [int(a) for a in axes] == [1, 0]):
            return src[0], src[1], e.args[0]
        return None
    src = const_2d(e)
    if src is not None:
        return src[0], src[1].T, None
    return None


# quantize(key, W[N, K]) -> PackedLinear | str (reason to keep dense)
QuantizeFn = Callable[[str, np.ndarray], "PackedLinear | str"]
KnobsFn = Callable[[LutGemmConfig], LutGemmKnobs]


def rewrite_matmuls(
    mod,
    quantize: QuantizeFn,
    params: dict | None = None,
    knobs: KnobsFn = default_knobs,
    func_name: str = "main",
    dense_kernel: bool = True,
    target_kind: str = "llvm",
    cuda_knobs=None,
    cpu_isa: str = "generic",
    int8_knobs=None,
    dense_weight_dtype: str = "float32",
    shared_exp: bool = False,
    int16_gemm_ok: bool = False,
    vnni: bool = False,
):
    """Rewrite the matmuls of ``mod[func_name]``; returns ``(new_mod, RewriteRecord)``.

    ``params`` maps function-parameter names to their numpy values (weights kept as parameters by
    the frontend); constants in the graph are read directly. Weight matmuls the quantizer keeps
    dense run on the scheduled dense kernel (``dense_kernel=True``) instead of Relax's unscheduled
    legalization. ``target_kind="cuda"`` emits the CUDA kernel with its coalesced weight layouts
    (``schedules/lut_gemm_cuda.py``; ``knobs`` is then ignored) and leaves dense matmuls to the
    CUDA pipeline's dlight schedules; ``cuda_knobs(cfg) -> (CudaKnobs, source)`` picks its
    schedule (default: the rule in ``lut_gemm_cuda.default_cuda_knobs``). ``cpu_isa`` (from
    ``cpu_features.kernel_isa`` of the target) picks the CPU kernel; ``int8_knobs(cfg) ->
    (Int8Knobs, source)`` its schedule (default: ``lut_gemm_int8.default_int8_knobs``, 2 threads).
    ``dense_weight_dtype="float16"`` (CPU targets): a weight kept dense is stored as float16 (the
    kernels widen it: float32 products and sums), and an embedding lookup (``take``) of the same
    table (a tied output head) reads that float16 table too (its rows widened), so the float32
    table drops out of the function: half the bytes a decode step's head streams, and of the
    artifact's table. An embedding not tied to a dense matmul weight stays float32.
    ``shared_exp`` (with ``cpu_isa="avx512"``, or ``"avx512bw"`` and ``vnni``: the target enables
    AVX-512 VNNI): a layer whose scales have ``packing.shared_exponent_form`` (a fit with
    ``QuantConfig.scale_window``) runs the int8 kernel that applies them with one shift per group
    (on avx512bw with many rows the int16 GEMM reads that packing too); other layers keep the
    per-term kernel (logged, counted in ``RewriteRecord.shared_exp_missed``), and so does every
    layer on any other target (one warning; every layer counted).
    ``int16_gemm_ok`` (``cpu_isa="avx512bw"`` on a target with AVX-512 VNNI): a call site with many
    activation rows (``int16_gemm.prefers``) runs ``schedules/int16_gemm.py`` (dequantize to int16,
    VNNI GEMM) on the same packed weights as the table kernel; a layer whose weights do not fit its
    16-bit integers keeps the table kernel (logged, counted in ``RewriteRecord.int16_misfits``).
    """
    if dense_weight_dtype not in dense_gemm.WEIGHT_DTYPES:
        raise ValueError(
            f"dense_weight_dtype={dense_weight_dtype!r}: one of {dense_gemm.WEIGHT_DTYPES}"
        )
    cuda = target_kind == "cuda"
    shared_ok = not cuda and shared_exp_isa(cpu_isa, vnni)
    if shared_exp and not shared_ok:
        log.warning(
            "shared-exponent scales are applied with one shift per group by the AVX-512 VBMI and "
            "AVX-512 BW + VNNI kernels only; the %s kernels apply them term by term (same values, "
            "no speedup)",
            "CUDA" if cuda else f"{cpu_isa}{'' if vnni else ' (no VNNI)'}",
        )
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul_op = tvm.ir.Op.get("relax.matmul")
    params = params or {}
    record = RewriteRecord()

    @mutator
    class _Rewriter(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod
            self.gvars: dict[object, object] = {}
            self.cuda_knobs: dict[LutGemmConfig, object] = {}  # cfg -> CudaKnobs
            self.int8_isa: dict[LutGemmConfig, str] = {}  # cfg -> ISA of its int8 kernel
            self.low: dict[str, object] = {}  # dense weight key -> its float16 constant

        def add_kernel(self, cfg, func, info: dict):
            if cfg not in self.gvars:
                func = func.with_attr("op_pattern", 8).with_attr(
                    KERNEL_ATTR, 1
                )  # opaque: no fusion
                self.gvars[cfg] = self.builder_.add_func(func, cfg.name)
                conf = (
                    json.loads(cfg.to_json())  # (no plane_terms key when uniform)
                    if isinstance(cfg, LutGemmConfig)
                    else dataclasses.asdict(cfg)
                )
                record.kernels[cfg.name] = {"config": conf, **info}
            return self.gvars[cfg]

        def kernel(self, cfg: LutGemmConfig):
            """The global var of cfg's kernel (built once per configuration), and its CUDA knobs
            (None on the CPU)."""
            if cfg in self.gvars:
                return self.gvars[cfg], self.cuda_knobs.get(cfg)
            if cuda:
                kn, source = (
                    (lut_gemm_cuda.default_cuda_knobs(cfg), "default rule")
                    if cuda_knobs is None
                    else cuda_knobs(cfg)
                )
                self.cuda_knobs[cfg] = kn
                info = {"knobs": dataclasses.asdict(kn), "schedule": source}
                if kn.dense:  # large M: multiplication-free dequantize, then a dense GEMM
                    func = lut_gemm_cuda.make_dequant_primfunc(cfg, kn.dense)
                    return self.add_kernel(cfg, func, {**info, "kind": "dequant+gemm"}), kn
                func = lut_gemm_cuda.make_cuda_primfunc(cfg, kn)
                return self.add_kernel(cfg, func, {**info, "kind": "lut-cuda"}), kn
            why = None
            if cpu_isa != "generic":
                why = lut_gemm_int8.unsupported_reason(cfg, cpu_isa)
                if why is None:
                    kn, how = (
                        (lut_gemm_int8.default_int8_knobs(cfg, cpu_isa), "default rule")
                        if int8_knobs is None
                        else int8_knobs(cfg)
                    )
                    self.int8_isa[cfg] = cpu_isa
                    func = lut_gemm_int8.make_int8_primfunc(cfg, kn, cpu_isa)
                    info = {
                        "kind": "lut-int8",
                        "isa": cpu_isa
                        + ("+vnni" if cfg.shared_exp and cpu_isa == "avx512bw" else ""),
                        "knobs": dataclasses.asdict(kn),
                        "schedule": how,
                    }
                    return self.add_kernel(cfg, func, info), None
                record.int8_fallbacks += 1
                log.warning("%s: float-table kernel instead of %s int8: %s", cfg.name, cpu_isa, why)
            kn = knobs(cfg)
            kn, how = kn if isinstance(kn, tuple) else (kn, "default rule")
            info = {"kind": "lut-float", "isa": "generic", "knobs": dataclasses.asdict(kn)}
            info["schedule"] = how
            if why:
                info["int8_fallback"] = why
            return self.add_kernel(cfg, make_primfunc(cfg, kn), info), None

        def large_m(self, cfg, key, scales) -> bool:
            """Whether this call site runs the int16 GEMM (``int16_gemm_ok``, enough rows, and the
            layer's weights fit); a layer that does not fit is logged and counted."""
            if not (int16_gemm_ok and cpu_isa == "avx512bw" and not cuda):
                return False
            if not int16_gemm.picks(cfg):
                return False
            why = int16_gemm.misfit_reason(scales, cfg.shared_exp)
            if why:
                record.int16_misfits += 1
                log.warning(
                    "%s (m=%d): table kernel instead of the int16 GEMM: %s", key, cfg.m, why
                )
                return False
            return True

        def int16_kernel(self, cfg):
            ikey = ("int16", cfg)
            if ikey not in self.gvars:
                func = int16_gemm.make_primfunc(cfg).with_attr("op_pattern", 8)
                func = func.with_attr(KERNEL_ATTR, 1)
                self.gvars[ikey] = self.builder_.add_func(func, int16_gemm.symbol(cfg))
                record.kernels[int16_gemm.symbol(cfg)] = {
                    "config": json.loads(cfg.to_json()),
                    "kind": "int16-gemm",
                    "isa": "avx512bw+vnni",
                    "knobs": dataclasses.asdict(int16_gemm.Int16Knobs()),
                    "schedule": "rule (int16_gemm.prefers: many rows)",
                }
            return self.gvars[ikey]

        def call(self, gv, x, dims, m, k, n, weights):
            x2 = x if len(dims) == 2 else self.builder_.emit(relax.op.reshape(x, (m, k)))
            y = relax.call_tir(gv, [x2, *weights], out_ty=relax.TensorType((m, n), "float32"))
            if len(dims) == 2:
                return y
            return relax.op.reshape(self.builder_.emit(y), dims[:-1] + [n])

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(matmul_op):
                return call
            x, w = call.args
            found = weight_operand(w, self.lookup_binding, params)
            if found is None:
                return call  # activation x activation (attention): not a weight matmul
            key, wnk, nk_expr = found
            n, k = (int(s) for s in wnk.shape)
            xshape = x.ty.shape
            entry = {"weight": key, "n": n, "k": k}
            if x.ty.dtype != "float32":
                record.dense.append(
                    {
                        **entry,
                        "reason": f"activation dtype {x.ty.dtype} (kernel takes float32)",
                        "fallback": True,
                    }
                )
                return call
            if xshape is None or not all(isinstance(s, tvm.tirx.IntImm) for s in xshape):
                record.dense.append(
                    {
                        **entry,
                        "reason": "dynamic activation shape (compile for a static --seq-len)",
                        "fallback": True,
                    }
                )
                return call
            dims = [int(s) for s in xshape]
            m = int(np.prod(dims[:-1]))
            packed = quantize(key, wnk)
            if isinstance(packed, str):
                if not dense_kernel and not cuda:
                    record.dense.append({**entry, "reason": packed, "kernel": "relax-legalized"})
                    return call
                wdt = "float32" if cuda else dense_weight_dtype
                cfg = dense_gemm.DenseGemmConfig(m, n, k, wdt)
                if cuda:  # dlight schedules it; W[N, K] read in place (no transposed copy)
                    func = dense_gemm.make_nt_primfunc(cfg)
                    gv = self.add_kernel(cfg, func, {"kind": "dense", "schedule": "dlight"})
                else:
                    info = {"kind": "dense", "weight_dtype": wdt}
                    gv = self.add_kernel(cfg, dense_gemm.make_primfunc(cfg), info)
                if wdt != "float32":  # one rounded table, shared by content across functions
                    w_arg = self.rounded(key, wnk, wdt)
                elif nk_expr is not None:
                    w_arg = nk_expr
                else:
                    w_arg = relax.const(np.ascontiguousarray(wnk))
                record.dense.append(
                    {**entry, "m": m, "reason": packed, "kernel": cfg.name, "weight_dtype": wdt}
                )
                return self.call(gv, x, dims, m, k, n, [w_arg])
            if (packed.n, packed.k) != (n, k):
                raise ValueError(
                    f"quantizer returned shape {(packed.n, packed.k)} for {key} {(n, k)}"
                )
            shared = shared_exp and shared_ok
            if shared_exp and not shared:  # the target's kernel applies the scales term by term
                record.shared_exp_missed += 1
            elif shared and shared_exponent_form(packed.scales) is None:
                shared = False
                record.shared_exp_missed += 1
                log.warning("%s: scales lack a shared exponent: per-term int8 kernel", key)
            cfg = LutGemmConfig(
                m,
                n,
                k,
                packed.bits,
                packed.group_size,
                packed.terms,
                plane_term_counts(packed.scales),
                shared_exp=shared,
            )
            if self.large_m(cfg, key, packed.scales):
                gv, kn = self.int16_kernel(cfg), None
                self.int8_isa.setdefault(cfg, "avx512bw")  # its packing
                name = int16_gemm.symbol(cfg)
            else:
                (gv, kn), name = self.kernel(cfg), cfg.name
            record.rewritten.append({**entry, "m": m, "bits": packed.bits, "kernel": name})
            planes, scales = packed.planes, packed.scales
            if cuda:
                planes = lut_gemm_cuda.planes_to_cuda(planes)
                scales = lut_gemm_cuda.scales_to_cuda(scales)
            elif cfg in self.int8_isa:
                planes, scales = lut_gemm_int8.pack_int8(planes, scales, cfg, self.int8_isa[cfg])
            weights = [relax.const(planes), relax.const(scales)]
            if kn is not None and kn.dense:
                return self.dense_call(gv, kn.dense, x, dims, m, k, n, weights)
            return self.call(gv, x, dims, m, k, n, weights)

        def rounded(self, key, wnk, dtype):
            """The dense weight ``key`` as a ``dtype`` constant (one object per weight)."""
            if key not in self.low:
                self.low[key] = relax.const(np.ascontiguousarray(wnk, dtype=dtype))
            return self.low[key]

        def dense_call(self, gv, dtype, x, dims, m, k, n, weights):
            """wt = dequantize(planes, scales) [K, N]; y = x @ wt (dense GEMM, f32 accumulate)."""
            wt = self.builder_.emit(
                relax.call_tir(gv, weights, out_ty=relax.TensorType((k, n), dtype))
            )
            x2 = x if len(dims) == 2 else self.builder_.emit(relax.op.reshape(x, (m, k)))
            if dtype != "float32":
                x2 = self.builder_.emit(relax.op.astype(x2, dtype))
            y = relax.op.matmul(x2, wt, out_dtype="float32")
            if len(dims) == 2:
                return y
            return relax.op.reshape(self.builder_.emit(y), dims[:-1] + [n])

        def run(self, name):
            func = self.mod_[name]
            self.builder_.update_func(self.mod_.get_global_var(name), self.visit_expr(func))
            return self.builder_.get()

    rewriter = _Rewriter(mod)
    new_mod = rewriter.run(func_name)
    if rewriter.low:  # embedding lookups of the tables now stored at low precision
        new_mod = _rewrite_takes(new_mod, func_name, rewriter.low, params, record)
    new_mod = relax.transform.DeadCodeElimination()(new_mod)
    log.info("LUT rewrite: %s", record.summary())
    return new_mod, record


def _rewrite_takes(mod, func_name: str, low: dict, params: dict, record: RewriteRecord):
    """``take(W, ids, axis=0)`` -> ``astype(take(W_low, ids, axis=0), float32)`` for each table
    ``W`` (a parameter named in ``params`` or a constant) whose low-precision constant ``low``
    holds (the dense matmuls already read it)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    take_op = tvm.ir.Op.get("relax.take")

    @mutator
    class _Takes(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(take_op) or call.attrs.axis is None:
                return call
            if int(call.attrs.axis) != 0:  # rows of the table only
                return call
            data = resolve_binding(call.args[0], self.lookup_binding)
            keys = []
            if isinstance(data, relax.Var) and str(data.name) in params:
                keys = [str(data.name)]
            elif isinstance(data, tvm.ir.Constant) and len(data.value.shape) == 2:
                table = data.value.numpy()  # the head stored as W[N, K] or (ONNX) W[K, N]
                keys = [const_key(table), const_key(table.T)]
            key = next((k for k in keys if k in low), None)
            if key is None or call.ty.dtype != "float32":
                return call
            rows = self.builder_.emit(
                relax.op.take(low[key], call.args[1], axis=0, mode=call.attrs.mode)
            )
            record.low_takes += 1
            return relax.op.astype(rows, "float32")

        def run(self, name):
            func = mod[name]
            self.builder_.update_func(mod.get_global_var(name), self.visit_expr(func))
            return self.builder_.get()

    return _Takes(mod).run(func_name)
