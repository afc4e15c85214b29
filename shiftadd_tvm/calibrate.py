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
def activation_energy(
    model, windows: np.ndarray, layers: dict[str, torch.nn.Linear], progress: bool = True
) -> dict[str, torch.Tensor]:
    """Mean squared input activation per input column (diag of X^T X / n) of each layer.

    ``windows`` is int64 [n_windows, window] token ids.
    """
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}
    count = {"n": 0}
    hooks = []

    def make_hook(name):
        def hook(_mod, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] += (x * x).sum(0)

        return hook

    for name, mod in layers.items():
        hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        for row in tqdm(windows, desc="calibration", unit="window", disable=not progress):
            model(input_ids=torch.from_numpy(row[None]), use_cache=False)
            count["n"] += row.shape[0]
    finally:
        for h in hooks:
            h.remove()
    return {name: s / max(count["n"], 1) for name, s in sums.items()}
