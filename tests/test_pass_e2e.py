"""Pass + compile + export + runtime on a small randomly initialised LLaMA-style model."""

import numpy as np
import torch
from conftest import TINY_SEQ

import shiftadd_tvm
from shiftadd_tvm.compiler import logits_tolerance


def test_compiled_matches_dequantized_torch(tiny_model, tiny_artifact):
    art, path = tiny_artifact
    rt = shiftadd_tvm.runtime.load(path)
    ids = np.random.default_rng(1).integers(0, 256, (2, 11))
    got = rt(ids)
    assert got.shape == (2, 11, 256) and got.dtype == np.float32
    with torch.no_grad():
        ref = art.apply_to(tiny_model)(input_ids=torch.from_numpy(ids)).logits.numpy()
        flt = tiny_model(input_ids=torch.from_numpy(ids)).logits.numpy()
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < logits_tolerance(art.manifest, exact=1e-5), err
    # the quantization itself changes the model (so the comparison above is not vacuous)
    assert np.linalg.norm(got - flt) / np.linalg.norm(flt) > 1e-2


def test_padding_is_exact(tiny_artifact):
    """Shorter inputs are right-padded; causal attention makes the prefix logits identical."""
    _, path = tiny_artifact
    rt = shiftadd_tvm.runtime.load(path)
    ids = np.random.default_rng(2).integers(0, 256, (1, TINY_SEQ))
    full = rt(ids)
    part = rt(ids[:, :5])
    np.testing.assert_allclose(part, full[:, :5], rtol=1e-5, atol=1e-5)


def test_record_lists_rewritten_and_dense(tiny_artifact):
    art, _ = tiny_artifact
    rw = art.manifest["rewrite"]
    assert rw["rewritten"] == 14  # 2 layers x (q, k, v, o, gate, up, down)
    dense = sorted(d["weight"] for d in rw["dense"])
    # the tied head (named after either tied parameter) and the rotation's mix matrix
    assert dense in (
        ["lm_head.weight", "model.norm.mix.weight"],
        ["model.embed_tokens.weight", "model.norm.mix.weight"],
    )
    reasons = {d["weight"]: d["reason"] for d in rw["dense"]}
    assert "rotation's mix matrix" in reasons["model.norm.mix.weight"]
    assert art.manifest["rotation"] == {"seed": 0, "down_block": 0}  # intermediate 200: 8 < 16
    assert set(art.manifest["layers"]) == set(art.quantized)
    assert all(name.endswith("_proj") for name in art.quantized)
    # every rewritten kernel handles the ragged K (72 = 2 x 32 + 8, 200 = 6 x 32 + 8)
    ks = {v["config"]["k"] for v in rw["kernels"].values()}
    assert ks == {72, 200}


def test_artifact_smaller_than_float(tiny_artifact):
    art, path = tiny_artifact
    assert art.manifest["quantized_bytes"] < art.manifest["quantized_weights"] * 4 / 4
