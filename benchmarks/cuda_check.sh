#!/usr/bin/env bash
# Engine checks on a CUDA machine, in one call: the bf16 correctness tests on CUDA, then the
# engine benchmark in bf16. Run from the repository root on a machine whose python3 already has
# torch (CUDA), transformers, tokenizers and pytest; nothing is fetched.
#
#     bash benchmarks/cuda_check.sh [OUT_DIR] [--tests-only]     # CUDA_CHECK_K=... narrows the tests
#
# Wheels for anything else the tests import (pydantic, for the shared conftest) may be put in
# .whl/; they are installed into a scratch directory, never into the system.
set -uo pipefail
out="${1:-${OUT:-/tmp/cuda_check}}"
tests_only="${2:-}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! python3 -c "import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# Import the project's packages from this checkout under their installed names.
pkgs=/tmp/bisllm_pkgs
mkdir -p "$pkgs"
for pair in bisllm_truss:bisllm_truss bisllm_server:server bisllm_bdn:bdn_mirror bisllm_templates:templates; do
    ln -sfn "$PWD/${pair#*:}" "$pkgs/${pair%%:*}"
done
export PYTHONPATH="$pkgs${PYTHONPATH:+:$PYTHONPATH}"

python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/versions.txt"

timeout 240 python3 -m pytest tests/test_engine_bf16.py -k "${CUDA_CHECK_K:-cuda}" -p no:cacheprovider -q -rA \
    2>&1 | tee "$out/pytest_bf16_cuda.log" | tail -n 40
echo "pytest exit: ${PIPESTATUS[0]}"
[ "$tests_only" = "--tests-only" ] && exit 0

timeout 300 python3 benchmarks/bench_engine.py --device cuda --dtype bfloat16 --repeats 3 \
    --json "$out/bench_cuda.json" 2>&1 | grep -v "Writing\|Loading" | tee "$out/bench_cuda.log"
echo "bench exit: ${PIPESTATUS[0]}"
