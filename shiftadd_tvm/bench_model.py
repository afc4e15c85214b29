"""``shiftadd-tvm bench model``: prefill and decode tokens/s of the compiled default model against
torch fp32 with its KV cache (Hugging Face ``generate``), timed in the same run.

Per thread count, one fresh worker process (``TVM_NUM_THREADS``, ``OMP_NUM_THREADS`` and
``torch.set_num_threads`` all set to it) loads the artifact and the float model and alternates
the two on the same prompt (real text), repeating and taking medians:

- ours: ``Runtime.prefill`` of the prompt (compiled step functions, KV cache in the module's
  inputs), then ``Runtime.decode`` one token at a time, greedy;
- torch: ``model.generate`` (greedy, its dynamic KV cache); prefill = ``generate`` of one new
  token, decode = (``generate`` of all new tokens - prefill) / (new tokens - 1).

Decode tokens/s counts the single-token steps (the first new token comes with the prefill). The
token agreement of the two greedy continuations and the perplexity of the artifact (its ``main``)
against the float model on the same windows are reported with the speeds.

Without ``--artifact`` the default model is compiled into the work folder; calibration statistics
and the weight fit are cached there (the fit takes minutes), so a rerun only rebuilds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """What the bench compiles when it is not given an artifact."""

    model: str = "smollm2"
    bits: int = 3
    group_size: int = 128
    terms: int | str = "auto"  # compile --terms (compile's default); 3 = every plane 3 terms
    head_bits: int | None = None
    max_context: int = 256
    steps: tuple[int, ...] = (1, 128)
    seq_len: int = 512
    head_storage: str = "float16"  # the dense head / tied embedding (compile --head-storage)
    rotate: bool = True  # rotated as compile() does by default (rotate.py)
    scale_window: int = 0  # compile --scale-window (0: free exponents)

    def fit_digest(self) -> str:
        keep = (self.model, self.bits, self.group_size, self.terms)
        if self.scale_window:  # (free-exponent fits keep their old file names)
            keep += (self.scale_window,)
        return hashlib.sha1(repr(keep).encode()).hexdigest()[:12] + self.rot_suffix()

    def rot_suffix(self) -> str:
        return "-rot" if self.rotate else ""

    def artifact_name(self) -> str:
        head = f"-h{self.head_bits}" if self.head_bits else f"-{self.head_storage}head"
        steps = "-".join(str(t) for t in self.steps)
        sw = f"-sw{self.scale_window}" if self.scale_window else ""
        # builds with 3 terms on every plane keep their old names
        terms = "" if self.terms == 3 else f"-terms{str(self.terms).replace(',', '.')}"
        return (
            f"{self.model}-b{self.bits}{head}{sw}{terms}-ctx{self.max_context}-t{steps}"
            f"{self.rot_suffix()}.so"
        )


def default_work_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "bench-model"


def build_artifact(spec: BuildSpec, work: Path, progress: bool = True) -> Path:
    """Compile ``spec`` into ``work`` (reused when it exists); calibration statistics and the
    weight fit are cached beside it."""
    from . import compiler
    from .models import load_model
    from .quant import QuantConfig, terms_kwargs
    from .report import _load_fits, _save_fits
    from .targets import resolve_target

    work.mkdir(parents=True, exist_ok=True)
    out = work / spec.artifact_name()
    if out.is_file():
        log.info("reusing %s (delete it to rebuild)", out)
        return out
    t_start = time.time()
    model, tok = load_model(spec.model)
    how = None
    if spec.rotate:
        from . import rotate

        how = rotate.plan(model, True)
        rotate.apply(model, how)
    tgt = resolve_target("llvm")
    stats = work / f"calib-{spec.model}{spec.rot_suffix()}.npz"
    have_stats = stats.is_file()
    calib = compiler.CalibrationSpec()
    if have_stats and spec.head_bits:
        _add_head_stats(stats, model, tok, calib, progress)
    dec = compiler._decode_request(model, tgt, True, spec.max_context, spec.steps)
    imp = compiler.import_torch(
        model,
        tok,
        spec.seq_len,
        "stats-file" if have_stats else calib,
        None,
        progress,
        full=True,
        decode=dec,
        head_bits=spec.head_bits,
        fused_attention=True,
    )
    if have_stats:
        compiler._load_stats(imp, stats)
    else:
        compiler._save_stats(imp, stats)
    imp.calib_info = {"source": "text", **dataclasses.asdict(calib), "stats_file": str(stats)}
    imp.info["model"] = spec.model
    if how is not None:
        imp.info["rotation"] = how
    qcfg = QuantConfig(
        bits=spec.bits,
        group_size=spec.group_size,
        **terms_kwargs(spec.terms),
        scale_window=spec.scale_window,
    )
    head = {k: c for k, c in imp.candidates.items() if c[0] in imp.bits_by_name}
    unique: dict[str, str] = {}
    for key, (name, _) in imp.candidates.items():
        unique.setdefault(name, key)
    todo = {k: imp.candidates[k] for k in unique.values() if k not in head}
    fit_path = work / f"fit-{spec.fit_digest()}.npz"
    if fit_path.is_file():
        fitted = _load_fits(fit_path, qcfg)
        log.info("weight fit read from %s", fit_path)
    else:
        fitted = compiler.quantize_candidates(todo, qcfg, imp.energy, progress)
        _save_fits(fit_path, fitted)
    for key, (name, w) in head.items():  # the output head at its own width, cached apart
        hcfg = dataclasses.replace(qcfg, bits=imp.bits_by_name[name])
        head_path = work / f"fit-head-b{hcfg.bits}-{spec.fit_digest()}.npz"
        if head_path.is_file():
            fitted.update(_load_fits(head_path, hcfg))
        else:
            one = compiler.quantize_candidates({key: (name, w)}, hcfg, imp.energy, progress)
            _save_fits(head_path, one)
            fitted.update(one)
    art = compiler.build_imported(
        imp, qcfg, tgt, False, progress, t_start, fitted=fitted, head_storage=spec.head_storage
    )
    art.manifest["tokenizer"] = spec.model
    return art.export(out)


HEAD_STATS_WINDOWS = 8  # 4k tokens for one 576 x 576 Hessian (a full pass per window is slow)


def _add_head_stats(stats: Path, model, tok, calib, progress: bool) -> None:
    """Add the output head's input statistics to a statistics file made without them (the first
    ``HEAD_STATS_WINDOWS`` calibration windows; the file is keyed by weight content, so it serves
    both builds). ``compile --head-bits`` calibrates the head on all windows instead."""
    from ._files import atomic_path
    from .calibrate import activation_stats
    from .compiler import _weight_digest
    from .text import token_ids

    head = model.get_output_embeddings()
    digest = _weight_digest(head.weight.detach().numpy())
    with np.load(stats) as z:
        arrays = {k: z[k] for k in z.files}
    if digest in arrays:
        return
    n = min(calib.windows, HEAD_STATS_WINDOWS)  # the first n of the same windows
    ids = token_ids(tok, calib.text, calib.start, n * calib.window)
    windows = ids[: n * calib.window].reshape(n, calib.window)
    got = activation_stats(model, windows, {"lm_head": head}, progress, full=True)
    arrays[digest] = got["lm_head"].numpy().astype(np.float32)
    with atomic_path(stats, suffix=".tmp.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    log.info("added the output head's statistics to %s", stats)


# -- the worker: one thread count, one process ---------------------------------------------


def _agreement(a: np.ndarray, b: np.ndarray) -> dict:
    n = min(len(a), len(b))
    same = a[:n] == b[:n]
    first = int(np.argmin(same)) if not same.all() else n
    return {"equal_fraction": float(same.mean()), "first_difference": first, "compared": n}


def time_generate(rt, prompt: np.ndarray, new: int) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, decode seconds, tokens) of greedy generation of ``new`` tokens after
    ``prompt`` with a loaded artifact ``rt`` (cache reset first, counted in the prefill)."""
    t0 = time.perf_counter()
    rt.reset()
    logits = rt.prefill(prompt)
    t1 = time.perf_counter()
    out = [int(np.argmax(logits))]
    for _ in range(new - 1):
        out.append(int(np.argmax(rt.decode(out[-1]))))
    return t1 - t0, time.perf_counter() - t1, np.asarray(out)


def _worker(cfg: dict) -> dict:
    """Time ours and torch alternately in this process (threads already set in the env)."""
    import torch

    from . import runtime
    from .models import load_model
    from .text import token_ids

    threads = int(cfg["threads"])
    torch.set_num_threads(threads)
    rt = runtime.load(cfg["artifact"])
    model, tok = load_model(rt.manifest.get("tokenizer") or rt.manifest["model"])
    model.eval()
    prompt = np.asarray(token_ids(tok, cfg["text"], cfg["start"], cfg["prompt_tokens"]))
    new = int(cfg["new_tokens"])
    if prompt.size + new - 1 > rt.max_context:
        raise ConfigError(
            f"{prompt.size} prompt + {new} new tokens need a KV cache of {prompt.size + new - 1}; "
            f"the artifact holds {rt.max_context}: recompile with --max-context "
            f"{prompt.size + new - 1} or more"
        )
    ids_t = torch.from_numpy(prompt[None].astype(np.int64))
    mask = torch.ones_like(ids_t)
    eos = tok.eos_token_id if tok is not None else None

    def ours():
        return time_generate(rt, prompt, new)

    @torch.no_grad()
    def hf(n):
        t0 = time.perf_counter()
        g = model.generate(
            ids_t,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=eos,
        )
        return time.perf_counter() - t0, g[0, prompt.size :].numpy()

    ours()  # warm-up: first-call allocations, page faults of the weights
    hf(2)
    rows = {"ours_prefill": [], "ours_decode": [], "torch_prefill": [], "torch_total": []}
    ours_tokens = torch_tokens = None
    for r in range(int(cfg["repeats"])):
        order = ("ours", "torch") if r % 2 == 0 else ("torch", "ours")
        for who in order:
            if who == "ours":
                p, d, ours_tokens = ours()
                rows["ours_prefill"].append(p)
                rows["ours_decode"].append(d)
            else:
                rows["torch_prefill"].append(hf(1)[0])
                total, torch_tokens = hf(new)
                rows["torch_total"].append(total)
    med = {k: statistics.median(v) for k, v in rows.items()}
    torch_decode = max(med["torch_total"] - med["torch_prefill"], 1e-9)
    res = {
        "threads": threads,
        "prompt_tokens": int(prompt.size),
        "new_tokens": new,
        "ours_prefill_tok_s": prompt.size / med["ours_prefill"],
        "ours_decode_tok_s": (new - 1) / med["ours_decode"],
        "torch_prefill_tok_s": prompt.size / med["torch_prefill"],
        "torch_decode_tok_s": (new - 1) / torch_decode,
        "raw_s": rows,
        "agreement": _agreement(ours_tokens, torch_tokens),
    }
    res["decode_speedup"] = res["ours_decode_tok_s"] / res["torch_decode_tok_s"]
    res["prefill_speedup"] = res["ours_prefill_tok_s"] / res["torch_prefill_tok_s"]
    return res


def _run_worker(cfg: dict, threads: int) -> dict:
    env = dict(os.environ)
    env.update(
        TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads)
    )
    cmd = [sys.executable, "-m", "shiftadd_tvm.bench_model", "--worker", json.dumps(cfg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker ({threads} threads) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    from ._files import write_text_atomic

    if args.artifact:
        artifact = Path(args.artifact)
    else:
        from .quant import terms_kwargs

        terms_kwargs(args.terms)  # a bad --terms fails here, not after the calibration
        spec = BuildSpec(
            bits=args.bits,
            head_bits=args.head_bits,
            max_context=args.max_context,
            head_storage=args.head_storage,
            rotate=not args.no_rotate,
            scale_window=args.scale_window,
            terms=int(args.terms) if args.terms.strip().isdigit() else args.terms.strip(),
        )
        artifact = build_artifact(spec, Path(args.work))
    cfg = {
        "artifact": str(artifact),
        "text": args.text,
        "start": args.start,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
    }
    results = []
    for threads in args.threads:
        log.info("timing with %d thread(s)", threads)
        results.append(_run_worker({**cfg, "threads": threads}, threads))
    from . import runtime

    man = runtime.read_manifest(artifact, verify=False)
    out = {
        "artifact": str(artifact),
        "artifact_bytes": artifact.stat().st_size,
        "kernels": sorted(man.get("rewrite", {}).get("kernels", {})),
        "head_storage": man.get("head_storage"),
        "decode": man.get("decode"),
        "text": args.text,
        "threads_env": "TVM_NUM_THREADS = OMP_NUM_THREADS = torch.set_num_threads = threads",
        "results": results,
    }
    if args.ppl_tokens:
        from .evaluate import evaluate_artifact

        ev = evaluate_artifact(artifact, args.text, args.ppl_tokens, args.ppl_window)
        out["perplexity"] = {
            k: ev[k] for k in ("artifact_ppl", "float_ppl", "ratio", "tokens", "window", "text")
        }
    if args.json:
        write_text_atomic(args.json, json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out


def print_table(out: dict) -> None:
    hs = f", head {out['head_storage']}" if out.get("head_storage") else ""
    print(f"artifact {out['artifact']} ({out['artifact_bytes'] / 1e6:.1f} MB{hs})")
    print(
        f"{'threads':>7s} {'prefill tok/s':>14s} {'torch':>8s} {'x':>6s} "
        f"{'decode tok/s':>13s} {'torch':>8s} {'x':>6s} {'same tokens':>12s}"
    )
    for r in out["results"]:
        a = r["agreement"]
        print(
            f"{r['threads']:7d} {r['ours_prefill_tok_s']:14.1f} {r['torch_prefill_tok_s']:8.1f} "
            f"{r['prefill_speedup']:6.2f} {r['ours_decode_tok_s']:13.1f} "
            f"{r['torch_decode_tok_s']:8.1f} {r['decode_speedup']:6.2f} "
            f"{a['equal_fraction']:6.1%} (first diff {a['first_difference']})"
        )
    if "perplexity" in out:
        p = out["perplexity"]
        print(
            f"perplexity ({p['text']}, {p['tokens']} tokens): artifact {p['artifact_ppl']:.3f}, "
            f"float {p['float_ppl']:.3f}, ratio {p['ratio']:.3f}"
        )


def add_parser(sub) -> None:
    from .schedules.dense_gemm import WEIGHT_DTYPES

    p = sub.add_parser(
        "model",
        help="prefill/decode tokens/s of the compiled default model vs torch fp32 + KV cache",
        description=" ".join(__doc__.replace("``", "").split("\n\n")[0:2]),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifact", help="artifact with KV-cache step functions (default: compile)")
    p.add_argument("--work", default=str(default_work_dir()), help="folder of cached builds")
    p.add_argument("--bits", type=int, default=3, help="bit-planes per weight (when compiling)")
    p.add_argument(
        "--head-bits",
        type=int,
        help="also reparameterize the output head to this many bit-planes (when compiling)",
    )
    p.add_argument(
        "--head-storage",
        choices=WEIGHT_DTYPES,
        default="float16",
        help="storage of the dense output head and tied embedding (when compiling; see "
        "`compile --help`)",
    )
    p.add_argument(
        "--no-rotate",
        action="store_true",
        help="compile the unrotated model (default: rotated as compile does; when compiling)",
    )
    p.add_argument("--max-context", type=int, default=256, help="KV cache tokens (when compiling)")
    p.add_argument(
        "--terms",
        default="auto",
        help="power-of-two terms per scale, as compile --terms (when compiling): 'auto' (compile's "
        "default: per-width counts, 3,2,2 at 3 bits), one count for every plane (3 = the builds "
        "before session 19), or per-plane counts",
    )
    p.add_argument(
        "--scale-window",
        type=int,
        default=0,
        help="8: fit each (row, group)'s scale terms within 8 exponents so the shared-exponent "
        "kernels (AVX-512 VBMI, AVX-512 BW + VNNI) run every layer (compile --scale-window; when "
        "compiling). 0: free exponents",
    )
    p.add_argument("--text", default="wiki", help="prompt / perplexity text: wiki, lee or a file")
    p.add_argument("--start", type=int, default=0, help="first token of the prompt in the text")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to generate")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (median)")
    p.add_argument(
        "--ppl-tokens", type=int, default=2048, help="perplexity tokens (0: skip perplexity)"
    )
    p.add_argument("--ppl-window", type=int, default=512, help="perplexity window")
    p.add_argument("--json", help="write the results here (atomically)")
    p.set_defaults(func=cmd_bench_model)


def cmd_bench_model(args) -> int:
    out = run(args)
    print_table(out)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit("usage: shiftadd-tvm bench model ...")
