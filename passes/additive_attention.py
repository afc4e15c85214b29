"""Relax passes on ``R.nn.attention`` sites (layout ``[B, S, H, D]``, additive key bias).

``rewrite_attention(mod, plans)``: the attention sites listed in ``plans`` (by order of
appearance, 0-based) become the Hamming attention of ``schedules/hamming_attention.py``:

    qc = call_tir(binary_codes_<cfg>, [q, proj])        # uint64 [B, H, S, W]
    kc = call_tir(binary_codes_<cfg>, [k, proj])
    out = call_tir(hamming_attention_<cfg>, [qc, kc, v, keymask, table])

with ``proj`` and ``table`` the constants of the site's ``AttentionPlan`` and ``keymask`` the
site's bias read back as a key-padding mask (bias > -1e4 is a token). Only key-padding biases
of shape ``[B, 1, 1, S]`` are accepted (what ``encoder.py`` emits); any other bias, or a causal
mask, leaves the site unchanged and is recorded as skipped.

``decompose_attention(mod)``: the remaining sites become ``matmul / softmax / matmul`` so the
CPU schedules (``schedules/cpu_rules.py``) handle them like any attention matmul.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ..schedules import hamming_attention as ha
from ..schedules.cpu_rules import KERNEL_ATTR

log = logging.getLogger(__name__)


@dataclasses.dataclass
class AttentionRecord:
    rewritten: list[dict] = dataclasses.field(default_factory=list)
    skipped: list[dict] = dataclasses.field(default_factory=list)
    decomposed: int = 0

    def summary(self) -> str:
        return (
            f"{len(self.rewritten)} attention sites rewritten to Hamming kernels, "
            f"{len(self.skipped)} skipped, {self.decomposed} decomposed to float matmuls"
        )


def _is_attention(call) -> bool:
    """``R.nn.attention`` prints (and is registered) as ``relax.nn.attention_bias`` with a bias."""
    import tvm

    return any(
        call.op.same_as(tvm.ir.Op.get(n)) for n in ("relax.nn.attention", "relax.nn.attention_bias")
    )


def _mutate(mod, visit, func_name="main"):
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class _M(PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.mod_ = mod

        def visit_call_(self, call):
            call = super().visit_call_(call)
            out = visit(self, call)
            return call if out is None else out

        def run(self, name):
            func = self.mod_[name]
            self.builder_.update_func(self.mod_.get_global_var(name), self.visit_expr(func))
            return self.builder_.get()

    return _M(mod).run(func_name)


def _static_shape(expr) -> list[int] | None:
    import tvm

    shape = expr.ty.shape
    if shape is None or not all(isinstance(s, tvm.tirx.IntImm) for s in shape):
        return None
    return [int(s) for s in shape]


def decompose_attention(mod, func_name: str = "main"):
    """Every remaining ``R.nn.attention`` -> ``softmax(q k^T * scale + bias) v`` in Relax ops."""
    import tvm
    from tvm import relax

    count = [0]

    def visit(m, call):
        if not isinstance(call.op, tvm.ir.Op) or not _is_attention(call):
            return None
        q, k, v = call.args[:3]
        bias = call.args[3] if len(call.args) > 3 else None
        if call.attrs.causal_mask is not None:
            raise ValueError("decompose_attention: causal masks are not supported")
        bb = m.builder_
        b, s, h, d = _static_shape(q)
        scale = call.attrs.scale
        scale = float(scale) if scale is not None else d**-0.5
        qt = bb.emit(relax.op.permute_dims(q, [0, 2, 1, 3]))  # [B, H, S, D]
        kt = bb.emit(relax.op.permute_dims(k, [0, 2, 3, 1]))  # [B, H, D, S]
        vt = bb.emit(relax.op.permute_dims(v, [0, 2, 1, 3]))
        sc = bb.emit(relax.op.matmul(qt, kt, out_dtype="float32"))
        sc = bb.emit(relax.op.multiply(sc, relax.const(scale, "float32")))
        if bias is not None:
            sc = bb.emit(relax.op.add(sc, bias))
        p = bb.emit(relax.op.nn.softmax(sc, axis=-1))
        o = bb.emit(relax.op.matmul(p, vt, out_dtype="float32"))  # [B, H, S, D]
        count[0] += 1
        return relax.op.permute_dims(o, [0, 2, 1, 3])

    out = _mutate(mod, visit, func_name)
    log.info("attention: %d sites decomposed to float matmuls", count[0])
    return out, count[0]


def rewrite_attention(mod, plans: dict[int, ha.AttentionPlan], func_name: str = "main"):
    """Rewrite the attention sites numbered in ``plans``; returns ``(mod, AttentionRecord)``."""
    import tvm
    from tvm import relax

    record = AttentionRecord()
    site = [0]
    gvars: dict = {}

    def kernel(m, key, make):
        if key not in gvars:
            func = make().with_attr("op_pattern", 8).with_attr(KERNEL_ATTR, 1)
            gvars[key] = m.builder_.add_func(func, key.name)
        return gvars[key]

    def visit(m, call):
        if not isinstance(call.op, tvm.ir.Op) or not _is_attention(call):
            return None
        idx = site[0]
        site[0] += 1
        plan = plans.get(idx)
        if plan is None:
            return None
        q, k, v = call.args[:3]
        bias = call.args[3] if len(call.args) > 3 else None
        shape = _static_shape(q)
        why = None
        if call.attrs.causal_mask is not None:
            why = "causal mask"
        elif shape is None or _static_shape(k) != shape or _static_shape(v) != shape:
            why = "dynamic or unequal q/k/v shapes"
        elif bias is not None and _static_shape(bias) != [shape[0], 1, 1, shape[1]]:
            why = f"bias shape {_static_shape(bias)} is not a key-padding mask [B, 1, 1, S]"
        if why is None and plan.heads != shape[2]:
            why = f"plan for {plan.heads} heads, site has {shape[2]}"
        if why is not None:
            record.skipped.append({"site": idx, "reason": why})
            return None
        b, s, h, d = shape
        if plan.head_dim != d:
            raise ValueError(f"attention site {idx}: plan head_dim {plan.head_dim} != {d}")
        bb = m.builder_
        ccfg = ha.CodesConfig(b, s, h, d, plan.bits)
        acfg = ha.AttentionConfig(b, s, h, d, plan.bits, plan.pv)
        codes_gv = kernel(m, ccfg, lambda: ha.make_codes_primfunc(ccfg))
        attn_gv = kernel(m, acfg, lambda: ha.make_attention_primfunc(acfg))
        proj = relax.const(np.ascontiguousarray(plan.proj, np.float32))
        code_ty = relax.TensorType((b, h, s, ccfg.words), "uint64")
        qc = bb.emit(relax.call_tir(codes_gv, [q, proj], out_ty=code_ty))
        kc = bb.emit(relax.call_tir(codes_gv, [k, proj], out_ty=code_ty))
        if bias is None:
            keymask = relax.const(np.ones((b, s), np.float32))
        else:
            keymask = bb.emit(relax.op.reshape(bias, (b, s)))  # the kernel tests bias > -1e4
        table = relax.const(plan.table())
        record.rewritten.append(
            {"site": idx, "bits": plan.bits, "pv": plan.pv, "kernel": acfg.name}
        )
        return relax.call_tir(
            attn_gv, [qc, kc, v, keymask, table], out_ty=relax.TensorType((b, s, h, d), "float32")
        )

    out = _mutate(mod, visit, func_name)
    log.info("attention rewrite: %s", record.summary())
    return out, record
