"""`shiftadd-tvm bench kernel` on a tiny case: every competitor is measured, checked and reported."""

import json

import numpy as np
import pytest

from shiftadd_tvm import bench_kernel, cli, cpu_features
from shiftadd_tvm.errors import ConfigError


def test_bench_kernel_small_case(tmp_path, capsys):
    out = tmp_path / "k.json"
    rc = cli.main(
        [
            "bench", "kernel", "--shapes", "40x100", "--m", "3", "--bits", "2",
            "--threads", "1", "--modes", "hot,cold", "--group-size", "32", "--rounds", "1",
            "--budget-ms", "1", "--isa", "generic", "--json", str(out), "--no-progress",
            "--png", str(tmp_path / "k.png"),
        ]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["mode"] for r in res["rows"]] == ["hot", "cold"]
    for r in res["rows"]:
        assert (r["n"], r["k"], r["m"], r["bits"], r["isa"]) == (40, 100, 3, 2, "generic")
        assert r["ours_rel_err"] < 1e-5  # float tables: exact up to rounding
        assert r["ort_4bit_rel_err"] < 5e-2 and r["ort_2bit_rel_err"] < 5e-2  # int8 activations
        for key in ("torch_fp32", "torch_bf16", "ort_4bit", "ort_2bit"):
            assert r[f"{key}_ms"] > 0
            assert r[f"speedup_vs_{key}"] == pytest.approx(r[f"{key}_ms"] / r["ours_ms"])
        assert 0 < r["bw_floor_frac"] == pytest.approx(r["bw_floor_ms"] / r["ours_ms"])
        assert 0 < r["plain_read_frac"] == pytest.approx(r["plain_read_ms"] / r["ours_ms"])
    assert all(v > 0.5 for v in res["read_bandwidth_gbs"].values())  # GB/s
    table = capsys.readouterr().out
    assert "| 40x100 | 3 | 2 | 1 | cold |" in table
    assert "| BW floor | read |" in table
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_read_sums_every_byte_it_stands_for():
    """The plain read of N bytes loads at least N bytes (whole 4 KiB steps), one buffer per copy."""
    import tvm

    plain = bench_kernel.PlainRead(tvm.target.Target("llvm"))
    calls = plain.calls(10_000, copies=3, parallel=False)
    assert len(calls) == 3
    ((cols, parallel),) = plain._funcs  # 10 000 bytes -> 3 steps of 16 rows x 64 int32 = 12 KiB
    assert cols == 192 and bench_kernel.READ_ROWS * cols * 4 >= 10_000 and not parallel
    for c in calls:
        c()


def test_cold_copies_exceed_cache():
    assert bench_kernel.copies_for(1 << 20, cold=False, llc=32 << 20) == 1
    n = bench_kernel.copies_for(4 << 20, cold=True, llc=32 << 20)
    assert n * (4 << 20) > 2 * (32 << 20)


def test_matmulnbits_model_means_its_weights():
    """The ORT model is built right: its output matches the dense weights it stands for."""
    import onnxruntime as ort

    blob, w, _ = bench_kernel.ort_matmulnbits_model(24, 70, 2, 4, 32, seed=1)
    x = np.random.default_rng(0).standard_normal((2, 70)).astype(np.float32)
    # accuracy_level 4 quantizes activations to int8: a few 1e-3 relative
    y = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"A": x})[0]
    ref = x @ w.T
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-2


def test_bad_options_name_the_fix():
    with pytest.raises(ConfigError, match="NxK"):
        bench_kernel.parse_shapes("4096by4096")
    with pytest.raises(ConfigError, match="bits"):
        bench_kernel.parse_ints("2,5", "bits", (1, 2, 3, 4))


def test_build_ours_takes_the_tuned_record(tmp_path):
    """`bench kernel` times the schedule compile() would pick: the tuning log's record if the
    shape has one (its row says "tuned"), else the default rule."""
    import tvm
    from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig, LutGemmKnobs, default_knobs

    from shiftadd_tvm import tuning

    cfg = LutGemmConfig(2, 40, 96, 2, 32, 3)
    x = np.random.default_rng(0).standard_normal((2, 96)).astype(np.float32)
    target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
    ker = bench_kernel.build_ours(cfg, "generic", 1, target, 1, x, 0, db=None)
    assert ker.schedule == "default rule (no tuning log for this target)"
    db = tuning.Database(tmp_path / "llvm_generic_1c.json")
    chosen = LutGemmKnobs(m_inner=1, n_unroll=1, n_chunks=2)
    assert chosen != default_knobs(cfg, 1)
    rec = {"config": vars(cfg), "knobs": vars(chosen), "us": 1.0, "default_us": 2.0}
    db.put(cfg, rec, {"target": {"kind": "llvm"}})
    ker = bench_kernel.build_ours(cfg, "generic", 1, target, 1, x, 0, db=db)
    assert ker.schedule == "tuned (llvm_generic_1c.json: 1 us vs default 2 us)"
    assert ker.err < 1e-5  # the tuned schedule computes the same product


def test_random_packed_shared_has_the_form():
    """bench kernel --scale-window 8 times the shared-exponent kernel on weights that have the
    form, with every plane's term count respected."""
    from shiftadd_tvm.schedules.packing import plane_term_counts, shared_exponent_form

    from shiftadd_tvm.bench_kernel import random_packed

    for bits, counts in ((2, (3, 3)), (3, (3, 2, 2)), (4, (4, 3, 2, 2))):
        _, scales = random_packed(96, 300, bits, 128, max(counts), 0, counts, shared=True)
        assert shared_exponent_form(scales) is not None
        assert plane_term_counts(scales) == counts


@pytest.mark.skipif(
    bool(cpu_features.host_missing("int16")),
    reason="runs the int16 GEMM: needs AVX-512 BW and VNNI",
)
def test_build_ours_times_the_int16_gemm_where_compile_picks_it():
    """Many rows on an avx512bw target with VNNI: the kernel timed is the int16 GEMM (as compile()
    picks it), checked against the exact product of the same weights; few rows: the table kernel."""
    import tvm
    from shiftadd_tvm.schedules.lut_gemm import LutGemmConfig

    target = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 1})
    for m, sched in ((32, "int16"), (2, "default")):
        cfg = LutGemmConfig(m, 40, 96, 3, 32, 3)
        x = np.random.default_rng(0).standard_normal((m, 96)).astype(np.float32)
        ker = bench_kernel.build_ours(cfg, "avx512bw", 1, target, 1, x, 0, int16_ok=True)
        assert bench_kernel.sched_label(ker.schedule) == sched
        assert ker.err < (2e-3 if sched == "int16" else 2e-2)
