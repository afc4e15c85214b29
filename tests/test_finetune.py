"""End-to-end scale tuning (finetune.py) on the tiny LLaMA: lowers the KL to the float model,
keeps the format, leaves the model as it was, is deterministic, and refuses bad settings."""

import numpy as np
import pytest
import torch
from conftest import TINY_SEQ, tiny_llama

from shiftadd_tvm.calibrate import activation_stats, target_linears
from shiftadd_tvm.errors import ConfigError
from shiftadd_tvm.finetune import ScaleTuning, _kl, _NormalizedMomentum, tune_scales
from shiftadd_tvm.gptq import gptq_bcq
from shiftadd_tvm.quant import QuantConfig


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama(seed=3)
    windows = np.random.default_rng(1).integers(0, 256, (8, TINY_SEQ))
    layers = target_linears(model)
    stats = activation_stats(model, windows, layers, progress=False, full=True)
    cfg = QuantConfig(bits=2, group_size=32, terms=3)
    fits = {n: gptq_bcq(m.weight.detach(), stats[n], cfg) for n, m in layers.items()}
    return model, windows, fits


def _kl_with(model, fits, windows):
    layers = target_linears(model)
    saved = {n: layers[n].weight.detach().clone() for n in fits}
    with torch.no_grad():
        ref = [model(input_ids=torch.from_numpy(w[None])).logits for w in windows]
        for n, r in fits.items():
            layers[n].weight.copy_(r.dequantize().float())
        out = [model(input_ids=torch.from_numpy(w[None])).logits for w in windows]
        for n, w in saved.items():
            layers[n].weight.copy_(w)
    return float(np.mean([_kl(a, b).item() for a, b in zip(ref, out, strict=True)]))


def test_tuning_lowers_kl_keeps_format_and_model(setup):
    model, windows, fits = setup
    weights = {n: m.weight.detach().clone() for n, m in target_linears(model).items()}
    grads = [p.requires_grad for p in model.parameters()]
    # random tokens through a random model carry nothing to generalize from, so the two judging
    # windows are copies of training windows here: the test checks the mechanics, not the data
    data = np.concatenate([windows[2:4], windows[2:]])
    cfg = ScaleTuning(epochs=3, windows=6, held_out=2, lr=3e-3)
    tuned, rep = tune_scales(model, fits, data, cfg, progress=False)
    assert rep["kept"] and rep["held_out_kl_after"] < rep["held_out_kl_before"]
    assert rep["lr_used"] == pytest.approx(cfg.step_for(rep["held_out_kl_before"]), rel=1e-3)
    assert _kl_with(model, tuned, windows[2:]) < 0.9 * _kl_with(model, fits, windows[2:])
    for n, r in tuned.items():
        assert torch.equal(r.codes, fits[n].codes)  # codes fixed
        assert r.term_exps.shape == fits[n].term_exps.shape and r.cfg == fits[n].cfg
        assert set(r.term_signs.unique().tolist()) <= {-1, 0, 1}
    # the model is back as it was: same modules, same float weights, same requires_grad flags
    now = target_linears(model)
    assert set(now) == set(weights)
    for n, m in now.items():
        assert type(m) is torch.nn.Linear and torch.equal(m.weight, weights[n])
    assert [p.requires_grad for p in model.parameters()] == grads
    again, _ = tune_scales(model, fits, data, cfg, progress=False)
    assert all(torch.equal(again[n].term_exps, tuned[n].term_exps) for n in tuned)


def test_tuning_that_hurts_the_held_out_windows_is_dropped(setup, caplog):
    model, windows, fits = setup
    cfg = ScaleTuning(epochs=2, lr=0.3, windows=len(windows))  # asks for more than there are
    with caplog.at_level("WARNING", logger="shiftadd_tvm.finetune"):
        out, rep = tune_scales(model, fits, windows, cfg, progress=False)
    assert not rep["kept"] and rep["held_out_kl_after"] >= rep["held_out_kl_before"]
    assert out is fits
    # fewer training windows than asked for is said, not silent
    assert rep["windows_used"] == len(windows) - 2
    assert f"training on {len(windows) - 2}" in caplog.text and "--calib-windows" in caplog.text


def test_tuning_settings_are_checked(setup):
    model, windows, fits = setup
    with pytest.raises(ConfigError, match="windows"):
        tune_scales(model, fits, windows[:2], ScaleTuning(held_out=2), progress=False)
    with pytest.raises(ConfigError, match="lr"):
        ScaleTuning(lr=0)
    with pytest.raises(ConfigError, match="momentum"):
        ScaleTuning(momentum=1.0)
    with pytest.raises(ConfigError, match="kl_ref"):
        ScaleTuning(kl_ref=-1)
    same, rep = tune_scales(model, fits, windows, ScaleTuning(epochs=0), progress=False)
    assert same is fits and rep == {"enabled": False}


def test_step_grows_with_the_distance_from_float():
    cfg = ScaleTuning(lr=1e-4, kl_ref=0.15)
    assert cfg.step_for(0.1) == cfg.step_for(0.15) == 1e-4  # near float: the base step
    assert cfg.step_for(0.6) == pytest.approx(2e-4)  # sqrt(0.6 / 0.15) = 2
    assert cfg.step_for(1.4) == pytest.approx(1e-4 * (1.4 / 0.15) ** 0.5)
    assert ScaleTuning(lr=1e-4, kl_ref=0).step_for(5.0) == 1e-4  # fixed step


def test_normalized_momentum_step():
    """Step RMS over all parameters is lr; a parameter moves in proportion to its averaged
    gradient (zero gradient: no move); momentum adds the previous steps' gradients."""
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = _NormalizedMomentum([a, b], lr=0.1, momentum=0.5)
    g1a, g1b = (
        torch.tensor([3.0, 0.0, -1.0], dtype=torch.float64),
        torch.tensor([1.0, 0.0], dtype=torch.float64),
    )
    a.grad, b.grad = g1a.clone(), g1b.clone()
    opt.step()
    rms = torch.cat([g1a, g1b]).pow(2).mean().sqrt()
    torch.testing.assert_close(a.detach(), -0.1 * g1a / rms)
    torch.testing.assert_close(b.detach(), -0.1 * g1b / rms)
    step = torch.cat([a.detach(), b.detach()])
    assert abs(step.pow(2).mean().sqrt().item() - 0.1) < 1e-12 and a[1].item() == 0.0
    a0, b0 = a.detach().clone(), b.detach().clone()
    g2a, g2b = (
        torch.tensor([0.0, 2.0, 0.0], dtype=torch.float64),
        torch.tensor([0.0, 0.0], dtype=torch.float64),
    )
    a.grad, b.grad = g2a.clone(), g2b.clone()
    opt.step()
    buf = torch.cat([0.5 * g1a + g2a, 0.5 * g1b + g2b])
    torch.testing.assert_close(
        torch.cat([a.detach() - a0, b.detach() - b0]), -0.1 * buf / buf.pow(2).mean().sqrt()
    )


def test_tuning_keeps_per_plane_term_counts(setup):
    model, windows, _ = setup
    layers = target_linears(model)
    stats = activation_stats(model, windows, layers, progress=False, full=True)
    cfg = QuantConfig(bits=2, group_size=32, terms=3, plane_terms=(3, 1))
    fits = {n: gptq_bcq(m.weight.detach(), stats[n], cfg) for n, m in layers.items()}
    data = np.concatenate([windows[2:4], windows[2:]])
    tuned, rep = tune_scales(model, fits, data, ScaleTuning(epochs=2, windows=6, lr=3e-3), False)
    assert rep["kept"]
    for r in tuned.values():
        used = (r.term_signs != 0).sum(-1).amax(dim=(1, 2)).tolist()
        assert used[0] <= 3 and used[1] <= 1
