"""Default CPU schedules for the operators Relax legalizes (attention matmuls and friends).

Relax's CPU pipeline legalizes operators into plain loop nests and builds them unscheduled: one
thread, no vectors. This rule schedules every ``matmul`` block that legalization produces
(``C[..., i, j] += A[..., i, k] * B[..., k, j]``): batch and row tiles in parallel, ``n_unroll`` rows
times one ``vector``-wide column strip accumulated in registers, the reduction in between. Our own
kernels (attribute ``shiftadd.kernel``) are already scheduled and are left alone.
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


def schedule_cpu_defaults(mod):
    """Apply the matmul rule to every unscheduled PrimFunc of ``mod``; returns the new module."""
    import tvm
    from tvm import s_tir, tirx

    out = {}
    n_done = 0
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
            out[gv] = (
                sch.mod["main"].with_attrs(func.attrs)
                if func.attrs is not None
                else sch.mod["main"]
            )
            n_done += 1
    for gv, func in out.items():
        mod[gv] = func
    log.info("CPU default schedule applied to %d matmul functions", n_done)
    return mod


def _has_root(sch) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:
        return False


def cpu_pipeline(target):
    """The Relax CPU pipeline with the matmul rule inserted after legalization and fusion."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="ShiftAddCPUDefaults")
    def defaults(mod, _ctx):
        return schedule_cpu_defaults(mod)

    @tvm.transform.module_pass(opt_level=0, name="ShiftAddCPUPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + [defaults]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    _ = relax  # the pipeline passes live under relax
    return _pipeline
