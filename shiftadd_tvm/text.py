"""Real text for calibration and evaluation: the Wikipedia excerpt and the Lee news corpus shipped
in the ``gensim`` package (files only, never imported), or any UTF-8 file."""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import logging
import re
from pathlib import Path

from .errors import TextLoadError

log = logging.getLogger(__name__)

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "test/test_data/lee_background.cor"
TEXT_ALIASES = ("wiki", "lee")
_INSTALL_HINT = "install it with: pip install --no-deps -r requirements-assets.txt"


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TextLoadError(f"the text package '{package}' is not installed; {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.is_file():
        raise TextLoadError(f"{path} is missing from the '{package}' package; {_INSTALL_HINT}")
    return path


_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>", re.S), ""),
    (re.compile(r"<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (
        re.compile(
            r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]",
            re.I,
        ),
        "",
    ),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]|]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://[^\s\]]+ ?([^\]]*)\]"), r"\1"),  # [url label] -> label
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"&nbsp;"), " "),
]


def _strip_templates(s: str) -> str:
    """Remove (nested) {{...}} templates."""
    out, depth, i = [], 0, 0
    while i < len(s):
        if s.startswith("{{", i):
            depth += 1
            i += 2
        elif s.startswith("}}", i) and depth:
            depth -= 1
            i += 2
        else:
            if not depth:
                out.append(s[i])
            i += 1
    return "".join(out)


def clean_wikitext(s: str) -> str:
    """MediaWiki markup -> plain prose (good enough for language-model perplexity)."""
    s = _strip_templates(s)
    for pattern, repl in _MARKUP:
        s = pattern.sub(repl, s)
    lines = [ln.strip() for ln in s.splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith(("|", "!", "{", "}"))]
    text = "\n".join(keep)
    return re.sub(r"[ \t]{2,}", " ", text)


@functools.lru_cache(maxsize=4)
def load_text(name: str) -> str:
    """``wiki``, ``lee``, or the path of a UTF-8 text file -> its plain text."""
    if name == "wiki":
        raw = bz2.decompress(_package_file("gensim", WIKI_FILE).read_bytes()).decode("utf-8")
        pages = re.findall(r"<text[^>]*>(.*?)</text>", raw, re.S)
        articles = [
            clean_wikitext(html.unescape(p))
            for p in pages
            if not p.lstrip().upper().startswith("#REDIRECT")
        ]
        return "\n\n".join(a for a in articles if a)
    if name == "lee":
        return _package_file("gensim", LEE_FILE).read_text(encoding="utf-8")
    path = Path(name)
    if not path.exists():
        raise TextLoadError(
            f"text '{name}' is neither one of {TEXT_ALIASES} nor an existing file; "
            "pass --text wiki, --text lee or the path of a UTF-8 text file"
        )
    if not path.is_file():
        raise TextLoadError(f"text path '{name}' is not a regular file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextLoadError(
            f"text file '{name}' is not valid UTF-8 ({e}); convert it to UTF-8"
        ) from e
    except OSError as e:
        raise TextLoadError(f"cannot read text file '{name}': {e}") from e
    if not text.strip():
        raise TextLoadError(f"text file '{name}' is empty")
    return text


def token_ids(tokenizer, name: str, start: int = 0, count: int | None = None):
    """Token ids (numpy int64) of text ``name``, tokens ``[start, start + count)``."""
    import numpy as np

    ids = _tokenize(tokenizer, name)
    stop = len(ids) if count is None else start + count
    if stop > len(ids):
        raise TextLoadError(
            f"text '{name}' has {len(ids)} tokens, fewer than the {stop} requested "
            f"(start {start}, count {count}); ask for fewer tokens or use a longer text"
        )
    return np.asarray(ids[start:stop], dtype=np.int64)


_TOKEN_CACHE: dict[tuple[int, str], list[int]] = {}


def _tokenize(tokenizer, name: str) -> list[int]:
    key = (id(tokenizer), name)
    if key not in _TOKEN_CACHE:
        _TOKEN_CACHE[key] = tokenizer(load_text(name), add_special_tokens=False)["input_ids"]
        log.info("text %s: %d tokens", name, len(_TOKEN_CACHE[key]))
    return _TOKEN_CACHE[key]
