"""The CPU pipeline's default rules (``schedules/cpu_rules.py``): fast exp / sigmoid / softmax
legalization and the elementwise schedule, against numpy."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tvm
from shiftadd_tvm.schedules.cpu_rules import cpu_pipeline, schedule_cpu_defaults
from tvm import relax
from tvm.script import relax as R

from shiftadd_tvm.targets import resolve_target


def _target():
    return tvm.target.Target(json.loads(resolve_target("llvm").spec_json))


def _run(mod, *arrays):
    tgt = _target()
    ex = tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return [o.numpy() for o in out] if isinstance(out, tvm.ir.Array | list | tuple) else out.numpy()


@pytest.mark.parametrize("shape", [(128, 1536), (3, 37), (1, 576)])
def test_silu_gate_matches_numpy(shape):
    """SiLU(x) * y as the MLP computes it (ragged and tiny shapes too): the sigmoid through the
    polynomial exp, the chain inlined, vectorized (and parallel when large)."""

    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(x: R.Tensor(shape, "float32"), y: R.Tensor(shape, "float32")):
            with R.dataflow():
                c = R.multiply(R.multiply(x, R.sigmoid(x)), y)
                R.output(c)
            return c

    rng = np.random.default_rng(0)
    x = (8 * rng.standard_normal(shape)).astype(np.float32)
    x.flat[:4] = [-200.0, 200.0, 0.0, -88.5]  # saturated exp on both sides, and zero
    y = rng.standard_normal(shape).astype(np.float32)
    got = _run(Mod, x, y)
    x64 = x.astype(np.float64)
    want = x64 / (1 + np.exp(-x64)) * y
    assert np.abs(got - want).max() < 1e-6 * np.abs(want).max()
    tiny = np.finfo(np.float32).tiny
    assert not ((got != 0) & (np.abs(got) < tiny)).any()  # no denormals


def test_softmax_and_exp_match_numpy():
    @tvm.script.ir_module
    class Mod:
        @R.function
        def main(z: R.Tensor((3, 17, 40), "float32"), y: R.Tensor((5, 33), "float32")):
            with R.dataflow():
                d = R.nn.softmax(z, axis=-1)
                e = R.exp(y)
                R.output(d, e)
            return (d, e)

    rng = np.random.default_rng(1)
    z = (20 * rng.standard_normal((3, 17, 40))).astype(np.float32)
    y = rng.uniform(-80, 88, (5, 33)).astype(np.float32)  # fast_exp's range; below -80 it is 0
    z[0, 0, :20] = np.finfo(np.float32).min  # masked scores, as a causal mask adds them
    d, e = _run(Mod, z, y)
    z64 = z.astype(np.float64)
    p = np.exp(z64 - z64.max(-1, keepdims=True))
    np.testing.assert_allclose(d, p / p.sum(-1, keepdims=True), rtol=2e-6, atol=1e-12)
    np.testing.assert_allclose(e, np.exp(y.astype(np.float64)), rtol=1e-6)
    # no denormals (they slow down every product that reads them ~50x): masked and negligible
    # probabilities are exactly 0
    tiny = np.finfo(np.float32).tiny
    assert not ((d != 0) & (np.abs(d) < tiny)).any()
    assert (d[0, 0, :20] == 0).all()


def test_elementwise_rule_vectorizes_and_parallelizes_the_fused_chain():
    """The rule itself: one loop nest left, a vectorized inner loop, a parallel outer one for a
    large tensor only (a decode step's 576 elements stay on the calling thread)."""
    from tvm import tirx
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    def fused(n):
        @tvm.script.ir_module
        class Mod:
            @R.function
            def main(x: R.Tensor((2, n), "float32"), y: R.Tensor((2, n), "float32")):
                with R.dataflow():
                    c = R.add(R.multiply(x, y), y)
                    R.output(c)
                return c

        with _target():
            mod = tvm.transform.Sequential(cpu.legalize_passes(_target()))(Mod)
        mod = schedule_cpu_defaults(mod)
        (func,) = [f for f in mod.functions.values() if isinstance(f, tirx.PrimFunc)]
        return str(func)

    large, small = fused(16384), fused(288)
    vec16 = re.compile(r"T\.vectorized\((T\.int64\()?16\)")
    assert vec16.search(large) and "T.parallel" in large, large
    assert vec16.search(small) and "T.parallel" not in small, small
    assert large.count("T.sblock(") == 2, large  # root + the one remaining block
