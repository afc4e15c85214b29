"""``compile()``: model -> calibration -> BCQ reparameterization -> Relax -> LUT rewrite -> TVM build."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__, defaults
from ._files import atomic_path
from .calibrate import activation_stats, target_linears
from .errors import ConfigError, UnsupportedModelError
from .passes.lut_rewrite import PackedLinear, const_key, rewrite_matmuls
from .quant import BCQResult, QuantConfig, bcq_quantize, terms_kwargs
from .runtime import ARTIFACT_FORMAT, SUPPORTED_VERSIONS
from .schedules.lut_gemm import default_knobs
from .targets import resolve_target

log = logging.getLogger(__name__)

ARTIFACT_VERSION = SUPPORTED_VERSIONS[-1]  # the format this version writes (runtime.py reads)


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """Which real text calibrates the fit: ``windows`` windows of ``window`` tokens from ``start``."""

    text: str = "wiki"
    start: int = 200_000  # far past the evaluation windows at the head of the same text
    # 16k tokens: the GPTQ loop overfits on less (2.45x at 4k vs 1.90x at 16k)
    windows: int = defaults.CALIB_WINDOWS
    window: int = 512


class Artifact:
    """A compiled model: the TVM executable plus the manifest describing it."""

    def __init__(self, executable, manifest: dict, quantized: dict[str, BCQResult]):
        self.executable = executable
        self.manifest = manifest
        self.quantized = quantized

    def export(self, path: str | os.PathLike) -> Path:
        """Write one self-describing file: the shared library with the manifest appended.

        Written to a temporary name and renamed, so ``path`` is never half-written.
        """
        from ._files import export_with_manifest

        dest = export_with_manifest(self.executable, self.manifest, path)
        log.info("exported %s (%.1f MB)", dest, dest.stat().st_size / 1e6)
        return dest

    def dequantized_state(self) -> dict[str, torch.Tensor]:
        """torch parameter name -> the dense fp32 weight the compiled kernels mean."""
        return {f"{name}.weight": r.dequantize().float() for name, r in self.quantized.items()}

    def apply_to(self, model):
        """A copy of ``model`` carrying the dequantized weights (for checks against the artifact).
        ``model`` is the float model given to ``compile``: if the artifact was compiled rotated,
        the copy is rotated the same way first (``rotate.apply`` is deterministic)."""
        clone = copy.deepcopy(model)
        how = self.manifest.get("rotation")
        if how and not getattr(clone, "_shiftadd_rotated", False):
            from . import rotate

            rotate.apply(clone, how)
        state = self.dequantized_state()
        _untie(clone, state)  # a quantized head must not overwrite the tied (float) embedding
        missing = clone.load_state_dict(state, strict=False).unexpected_keys
        if missing:
            raise RuntimeError(f"weights not found in the model: {missing[:5]}")
        return clone


def _untie(model, names) -> None:
    """Give each parameter in ``names`` that is shared with another name its own copy."""
    params = dict(model.named_parameters(remove_duplicate=False))
    owners: dict[int, int] = {}
    for p in params.values():
        owners[id(p)] = owners.get(id(p), 0) + 1
    for name in names:
        p = params.get(name)
        if p is not None and owners[id(p)] > 1:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, torch.nn.Parameter(p.detach().clone()))


def _windows(ids: np.ndarray, window: int) -> np.ndarray:
    n = len(ids) // window
    return ids[: n * window].reshape(n, window)


@dataclasses.dataclass
class Imported:
    """A model imported into Relax, frontend-neutral: what the common back half needs."""

    mod: object  # IRModule; main(ids, *weights)
    params: dict[str, np.ndarray]  # relax parameter name -> value
    candidates: dict[str, tuple[str, np.ndarray]]  # relax key -> (readable name, W[N, K])
    policy_dense: dict[str, str]  # relax key -> why it stays dense on purpose
    # relax key -> X^T X / n of the layer's input: [K, K] (method gptq) or its diagonal [K]
    energy: dict[str, torch.Tensor] | None
    info: dict  # manifest fields from the frontend
    calib_info: dict
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # relax key -> readable name
    fisher: dict[str, torch.Tensor] | None = None  # relax key -> loss sensitivity per output
    # KV-cache step function name -> its parameter values (weights named like main's)
    step_params: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    # readable name -> bit-planes fitted for it instead of the common width (the output head)
    bits_by_name: dict[str, int] = dataclasses.field(default_factory=dict)
    # (fits by relax key, ScaleTuning, progress) -> (tuned fits, report): end-to-end scale tuning
    # against the float model (torch models with calibration text only; finetune.py)
    tuner: Callable | None = None


def attach_tuner(imp: Imported, model, windows: np.ndarray | None) -> None:
    """Let ``build_imported`` tune ``imp``'s fitted scales on ``model`` with ``windows``."""
    if windows is None:
        return

    def tuner(fits: dict, cfg, progress: bool):
        from .finetune import tune_scales

        names = {k: imp.candidates[k][0] for k in fits}
        tuned, report = tune_scales(
            model, {names[k]: r for k, r in fits.items()}, windows, cfg, progress
        )
        return {k: tuned[names[k]] for k in fits}, report

    imp.tuner = tuner


def _fit_layer(name: str, w, st: torch.Tensor | None, qcfg: QuantConfig) -> BCQResult:
    """One candidate's fit: the GPTQ loop where a full Hessian is known, else weighted BCQ."""
    from .gptq import gptq_bcq

    wt = torch.as_tensor(np.asarray(w))
    if st is not None and st.ndim == 2 and qcfg.method == "gptq":
        return gptq_bcq(wt, st, qcfg, name=name, rounds=qcfg.rounds, sweeps=qcfg.sweeps)
    cw = torch.diagonal(st) if st is not None and st.ndim == 2 else st
    return bcq_quantize(wt, qcfg, cw, name=name)


# (candidates, qcfg, stats) of the fit in progress: forked workers inherit it (nothing is pickled
# on the way in; each worker returns its layers' BCQResults)
_FIT_JOB: tuple | None = None


def _fit_worker_init() -> None:
    torch.set_num_threads(1)


def _fit_key(job: tuple, key: str) -> tuple[str, BCQResult]:
    """``key``'s fit in ``job`` = (candidates, qcfg, stats)."""
    candidates, qcfg, stats = job
    name, w = candidates[key]
    return key, _fit_layer(name, w, stats.get(key) if stats is not None else None, qcfg)


def _fit_in_worker(key: str) -> tuple[str, BCQResult]:
    return _fit_key(_FIT_JOB, key)


def fit_workers() -> int:
    """Processes fitting layers at once: ``SHIFTADD_FIT_WORKERS``, else the CPUs this process may
    use."""
    env = os.environ.get("SHIFTADD_FIT_WORKERS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(f"SHIFTADD_FIT_WORKERS={env!r}: expected a whole number >= 1")
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def quantize_candidates(
    candidates: dict[str, tuple[str, np.ndarray]],
    qcfg: QuantConfig,
    stats: dict[str, torch.Tensor] | None,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, BCQResult]:
    """Fit every candidate (``_fit_layer``); returns key -> BCQResult in ``candidates``' order.

    The layers are independent, so with ``workers`` > 1 (default ``fit_workers()``) they are fitted
    in that many forked processes, one torch thread each: most of a fit is per-column Python work
    (the GPTQ loop, the coordinate-descent sweeps) that one process cannot spread over cores.
    A worker's result is the fit with one torch thread, whatever the number of workers.
    """
    import multiprocessing as mp

    global _FIT_JOB
    desc = f"{qcfg.method.upper()} {qcfg.bits}-bit"
    workers = min(fit_workers() if workers is None else workers, len(candidates))
    if workers > 1 and "fork" not in mp.get_all_start_methods():
        log.warning("no fork() on this platform: fitting %d layers in one process", len(candidates))
        workers = 1
    bar = tqdm(total=len(candidates), desc=desc, unit="layer", disable=not progress)
    job, out = (candidates, qcfg, stats), {}
    if workers <= 1:
        for key in candidates:
            out[key] = _fit_key(job, key)[1]
            bar.update()
    else:
        _FIT_JOB = job
        try:
            ctx = mp.get_context("fork")
            with ctx.Pool(workers, initializer=_fit_worker_init) as pool:
                # the largest layers first: the last ones to finish are short
                keys = sorted(candidates, key=lambda k: -np.asarray(candidates[k][1]).size)
                for key, res in pool.imap_unordered(_fit_in_worker, keys, chunksize=1):
                    out[key] = res
                    bar.update()
        finally:
            _FIT_JOB = None
    bar.close()
    return {k: out[k] for k in candidates}


def _bind_used_params(
    mod, params: dict[str, np.ndarray], func_name: str = "main", num_input: int = 1
):
    """Bind the weights still used after the rewrite as constants; drop the unused ones.

    The first ``num_input`` parameters of ``func_name`` are run-time inputs and stay."""
    import tvm
    from tvm import relax

    func = mod[func_name]
    used = {str(v.name) for v in relax.analysis.free_vars(func.body)}
    inputs = list(func.params[:num_input])
    keep = inputs + [p for p in func.params[num_input:] if str(p.name) in used]
    new_func = relax.Function(keep, func.body, func.ret_ty, func.is_pure, func.attrs)
    new_func = new_func.without_attr("params").with_attr("num_input", num_input)
    mod = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != func_name})
    mod[func_name] = new_func
    binding = {str(p.name): params[str(p.name)] for p in keep[num_input:]}
    return relax.transform.BindParams(func_name, binding)(mod)


def _calibration_windows(tokenizer, calibration, calib_ids):
    """(windows int64[n, w] or None, info dict)."""
    if calib_ids is not None:
        ids = np.asarray(calib_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.size == 0:
            raise ConfigError(
                f"calib_ids must be a non-empty int array [windows, window], got shape {ids.shape}"
            )
        return ids, {"source": "ids", "windows": int(ids.shape[0]), "window": int(ids.shape[1])}
    if calibration == "stats-file":  # statistics are read from a file by the caller
        return None, {"source": "stats"}
    if calibration is None:
        log.warning(
            "no calibration data: scales fitted to plain weight error (outlier channels suffer)"
        )
        return None, {"source": None}
    if tokenizer is None:
        raise ConfigError(
            "calibration text needs a tokenizer: pass tokenizer=..., calib_ids=..., "
            "or calibration=None to fit without activation statistics"
        )
    from .text import token_ids

    ids = token_ids(
        tokenizer, calibration.text, calibration.start, calibration.windows * calibration.window
    )
    return _windows(ids, calibration.window), {"source": "text", **dataclasses.asdict(calibration)}


def import_torch(
    model,
    tokenizer,
    seq_len,
    calibration,
    calib_ids,
    progress,
    full=True,
    decode=None,
    head_bits: int | None = None,
    fused_attention: bool = False,
) -> Imported:
    """``decode``: ``None`` or ``{"max_context": S, "steps": (1, 128)}``: also export the
    KV-cache step functions (``decode.py``) into the same module. ``head_bits``: reparameterize
    the output head too, at this width (calibrated like the block Linears). ``fused_attention``
    (CPU targets): ``main``'s attention as the step functions' kernel
    (``frontend.import_causal_lm``)."""
    from .frontend import import_causal_lm

    model.eval()
    windows, calib_info = _calibration_windows(tokenizer, calibration, calib_ids)
    layers = target_linears(model)
    head_name = None
    if head_bits is not None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_name = next((n for n, m in model.named_modules() if m is head and n), None)
        if not isinstance(head, torch.nn.Linear) or head_name is None:
            raise UnsupportedModelError("head_bits: the model has no Linear output head")
        layers[head_name] = head
    energy_by_name = None
    if windows is not None:
        t0 = time.time()
        energy_by_name = activation_stats(model, windows, layers, progress, full=full)
        calib_info["seconds"] = round(time.time() - t0, 2)
    mod, params, names = import_causal_lm(model, 1, seq_len, fused_attention=fused_attention)
    decode_info, step_params = None, {}
    if decode is not None:
        mod, decode_info, step_params = _add_step_functions(mod, params, model, decode)
    by_weight = {f"{name}.weight": name for name in layers}
    from .rotate import DENSE_FLAG

    kept = {f"{n}.weight" for n, m in model.named_modules() if getattr(m, DENSE_FLAG, False)}
    candidates, policy, energy = {}, {}, {}
    for key, tname in names.items():
        if key not in params or params[key].ndim != 2:
            continue
        if tname in by_weight:
            lname = by_weight[tname]
            candidates[key] = (lname, params[key])
            if energy_by_name is not None:
                energy[key] = energy_by_name[lname]
        elif tname in kept:
            policy[key] = "the rotation's mix matrix after the final norm (rotate.py): kept dense"
        else:
            policy[key] = "not a transformer-block Linear (output head / embedding): kept dense"
    cfg = model.config
    info = {
        "model": getattr(cfg, "_name_or_path", None),
        "frontend": "torch.export",
        "architecture": getattr(cfg, "architectures", None),
        "vocab_size": int(cfg.vocab_size),
        "float_weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "seq_len": seq_len,
        **({"decode": decode_info} if decode_info else {}),
    }
    return Imported(
        mod,
        params,
        candidates,
        policy,
        energy if energy_by_name else None,
        info,
        calib_info,
        dict(names),
        step_params=step_params,
        bits_by_name={head_name: int(head_bits)} if head_name else {},
    )


def _add_step_functions(mod, params: dict, model, decode: dict):
    """Add ``decode.py``'s step functions to ``mod`` (one per step length); their weights are
    parameters named like ``main``'s (checked), so the rewrite sees the same weights."""
    import tvm

    from . import decode as dec

    geo = dec.cache_shape(model, decode["max_context"])
    funcs, all_params = {}, {}
    for tokens in sorted(set(decode["steps"])):
        if tokens < 1 or tokens > geo["max_context"]:
            raise ConfigError(
                f"decode step length {tokens} must lie in [1, max_context={geo['max_context']}]"
            )
        func, step_params, n_inputs, kernels = dec.import_step(model, tokens, geo["max_context"])
        for name, value in step_params.items():
            if name.startswith("p_") and name in params:
                if not np.array_equal(params[name], value):
                    raise RuntimeError(f"step T={tokens}: weight {name} differs from main's")
        name = dec.step_name(tokens)
        all_params[name] = step_params
        funcs[name] = {"tokens": tokens, "inputs": n_inputs}
        mod = tvm.IRModule(dict(mod.functions))
        mod[name] = func.with_attr("global_symbol", name)
        for gv, kernel in kernels.items():
            mod[gv] = kernel
    return mod, {**geo, "functions": funcs}, all_params


def import_onnx(
    model_proto, path, tokenizer, seq_len, calibration, calib_ids, progress, full=True
) -> Imported:
    from tvm.relax.frontend.onnx import from_onnx

    from . import onnx_path

    onnx_path.check_operators(model_proto)
    input_name, shape = onnx_path.graph_input(model_proto, seq_len)
    seq_len = shape[1]
    mats = onnx_path.weight_matmuls(model_proto)
    windows, calib_info = _calibration_windows(tokenizer, calibration, calib_ids)
    energy_by_weight = None
    if windows is not None:
        t0 = time.time()
        windows = windows[:, :seq_len] if windows.shape[1] > seq_len else windows
        if windows.shape[1] != seq_len:
            raise ConfigError(
                f"ONNX calibration windows must have the compiled length {seq_len}, got {windows.shape[1]}"
            )
        energy_by_weight = onnx_path.activation_stats(
            model_proto, input_name, windows, [m for m in mats if not m.head], progress, full
        )
        calib_info["seconds"] = round(time.time() - t0, 2)
    try:
        mod = from_onnx(model_proto, shape_dict={input_name: shape}, keep_params_in_input=False)
    except Exception as e:
        raise UnsupportedModelError(f"TVM's ONNX importer failed: {str(e).splitlines()[0]}") from e
    params: dict[str, np.ndarray] = {}  # initializers are graph constants, keyed by content
    candidates, policy, energy, readable = {}, {}, {}, {}
    for m in mats:
        # the importer may fold Transpose(initializer): the graph then holds the transposed copy
        for key in {const_key(m.stored), const_key(np.ascontiguousarray(m.stored.T))}:
            readable[key] = m.weight
            if m.head:
                policy[key] = (
                    "output head (tied to the embedding or feeding the output): kept dense"
                )
            else:
                candidates[key] = (m.weight, m.w_nk)
                if energy_by_weight is not None:
                    energy[key] = energy_by_weight[m.weight]
    from onnx import numpy_helper

    vocab = int(model_proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
    fbytes = sum(
        numpy_helper.to_array(i).nbytes for i in model_proto.graph.initializer if i.data_type == 1
    )
    info = {
        "model": str(path) if path else None,
        "frontend": "onnx",
        "architecture": None,
        "vocab_size": vocab,
        "float_weight_bytes": int(fbytes),
        "seq_len": seq_len,
    }
    return Imported(
        mod,
        params,
        candidates,
        policy,
        energy if energy_by_weight else None,
        info,
        calib_info,
        readable,
    )


def compile(  # noqa: A001 - the public API name the issue asks for
    model,
    target="llvm",
    bits: float = 3,
    group_size: int = 128,
    terms: int | str | tuple[int, ...] = "auto",
    *,
    tokenizer=None,
    seq_len: int = 512,
    iters: int = 15,
    calibration: CalibrationSpec | None = CalibrationSpec(),
    calib_ids: np.ndarray | None = None,
    allow_dense_fallback: bool = False,
    calib_stats: str | os.PathLike | None = None,
    method: str = "gptq",
    progress: bool = True,
    head_bits: int | None = None,
    decode: bool | None = None,
    max_context: int | None = None,
    decode_steps: tuple[int, ...] = (1, 128),
    sweeps: int = defaults.SWEEPS,
    scale_tuning=None,
    head_storage: str = "float16",
    rotate: bool | None = None,
    tables: str = "auto",
    scale_window: int = 0,
) -> Artifact:
    """Reparameterize ``model`` to binary planes with power-of-two scales and build it with TVM.

    ``model``: a Hugging Face causal LM (``torch.nn.Module``), an ``onnx.ModelProto``, or a string:
    ``smollm2``, a HF folder, a ``.gguf`` or a ``.onnx`` file. Calibration text comes from
    ``calibration`` (tokenized with ``tokenizer``) or from explicit ``calib_ids`` (int64
    [windows, window]); ``calibration=None`` and no ids fit the weights without activation
    statistics (logged as a warning: outlier channels suffer). Weight matmuls that cannot be
    rewritten (dynamic shapes, non-float activations) are an error unless
    ``allow_dense_fallback``, which keeps them dense and counts them in the manifest.
    The artifact takes ``int64[1, seq_len]`` ids; the runtime pads shorter inputs.
    ``calib_stats``: a ``.npz`` of activation statistics keyed by weight content: read instead of
    calibrating when the file exists, written after calibrating when it does not (so the torch and
    ONNX paths of one model can share identical statistics).
    ``head_bits``: also reparameterize the output head (kept dense by default) at this width; it
    is the largest matmul of a small model's decode step (SmolLM2: 49152 x 576).
    ``decode``: also compile KV-cache step functions (``decode.py``: one per length in
    ``decode_steps``, cache of ``max_context`` tokens, default ``seq_len``) into the same module,
    for ``Runtime.generate``. ``None``: on for LLaMA-family torch models on CPU targets, off (and
    logged) otherwise; ``True`` makes an unsupported model an error.
    ``terms``: signed powers of two per scale. ``"auto"`` (default): per width, the counts of
    ``defaults.TERMS_AUTO`` (3,3 at 2 bits; 3,2,2 at 3 bits; 4,3,2,2 at 4 bits; each layer of a
    mixed allocation gets those of its width); or one count for every bit-plane (``3``); or per
    plane, most significant first, the last repeated for wider layers (``(4, 3, 3, 2)`` or
    ``"4,3,3,2"``). Fewer terms make the kernel's scale epilogue cheaper; the largest scales need
    the most precision.
    ``sweeps``: coordinate-descent passes over the codes after the GPTQ loop (``gptq.py``).
    ``scale_tuning``: a ``finetune.ScaleTuning`` (default: one epoch over 30 calibration windows)
    that tunes every scale end to end against the float model after the layer-wise fit; ``False``
    or ``ScaleTuning(epochs=0)`` turns it off. Torch models with calibration text only.
    ``head_storage``: ``"float16"`` (default) stores a dense output head as float16 (rounded
    once; the kernels widen it, products and sums stay float32): half the bytes each decode step
    streams for it. A tied embedding reads the same float16 table, so it is stored once, at half
    the size. ``"float32"`` keeps the float32 table. CPU targets only (CUDA keeps float32).
    ``rotate``: rotate a LLaMA-family torch model before calibration (``rotate.py``: an orthogonal
    residual stream and value heads, folded into the weights, plus an add/subtract Hadamard
    transform in front of each MLP down projection), which makes the weights easier to quantize
    and leaves the float model's function unchanged. ``None``: on where supported (logged
    otherwise; also off when the fit is not the GPTQ loop with calibration, which a rotation needs);
    ``True``: an unsupported model is an error; ``False``: off. ``model`` itself is not modified
    (a rotated copy is compiled).
    ``tables``: the CPU LUT kernel's activation tables. ``"auto"``: int8 tables where the target
    has the instructions (AVX-512 VBMI+VNNI, AVX-512 BW, AVX2, NEON; each layer's activations then
    enter through 8-bit tables), float tables elsewhere; on AVX-512 BW targets with VNNI a matmul
    with many activation rows (prefill; ``schedules/int16_gemm.prefers``) runs the int16 GEMM
    instead (same weights, 12-bit activations). ``"int8"``: the int8-table kernel at every M (no
    int16 GEMM). ``"float"``: the float-table kernel on every CPU target (exact activations,
    slower; at 4 bits on SmolLM2 the int8 tables cost 0.1-0.5% perplexity). CUDA ignores it.
    ``scale_window``: 0 (default) fits each power-of-two term freely; 8 keeps the terms of one
    (row, group) within 8 consecutive exponents (``quant.QuantConfig.scale_window``), so that the
    AVX-512 int8 kernel applies a group's scales with one shift instead of one per term
    (``schedules/lut_gemm_int8.py``, shared exponent); other kernels apply the terms as usual.
    """
    from .models import load_model

    t_start = time.time()
    from .allocate import parse_bits

    width, budget = parse_bits(bits)  # 3 -> uniform width; 2.5 -> average budget
    qcfg = QuantConfig(
        bits=width if width is not None else min(4, max(2, round(budget))),  # budget: template
        group_size=group_size,
        **terms_kwargs(terms),
        iters=iters,
        method=method,
        sweeps=sweeps,
        scale_window=scale_window,
    )
    from .finetune import ScaleTuning

    tuning_by_default = scale_tuning is None
    if scale_tuning is None or scale_tuning is True:
        scale_tuning = ScaleTuning()
    elif scale_tuning is False:
        scale_tuning = ScaleTuning(epochs=0)
    full = qcfg.method == "gptq"
    if seq_len < 1:
        raise ConfigError(f"seq_len={seq_len} must be >= 1")
    _check_choice("tables", tables, defaults.TABLES)  # before the fit, not after it
    tgt = resolve_target(target)
    if tgt.kind == "cuda" and group_size % 32:
        raise ConfigError(
            f"group_size={group_size}: the CUDA kernel reads whole 32-bit words per group; use a "
            "multiple of 32 (e.g. 128)"
        )
    model_spec = None
    onnx_proto = None
    if isinstance(model, (str, os.PathLike)):
        model_spec = str(model)
        if model_spec.lower().endswith(".onnx"):
            from .onnx_path import load_onnx

            onnx_proto = load_onnx(model_spec)
        else:
            model, tok = load_model(model_spec)
            tokenizer = tokenizer or tok
    elif type(model).__name__ == "ModelProto":
        onnx_proto = model
    if head_bits is not None and onnx_proto is not None:
        raise ConfigError("head_bits is supported for torch models only (not the ONNX path)")
    stats_in = calib_stats is not None and Path(calib_stats).is_file()
    tune_calibration, tune_ids = calibration, calib_ids  # windows for scale tuning
    if stats_in:
        calibration, calib_ids = "stats-file", None  # statistics come from the file
    if onnx_proto is not None and rotate:
        raise ConfigError("rotate=True is supported for torch models only (not the ONNX path)")
    if onnx_proto is not None:
        imp = import_onnx(
            onnx_proto, model_spec, tokenizer, seq_len, calibration, calib_ids, progress, full
        )
    elif isinstance(model, torch.nn.Module):
        from . import rotate as rot

        if rotate is None and (
            qcfg.method != "gptq" or (calibration is None and calib_ids is None)
        ):
            # without the full-Hessian GPTQ loop a rotation hurts: the rotated inputs' energy sits
            # in cross terms that a diag(H)-weighted fit does not see (SmolLM2, bcq, 3 bits:
            # perplexity 36 -> 8514 with rotation)
            log.info("no rotation: it needs the GPTQ fit with calibration (method=%s)", qcfg.method)
            rotate = False
        how = rot.plan(model, rotate)
        if how is not None:
            model = rot.apply(copy.deepcopy(model), how)
        dec = _decode_request(model, tgt, decode, max_context or seq_len, decode_steps)
        imp = import_torch(
            model,
            tokenizer,
            seq_len,
            calibration,
            calib_ids,
            progress,
            full,
            decode=dec,
            head_bits=head_bits,
            fused_attention=tgt.kind == "llvm",
        )
        if model_spec:
            imp.info["model"] = model_spec
        if how is not None:
            imp.info["rotation"] = how
        if scale_tuning.epochs > 0 and (tune_ids is not None or tune_calibration is not None):
            windows = _calibration_windows(tokenizer, tune_calibration, tune_ids)[0]
            if len(windows) > scale_tuning.held_out or not tuning_by_default:
                attach_tuner(imp, model, windows)
            else:  # the default setting meets a short calibration: say so, do not fail
                log.warning(
                    "scale tuning skipped: %d calibration windows, it needs more than %d",
                    len(windows),
                    scale_tuning.held_out,
                )
    else:
        raise ConfigError(
            f"model must be a torch.nn.Module, an onnx.ModelProto or a model path/alias, "
            f"got {type(model).__name__}"
        )
    if stats_in:
        _load_stats(imp, Path(calib_stats))
    elif calib_stats is not None and imp.energy is not None:
        _save_stats(imp, Path(calib_stats))
    if budget is not None and onnx_proto is None and imp.energy is not None and not stats_in:
        from .allocate import loss_sensitivity  # weighs the errors the allocation compares

        windows, _ = _calibration_windows(tokenizer, calibration, calib_ids)
        imp.fisher = loss_sensitivity(model, windows, imp.candidates, progress)
    return build_imported(
        imp,
        qcfg,
        tgt,
        allow_dense_fallback,
        progress,
        t_start,
        budget=budget,
        tuning=scale_tuning,
        head_storage=head_storage,
        tables=tables,
    )


def _decode_request(model, tgt, decode, max_context, steps) -> dict | None:
    """The decode functions to export, or None (why: logged, or an error if asked for)."""
    if decode is False:
        return None
    from . import decode as dec

    why = None
    if tgt.kind != "llvm":
        why = f"target {tgt.kind}: the KV-cache runtime is CPU-only"
    else:
        try:
            dec.check_supported(model)
        except UnsupportedModelError as e:
            why = str(e)
    if why is not None:
        if decode:
            raise UnsupportedModelError(f"decode functions requested but not possible: {why}")
        log.info("no KV-cache decode functions: %s", why)
        return None
    ctx = dec.cache_shape(model, max_context)["max_context"]
    # a chunk longer than the cache is useless: clamp it (a prompt fills the cache at most)
    return {
        "max_context": int(max_context),
        "steps": tuple(sorted({min(int(t), ctx) for t in steps})),
    }


def _weight_digest(w_nk: np.ndarray) -> str:
    return const_key(np.ascontiguousarray(w_nk, dtype=np.float32))


def _save_stats(imp: Imported, path: Path) -> None:
    digests = {k: _weight_digest(w) for k, (_, w) in imp.candidates.items()}
    arrays = {d: imp.energy[k].numpy().astype(np.float32) for k, d in digests.items()}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    # fit with exactly the numbers the file holds, so a later run that reads it (the ONNX path of
    # the same model, say) produces the same artifact
    for k, d in digests.items():
        imp.energy[k] = torch.from_numpy(arrays[d].astype(np.float64))
    log.info("wrote calibration statistics of %d weights to %s", len(arrays), path)


def _load_stats(imp: Imported, path: Path) -> None:
    try:
        with np.load(path) as z:
            stats = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"cannot read calibration statistics '{path}': {e}") from e
    energy = {}
    for key, (name, w) in imp.candidates.items():
        d = stats.get(_weight_digest(w))
        if d is None or d.shape not in ((w.shape[1],), (w.shape[1], w.shape[1])):
            raise ConfigError(
                f"calibration statistics '{path}' do not cover weight {name} {tuple(w.shape)}: "
                "they belong to another model; delete the file to recalibrate"
            )
        energy[key] = torch.from_numpy(d.astype(np.float64))
    imp.energy = energy
    imp.calib_info = {"source": "stats", "file": str(path)}


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{what}={value!r}: one of {', '.join(choices)}")


def build_imported(
    imp: Imported,
    qcfg,
    tgt,
    allow_dense_fallback,
    progress,
    t_start,
    budget: float | None = None,
    fitted: dict[str, BCQResult] | None = None,
    allocation: dict | None = None,
    tuning=None,
    head_storage: str = "float16",
    tables: str = "auto",
) -> Artifact:
    """The common back half: fit, (tune,) rewrite, bind, build, describe.

    ``budget``: average bit-planes per weight, allocated per layer (``allocate.py``) instead
    of the uniform ``qcfg.bits``. ``fitted`` (relax key -> result, one per distinct weight) and
    ``allocation`` (its report) skip the fit: the accuracy report reuses fits across rows.
    ``tuning`` (``finetune.ScaleTuning``): tune the fitted scales end to end when ``imp`` has a
    tuner (torch models calibrated on text); otherwise logged and skipped.
    ``head_storage``: storage of a dense output head and its tied embedding (see ``compile``).
    ``tables``: ``"auto"``, ``"int8"`` or ``"float"`` (see ``compile``).
    """
    import tvm

    from .schedules.dense_gemm import WEIGHT_DTYPES

    _check_choice("head_storage", head_storage, WEIGHT_DTYPES)
    _check_choice("tables", tables, defaults.TABLES)

    t0 = time.time()
    unique: dict[str, str] = {}  # readable name -> first key
    for key, (name, _) in imp.candidates.items():
        unique.setdefault(name, key)
    todo = {k: imp.candidates[k] for k in unique.values()}
    fixed = {k: c for k, c in todo.items() if c[0] in imp.bits_by_name}  # the head: own width
    todo = {k: c for k, c in todo.items() if k not in fixed}
    if fitted is None and budget is None:
        fitted = quantize_candidates(todo, qcfg, imp.energy, progress)
    elif fitted is None:
        from .allocate import fit_with_budget

        fitted, allocation = fit_with_budget(
            todo, qcfg, imp.energy, budget, quantize_candidates, progress, row_weights=imp.fisher
        )
    for key, (name, w) in fixed.items():
        if key not in fitted:
            cfg = dataclasses.replace(qcfg, bits=imp.bits_by_name[name])
            fitted.update(quantize_candidates({key: (name, w)}, cfg, imp.energy, progress))
    tuning_report = None
    if tuning is not None and tuning.epochs > 0:
        if imp.tuner is None:
            log.warning(
                "scale tuning skipped: it needs a torch model and calibration text (ONNX models, "
                "statistics-only or uncalibrated compiles have no float model to tune against)"
            )
            tuning_report = {"enabled": False, "reason": "no torch model or calibration windows"}
        else:
            fitted, tuning_report = imp.tuner(dict(fitted), tuning, progress)
    quantized = {k: fitted[unique[name]] for k, (name, _) in imp.candidates.items()}
    t_quant = time.time() - t0
    packed: dict[str, PackedLinear] = {}
    for key, res in quantized.items():
        planes, scales = res.pack()
        n, k = res.codes.shape[1:]
        packed[key] = PackedLinear(planes, scales, int(n), int(k), qcfg.group_size)

    readable = {**imp.names, **{k: name for k, (name, _) in imp.candidates.items()}}

    def choose(key: str, w_nk: np.ndarray):
        if key in packed:
            if not np.array_equal(w_nk, imp.candidates[key][1]):
                raise RuntimeError(
                    f"{readable.get(key, key)}: graph weight differs from the fitted one"
                )
            return packed[key]
        return imp.policy_dense.get(key, f"{key}: not a reparameterization candidate, kept dense")

    cuda = tgt.kind == "cuda"
    cuda_knobs = None
    if cuda:
        from . import tuning

        records, source = tuning.load_cuda_records(tgt.to_dict()["arch"])
        log.info(
            "CUDA schedules: %s",
            f"{len(records)} tuning records from {source}"
            if records
            else f"no tuning log for {tgt.to_dict()['arch']}: default rule for every kernel",
        )

        def cuda_knobs(cfg):
            kn, how = tuning.tuned_cuda_knobs(cfg, records)
            what = f"dequantize + {kn.dense} GEMM" if kn.dense else f"LUT, k_slices={kn.k_slices}"
            log.info("  %s: %s (%s)", cfg.name, what, how)
            return kn, how if source is None or how.startswith("default") else f"{how}, {source}"

    cpu_knobs = default_knobs
    cpu_isa, int8_knobs, int16_ok, vnni = "generic", None, False, False
    if not cuda:
        from . import tuning

        spec = tgt.to_dict()
        db_path = tuning.log_path(spec)
        db = tuning.load_database(spec)
        log.info(
            "CPU schedules: %s",
            f"{len(db.records)} tuning records from {db_path.name}"
            if db
            else f"no tuning log "
            f"{db_path.name}: default rule for every kernel (`shiftadd-tvm tune` writes one)",
        )

        def cpu_knobs(cfg):
            kn, how = tuning.lookup_knobs(cfg, db, tuning.threads_of(spec))
            log.info("  %s: %s (%s)", cfg.name, kn, how)
            return kn, how

        from .cpu_features import kernel_isa

        cpu_isa = kernel_isa(spec)  # from what LLVM enables for the target, not from this host
        if tables == "float" and cpu_isa != "generic":
            log.info(
                "tables='float': the float-table LUT kernel instead of the int8-table %s one "
                "(exact activations in the tables, slower)",
                cpu_isa,
            )
            cpu_isa = "generic"
        log.info(
            "CPU LUT kernel: %s",
            f"int8 tables, {cpu_isa}"
            if cpu_isa != "generic"
            else "float tables (asked for, or the target enables no AVX2/AVX-512 VBMI+VNNI/NEON)",
        )

        from .cpu_features import int16_gemm_target, scale_window_hint, target_features

        hint = scale_window_hint(spec, cpu_isa, qcfg.scale_window)
        if hint:
            log.info(hint)
        int16_ok = tables == "auto" and int16_gemm_target(spec, cpu_isa)
        vnni = "avx512vnni" in target_features(spec)
        if int16_ok:
            log.info("large-M matmuls (prefill): int16 GEMM (AVX-512 VNNI) on the same weights")

        def int8_knobs(cfg):
            kn, how = tuning.lookup_int8_knobs(cfg, db, tuning.threads_of(spec), cpu_isa)
            log.info("  %s: %s %s (%s)", cfg.name, cpu_isa, kn, how)
            return kn, how

    rewrite_options = dict(  # the same for main and the KV-cache step functions
        knobs=cpu_knobs,
        target_kind=tgt.kind,
        cuda_knobs=cuda_knobs,
        cpu_isa=cpu_isa,
        int8_knobs=int8_knobs,
        int16_gemm_ok=int16_ok,
        vnni=vnni,
        dense_weight_dtype="float32" if cuda else head_storage,
        shared_exp=qcfg.scale_window > 0,
    )
    mod, record = rewrite_matmuls(imp.mod, choose, params=imp.params, **rewrite_options)
    step_dense: list[dict] = []  # the step functions' dense matmuls (the float head's GEMV)
    step_takes = 0
    decode_info = imp.info.get("decode")
    for name, spec in (decode_info or {}).get("functions", {}).items():
        # the same pass, the same packed weights: kernels for M = T come out of it
        mod, step_record = rewrite_matmuls(
            mod, choose, params=imp.step_params[name], func_name=name, **rewrite_options
        )
        spec["rewrite"] = step_record.summary()
        if [d for d in step_record.dense if d.get("fallback")]:
            raise UnsupportedModelError(f"{name}: {step_record.summary()}")
        record.kernels.update(step_record.kernels)
        record.int16_misfits += step_record.int16_misfits
        step_dense += step_record.dense
        step_takes += step_record.low_takes
    fallbacks = [d for d in record.dense if d.get("fallback")]
    done = {readable.get(r["weight"], r["weight"]) for r in record.rewritten}
    seen_dense = {readable.get(d["weight"], d["weight"]) for d in record.dense}
    missing = sorted({name for name, _ in imp.candidates.values()} - done - seen_dense)
    for key in missing:  # a candidate the pass never reached: its matmul has another form
        fallbacks.append({"weight": key, "reason": "matmul form not recognised by the pass"})
    for d in record.dense:
        log.info(
            "  dense: %s [%d x %d] %s: %s",
            readable.get(d["weight"], d["weight"]),
            d["n"],
            d["k"],
            d.get("kernel", "relax-legalized"),
            d["reason"],
        )
    head_storage_used = None  # what the dense head (and a tied embedding) is stored as
    dense_dtypes = {d["weight_dtype"] for d in record.dense + step_dense if "weight_dtype" in d}
    if dense_dtypes:
        head_storage_used = dense_dtypes.pop() if len(dense_dtypes) == 1 else sorted(dense_dtypes)
        log.info(
            "dense head stored as %s (head_storage=%s); %d embedding lookup(s) read that table",
            head_storage_used,
            head_storage,
            record.low_takes + step_takes,
        )
    if fallbacks:
        listed = "; ".join(
            f"{readable.get(d['weight'], d['weight'])}: {d['reason']}" for d in fallbacks[:5]
        )
        if not allow_dense_fallback:
            raise UnsupportedModelError(
                f"{len(fallbacks)} weight matmul(s) cannot be rewritten ({listed}); pass "
                "--allow-dense-fallback (allow_dense_fallback=True) to keep them dense"
            )
        log.warning("%d weight matmul(s) kept dense by fallback: %s", len(fallbacks), listed)
    mod = _bind_used_params(mod, imp.params)
    for name, spec in (decode_info or {}).get("functions", {}).items():
        # no copies: the VM's constant pool keeps one entry per distinct tensor (tests check it)
        mod = _bind_used_params(mod, imp.step_params[name], name, spec["inputs"])

    from .schedules.cpu_rules import cpu_pipeline
    from .schedules.hadamard import retarget

    mod = retarget(mod, cuda)
    t0 = time.time()
    target_obj = tgt.tvm_target()
    with tvm.transform.PassContext(opt_level=3):
        if cuda:  # Relax's CUDA pipeline: legalize, then dlight schedules all but our kernels
            executable = tvm.compile(mod, target=target_obj)
        else:
            executable = tvm.compile(
                mod, target=target_obj, relax_pipeline=cpu_pipeline(target_obj)
            )
    images = []
    if cuda:
        from .cuda_build import cuda_images

        images = cuda_images(executable, tgt.to_dict()["arch"])
    t_build = time.time() - t0

    by_name = {readable[k]: r for k, r in quantized.items()}
    packed_by_name = {readable[k]: p for k, p in packed.items()}
    qbytes = sum(p.nbytes for p in packed_by_name.values())
    qweights = sum(p.n * p.k for p in packed_by_name.values())
    seq_len = imp.info["seq_len"]
    manifest = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "shiftadd_tvm": __version__,
        **{k: v for k, v in imp.info.items() if k != "seq_len"},
        "input": {"batch": 1, "seq_len": seq_len, "dtype": "int64"},
        **({"decode": decode_info} if decode_info else {}),
        "output": {"dtype": "float32", "shape": [1, seq_len, imp.info["vocab_size"]]},
        "quant": {**dataclasses.asdict(qcfg), **({"bits": budget} if budget else {})},
        # incl. scale codes, averaged over the rewritten weights (per-layer widths may differ)
        "bits_per_weight": round(
            sum(r.cfg.bits_per_weight() * r.codes[0].numel() for r in by_name.values())
            / max(1, sum(r.codes[0].numel() for r in by_name.values())),
            4,
        ),
        **({"allocation": allocation} if allocation else {}),
        **({"scale_tuning": tuning_report} if tuning_report else {}),
        **({"head_storage": head_storage_used} if head_storage_used else {}),
        "quantized_weights": qweights,
        "quantized_bytes": qbytes,
        "layers": {
            name: {
                "bits": p.bits,
                "n": p.n,
                "k": p.k,
                "planes_shape": list(p.planes.shape),
                "scales_shape": list(p.scales.shape),
                "sha256": hashlib.sha256(p.planes.tobytes() + p.scales.tobytes()).hexdigest(),
            }
            for name, p in packed_by_name.items()
        },
        "rewrite": {
            "summary": record.summary(),
            "rewritten": len(record.rewritten),
            "dense": [
                {**d, "weight": readable.get(d["weight"], d["weight"])} for d in record.dense
            ],
            "dense_fallbacks": len(fallbacks),
            "int16_misfits": record.int16_misfits,
            "kernels": record.kernels,
        },
        "calibration": imp.calib_info,
        "target": tgt.to_dict(),
        "cpu_features": required_cpu_features(
            tgt,
            "int16"  # the int16 GEMM and the avx512bw shared-exponent kernel need VNNI too
            if any(
                k.get("kind") == "int16-gemm" or k.get("isa") == "avx512bw+vnni"
                for k in record.kernels.values()
            )
            else cpu_isa,
        ),
        **({"cuda_images": images} if images else {}),
        "timings_s": {
            "quantize": round(t_quant, 2),
            "build": round(t_build, 2),
            "total": round(time.time() - t_start, 2),
        },
    }
    log.info(
        "compiled in %.1fs (quantize %.1fs, build %.1fs)", time.time() - t_start, t_quant, t_build
    )
    return Artifact(executable, manifest, by_name)


# x86 features whose absence makes code built for the target fault (SIGILL) on a CPU
_CHECKED_X86_FEATURES = (
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512vbmi",
    "avx512vnni",
)


def required_cpu_features(tgt, isa: str = "generic") -> list[str]:
    """The x86 SIMD features the target's ``mcpu`` enables and the int8 kernel of ``isa`` uses
    (checked by the runtime at load)."""
    from .cpu_features import ISA_FEATURES

    spec = tgt.to_dict()
    kernel = [f for f in ISA_FEATURES.get(isa, ()) if f in _CHECKED_X86_FEATURES]
    if spec.get("kind") != "llvm" or "mcpu" not in spec:
        return kernel
    from tvm.target import codegen

    try:
        feats = codegen.llvm_get_cpu_features(tgt.tvm_target())
    except Exception:  # non-x86 or an LLVM without the query: nothing to check
        return []
    names = {str(k) for k in feats} | set(kernel)
    return [f for f in _CHECKED_X86_FEATURES if f in names]


# logits of an artifact with int8-table CPU kernels vs torch running the same dequantized weights:
# every layer's activations enter through 8-bit tables (~7e-3 relative per layer)
INT8_LOGITS_RTOL = 3e-2


def logits_tolerance(manifest: dict, exact: float = 1e-3) -> float:
    """Relative L2 bound for ``verify_against_torch`` of this artifact: ``exact`` for float-table
    and CUDA kernels (float32 sums only), ``INT8_LOGITS_RTOL`` when int8-table kernels or the
    int16 GEMM (12-bit activations, ~4e-4 per layer) run."""
    kernels = manifest.get("rewrite", {}).get("kernels", {}).values()
    lossy = ("lut-int8", "int16-gemm")  # quantized activations
    return INT8_LOGITS_RTOL if any(k.get("kind") in lossy for k in kernels) else exact


def verify_against_torch(
    path: str | os.PathLike, artifact: Artifact, model, ids: np.ndarray
) -> float:
    """Relative L2 error of the exported artifact's logits against torch running the same
    dequantized weights, on ``ids`` (int64 [1, seq]): proof that the kernels compute what the
    quantizer meant."""
    from . import runtime

    rt = runtime.load(path)
    got = rt(ids)
    ref_model = artifact.apply_to(model)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.from_numpy(np.asarray(ids)), use_cache=False).logits.numpy()
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
