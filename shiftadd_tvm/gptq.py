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

GPTQ decides each code once, against columns not yet quantized. ``sweeps`` passes of coordinate
descent then revisit every code against the full output error: column ``j`` moves to the level
nearest ``q_j + [(w - q) H]_j / H_jj`` (the exact minimizer over column ``j`` with the others
fixed), so no pass increases the error; each pass is followed by another scale refit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from .quant import BCQResult, QuantConfig, bcq_quantize, pow2_value, round_scales


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


def _refit_alpha(w, codes, h, gs, chunk=128):
    """Least-squares alpha [bits, N, G] minimizing the output error with the codes fixed.

    Per row the normal equations ``(B H B^T) a = B H w`` with ``B[(b, g), k] = s_b[k] [k in g]``;
    ``B`` is block sparse, so ``H B^T`` costs ``bits K^2`` per row rather than ``bits G K^2``.
    """
    bits, n, k = codes.shape
    groups = -(-k // gs)
    kp = groups * gs
    hp = torch.zeros(kp, kp, dtype=torch.float64)
    hp[:k, :k] = h
    hp4 = hp.reshape(groups, gs, groups, gs)
    wp = torch.zeros(n, kp, dtype=torch.float64)
    wp[:, :k] = w
    hw = (wp @ hp).reshape(n, groups, gs)  # (H w) per row, H symmetric
    s = torch.zeros(bits, n, kp, dtype=torch.float64)
    s[:, :, :k] = codes.double() * 2 - 1
    s = s.reshape(bits, n, groups, gs)
    out = torch.empty(bits, n, groups, dtype=torch.float64)
    m = bits * groups
    eye = torch.eye(m, dtype=torch.float64)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        sr = s[:, r0:r1]  # [bits, r, G, gs]
        # hs[r, g, k, b', h] = sum_l H[(g, k), (h, l)] s_b'[(h, l)]
        hs = torch.einsum("gkhl,brhl->rgkbh", hp4, sr)
        A = torch.einsum("brgk,rgkch->rbgch", sr, hs).reshape(r1 - r0, m, m)
        rhs = torch.einsum("brgk,rgk->rbg", sr, hw[r0:r1]).reshape(r1 - r0, m)
        ridge = 1e-9 * A.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(1e-30)
        sol = torch.linalg.solve(A + ridge[:, None, None] * eye, rhs[:, :, None])[:, :, 0]
        out[:, r0:r1] = sol.reshape(r1 - r0, bits, groups).permute(1, 0, 2)
    return out


def _cd_sweep(
    w: torch.Tensor,
    h: torch.Tensor,
    code_idx: torch.Tensor,
    values: torch.Tensor,
    gs: int,
    block: int = 128,
) -> None:
    """One coordinate-descent pass over the columns (decreasing ``H_jj``), in place on ``code_idx``.

    ``values[G, N, C]`` are each group's candidate levels; ``code_idx[N, K]`` the chosen ones.
    Keeps ``R = (w - q) H`` up to date: inside a block of ``block`` columns (in visiting order)
    with rank-1 updates of the block's columns only, then for all columns at once (as GPTQ's lazy
    batch updates: same result, matrix-matrix work).
    """
    n, k = w.shape
    rows = torch.arange(n)
    q = torch.empty_like(w)
    for g in range(values.shape[0]):
        c0, c1 = g * gs, min(k, (g + 1) * gs)
        q[:, c0:c1] = torch.gather(values[g], 1, code_idx[:, c0:c1])
    r = (w - q) @ h
    d = torch.diagonal(h)
    order = torch.argsort(d, descending=True)
    for i0 in range(0, k, block):
        cols = order[i0 : i0 + block]
        rb = r[:, cols]  # a copy (advanced indexing)
        hb = h[cols][:, cols]
        dq = torch.zeros(n, len(cols), dtype=w.dtype)
        for t, j in enumerate(cols.tolist()):
            if d[j] <= 0:
                continue
            vals = values[j // gs]
            best = torch.argmin(((q[:, j] + rb[:, t] / d[j])[:, None] - vals).abs(), dim=1)
            new = vals[rows, best]
            delta = q[:, j] - new  # change of the error (w - q) in column j
            code_idx[:, j] = best
            q[:, j] = new
            rb += delta[:, None] * hb[t][None, :]
            dq[:, t] = delta
        r += dq @ h[cols]


def gptq_loop(
    w: torch.Tensor,
    hessian: torch.Tensor,
    pick: Callable[[int, torch.Tensor], torch.Tensor],
    act_order: bool = True,
    damp: float = 0.01,
    block: int = 128,
    begin_block: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The GPTQ/OPTQ column loop with a pluggable per-column quantizer.

    ``pick(j, col)`` returns the quantized values ``q[N]`` of column ``j`` (original column index)
    given its current (error-compensated) values ``col[N]``. ``begin_block(cols, W_block)`` is
    called at the start of each block of ``block`` columns with their original indices and current
    values (GPTQ's dynamic groups: with ``block == group_size`` and no act-order, the block is one
    group, fully compensated). Columns with no activation energy are zeroed. The error of each
    column is fed forward into the columns not yet quantized through the upper Cholesky factor of
    ``(H + damp * mean(diag H) I)^-1``. Returns the quantized ``W[N, K]`` (float64, original
    column order).
    """
    n, k = w.shape
    h = hessian.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w0 = w.double().clone()
    w0[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(k)
    W = w0[:, perm].clone()
    hp = h[perm][:, perm]
    L = torch.linalg.cholesky(hp)
    hinv = torch.cholesky_inverse(L)
    hinv = torch.linalg.cholesky(hinv, upper=True)
    Q = torch.zeros_like(W)
    order = perm.tolist()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        if begin_block is not None:
            begin_block(perm[i1:i2], W1)
        err1 = torch.zeros_like(W1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            q = pick(order[i1 + i], col)
            Q[:, i1 + i] = q
            e = (col - q) / hinv1[i, i]
            W1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = torch.empty_like(Q)
    out[:, perm] = Q
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
    rounds: int = 1,
    sweeps: int = 0,
) -> BCQResult:
    """Quantize ``w[N, K]`` with the GPTQ loop and BCQ codes; ``hessian`` is ``X^T X / n`` [K, K].

    ``rounds`` > 1 repeats the loop with the refitted scales as the static grid and refits again;
    ``sweeps`` coordinate-descent passes (each followed by a refit) follow every loop. Per row the
    best (codes, scales) by output error is kept.
    """
    n, k = w.shape
    gs, bits = cfg.group_size, cfg.bits
    h0 = hessian.double().clone()
    dead = torch.diagonal(h0) <= 0
    h0[dead, dead] = 1.0
    w0 = w.double().clone()
    w0[:, dead] = 0.0

    # static group scales from the diag(H)-weighted BCQ of the original weights
    init = bcq_quantize(w0, cfg, torch.diagonal(h0).clone(), name=name)
    combos = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=torch.float64)
    code_idx = torch.empty(n, k, dtype=torch.long)
    rows = torch.arange(n)
    grid = {}

    def pick(j: int, col: torch.Tensor) -> torch.Tensor:
        vals = grid["values"][j // gs]  # [N, C]
        best = torch.argmin((col[:, None] - vals).abs(), dim=1)
        code_idx[:, j] = best
        return vals[rows, best]

    def keep(state, codes, ts, te):
        """Per row, the better of ``state`` and (codes, ts, te) by output error."""
        err = _output_error(w0, _dequant(codes, pow2_value(ts, te), gs), h0)
        if state is None:
            return (codes, ts, te, err)
        b = err < state[3]
        return (
            torch.where(b[None, :, None], codes, state[0]),
            torch.where(b[None, :, None, None], ts, state[1]),
            torch.where(b[None, :, None, None], te, state[2]),
            torch.where(b, err, state[3]),
        )

    weights = 2 ** torch.arange(bits - 1, -1, -1)  # codes -> index into combos
    state = None
    ts, te = init.term_signs, init.term_exps
    for _ in range(max(1, rounds)):
        grid["values"] = _group_values(pow2_value(ts, te), combos)  # [G, N, C]
        gptq_loop(w0, hessian, pick, act_order=act_order, damp=damp, block=block)
        for sweep in range(sweeps + 1):
            if sweep:
                _cd_sweep(w0, h0, code_idx, grid["values"], gs)
            codes = (combos[code_idx] > 0).permute(2, 0, 1).contiguous()  # [bits, N, K]
            state = keep(state, codes, ts, te)
            if not refit:
                break
            ts, te = round_scales(_refit_alpha(w0, codes, h0, gs), cfg, 0)
            state = keep(state, codes, ts, te)
            ts, te = state[1], state[2]
            grid["values"] = _group_values(pow2_value(ts, te), combos)
            code_idx = (state[0].long() * weights[:, None, None]).sum(0)  # the kept rows' codes
        if not refit:
            break
    codes, ts, te, _ = state
    return BCQResult(codes=codes, term_signs=ts.contiguous(), term_exps=te.contiguous(), cfg=cfg)
