"""Calibration: activation statistics of every Linear to be reparameterized, from real text.

Two modes:

- ``activation_stats``: one pass of the float model; every Linear's statistics come from float
  activations.
- ``sequential_fit``: block by block. The hidden states entering the first decoder block are
  cached once; each block then runs on the outputs of the blocks already quantized, its Linears'
  statistics are recorded from those inputs, its Linears are fitted, the fitted (dequantized)
  weights are put in place and the block runs again to produce the next block's inputs. The model
  runs about twice in all, not once per block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from .errors import UnsupportedModelError

log = logging.getLogger(__name__)


def target_linears(model) -> dict[str, torch.nn.Linear]:
    """The Linear layers of the transformer blocks (the output head stays dense, as does a Linear
    flagged ``rotate.DENSE_FLAG``)."""
    from .rotate import DENSE_FLAG

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, mod in model.named_modules():
        if (
            isinstance(mod, torch.nn.Linear)
            and mod is not head
            and not getattr(mod, DENSE_FLAG, False)
        ):
            out[name] = mod
    return out


class _Recorder:
    """Forward pre-hooks accumulating ``X^T X`` (or its diagonal) of each layer's input.

    Layers that read the same input tensor in one pass (q/k/v, gate/up) share one accumulator.
    Call ``new_pass()`` before every forward pass.
    """

    def __init__(self, layers: dict[str, torch.nn.Module], full: bool):
        self.layers, self.full = layers, full
        # id(input tensor) -> (owner layer, the tensor): holding the tensor keeps its id from
        # being reused by another tensor within the same forward pass
        self.first: dict[int, tuple[str, torch.Tensor]] = {}
        self.owner: dict[str, str] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.hooks: list = []

    def _hook(self, name):
        def hook(_mod, inputs):
            x = inputs[0].detach()
            key = id(x)
            if key in self.first and self.first[key][0] != name:  # a sibling's input: share
                self.owner[name] = self.first[key][0]
                return
            self.first[key] = (name, x)
            self.owner[name] = name
            x = x.reshape(-1, x.shape[-1]).float()
            # one pass's product in fp32 (fast), the running sum over passes in fp64
            acc = (x.T @ x).double() if self.full else (x.double() ** 2).sum(0)
            self.sums[name] = acc if name not in self.sums else self.sums[name] + acc
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]

        return hook

    def new_pass(self) -> None:
        self.first.clear()

    def __enter__(self):
        for name, mod in self.layers.items():
            self.hooks.append(mod.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def result(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.layers if n not in self.owner]
        if missing:
            raise UnsupportedModelError(
                f"calibration never reached layer(s) {missing[:5]}: they are not called in the "
                "model's forward pass"
            )
        return {n: self.sums[self.owner[n]] / max(self.rows[self.owner[n]], 1) for n in self.layers}


@torch.no_grad()
def activation_stats(
    model,
    windows: np.ndarray,
    layers: dict[str, torch.nn.Linear],
    progress: bool = True,
    full: bool = False,
) -> dict[str, torch.Tensor]:
    """Per layer: ``X^T X / n`` of its inputs over the calibration tokens (``full``: the K x K
    Hessian of the output objective) or only its diagonal (the activation energy per column).

    ``windows`` is int64 [n_windows, window] token ids. Layers that read the same input (q/k/v,
    gate/up) share one accumulator.
    """
    with _Recorder(layers, full) as rec:
        for row in tqdm(windows, desc="calibration", unit="window", disable=not progress):
            rec.new_pass()
            model(input_ids=torch.from_numpy(row[None]), use_cache=False)
    return rec.result()


def output_fisher(
    model, windows: np.ndarray, layers: dict[str, torch.nn.Linear], progress: bool = True
) -> dict[str, torch.Tensor]:
    """Per layer and output channel ``i``: ``E_t[(d loss / d y_{t,i})^2]`` over the calibration
    tokens, ``loss`` the summed next-token negative log-likelihood of each window.

    With it, ``sum_i F_i [(W - Q) H (W - Q)^T]_ii`` estimates (twice) the loss increase a weight
    error causes (diagonal empirical-Fisher approximation), comparable across layers; the raw
    output error is not (the residual stream grows with depth, so deep layers' raw errors dwarf
    those of early layers whose errors propagate through the whole model).
    """
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}
    hooks = []

    def make_hook(name):
        def hook(_mod, _grad_in, grad_out):
            g = grad_out[0].detach().reshape(-1, grad_out[0].shape[-1]).double()
            acc = (g * g).sum(0)
            sums[name] = acc if name not in sums else sums[name] + acc

        return hook

    for name, mod in layers.items():
        hooks.append(mod.register_full_backward_hook(make_hook(name)))
    needs = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        for row in tqdm(windows, desc="loss gradients", unit="window", disable=not progress):
            ids = torch.from_numpy(row[None])
            x = emb(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits[0, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum")
            loss.backward()
            count["n"] += row.shape[0]
    finally:
        for h in hooks:
            h.remove()
        for p, r in zip(model.parameters(), needs, strict=True):
            p.requires_grad_(r)
    missing = [n for n in layers if n not in sums]
    if missing:
        raise UnsupportedModelError(f"no loss gradient reached layer(s) {missing[:5]}")
    return {n: sums[n] / max(count["n"], 1) for n in layers}


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The list of transformer blocks of a Hugging Face decoder (LLaMA/Mistral/Qwen layout
    ``model.model.layers``, GPT-2 ``transformer.h``, OPT ``model.decoder.layers``)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList) and len(obj) > 0:
            return obj
    raise UnsupportedModelError(
        f"sequential calibration needs a decoder with a list of blocks (model.layers, "
        f"transformer.h, ...); {type(model).__name__} has none: calibrate without --sequential"
    )


class _Captured(Exception):
    pass


# fit(name, W[N, K] float64, H[K, K] float64) -> (result, dense float W that the result means)
FitFn = Callable[[str, torch.Tensor, torch.Tensor], tuple[object, torch.Tensor]]


@torch.no_grad()
def sequential_fit(
    model,
    windows: np.ndarray,
    layers: dict[str, torch.nn.Linear],
    fit: FitFn,
    progress: bool = True,
) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """Fit every layer block by block on the outputs of the already-quantized blocks.

    Returns ``({layer: fit result}, {layer: X^T X / n from the quantized-prefix inputs})``. The
    model's weights are restored before returning.
    """
    blocks = decoder_blocks(model)
    block_of: dict[str, int] = {}
    for i, blk in enumerate(blocks):
        for mod in blk.modules():
            for lname, lay in layers.items():
                if lay is mod:
                    block_of[lname] = i
    outside = sorted(set(layers) - set(block_of))
    if outside:
        raise UnsupportedModelError(
            f"layer(s) {outside[:5]} lie outside the decoder blocks: sequential calibration "
            "cannot reach them; calibrate without --sequential"
        )

    # 1. hidden states (and call arguments) entering the first block, once per window
    cached: list[tuple[torch.Tensor, dict]] = []

    def grab(_mod, args, kwargs):
        hs = args[0] if args else kwargs.pop("hidden_states")
        kw = dict(kwargs)
        cached.append((hs.detach().clone(), kw))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for row in tqdm(windows, desc="block inputs", unit="window", disable=not progress):
            try:
                model(input_ids=torch.from_numpy(row[None]), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()

    def run(blk, hs, kw):
        out = blk(hs, **kw)
        return out[0] if isinstance(out, tuple) else out

    originals = {n: lay.weight.detach().clone() for n, lay in layers.items()}
    results: dict[str, object] = {}
    stats: dict[str, torch.Tensor] = {}
    try:
        bar = tqdm(range(len(blocks)), desc="sequential fit", unit="block", disable=not progress)
        for i in bar:
            blk = blocks[i]
            mine = {n: lay for n, lay in layers.items() if block_of[n] == i}
            if mine:
                with _Recorder(mine, full=True) as rec:
                    for hs, kw in cached:
                        rec.new_pass()
                        run(blk, hs, kw)
                h = rec.result()
                for n, lay in mine.items():
                    res, dense = fit(n, originals[n].double(), h[n])
                    results[n], stats[n] = res, h[n]
                    lay.weight.copy_(dense.to(lay.weight.dtype))
            cached = [(run(blk, hs, kw), kw) for hs, kw in cached]
    finally:
        for n, lay in layers.items():
            lay.weight.copy_(originals[n])
    return results, stats
