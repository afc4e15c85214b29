"""Targets: ``"llvm"`` (this CPU), ``"cuda"`` (NVIDIA, ``sm_90`` unless the JSON names an ``arch``),
or a TVM target as a JSON dict / JSON string."""

from __future__ import annotations

import dataclasses
import json
import os

from .errors import ConfigError

SUPPORTED_KINDS = ("llvm", "cuda")
DEFAULT_CUDA_ARCH = "sm_90"
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100", "sm_120")


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A resolved target: the JSON dict TVM takes."""

    spec_json: str

    def to_dict(self) -> dict:
        return json.loads(self.spec_json)

    @property
    def kind(self) -> str:
        return self.to_dict()["kind"]

    def tvm_target(self):
        import tvm

        return tvm.target.Target(self.to_dict())


def host_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def resolve_target(target) -> TargetSpec:
    """Normalize the ``target`` argument; raise ConfigError naming the fix when it is invalid."""
    if isinstance(target, TargetSpec):
        return target
    if isinstance(target, str):
        text = target.strip()
        if text == "llvm":
            spec = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": os.cpu_count() or 1}
            return TargetSpec(json.dumps(spec, sort_keys=True))
        if text == "cuda":
            return resolve_target({"kind": "cuda", "arch": DEFAULT_CUDA_ARCH})
        try:
            target = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"unknown target '{target}': pass 'llvm' or a JSON dict such as "
                '\'{"kind": "llvm", "mcpu": "znver4"}\''
            ) from e
    if not isinstance(target, dict) or "kind" not in target:
        raise ConfigError(f"target must be 'llvm' or a JSON dict with a 'kind', got {target!r}")
    if target["kind"] not in SUPPORTED_KINDS:
        raise ConfigError(
            f"target kind '{target['kind']}' is not supported; supported kinds: {SUPPORTED_KINDS}"
        )
    spec = dict(target)
    if spec["kind"] == "cuda":
        arch = spec.setdefault("arch", DEFAULT_CUDA_ARCH)
        if arch not in CUDA_ARCHS:
            raise ConfigError(
                f"unsupported CUDA arch '{arch}'; use one of {CUDA_ARCHS} (sm_90 for H100/H200, "
                "sm_80 for A100)"
            )
        # host code runs on the GPU machine's CPU: a generic x86-64 host, not this CPU's features
        spec.setdefault("host", {"kind": "llvm"})
    if "mcpu" in spec:
        from tvm.target import codegen

        triple = spec.get("mtriple", "")
        if not codegen.llvm_is_valid_cpu(spec["mcpu"], triple):
            raise ConfigError(
                f"unknown LLVM CPU '{spec['mcpu']}' in the target; e.g. 'znver4', 'x86-64-v3'"
            )
    try:
        import tvm

        tvm.target.Target(spec)
    except Exception as e:  # TVM raises its own error types for bad keys
        raise ConfigError(f"TVM rejects target {spec}: {e}") from e
    return TargetSpec(json.dumps(spec, sort_keys=True))
