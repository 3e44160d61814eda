#!/usr/bin/env bash
# One device call: build the CUDA engine, run the GPU tests, the sanitizers and the benchmarks,
# and print a short table. Stages to run are arguments (default: all but train and bundled):
#   bash tools/gpu_check.sh build tests sanitize kernels bench bench_xl serving
# `profile` runs tools/profile_step.py with $PROFILE_ARGS (default: the serving workload).
# `train` trains the bundled model from the token files of tools/shakespeare_data.py in
# $TRAIN_DATA (default .devbuild/shkdata: carry it, the device has no network) and converts it
# to float16 into $OUT/bundled; `bundled` scores the bundled model (or that new one) against HF
# float32 on the held-out works: perplexity, and fp32/fp16/bf16 teacher-forced top-1 agreement.
# Logs and JSON go to $OUT (the device tool brings them back).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/pagedgpt2-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
stages=${*:-build tests sanitize kernels bench bench_xl serving}
data=${TRAIN_DATA:-.devbuild/shkdata}                   # token files of tools/shakespeare_data.py
bundled=${BUNDLED:-python/pagedgpt2/assets/shakespeare-gpt2}
has() { [[ " $stages " == *" $1 "* ]]; }
banner() { echo; echo "== $* ($(date +%T))"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/bench.txt"

if has build; then
  banner build
  t0=$SECONDS
  if ! python3 -m pip install --no-build-isolation --no-deps -q -C cmake.define.PAGEDGPT2_CUDA_ARCHS=90 \
       -C build.verbose=true . > "$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1
  fi
  grep -E "pagedgpt2:" "$OUT/build.log" | head -3
  echo "built in $((SECONDS - t0)) s"
  python3 -c "import pagedgpt2._cuda as c; print('CUDA devices:', c.device_count())" || exit 1
fi

if has train; then
  banner "train the bundled model"
  run=/tmp/train-run
  timeout ${TRAIN_S:-420} python3 tools/train_small_gpt2.py "$data" $run --device cuda --force ${TRAIN_ARGS:-} \
    2>&1 | tee "$OUT/train.log" | grep -E "model:|val loss|trained|final|budget" || exit 1
  cp $run/report.json "$OUT/train_report.json"
  python3 tools/convert_hf.py $run/hf "$OUT/bundled" --dtype float16 --force --quiet > /dev/null || exit 1
  bundled="$OUT/bundled"
fi

if has bundled; then
  banner "bundled model: engine vs HF float32 on the held-out works"
  python3 -c "from pagedgpt2.convert import export_hf_checkpoint as e; e('$bundled', '/tmp/bundled-hf', force=True)"
  python3 tools/eval_perplexity.py "$bundled" "$data/val.bin" --hf /tmp/bundled-hf --device cuda \
    --top1 float32 float16 bfloat16 2>&1 | grep -v -i -E "warn|loading" | tee -a "$OUT/bench.txt"
fi

if has tests; then
  banner "GPU tests"
  python3 -m pytest -q -rs tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | grep -v "^\.\.\." | tail -25
fi

if has sanitize; then
  # memcheck and racecheck over every kernel test, in parallel shards, our kernels instrumented
  # (cuBLASLt's are not: see tools/sanitize.py). The engine tests need one shard and 6-9 minutes
  # under memcheck, two device calls: the command is in tools/sanitize.py's docstring.
  banner "compute-sanitizer memcheck and racecheck (${SANITIZE_PATHS:-tests/gpu/test_kernels.py})"
  logs=/tmp/pagedgpt2-sanitize  # a log a shard: more files than the device tool brings back
  rm -rf $logs
  timeout $(( ${SANITIZE_S:-360} + 30 )) python3 tools/sanitize.py --tools memcheck racecheck \
    --shards ${SANITIZE_SHARDS:-7} --timeout ${SANITIZE_S:-360} --out $logs \
    ${SANITIZE_PATHS:-tests/gpu/test_kernels.py} 2>&1 | tee "$OUT/sanitize.txt" | tail -24
  for f in $logs/*.log; do  # what each shard's sanitizer reported, and how its pytest ended
    echo "### $(basename "$f")"
    grep -E "SUMMARY|Internal|Invalid|Race|hazard|FAILED" "$f" | grep -v "Host Frame" | head -12
    tail -c 300 "$f"; echo
  done > "$OUT/sanitize_digest.txt"
fi

if has kernels; then
  banner "kernel benchmarks"
  timeout ${KERNELS_S:-120} python3 tools/bench_kernels.py ${KERNELS_ARGS:-} --json "$OUT/bench_kernels.json" 2>&1 | tee -a "$OUT/bench.txt" | tail -30
fi

if has bench; then
  banner "end-to-end benchmark (gpt2)"
  timeout ${BENCH_S:-240} python3 tools/bench.py --device cuda --model gpt2 --batch-sizes 1 8 64 256 --prompt-len 128 \
    --new-tokens 128 --kv-cache paged contiguous --repeats 3 --workdir /tmp/bench \
    --json "$OUT/bench_gpt2.json" 2>&1 | tee -a "$OUT/bench.txt" | grep -v -i -E "warn|loading|writing" | tail -20
fi

if has bench_xl; then
  banner "end-to-end benchmark (gpt2-xl)"
  # NOTE: 3 repeats, not 1: the rate is batch / per-step time from t(128 tokens) - t(1 token), and
  # one slow 1-token run once gave contiguous batch 256 51,320 tok/s against 35,038 re-run.
  timeout ${BENCH_XL_S:-300} python3 tools/bench.py --device cuda --model gpt2-xl --batch-sizes 1 8 64 256 --prompt-len 128 \
    --new-tokens 128 --kv-cache paged contiguous --repeats 3 --hf-max-batch 8 --workdir /tmp/bench \
    --json "$OUT/bench_gpt2xl.json" 2>&1 | tee -a "$OUT/bench.txt" | grep -v -i -E "warn|loading|writing" | tail -20
fi

if has profile; then
  banner "profile (tools/profile_step.py ${PROFILE_ARGS:---serving 1000})"
  timeout ${PROFILE_S:-180} python3 tools/profile_step.py ${PROFILE_ARGS:---serving 1000} --workdir /tmp/bench 2>&1 \
    | grep -v -i -E "warn|loading|writing" | tee "$OUT/profile.txt" | tail -40
fi

if has serving; then
  banner "serving workload (1000 requests)"
  timeout ${SERVING_S:-360} python3 tools/bench_serving.py --requests 1000 --kv-gib 0.5 --workdir /tmp/bench \
    --more-block-sizes ${SERVING_BLOCKS:-8} --sweep-kv-gib ${SERVING_SWEEP:-0.25 1 2 4} \
    --json "$OUT/bench_serving.json" 2>&1 | tee -a "$OUT/bench.txt" | grep -v -i -E "warn|loading|writing" | tail -40
fi
