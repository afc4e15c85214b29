"""CPU tuning: search through a real TVM RPC server on localhost, resume, records reused by compile."""

import json
import logging

import numpy as np
import pytest
from conftest import TINY_SEQ, tiny_llama
from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig, LutGemmKnobs, default_knobs

import shiftadd_tvm
from shiftadd_tvm import tuning

TARGET = {"kind": "llvm", "num-cores": 2}


@pytest.fixture()
def logs(tmp_path, monkeypatch):
    monkeypatch.setenv("SHIFTADD_TVM_TUNING_LOGS", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def rpc_server():
    from tvm import rpc

    server = rpc.Server(host="127.0.0.1", port=9190, port_end=9290)
    yield f"127.0.0.1:{server.port}"
    server.terminate()


def test_candidates_start_with_default_and_are_valid():
    cfg = LutGemmConfig(4, 64, 128, 3, 32, 3)
    cands = tuning.candidates(cfg, threads=2, trials=6)
    assert cands[0] == default_knobs(cfg, 2) and len(cands) == 6 == len(set(cands))
    for kn in cands:
        kn.validate(cfg)


def test_tune_through_rpc_resumes_and_never_loses_to_default(logs, rpc_server):
    cfgs = [LutGemmConfig(4, 64, 128, 3, 32, 3), LutGemmConfig(4, 48, 64, 2, 32, 3)]
    runner = tuning.Runner(rpc=rpc_server)
    # "interrupted" after the first kernel: its record is on disk
    first = tuning.tune(cfgs, TARGET, trials=3, runner=runner, max_tasks=1, progress=False)
    assert [k["name"] for k in first["kernels"]] == [cfgs[0].name]
    assert first["runner"] == f"rpc {rpc_server}"
    path = logs / "llvm_generic_2c.json"
    data = json.loads(path.read_text())
    assert len(data["records"]) == 1 and data["measured_with"] == f"rpc {rpc_server}"
    # the rerun skips what is done and tunes the rest
    second = tuning.tune(cfgs, TARGET, trials=3, runner=runner, progress=False)
    assert [k["name"] for k in second["kernels"]] == [cfgs[1].name]
    records = json.loads(path.read_text())["records"]
    assert len(records) == 2
    for r in records:
        assert 0 < r["us"] <= r["default_us"]  # the default is a candidate: tuned is never slower
        assert r["default_us"] < float("inf")  # both rounds and both calls measured on the server
        LutGemmKnobs(**r["knobs"]).validate(LutGemmConfig(**r["config"]))


def test_compile_reuses_records_and_explains_incompatible_ones(logs, caplog):
    calib = np.random.default_rng(0).integers(0, 256, (2, TINY_SEQ))
    kw = dict(target=json.dumps(TARGET), bits=3, group_size=32, seq_len=TINY_SEQ, calib_ids=calib)
    kw["decode"] = False  # main's four kernels only (the KV-cache steps would add M=1 ones)
    model = tiny_llama()
    base = shiftadd_tvm.compile(model, method="bcq", progress=False, **kw)
    lut = {n: k for n, k in base.manifest["rewrite"]["kernels"].items() if k.get("kind") != "dense"}
    names = list(lut)
    assert len(names) == 4 and all("default rule" in k["schedule"] for k in lut.values())
    first, second = (base.manifest["rewrite"]["kernels"][n]["config"] for n in names[:2])
    db = tuning.Database(logs / "llvm_generic_2c.json")
    chosen = LutGemmKnobs(m_inner=2, n_unroll=2, n_chunks=3)
    meta = {"target": TARGET}
    db.put(
        LutGemmConfig(**first),
        {"config": first, "knobs": vars(chosen), "us": 1.0, "default_us": 2.0},
        meta,
    )
    bad = {"m_inner": 5, "n_unroll": 2, "n_chunks": 1}  # 5 does not divide M=16
    db.put(
        LutGemmConfig(**second),
        {"config": second, "knobs": bad, "us": 1.0, "default_us": 2.0},
        meta,
    )
    with caplog.at_level(logging.INFO, logger="shiftadd_tvm"):
        art = shiftadd_tvm.compile(model, method="bcq", progress=False, **kw)
    kernels = art.manifest["rewrite"]["kernels"]
    assert kernels[names[0]]["knobs"] == vars(chosen)
    assert kernels[names[0]]["schedule"].startswith("tuned")
    assert "incompatible" in kernels[names[1]]["schedule"]
    assert "m_inner=5 does not divide m=16" in kernels[names[1]]["schedule"]
    assert "2 tuning records from llvm_generic_2c.json" in caplog.text
    # the tuned artifact computes the same function
    ids = np.random.default_rng(3).integers(0, 256, (1, TINY_SEQ))
    a = shiftadd_tvm.runtime.load(base.export(logs / "a.so"))(ids)
    b = shiftadd_tvm.runtime.load(art.export(logs / "b.so"))(ids)
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-5
