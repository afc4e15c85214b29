"""End-to-end tuning of the power-of-two scales against the float model (codes fixed).

The layer-wise fit (``gptq.py``) minimizes each Linear's own output error; the errors of 210
Linears then add up through the network. This step adjusts every scale of every layer at once to
keep the quantized model's next-token distributions close to the float model's:

- each scale ``alpha`` of a fitted layer becomes ``alpha_0 * exp(s)`` with a trainable ``s``
  (init 0: the fitted model); the bit-plane codes do not change;
- the forward pass uses ``alpha`` rounded to sums of ``terms`` signed powers of two (the kernel's
  format; straight-through gradient), so the model that is trained is the model that is exported;
- the loss is ``KL(float || quantized)`` of the next-token distributions at every position of the
  calibration windows (the float model is the teacher, run on the same window, no labels);
- the step is normalized momentum descent (``_NormalizedMomentum``): a heavy-ball average of the
  gradients, scaled so that its root-mean-square over all scales equals the learning rate. Scales
  with a large, consistent gradient move (and may cross to a neighbouring power-of-two sum); the
  great majority, whose gradients are small, barely move. Adam does the opposite: its first steps
  move every scale by the learning rate, whatever its gradient, and with millions of scales that
  is what broke the earlier version at 4 bits (measured on SmolLM2-135M, 4 bits: one sign step of
  1e-4 lowered a window's KL 0.093 -> 0.077, 1e-3 raised it to 0.099, 1e-2 to 2.3; Adam at lr 5e-3
  or 1e-3 raised the held-out KL 0.111 -> 0.241 / 0.129, this optimizer at 1e-4 lowered it to
  0.103). Cosine-decayed learning rate, windows in a seeded order: deterministic.
- the step grows with the distance from float: ``lr * max(1, sqrt(KL_before / kl_ref))`` with the
  held-out KL before tuning (defaults 1e-4 and 0.15). Measured on SmolLM2-135M (torch simulation,
  8 windows of each text, wiki / lee perplexity ratio): 2 bits (KL 1.40) with a fixed 1e-4
  5.82x / 5.76x, 3e-4 4.81x / 4.59x, 1e-3 7.93x / 7.75x; 3 bits (KL 0.355) 1e-4 1.578x / 1.570x,
  2e-4 1.552x / 1.544x; 4 bits (KL 0.111) 2e-4 raised the held-out KL. The rule gives 3.05e-4 at
  2 bits, 1.54e-4 at 3 bits and 1e-4 at 4 bits.

Two calibration windows are held out: the tuned scales are kept only if their KL to the float
model there is lower than the fitted scales' (else the fit is returned unchanged, and the report
says so). The weights stay kernel-executable: same planes, same scale format.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from . import defaults
from .errors import ConfigError
from .quant import BCQResult, pow2_value, round_scales

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScaleTuning:
    """Settings of the end-to-end scale tuning (``epochs=0``: off)."""

    epochs: int = defaults.TUNE_EPOCHS
    # calibration windows trained on (after the held-out ones; 32 by default)
    windows: int = defaults.TUNE_WINDOWS
    held_out: int = 2  # calibration windows that judge the result
    lr: float = defaults.TUNE_LR  # root-mean-square step of the log-scales (held-out KL <= kl_ref)
    momentum: float = 0.9
    seed: int = 0
    kl_ref: float = defaults.TUNE_KL_REF  # step lr * max(1, sqrt(KL before / kl_ref)); 0: lr

    def step_for(self, kl_before: float) -> float:
        """The step RMS for a fit whose held-out KL to the float model is ``kl_before``."""
        if self.kl_ref == 0 or not kl_before > self.kl_ref:
            return self.lr
        return self.lr * math.sqrt(kl_before / self.kl_ref)

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.windows < 1 or self.held_out < 1:
            raise ConfigError(
                f"scale tuning: epochs={self.epochs} must be >= 0, windows={self.windows} and "
                f"held_out={self.held_out} >= 1"
            )
        if not self.lr > 0:
            raise ConfigError(f"scale tuning: lr={self.lr} must be > 0")
        if not self.kl_ref >= 0:
            raise ConfigError(f"scale tuning: kl_ref={self.kl_ref} must be >= 0 (0: fixed step)")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"scale tuning: momentum={self.momentum} must be in [0, 1)")


class _NormalizedMomentum(torch.optim.Optimizer):
    """Heavy-ball momentum whose step has root-mean-square ``lr`` over all parameters together:
    ``b = momentum * b + grad``, ``p -= lr * b / rms(b)``. Parameters move in proportion to their
    (averaged) gradient, not all by ``lr`` as with Adam's normalization per parameter."""

    def __init__(self, params, lr: float, momentum: float):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        bufs, owners = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "buf" in st:
                    st["buf"].mul_(group["momentum"]).add_(p.grad)
                else:
                    st["buf"] = p.grad.detach().clone()
                bufs.append(st["buf"])
                owners.append((p, group["lr"]))
        if not bufs:
            return None
        sq = sum(float((b.double() ** 2).sum()) for b in bufs)
        rms = math.sqrt(sq / sum(b.numel() for b in bufs))
        if rms == 0.0:
            return None
        for (p, lr), b in zip(owners, bufs, strict=True):
            p.sub_(b, alpha=lr / rms)
        return None


class _TunedLinear(torch.nn.Module):
    """A Linear whose weight is ``sum_b sign_b * round_pow2(alpha_0 * exp(s))`` (or the float one)."""

    def __init__(self, lin: torch.nn.Linear, fit: BCQResult):
        super().__init__()
        self.lin = lin
        self.gs, self.cfg = fit.cfg.group_size, fit.cfg
        self.register_buffer("signs", fit.codes.to(torch.int8) * 2 - 1)  # [bits, N, K]
        self.register_buffer("alpha0", fit.alpha.float())  # [bits, N, G]
        self.s = torch.nn.Parameter(torch.zeros_like(self.alpha0))
        self.teacher = False

    def alpha(self) -> torch.Tensor:
        a = self.alpha0 * torch.exp(self.s)
        signs, exps = round_scales(a.detach(), self.cfg, 0)
        return a + (pow2_value(signs, exps).float() - a).detach()  # straight-through rounding

    def forward(self, x):
        if self.teacher:
            return self.lin(x)
        k = self.signs.shape[-1]
        a = torch.repeat_interleave(self.alpha(), self.gs, dim=-1)[..., :k]
        return torch.nn.functional.linear(x, (self.signs * a).sum(0), self.lin.bias)

    def result(self, fit: BCQResult) -> BCQResult:
        with torch.no_grad():
            signs, exps = round_scales(
                self.alpha0.double() * torch.exp(self.s.double()), self.cfg, 0
            )
        return dataclasses.replace(fit, term_signs=signs, term_exps=exps)


def _kl(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || model) of the next-token distributions."""
    tp = torch.log_softmax(teacher_logits.float(), -1)
    lp = torch.log_softmax(logits.float(), -1)
    return (tp.exp() * (tp - lp)).sum(-1).mean()


def tune_scales(
    model,
    fits: dict[str, BCQResult],
    windows: np.ndarray,
    cfg: ScaleTuning = ScaleTuning(),
    progress: bool = True,
) -> tuple[dict[str, BCQResult], dict]:
    """Tune the scales of ``fits`` (Linear module name -> fit) in ``model`` (a torch causal LM whose
    named Linears hold the float weights) on ``windows`` (int64 [n, w] calibration token ids).

    Returns the new fits (or the given ones, if tuning did not lower the held-out KL) and a report
    dict. ``model`` is left as it was.
    """
    if cfg.epochs == 0:
        return fits, {"enabled": False}
    windows = np.asarray(windows)
    if len(windows) < cfg.held_out + 1:
        raise ConfigError(
            f"scale tuning needs more than {cfg.held_out} calibration windows, got {len(windows)}: "
            "raise the calibration windows or turn scale tuning off"
        )
    held, train = windows[: cfg.held_out], windows[cfg.held_out : cfg.held_out + cfg.windows]
    if len(train) < cfg.windows:
        log.warning(
            "scale tuning: %d training windows asked for, the calibration has %d after the %d "
            "held-out ones; training on %d (raise the calibration windows, e.g. --calib-windows %d)",
            cfg.windows,
            len(train),
            cfg.held_out,
            len(train),
            cfg.windows + cfg.held_out,
        )
    t0 = time.time()
    wrapped: dict[str, _TunedLinear] = {}
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    try:
        for name, fit in fits.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            wrapped[name] = _TunedLinear(getattr(parent, child), fit)
            setattr(parent, child, wrapped[name])
        for p in model.parameters():
            p.requires_grad_(False)
        params = [m.s for m in wrapped.values()]
        for p in params:
            p.requires_grad_(True)
        model.eval()

        def run(ids: np.ndarray, teacher: bool):
            for m in wrapped.values():
                m.teacher = teacher
            return model(input_ids=torch.from_numpy(ids[None]), use_cache=False).logits

        @torch.no_grad()
        def held_kl() -> float:
            return float(np.mean([_kl(run(w, True), run(w, False)).item() for w in held]))

        before = held_kl()
        lr = cfg.step_for(before)
        opt = _NormalizedMomentum(params, lr=lr, momentum=cfg.momentum)
        steps = cfg.epochs * len(train)
        rng = np.random.RandomState(cfg.seed)
        losses = []
        bar = tqdm(total=steps, desc="scale tuning", unit="window", disable=not progress)
        for step in range(steps):
            if step % len(train) == 0:
                order = rng.permutation(len(train))
            ids = train[order[step % len(train)]]
            with torch.no_grad():
                teacher = run(ids, True)
            loss = _kl(teacher, run(ids, False))
            opt.zero_grad()
            loss.backward()
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(kl=f"{loss.item():.4f}")
            bar.update()
        bar.close()
        after = held_kl()
        kept = after < before
        out = {n: m.result(fits[n]) for n, m in wrapped.items()} if kept else fits
    finally:
        for name, m in wrapped.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.lin)
        for p, g in saved_grad.items():
            p.requires_grad_(g)
        model.train(was_training)
    report = {
        "enabled": True,
        **dataclasses.asdict(cfg),
        "lr_used": lr,
        "windows_used": len(train),
        "held_out_kl_before": round(before, 5),
        "held_out_kl_after": round(after, 5),
        "kept": kept,
        "train_kl_first_last": [round(losses[0], 5), round(losses[-1], 5)],
        "seconds": round(time.time() - t0, 1),
    }
    if kept:
        log.info(
            "scale tuning: held-out KL %.4f -> %.4f (step %.2g, %.0f s)",
            before,
            after,
            lr,
            report["seconds"],
        )
    else:
        log.warning(
            "scale tuning did not lower the held-out KL (%.4f -> %.4f): kept the fitted scales",
            before,
            after,
        )
    return out, report
