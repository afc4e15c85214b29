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
