"""Accuracy report: ours (compiled ``.so`` run by the minimal runtime) against baselines, one harness.

``shiftadd-tvm report`` (or ``python -m shiftadd_tvm.report``) calibrates once, fits every
reparameterized Linear at each width, and evaluates on the same windows of every text:

- ``ours``: GPTQ loop + binary coding with power-of-two scales (the compiler's default fit), at
  uniform widths and at average budgets (per-layer widths from ``allocate.py``); every ``ours`` row
  is compiled, exported to a ``.so`` and its perplexity measured by running that file through
  ``shiftadd_tvm.runtime``. Its torch simulation (same dequantized weights) is reported beside it
  as a check;
- baselines (``baselines.py``): RTN, uniform GPTQ with and without act-order, plain binary coding:
  fake-quantized weights evaluated in torch (they have no kernel in this project).

Writes ``results.json``, ``results.md`` and ``results.png`` (perplexity ratio against effective
bits per method and text; per-layer output error at each width and the widths each budget picked)
into the output folder. Intermediate results (calibration statistics, fits, one JSON per row) go to
a work folder so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

from . import defaults

log = logging.getLogger(__name__)

OURS = "ours"
SEQUENTIAL = "ours_sequential"
METHOD_LABELS = {
    OURS: "GPTQ loop + binary coding, power-of-two scales, output-error refit and coordinate "
    "descent, end-to-end scale tuning (.so via runtime)",
    "rtn": "RTN uniform (torch sim)",
    "gptq": "GPTQ uniform, act-order (torch sim)",
    "gptq_noact": "GPTQ uniform, no act-order (torch sim)",
    "bcq_plain": "plain BCQ, power-of-two scales (torch sim)",
    SEQUENTIAL: "ours fitted block by block on quantized-prefix inputs (torch sim; ablation)",
}


@dataclasses.dataclass(frozen=True)
class ReportSpec:
    model: str = "smollm2"
    texts: tuple[str, ...] = ("wiki", "lee")
    tokens: int = 4096
    window: int = 512
    bits: tuple[int, ...] = (2, 3, 4)
    budgets: tuple[float, ...] = (2.5, 3.0, 3.5)
    baselines: tuple[str, ...] = ("rtn", "gptq", "gptq_noact", "bcq_plain")
    group_size: int = 128
    terms: int = 3
    plane_terms: tuple[int, ...] = ()  # ours: per-plane term counts (quant.parse_terms)
    # ours: terms and plane_terms of each width from defaults.TERMS_AUTO (compile's default);
    # the baselines' plain BCQ keeps ``terms``
    auto_terms: bool = True
    scale_window: int = 0  # ours: quant.QuantConfig.scale_window
    iters: int = 15
    rounds: int = 1
    sweeps: int = defaults.SWEEPS
    tune_epochs: int = defaults.TUNE_EPOCHS
    # the report calibrates on twice the main job's text (defaults.REPORT_CALIB_WINDOWS): the
    # accuracy table is not bound by the main job's ~10 minutes
    tune_windows: int = defaults.REPORT_TUNE_WINDOWS
    tune_lr: float = defaults.TUNE_LR
    tune_kl_ref: float = defaults.TUNE_KL_REF
    head_storage: str = "float16"  # the dense output head (and the embedding tied to it)
    allocation_weight: str = "fisher"  # "fisher": errors weighted by loss gradients; "none"
    calib_text: str = "wiki"
    calib_start: int = 200_000
    calib_windows: int = defaults.REPORT_CALIB_WINDOWS
    target: str = "llvm"
    # ours rows: the model rotated as compile() does (rotate.py); the baselines never
    rotate: bool = True
    tables: str = "auto"  # ours rows: compile(tables=...), the CPU LUT kernel's tables

    def digest(self, *fields: str) -> str:
        d = dataclasses.asdict(self)
        # options left at their defaults stay out: fits cached before an option existed keep
        # their digest
        unset = {f for f in ("plane_terms", "scale_window") if not getattr(self, f)}
        fields = tuple(f for f in fields if f not in unset)
        blob = json.dumps({f: d[f] for f in fields} if fields else d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


_CALIB_FIELDS = ("model", "calib_text", "calib_start", "calib_windows", "window")
_FIT_FIELDS = (
    *_CALIB_FIELDS,
    *("group_size", "terms", "plane_terms", "scale_window", "iters", "rounds", "sweeps"),
)
_TUNE_FIELDS = ("tune_epochs", "tune_windows", "tune_lr", "tune_kl_ref", "head_storage")
# the baselines do not use ours' fit settings beyond these (rows cached before sweeps existed)
_BASELINE_FIELDS = (*_CALIB_FIELDS, "group_size", "terms", "iters", "rounds")
_EVAL_FIELDS = ("model", "texts", "tokens", "window")


def _check_disjoint(spec: ReportSpec) -> None:
    from .errors import ConfigError

    calib_end = spec.calib_start + spec.calib_windows * spec.window
    for text in spec.texts:
        if text == spec.calib_text and spec.calib_start < spec.tokens:
            raise ConfigError(
                f"calibration tokens [{spec.calib_start}, {calib_end}) of '{text}' overlap the "
                f"evaluation tokens [0, {spec.tokens}); move --calib-start past {spec.tokens}"
            )


def _save_json(path: Path, obj) -> None:
    from ._files import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _load_json(path: Path, digest: str):
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if obj.get("digest") == digest else None


def _save_fits(path: Path, fits: dict) -> None:
    import numpy as np

    from ._files import atomic_path

    arrays = {}
    for i, (key, r) in enumerate(fits.items()):
        arrays[f"k{i}"] = np.frombuffer(key.encode(), dtype=np.uint8)
        arrays[f"c{i}"] = np.packbits(r.codes.numpy(), axis=-1)
        arrays[f"s{i}"] = r.term_signs.numpy()
        arrays[f"e{i}"] = r.term_exps.numpy()
        arrays[f"shape{i}"] = np.asarray(r.codes.shape)
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _load_fits(path: Path, cfg) -> dict:
    import numpy as np
    import torch

    from .quant import BCQResult

    out = {}
    with np.load(path) as z:
        n = len([k for k in z.files if k.startswith("k")])
        for i in range(n):
            shape = tuple(int(s) for s in z[f"shape{i}"])
            codes = np.unpackbits(z[f"c{i}"], axis=-1, count=shape[-1]).astype(bool)
            out[bytes(z[f"k{i}"]).decode()] = BCQResult(
                codes=torch.from_numpy(codes),
                term_signs=torch.from_numpy(z[f"s{i}"]),
                term_exps=torch.from_numpy(z[f"e{i}"]),
                cfg=cfg,
            )
    return out


def _ppl_texts(logits_fn, windows: dict, desc: str, progress: bool) -> dict:
    from .evaluate import perplexity

    return {
        t: perplexity(logits_fn, w, desc=f"{desc} {t}", progress=progress)["ppl"]
        for t, w in windows.items()
    }


class _Harness:
    """The model, its calibration and fits for one set of rows. ``rotated``: the model rotated as
    ``compile`` does (``rotate.py``; our rows when ``spec.rotate``); its cached files carry a
    ``-rot`` suffix, since the statistics and fits of a rotated model are different numbers."""

    def __init__(self, spec: ReportSpec, work: Path, progress: bool, rotated: bool = False):
        from .calibrate import target_linears
        from .models import load_model
        from .text import token_ids

        self.spec, self.work, self.progress = spec, work, progress
        work.mkdir(parents=True, exist_ok=True)
        (work / "rows").mkdir(exist_ok=True)
        self.model, self.tok = load_model(spec.model)
        self.rotation = None
        if rotated:
            from . import rotate

            self.rotation = rotate.plan(self.model, True)
            rotate.apply(self.model, self.rotation)
        self.suffix = "-rot" if rotated else ""
        _check_disjoint(spec)
        self.windows = {
            t: token_ids(self.tok, t, 0, spec.tokens).reshape(-1, spec.window) for t in spec.texts
        }
        self.linears = target_linears(self.model)
        self._imp = None
        self._fits: dict[int, dict] = {}

    # -- calibration + import (once) -----------------------------------------------------
    @property
    def imp(self):
        if self._imp is None:
            from .compiler import CalibrationSpec, _load_stats, _save_stats, import_torch

            s = self.spec
            stats = self.work / f"calib-{s.digest(*_CALIB_FIELDS)}{self.suffix}.npz"
            calib = CalibrationSpec(s.calib_text, s.calib_start, s.calib_windows, s.window)
            have = stats.is_file()
            imp = import_torch(
                self.model,
                self.tok,
                s.window,
                "stats-file" if have else calib,
                None,
                self.progress,
                full=True,
            )
            if have:
                _load_stats(imp, stats)
            else:
                _save_stats(imp, stats)
            imp.calib_info = {"source": "text", **dataclasses.asdict(calib)}
            if self.rotation is not None:
                imp.info["rotation"] = self.rotation
            unique: dict[str, str] = {}
            for key, (name, _) in imp.candidates.items():
                unique.setdefault(name, key)
            self.unique = {k: imp.candidates[k] for k in unique.values()}  # key -> (name, W)
            self._imp = imp
        return self._imp

    def fits(self, bits: int) -> dict:
        """key -> BCQResult of our fit at ``bits`` (cached on disk)."""
        if bits not in self._fits:
            from .compiler import quantize_candidates

            imp, cfg = self.imp, self.qcfg(bits)
            digest = self.width_spec(bits).digest(*_FIT_FIELDS)
            path = self.work / f"fit-b{bits}-{digest}{self.suffix}.npz"
            if path.is_file():
                self._fits[bits] = _load_fits(path, cfg)
            else:
                t0 = time.time()
                self._fits[bits] = quantize_candidates(self.unique, cfg, imp.energy, self.progress)
                log.info(
                    "fitted %d layers at %d bits in %.0fs", len(self.unique), bits, time.time() - t0
                )
                _save_fits(path, self._fits[bits])
        return self._fits[bits]

    def width_spec(self, bits: int) -> ReportSpec:
        """The spec with ``auto_terms`` resolved for ``bits`` (what a fit at that width used:
        its cache digest, the same as a spec giving those terms explicitly)."""
        cfg = self.qcfg(bits)
        return dataclasses.replace(
            self.spec, terms=cfg.terms, plane_terms=cfg.plane_terms, auto_terms=False
        )

    def qcfg(self, bits: int):
        from .quant import QuantConfig

        s = self.spec
        return QuantConfig(
            bits=bits,
            group_size=s.group_size,
            terms=s.terms,
            plane_terms=s.plane_terms,
            auto_terms=s.auto_terms,
            scale_window=s.scale_window,
            iters=s.iters,
            rounds=s.rounds,
            sweeps=s.sweeps,
        )

    def layer_errors(self) -> dict:
        """key -> {bits: output error} for every width any ours row needs."""
        import numpy as np
        import torch

        from .allocate import CANDIDATE_WIDTHS, output_error

        imp = self.imp
        weights = self.fisher() if self.spec.allocation_weight == "fisher" else {}
        widths = sorted(
            set(self.spec.bits) | (set(CANDIDATE_WIDTHS) if self.spec.budgets else set())
        )
        return {
            key: {
                b: output_error(
                    torch.as_tensor(np.asarray(w)),
                    self.fits(b)[key].dequantize(),
                    imp.energy[key],
                    weights.get(key),
                )
                for b in widths
            }
            for key, (_, w) in self.unique.items()
        }

    def fisher(self) -> dict:
        """key -> loss sensitivity per output channel on the calibration windows (cached)."""
        import numpy as np
        import torch

        from .allocate import loss_sensitivity
        from .text import token_ids

        s = self.spec
        path = self.work / f"fisher-{s.digest(*_CALIB_FIELDS)}{self.suffix}.npz"
        names = {k: n for k, (n, _) in self.unique.items()}
        if path.is_file():
            with np.load(path) as z:
                return {k: torch.from_numpy(z[n]) for k, n in names.items()}
        ids = token_ids(self.tok, s.calib_text, s.calib_start, s.calib_windows * s.window)
        f = loss_sensitivity(self.model, ids.reshape(-1, s.window), self.unique, self.progress)
        from ._files import atomic_path

        with atomic_path(path, suffix=".tmp.npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **{names[k]: v.numpy() for k, v in f.items()})
        return f

    # -- rows --------------------------------------------------------------------------
    def float_ppl(self) -> dict:
        from .evaluate import torch_logits_fn

        path = self.work / "float.json"
        digest = self.spec.digest(*_EVAL_FIELDS)
        got = _load_json(path, digest)
        if got is None:
            ppl = _ppl_texts(torch_logits_fn(self.model), self.windows, "float", self.progress)
            got = {"digest": digest, "ppl": ppl}
            _save_json(path, got)
        return got["ppl"]

    def _with_weights(self, dense: dict, fn):
        """Run ``fn()`` with the Linears named in ``dense`` holding those weights; restore after."""
        import torch

        saved = {n: self.linears[n].weight.detach().clone() for n in dense}
        try:
            with torch.no_grad():
                for n, w in dense.items():
                    self.linears[n].weight.copy_(w.to(torch.float32))
            return fn()
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    self.linears[n].weight.copy_(w)

    def ours_row(self, bits: int | None, budget: float | None, errors: dict | None) -> dict:
        from . import runtime
        from .allocate import CANDIDATE_WIDTHS, allocate_for, allocation_report
        from .compiler import attach_tuner, build_imported
        from .evaluate import torch_logits_fn
        from .finetune import ScaleTuning
        from .targets import resolve_target
        from .text import token_ids

        s = self.spec
        # a budget row never shares its label (file name) with a uniform row: 3.0 is not 3
        label = f"{bits}" if budget is None else f"{budget:g}" if budget % 1 else f"{budget:.1f}"
        fields = (*_FIT_FIELDS, *_EVAL_FIELDS, *_TUNE_FIELDS, "target", "rotate")
        if budget is not None:
            fields += ("allocation_weight",)
        if s.tables != "auto":  # (rows cached before the option keep their digest)
            fields += ("tables",)
        if budget is None:  # one width: its resolved terms
            digest = self.width_spec(bits).digest(*fields) + f"-{OURS}-{label}"
        else:  # every width's own (auto) or the spec's terms
            fields += ("auto_terms",) if s.auto_terms else ()
            digest = s.digest(*fields) + f"-{OURS}-{label}"
        path = self.work / "rows" / f"{OURS}-{label}.json"
        got = _load_json(path, digest)
        if got is not None:
            return got
        imp = self.imp
        t0 = time.time()
        allocation = None
        if budget is None:
            fitted = self.fits(bits)
            qcfg = self.qcfg(bits)
        else:
            widths = [b for b in CANDIDATE_WIDTHS]
            alloc = allocate_for(
                self.unique,
                {k: {b: errors[k][b] for b in widths} for k in errors},
                self.qcfg(1),
                budget,
            )
            fitted = {k: self.fits(alloc.bits[k])[k] for k in self.unique}
            allocation = allocation_report(self.unique, errors, alloc, self.qcfg(1))
            allocation["error_weighting"] = s.allocation_weight
            qcfg = self.qcfg(min(4, max(2, round(budget))))
        tuning = ScaleTuning(
            epochs=s.tune_epochs, windows=s.tune_windows, lr=s.tune_lr, kl_ref=s.tune_kl_ref
        )
        if tuning.epochs and imp.tuner is None:
            ids = token_ids(self.tok, s.calib_text, s.calib_start, s.calib_windows * s.window)
            attach_tuner(imp, self.model, ids.reshape(-1, s.window))
        art = build_imported(
            imp,
            qcfg,
            resolve_target(s.target),
            False,
            self.progress,
            t0,
            budget=budget,
            fitted=fitted,
            allocation=allocation,
            tuning=tuning,
            head_storage=s.head_storage,
            tables=s.tables,
        )
        art.manifest["model"] = s.model
        art.manifest["tokenizer"] = s.model
        so = art.export(self.work / f"{OURS}-{label}.so")
        t_build = time.time() - t0
        rt = runtime.load(so)
        ppl = _ppl_texts(rt, self.windows, f"{OURS} {label} (.so)", self.progress)
        dense = {n: r.dequantize() for n, r in art.quantized.items()}
        sim = self._with_weights(
            dense,
            lambda: _ppl_texts(
                torch_logits_fn(self.model),
                self.windows,
                f"{OURS} {label} (torch sim)",
                self.progress,
            ),
        )
        layer_bits = {n: int(r.cfg.bits) for n, r in art.quantized.items()}
        row = {
            "digest": digest,
            "method": OURS,
            "label": label,
            "bits": bits if budget is None else budget,
            "budget": budget,
            "bits_per_weight": art.manifest["bits_per_weight"],
            "runner": "artifact .so via shiftadd_tvm.runtime",
            "ppl": ppl,
            "torch_sim_ppl": sim,
            "artifact": str(so),
            "artifact_bytes": so.stat().st_size,
            "build_s": round(t_build, 1),
            "layer_bits": layer_bits,
            "allocation": allocation,
            "scale_tuning": art.manifest.get("scale_tuning"),
        }
        _save_json(path, row)
        return row

    def baseline_row(self, method: str, bits: int) -> dict:
        import numpy as np
        import torch
        from tqdm import tqdm

        from .baselines import quantize_baseline

        s = self.spec
        fields = _FIT_FIELDS if method == SEQUENTIAL else _BASELINE_FIELDS
        digest = s.digest(*fields, *_EVAL_FIELDS) + f"-{method}-{bits}"
        path = self.work / "rows" / f"{method}-{bits}.json"
        got = _load_json(path, digest)
        if got is not None:
            return got
        if method == SEQUENTIAL:
            return self._sequential_row(bits, digest, path)
        imp = self.imp
        t0 = time.time()
        dense, bpw, count = {}, 0.0, 0
        for key, (name, w) in tqdm(
            self.unique.items(),
            desc=f"{method} {bits}-bit",
            unit="layer",
            disable=not self.progress,
        ):
            wt = torch.as_tensor(np.asarray(w))
            q, b = quantize_baseline(
                method, wt, imp.energy[key], bits, s.group_size, s.terms, s.iters
            )
            dense[name] = q
            bpw, count = bpw + b * wt.numel(), count + wt.numel()
        t_fit = time.time() - t0
        return self._torch_row(method, bits, dense, bpw / count, t_fit, digest, path)

    def _sequential_row(self, bits: int, digest: str, path: Path) -> dict:
        """Ours, fitted block by block on the outputs of the already-quantized blocks
        (``calibrate.sequential_fit``); evaluated in torch (an ablation of the calibration)."""
        from .calibrate import sequential_fit
        from .gptq import gptq_bcq
        from .text import token_ids

        s, cfg = self.spec, self.qcfg(bits)
        ids = token_ids(self.tok, s.calib_text, s.calib_start, s.calib_windows * s.window)
        t0 = time.time()

        def fit(name, w, h):
            r = gptq_bcq(w, h, cfg, name=name, rounds=cfg.rounds, sweeps=cfg.sweeps)
            return r, r.dequantize()

        res, _ = sequential_fit(
            self.model, ids.reshape(-1, s.window), self.linears, fit, self.progress
        )
        t_fit = time.time() - t0
        dense = {n: r.dequantize() for n, r in res.items()}
        return self._torch_row(SEQUENTIAL, bits, dense, cfg.bits_per_weight(), t_fit, digest, path)

    def _torch_row(self, method, bits, dense, bpw, t_fit, digest, path) -> dict:
        """Perplexity in torch with ``dense`` weights swapped in; the row, saved to ``path``."""
        from .evaluate import torch_logits_fn

        ppl = self._with_weights(
            dense,
            lambda: _ppl_texts(
                torch_logits_fn(self.model), self.windows, f"{method} {bits}", self.progress
            ),
        )
        row = {
            "digest": digest,
            "method": method,
            "label": str(bits),
            "bits": bits,
            "budget": None,
            "bits_per_weight": round(bpw, 4),
            "runner": "torch, fake-quantized weights",
            "ppl": ppl,
            "fit_s": round(t_fit, 1),
        }
        _save_json(path, row)
        return row


def run_report(spec: ReportSpec, out: str | Path, work: str | Path, progress: bool = True) -> dict:
    """Run (or resume) every row and write ``results.json``, ``results.md`` and ``results.png``."""
    import torch

    torch.manual_seed(0)
    out, work = Path(out), Path(work)
    h = _Harness(spec, work, progress)
    t0 = time.time()
    float_ppl = h.float_ppl()
    rows = []
    errors = None
    need_ours = bool(spec.bits or spec.budgets)
    ours = h
    if need_ours:
        if spec.rotate:
            ours = _Harness(spec, work, progress, rotated=True)
        errors = ours.layer_errors() if spec.budgets else None
        for b in spec.bits:
            rows.append(ours.ours_row(b, None, errors))
        for budget in spec.budgets:
            rows.append(ours.ours_row(None, budget, errors))
    for method in spec.baselines:
        for b in spec.bits:
            rows.append(h.baseline_row(method, b))
    for r in rows:
        r["ratio"] = {t: r["ppl"][t] / float_ppl[t] for t in spec.texts}
        if "torch_sim_ppl" in r:
            r["torch_sim_ratio"] = {t: r["torch_sim_ppl"][t] / float_ppl[t] for t in spec.texts}
    layers = None
    if errors is not None:
        names = {k: n for k, (n, _) in ours.unique.items()}
        layers = {
            names[k]: {
                "size": int(ours.unique[k][1].size),
                "output_error": {str(b): e for b, e in errs.items()},
                **{
                    f"bits@{r['label']}": r["layer_bits"][names[k]]
                    for r in rows
                    if r["method"] == OURS and r["budget"] is not None
                },
            }
            for k, errs in errors.items()
        }
    result = {
        "spec": dataclasses.asdict(spec),
        "calibration": {
            "text": spec.calib_text,
            "tokens": [spec.calib_start, spec.calib_start + spec.calib_windows * spec.window],
            "windows": spec.calib_windows,
            "window": spec.window,
        },
        "evaluation": {t: {"tokens": [0, spec.tokens], "window": spec.window} for t in spec.texts},
        "float_ppl": float_ppl,
        "rows": [{k: v for k, v in r.items() if k not in ("digest", "layer_bits")} for r in rows],
        "layers": layers,
        "seconds": round(time.time() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    _save_json(out / "results.json", result)
    from ._files import write_text_atomic

    write_text_atomic(out / "results.md", markdown(result))
    plot(result, out / "results.png")
    log.info("wrote %s, %s and %s", out / "results.json", out / "results.md", out / "results.png")
    return result


def _terms_title(spec: dict) -> str:
    window = spec.get("scale_window", 0)
    title = _terms_plan(spec)
    return f"{title}, each group's terms within {window} exponents" if window else title


def _terms_plan(spec: dict) -> str:
    if spec.get("auto_terms"):
        from . import defaults

        per = "; ".join(
            f"{b} bits {','.join(map(str, c))}" for b, c in defaults.TERMS_AUTO.items() if b > 1
        )
        return f"power-of-two terms per scale by plane, most significant first ({per})"
    if spec.get("plane_terms"):
        plan = ",".join(map(str, spec["plane_terms"]))
        return f"power-of-two terms per scale by plane, most significant first: {plan}"
    return f"{spec['terms']} power-of-two terms per scale"


def markdown(result: dict) -> str:
    spec = result["spec"]
    texts = spec["texts"]
    cal = result["calibration"]
    lines = [
        f"# Accuracy: {spec['model']}, group {spec['group_size']}, " + _terms_title(spec),
        "",
        f"Perplexity on the first {spec['tokens']} tokens of each text in windows of "
        f"{spec['window']}; ratio = method / float. Calibration: tokens {cal['tokens'][0]}-"
        f"{cal['tokens'][1]} of '{cal['text']}' ({cal['windows']} windows of {cal['window']}), "
        "disjoint from every evaluation window. `ours` rows: the exported .so run by "
        "shiftadd_tvm.runtime (torch simulation of the same weights in brackets); baselines: "
        "torch with fake-quantized weights. Bits/weight include scale storage (ours: one byte per "
        "power-of-two term; uniform: fp16 scale + fp16 offset per group).",
        "",
        "| method | bits | bits/weight | "
        + " | ".join(f"{t} ppl | {t} ratio" for t in texts)
        + " |",
        "|---|---|---|" + "---|---|" * len(texts),
        "| float | 32 | 32 | "
        + " | ".join(f"{result['float_ppl'][t]:.3f} | 1.000" for t in texts)
        + " |",
    ]
    for r in result["rows"]:
        cells = []
        for t in texts:
            sim = f" ({r['torch_sim_ratio'][t]:.3f})" if "torch_sim_ratio" in r else ""
            cells.append(f"{r['ppl'][t]:.3f} | {r['ratio'][t]:.3f}{sim}")
        bits = f"{r['bits']:g}" + (" (budget)" if r.get("budget") else "")
        lines.append(
            f"| {r['method']} | {bits} | {r['bits_per_weight']:.4g} | " + " | ".join(cells) + " |"
        )
    present = {r["method"] for r in result["rows"]}
    lines += ["", "Methods:", ""]
    lines += [f"- `{m}`: {d}" for m, d in METHOD_LABELS.items() if m in present]
    if OURS in present:
        rot = result["spec"].get("rotate")
        lines += [
            f"- `{OURS}` rows {'rotate' if rot else 'do not rotate'} the model first (`rotate.py`: "
            "orthogonal residual stream and value heads folded into the weights, an add/subtract "
            "Hadamard transform before each down projection; the float model is unchanged); the "
            "baselines quantize the unrotated weights."
        ]
        if result["spec"].get("tables", "auto") != "auto":
            lines += [f"- `{OURS}` rows run the float-table LUT kernel (`--tables float`)."]
    allocs = [r for r in result["rows"] if r.get("allocation")]
    if allocs:
        lines += [
            "",
            "Bit allocation: each layer fitted at 2, 3 and 4 bits, its output error "
            "sum_i F_i [(W-Q) H (W-Q)^T]_ii measured (F: loss-gradient Fisher of each output "
            "channel, or 1 when the weighting is 'none'), widths chosen by a knapsack on the "
            "storage (scale codes included; the budget in bit-planes is charged what its two "
            "neighbouring widths cost): exact DP where the costs share a coarse unit, else the "
            "Lagrangian relaxation (the solver of each row below):",
            "",
        ]
        for r in allocs:
            a = r["allocation"]
            lines.append(
                f"- budget {r['budget']:g}: average {a['average_bits']:.4f} bit-planes, "
                f"{a['bits_per_weight']:.4f} bits/weight; layers per width {a['histogram']} "
                f"(solver {a['solver']}, error weighting {a.get('error_weighting', 'none')})"
            )
    tuned = [r for r in result["rows"] if (r.get("scale_tuning") or {}).get("enabled")]
    if tuned:
        lines += [
            "",
            "Scale tuning (end to end, KL to the float model; kept only if the KL on 2 held-out "
            "calibration windows drops):",
            "",
        ]
        for r in tuned:
            t = r["scale_tuning"]
            step = f"step {t.get('lr_used', t['lr']):.3g}"
            if "lr_used" in t:  # rows since the step grows with the held-out KL
                step += f" from lr {t['lr']:g}, kl_ref {t['kl_ref']:g}"
            lines.append(
                f"- ours {r['label']}: held-out KL {t['held_out_kl_before']:.4f} -> "
                f"{t['held_out_kl_after']:.4f}, {'kept' if t['kept'] else 'dropped (fit kept)'} "
                f"({t['epochs']} epoch over {t['windows']} windows, {step}, {t['seconds']:.0f} s)"
            )
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path, ymax: float = 30.0) -> None:
    """Top: perplexity ratio against effective bits per method, one panel per text (ratios above
    ``ymax`` drawn at the top edge as open markers). Below, when the report has budget rows: each
    layer's (loss-weighted) output error at each width, and the widths each budget gave it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ._files import atomic_path

    texts = result["spec"]["texts"]
    layers = result.get("layers")
    nrows = 3 if layers else 1
    fig = plt.figure(figsize=(6.5 * len(texts), 4.6 * nrows))
    grid = fig.add_gridspec(nrows, len(texts))
    methods = []
    for r in result["rows"]:
        if r["method"] not in methods:
            methods.append(r["method"])
    for i, t in enumerate(texts):
        ax = fig.add_subplot(grid[0, i])
        for m in methods:
            rs = sorted(
                (r for r in result["rows"] if r["method"] == m), key=lambda r: r["bits_per_weight"]
            )
            xs = [r["bits_per_weight"] for r in rs]
            ys = [r["ratio"][t] for r in rs]
            (line,) = ax.plot(
                xs,
                [min(y, ymax) for y in ys],
                marker="o" if m == OURS else ".",
                lw=2.5 if m == OURS else 1.2,
                label=m,
            )
            off = [(x, ymax) for x, y in zip(xs, ys, strict=True) if y > ymax]
            if off:
                ax.scatter(
                    *zip(*off, strict=True), s=60, facecolors="none", edgecolors=line.get_color()
                )
            for r in rs:
                if m == OURS and r.get("budget"):
                    ax.annotate(
                        f"budget {r['budget']:g}",
                        (r["bits_per_weight"], r["ratio"][t]),
                        textcoords="offset points",
                        xytext=(4, 6),
                        fontsize=7,
                    )
        ax.set_yscale("log")
        ax.set_ylim(0.95, ymax * 1.05)
        ax.set_xlabel("bits per weight (incl. scales)")
        ax.set_ylabel("perplexity / float")
        ax.set_title(
            f"{t}: float ppl {result['float_ppl'][t]:.2f} (open markers: ratio > {ymax:g})"
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if layers:
        import re

        # by block, then name (the same order whether the dict came from memory or sorted JSON)
        def order(n):
            return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)]

        names = sorted(layers, key=order)
        x = list(range(len(names)))
        ax = fig.add_subplot(grid[1, :])
        widths = sorted({int(b) for v in layers.values() for b in v["output_error"]})
        for b in widths:
            ax.plot(
                x,
                [max(layers[n]["output_error"][str(b)], 1e-12) for n in names],
                lw=0.9,
                marker=".",
                ms=3,
                label=f"{b} bits",
            )
        ax.set_yscale("log")
        weighted = result["spec"].get("allocation_weight") == "fisher"
        ax.set_ylabel(
            "loss-weighted output error" if weighted else "output error tr((W-Q) H (W-Q)^T)"
        )
        ax.set_title("per layer (by block; within a block by name): error at each width")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(widths))
        ax = fig.add_subplot(grid[2, :], sharex=ax)
        keys = sorted({k for v in layers.values() for k in v if k.startswith("bits@")})
        for j, k in enumerate(keys):
            off = (j - (len(keys) - 1) / 2) * 0.12
            ax.scatter(
                x, [layers[n][k] + off for n in names], s=8, label=k.replace("bits@", "budget ")
            )
        ax.set_yticks(widths)
        ax.set_ylabel("allocated bits")
        ax.set_xlabel("layer: block 0..29, within each block down, gate, k, o, q, up, v")
        ax.set_title("per layer: widths chosen by each budget")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(keys))
    fig.tight_layout()
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(x) for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x.strip())


def _strs(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def add_parser(sub) -> None:
    from .schedules.dense_gemm import WEIGHT_DTYPES

    d = ReportSpec()
    p = sub.add_parser(
        "report",
        help="accuracy table: ours (.so via the runtime) vs RTN / GPTQ / plain BCQ, JSON + MD + PNG",
        description="Calibrates once, fits every Linear at each width, and evaluates on the same "
        "windows of each text: ours (compiled .so run by the runtime; uniform widths and average "
        "budgets) and baselines (RTN, uniform GPTQ with/without act-order, plain BCQ; torch with "
        "fake-quantized weights). Writes results.json, results.md and results.png; intermediate "
        "results in --work let an interrupted run resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=d.model, help="'smollm2', a Hugging Face folder or a .gguf")
    p.add_argument("--texts", type=_strs, default=d.texts, help="evaluation texts, comma separated")
    p.add_argument("--tokens", type=int, default=d.tokens, help="first N tokens of each text")
    p.add_argument("--window", type=int, default=d.window, help="tokens per window (and seq-len)")
    p.add_argument("--bits", type=_ints, default=d.bits, help="uniform widths, comma separated")
    p.add_argument(
        "--budgets", type=_floats, default=d.budgets, help="average bit budgets for ours"
    )
    p.add_argument(
        "--baselines",
        type=_strs,
        default=d.baselines,
        help=f"baseline methods ('' = none): {', '.join(METHOD_LABELS)} minus {OURS}",
    )
    p.add_argument("--group-size", type=int, default=d.group_size)
    p.add_argument(
        "--terms",
        default="auto",
        help="signed powers of two per scale, as compile --terms: 'auto' (per width), one count "
        "for every bit-plane (3), or per-plane counts, most significant plane first, the last "
        "repeated (4,3,3,2). The baselines' plain BCQ uses 3 with 'auto', else the largest count",
    )
    p.add_argument(
        "--scale-window",
        type=int,
        default=d.scale_window,
        help="ours: as compile --scale-window (0 = free exponents; 8 = one shift per group on "
        "the AVX-512 int8 kernels: VBMI, or BW + VNNI)",
    )
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument(
        "--rounds", type=int, default=d.rounds, help="GPTQ loops on refitted scales (ours)"
    )
    p.add_argument(
        "--sweeps",
        type=int,
        default=d.sweeps,
        help="coordinate-descent passes over the codes after each GPTQ loop (ours)",
    )
    p.add_argument(
        "--tune-epochs",
        type=int,
        default=d.tune_epochs,
        help="epochs of end-to-end scale tuning against the float model (ours; 0 = off)",
    )
    p.add_argument(
        "--tune-windows",
        type=int,
        default=d.tune_windows,
        help="calibration windows the scale tuning trains on (after the 2 held out)",
    )
    p.add_argument(
        "--tune-lr",
        type=float,
        default=d.tune_lr,
        help="scale tuning step: root-mean-square change of the log-scales per step "
        "(normalized momentum descent; see finetune.py), for fits whose held-out KL is at most "
        "--tune-kl-ref",
    )
    p.add_argument(
        "--tune-kl-ref",
        type=float,
        default=d.tune_kl_ref,
        help="the step is tune-lr * sqrt(KL / tune-kl-ref) for fits farther from float (0 = fixed)",
    )
    p.add_argument(
        "--head-storage",
        choices=WEIGHT_DTYPES,
        default=d.head_storage,
        help="storage of the dense output head and its tied embedding in ours' artifacts",
    )
    p.add_argument(
        "--allocation-weight",
        choices=["fisher", "none"],
        default=d.allocation_weight,
        help="weigh each layer's output error by the loss gradient of each output channel "
        "(fisher) or not (none) when allocating bits to a budget",
    )
    p.add_argument(
        "--no-rotate",
        action="store_true",
        help="fit ours on the unrotated model (default: rotated as compile does; the baselines "
        "always quantize the unrotated weights)",
    )
    p.add_argument("--calib-text", default=d.calib_text)
    p.add_argument("--calib-start", type=int, default=d.calib_start)
    p.add_argument(
        "--calib-windows",
        type=int,
        default=d.calib_windows,
        help="calibration windows (of --window tokens from --calib-text at --calib-start) for "
        "every method's statistics and ours' scale tuning (compile's default is "
        f"{defaults.CALIB_WINDOWS}, for the main job's time)",
    )
    p.add_argument("--target", default=d.target)
    p.add_argument(
        "--tables",
        choices=defaults.TABLES,
        default=d.tables,
        help="activation tables of ours' CPU LUT kernel (compile --tables): auto (int8 where "
        "the target has the instructions) or float",
    )
    p.add_argument("--out", default="reports/smollm2", help="folder for results.{json,md,png}")
    p.add_argument(
        "--work", default="out/report-work", help="folder for resumable intermediate results"
    )


def cmd_report(args) -> int:
    from .quant import terms_kwargs

    tk = terms_kwargs(args.terms)
    terms, plane_terms = tk.get("terms", ReportSpec.terms), tk.get("plane_terms", ())
    spec = ReportSpec(
        model=args.model,
        texts=tuple(args.texts),
        tokens=args.tokens,
        window=args.window,
        bits=tuple(args.bits),
        budgets=tuple(args.budgets),
        baselines=tuple(args.baselines),
        group_size=args.group_size,
        terms=terms,
        plane_terms=plane_terms,
        auto_terms=tk.get("auto_terms", False),
        scale_window=args.scale_window,
        iters=args.iters,
        rounds=args.rounds,
        sweeps=args.sweeps,
        tune_epochs=args.tune_epochs,
        tune_windows=args.tune_windows,
        tune_lr=args.tune_lr,
        tune_kl_ref=args.tune_kl_ref,
        head_storage=args.head_storage,
        allocation_weight=args.allocation_weight,
        calib_text=args.calib_text,
        calib_start=args.calib_start,
        calib_windows=args.calib_windows,
        target=args.target,
        rotate=not args.no_rotate,
        tables=args.tables,
    )
    res = run_report(spec, args.out, args.work)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    import sys

    from .cli import main

    sys.exit(main(["report", *sys.argv[1:]]))
