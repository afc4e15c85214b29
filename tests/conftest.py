"""Shared fixtures: a small randomly initialised LLaMA-style model compiled once per session."""

from __future__ import annotations

import numpy as np
import pytest
import torch

TINY_SEQ = 16


def tiny_llama(seed: int = 0, vocab: int = 256, intermediate: int = 200):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=72,  # not a multiple of the group size: ragged last group
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=18,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_artifact(tiny_model, tmp_path_factory):
    """(artifact, exported path) of the tiny model at 3 bits, group 32."""
    import shiftadd_tvm

    calib = np.random.default_rng(0).integers(0, 256, (4, TINY_SEQ))
    art = shiftadd_tvm.compile(
        tiny_model,
        target="llvm",
        bits=3,
        group_size=32,
        seq_len=TINY_SEQ,
        calib_ids=calib,
        progress=False,
    )
    path = art.export(tmp_path_factory.mktemp("art") / "tiny.so")
    return art, path
