"""Offline rotation (``rotate.py``): Hadamard construction, float exactness, what stays dense."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from shiftadd_tvm.calibrate import target_linears
from shiftadd_tvm.errors import UnsupportedModelError
from shiftadd_tvm.rotate import (
    BlockHadamard,
    RotatedDown,
    hadamard,
    hadamard_op,
    orthogonal,
    rotate_down_inputs,
    rotate_model,
)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 24, 64, 240, 576, 1536])
def test_hadamard_orders(n):
    h = hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert set(np.unique(h)) <= {-1, 1}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("n", [3, 9, 18, 72])
def test_no_hadamard_gives_random_orthogonal(n):
    assert hadamard(n) is None
    q = orthogonal(n, seed=1)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-12)
    assert not np.allclose(q, orthogonal(n, seed=2))


@pytest.mark.parametrize("block", [2, 64, 12, 24, 20, 40, 1536])
def test_block_hadamard_matches_the_matrix(block):
    x = torch.randn(3, 5, 2 * block, dtype=torch.float64)
    h = torch.from_numpy(hadamard(block).astype(np.float64))
    want = x @ torch.block_diag(h, h)
    torch.testing.assert_close(BlockHadamard(block)(x), want, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(hadamard_op(x, block, True), x @ torch.block_diag(h.T, h.T))


@pytest.mark.parametrize("block", [6, 36, 240, 1])
def test_block_hadamard_refuses_orders_without_a_transform(block):
    with pytest.raises(ValueError, match="no online Hadamard of order"):
        BlockHadamard(block)


@pytest.mark.parametrize("block", [16, 24])
def test_block_hadamard_gradient_is_the_transpose(block):
    x = torch.randn(4, 2 * block, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 2 * block, dtype=torch.float64)
    (BlockHadamard(block)(x) * w).sum().backward()
    h = torch.from_numpy(hadamard(block).astype(np.float64))
    torch.testing.assert_close(x.grad, w @ torch.block_diag(h.T, h.T))


def test_block_hadamard_exports_as_one_op():
    ep = torch.export.export(BlockHadamard(24), (torch.randn(2, 48),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["shiftadd.hadamard.default"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [True, False])
def test_rotation_is_exact_in_float(tied):
    model = tiny_llama(seed=3)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():  # non-trivial norm weights, so folding them is exercised
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.uniform_(0.5, 2.0)
    ids = torch.randint(0, 256, (2, 12))
    want = _logits(model, ids)
    rot = rotate_model(copy.deepcopy(model), seed=5)
    rot = rotate_down_inputs(rot, block=8)
    got = _logits(rot, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5 * want.abs().max().item())
    # the weights did change (an identity "rotation" would pass the check above)
    w0 = model.model.layers[0].self_attn.q_proj.weight
    w1 = rot.model.layers[0].self_attn.q_proj.weight
    assert (w0 - w1).abs().max() > 1e-3
    names = set(target_linears(rot))
    assert len(names) == len(target_linears(model))  # the tied head's mix matrix stays dense
    assert all("mix" not in n for n in names)
    assert isinstance(rot.model.layers[0].mlp.down_proj, RotatedDown)


def test_rotation_refuses_twice_and_other_models():
    model = rotate_model(tiny_llama(seed=4))
    with pytest.raises(UnsupportedModelError, match="already rotated"):
        rotate_model(model)
    rotate_down_inputs(model, block=8)
    with pytest.raises(UnsupportedModelError, match="already rotated"):
        rotate_down_inputs(model, block=8)
    with pytest.raises(UnsupportedModelError, match="not a multiple of block"):
        rotate_down_inputs(tiny_llama(seed=4), block=128)  # intermediate size 200

    class NotLlama(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(UnsupportedModelError, match="rotation supports"):
        rotate_model(NotLlama())
