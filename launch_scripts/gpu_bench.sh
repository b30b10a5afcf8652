#!/usr/bin/env bash
# Every throughput figure of docs/performance.md, in one run on one GPU:
# tools/bench_step.py on the trainer's DeepSpeed path (and the plain-PyTorch reference) for the
# synthetic-2b and synthetic-8b presets, with and without gradient checkpointing (the real
# loader's share of the step is the breakdown's data_wait). JSON lines go to $OUT/bench.jsonl;
# a configuration that fails (out of memory, say) is reported and the rest still run.
#
#   bash launch_scripts/gpu_bench.sh                 # OUT=gpu_bench_out
#   OUT=/tmp/b STEPS=10 bash launch_scripts/gpu_bench.sh
#
# Installs nothing it cannot find locally: deepspeed / webdataset wheels from .whl/ when the
# environment lacks them (build deepspeed as a py3-none-any wheel from its sdist beside torch).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_bench_out}
STEPS=${STEPS:-8}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # Hopper: DeepSpeed's op builder cannot parse "9.0a"
for module in deepspeed webdataset; do
  if ! python -c "import $module" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_bench.sh: $module missing and no wheels in .whl/" >&2; exit 2; }
    python -m pip install -q --no-index --find-links .whl --target "${SITE:-/tmp/site}" "$module"
    export PYTHONPATH="${SITE:-/tmp/site}:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
done
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

bench() {  # one bench_step invocation; its JSON lines appended to bench.jsonl
  echo "== bench_step $*" >&2
  python tools/bench_step.py --json --steps "$STEPS" "$@" | tee -a "$OUT/bench.jsonl" \
    || echo "{\"failed\": \"$*\"}" | tee -a "$OUT/bench.jsonl"
}
: > "$OUT/bench.jsonl"
bench --model synthetic-2b --micro_batch_size 8 --engine deepspeed,none
bench --model synthetic-2b --micro_batch_size 8 --engine deepspeed --gradient_checkpointing
bench --model synthetic-8b --micro_batch_size 4 --engine deepspeed --gradient_checkpointing
bench --model synthetic-8b --micro_batch_size 4 --engine deepspeed
echo "done: $OUT/bench.jsonl"
