import subprocess
import sys

import pytest

from shiftadd_tvm.cli import build_parser, main
from shiftadd_tvm.errors import TextLoadError
from shiftadd_tvm.text import load_text


@pytest.mark.parametrize("cmd", ["compile", "eval"])
def test_help_explains_every_flag(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    sub = build_parser()._subparsers._group_actions[0].choices[cmd]
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest
            assert action.option_strings[-1] in out


def test_console_script_help():
    proc = subprocess.run(
        [sys.executable, "-m", "shiftadd_tvm.cli", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "compile" in proc.stdout and "eval" in proc.stdout


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compile", "--model", "/nonexistent/model", "--output", "{out}"], "not found"),
        (["compile", "--model", "{bogus}", "--output", "{out}"], "not a GGUF file"),
        (["eval", "--artifact", "/nonexistent.so"], "does not exist"),
    ],
)
def test_bad_input_exits_nonzero_without_output(argv, message, tmp_path, caplog):
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a model at all")
    out = tmp_path / "out.so"
    argv = [a.format(out=out, bogus=bogus) for a in argv]
    assert main(argv) == 2
    assert message in caplog.text
    assert not out.exists() and not list(tmp_path.glob(".out.so*"))


def test_texts_are_clean_prose():
    wiki = load_text("wiki")
    assert len(wiki.split()) > 300_000
    head = wiki[:20000]
    for markup in ("<ref", "{{", "[[", "'''", "&lt;", "&amp;"):
        assert markup not in head, markup
    assert head.startswith("Anarchism")
    assert len(load_text("lee").split()) > 50_000


def test_text_errors(tmp_path):
    with pytest.raises(TextLoadError, match="neither"):
        load_text(str(tmp_path / "missing.txt"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(TextLoadError, match="UTF-8"):
        load_text(str(bad))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TextLoadError, match="empty"):
        load_text(str(empty))
