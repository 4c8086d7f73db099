#!/usr/bin/env bash
# One run on a lent GPU machine (one H200, no internet, under ten minutes) that settles what only a GPU can:
#   - the compiled paths: a bf16 training step compiled with fullgraph=True on CUDA for R/E/D/S equals eager, and
#     the static-cache decode step under mode="reduce-overhead" is captured in CUDA graphs (tests/test_compile.py,
#     tests/test_gpu_checks.py);
#   - bf16 end to end (tests/test_bf16.py) and the dispatch backends on CUDA (tests/test_dispatch.py's CUDA tests);
#   - the meta-device flow: built on meta, materialised on CUDA, initialised, trained (tests/test_gpu_checks.py),
#     and FSDP2's flow on two processes (tests/test_meta_device_fsdp2.py);
#   - MegaBlocks, built from source against the machine's torch, if it installs (its tests and benchmark variants);
#   - the prediction table's overheads (benchmarks/gpu_prediction.py, the H200 roofline): the OLMoE layer shape in
#     bf16, eager and compiled (reduce-overhead), each target's paired ratio beside its roofline prediction.
# Everything lands in one Markdown table, $OUT/gpu_session.md (benchmarks/gpu_report.py), with every log beside it.
# Not run on a GPU yet: no GPU has been lent to this project so far.
#
# Prepare here (with internet):   python scripts/fetch_gpu_packages.py        # fills .whl/ (~19 MiB)
# Then one device run:            command "bash scripts/gpu_session.sh", carry [".whl"], timeout_s 590
# Check it on a CPU (no GPU, no .whl, small sizes; every step and the table, in a few minutes):
#                                 DRY_RUN=1 OUT=/tmp/gpu-dry bash scripts/gpu_session.sh
# Each step has its own time limit in seconds (the build's runs beside the tests; BUILD_SECONDS, BENCH_SECONDS and
# COMPILED_BENCH_SECONDS can be set): their sum stays under ten minutes, and a step that runs out leaves a row
# saying so.
set -uo pipefail
out="${OUT:-gpu-results}"
mkdir -p "$out"
dry="${DRY_RUN:-0}"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
stamp() { echo "== $(date +%T) $*"; }

if [ "$dry" = 1 ]; then
    bench=(--shape cpu --device cpu --dtype float32 --layers 1 --tokens 64 --batch 2 --prompt-tokens 8
        --new-tokens 2 --repetitions 1 --decode-repetitions 1 --skip-memory)
    compiled=(--variants frozen perft-e)
else
    bench=(--shape olmoe --device cuda --dtype bfloat16 --tokens 8192 --batch 8 --repetitions 5
        --decode-repetitions 3)
    # Inductor compiles each setup's training (two protocols) and decode graphs: 2 layers and R, E keep it in time.
    compiled=(--variants frozen perft-r perft-e --layers 2 --repetitions 3)
fi

stamp "machine (DRY_RUN=$dry)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"

build_pid=""
if [ "$dry" = 1 ]; then
    echo "build skipped (DRY_RUN); import $(python3 -c 'import megablocks' 2>/dev/null && echo ok || echo failed)" \
        >"$out/megablocks.txt"
else
    stamp "pinned Python packages from .whl/ (the image has torch, accelerate, pytest and hypothesis)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    stamp "MegaBlocks, grouped_gemm and stanford-stk built from source in the background (at most ${BUILD_SECONDS:=240} s)"
    (
        timeout "$BUILD_SECONDS" python3 -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir \
            --target /tmp/site .whl/stanford_stk-*.tar.gz .whl/grouped_gemm-*.tar.gz .whl/megablocks-*.tar.gz \
            >"$out/megablocks_build.log" 2>&1
        status=$?
        imports=$(python3 -c "import megablocks.ops, grouped_gemm" >/dev/null 2>&1 && echo ok || echo failed)
        echo "build exit status $status (log: megablocks_build.log); import $imports" >"$out/megablocks.txt"
    ) &
    build_pid=$!
fi

# run_tests GROUP SECONDS PYTEST-ARGUMENTS...: one pytest run with a JUnit report for the table.
run_tests() {
    local group=$1 seconds=$2
    shift 2
    stamp "tests: $group (at most $seconds s)"
    timeout "$seconds" python3 -m pytest -p no:cacheprovider -q -rs --junitxml="$out/tests_$group.xml" "$@" \
        >"$out/tests_$group.log" 2>&1
    echo "pytest exit status $?"
    tail -3 "$out/tests_$group.log"
}

run_tests compile 110 tests/test_compile.py tests/test_gpu_checks.py -k "cuda or compiled_bf16"
run_tests bf16 60 tests/test_bf16.py
run_tests meta 75 tests/test_gpu_checks.py tests/test_meta_device_fsdp2.py -k "meta"
if [ -n "$build_pid" ]; then
    stamp "waiting for the MegaBlocks build"
    wait "$build_pid"
fi
cat "$out/megablocks.txt"
variants=(frozen perft-r perft-r@grouped_mm perft-e perft-e@grouped_mm perft-d perft-s)
if grep -q "import ok" "$out/megablocks.txt"; then
    variants+=(perft-r@megablocks perft-e@megablocks)
fi
run_tests dispatch 60 tests/test_dispatch.py -k "cuda or megablocks or compiled"

stamp "OLMoE-shaped benchmark, eager: step, peak memory, decode (at most ${BENCH_SECONDS:=80} s)"
timeout "$BENCH_SECONDS" python3 benchmarks/olmoe_step.py "${bench[@]}" --variants "${variants[@]}" \
    --output "$out/olmoe_eager" >"$out/olmoe_eager.log" 2>&1
echo "benchmark exit status $?"

stamp "OLMoE-shaped benchmark, compiled with reduce-overhead (at most ${COMPILED_BENCH_SECONDS:=150} s)"
timeout "$COMPILED_BENCH_SECONDS" python3 benchmarks/olmoe_step.py "${bench[@]}" --skip-memory --compile \
    --compile-mode reduce-overhead "${compiled[@]}" --output "$out/olmoe_compiled" \
    >"$out/olmoe_compiled.log" 2>&1
echo "benchmark exit status $?"

stamp "the table"
python3 benchmarks/gpu_report.py "$out"
stamp "done"
