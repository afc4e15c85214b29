"""Same-process A/B of the avx512 (VBMI) LUT kernel with one of its switches off and on.

Switches of ``schedules/lut_gemm_int8``:

* ``gap``: ``GAP_WORDS`` zero words after each (tile, group)'s codes of the shared-exponent kernel
  at 2 bits (``--scale-window 8`` fits; the script times 2 bits);
* ``prefetch``: ``PREFETCH_NEXT_CODES``, the per-term kernel (the default fit) at M = 1
  prefetching the next group's codes (``--bits`` sets the widths);
* ``chunks``: ``CHUNK_TABLE_BYTES``, K split into chunks whose tables stay in L1 (0: one chunk;
  ``--scale-window 8`` times the shared-exponent kernel, 0 the per-term one);
* ``fused``: ``FUSED_BUILD``, each parallel task building its own rows' tables (M > 1, two
  threads: the default rule's knobs then build in parallel; ``--isa`` picks the kernel).

It builds the kernel twice in one process (switch off, then as shipped), packs the same random
weights for each, checks both against the float64 reference, and times them in alternating rounds
(median over rounds of the bench's batched mean), hot (one weight buffer) or cold (rotating over
copies larger than twice the last-level cache). The default `--isa avx512` needs AVX-512 VBMI/VNNI:

    python scripts/ab_kernel_switch.py gap --shape 4096x4096 --modes cold,hot
    python scripts/ab_kernel_switch.py prefetch --shape 4096x4096 --bits 2,3,4 --modes cold,hot
    TVM_NUM_THREADS=2 python scripts/ab_kernel_switch.py gap --shape 11008x4096 --threads 2
    python scripts/ab_kernel_switch.py chunks --bits 2,3,4 --modes hot,cold --scale-window 8
    TVM_NUM_THREADS=2 python scripts/ab_kernel_switch.py fused --shape 192x576 --m 8 --threads 2 \
        --bits 2,3,4 --scale-window 8

Results (Zen 5): reports/bench/zen5-code-gap-s21.txt, reports/bench/zen5-prefetch-codes-s21.txt,
reports/bench/zen5-k-chunks-s22.txt, reports/bench/zen5-fused-build-s22.txt.
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

log = logging.getLogger("ab_kernel_switch")
SWITCHES = {
    "gap": ("GAP_WORDS", 0),
    "prefetch": ("PREFETCH_NEXT_CODES", False),
    "chunks": ("CHUNK_TABLE_BYTES", 0),
    "fused": ("FUSED_BUILD", False),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("switch", choices=sorted(SWITCHES), help="what to switch off in the A run")
    ap.add_argument("--shape", default="4096x4096", help="weight shape N x K")
    ap.add_argument("--bits", default="2", help="bit widths, comma-separated (gap: 2 only)")
    ap.add_argument("--m", type=int, default=1, help="activation rows")
    ap.add_argument("--modes", default="cold,hot", help="'hot', 'cold' or both")
    ap.add_argument("--threads", type=int, default=1, help="TVM threads (set TVM_NUM_THREADS too)")
    ap.add_argument("--rounds", type=int, default=9, help="alternating timing rounds")
    ap.add_argument(
        "--isa", default="avx512", choices=("avx512", "avx512bw", "avx2"), help="kernel variant"
    )
    ap.add_argument(
        "--scale-window",
        type=int,
        choices=(0, 8),
        help="8: the shared-exponent kernel (a windowed fit), 0: the per-term kernel "
        "(default: 8 for gap, 0 otherwise)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if host_missing(args.isa):
        raise SystemExit(
            f"this CPU lacks {host_missing(args.isa)}: the {args.isa} kernel cannot run"
        )
    n, k = (int(v) for v in args.shape.lower().split("x"))
    bk.set_tvm_threads(args.threads)
    target = resolve_target("llvm").tvm_target()
    x = np.random.default_rng(args.m).standard_normal((args.m, k)).astype(np.float32)
    name, off = SWITCHES[args.switch]
    shipped = getattr(L8, name)
    bits_list = [2] if args.switch == "gap" else [int(b) for b in args.bits.split(",")]
    window = args.scale_window if args.scale_window is not None else 8 * (args.switch == "gap")
    for bits, mode in ((b, m) for b in bits_list for m in args.modes.split(",")):
        width, counts = kernel_terms(bits, 128, "auto")
        cfg = LutGemmConfig(args.m, n, k, bits, 128, width, counts, window == 8)
        copies = bk.copies_for(int(n * k * (bits + 1) / 8), mode == "cold", bk.llc_bytes())
        timers = {}
        for value in (off, shipped):
            setattr(L8, name, value)  # read when the kernel is built and its weights packed
            try:
                ker = bk.build_ours(cfg, args.isa, args.threads, target, copies, x, 0)
            finally:
                setattr(L8, name, shipped)
            if not ker.err < 2e-2:
                raise SystemExit(f"{name}={value}: relative error {ker.err:.1e} vs the reference")
            xv = tvm.runtime.tensor(x)
            yv = tvm.runtime.tensor(np.zeros((args.m, n), np.float32))
            timers[value] = [lambda f=ker.func, w=w, a=xv, y=yv: f(a, *w, y) for w in ker.weights]
        samples = {value: [] for value in timers}
        for _ in range(args.rounds):
            for value, calls in timers.items():
                samples[value].append(bk.time_calls(calls, budget_s=0.03) * 1e6)
        t0, t1 = (statistics.median(samples[v]) for v in (off, shipped))
        log.info(
            "%s M=%d %d bits %s, %d thread(s): %s=%s %.1f us, %s=%s %.1f us (%.3fx)",
            args.shape, args.m, bits, mode, args.threads, name, off, t0, name, shipped, t1, t0 / t1,
        )  # fmt: skip


if __name__ == "__main__":
    main()
