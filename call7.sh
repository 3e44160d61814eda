#!/usr/bin/env bash
# session 12, call 7: final code (review mends): build, GPU suite, sanitizers on decode attention, bench
export OUT=${OUT:-/tmp/out}
bash tools/gpu_check.sh build tests 2>&1 | tail -6
SANITIZE_S=90 SANITIZE_K="decode_attention" bash tools/gpu_check.sh sanitize 2>&1 | grep -E "exit|SUMMARY|passed|failed"
timeout 150 python3 tools/bench.py --device cuda --model gpt2 --batch-sizes 1 8 64 256 --prompt-len 128 --new-tokens 128 \
  --kv-cache paged --repeats 3 --no-hf --workdir /tmp/bench 2>&1 | grep -v -i -E "warn|loading|writing" | tail -8
