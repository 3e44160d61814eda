#!/usr/bin/env bash
# One device call: build the CUDA engine, run the GPU tests, the sanitizers and the benchmarks,
# and print a short table. Stages to run are arguments (default: all):
#   bash tools/gpu_check.sh build tests sanitize bench kernels
# Logs and JSON go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pagedgpt2-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
stages=${*:-build tests sanitize bench kernels}
has() { [[ " $stages " == *" $1 "* ]]; }
banner() { echo; echo "== $* ($(date +%T))"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"

if has build; then
  banner build
  t0=$SECONDS
  if ! pip install --no-build-isolation --no-deps -q -C cmake.define.PAGEDGPT2_CUDA_ARCHS=90 \
       -C build.verbose=true . > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1
  fi
  grep -E "pagedgpt2:" "$OUT/build.log" | head -3
  echo "built in $((SECONDS - t0)) s"
  python -c "import pagedgpt2._cuda as c; print('CUDA devices:', c.device_count())" || exit 1
fi

if has tests; then
  banner "GPU tests"
  python -m pytest -q -rs tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi

if has sanitize; then
  for tool in memcheck racecheck; do
    banner "compute-sanitizer $tool"
    compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
      python -m pytest -q -x tests/gpu/test_kernels.py -k "not slow" -p no:cacheprovider \
      > "$OUT/sanitize_$tool.log" 2>&1
    echo "exit $? ($tool)"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize_$tool.log" | tail -3
  done
fi

if has kernels; then
  banner "kernel benchmarks"
  python tools/bench_kernels.py --json "$OUT/bench_kernels.json" 2>&1 | tail -30
fi

if has bench; then
  banner "end-to-end benchmark (gpt2)"
  python tools/bench.py --device cuda --model gpt2 --batch-sizes 1 8 64 256 --prompt-len 128 \
    --new-tokens 128 --kv-cache paged contiguous --repeats 3 --workdir /tmp/bench \
    --json "$OUT/bench_gpt2.json" 2>&1 | grep -v -i -E "warn|loading|writing" | tail -20
  banner "end-to-end benchmark (gpt2-xl)"
  python tools/bench.py --device cuda --model gpt2-xl --batch-sizes 1 8 64 256 --prompt-len 128 \
    --new-tokens 128 --kv-cache paged contiguous --repeats 2 --hf-max-batch 8 --workdir /tmp/bench \
    --json "$OUT/bench_gpt2xl.json" 2>&1 | grep -v -i -E "warn|loading|writing" | tail -20
fi
