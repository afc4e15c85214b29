"""Command line: ``shiftadd-tvm compile`` and ``shiftadd-tvm eval``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from . import defaults
from .errors import ShiftAddError

log = logging.getLogger("shiftadd_tvm")


def _add_compile(sub) -> None:
    from .schedules.dense_gemm import WEIGHT_DTYPES

    p = sub.add_parser(
        "compile",
        help="reparameterize a model and export a multiplication-free .so",
        description="Calibrate on real text, fit binary planes with power-of-two scales to every "
        "Linear of the transformer blocks, import the model into TVM Relax, rewrite those matmuls "
        "into LUT kernels, build for the target and export one .so (library + manifest).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (the default model), a Hugging Face folder, a .gguf file or a .onnx file",
    )
    p.add_argument(
        "--tokenizer",
        help="tokenizer for the calibration text of an ONNX model: 'smollm2', a HF folder or a "
        ".gguf (default: the model's own)",
    )
    p.add_argument(
        "--allow-dense-fallback",
        action="store_true",
        help="keep weight matmuls that cannot be rewritten (dynamic shapes, non-float "
        "activations) dense instead of failing; they are counted in the report",
    )
    p.add_argument(
        "--bits",
        default="3",
        help="bit-planes per weight: a width (1-4) for every layer, or an average budget such as "
        "2.5 or 3.5: each layer is fitted at 2, 3 and 4 bits, its output error measured, and the "
        "widths chosen to minimize the total error within the budget (the report lists them)",
    )
    p.add_argument(
        "--method",
        choices=["gptq", "bcq"],
        default="gptq",
        help="fit: 'gptq' = output objective (GPTQ column loop with act-order and error feedback, "
        "BCQ codes inside, scales refitted to the output error); 'bcq' = activation-weighted BCQ "
        "of the weights alone",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="columns sharing one scale per row (power of two >= 8); a ragged tail group is padded",
    )
    p.add_argument(
        "--terms",
        default="auto",
        help="signed powers of two per scale (1 = a pure shift): 'auto' = per width 3,3 at 2 "
        "bits, 3,2,2 at 3 bits, 4,3,2,2 at 4 bits (most significant plane first; each layer of a "
        "budget allocation gets those of its width); or one count for every bit-plane (3); or "
        "per-plane counts, the last repeated for wider layers (4,3,3,2). Fewer terms: a faster "
        "kernel epilogue and fewer scale bytes",
    )
    p.add_argument(
        "--scale-window",
        type=int,
        default=0,
        help="0 = each power-of-two term free; 8 = the terms of one row's group, over all its "
        "bit-planes, within 8 consecutive exponents, so the AVX-512 int8 kernels (VBMI, or BW + "
        "VNNI) apply them as byte weights in their lookup loop plus one shift per group (other "
        "kernels: unchanged). Costs 0.03-0.8%% layer error at 2-4 bits on SmolLM2",
    )
    p.add_argument("--iters", type=int, default=15, help="alternating refinement rounds of the fit")
    p.add_argument(
        "--sweeps",
        type=int,
        default=defaults.SWEEPS,
        help="gptq: coordinate-descent passes over the codes against the full output error after "
        "the column loop, each followed by a scale refit (0 = plain GPTQ loop)",
    )
    p.add_argument(
        "--tune-epochs",
        type=int,
        default=defaults.TUNE_EPOCHS,
        help="end-to-end scale tuning after the fit: epochs over the calibration windows, every "
        "scale adjusted (codes fixed, power-of-two rounding in the loop) to match the float "
        "model's next-token distributions; 0 = off (torch models with calibration text only)",
    )
    p.add_argument(
        "--tune-windows",
        type=int,
        default=defaults.TUNE_WINDOWS,
        help="calibration windows the scale tuning trains on (2 more judge the result)",
    )
    p.add_argument(
        "--tune-lr",
        type=float,
        default=defaults.TUNE_LR,
        help="scale tuning step: root-mean-square change of the log-scales per step (normalized "
        "momentum descent; larger steps were measured to hurt at 4 bits), for fits whose "
        "held-out KL to the float model is at most --tune-kl-ref",
    )
    p.add_argument(
        "--tune-kl-ref",
        type=float,
        default=defaults.TUNE_KL_REF,
        help="farther from float, larger steps: the step is tune-lr * sqrt(KL / tune-kl-ref) when "
        "the fit's held-out KL exceeds this (measured: 2 bits gain from ~3x the step); 0 = always "
        "tune-lr",
    )
    p.add_argument(
        "--target",
        default="llvm",
        help="'llvm' (this CPU), 'cuda' (NVIDIA sm_90; kernels compiled here with nvcc) or a TVM "
        'target JSON dict, e.g. \'{"kind": "llvm", "mcpu": "znver4"}\' or '
        '\'{"kind": "cuda", "arch": "sm_80"}\'',
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=512,
        help="tokens per call the artifact is compiled for (shorter inputs are padded)",
    )
    p.add_argument(
        "--calib-text", default="wiki", help="calibration text: 'wiki', 'lee' or a UTF-8 file"
    )
    p.add_argument(
        "--calib-start",
        type=int,
        default=200_000,
        help="first calibration token (keep it clear of the evaluation windows)",
    )
    p.add_argument(
        "--calib-windows",
        type=int,
        default=defaults.CALIB_WINDOWS,
        help="calibration windows of 512 tokens (the GPTQ fit needs thousands of tokens; more "
        "lowers perplexity, e.g. 64 with --tune-windows 62, at ~5 more minutes on 2 cores)",
    )
    p.add_argument(
        "--calib-stats",
        help="activation statistics file (.npz): read instead of calibrating if it exists, "
        "written after calibrating if not (share it between the torch and ONNX paths)",
    )
    p.add_argument(
        "--no-calib",
        action="store_true",
        help="fit without activation statistics (much worse accuracy)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the check of the artifact's logits against torch with the same dequantized weights",
    )
    p.add_argument(
        "--head-bits",
        type=int,
        help="also reparameterize the output head (kept dense float by default) to this many "
        "bit-planes: the head is the largest matmul of a small model's decode step",
    )
    p.add_argument(
        "--head-storage",
        choices=WEIGHT_DTYPES,
        default="float16",
        help="storage of the dense output head (and of the embedding table when tied to it): "
        "float16 (rounded once; float32 products and sums; half the bytes each decode step "
        "streams for the head) or float32 (CPU targets; recorded in the manifest)",
    )
    p.add_argument(
        "--tables",
        choices=defaults.TABLES,
        default="auto",
        help="activation tables of the CPU LUT kernel: auto (int8 tables where the target has "
        "AVX-512 VBMI+VNNI, AVX-512 BW, AVX2 or NEON, the fastest; float tables elsewhere; on "
        "AVX-512 BW targets with VNNI, prefill-sized matmuls run the int16 GEMM instead), int8 "
        "(the int8-table kernel at every batch size, no int16 GEMM) or float (the float-table "
        "kernel everywhere: exact activations, slower; at 4 bits the int8 tables cost SmolLM2 "
        "0.1-0.5%% perplexity)",
    )
    p.add_argument(
        "--max-context",
        type=int,
        help="tokens the KV cache of the decode functions holds (prompt + generated; default "
        "--seq-len); each decode step reads the whole cache",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        nargs="+",
        default=[1, 128],
        help="token counts of the compiled KV-cache step functions (1 = decode; larger ones "
        "prefill prompts in chunks)",
    )
    p.add_argument(
        "--no-decode",
        action="store_true",
        help="compile only main (no KV-cache step functions; they are added by default for "
        "LLaMA-family models on CPU targets)",
    )
    p.add_argument(
        "--rotate",
        choices=("auto", "on", "off"),
        default="auto",
        help="rotate the model before calibration (an orthogonal residual stream folded into the "
        "weights plus an add/subtract Hadamard transform before each MLP down projection; the "
        "same float function with weights that are easier to quantize). auto: on for "
        "LLaMA-family torch models fitted with --method gptq and calibration text, logged "
        "otherwise; on: an unsupported model is an error; off: never",
    )
    p.add_argument("--output", "-o", required=True, help="artifact path (.so); written atomically")
    p.add_argument(
        "--report", help="also write the compile report (manifest + verification) as JSON here"
    )


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of the float model and of an artifact on the same text windows",
        description="Runs the artifact through the minimal runtime and the float model through "
        "torch on the same non-overlapping windows of real text; prints both perplexities, their "
        "ratio, the artifact size against the float weights and one forward pass time each.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifact", required=True, help="artifact written by `shiftadd-tvm compile`")
    p.add_argument(
        "--text",
        default="wiki",
        help="'wiki' (Wikipedia excerpt), 'lee' (Lee news) or a UTF-8 file",
    )
    p.add_argument(
        "--tokens", type=int, default=2048, help="evaluate on the first N tokens of the text"
    )
    p.add_argument(
        "--window", type=int, default=512, help="tokens per window (<= the artifact's --seq-len)"
    )
    p.add_argument("--no-float", action="store_true", help="skip the float model")
    p.add_argument("--json", help="write the results as JSON here (atomically)")


def cmd_compile(args) -> int:
    import numpy as np

    from .compiler import CalibrationSpec, compile, logits_tolerance, verify_against_torch
    from .errors import ConfigError
    from .finetune import ScaleTuning
    from .models import load_model
    from .text import token_ids

    is_onnx = args.model.lower().endswith(".onnx")
    model, tok = (None, None) if is_onnx else load_model(args.model)
    if args.tokenizer:
        tok = load_model(args.tokenizer)[1]
    if is_onnx and tok is None and not args.no_calib:
        raise ConfigError(
            "an ONNX model carries no tokenizer: pass --tokenizer (e.g. --tokenizer smollm2) for "
            "the calibration text, or --no-calib"
        )
    calib = (
        None
        if args.no_calib
        else CalibrationSpec(args.calib_text, args.calib_start, args.calib_windows)
    )
    art = compile(
        args.model if is_onnx else model,
        target=args.target,
        bits=args.bits,
        group_size=args.group_size,
        terms=args.terms,
        tokenizer=tok,
        seq_len=args.seq_len,
        iters=args.iters,
        calibration=calib,
        allow_dense_fallback=args.allow_dense_fallback,
        calib_stats=args.calib_stats,
        method=args.method,
        head_bits=args.head_bits,
        decode=False if args.no_decode else None,
        max_context=args.max_context,
        decode_steps=tuple(args.decode_steps),
        sweeps=args.sweeps,
        scale_tuning=ScaleTuning(
            epochs=args.tune_epochs,
            windows=args.tune_windows,
            lr=args.tune_lr,
            kl_ref=args.tune_kl_ref,
        ),
        head_storage=args.head_storage,
        rotate={"auto": None, "on": True, "off": False}[args.rotate],
        tables=args.tables,
        scale_window=args.scale_window,
    )
    art.manifest["model"] = args.model
    art.manifest["tokenizer"] = args.tokenizer or (None if is_onnx else args.model)
    path = art.export(args.output)
    report = dict(art.manifest)
    on_gpu_target = art.manifest["target"]["kind"] == "cuda"
    if on_gpu_target and not args.no_verify and not Path("/dev/nvidiactl").exists():
        log.warning(
            "not verifying: the artifact targets CUDA and this machine has no GPU; run "
            "`bash scripts/gpu_check.sh` on a GPU machine (it checks and times the CUDA kernels)"
        )
    elif not args.no_verify and not is_onnx:
        ids = token_ids(tok, "wiki", 0, args.seq_len)[None]
        err = verify_against_torch(path, art, model, np.asarray(ids))
        report["verify"] = {
            "text": "wiki",
            "tokens": int(ids.shape[1]),
            "rel_err_vs_dequantized_torch": err,
        }
        log.info("artifact logits vs torch with the same dequantized weights: rel err %.2e", err)
        tol = logits_tolerance(art.manifest)
        report["verify"]["tolerance"] = tol
        if err > tol:
            log.error("verification failed: rel err %.2e > %.0e", err, tol)
    if args.report:
        from ._files import write_text_atomic

        write_text_atomic(args.report, json.dumps(report, indent=2, sort_keys=True) + "\n")
    size = path.stat().st_size
    print(
        f"wrote {path}: {size / 1e6:.1f} MB ({size / art.manifest['float_weight_bytes']:.1%} of the "
        f"float weights); {art.manifest['rewrite']['summary']}; "
        f"{art.manifest['bits_per_weight']} bits/weight in the rewritten layers"
    )
    verified = report.get("verify", {})
    return (
        0
        if verified.get("rel_err_vs_dequantized_torch", 0.0) <= verified.get("tolerance", 1)
        else 3
    )


def cmd_eval(args) -> int:
    from .evaluate import evaluate_artifact

    r = evaluate_artifact(
        args.artifact, args.text, args.tokens, args.window, args.json, float_model=not args.no_float
    )
    lines = [
        f"text {r['text']}: {r['tokens']} tokens in {r['windows']} windows of {r['window']}",
        f"artifact perplexity  {r['artifact_ppl']:.3f}   ({r['bits']} bits, {r['bits_per_weight']} bits/weight)",
    ]
    if "float_ppl" in r:
        lines += [
            f"float perplexity     {r['float_ppl']:.3f}",
            f"ratio                {r['ratio']:.3f}",
            f"forward pass         artifact {r['artifact_forward_s']:.2f} s, {r['float_runner']} "
            f"{r['float_forward_s']:.2f} s ({r['forward_speedup_vs_float']:.2f}x)",
        ]
    lines.append(
        f"size                 artifact {r['artifact_bytes'] / 1e6:.1f} MB vs float weights "
        f"{r['float_weight_bytes'] / 1e6:.1f} MB ({r['size_ratio']:.1%})"
    )
    print("\n".join(lines))
    return 0


def _add_export_onnx(sub) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="write a model to ONNX (for the ONNX path and comparisons)",
        description="Exports a Hugging Face causal LM to ONNX with torch's dynamo exporter "
        "(opset 18): one input input_ids[1, seq_len], one output logits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default="smollm2", help="'smollm2', a Hugging Face folder or a .gguf file"
    )
    p.add_argument(
        "--seq-len", type=int, default=512, help="static sequence length of the exported input"
    )
    p.add_argument("--output", "-o", required=True, help="ONNX file to write (atomically)")


def cmd_export_onnx(args) -> int:
    from .models import load_model
    from .onnx_path import export_onnx

    model, _ = load_model(args.model)
    path = export_onnx(model, args.output, args.seq_len)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _add_bundle(sub) -> None:
    p = sub.add_parser(
        "bundle",
        help="folder with artifacts + the TVM runtime libraries, to run without the compiler",
        description="Copy artifacts into a folder together with what running them needs and "
        "nothing else: libtvm_runtime.so (+ libtvm_runtime_cuda.so and libcudart.so.13 for CUDA "
        "artifacts), tvm_ffi built for the target machine's Python and this package's runtime "
        "(shiftadd_tvm.runtime). Run with PYTHONPATH=<folder>/python; the target needs numpy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("artifacts", nargs="+", help="artifact files (.so) from `shiftadd-tvm compile`")
    p.add_argument("--out", required=True, help="bundle folder to create or update")
    p.add_argument(
        "--python",
        help="Python version of the machine that runs the bundle, e.g. 3.12 (default: this one; "
        "another version downloads its tvm_ffi wheel from PyPI)",
    )


def cmd_bundle(args) -> int:
    from .gpu_check import make_bundle

    out = make_bundle(Path(args.out), [Path(a) for a in args.artifacts], args.python)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {size / 2**20:.1f} MiB; run with PYTHONPATH={out}/python")
    return 0


def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="tune the CPU LUT kernels of a model; records go to tuning_logs/ for compile()",
        description="Collect the distinct LUT kernel configurations of a model (shape, bits, "
        "group size, terms, M = --seq-len), search each one's schedule knobs (the default first, "
        "then a seeded sample of the knob grid), build candidates in parallel processes, time "
        "them here or through TVM RPC, and write the best records to "
        "tuning_logs/llvm_<cpu>_<cores>c.json (atomically, after every kernel: an interrupted run "
        "resumes where it stopped). compile() reads them. The int8-table kernels (AVX-512, "
        "AVX-512 BW, AVX2, NEON) and the float-table kernel have their own knobs and records "
        "(--kernel).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="smollm2", help="'smollm2', a HF folder or a .gguf file")
    p.add_argument("--target", default="llvm", help="'llvm' (this CPU) or an llvm target JSON dict")
    p.add_argument("--bits", type=int, nargs="+", default=[3], help="bit widths to tune for")
    p.add_argument("--group-size", type=int, default=128, help="columns per scale group")
    p.add_argument(
        "--terms",
        default="auto",
        help="power-of-two terms per scale, as compile --terms ('auto', one count, or per-plane "
        "counts such as 3,2)",
    )
    p.add_argument(
        "--scale-window",
        type=int,
        default=0,
        help="as compile --scale-window: 8 tunes the shared-exponent kernels a windowed fit gets "
        "(AVX-512 VBMI, or BW + VNNI; their knobs are separate records), 0 the per-term kernels",
    )
    p.add_argument("--seq-len", type=int, default=512, help="tokens per call (the kernels' M)")
    p.add_argument("--trials", type=int, default=16, help="candidates measured per kernel")
    p.add_argument(
        "--kernel",
        choices=["auto", "float", "int8"],
        default="auto",
        help="kernel family to tune: 'auto' = what compile() builds for the target (the int8-table "
        "kernel of its ISA, AVX-512 VBMI+VNNI / AVX-512 BW / AVX2 / NEON as LLVM enables them "
        "for the target's mcpu; the float-table kernel where the target has none, or for a "
        "configuration the int8 kernel cannot run); 'float' = the float-table kernel (what "
        "targets without those ISAs get); 'int8' = the int8 kernel (an error where the target "
        "has none). "
        "Each family keeps its own records in the same log",
    )
    p.add_argument("--workers", type=int, default=2, help="parallel build processes")
    p.add_argument("--rpc", help="measure on an RPC server HOST:PORT (tvm.exec.rpc_server)")
    p.add_argument("--rpc-tracker", help="measure on a device from an RPC tracker HOST:PORT")
    p.add_argument("--rpc-key", help="device key to request from the tracker")
    p.add_argument("--retune", action="store_true", help="re-measure kernels that have records")
    p.add_argument("--json", help="also write the summary (default vs tuned per kernel) here")


def cmd_tune(args) -> int:
    from . import tuning
    from .models import load_model
    from .targets import resolve_target

    spec = resolve_target(args.target).to_dict()
    shared = False
    if args.scale_window:
        from .cpu_features import kernel_isa, shared_exp_target

        isa = kernel_isa(spec)
        shared = shared_exp_target(spec, isa)
        if not shared:
            log.warning(
                "--scale-window %d: this target's int8 kernel (%s) applies the terms one by one, "
                "so the per-term kernels are tuned",
                args.scale_window,
                isa,
            )
    model, _ = load_model(args.model)
    cfgs = tuning.model_configs(model, args.bits, args.group_size, args.terms, args.seq_len, shared)
    runner = tuning.Runner(args.rpc, args.rpc_tracker, args.rpc_key)
    summary = tuning.tune(
        cfgs, spec, args.trials, runner, args.workers, args.retune, kernel=args.kernel
    )
    print(
        f"{'kernel':45s} {'family':12s} {'default us':>11s} {'tuned us':>10s} {'speedup':>8s}  knobs"
    )
    for k in summary["kernels"]:
        print(
            f"{k['name']:45s} {k['kernel']:12s} {k['default_us']:11.0f} {k['us']:10.0f} "
            f"{k['default_us'] / k['us']:7.2f}x  {k['knobs']}"
        )
    print(f"tuned {len(summary['kernels'])} kernels in {summary['tuning_s']} s -> {summary['log']}")
    if args.json:
        from ._files import write_text_atomic

        write_text_atomic(args.json, json.dumps(summary, indent=2) + "\n")
    return 0


def _add_gpu_check(sub) -> None:
    sub.add_parser(
        "gpu-check",
        help="build/run the CUDA kernel check (see scripts/gpu_check.sh)",
        add_help=False,
    )


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks: 'bench kernel' (LUT kernel vs competitors), 'bench model' (decode)",
        description="Speed benchmarks that print a table and write JSON; competitors are timed "
        "in the same run (ratios are what to read on shared machines).",
    )
    bench = p.add_subparsers(dest="bench_command", required=True)
    from .bench_kernel import add_parser as _add_bench_kernel

    _add_bench_kernel(bench)
    from .bench_model import add_parser as _add_bench_model

    _add_bench_model(bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shiftadd-tvm",
        description="Compile pretrained transformers into multiplication-free TVM modules.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compile(sub)
    _add_eval(sub)
    _add_export_onnx(sub)
    _add_bundle(sub)
    _add_tune(sub)
    _add_gpu_check(sub)
    _add_bench(sub)
    from .report import add_parser as _add_report

    _add_report(sub)
    from .minilm import add_parser as _add_minilm_report

    _add_minilm_report(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu-check"]:  # its own parser: build | run (see shiftadd_tvm/gpu_check.py)
        from .gpu_check import main as gpu_check_main

        return gpu_check_main(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv[2:] if argv[:1] == ["bench"] else argv
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    t0 = time.time()
    try:
        from .report import cmd_report

        commands = {
            "compile": cmd_compile,
            "eval": cmd_eval,
            "export-onnx": cmd_export_onnx,
            "bundle": cmd_bundle,
            "tune": cmd_tune,
            "report": cmd_report,
            "bench": lambda a: a.func(a),
            "minilm-report": lambda a: a.func(a),
        }
        rc = commands[args.command](args)
    except ShiftAddError as e:
        log.error("%s", e)
        return 2
    log.info("%s finished in %.1fs", args.command, time.time() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
