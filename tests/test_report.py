"""The accuracy report's outputs (table, plot) and its calibration/evaluation overlap check."""

import dataclasses
import json

import pytest

from shiftadd_tvm.errors import ConfigError
from shiftadd_tvm.report import ReportSpec, _check_disjoint, markdown, plot


def _result():
    spec = ReportSpec(texts=("wiki", "lee"), bits=(3,), budgets=(2.5,), baselines=("rtn",))
    rows = [
        {
            "method": "ours",
            "label": "3",
            "bits": 3,
            "budget": None,
            "bits_per_weight": 3.5625,
            "ppl": {"wiki": 40.0, "lee": 50.0},
            "ratio": {"wiki": 2.0, "lee": 1.6667},
            "torch_sim_ratio": {"wiki": 2.0001, "lee": 1.6668},
        },
        {
            "method": "ours",
            "label": "2.5",
            "bits": 2.5,
            "budget": 2.5,
            "bits_per_weight": 2.96875,
            "ppl": {"wiki": 80.0, "lee": 90.0},
            "ratio": {"wiki": 4.0, "lee": 3.0},
            "allocation": {
                "average_bits": 2.5,
                "bits_per_weight": 2.96875,
                "histogram": {"2": 1, "3": 1},
                "solver": "dp",
            },
        },
        {
            "method": "rtn",
            "label": "3",
            "bits": 3,
            "budget": None,
            "bits_per_weight": 3.25,
            "ppl": {"wiki": 100.0, "lee": 120.0},
            "ratio": {"wiki": 5.0, "lee": 4.0},
        },
    ]
    return {
        "spec": dataclasses.asdict(spec),
        "calibration": {"text": "wiki", "tokens": [200000, 216384], "windows": 32, "window": 512},
        "float_ppl": {"wiki": 20.0, "lee": 30.0},
        "rows": rows,
        "layers": {
            "a": {"size": 10, "output_error": {"2": 4.0, "3": 1.0, "4": 0.25}, "bits@2.5": 3},
            "b": {"size": 10, "output_error": {"2": 0.4, "3": 0.1, "4": 0.02}, "bits@2.5": 2},
        },
    }


def test_markdown_table_lists_every_row():
    md = markdown(_result())
    lines = [ln for ln in md.splitlines() if ln.startswith("| ")]
    assert len(lines) == 1 + 1 + 3  # header, float, three rows
    assert "| ours | 3 | 3.562 | 40.000 | 2.000 (2.000) | 50.000 | 1.667 (1.667) |" in md
    assert "| ours | 2.5 (budget) | 2.969 |" in md
    assert "tokens 200000-216384 of 'wiki'" in md
    assert "budget 2.5: average 2.5000 bit-planes" in md


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "r.png"
    plot(_result(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(_result())  # the result is JSON-serializable as written


def test_overlapping_calibration_refused():
    with pytest.raises(ConfigError, match="overlap"):
        _check_disjoint(ReportSpec(texts=("wiki",), tokens=4096, calib_start=1000))
    _check_disjoint(ReportSpec(texts=("wiki", "lee"), tokens=4096, calib_start=4096))


def test_plane_terms_enter_the_fit_digest_only_when_set():
    """Caches written before per-plane terms (and scale windows) existed keep their digest; a
    plan or a window changes it."""
    import hashlib

    from shiftadd_tvm.report import _FIT_FIELDS

    spec = ReportSpec()
    d = dataclasses.asdict(spec)
    old = [f for f in _FIT_FIELDS if f not in ("plane_terms", "scale_window")]
    blob = json.dumps({f: d[f] for f in old}, sort_keys=True)
    assert spec.digest(*_FIT_FIELDS) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    planned = dataclasses.replace(spec, terms=3, plane_terms=(3, 2))
    assert planned.digest(*_FIT_FIELDS) != spec.digest(*_FIT_FIELDS)
    windowed = dataclasses.replace(spec, scale_window=8)
    assert windowed.digest(*_FIT_FIELDS) != spec.digest(*_FIT_FIELDS)


def test_eval_json_terms_name_every_plane():
    """eval.json's terms: the count, or each plane's count (a budget: the plan itself)."""
    from shiftadd_tvm.evaluate import _terms_of

    assert _terms_of({"terms": 3, "plane_terms": [], "bits": 3}) == 3
    assert _terms_of({"terms": 3, "plane_terms": [3, 2], "bits": 3}) == "3,2,2"
    assert _terms_of({"terms": 4, "plane_terms": [4, 3, 2], "bits": 4}) == "4,3,2,2"
    assert _terms_of({"terms": 4, "plane_terms": [4, 3, 2], "bits": 3.5}) == "4,3,2"


def test_bench_model_scale_window_names_its_fit_and_artifact():
    """bench model --scale-window 8 fits and builds apart from the free-exponent cache, and
    compile's default terms (auto) apart from 3 terms on every plane (whose names are unchanged,
    so caches from before are still found with --terms 3)."""
    from shiftadd_tvm.bench_model import BuildSpec

    three, free, windowed = BuildSpec(terms=3), BuildSpec(), BuildSpec(scale_window=8)
    assert three.artifact_name() == "smollm2-b3-float16head-ctx256-t1-128-rot.so"
    assert three.fit_digest() == "f1712561cd5d-rot"  # the digest caches were written under
    assert free.terms == "auto" and "-termsauto-" in free.artifact_name()
    assert free.fit_digest() != three.fit_digest()
    assert "-sw8-" in windowed.artifact_name()
    assert windowed.fit_digest() != free.fit_digest()
