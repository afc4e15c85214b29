"""CPU tuning: search through a real TVM RPC server on localhost, resume, records reused by compile;
the int8 kernels' knobs (their own records beside the float-table kernel's)."""

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SEQ, tiny_llama
from shiftadd_tvm.schedules import lut_gemm_int8 as L
from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig, LutGemmKnobs, default_knobs
from shiftadd_tvm.schedules.packing import encode_terms, pack_planes

import shiftadd_tvm
from shiftadd_tvm import cpu_features, tuning
from shiftadd_tvm.bench_kernel import random_packed
from shiftadd_tvm.errors import ConfigError

TARGET = {"kind": "llvm", "num-cores": 2}
ZEN4 = {"kind": "llvm", "mcpu": "znver4", "num-cores": 2}  # LLVM enables AVX-512 VBMI/VNNI
needs_avx512 = pytest.mark.skipif(
    bool(cpu_features.host_missing("avx512")), reason="this CPU cannot run avx512 code"
)


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


# ----------------------------------------------------------------------------- int8 kernels
def test_int8_candidates_start_with_default_and_are_valid():
    for cfg, size in (
        (LutGemmConfig(1, 96, 256, 3, 128, 3), 6),
        (LutGemmConfig(8, 64, 128, 2, 32, 3), 7),
    ):
        cands = tuning.int8_candidates(cfg, "avx512", threads=2, trials=7)
        assert cands[0] == L.default_int8_knobs(cfg, "avx512", 2)
        assert len(cands) == size == len(set(cands))  # M=1, 3 tiles: the whole grid is 6
        n_tiles = -(-cfg.n // L.ROWS)
        for kn in cands:
            kn.validate(cfg)
            assert kn.m_inner in (1, 2, 4, 8, 16) and 1 <= kn.n_chunks <= n_tiles


def test_kernel_family_follows_the_target_isa():
    cfg = LutGemmConfig(1, 64, 128, 3, 32, 3)
    assert tuning.kernel_family(cfg, cpu_features.kernel_isa(ZEN4)) == "int8-avx512"
    assert tuning.kernel_family(cfg, cpu_features.kernel_isa(TARGET)) == "float"  # generic
    assert tuning.kernel_family(cfg, "avx512", "float") == "float"
    with pytest.raises(ConfigError, match="no int8 kernel to tune"):
        tuning.kernel_family(cfg, "generic", "int8")
    odd = LutGemmConfig(1, 64, 128, 3, 40, 3)  # group 40: the AVX-512 kernel cannot run it
    assert tuning.kernel_family(odd, "avx512") == "float"  # as compile() falls back
    with pytest.raises(ConfigError, match="not a multiple of 16"):
        tuning.kernel_family(odd, "avx512", "int8")


def _float_record(cfg):
    kn = LutGemmKnobs(m_inner=1, n_unroll=2, n_chunks=2)
    return {"config": vars(cfg), "knobs": vars(kn), "us": 5.0, "default_us": 6.0, "trials": 3}


def test_database_float_and_int8_records_coexist_and_old_logs_load(logs):
    cfg = LutGemmConfig(8, 64, 256, 2, 128, 3)
    path = logs / "llvm_znver4_2c.json"
    # a log written before records had a "kernel" field: its records are float-table records
    path.write_text(json.dumps({"target": ZEN4, "records": [_float_record(cfg)]}))
    db = tuning.Database(path)
    assert db.get(cfg)["kernel"] == "float" and db.get(cfg, "int8-avx512") is None
    assert tuning.lookup_knobs(cfg, db, 2)[1].startswith("tuned")
    kn, how = tuning.lookup_int8_knobs(cfg, db, 2, "avx512")
    assert kn == L.default_int8_knobs(cfg, "avx512", 2)
    assert how == "default rule (no int8-avx512 record for this kernel)"
    chosen = L.Int8Knobs(m_inner=2, n_chunks=2, build_parallel=False)
    rec = {"kernel": "int8-avx512", "config": vars(cfg), "knobs": vars(chosen), "us": 3.0}
    db.put(cfg, {**rec, "default_us": 4.0, "trials": 3}, {"target": ZEN4})
    db = tuning.Database(path)  # round trip through the file
    records = json.loads(path.read_text())["records"]
    assert [r["kernel"] for r in records] == ["float", "int8-avx512"]
    assert tuning.lookup_knobs(cfg, db, 2)[0] == LutGemmKnobs(m_inner=1, n_unroll=2, n_chunks=2)
    kn, how = tuning.lookup_int8_knobs(cfg, db, 2, "avx512")
    assert kn == chosen and how == "tuned (llvm_znver4_2c.json: 3 us vs default 4 us)"
    # another ISA's int8 record does not stand in for this one
    assert "no int8-avx2 record" in tuning.lookup_int8_knobs(cfg, db, 2, "avx2")[1]
    # incompatible records fall back to the default rule, with the reason
    bad = {**rec, "knobs": {"m_inner": 3, "n_chunks": 1, "build_parallel": False}}
    db.put(cfg, {**bad, "default_us": 4.0}, {"target": ZEN4})
    kn, how = tuning.lookup_int8_knobs(cfg, db, 2, "avx512")
    assert kn == L.default_int8_knobs(cfg, "avx512", 2)
    assert "incompatible" in how and "m_inner=3 does not divide m=8" in how
    db.put(cfg, {**rec, "knobs": {"m_inner": 2, "n_unroll": 2, "n_chunks": 1}}, {})
    assert "incompatible" in tuning.lookup_int8_knobs(cfg, db, 2, "avx512")[1]
    assert tuning.lookup_knobs(cfg, db, 2)[1].startswith("tuned")  # the float record is intact


def test_records_hold_only_on_the_thread_count_they_were_measured_on(logs):
    """A record's thread knobs were timed on the log's ``measured_threads`` (else its target's
    cores): on another thread count the kernel takes that count's default rule, and says why."""
    cfg = LutGemmConfig(8, 64, 256, 3, 128, 3)
    chosen = L.Int8Knobs(m_inner=2, n_chunks=2, build_parallel=False)
    rec = {"kernel": "int8-avx512", "config": vars(cfg), "knobs": vars(chosen), "us": 3.0}
    path = logs / "llvm_znver5_2c.json"
    tuning.Database(path).put(cfg, {**rec, "default_us": 4.0}, {"target": ZEN4})
    db = tuning.Database(path)
    assert db.threads == ZEN4["num-cores"] == 2  # no measured_threads: the target's cores
    assert tuning.lookup_int8_knobs(cfg, db, 2, "avx512")[0] == chosen
    kn, how = tuning.lookup_int8_knobs(cfg, db, 1, "avx512")
    assert kn == L.default_int8_knobs(cfg, "avx512", 1) != chosen
    assert how == (
        "default rule (the record in llvm_znver5_2c.json was measured on 2 thread(s), this "
        "kernel runs on 1)"
    )
    # a log tuned on one thread for a two-core target (the withdrawn Zen 5 log of session 19)
    db.put(cfg, {**rec, "default_us": 4.0}, {"target": ZEN4, "measured_threads": 1})
    db = tuning.Database(path)
    assert tuning.lookup_int8_knobs(cfg, db, 1, "avx512")[0] == chosen
    kn, how = tuning.lookup_int8_knobs(cfg, db, 2, "avx512")
    assert kn == L.default_int8_knobs(cfg, "avx512", 2) and "measured on 1 thread(s)" in how
    # a record's own count wins over the log's (a log holds the records of several tune runs)
    db.put(cfg, {**rec, "default_us": 4.0, "threads": 2}, {"target": ZEN4, "measured_threads": 1})
    db = tuning.Database(path)
    assert tuning.lookup_int8_knobs(cfg, db, 2, "avx512")[0] == chosen
    assert "measured on 2 thread(s)" in tuning.lookup_int8_knobs(cfg, db, 1, "avx512")[1]


@pytest.mark.parametrize("name", ["llvm_znver4_2c", "llvm_znver5_2c", "llvm_cascadelake_2c"])
def test_shipped_log_loads(name):
    """Every record of a shipped CPU log is what compile() takes for its kernel on the log's
    target (two cores; Zen 5's log says it was measured on two threads)."""
    path = Path(tuning.__file__).resolve().parents[1] / "tuning_logs" / f"{name}.json"
    db = tuning.Database(path)
    assert db.records and db.threads == 2
    for (kernel, _), rec in db.records.items():
        cfg = LutGemmConfig(**rec["config"])
        if kernel == "float":
            kn, how = tuning.lookup_knobs(cfg, db, 2)
        else:
            kn, how = tuning.lookup_int8_knobs(cfg, db, 2, kernel.removeprefix("int8-"))
        assert how.startswith("tuned"), how
        assert dataclasses.asdict(kn) == rec["knobs"]


def _run_int8(cfg, knobs, seed=0, isa="avx512", target=ZEN4):
    """(kernel output, reference_int8) of ``cfg``'s ``isa`` kernel with ``knobs``."""
    import tvm

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg.m, cfg.k)).astype(np.float32)
    planes = pack_planes(rng.random((cfg.bits, cfg.n, cfg.k)) < 0.5, cfg.group_size)
    shape = (cfg.bits, cfg.n, cfg.groups, cfg.terms)
    signs = rng.choice([-1, 0, 1], shape)
    signs[..., 0] = 1  # every plane has its first term
    signs = np.where(
        np.arange(cfg.terms) < np.asarray(cfg.term_counts)[:, None, None, None], signs, 0
    )
    scales = encode_terms(signs, rng.integers(-12, 3, shape))
    if cfg.shared_exp:  # each (row, group)'s terms within 8 exponents, as a windowed fit's
        planes, scales = random_packed(
            cfg.n, cfg.k, cfg.bits, cfg.group_size, cfg.terms, seed, cfg.term_counts, True
        )
    func = L.make_int8_primfunc(cfg, knobs, isa)
    ex = tvm.compile(tvm.IRModule({"k": func}), target=tvm.target.Target(target))
    args = [x, *L.pack_int8(planes, scales, cfg, isa), np.zeros((cfg.m, cfg.n), np.float32)]
    args = [tvm.runtime.tensor(a) for a in args]
    ex.jit()[f"{cfg.name}_{isa}"](*args)
    return args[-1].numpy(), L.reference_int8(x, planes, scales, cfg)


@pytest.mark.parametrize("log", sorted(p.name for p in tuning.tuning_log_dir().glob("llvm_*.json")))
def test_shipped_int8_records_compute_the_reference(log, monkeypatch):
    """Every int8 record of a shipped CPU log, built with its knobs for its own configuration,
    computes what the numpy model says (the tuner only times candidates). Runs the records whose
    ISA this machine has; the others are compile-only elsewhere."""
    monkeypatch.delenv("SHIFTADD_TVM_TUNING_LOGS", raising=False)
    path = tuning.tuning_log_dir() / log
    data = json.loads(path.read_text())
    records = [r for r in data["records"] if r.get("kernel", "float").startswith("int8-")]
    runnable = [r for r in records if not cpu_features.host_missing(r["kernel"][len("int8-") :])]
    if not runnable:
        pytest.skip(f"{log}: no int8 records of an ISA this CPU runs")
    for rec in runnable:
        isa = rec["kernel"][len("int8-") :]
        cfg = LutGemmConfig(**rec["config"])
        y, ref = _run_int8(cfg, L.Int8Knobs(**rec["knobs"]), isa=isa, target=data["target"])
        np.testing.assert_allclose(
            y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=f"{cfg.name} {rec['knobs']}"
        )


@needs_avx512
def test_tune_int8_beside_float_and_tuned_kernels_match_reference(logs):
    cfgs = [LutGemmConfig(1, 96, 128, 3, 128, 3), LutGemmConfig(8, 64, 256, 2, 128, 3)]
    first = tuning.tune(cfgs[1:], ZEN4, trials=2, kernel="float", progress=False)
    assert [k["kernel"] for k in first["kernels"]] == ["float"]
    # auto on an AVX-512 target: the int8 kernels; the float record of cfgs[1] does not skip it
    summary = tuning.tune(cfgs, ZEN4, trials=3, progress=False)
    assert summary["isa"] == "avx512"
    assert [(k["name"], k["kernel"]) for k in summary["kernels"]] == [
        (c.name, "int8-avx512") for c in cfgs
    ]
    path = logs / "llvm_znver4_2c.json"
    records = json.loads(path.read_text())["records"]
    assert sorted(r["kernel"] for r in records) == ["float", "int8-avx512", "int8-avx512"]
    # the log says how many threads the candidates ran on: the pool tune() sized (2 cores), or
    # fewer when this process's pool existed already (then it warned)
    import tvm_ffi

    threads = int(tvm_ffi.get_global_func("runtime.NumThreads")())
    assert json.loads(path.read_text())["measured_threads"] == threads
    db = tuning.Database(path)
    assert db.get(cfgs[1])["kernel"] == "float"
    for cfg in cfgs:
        rec = db.get(cfg, "int8-avx512")
        assert 0 < rec["us"] <= rec["default_us"] < float("inf") and rec["trials"] == 3
        assert rec["threads"] == threads  # each record says it too
        kn, how = tuning.lookup_int8_knobs(cfg, db, threads, "avx512")
        assert kn == L.Int8Knobs(**rec["knobs"]) and how.startswith("tuned")
    # the rerun skips both families' records
    assert tuning.tune(cfgs, ZEN4, trials=3, progress=False)["kernels"] == []
    # kernels built with tuned knobs compute what the numpy model says (one not the default)
    chosen = L.Int8Knobs(m_inner=2, n_chunks=2, build_parallel=False)
    assert chosen != L.default_int8_knobs(cfgs[1], "avx512", 2)
    rec = {"kernel": "int8-avx512", "config": vars(cfgs[1]), "knobs": vars(chosen)}
    db.put(cfgs[1], {**rec, "us": 1.0, "default_us": 2.0}, {"target": ZEN4})
    for cfg in cfgs:
        kn, _ = tuning.lookup_int8_knobs(cfg, tuning.Database(path), 2, "avx512")
        y, ref = _run_int8(cfg, kn)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@needs_avx512
def test_compile_uses_int8_records(logs, caplog):
    model = tiny_llama()
    cfgs = tuning.model_configs(model, [3], 32, 3, TINY_SEQ)  # what compile() builds (M=16)
    db = tuning.Database(logs / "llvm_znver4_2c.json")
    chosen = L.Int8Knobs(m_inner=2, n_chunks=4, build_parallel=False)
    for cfg in cfgs[1:]:  # the first one keeps the default rule
        rec = {"kernel": "int8-avx512", "config": vars(cfg), "knobs": vars(chosen)}
        db.put(cfg, {**rec, "us": 1.0, "default_us": 2.0}, {"target": ZEN4})
    calib = np.random.default_rng(0).integers(0, 256, (2, TINY_SEQ))
    with caplog.at_level(logging.INFO, logger="shiftadd_tvm"):
        art = shiftadd_tvm.compile(
            model, method="bcq", progress=False, target=json.dumps(ZEN4), bits=3, group_size=32,
            seq_len=TINY_SEQ, calib_ids=calib, decode=False, terms=3,
        )  # fmt: skip
    kernels = art.manifest["rewrite"]["kernels"]
    for cfg in cfgs:
        k = kernels[cfg.name]
        assert k["kind"] == "lut-int8" and k["isa"] == "avx512"
        if cfg == cfgs[0]:
            assert k["schedule"] == "default rule (no int8-avx512 record for this kernel)"
        else:
            assert k["knobs"] == vars(chosen)
            assert k["schedule"] == "tuned (llvm_znver4_2c.json: 1 us vs default 2 us)"
    assert f"{len(cfgs) - 1} tuning records from llvm_znver4_2c.json" in caplog.text
    assert f"{cfgs[1].name}: avx512 {chosen} (tuned" in caplog.text
    ids = np.random.default_rng(3).integers(0, 256, (1, TINY_SEQ))
    logits = shiftadd_tvm.runtime.load(art.export(logs / "a.so"))(ids)
    assert np.isfinite(logits).all()


def test_cli_tune_kernel_flag():
    from shiftadd_tvm.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["tune"]).kernel == "auto"
    assert parser.parse_args(["tune", "--kernel", "int8", "--seq-len", "1"]).kernel == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["tune", "--kernel", "int4"])


def test_local_tuning_refuses_a_target_this_cpu_cannot_run(logs, monkeypatch):
    """Float-table kernels built for an AVX-512 target use AVX-512 too: refused before any build,
    for every kernel family, rather than crashing the timing process."""
    no_vbmi = frozenset(cpu_features.host_flags() - {"avx512vbmi", "avx512_vnni", "avx512vnni"})
    monkeypatch.setattr(cpu_features, "host_flags", lambda: no_vbmi)
    cfg = LutGemmConfig(1, 64, 256, 2, 128, 3)
    for kernel in ("float", "int8", "auto"):
        with pytest.raises(ConfigError, match="avx512vbmi"):
            tuning.tune([cfg], ZEN4, trials=1, kernel=kernel, progress=False)
    assert not (logs / "llvm_znver4_2c.json").exists()  # nothing written


def test_plan_config_uses_the_uniform_record(tmp_path):
    """A per-plane term plan changes only the epilogue: its kernel takes the record of the same
    shapes with every slot, and says so."""
    import dataclasses

    db = tuning.Database(tmp_path / "log.json")
    cfg = LutGemmConfig(4, 64, 128, 3, 32, 3)
    chosen = L.Int8Knobs(m_inner=2, n_chunks=2, build_parallel=False)
    rec = {"kernel": "int8-avx512", "knobs": vars(chosen), "us": 1.0, "default_us": 2.0}
    db.put(cfg, rec, {"target": TARGET})
    plan = dataclasses.replace(cfg, plane_terms=(3, 2, 2))
    kn, how = tuning.lookup_int8_knobs(plan, tuning.Database(tmp_path / "log.json"), 2, "avx512")
    assert kn == chosen and "measured with every term slot" in how
    shared = dataclasses.replace(plan, shared_exp=True)
    kn, how = tuning.lookup_int8_knobs(shared, tuning.Database(tmp_path / "log.json"), 2, "avx512")
    assert kn == chosen and "measured with every term slot per term" in how
    # avx512bw's shared-exponent kernel is another loop: the per-term record does not carry over
    rec["kernel"] = "int8-avx512bw"
    db.put(cfg, rec, {"target": TARGET})
    db = tuning.Database(tmp_path / "log.json")
    kn, how = tuning.lookup_int8_knobs(plan, db, 2, "avx512bw")
    assert kn == chosen
    kn, how = tuning.lookup_int8_knobs(shared, db, 2, "avx512bw")
    assert kn == L.default_int8_knobs(shared, "avx512bw", 2) and how.startswith("default rule")


def test_record_of_other_term_counts_is_used(tmp_path):
    """A kernel built with other term counts than the tuned one (tuned with --terms auto, built
    with 3 on every plane) takes the record of the same shapes and scale form, and says so; a
    record of other shapes or of the other scale form (avx512bw) does not stand in."""
    path = tmp_path / "log.json"
    db = tuning.Database(path)
    tuned = LutGemmConfig(1, 576, 576, 3, 128, 3, (3, 2, 2), True)
    chosen = L.Int8Knobs(m_inner=1, n_chunks=1, build_parallel=True)
    assert chosen != L.default_int8_knobs(tuned, "avx512", 2)
    for fam in ("int8-avx512", "int8-avx512bw"):
        db.put(tuned, {"kernel": fam, "knobs": vars(chosen), "us": 1.0, "default_us": 2.0}, {})
    # records of other widths, whose term plans do not fit this config, are passed over
    for other in (
        LutGemmConfig(1, 576, 576, 4, 128, 4, (4, 3, 2, 2), True),
        LutGemmConfig(1, 576, 576, 2, 128, 3, (), True),
    ):
        rec = {"kernel": "int8-avx512", "knobs": vars(chosen), "us": 1.0, "default_us": 2.0}
        db.put(other, rec, {})
    uniform = dataclasses.replace(tuned, plane_terms=())  # t3x
    kn, how = tuning.lookup_int8_knobs(uniform, tuning.Database(path), 2, "avx512")
    assert kn == chosen and "other term counts" in how
    kn, how = tuning.lookup_int8_knobs(uniform, tuning.Database(path), 2, "avx512bw")
    assert kn == chosen and "other term counts" in how
    for other in (dataclasses.replace(uniform, n=192), dataclasses.replace(uniform, m=8)):
        kn, how = tuning.lookup_int8_knobs(other, tuning.Database(path), 2, "avx512")
        assert how.startswith("default rule"), how
    per_term = dataclasses.replace(uniform, shared_exp=False)
    kn, how = tuning.lookup_int8_knobs(per_term, tuning.Database(path), 2, "avx512bw")
    assert how.startswith("default rule"), how


def test_tune_times_per_plane_terms_on_this_cpus_int8_kernel(logs):
    """A per-plane term plan (compile's default, auto: 3,2,2 at 3 bits) is tuned on the int8
    kernel this CPU runs: the timing weights leave each plane's slots past its count empty (the
    kernel refuses weights with terms there, so every candidate used to fail and no record was
    written)."""
    from shiftadd_tvm.targets import host_cpu

    host = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": 2}
    isa = cpu_features.kernel_isa(host)
    if isa not in ("avx512", "avx2") or cpu_features.host_missing(isa):
        pytest.skip(f"this CPU's kernel is {isa}: no int8 kernel to tune here")
    cfg = LutGemmConfig(4, 64, 256, 3, 128, 3, (3, 2, 2))
    summary = tuning.tune([cfg], host, trials=2, progress=False)
    assert [(k["name"], k["kernel"]) for k in summary["kernels"]] == [(cfg.name, f"int8-{isa}")]
    rec = tuning.Database(tuning.log_path(host)).get(cfg, f"int8-{isa}")
    assert rec is not None and 0 < rec["us"] <= rec["default_us"] < float("inf")


def test_a_regular_install_carries_the_shipped_logs(tmp_path):
    """A non-editable install (no repository beside the package) finds the shipped logs as package
    data, so compile() on those CPUs gets the tuned schedules there too. Installed from a copy of
    the packaged folders: setuptools reuses a checkout's ``build/lib``, so a stale one (say, with
    a log since removed) would be installed instead of the tree under test."""
    import shutil
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("shiftadd_tvm", "passes", "schedules", "tuning_logs"):
        shutil.copytree(repo / folder, src / folder, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, src / name)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["-t", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    code = "from shiftadd_tvm import tuning; print(tuning.tuning_log_dir())"
    env = {k: v for k, v in os.environ.items() if k != "SHIFTADD_TVM_TUNING_LOGS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(target)},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    found = Path(out)
    assert found == target / "shiftadd_tvm" / "tuning_logs"
    shipped = sorted(p.name for p in (repo / "tuning_logs").glob("*.json"))
    assert shipped and sorted(p.name for p in found.glob("*.json")) == shipped


def test_tune_times_the_shared_exponent_kernel_with_its_own_records(logs):
    """A windowed fit's configs (``tune --scale-window 8``) are tuned on the shared-exponent
    kernel with shared-exponent timing weights; compile's lookup then finds that record (and not
    the per-term one)."""
    from shiftadd_tvm.targets import host_cpu

    host = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": 2}
    isa = cpu_features.kernel_isa(host)
    if not cpu_features.shared_exp_target(host, isa) or cpu_features.host_missing(isa):
        pytest.skip(f"this CPU's kernel ({isa}) has no shared-exponent variant to run here")
    cfg = LutGemmConfig(8, 64, 256, 3, 128, 3, (3, 2, 2), shared_exp=True)
    summary = tuning.tune([cfg], host, trials=3, progress=False)
    assert [(k["name"], k["kernel"]) for k in summary["kernels"]] == [(cfg.name, f"int8-{isa}")]
    db = tuning.Database(tuning.log_path(host))
    rec = db.get(cfg, f"int8-{isa}")
    assert rec is not None and 0 < rec["us"] <= rec["default_us"] < float("inf")
    per_term = LutGemmConfig(8, 64, 256, 3, 128, 3, (3, 2, 2))
    assert db.get(per_term, f"int8-{isa}") is None
    # on the thread count it was measured on (fewer than 2 where this process's pool existed)
    kn, how = tuning.lookup_int8_knobs(cfg, db, rec["threads"], isa)
    assert how.startswith("tuned") and kn == L.Int8Knobs(**rec["knobs"])


def test_model_configs_of_a_windowed_fit():
    model = tiny_llama()
    plain = tuning.model_configs(model, [2, 3], 64, "auto", 16)
    shared = tuning.model_configs(model, [2, 3], 64, "auto", 16, shared_exp=True)
    assert plain and not any(c.shared_exp for c in plain)
    assert [dataclasses.replace(c, shared_exp=False) for c in shared] == plain
    assert all(c.shared_exp for c in shared)


@pytest.mark.skipif(
    bool(cpu_features.host_missing("avx512bw")), reason="tunes locally for an avx512bw target"
)
def test_tune_skips_configs_compile_runs_on_the_int16_gemm(logs):
    """On an AVX-512 BW target with VNNI, the many-row configurations go to the int16 GEMM in
    compile(): tune() skips them (logged, listed in the summary) instead of tuning a table kernel
    that is never used; few-row ones are still tuned."""
    clx = {"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2}
    large = LutGemmConfig(32, 64, 128, 3, 64, 2)
    summary = tuning.tune([large], clx, trials=1, progress=False)
    assert summary["int16_gemm"] == [large.name] and summary["kernels"] == []
    skl = {"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 2}  # AVX-512 BW, no VNNI
    assert tuning._int16_routed([large], skl, "avx512bw") == []
    small = LutGemmConfig(2, 64, 128, 3, 64, 2)
    assert tuning._int16_routed([small, large], clx, "avx512bw") == [large]
