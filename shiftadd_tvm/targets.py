"""Targets: ``"llvm"`` (this CPU), ``"cuda"``, or a TVM target as a JSON dict / JSON string."""

from __future__ import annotations

import dataclasses
import json
import os

from .errors import ConfigError

SUPPORTED_KINDS = ("llvm",)


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
            raise ConfigError(
                "target 'cuda' is not supported by this version yet; compile with target='llvm'"
            )
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
