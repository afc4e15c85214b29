"""Same-process A/B of the avx512 shared-exponent kernel with and without the 2-bit codes' gap.

``schedules/lut_gemm_int8.GAP_WORDS`` zero words follow each (tile, group)'s codes at 2 bits. This
builds the kernel twice in one process (gap 0, then the module's gap), packs the same random
weights for each, checks both against the float64 reference, and times them in alternating rounds
(median over rounds of the bench's batched mean), hot (one weight buffer) or cold (rotating over
copies larger than twice the last-level cache). Needs a CPU with AVX-512 VBMI/VNNI:

    python scripts/ab_code_gap.py --shape 4096x4096 --m 1 --modes cold,hot --threads 1
    TVM_NUM_THREADS=2 python scripts/ab_code_gap.py --shape 11008x4096 --modes cold --threads 2

Results of session 21 (Zen 5): reports/bench/zen5-code-gap-s21.txt.
"""

import argparse
import logging
import statistics

import numpy as np
import tvm
from shiftadd_tvm.schedules import lut_gemm_int8 as L8
from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig

from shiftadd_tvm import bench_kernel as bk
from shiftadd_tvm.cpu_features import host_missing
from shiftadd_tvm.quant import kernel_terms
from shiftadd_tvm.targets import resolve_target

log = logging.getLogger("ab_code_gap")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="4096x4096", help="weight shape N x K")
    ap.add_argument("--m", type=int, default=1, help="activation rows")
    ap.add_argument("--modes", default="cold,hot", help="'hot', 'cold' or both")
    ap.add_argument("--threads", type=int, default=1, help="TVM threads (set TVM_NUM_THREADS too)")
    ap.add_argument("--rounds", type=int, default=9, help="alternating timing rounds")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if host_missing("avx512"):
        raise SystemExit(f"this CPU lacks {host_missing('avx512')}: the avx512 kernel cannot run")
    n, k = (int(v) for v in args.shape.lower().split("x"))
    bk.set_tvm_threads(args.threads)
    target = resolve_target("llvm").tvm_target()
    x = np.random.default_rng(args.m).standard_normal((args.m, k)).astype(np.float32)
    width, counts = kernel_terms(2, 128, "auto")
    cfg = LutGemmConfig(args.m, n, k, 2, 128, width, counts, True)
    gap = L8.GAP_WORDS
    for mode in args.modes.split(","):
        cold = mode == "cold"
        copies = bk.copies_for(int(n * k * 2.5 / 8), cold, bk.llc_bytes())
        timers = {}
        for words in (0, gap):
            L8.GAP_WORDS = words  # read by code_gap when the kernel is built and packed
            try:
                ker = bk.build_ours(cfg, "avx512", args.threads, target, copies, x, 0)
            finally:
                L8.GAP_WORDS = gap
            if not ker.err < 2e-2:
                raise SystemExit(f"gap {words}: relative error {ker.err:.1e} vs the reference")
            xv = tvm.runtime.tensor(x)
            yv = tvm.runtime.tensor(np.zeros((args.m, n), np.float32))
            timers[words] = [lambda f=ker.func, w=w, a=xv, y=yv: f(a, *w, y) for w in ker.weights]
        samples = {words: [] for words in timers}
        for _ in range(args.rounds):
            for words, calls in timers.items():
                samples[words].append(bk.time_calls(calls, budget_s=0.03) * 1e6)
        t0, t1 = (statistics.median(samples[w]) for w in (0, gap))
        log.info(
            "%s M=%d 2 bits %s, %d thread(s): gap 0 %.1f us, gap %d words %.1f us (%.3fx)",
            args.shape, args.m, mode, args.threads, t0, gap, t1, t0 / t1,
        )  # fmt: skip


if __name__ == "__main__":
    main()
