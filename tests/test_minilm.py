"""all-MiniLM-L6-v2 through the encoder import, artifact and runtime (real weights, real text)."""

import numpy as np
import pytest

from shiftadd_tvm import minilm
from shiftadd_tvm.errors import ArtifactError, InputError

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def real():
    try:
        minilm.model_dir()
    except Exception as e:  # noqa: BLE001 - the asset is an install step (requirements-assets.txt)
        pytest.skip(f"MiniLM asset not installed: {e}")
    model, tok = minilm.load()
    sents = minilm.sentences("lee", 3)
    ids, mask = minilm.tokenize(tok, sents, 32)
    return model, tok, ids, mask


def test_quality_metrics():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((20, 8))
    q = minilm.quality(ref.copy(), ref)
    assert q["cos_mean"] == pytest.approx(1.0) and q["top1_agree"] == 1.0
    assert q["top5_overlap"] == 1.0
    noisy = minilm.quality(ref + rng.standard_normal((20, 8)), ref)
    assert noisy["cos_mean"] < 0.9 and noisy["top1_agree"] < 1.0


def test_float_artifact_matches_torch_and_lut_rewrite_covers_all_linears(real, tmp_path):
    import torch

    from shiftadd_tvm import encoder
    from shiftadd_tvm.targets import resolve_target

    model, _, ids, mask = real
    names = minilm.linear_names(model)
    assert len(names) == 36
    imp = encoder.import_encoder(model, 2, 32)
    base = encoder.SentenceEncoder.wrap(minilm.load()[0], custom_attention=False)
    with torch.no_grad():
        ref = base(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    tgt = resolve_target({"kind": "llvm", "num-cores": 2})
    v = minilm.Variant("float", {n: ("dense", None) for n in names})
    path, man = minilm.build_variant(imp, v, tgt, tmp_path)
    assert "36 left dense" in man["rewrite"]["lut"] and man["rewrite"]["attention_decomposed"] == 6
    rt = encoder.load(path)
    got = rt(ids, mask)  # 3 sentences through a batch-2 artifact: the last batch is padded
    assert got.shape == (3, 384)
    assert np.abs(got - ref).max() < 1e-5
    with pytest.raises(InputError, match="longer than the compiled"):
        rt(np.zeros((1, 40), np.int64), np.ones((1, 40), np.int64))
    with pytest.raises(ArtifactError, match="not a shiftadd-tvm"):
        from shiftadd_tvm import runtime

        runtime.load(path)
