"""Relax pass: chosen weight matmuls -> call of the shift GEMM kernel (``schedules/shift_gemm.py``).

Matches the same forms as ``lut_rewrite``: ``matmul(x, permute_dims(W[N, K]))`` (``nn.Linear``) and
``matmul(x, W[K, N])``, with ``W`` a graph constant or a function parameter named in ``params``; a
weight broadcast over a batch dimension (``broadcast_to(permute_dims(W), [B, K, N])``, which
torch.export emits for some 3-D Linear inputs) is matched too. ``choose(key, W[N, K])`` returns a
``ShiftPacked`` weight or ``None`` to leave the matmul for later passes (the LUT rewrite, or dense).
The rewrite is

    y2d = call_tir(shift_gemm_<config>, [reshape(x, [M, K]), const codes, const base])
    y   = reshape(y2d, x.shape[:-1] + [N])

Run it before ``lut_rewrite.rewrite_matmuls``: matmuls it rewrote are no longer matmuls, so the LUT
pass sees only the rest. Every rewrite is recorded (weight key, shape, kernel).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import numpy as np

from ..schedules.cpu_rules import KERNEL_ATTR
from ..schedules.shift_gemm import ShiftGemmConfig, ShiftPacked, default_knobs, make_primfunc

log = logging.getLogger(__name__)

ChooseFn = Callable[[str, np.ndarray], "ShiftPacked | None"]


@dataclasses.dataclass
class ShiftRecord:
    rewritten: list[dict] = dataclasses.field(default_factory=list)
    skipped: list[dict] = dataclasses.field(default_factory=list)
    kernels: dict[str, dict] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{len(self.rewritten)} matmuls rewritten to shift kernels "
            f"({len(self.kernels)} distinct kernels); {len(self.skipped)} left to later passes"
        )


def weight_operand(expr, lookup, params: dict):
    """``(key, W[N, K])`` if ``expr`` (a matmul's right operand) is a constant weight, else None:
    ``lut_rewrite.weight_operand``, also seeing through ``broadcast_to`` (the same weight for every
    batch entry of a batched matmul)."""
    import tvm
    from tvm import relax

    from .lut_rewrite import resolve_binding
    from .lut_rewrite import weight_operand as lut_weight_operand

    e = resolve_binding(expr, lookup)
    if isinstance(e, relax.Call) and e.op.same_as(tvm.ir.Op.get("relax.broadcast_to")):
        e = e.args[0]
    found = lut_weight_operand(e, lookup, params)
    if found is None:
        return None
    return found[0], np.ascontiguousarray(found[1])


def rewrite_shift(mod, choose: ChooseFn, params: dict | None = None, func_name: str = "main"):
    """Rewrite the chosen weight matmuls of ``mod[func_name]``; returns ``(mod, ShiftRecord)``."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul_op = tvm.ir.Op.get("relax.matmul")
    params = params or {}
    record = ShiftRecord()

    @mutator
    class _Rewriter(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod
            self.gvars: dict = {}

        def kernel(self, cfg: ShiftGemmConfig):
            if cfg not in self.gvars:
                kn = default_knobs(cfg)
                func = make_primfunc(cfg, kn).with_attr("op_pattern", 8).with_attr(KERNEL_ATTR, 1)
                self.gvars[cfg] = self.builder_.add_func(func, cfg.name)
                record.kernels[cfg.name] = {
                    "config": dataclasses.asdict(cfg),
                    "knobs": dataclasses.asdict(kn),
                    "kind": "shift",
                }
            return self.gvars[cfg]

        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not call.op.same_as(matmul_op):
                return call
            x, w = call.args
            found = weight_operand(w, self.lookup_binding, params)
            if found is None:
                return call
            key, wnk = found
            n, k = (int(s) for s in wnk.shape)
            entry = {"weight": key, "n": n, "k": k}
            xshape = x.ty.shape
            if x.ty.dtype != "float32" or xshape is None:
                record.skipped.append({**entry, "reason": "non-float32 or unknown activation"})
                return call
            if not all(isinstance(s, tvm.tirx.IntImm) for s in xshape):
                record.skipped.append({**entry, "reason": "dynamic activation shape"})
                return call
            packed = choose(key, wnk)
            if packed is None:
                record.skipped.append({**entry, "reason": "not chosen for shift"})
                return call
            if (packed.n, packed.k) != (n, k):
                raise ValueError(f"shift weight for {key} has shape {(packed.n, packed.k)}")
            dims = [int(s) for s in xshape]
            m = int(np.prod(dims[:-1]))
            cfg = ShiftGemmConfig(m, n, k, packed.group_size)
            gv = self.kernel(cfg)
            record.rewritten.append({**entry, "m": m, "kernel": cfg.name})
            x2 = x if len(dims) == 2 else self.builder_.emit(relax.op.reshape(x, (m, k)))
            y = relax.call_tir(
                gv,
                [x2, relax.const(packed.codes), relax.const(packed.base)],
                out_ty=relax.TensorType((m, n), "float32"),
            )
            if len(dims) == 2:
                return y
            return relax.op.reshape(self.builder_.emit(y), dims[:-1] + [n])

        def run(self, name):
            func = self.mod_[name]
            self.builder_.update_func(self.mod_.get_global_var(name), self.visit_expr(func))
            return self.builder_.get()

    new_mod = _Rewriter(mod).run(func_name)
    new_mod = relax.transform.DeadCodeElimination()(new_mod)
    log.info("shift rewrite: %s", record.summary())
    return new_mod, record
