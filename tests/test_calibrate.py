"""Calibration statistics: one float pass, and block by block on quantized-prefix outputs."""

import numpy as np
import pytest
import torch

from shiftadd_tvm.calibrate import activation_stats, decoder_blocks, sequential_fit, target_linears
from shiftadd_tvm.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    windows = np.random.default_rng(0).integers(0, 64, size=(3, 16)).astype(np.int64)
    return model, windows


def test_identity_fit_reproduces_float_statistics(tiny):
    model, windows = tiny
    layers = target_linears(model)
    assert len(layers) == 3 * 7
    ref = activation_stats(model, windows, layers, progress=False, full=True)
    res, stats = sequential_fit(
        model, windows, layers, lambda n, w, h: (n, w.clone()), progress=False
    )
    assert set(stats) == set(layers) and res["model.layers.1.mlp.up_proj"] == (
        "model.layers.1.mlp.up_proj"
    )
    for n in layers:
        assert torch.allclose(stats[n], ref[n], rtol=1e-5, atol=1e-6), n


def test_quantized_prefix_changes_later_inputs_and_weights_are_restored(tiny):
    model, windows = tiny
    layers = target_linears(model)
    before = {n: lay.weight.detach().clone() for n, lay in layers.items()}
    ref = activation_stats(model, windows, layers, progress=False, full=True)

    def coarse(n, w, h):  # a crude 1-bit sign quantizer: perturbs every block's output
        return None, torch.sign(w) * w.abs().mean()

    _, stats = sequential_fit(model, windows, layers, coarse, progress=False)
    # block 0 sees the float embeddings; its attention output projection and everything after
    # sees the quantized prefix
    assert torch.allclose(
        stats["model.layers.0.self_attn.q_proj"],
        ref["model.layers.0.self_attn.q_proj"],
        rtol=1e-5,
        atol=1e-6,
    )
    assert not torch.allclose(
        stats["model.layers.1.self_attn.q_proj"], ref["model.layers.1.self_attn.q_proj"], rtol=1e-2
    )
    for n, lay in layers.items():
        assert torch.equal(lay.weight, before[n])


def test_model_without_blocks_is_refused():
    with pytest.raises(UnsupportedModelError, match="sequential"):
        decoder_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_output_fisher_matches_autograd(tiny):
    from shiftadd_tvm.calibrate import output_fisher

    model, windows = tiny
    layers = target_linears(model)
    name = "model.layers.1.mlp.down_proj"
    fisher = output_fisher(model, windows, layers, progress=False)
    assert fisher[name].shape == (32,) and (fisher[name] >= 0).all()
    # direct: gradient of the summed next-token NLL with respect to the layer's output
    outs = []

    def keep(_mod, _inp, out):
        out.retain_grad()
        outs.append(out)

    h = layers[name].register_forward_hook(keep)
    total = torch.zeros(32, dtype=torch.float64)
    try:
        for row in windows:
            outs.clear()
            ids = torch.from_numpy(row[None])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
            torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").backward()
            total += (outs[0].grad[0].double() ** 2).sum(0)
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    assert torch.allclose(fisher[name], total / windows.size, rtol=1e-4, atol=1e-12)
    # a layer late in the model is not the same as one early: the statistic is per layer
    assert not torch.allclose(fisher["model.layers.0.mlp.down_proj"], fisher[name])
