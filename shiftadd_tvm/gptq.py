"""GPTQ/OPTQ column loop with binary-coding quantization inside (the output objective).

For a Linear with calibration Hessian ``H = X^T X / n`` the loop quantizes one column at a time and
feeds the error of each column forward into the columns not yet quantized (through the Cholesky
factor of ``H^-1``), so the layer's output error, not just its weight error, is minimized.

Inside the loop each column's weights are coded as the nearest of the ``2^bits`` signed sums of its
group's scales. The scales are fixed per group before the loop ("static groups", fitted on the
original weights with the diag(H)-weighted BCQ of ``quant.py``), so act-order (columns processed by
decreasing activation energy) keeps contiguous groups and the kernel needs no index table. After
the loop the scales are refitted against the full output error ``(w - q) H (w - q)^T`` with the codes
fixed, rounded again to sums of signed powers of two, and kept per row where that lowers the error.
"""

from __future__ import annotations

import itertools

import torch

from .quant import BCQResult, QuantConfig, bcq_quantize, round_pow2_terms


def _group_values(alpha: torch.Tensor, combos: torch.Tensor) -> torch.Tensor:
    """alpha [bits, N, G] -> candidate values [G, N, 2^bits]."""
    return torch.einsum("bng,cb->gnc", alpha, combos)


def _output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row (w - q) H (w - q)^T."""
    e = w - q
    return ((e @ h) * e).sum(-1)


def _dequant(codes: torch.Tensor, alpha: torch.Tensor, gs: int) -> torch.Tensor:
    """codes bool [bits, N, K], alpha [bits, N, G] -> W [N, K] float64."""
    k = codes.shape[-1]
    a = torch.repeat_interleave(alpha, gs, dim=-1)[..., :k]
    return ((codes.double() * 2 - 1) * a).sum(0)


def _refit_alpha(w, codes, h, gs, chunk=256):
    """Least-squares alpha [bits, N, G] minimizing the output error with the codes fixed."""
    bits, n, k = codes.shape
    groups = -(-k // gs)
    s = codes.double() * 2 - 1  # [bits, N, K]
    out = torch.empty(bits, n, groups, dtype=torch.float64)
    gid = torch.arange(k) // gs
    onehot = torch.nn.functional.one_hot(gid, groups).double()  # [K, G]
    eye = torch.eye(bits * groups, dtype=torch.float64)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        # B[r, k, (b, g)] = s[b, r, k] * [k in g]
        B = torch.einsum("brk,kg->rkbg", s[:, r0:r1], onehot).reshape(r1 - r0, k, bits * groups)
        BtH = torch.einsum("rkj,kl->rjl", B, h)
        A = BtH @ B
        rhs = torch.einsum("rjl,rl->rj", BtH, w[r0:r1])
        ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        sol = torch.linalg.solve(A + ridge[:, None, None] * eye, rhs[:, :, None])[:, :, 0]
        out[:, r0:r1] = sol.reshape(r1 - r0, bits, groups).permute(1, 0, 2)
    return out


def gptq_bcq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    cfg: QuantConfig,
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    refit: bool = True,
    name: str = "weight",
) -> BCQResult:
    """Quantize ``w[N, K]`` with the GPTQ loop and BCQ codes; ``hessian`` is ``X^T X / n`` [K, K]."""
    n, k = w.shape
    gs, bits = cfg.group_size, cfg.bits
    h0 = hessian.double().clone()
    dead = torch.diagonal(h0) <= 0
    h0[dead, dead] = 1.0
    w0 = w.double().clone()
    w0[:, dead] = 0.0

    # static group scales from the diag(H)-weighted BCQ of the original weights
    init = bcq_quantize(w0, cfg, torch.diagonal(h0).clone(), name=name)
    alpha = init.alpha  # [bits, N, G] exact powers-of-two sums
    combos = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=torch.float64)
    values = _group_values(alpha, combos)  # [G, N, C]

    h = h0.clone()
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    W = w0[:, perm].clone()
    hp = h[perm][:, perm]
    L = torch.linalg.cholesky(hp)
    hinv = torch.cholesky_inverse(L)
    hinv = torch.linalg.cholesky(hinv, upper=True)
    group_of = (perm // gs).tolist()
    code_idx = torch.empty(n, k, dtype=torch.long)
    rows = torch.arange(n)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            vals = values[group_of[i1 + i]]  # [N, C]
            best = torch.argmin((col[:, None] - vals).abs(), dim=1)
            q = vals[rows, best]
            code_idx[:, i1 + i] = best
            e = (col - q) / hinv1[i, i]
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes_perm = combos[code_idx] > 0  # [N, K(perm), bits]
    codes = torch.empty(bits, n, k, dtype=torch.bool)
    codes[:, :, perm] = codes_perm.permute(2, 0, 1)

    ts, te = init.term_signs, init.term_exps
    if refit:
        q_static = _dequant(codes, alpha, gs)
        err_static = _output_error(w0, q_static, h0)
        new_alpha = _refit_alpha(w0, codes, h0, gs)
        ns, ne = round_pow2_terms(new_alpha, cfg.terms)
        q_new = _dequant(codes, (ns.double() * torch.exp2(ne.double())).sum(-1), gs)
        better = _output_error(w0, q_new, h0) < err_static  # per row
        ts = torch.where(better[None, :, None, None], ns, ts)
        te = torch.where(better[None, :, None, None], ne, te)
    return BCQResult(codes=codes, term_signs=ts.contiguous(), term_exps=te.contiguous(), cfg=cfg)
