"""Is the host's int8 LUT kernel bound by its bytes or by its instructions at M = 1?

Times the kernel ``compile`` picks for this CPU on 4096 x 4096 and 1024 x 4096 (a quarter of the
bytes, about L2-sized), with the default per-plane terms and with one term per plane (fewer term
words to read, a little less epilogue work), alternating over 3 rounds, one thread:

    python scripts/kernel_bytes_vs_compute.py

Equal time per weight at both sizes means compute-bound; a time that follows the bytes means
bandwidth-bound (README, "Intel Xeon without VBMI").
"""

import numpy as np
import tvm
from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig

from shiftadd_tvm import bench_kernel as bk
from shiftadd_tvm.cpu_features import kernel_isa
from shiftadd_tvm.targets import resolve_target


def main() -> None:
    bk.set_tvm_threads(1)
    spec = resolve_target("llvm")
    isa = kernel_isa(spec.to_dict())
    if isa in ("generic", "neon"):
        raise SystemExit(f"this CPU's kernel is {isa}: no x86 int8 kernel to time")
    tgt = spec.tvm_target()
    cases = {}
    for bits, plans in ((2, ((3, 3), (1, 1))), (4, ((4, 3, 2, 2), (1, 1, 1, 1)))):
        for plan in plans:
            for n in (4096, 1024):
                cfg = LutGemmConfig(1, n, 4096, bits, 128, max(plan), plan)
                x = np.random.default_rng(0).standard_normal((1, 4096)).astype("float32")
                ker = bk.build_ours(cfg, isa, 1, tgt, 1, x, 0)  # default rule, checked vs reference
                if not ker.err < 2e-2:
                    raise SystemExit(f"{cfg.name}: relative error {ker.err:.1e} vs the reference")
                y = tvm.runtime.tensor(np.zeros((1, n), "float32"))
                args = [tvm.runtime.tensor(x), *ker.weights[0], y]
                cases[(bits, plan, n)] = (ker.nbytes, ker.func, args)
    print(f"kernel {isa}; bits, terms per plane, N: bytes, ms, GB/s")
    for r in range(3):
        for (bits, plan, n), (nbytes, f, args) in cases.items():
            t = min(bk.time_calls([lambda f=f, args=args: f(*args)], repeats=5) for _ in range(2))
            terms = ",".join(map(str, plan))
            print(
                f"round {r}  {bits} bits  {terms:<8} N={n:<5} {nbytes / 2**20:6.2f} MiB "
                f"{t * 1e3:7.3f} ms {nbytes / t / 1e9:5.1f} GB/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
