"""Calibration: activation statistics of every Linear to be reparameterized, from real text."""

from __future__ import annotations

import logging

import numpy as np
import torch
from tqdm import tqdm

log = logging.getLogger(__name__)


def target_linears(model) -> dict[str, torch.nn.Linear]:
    """The Linear layers of the transformer blocks (the output head stays dense)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            out[name] = mod
    return out


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
    # id(input tensor) -> (owner layer, the tensor): holding the tensor keeps its id from being
    # reused by another tensor within the same forward pass
    first: dict[int, tuple[str, torch.Tensor]] = {}
    owner: dict[str, str] = {}
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}
    hooks = []

    def make_hook(name):
        def hook(_mod, inputs):
            x = inputs[0].detach()
            key = id(x)
            if key in first and first[key][0] != name:  # same tensor as a sibling layer: share
                owner[name] = first[key][0]
                return
            first[key] = (name, x)
            owner[name] = name
            x = x.reshape(-1, x.shape[-1]).float()
            # one window's product in fp32 (fast), the running sum over windows in fp64
            acc = (x.T @ x).double() if full else (x.double() ** 2).sum(0)
            sums[name] = acc if name not in sums else sums[name] + acc

        return hook

    for name, mod in layers.items():
        hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        for row in tqdm(windows, desc="calibration", unit="window", disable=not progress):
            first.clear()
            model(input_ids=torch.from_numpy(row[None]), use_cache=False)
            count["n"] += row.shape[0]
    finally:
        for h in hooks:
            h.remove()
    n = max(count["n"], 1)
    return {name: sums[owner[name]] / n for name in layers}
