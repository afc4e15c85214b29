"""Perplexity of the float model and of a compiled artifact on the same windows of real text."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ._files import write_text_atomic
from .errors import ConfigError

log = logging.getLogger(__name__)


def _terms_of(quant: dict):
    """The manifest's power-of-two terms per scale: a count, or per-plane counts such as "3,2,2"
    (most significant plane first; for a budget the plan whose last count repeats)."""
    plan = quant.get("plane_terms")
    if not plan:
        return quant["terms"]
    bits = quant["bits"]
    if float(bits).is_integer():
        plan = [plan[min(b, len(plan) - 1)] for b in range(int(bits))]
    return ",".join(map(str, plan))


def window_nll(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (float64 log-softmax)."""
    lg = np.asarray(logits, dtype=np.float64)[:-1]
    mx = lg.max(-1, keepdims=True)
    logz = mx[:, 0] + np.log(np.exp(lg - mx).sum(-1))
    picked = lg[np.arange(len(lg)), ids[1:]]
    return float((logz - picked).sum()), len(lg)


def perplexity(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    windows: np.ndarray,
    desc: str = "perplexity",
    progress: bool = True,
) -> dict:
    """``logits_fn(int64[1, w]) -> float32[1, w, V]`` over each row of ``windows``."""
    total, count, times = 0.0, 0, []
    for row in tqdm(windows, desc=desc, unit="window", disable=not progress):
        t0 = time.perf_counter()
        logits = logits_fn(row[None])
        times.append(time.perf_counter() - t0)
        nll, n = window_nll(logits[0], row)
        total, count = total + nll, count + n
    return {
        "ppl": float(np.exp(total / count)),
        "nll": total / count,
        "predicted_tokens": count,
        "forward_s_median": statistics.median(times),
        "forward_s": times,
    }


def torch_logits_fn(model):
    import torch

    @torch.no_grad()
    def fn(ids: np.ndarray) -> np.ndarray:
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.float().numpy()

    return fn


def onnx_logits_fn(path: str):
    """Float logits of an ONNX model via onnxruntime (inputs padded to its static length)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    static = inp.shape[1] if isinstance(inp.shape[1], int) else None

    def fn(ids: np.ndarray) -> np.ndarray:
        seq = ids.shape[1]
        feed = ids
        if static is not None and seq < static:
            feed = np.zeros((ids.shape[0], static), dtype=ids.dtype)
            feed[:, :seq] = ids
        return sess.run(None, {inp.name: feed.astype(np.int64)})[0][:, :seq]

    return fn


def evaluate_artifact(
    artifact: str | Path,
    text: str = "wiki",
    tokens: int = 2048,
    window: int = 512,
    json_path: str | Path | None = None,
    float_model: bool = True,
    progress: bool = True,
) -> dict:
    """Float vs artifact perplexity on the first ``tokens`` tokens of ``text`` (windows of ``window``)."""
    from . import runtime
    from .models import load_model
    from .text import token_ids

    rt = runtime.load(artifact)
    man = rt.manifest
    if window > rt.seq_len:
        raise ConfigError(
            f"window {window} is longer than the artifact's compiled sequence length {rt.seq_len}; "
            f"use --window {rt.seq_len} or recompile with --seq-len {window}"
        )
    if tokens < window:
        raise ConfigError(f"--tokens {tokens} is less than one window of {window}")
    if not man.get("model"):
        raise ConfigError(
            "the artifact does not record its source model, so no tokenizer/float model"
        )
    is_onnx = str(man["model"]).lower().endswith(".onnx")
    tok_spec = man.get("tokenizer") or (None if is_onnx else man["model"])
    if tok_spec is None:
        raise ConfigError("this ONNX artifact records no tokenizer; recompile with --tokenizer")
    if is_onnx:
        model, tok = None, load_model(tok_spec)[1]
    else:
        model, tok = load_model(man["model"])
    ids = token_ids(tok, text, 0, tokens)
    windows = ids[: (len(ids) // window) * window].reshape(-1, window)
    calib = man.get("calibration", {})
    overlap = bool(
        calib.get("source") == "text"
        and calib.get("text") == text
        and calib.get("start", 0) < len(windows) * window
    )
    if overlap:
        log.warning("evaluation windows overlap the calibration text: perplexity is optimistic")

    art = perplexity(rt, windows, desc="artifact", progress=progress)
    result = {
        "artifact": str(artifact),
        "text": text,
        "tokens": int(windows.size),
        "window": window,
        "windows": int(len(windows)),
        "bits": man["quant"]["bits"],
        "group_size": man["quant"]["group_size"],
        "terms": _terms_of(man["quant"]),
        "scale_window": man["quant"].get("scale_window", 0),
        "bits_per_weight": man.get("bits_per_weight"),
        "artifact_ppl": art["ppl"],
        "artifact_bytes": Path(artifact).stat().st_size,
        "float_weight_bytes": man["float_weight_bytes"],
        "size_ratio": Path(artifact).stat().st_size / man["float_weight_bytes"],
        "artifact_forward_s": art["forward_s_median"],
        "compile_s": man.get("timings_s", {}).get("total"),
        "calibration_overlap": overlap,
        "rewrite": man.get("rewrite", {}).get("summary"),
    }
    if float_model:
        if is_onnx:
            fn, desc = onnx_logits_fn(man["model"]), "float (onnxruntime)"
        else:
            fn, desc = torch_logits_fn(model), "float (torch)"
        fl = perplexity(fn, windows, desc=desc, progress=progress)
        result.update(
            float_ppl=fl["ppl"],
            ratio=art["ppl"] / fl["ppl"],
            float_runner="onnxruntime" if is_onnx else "torch fp32",
            float_forward_s=fl["forward_s_median"],
            forward_speedup_vs_float=fl["forward_s_median"] / art["forward_s_median"],
        )
    if json_path:
        write_text_atomic(json_path, json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
