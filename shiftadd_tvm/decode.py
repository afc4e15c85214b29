"""KV-cache decode functions for LLaMA-family models: one step of T tokens against a static cache.

``compile(..., decode=True)`` exports, besides ``main(ids[1, seq_len]) -> logits``, one Relax
function per step length T (``step_t1`` for decode, ``step_t128`` for prefill chunks by default)
into the SAME module, so one ``.so`` holds them and the weights once (constants are shared by
content, see ``share_constants``). Each step function is

    step_tT(ids int64[1, T], pos int64[1], last int64[1],
            k_0, v_0, ..., k_{L-1}, v_{L-1})   k_l float32[kv_heads, head_dim, S] (transposed),
                                               v_l float32[kv_heads, S, head_dim]
        -> (logits float32[1, vocab]  of token ``last`` of the chunk,
            new_k, new_v float32[L, kv_heads, T, head_dim])   (RoPE already applied to new_k)

``pos`` is the number of tokens already in the cache (cache rows ``< pos`` are valid, the rest is
ignored); the T new tokens sit at positions ``pos .. pos + T - 1``. The function does not write
the cache: the runtime copies the (small) ``new_k``/``new_v`` rows into its cache arrays, which are
passed to the module zero-copy through DLPack. Attention is one custom op per layer,
``shiftadd::cache_attention`` (scores over the cache slots ``< pos`` and causal scores over the T
new tokens share one softmax; the output is ``P_cache @ V_cache + P_new @ V_new``), which the
import maps to the kernel of ``schedules/cache_attention.py``: it reads ``pos`` at run time and
touches only the filled slots, so a step costs what the cache holds, not ``max_context``, and
nothing is copied or concatenated. Grouped query heads are folded into the rows of each KV head
(no repeated K/V). K is cached transposed, so a vector of slots is one contiguous load.

The wrapper reuses the model's own submodules (projections stay ``nn.Linear``, so the LUT rewrite
pass sees the same weights in every function; norms, MLP and rotary embedding are the model's).
Padding a chunk (tokens past ``last``) is exact: they come after the real tokens and the runtime
does not store their cache rows.
"""

from __future__ import annotations

import logging
import time

import torch

from .errors import ConfigError, UnsupportedModelError

log = logging.getLogger(__name__)

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")  # pre-norm, RoPE, GQA, SiLU-gated MLP
DEFAULT_STEP_LENGTHS = (1, 128)
CACHE_ALIGN_TOKENS = 16  # S rounded up so that every layer's cache slice is 64-byte aligned


@torch.library.custom_op("shiftadd::cache_attention", mutates_args=())
def cache_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """A step's attention as one op (the Relax import maps it to the kernel of
    ``schedules/cache_attention.py``, which reads ``pos`` and only touches the filled slots).
    ``q [KVH, G*T, D]`` (row r is token r % T) attends to the cache slots ``< pos`` and causally
    to the T new tokens, one softmax over both parts; the output is ``P_cache @ V_cache + P_new @
    V_new``. This torch form is what ``torch.export`` traces through and the reference the kernel
    is tested against."""
    t, s = k_new.shape[1], k_cache.shape[-1]
    causal = (torch.arange(q.shape[1]) % t)[:, None] >= torch.arange(t)[None, :]
    valid = (torch.arange(s) < pos)[None, None, :]
    neg = torch.tensor(float("-inf"))
    s_cache = torch.where(valid, torch.matmul(q, k_cache) * scale, neg)  # [KVH, G*T, S]
    s_new = torch.where(causal, torch.matmul(q, k_new.transpose(1, 2)) * scale, neg)
    p = torch.softmax(torch.cat([s_cache, s_new], -1), -1)
    out = torch.matmul(p[..., :s], v_cache) + torch.matmul(p[..., s:], v_new)
    return out.contiguous()


@cache_attention_op.register_fake
def _(q, k_cache, v_cache, k_new, v_new, pos, scale):
    return torch.empty_like(q)


def grouped_attention(q, k_cache, v_cache, k_new, v_new, pos, scale: float) -> torch.Tensor:
    """``q [1, H, T, D]`` (RoPE applied) through ``cache_attention_op``: the query heads folded
    into the rows of their KV head (head ``kv * G + j`` reads KV head ``kv``, HF's ``repeat_kv``
    order; its token ``t`` is row ``j * T + t``), and unfolded again: ``[1, T, H, D]``.
    ``k_new``/``v_new``: ``[KVH, T, D]``."""
    _, heads, t, d = q.shape
    kvh = k_new.shape[0]
    qg = q.reshape(kvh, heads // kvh * t, d)
    out = cache_attention_op(qg, k_cache, v_cache, k_new, v_new, pos, float(scale))
    return out.reshape(1, heads, t, d).transpose(1, 2)


def step_name(tokens: int) -> str:
    return f"step_t{tokens}"


def check_supported(model) -> None:
    """Raise ``UnsupportedModelError`` unless the wrapper below computes ``model`` exactly."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"KV-cache decode supports {SUPPORTED_TYPES} models, not {mtype!r}; compile without "
            "decode (decode=False / --no-decode)"
        )
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
        raise UnsupportedModelError(
            f"{mtype} with a sliding attention window is not supported by the decode wrapper; "
            "compile without decode"
        )
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        raise UnsupportedModelError(
            "the model has no .model.layers / .model.rotary_emb (not a HF LLaMA-family layout); "
            "compile without decode"
        )
    attn = inner.layers[0].self_attn
    extra = [n for n in ("q_norm", "k_norm") if hasattr(attn, n)]
    if extra:
        raise UnsupportedModelError(
            f"attention with {extra} is not supported by the decode wrapper; compile without decode"
        )


def cache_shape(model, max_context: int) -> dict:
    """The cache geometry the step functions are compiled for."""
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    if max_context < 1:
        raise ConfigError(f"max_context={max_context} must be >= 1")
    s = -(-max_context // CACHE_ALIGN_TOKENS) * CACHE_ALIGN_TOKENS
    return {
        "layers": int(cfg.num_hidden_layers),
        "heads": heads,
        "kv_heads": kv,
        "head_dim": head_dim,
        "max_context": int(s),
        "layout": "per layer: k_l float32[kv_heads, head_dim, max_context], "
        "v_l float32[kv_heads, max_context, head_dim]",
    }


class KVStep(torch.nn.Module):
    """One step of T tokens of a HF LLaMA-family causal LM against an explicit static cache."""

    def __init__(self, model, tokens: int, max_context: int):
        super().__init__()
        check_supported(model)
        self.model = model  # same attribute name as frontend._LogitsOnly: same parameter names
        geo = cache_shape(model, max_context)
        self.tokens, self.max_context = tokens, geo["max_context"]
        self.layers, self.heads = geo["layers"], geo["heads"]
        self.kv_heads, self.head_dim = geo["kv_heads"], geo["head_dim"]
        self.register_buffer("offsets", torch.arange(tokens), persistent=False)

    def _attend(self, attn, h, cos, sin, k_cache, v_cache, pos):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        t, kvh, d = self.tokens, self.kv_heads, self.head_dim
        q = attn.q_proj(h).view(1, t, self.heads, d).transpose(1, 2)  # [1, H, T, D]
        k = attn.k_proj(h).view(1, t, kvh, d).transpose(1, 2)  # [1, KVH, T, D]
        v = attn.v_proj(h).view(1, t, kvh, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k0, v0 = k[0], v[0]  # [KVH, T, D]
        out = grouped_attention(q, k_cache, v_cache, k0, v0, pos, attn.scaling)
        out = out.reshape(1, t, self.heads * d)
        return attn.o_proj(out), k0, v0

    def forward(self, ids, pos, last, caches: list[torch.Tensor]):
        inner = self.model.model
        x = inner.embed_tokens(ids)  # [1, T, hidden]
        position_ids = (pos + self.offsets)[None, :]  # [1, T]
        cos, sin = inner.rotary_emb(x, position_ids)
        new_k, new_v = [], []
        for i, layer in enumerate(inner.layers):
            a, k0, v0 = self._attend(
                layer.self_attn,
                layer.input_layernorm(x),
                cos,
                sin,
                caches[2 * i],
                caches[2 * i + 1],
                pos,
            )
            x = x + a
            x = x + layer.mlp(layer.post_attention_layernorm(x))
            new_k.append(k0)
            new_v.append(v0)
        h = torch.index_select(x[0], 0, last)  # [1, hidden]: only the asked-for token's logits
        logits = self.model.lm_head(inner.norm(h))
        return logits, torch.stack(new_k), torch.stack(new_v)


def example_inputs(step: KVStep):
    k = (step.kv_heads, step.head_dim, step.max_context)
    v = (step.kv_heads, step.max_context, step.head_dim)
    caches = [torch.zeros(k if i % 2 == 0 else v) for i in range(2 * step.layers)]
    return (
        torch.zeros((1, step.tokens), dtype=torch.int64),
        torch.zeros((1,), dtype=torch.int64),
        torch.zeros((1,), dtype=torch.int64),
        caches,
    )


def import_step(model, tokens: int, max_context: int):
    """Export one step function; returns ``(relax Function, params, n_inputs, kernels)`` where the
    function takes ``n_inputs = 3 + 2 * layers`` inputs followed by the weights (named like
    ``frontend.import_causal_lm``'s), ``params`` maps weight parameter names to numpy values and
    ``kernels`` (GlobalVar -> PrimFunc) are the kernels the function calls (the online Hadamard's,
    named after the step)."""
    from tvm.relax.frontend.torch import from_exported_program

    from .frontend import converters

    step = KVStep(model, tokens, max_context).eval()
    t0 = time.time()
    with torch.no_grad():
        ep = torch.export.export(step, example_inputs(step))
    mod = from_exported_program(
        ep, keep_params_as_input=True, custom_convert_map=converters(f"{step_name(tokens)}_")
    )
    log.info("step T=%d: torch.export + Relax import in %.1fs", tokens, time.time() - t0)
    state = ep.state_dict
    params = {}
    for spec in ep.graph_signature.input_specs:
        if spec.target is None:
            continue
        tensor = state[spec.target] if spec.target in state else ep.constants[spec.target]
        params[spec.arg.name] = tensor.detach().cpu().numpy()
    func = mod["main"]
    n_inputs = 3 + 2 * step.layers
    weights = [str(p.name) for p in func.params[n_inputs:]]
    missing = [p for p in weights if p not in params]
    if missing:
        raise RuntimeError(f"step T={tokens}: exported parameters without values: {missing[:5]}")
    kernels = {gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}
    return func, params, n_inputs, kernels
