"""Count the vector instructions of the AVX-512 int8 kernel's group loop, per-term against
shared-exponent scales (README, "Shared exponent"). Compile-only: runs on any x86 host.

    python scripts/count_kernel_asm.py
"""

import re

import tvm
from shiftadd_tvm.schedules import lut_gemm_int8 as k8
from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig

TARGET = {"kind": "llvm", "mcpu": "znver4", "mtriple": "x86_64-linux-gnu"}


def group_loop(asm: str) -> tuple[int, int]:
    """(vpdpbusd, vector instructions) of the innermost loop with the most vpdpbusd."""
    lines = asm.splitlines()
    labels = {ln.rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.LBB\d+_\d+:", ln)}
    best = None
    for i, ln in enumerate(lines):
        m = re.match(r"\s+j\w+\s+(\.LBB\d+_\d+)", ln)
        if m and labels.get(m.group(1), i) < i:
            body = lines[labels[m.group(1)] : i + 1]
            key = (sum("vpdpbusd" in b for b in body), -len(body))
            if best is None or key > best[0]:
                best = (key, sum(bool(re.match(r"\s+v", b)) for b in body))
    return best[0][0], best[1]


def main() -> None:
    target = tvm.target.Target(TARGET)
    print("bits  terms    per-term  shared  ratio")
    for bits, counts in ((2, (3, 3)), (3, (3, 2, 2)), (4, (4, 3, 2, 2))):
        n = []
        for shared in (False, True):
            cfg = LutGemmConfig(1, 4096, 4096, bits, 128, max(counts), counts, shared_exp=shared)
            f = k8.make_int8_primfunc(cfg, None, "avx512").with_attr("global_symbol", "f")
            lib = tvm.compile(tvm.IRModule({"f": f}), target=target)
            n.append(group_loop(lib.mod.inspect_source("asm"))[1])
        label = ",".join(map(str, counts))
        print(f"{bits:>4}  {label:<8} {n[0]:>8}  {n[1]:>6}  {n[1] / n[0]:.3f}")


if __name__ == "__main__":
    main()
