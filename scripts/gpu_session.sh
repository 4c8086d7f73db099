#!/usr/bin/env bash
# One run on a lent GPU machine for the dispatch issue's GPU items: build MegaBlocks against the machine's own
# CUDA torch, run the dispatch property tests (the CUDA ones are skipped elsewhere), and benchmark the full
# OLMoE layer shape in bf16 with the grouped_mm and megablocks backends. Not run yet: no GPU has been lent to
# this project so far.
#
# Prepare here (with internet):   python scripts/fetch_gpu_packages.py        # fills .whl/ (~19 MiB)
# Then one device run:            command "bash scripts/gpu_session.sh", carry [".whl"], timeout_s 590
# Logs and tables land in $OUT (./gpu-results without it); copy the figures into BENCHMARKS.md with the machine.
# BUILD_SECONDS and BENCH_SECONDS bound the two long steps (defaults below keep the run under ten minutes).
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
stamp() { echo "== $(date +%T) $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"

stamp "pinned Python packages from .whl/ (the image has torch, accelerate, pytest and hypothesis)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl

stamp "MegaBlocks, grouped_gemm and stanford-stk built from source (at most ${BUILD_SECONDS:=240} s)"
timeout "$BUILD_SECONDS" python3 -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir \
    --target /tmp/site .whl/stanford_stk-*.tar.gz .whl/grouped_gemm-*.tar.gz .whl/megablocks-*.tar.gz \
    >"$out/megablocks_build.log" 2>&1
echo "build exit status $? (log: megablocks_build.log)"
variants=(frozen perft-r perft-r@grouped_mm perft-e perft-e@grouped_mm perft-d perft-s lora-attn lora-experts)
if python3 -c "import megablocks.ops, grouped_gemm; print('MegaBlocks imports')"; then
    variants+=(perft-r@megablocks perft-e@megablocks)
fi

stamp "dispatch property tests, CUDA included"
timeout 150 python3 -m pytest -p no:cacheprovider tests/test_dispatch.py >"$out/test_dispatch.log" 2>&1
echo "pytest exit status $?"
tail -6 "$out/test_dispatch.log"

stamp "OLMoE layer shape (hidden 2048, 64 experts top-8, width 1024), bf16: step, peak memory, decode"
timeout "${BENCH_SECONDS:-240}" python3 benchmarks/olmoe_step.py --shape olmoe --device cuda --dtype bfloat16 \
    --variants "${variants[@]}" --repetitions 5 --decode-repetitions 3 --output "$out/olmoe_cuda_bfloat16" \
    >"$out/olmoe.log" 2>&1
echo "benchmark exit status $?"
tail -25 "$out/olmoe.log"
stamp "done"
