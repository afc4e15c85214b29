"""Offline rotation of a LLaMA-family model (QuaRot-style incoherence processing), exact in float.

The residual stream is multiplied by an orthogonal ``Q`` (a randomized Hadamard matrix where one
exists for the width, else a random orthogonal one): the weights that read the stream take
``W Q``, the weights that write it take ``Q^T W``, the embedding takes ``E Q``. RMSNorm commutes
with ``Q`` once its weight is folded into the layers that read its output, so the model computes
the same function. Each attention head's values and the matching input columns of ``o_proj`` are
rotated by a ``head_dim`` Hadamard as well. Quantizing the rotated weights is easier: the outlier
input channels of the stream are spread over all channels.

Two things are added to the graph. ``rotate_down_inputs`` puts ``BlockHadamard`` (adds and
subtracts only) before every MLP down projection, whose input no offline rotation reaches. And
one dense ``hidden x hidden`` matrix follows the final norm: the output head is tied to the
embedding (``E Q`` now), and the final norm's weight cannot be folded into a tied head, so
``logits = norm(x Q) (Q^T diag(g) Q) (E Q)^T``. That matrix stays dense (``target_linears`` skips
it); it costs ``hidden^2`` multiply-adds per token, against ``vocab x hidden`` for the head.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .decode import SUPPORTED_TYPES  # the same pre-norm, RoPE, GQA, SiLU-MLP layout
from .errors import UnsupportedModelError
from .schedules.hadamard import BASES, hadamard, split_order

log = logging.getLogger(__name__)

DENSE_FLAG = "_shiftadd_keep_dense"  # Linear modules with this attribute are never quantized


def orthogonal(n: int, seed: int) -> np.ndarray:
    """float64 ``[n, n]`` orthogonal: random signs times a normalized Hadamard matrix, or a random
    orthogonal matrix (QR of a Gaussian one) where no Hadamard matrix of order n is known."""
    rng = np.random.default_rng(seed)
    h = hadamard(n)
    if h is None:
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return q * np.sign(np.diag(r))
    signs = rng.choice([-1.0, 1.0], size=n)
    return signs[:, None] * h / np.sqrt(n)


class RotatedFinalNorm(torch.nn.Module):
    """``norm(x) @ mix``: the final RMSNorm (weight folded out) then the dense mix matrix."""

    def __init__(self, norm: torch.nn.Module, mix: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.mix = torch.nn.Linear(mix.shape[0], mix.shape[1], bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(mix.T)
        setattr(self.mix, DENSE_FLAG, True)

    def forward(self, x):
        return self.mix(self.norm(x))


def _check(model) -> None:
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"rotation supports {SUPPORTED_TYPES} models, not {mtype!r}; compile without --rotate"
        )
    if getattr(model, "_shiftadd_rotated", False):
        raise UnsupportedModelError("this model is already rotated; rotate it once")


@torch.no_grad()
def rotate_model(model, seed: int = 0):
    """Rotate ``model`` in place (see the module docstring); returns it. Float-exact up to
    rounding: check with ``max |logits - logits_rotated|``."""
    _check(model)
    inner = model.model
    cfg = model.config
    hid = cfg.hidden_size
    hd = getattr(cfg, "head_dim", None) or hid // cfg.num_attention_heads
    q = torch.from_numpy(orthogonal(hid, seed))
    rh = torch.from_numpy(orthogonal(hd, seed + 1))

    def f64(t):
        return t.detach().double()

    def put(param, value):
        param.copy_(value.to(param.dtype))

    def fold_norm(norm, linears):
        g = f64(norm.weight)
        for lin in linears:
            put(lin.weight, f64(lin.weight) * g[None, :])
        norm.weight.fill_(1.0)

    emb = inner.embed_tokens.weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    if head is not None and not tied:
        g = f64(inner.norm.weight)
        put(head.weight, (f64(head.weight) * g[None, :]) @ q)
        inner.norm.weight.fill_(1.0)
    put(emb, f64(emb) @ q)
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            raise UnsupportedModelError("rotation does not support per-head q/k norms")
        fold_norm(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
        fold_norm(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            put(lin.weight, f64(lin.weight) @ q)
        # values per head: v_h -> v_h R  (rows of v_proj: R^T W_h); o_proj input columns: W_h R
        wv = f64(attn.v_proj.weight)
        nkv = wv.shape[0] // hd
        put(
            attn.v_proj.weight,
            torch.einsum("ji,hjk->hik", rh, wv.view(nkv, hd, -1)).reshape(wv.shape),
        )
        if attn.v_proj.bias is not None:
            put(attn.v_proj.bias, (f64(attn.v_proj.bias).view(nkv, hd) @ rh).reshape(-1))
        wo = f64(attn.o_proj.weight)
        nh = wo.shape[1] // hd
        wo = (wo.view(wo.shape[0], nh, hd) @ rh).reshape(wo.shape)
        put(attn.o_proj.weight, q.T @ wo)
        put(mlp.down_proj.weight, q.T @ f64(mlp.down_proj.weight))
        for lin in (attn.o_proj, mlp.down_proj):
            if lin.bias is not None:
                put(lin.bias, f64(lin.bias) @ q)
    if tied:
        g = f64(inner.norm.weight)
        inner.norm.weight.fill_(1.0)
        mix = q.T @ torch.diag(g) @ q
        inner.norm = RotatedFinalNorm(inner.norm, mix.float())
    model._shiftadd_rotated = True
    log.info("rotated the residual stream (%d) and the value heads (%d)", hid, hd)
    return model


def _hadamard_torch(x: torch.Tensor, block: int, transpose: bool) -> torch.Tensor:
    """``x [..., N] @ blockdiag(H)`` (``H^T`` when ``transpose``), ``H = hadamard(block) =
    kron(A, H_P)``: butterfly stages of adds and subtracts over each run of ``P``, then the runs of
    a block mixed by the +-1 matrix ``A`` (Paley order 12 or 20; nothing for order 1)."""
    base, p = split_order(block)
    shape = x.shape
    h = 1
    while h < p:
        v = x.reshape(*shape[:-1], shape[-1] // (2 * h), 2, h)
        a, b = v[..., 0, :], v[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(shape)
        h *= 2
    if base == 1:
        return x
    mix = torch.from_numpy(BASES[base]).to(x.dtype).to(x.device)
    z = x.reshape(*shape[:-1], shape[-1] // block, base, p)
    eq = "...mj,im->...ij" if transpose else "...mj,mi->...ij"
    return torch.einsum(eq, z, mix).reshape(shape)


@torch.library.custom_op("shiftadd::hadamard", mutates_args=())
def hadamard_op(x: torch.Tensor, block: int, transpose: bool) -> torch.Tensor:
    """The online Hadamard transform as one op: the Relax import maps it to one TensorIR kernel
    (``schedules/hadamard.py``) instead of ``log2(block)`` passes over the activations."""
    return _hadamard_torch(x, block, transpose).contiguous()


@hadamard_op.register_fake
def _(x, block, transpose):
    return torch.empty_like(x)


def _hadamard_setup(ctx, inputs, output):
    ctx.block, ctx.transpose = inputs[1], inputs[2]


def _hadamard_backward(ctx, grad):
    return hadamard_op(grad, ctx.block, not ctx.transpose), None, None


hadamard_op.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)


class BlockHadamard(torch.nn.Module):
    """``x -> x blockdiag(H_B, ..., H_B)`` on the last dim with the unnormalized ``H_B =
    hadamard(B)`` (entries +-1; ``B`` = 2^a, 12 * 2^a or 20 * 2^a): adds and subtracts only, one
    custom op (``shiftadd::hadamard``)."""

    def __init__(self, block: int):
        super().__init__()
        split_order(block)  # ValueError for an order without an online transform
        self.block = block

    def forward(self, x):
        return hadamard_op(x, self.block, False)


class RotatedDown(torch.nn.Module):
    """``down(z) = BlockHadamard(z) @ W'^T``: the MLP's down projection reading a rotated input."""

    def __init__(self, hadamard: BlockHadamard, linear: torch.nn.Linear):
        super().__init__()
        self.hadamard = hadamard
        self.linear = linear

    def forward(self, x):
        return self.linear(self.hadamard(x))


@torch.no_grad()
def rotate_down_inputs(model, block: int, seed: int = 0):
    """Rotate the input of every MLP down projection online: random signs folded into the rows of
    ``up_proj`` (``z = silu(gate) * up`` flips with them), ``blockdiag(H_B)`` applied at run time
    by ``BlockHadamard``, ``W' = W D H / B`` (exact: ``H H = B I``)."""
    rng = np.random.default_rng(seed + 2)
    hb = None
    for layer in model.model.layers:
        mlp = layer.mlp
        if isinstance(mlp.down_proj, RotatedDown):
            raise UnsupportedModelError("the down projections are already rotated; rotate once")
        n = mlp.down_proj.weight.shape[1]
        if n % block:
            raise UnsupportedModelError(f"intermediate size {n} is not a multiple of block {block}")
        if hb is None or hb.shape[0] != n:
            h = torch.from_numpy(hadamard(block).astype(np.float64))
            hb = torch.block_diag(*([h] * (n // block)))
        d = torch.from_numpy(rng.choice([-1.0, 1.0], size=n))
        up = mlp.up_proj
        up.weight.copy_((up.weight.double() * d[:, None]).to(up.weight.dtype))
        if up.bias is not None:
            up.bias.copy_((up.bias.double() * d).to(up.bias.dtype))
        lin = mlp.down_proj
        lin.weight.copy_(((lin.weight.double() * d[None, :]) @ hb / block).to(lin.weight.dtype))
        mlp.down_proj = RotatedDown(BlockHadamard(block), lin)
    log.info("rotated the down projections' inputs online (blocks of %d)", block)
    return model


MAX_DOWN_BLOCK = 512  # Hadamard block of the down projections' online rotation (at most)
MIN_DOWN_BLOCK = 16  # below this the online rotation is not worth its graph ops: skipped


def plan(model, requested: bool | None, seed: int = 0) -> dict | None:
    """The rotation ``compile`` applies to ``model``: ``{"seed", "down_block"}`` or None.

    ``requested``: True (an unsupported model is an error), None (the default: rotate when
    supported, else say why in the log), False (never). ``down_block`` is the largest power of
    two dividing the MLP's intermediate size, at most ``MAX_DOWN_BLOCK`` (0: no online rotation,
    when that is below ``MIN_DOWN_BLOCK``)."""
    if requested is False:
        return None
    try:
        _check(model)
        inter = model.model.layers[0].mlp.down_proj.weight.shape[1]
    except (UnsupportedModelError, AttributeError) as e:
        why = str(e) if isinstance(e, UnsupportedModelError) else f"unexpected layout ({e})"
        if requested:
            raise UnsupportedModelError(f"rotation requested but not possible: {why}") from e
        log.info("no rotation: %s", why)
        return None
    block = min(inter & -inter, MAX_DOWN_BLOCK)
    if block < MIN_DOWN_BLOCK:
        log.info("no online rotation of the down projections: intermediate size %d", inter)
        block = 0
    return {"seed": int(seed), "down_block": int(block)}


def apply(model, how: dict):
    """Rotate ``model`` in place as ``plan`` decided (deterministic for the same ``how``)."""
    rotate_model(model, seed=how["seed"])
    if how.get("down_block"):
        rotate_down_inputs(model, how["down_block"], seed=how["seed"])
    return model
