"""A bit budget: per-layer widths chosen by measured output error, compiled into one artifact."""

import numpy as np
import pytest
import torch
from conftest import TINY_SEQ

import shiftadd_tvm
from shiftadd_tvm.compiler import logits_tolerance
from shiftadd_tvm.errors import ConfigError


@pytest.fixture(scope="module")
def mixed(tiny_model, tmp_path_factory):
    calib = np.random.default_rng(0).integers(0, 256, (4, TINY_SEQ))
    art = shiftadd_tvm.compile(
        tiny_model,
        target="llvm",
        bits=2.5,
        group_size=32,
        seq_len=TINY_SEQ,
        calib_ids=calib,
        progress=False,
    )
    return art, art.export(tmp_path_factory.mktemp("mixed") / "tiny-b2.5.so")


def test_budget_allocation_in_manifest(mixed):
    art, _ = mixed
    man = art.manifest
    alloc = man["allocation"]
    layers = man["layers"]
    sizes = {n: v["n"] * v["k"] for n, v in layers.items()}
    avg = sum(sizes[n] * v["bits"] for n, v in layers.items()) / sum(sizes.values())
    assert avg <= 2.5 + 1e-9 and avg == pytest.approx(alloc["average_bits"])
    assert len({v["bits"] for v in layers.values()}) >= 2  # really mixed
    assert {n: v["bits"] for n, v in layers.items()} == {
        n: v["bits"] for n, v in alloc["layers"].items()
    }
    assert man["quant"]["bits"] == 2.5
    assert alloc["error_weighting"] == "loss gradient (Fisher)"
    # effective bits incl. scale codes: one byte per power-of-two term per group of 32, with each
    # width's own terms per plane (terms="auto": 3,3 at 2 bits, 3,2,2 at 3, 4,3,2,2 at 4)
    from shiftadd_tvm.quant import QuantConfig

    per_width = {b: QuantConfig(bits=b, group_size=32, auto_terms=True) for b in (2, 3, 4)}
    want = sum(sizes[n] * per_width[v["bits"]].bits_per_weight() for n, v in layers.items()) / sum(
        sizes.values()
    )
    assert man["bits_per_weight"] == pytest.approx(want, abs=1e-4)
    assert per_width[3].bits_per_weight() == 3 + 7 * 8 / 32
    for v in alloc["layers"].values():  # the measured error falls with width
        e = v["output_error"]
        assert e["2"] >= e["3"] >= e["4"]
    # one kernel per distinct (shape, bits, group) configuration
    cfgs = {
        (c["config"]["n"], c["config"]["k"], c["config"]["bits"])
        for c in man["rewrite"]["kernels"].values()
        if "bits" in c["config"]  # LUT kernels (the dense head has its own)
    }
    assert {(v["n"], v["k"], v["bits"]) for v in layers.values()} == cfgs


def test_mixed_artifact_matches_dequantized_torch(tiny_model, mixed):
    art, path = mixed
    rt = shiftadd_tvm.runtime.load(path)
    ids = np.random.default_rng(1).integers(0, 256, (1, TINY_SEQ))
    got = rt(ids)
    with torch.no_grad():
        ref = art.apply_to(tiny_model)(input_ids=torch.from_numpy(ids)).logits.numpy()
    tol = logits_tolerance(art.manifest, exact=1e-5)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < tol


def test_budget_below_narrowest_width_refused(tiny_model):
    with pytest.raises(ConfigError, match="below the smallest"):
        shiftadd_tvm.compile(
            tiny_model,
            bits=1.5,
            group_size=32,
            seq_len=TINY_SEQ,
            calib_ids=np.zeros((1, TINY_SEQ), dtype=np.int64),
            progress=False,
        )
