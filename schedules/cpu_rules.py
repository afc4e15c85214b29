"""Default CPU schedules and legalizations for the operators Relax legalizes.

Relax's CPU pipeline legalizes operators into plain loop nests and builds them unscheduled: one
thread, no vectors, and a libm call per ``exp``. Three rules (``cpu_pipeline``):

* every ``matmul`` block that legalization produces (``C[..., i, j] += A[..., i, k] * B[..., k,
  j]``; the attention of models outside the LLaMA family): batch and row tiles in parallel,
  ``n_unroll`` rows times one ``vector``-wide column strip accumulated in registers, the reduction
  in between;
* every fused chain of elementwise blocks: inlined into one loop, vectorized, parallel when large;
* float32 ``exp``, ``sigmoid`` and last-axis ``softmax`` legalized through the polynomial
  ``fast_exp`` of ``schedules/cache_attention.py``.

Our own kernels (attribute ``shiftadd.kernel``) are already scheduled and are left alone.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

KERNEL_ATTR = "shiftadd.kernel"


def _largest_divisor(extent: int, candidates) -> int:
    return next((c for c in candidates if extent % c == 0), 1)


def schedule_matmul_block(sch, block, vector: int = 16, n_unroll: int = 4) -> bool:
    """Schedule one SSS..R matmul block in place; False if its loop nest has another shape."""
    loops = sch.get_loops(block)
    kinds = sch.get(block).iter_vars
    if len(loops) < 3 or len(kinds) != len(loops):
        return False
    if [int(iv.iter_type) for iv in kinds] != [0] * (len(kinds) - 1) + [2]:  # 0 spatial, 2 reduce
        return False
    *batch, i, j, r = loops
    from tvm import tirx

    if not all(isinstance(sch.get(lp).extent, tirx.IntImm) for lp in loops):
        return False  # symbolic extents: left as legalized (counted by the caller's log)
    ext_i = int(sch.get(i).extent)
    ext_j = int(sch.get(j).extent)
    vj = _largest_divisor(ext_j, (vector, 8, 4, 2))
    ui = _largest_divisor(ext_i, (n_unroll, 2))
    io, ii = sch.split(i, [None, ui])
    jo, ji = sch.split(j, [None, vj])
    sch.reorder(*batch, io, jo, r, ii, ji)
    outer = sch.fuse(*batch, io) if batch else io
    sch.parallel(outer)
    acc = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(acc, jo)
    if vj > 1:
        sch.vectorize(ji)  # before decompose_reduction: the update block must still be a reduction
        sch.vectorize(sch.get_loops(acc)[-1])
    sch.unroll(ii)
    init = sch.decompose_reduction(block, r)
    if vj > 1:
        sch.vectorize(sch.get_loops(init)[-1])
    return True


PARALLEL_MIN_ELEMENTS = 1 << 14  # an elementwise kernel this large is split over the threads


def schedule_elementwise(sch, vector: int = 16) -> bool:
    """Schedule a fused chain of elementwise blocks (no reduction) in place: every block but the
    last inlined into it, its loops fused, ``vector`` elements per vector instruction, the rest in
    parallel when there are at least ``PARALLEL_MIN_ELEMENTS`` (below that, waking the thread pool
    costs more than the work). False (nothing changed) for any other shape."""
    from tvm import tirx

    root = sch.get_sblock("root")
    blocks = sch.get_child_blocks(root)
    if not blocks:
        return False
    for blk in blocks:
        if any(int(iv.iter_type) != 0 for iv in sch.get(blk).iter_vars):
            return False
        if not all(isinstance(sch.get(lp).extent, tirx.IntImm) for lp in sch.get_loops(blk)):
            return False
    for blk in blocks[:-1]:
        sch.compute_inline(blk)
    loops = sch.get_loops(blocks[-1])
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    n = int(sch.get(fused).extent)
    vec = _largest_divisor(n, (vector, 8, 4, 2))
    outer, inner = sch.split(fused, [None, vec])
    if n >= PARALLEL_MIN_ELEMENTS:
        sch.parallel(outer)
    if vec > 1:
        sch.vectorize(inner)
    return True


def fast_exp(z):
    """``schedules.cache_attention.fast_exp`` (relative error < 1e-6; 0 below ``e^-80``, saturating
    at ``e^88``: never a denormal, which would slow down whatever reads it ~50x)."""
    from tvm.script import tirx as T

    from .cache_attention import fast_exp as exp

    return exp(z, T)


def _fast_unary(kind: str):
    """Legalization of ``relax.exp`` / ``relax.sigmoid`` on float32 with ``fast_exp`` (other dtypes:
    TVM's own). The LLVM backend has no vector ``expf`` and calls libm once per element
    (SmolLM2's SiLU at 128 tokens: 73 ms of a 1 s prefill chunk at one thread)."""
    from tvm import te, topi
    from tvm.relax.transform.legalize_ops.common import _call_topi_without_attr

    default = _call_topi_without_attr(getattr(topi, kind), f"tir_{kind}")

    def fexp(x):
        return te.compute(x.shape, lambda *i: fast_exp(x(*i)), name="compute")

    def fsigmoid(x):
        from tvm import tirx

        from .cache_attention import EXP_FLOOR

        one = tirx.const(1.0, "float32")

        def f(*i):  # 0 below EXP_FLOOR (1 / (1 + e^88) would be a denormal)
            v = x(*i)
            return tirx.Select(
                v < EXP_FLOOR, tirx.const(0.0, "float32"), one / (one + fast_exp(-v))
            )

        return te.compute(x.shape, f, name="compute")

    def legalize(bb, call):
        x = call.args[0]
        if x.ty.dtype != "float32":
            return default(bb, call)
        return bb.call_te(fexp if kind == "exp" else fsigmoid, x, primfunc_name_hint=f"fast_{kind}")

    return legalize


def _fast_softmax(bb, call):
    """``relax.nn.softmax`` over the last axis of a float32 tensor with ``fast_exp`` (else TVM's)."""
    from tvm import te
    from tvm.relax.transform.legalize_ops.nn import _nn_softmax

    x = call.args[0]
    nd = len(x.ty.shape.values)
    if x.ty.dtype != "float32" or int(call.attrs.axis) not in (-1, nd - 1):
        return _nn_softmax(bb, call)

    def f(x):
        *lead, n = x.shape
        k = te.reduce_axis((0, n), "k")
        mx = te.compute(lead, lambda *i: te.max(x(*i, k), axis=k), name="T_softmax_maxelem")
        e = te.compute(x.shape, lambda *i: fast_exp(x(*i) - mx(*i[:-1])), name="T_softmax_exp")
        k2 = te.reduce_axis((0, n), "k2")
        sm = te.compute(lead, lambda *i: te.sum(e(*i, k2), axis=k2), name="T_softmax_expsum")
        return te.compute(x.shape, lambda *i: e(*i) / sm(*i[:-1]), name="T_softmax_norm")

    return bb.call_te(f, x, primfunc_name_hint="fast_softmax")


def fast_legalize_map() -> dict:
    """``LegalizeOps`` overrides: float32 ``exp``, ``sigmoid`` and last-axis ``softmax`` through
    ``fast_exp``."""
    return {
        "relax.exp": _fast_unary("exp"),
        "relax.sigmoid": _fast_unary("sigmoid"),
        "relax.nn.softmax": _fast_softmax,
    }


def schedule_cpu_defaults(mod):
    """Apply the matmul rule, else the elementwise rule, to every PrimFunc of ``mod`` that is not
    one of our kernels; returns the new module (a function a rule fails on keeps its loops)."""
    import tvm
    from tvm import s_tir, tirx

    out = {}
    n_done = n_elementwise = 0
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc) or (
            func.attrs is not None and KERNEL_ATTR in func.attrs
        ):
            continue
        sch = s_tir.Schedule(func)
        changed = False
        for blk in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
            if sch.get(blk).name_hint == "matmul":
                try:
                    changed |= schedule_matmul_block(sch, blk)
                except (
                    tvm.error.InternalError,
                    s_tir.ScheduleError,
                    RuntimeError,
                    ValueError,
                ) as e:  # keep the plain loop nest
                    log.warning("matmul rule skipped %s: %s", gv.name_hint, str(e).splitlines()[0])
        if changed:
            n_done += 1
        elif _has_root(sch):
            try:
                changed = schedule_elementwise(sch)
            except (tvm.error.InternalError, s_tir.ScheduleError, RuntimeError, ValueError) as e:
                log.debug("elementwise rule skipped %s: %s", gv.name_hint, str(e).splitlines()[0])
            n_elementwise += changed
        if changed:
            new = sch.mod["main"]
            out[gv] = new.with_attrs(func.attrs) if func.attrs is not None else new
    for gv, func in out.items():
        mod[gv] = func
    log.info(
        "CPU default schedule applied to %d matmul and %d elementwise functions",
        n_done,
        n_elementwise,
    )
    return mod


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def cpu_pipeline(target):
    """The Relax CPU pipeline with the fast legalizations in ``LegalizeOps`` and the matmul and
    elementwise rules after legalization and fusion."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="ShiftAddCPUDefaults")
    def defaults(mod, _ctx):
        return schedule_cpu_defaults(mod)

    @tvm.transform.module_pass(opt_level=0, name="ShiftAddCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            legalize = [relax.transform.LegalizeOps(fast_legalize_map())]
            legalize += [p for p in cpu.legalize_passes(target) if p.info.name != "LegalizeOps"]
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + legalize
                + [defaults]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
