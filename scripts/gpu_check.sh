#!/usr/bin/env bash
# The CUDA check in one command.
#  - On a machine with this project's venv and no GPU: build the CUDA kernels (every candidate
#    schedule of the default model's shapes + 4096x4096 and 11008x4096 at 2/3/4 bits), a small CUDA
#    model and its torch reference, and bundle them with the TVM runtime libraries (no compiler)
#    into $BUNDLE (dry run: nothing executes on a GPU). `--models-only`: the tiny models alone.
#  - On a GPU machine (Python 3.12 + torch, no TVM needed) with $BUNDLE present: load everything
#    with the runtime only, check outputs against torch, time against cuBLAS fp16, print the table
#    and write $BUNDLE/gpu_check.json (also the tuning records of the measured schedules).
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${BUNDLE:-gpu_bundle}
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    if [ ! -f "$BUNDLE/tiny_ref.npz" ]; then
        echo "no bundle at $BUNDLE: run 'bash scripts/gpu_check.sh' on the build machine first" >&2
        exit 2
    fi
    nvidia-smi -L
    # run from inside the bundle so its runtime-only package, not the source tree, is imported
    cd "$BUNDLE"
    # tvm_ffi would otherwise JIT-build an optional torch extension on first import
    TVM_FFI_DISABLE_TORCH_C_DLPACK=1 PYTHONPATH=python PYTHONUNBUFFERED=1 ${PYTHON:-python3} -m shiftadd_tvm.gpu_check run . \
        --json gpu_check.json "$@"
else
    ${PY:-.venv/bin/python} -m shiftadd_tvm.gpu_check build --out "$BUNDLE" \
        --arch "${ARCH:-sm_90}" --python "${GPU_PYTHON:-3.12}" "$@"
    du -sh "$BUNDLE"
    echo "bundle ready in $BUNDLE: on a GPU machine run: bash scripts/gpu_check.sh"
fi
