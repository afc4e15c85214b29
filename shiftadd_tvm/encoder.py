"""Encoder models (BERT-style sentence encoders): torch.export -> Relax, build, artifact, runtime.

The causal-LM import (``frontend.py``) maps ids to logits; a sentence encoder maps
``(input_ids, attention_mask)`` to one embedding per sentence: token states mean-pooled over the
unmasked tokens, then L2-normalized (the sentence-transformers recipe of all-MiniLM-L6-v2).

Attention is exported as one opaque custom op (``shiftadd::attention``) and imported as Relax's
``R.nn.attention`` (layout ``[batch, seq, heads, head_dim]``, additive key-padding bias
``[batch, 1, 1, seq]``), so graph passes find every attention site by its op instead of
reverse-engineering torch's decomposition. ``passes/additive_attention.py`` rewrites chosen sites
to the Hamming kernels and expands the rest into ``matmul / softmax / matmul`` for the CPU
schedules. Weight matmuls then go through the shift and LUT passes.

Artifact: the exported library with a manifest whose ``format`` is ``ENCODER_FORMAT`` (the LM
runtime refuses it by name); ``EncoderRuntime`` runs it with numpy, ``tvm_ffi`` and
``libtvm_runtime.so`` only (no torch, no TVM compiler).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from .errors import ArtifactError, InputError

log = logging.getLogger(__name__)

ENCODER_FORMAT = "shiftadd-tvm-encoder"
MASK_BIAS = -1e9  # additive bias of padded keys (exp underflows to exactly 0)
_registered = False
# the [B, S] mask of the encoder call in progress: attention reads the key-padding mask from the
# model's input, not from the 4-D mask transformers builds (which it drops when the example input
# of torch.export has no padding, specializing the exported graph to unpadded inputs)
_KEYMASK: list = []
# hooks for calibration and simulation: ATTENTION_HOOKS["record"](site, q, k, v, keymask) sees the
# inputs of every attention call; ATTENTION_HOOKS["replace"](site, q, k, v, keymask) -> out
# [B, S, H, D] (or None) replaces its output. Sites are numbered per forward pass.
ATTENTION_HOOKS: dict = {}
_SITE = [0]


def _register_torch_op() -> None:
    """The custom attention op and the transformers attention function that calls it."""
    global _registered
    if _registered:
        return
    import torch
    from transformers import AttentionInterface

    @torch.library.custom_op(
        "shiftadd::attention",
        mutates_args=(),
        schema="(Tensor q, Tensor k, Tensor v, Tensor keymask, float scale) -> Tensor",
    )
    def attention(q, k, v, keymask, scale):
        """q, k, v [B, H, S, D], keymask [B, S] (1 = token, 0 = padding) -> out [B, S, H, D]."""
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = s + (1.0 - keymask.to(s.dtype))[:, None, None, :] * MASK_BIAS
        return torch.matmul(torch.softmax(s, -1), v).transpose(1, 2).contiguous()

    @attention.register_fake
    def _(q, k, v, keymask, scale):
        return q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[3]))

    def hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        keymask = _KEYMASK[-1].to(query.dtype) if _KEYMASK else _key_mask(attention_mask, query)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        site = _SITE[0]
        _SITE[0] += 1
        if "record" in ATTENTION_HOOKS:
            ATTENTION_HOOKS["record"](site, query, key, value, keymask)
        if "replace" in ATTENTION_HOOKS:
            out = ATTENTION_HOOKS["replace"](site, query, key, value, keymask)
            if out is not None:
                return out, None
        return torch.ops.shiftadd.attention(query, key, value, keymask, float(scale)), None

    AttentionInterface.register("shiftadd_encoder", hf_attention)
    _registered = True


def _key_mask(attention_mask, query):
    """The [B, S] key-padding mask (float 1/0) from whatever 4-D mask transformers built."""
    import torch

    b, _, s, _ = query.shape
    if attention_mask is None:
        return torch.ones((b, s), dtype=query.dtype)
    m = attention_mask[:, 0, 0, :] if attention_mask.dim() == 4 else attention_mask
    if m.dtype == torch.bool:
        return m.to(query.dtype)
    return (m == 0).to(query.dtype)  # additive float mask: 0 = attend


class SentenceEncoder:
    """Factory of the torch module ``(ids, mask) -> normalized mean-pooled embedding``."""

    @staticmethod
    def wrap(model, custom_attention: bool = True):
        """``custom_attention=False`` keeps the model's own attention (torch baselines)."""
        import torch

        if custom_attention:
            _register_torch_op()
            model.set_attn_implementation("shiftadd_encoder")

        class _Encoder(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.model = m

            def forward(self, input_ids, attention_mask):
                _KEYMASK.append(attention_mask)
                _SITE[0] = 0
                try:
                    out = self.model(input_ids=input_ids, attention_mask=attention_mask)
                finally:
                    _KEYMASK.pop()
                h = out.last_hidden_state
                mf = attention_mask.unsqueeze(-1).to(h.dtype)
                e = (h * mf).sum(1) / mf.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(e, dim=-1)

        return _Encoder(model).eval()


def _attention_converter(node, importer):
    from tvm import relax

    bb = importer.block_builder
    q, k, v, keymask = (importer.env[a] for a in node.args[:4])
    scale = float(node.args[4])
    perm = [0, 2, 1, 3]  # [B, H, S, D] -> [B, S, H, D]
    q, k, v = (bb.emit(relax.op.permute_dims(t, perm)) for t in (q, k, v))
    bsz, seq = (int(s) for s in keymask.ty.shape)
    one = relax.const(1.0, "float32")
    bias = bb.emit(
        relax.op.multiply(relax.op.subtract(one, keymask), relax.const(MASK_BIAS, "float32"))
    )
    bias = bb.emit(relax.op.reshape(bias, (bsz, 1, 1, seq)))
    return bb.emit(relax.op.nn.attention(q, k, v, bias, scale))


@dataclasses.dataclass
class EncoderImport:
    """A sentence encoder imported into Relax: ``main(ids, mask, *weights) -> (emb,)``."""

    mod: object
    params: dict[str, np.ndarray]  # relax parameter -> value
    names: dict[str, str]  # relax parameter -> torch parameter name (``encoder.layer.0...``)
    batch: int
    seq_len: int
    hidden: int
    vocab_size: int

    def weight_key(self, torch_name: str) -> str:
        """The Relax parameter holding ``torch_name`` (``encoder.layer.0.attention.self.query``)."""
        want = torch_name if torch_name.endswith(".weight") else torch_name + ".weight"
        for key, name in self.names.items():
            if name == want:
                return key
        raise KeyError(f"no parameter {want} in the imported encoder")


def import_encoder(model, batch: int, seq_len: int) -> EncoderImport:
    """Export a transformers encoder (BERT family) for fixed ``[batch, seq_len]`` inputs."""
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    wrapper = SentenceEncoder.wrap(model)
    ids = torch.zeros((batch, seq_len), dtype=torch.int64)
    mask = torch.ones((batch, seq_len), dtype=torch.int64)
    mask[:, seq_len // 2 + 1 :] = 0  # padded example: no trace-time specialization to full rows
    t0 = time.time()
    with torch.no_grad():
        ep = torch.export.export(wrapper, (ids, mask))
    mod = from_exported_program(
        ep,
        keep_params_as_input=True,
        custom_convert_map={"attention.default": _attention_converter},
    )
    log.info("encoder torch.export + Relax import in %.1fs", time.time() - t0)
    names, params = {}, {}
    state = ep.state_dict
    for spec in ep.graph_signature.input_specs:
        if spec.target is None:
            continue
        full = spec.target
        tensor = state[full] if full in state else ep.constants[full]
        tname = full[len("model.") :] if full.startswith("model.") else full
        names[spec.arg.name] = tname
        params[spec.arg.name] = tensor.detach().cpu().numpy()
    cfg = model.config
    return EncoderImport(
        mod, params, names, batch, seq_len, int(cfg.hidden_size), int(cfg.vocab_size)
    )


def bind_weights(mod, params: dict[str, np.ndarray], num_inputs: int = 2):
    """Bind the weights still used by ``main`` as constants; drop the unused ones."""
    import tvm
    from tvm import relax

    func = mod["main"]
    used = {str(v.name) for v in relax.analysis.free_vars(func.body)}
    inputs = list(func.params[:num_inputs])
    keep = inputs + [p for p in func.params[num_inputs:] if str(p.name) in used]
    new_func = relax.Function(keep, func.body, func.ret_ty, func.is_pure, func.attrs)
    new_func = new_func.without_attr("params").with_attr("num_input", num_inputs)
    out = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"})
    out["main"] = new_func
    binding = {str(p.name): params[str(p.name)] for p in keep[num_inputs:]}
    return relax.transform.BindParams("main", binding)(out)


def build(mod, target_spec) -> object:
    """Build a rewritten, weight-bound encoder module with the project's CPU pipeline."""
    import tvm

    from .schedules.cpu_rules import cpu_pipeline

    tgt = target_spec.tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        return tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt))


def export(executable, manifest: dict, path: str | os.PathLike) -> Path:
    from ._files import export_with_manifest
    from .runtime import SUPPORTED_VERSIONS

    manifest = {"format": ENCODER_FORMAT, "version": SUPPORTED_VERSIONS[-1], **manifest}
    return export_with_manifest(executable, manifest, path)


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    from .runtime import _aligned

    out = _aligned(a.shape, a.dtype)
    out[...] = a
    return out


class EncoderRuntime:
    """A loaded encoder artifact: ``rt(ids, mask)`` -> embeddings ``float32[n, hidden]``.

    Inputs of any number of rows are cut into the compiled batch (the last batch padded with
    empty rows); sequences shorter than the compiled length are right-padded with mask 0.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True):
        from .runtime import (
            _POOLED_ALLOCATOR,
            _import_tvm_ffi,
            check_host,
            load_libraries,
            read_manifest,
        )

        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=verify, fmt=ENCODER_FORMAT)
        check_host(self.manifest, self.path)
        device = load_libraries(self.manifest, self.path)
        ffi = _import_tvm_ffi()
        try:
            lib = ffi.load_module(str(self.path.resolve()))
            self._vm = lib["vm_load_executable"]()
            self._vm["vm_initialization"](*device, _POOLED_ALLOCATOR)
            self._main = self._vm["main"]
        except Exception as e:
            raise ArtifactError(f"TVM could not load '{self.path}': {e}") from e
        self._lib, self._ffi = lib, ffi
        inp = self.manifest["input"]
        self.batch, self.seq_len = int(inp["batch"]), int(inp["seq_len"])
        self.vocab_size = int(self.manifest["vocab_size"])
        self._ids = _aligned_copy(np.zeros((self.batch, self.seq_len), np.int64))
        self._mask = _aligned_copy(np.zeros((self.batch, self.seq_len), np.int64))

    def _check(self, ids, mask) -> tuple[np.ndarray, np.ndarray]:
        ids, mask = np.asarray(ids), np.asarray(mask)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise InputError(
                f"input_ids and attention_mask must both be [n, seq], got {ids.shape} and "
                f"{mask.shape}"
            )
        if ids.dtype.kind not in "iu" or mask.dtype.kind not in "iub":
            raise InputError("input_ids and attention_mask must be integer arrays")
        if ids.shape[1] > self.seq_len:
            raise InputError(
                f"sequences of {ids.shape[1]} tokens are longer than the compiled {self.seq_len}; "
                "truncate them or recompile with a larger --seq-len"
            )
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InputError(f"token ids must lie in [0, {self.vocab_size})")
        return ids.astype(np.int64), mask.astype(np.int64)

    def __call__(self, ids, mask) -> np.ndarray:
        ids, mask = self._check(ids, mask)
        n, s = ids.shape
        out = np.empty((n, int(self.manifest["output"]["shape"][-1])), np.float32)
        for b0 in range(0, n, self.batch):
            rows = min(self.batch, n - b0)
            self._ids[...] = 0
            self._mask[...] = 0
            self._ids[:rows, :s] = ids[b0 : b0 + rows]
            self._mask[:rows, :s] = mask[b0 : b0 + rows]
            self._mask[rows:, 0] = 1  # padding rows: one token, so pooling divides by 1
            out[b0 : b0 + rows] = self.forward()[:rows]
        return out

    def forward(self) -> np.ndarray:
        """One call of the compiled ``main`` on the staged batch (what latency measures)."""
        res = self._main(self._ffi.from_dlpack(self._ids), self._ffi.from_dlpack(self._mask))
        emb = res[0] if not hasattr(res, "__dlpack__") else res
        return np.from_dlpack(emb)

    def stage(self, ids: np.ndarray, mask: np.ndarray) -> None:
        """Put one full batch in the input buffers (for timing ``forward``)."""
        ids, mask = self._check(ids, mask)
        self._ids[...] = 0
        self._mask[...] = 0
        self._ids[: ids.shape[0], : ids.shape[1]] = ids[: self.batch]
        self._mask[: ids.shape[0], : ids.shape[1]] = mask[: self.batch]


def load(path: str | os.PathLike, verify: bool = True) -> EncoderRuntime:
    return EncoderRuntime(path, verify=verify)
