"""Baseline weight quantizers for the accuracy report, in the same harness as ours.

They return dense float64 weights (fake quantization: evaluated in torch, not compiled):

- ``rtn``: round to nearest on an asymmetric uniform grid per output row and group of
  ``group_size`` columns (min/max of the group; a ragged last group is its own group);
- ``gptq``: the same uniform grid inside the GPTQ column loop (``gptq.gptq_loop``): with
  act-order the grid of each group is fixed from the original weights ("static groups", so no
  index table is needed); without act-order the grid is computed when the loop reaches the group
  from the already error-compensated weights (GPTQ's reference behaviour);
- ``bcq_plain``: binary coding with power-of-two scales fitted on the weights alone (no activation
  weighting, no output objective) -- the format of our kernels, fitted the plain way.

Storage: the uniform grids keep an fp16 scale and an fp16 offset per group (``bits + 32 / group``
bits per weight); the binary coding formats keep ``terms`` one-byte power-of-two codes per scale.
"""

from __future__ import annotations

import torch

from .gptq import gptq_loop
from .quant import QuantConfig, bcq_quantize

BASELINES = ("rtn", "gptq", "gptq_noact", "bcq_plain")


def uniform_bits_per_weight(bits: int, group_size: int) -> float:
    """Grid bits plus an fp16 scale and an fp16 offset per group."""
    return bits + 32 / group_size


def _grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w[N, g]``: (scale[N], zero[N]) of the asymmetric min/max grid."""
    lo = w.min(dim=1).values.clamp(max=0)
    hi = w.max(dim=1).values.clamp(min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    return scale, zero


def _snap(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def rtn(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round to nearest, asymmetric uniform grid per row and group."""
    w = w.double()
    out = torch.empty_like(w)
    for g0 in range(0, w.shape[1], group_size):
        blk = w[:, g0 : g0 + group_size]
        scale, zero = _grid(blk, bits)
        out[:, g0 : g0 + group_size] = _snap(blk, scale[:, None], zero[:, None], bits)
    return out


def gptq_uniform(
    w: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    act_order: bool = True,
    damp: float = 0.01,
) -> torch.Tensor:
    """Uniform-grid GPTQ (see the module docstring for the group handling)."""
    w = w.double()
    n, k = w.shape
    groups = -(-k // group_size)
    scale = torch.ones(groups, n, dtype=torch.float64)
    zero = torch.zeros(groups, n, dtype=torch.float64)
    if act_order:  # static groups from the original weights
        for g in range(groups):
            scale[g], zero[g] = _grid(w[:, g * group_size : (g + 1) * group_size], bits)
        begin = None
    else:

        def begin(cols: torch.Tensor, wb: torch.Tensor) -> None:
            # without act-order, block == group: the block's columns are one group, compensated
            g = int(cols[0]) // group_size
            scale[g], zero[g] = _grid(wb, bits)

    def pick(j: int, col: torch.Tensor) -> torch.Tensor:
        g = j // group_size
        return _snap(col, scale[g], zero[g], bits)

    return gptq_loop(
        w, hessian, pick, act_order=act_order, damp=damp, block=group_size, begin_block=begin
    )


def quantize_baseline(
    method: str,
    w: torch.Tensor,
    hessian: torch.Tensor | None,
    bits: int,
    group_size: int = 128,
    terms: int = 3,
    iters: int = 15,
) -> tuple[torch.Tensor, float]:
    """(dense fake-quantized W, bits per weight incl. scale storage) for one baseline."""
    if method == "rtn":
        return rtn(w, bits, group_size), uniform_bits_per_weight(bits, group_size)
    if method in ("gptq", "gptq_noact"):
        q = gptq_uniform(w, hessian, bits, group_size, act_order=method == "gptq")
        return q, uniform_bits_per_weight(bits, group_size)
    if method == "bcq_plain":
        cfg = QuantConfig(bits=bits, group_size=group_size, terms=terms, iters=iters, method="bcq")
        return bcq_quantize(w, cfg).dequantize(), cfg.bits_per_weight()
    raise ValueError(f"unknown baseline {method!r}; choose one of {BASELINES}")
