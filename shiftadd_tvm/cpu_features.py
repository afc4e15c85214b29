"""CPU features: what this machine has, what a target lets LLVM use, and which int8 LUT kernel
(``schedules/lut_gemm_int8.py``) a target gets.

Two different questions, kept apart:

* ``kernel_isa(spec)``: which kernel variant to *generate* for a target, from the features LLVM
  enables for its ``mcpu`` / ``mtriple`` / ``mattr``. LLVM aborts the whole process (SIGABRT, not an
  exception) when asked for an intrinsic the target lacks, so a kernel is only generated for an ISA
  the target enables.
* ``require_host_isa(isa)`` / ``host_missing(isa)``: whether *this* machine can run code of that ISA
  (needed before running or verifying an artifact here; a missing feature would be SIGILL).
"""

from __future__ import annotations

import functools
import logging

from .errors import ConfigError

log = logging.getLogger(__name__)

ISAS = ("avx512", "avx512bw", "avx2", "neon", "generic")

# LLVM feature names each kernel variant needs (LLVM spelling)
ISA_FEATURES: dict[str, tuple[str, ...]] = {
    "avx512": ("avx512f", "avx512bw", "avx512vbmi", "avx512vnni"),
    "avx512bw": ("avx512f", "avx512bw"),
    "avx2": ("avx2",),
    "neon": ("neon",),
    "generic": (),
    # not table-kernel variants: the large-M int16 GEMM (schedules/int16_gemm.py) and the
    # shared-exponent table kernel next to avx512bw, both with vpdp* (VNNI)
    "int16": ("avx512f", "avx512bw", "avx512vnni"),
}

# /proc/cpuinfo spells a few LLVM feature names differently ("asimd" is NEON on aarch64)
_CPUINFO_ALIAS = {"avx512vnni": "avx512_vnni", "neon": "asimd"}


@functools.lru_cache(maxsize=1)
def host_flags() -> frozenset[str]:
    """Feature flags of this machine: /proc/cpuinfo on Linux, else LLVM's host-CPU query.

    Returned in both spellings (cpuinfo's and LLVM's) so callers can test LLVM feature names.
    """
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    if not flags:  # not Linux: ask LLVM about the host CPU (what -mcpu=native would enable)
        try:
            import tvm
            from tvm.target import codegen

            host = tvm.target.Target({"kind": "llvm", "mcpu": str(codegen.llvm_get_system_cpu())})
            flags = {str(k) for k in codegen.llvm_get_cpu_features(host)}
        except Exception as e:  # noqa: BLE001 - no way to know: report nothing, callers refuse
            log.warning("cannot determine this CPU's features (%s)", e)
    for llvm_name, cpuinfo_name in _CPUINFO_ALIAS.items():
        if cpuinfo_name in flags:
            flags.add(llvm_name)
    return frozenset(flags)


def target_features(spec: dict) -> frozenset[str]:
    """The features LLVM enables for an llvm target dict (its mcpu, mtriple and mattr)."""
    if spec.get("kind") != "llvm":
        return frozenset()
    import tvm
    from tvm.target import codegen

    try:
        feats = codegen.llvm_get_cpu_features(tvm.target.Target(spec))
    except Exception as e:  # noqa: BLE001 - an LLVM without the query: nothing is enabled
        log.warning("LLVM cannot list the features of target %s (%s): generic kernel", spec, e)
        return frozenset()
    return frozenset(str(k) for k in feats)


def int16_gemm_target(spec: dict, isa: str) -> bool:
    """Whether ``compile()`` may run many-row matmuls on the int16 GEMM for this target: its table
    kernel is ``avx512bw`` (the packing the GEMM reads) and LLVM enables AVX-512 VNNI."""
    return isa == "avx512bw" and "avx512vnni" in target_features(spec)


def shared_exp_isa(isa: str, vnni: bool) -> bool:
    """Whether ``isa``'s int8 kernel has a shared-exponent variant: ``avx512`` (VBMI + VNNI), or
    ``avx512bw`` with AVX-512 VNNI (``vpdpbusd`` weights each plane's lookups by its integer
    scale)."""
    return isa == "avx512" or (isa == "avx512bw" and vnni)


def shared_exp_target(spec: dict, isa: str) -> bool:
    """``shared_exp_isa`` for a target: VNNI as LLVM enables it there."""
    return shared_exp_isa(isa, "avx512vnni" in target_features(spec))


def scale_window_hint(spec: dict, isa: str, scale_window: int) -> str | None:
    """What ``compile`` logs when a free fit (``scale_window`` 0) goes to a target whose int8
    kernel has a shared-exponent variant that a windowed fit would run; None otherwise."""
    if scale_window or not shared_exp_target(spec, isa):
        return None
    return (
        f"this target has a shared-exponent {isa} kernel, which a windowed fit (--scale-window 8) "
        "would run: fewer bytes and instructions per lookup, a small accuracy cost (README, "
        "'CPU speed': decode speed and perplexity measured both ways)"
    )


def _is_aarch64(spec: dict) -> bool:
    triple = str(spec.get("mtriple", ""))
    return triple.startswith(("aarch64", "arm64"))


def kernel_isa(spec: dict) -> str:
    """The int8 LUT kernel variant for an llvm target: ``avx512`` | ``avx512bw`` | ``avx2`` |
    ``neon`` | ``generic`` (the first whose features the target enables: VBMI's cross-lane byte
    lookups, then AVX-512 BW's in-lane ones, then AVX2's).

    Chosen from what LLVM will enable for the target, never from this machine (a target may be
    compiled for another CPU). ``{"kind": "llvm"}`` without ``mcpu`` is a baseline x86-64: generic.
    """
    feats = target_features(spec)
    if _is_aarch64(spec):
        return "neon" if "neon" in feats else "generic"
    for isa in ("avx512", "avx512bw", "avx2"):
        if all(f in feats for f in ISA_FEATURES[isa]):
            return isa
    return "generic"


def host_missing(isa: str) -> list[str]:
    """The features ``isa`` needs that this machine lacks (LLVM spelling); [] if it can run it."""
    if isa not in ISA_FEATURES:
        raise ConfigError(f"unknown kernel ISA '{isa}'; one of {ISAS}")
    flags = host_flags()
    return [f for f in ISA_FEATURES[isa] if f not in flags]


def require_host_isa(
    isa: str,
    what: str = "this kernel",
    fix: str = "run it on a CPU that has them, or compile for this machine (target 'llvm', or a "
    "target JSON whose mcpu/mattr this CPU supports)",
) -> None:
    """Raise ConfigError (naming ``what``, the missing features and ``fix``) if this machine
    cannot run code built for ``isa``: such code would die of SIGILL, not raise."""
    missing = host_missing(isa)
    if missing:
        raise ConfigError(
            f"{what} uses {isa} instructions, which need CPU features {missing} that this "
            f"machine lacks; {fix}"
        )
