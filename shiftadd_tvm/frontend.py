"""PyTorch (Hugging Face causal LM) -> TVM Relax through torch.export."""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np
import torch

log = logging.getLogger(__name__)


class _LogitsOnly(torch.nn.Module):
    """input_ids [batch, seq] -> logits [batch, seq, vocab], no KV cache."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def _cumsum_bool_fix(node, importer):
    """HF masking utils call cumsum on a bool tensor: torch yields int64, the importer kept bool."""
    from tvm import relax

    x = importer.env[node.args[0]]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if x.ty.dtype == "bool" and node.kwargs.get("dtype") is None:
        x = importer.block_builder.emit(relax.op.astype(x, "int64"))
    return importer.block_builder.emit(relax.op.cumsum(x, axis=dim))


def hadamard_converter(prefix: str = ""):
    """Converter of ``shiftadd::hadamard`` (``rotate.BlockHadamard``): one ``call_tir`` of the CPU
    kernel of ``schedules/hadamard.py`` on the flattened rows (``schedules.hadamard.retarget``
    swaps in the CUDA kernel at build). ``prefix`` keeps the kernel names of imports apart."""

    def convert(node, importer):
        from tvm import relax

        from .errors import UnsupportedModelError
        from .schedules.hadamard import HadamardConfig, make_primfunc

        x = importer.env[node.args[0]]
        block, transpose = int(node.args[1]), bool(node.args[2])
        sinfo = x.ty
        shape = _dims(sinfo)
        if sinfo.dtype != "float32" or any(not isinstance(d, int) for d in shape):
            raise UnsupportedModelError(
                f"online Hadamard on {sinfo}: only static float32 shapes are supported; compile "
                "with --rotate off"
            )
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        cfg = HadamardConfig(rows, shape[-1], block, transpose)
        bb = importer.block_builder
        name = prefix + cfg.name
        gv = bb.add_func(make_primfunc(cfg, name=name), name)
        flat = bb.emit(relax.op.reshape(x, (rows, shape[-1])))
        out_ty = relax.TensorType((rows, shape[-1]), "float32")
        out = bb.emit(relax.call_tir(gv, [flat], out_ty=out_ty))
        return bb.emit(relax.op.reshape(out, shape))

    return convert


def cache_attention_converter(prefix: str = ""):
    """Converter of ``shiftadd::cache_attention`` (the attention of ``decode.KVStep``'s steps and of
    ``main`` under ``fused_attention``): one ``call_tir`` of the kernel of
    ``schedules/cache_attention.py``."""

    def convert(node, importer):
        from tvm import relax

        from .errors import UnsupportedModelError
        from .schedules.cache_attention import CacheAttentionConfig, make_primfunc

        q, kc, vc, kn, vn, pos = (importer.env[a] for a in node.args[:6])
        scale = float(node.args[6])
        h, rows, d = _dims(q.ty)
        s, tokens = _dims(kc.ty)[2], _dims(kn.ty)[1]
        dims = (h, rows, d, s, tokens)
        if q.ty.dtype != "float32" or any(not isinstance(v, int) for v in dims):
            raise UnsupportedModelError(
                f"attention kernel on {q.ty}: it takes float32 with static shapes only; load the "
                "model in float32 (or compile without decode for the step functions)"
            )
        cfg = CacheAttentionConfig(h, rows // tokens, tokens, d, s, scale)
        bb = importer.block_builder
        name = prefix + cfg.name
        gv = bb.add_func(make_primfunc(cfg, name=name), name)
        out_ty = relax.TensorType((h, rows, d), "float32")
        return bb.emit(relax.call_tir(gv, [q, kc, vc, kn, vn, pos], out_ty=out_ty))

    return convert


def _dims(sinfo) -> list:
    from tvm import tirx

    return [int(d) if isinstance(d, tirx.IntImm) else d for d in sinfo.shape.values]


def converters(prefix: str = "") -> dict:
    """``custom_convert_map`` of every torch import of a causal LM."""
    return {
        "cumsum.default": _cumsum_bool_fix,
        "hadamard.default": hadamard_converter(prefix),
        "cache_attention.default": cache_attention_converter(prefix),
    }


CAUSAL_ATTENTION = "shiftadd_causal"  # the HF attention implementation fused_attention exports


def _causal_attention(empty_k, empty_v, pos):
    """HF attention interface for ``main`` (batch 1, causal, no padding mask: ``main`` takes right-
    padded ids, exact because attention is causal): ``decode.grouped_attention`` with an empty
    cache (``empty_k``/``empty_v`` zeros, ``pos`` 0: never read), so the import runs it as the
    kernel of ``schedules/cache_attention.py`` (the step functions' attention, at ``pos = 0``)
    instead of matmuls, mask and softmax over the full ``seq x seq`` scores. The zeros are made
    once, outside the trace, so every layer shares one constant."""
    from .decode import grouped_attention

    def attend(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        out = grouped_attention(query, empty_k, empty_v, key[0], value[0], pos, scaling)
        return out.contiguous(), None

    return attend


@contextlib.contextmanager
def _fused_attention(model):
    """Within the block, ``model`` (HF LLaMA family) computes attention through
    ``_causal_attention``; HF then builds no mask (an implementation it has no mask for)."""
    from transformers import AttentionInterface

    from .decode import CACHE_ALIGN_TOKENS, cache_shape

    geo = cache_shape(model, CACHE_ALIGN_TOKENS)
    kvh, d, s = geo["kv_heads"], geo["head_dim"], geo["max_context"]
    empty = (
        torch.zeros((kvh, d, s)),
        torch.zeros((kvh, s, d)),
        torch.zeros((1,), dtype=torch.int64),
    )
    AttentionInterface.register(CAUSAL_ATTENTION, _causal_attention(*empty))
    before = model.config._attn_implementation
    model.config._attn_implementation = CAUSAL_ATTENTION
    try:
        yield
    finally:
        model.config._attn_implementation = before


def import_causal_lm(model, batch: int, seq_len: int, fused_attention: bool = False):
    """Export ``model`` for fixed ``[batch, seq_len]`` input ids.

    Returns ``(mod, params, names)``: the Relax module whose ``main`` takes the ids followed by the
    weights as parameters, the numpy value of each weight parameter, and the torch parameter name of
    each Relax parameter (``p_model_layers_0_..`` -> ``model.layers.0...``).
    ``fused_attention`` (CPU targets; batch 1 and the LLaMA family of ``decode.check_supported``,
    else ignored, logged): each layer's attention is the one kernel the step functions use.
    """
    from tvm.relax.frontend.torch import from_exported_program

    from .decode import check_supported
    from .errors import UnsupportedModelError

    if fused_attention:
        try:
            check_supported(model)
            if batch != 1:
                raise UnsupportedModelError(f"batch {batch} (the fused attention runs batch 1)")
        except UnsupportedModelError as e:
            log.info("main keeps the model's own attention: %s", e)
            fused_attention = False
    wrapper = _LogitsOnly(model).eval()
    ids = torch.zeros((batch, seq_len), dtype=torch.int64)
    t0 = time.time()
    with torch.no_grad(), _fused_attention(model) if fused_attention else contextlib.nullcontext():
        ep = torch.export.export(wrapper, (ids,))
    mod = from_exported_program(ep, keep_params_as_input=True, custom_convert_map=converters())
    log.info("torch.export + Relax import in %.1fs", time.time() - t0)
    names = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is not None:
            target = (
                spec.target[len("model.") :] if spec.target.startswith("model.") else spec.target
            )
            names[spec.arg.name] = target
    state = ep.state_dict
    params = {}
    for rname, tname in names.items():
        full = "model." + tname
        tensor = state[full] if full in state else ep.constants[full]
        params[rname] = tensor.detach().cpu().numpy()
    main_params = [str(p.name) for p in mod["main"].params[1:]]
    missing = [p for p in main_params if p not in params]
    if missing:
        raise RuntimeError(f"exported parameters without values: {missing[:5]}")
    return mod, params, names
