#!/usr/bin/env bash
# Does Self-KD beat spoken-question SFT through this trainer? The toy study, protocol fixed before
# it was run (docs/study_v1.md); CPU-only is fine (2 ranks over gloo).
#   1. demo data: 40,000 training scenes and 400 held-out ones, questions typed and spoken (eSpeak NG),
#   2. the start: the random `toy` model (tiny's classes at 128-d, 4 layers, 224 px, M-RoPE theta 10)
#      taught the typed-question skill (--stage vl, vision tower trained), exported and scored; the study
#      refuses a start under START_MIN_VL (70) on held-out,
#   3. the grid (launch_scripts/grids/study_selfkd_vs_sft.yaml) through tools/compare_recipes.py:
#      SFT (alpha 0) and Self-KD alpha 0.25/0.5/0.75/1.0 with the shared teacher, alpha 0.75 with the
#      frozen and the EMA teacher; spoken budgets "full" (all training shards) and "10pct" (a tenth);
#      3 seeds each; each run exported and scored typed and spoken on the 400 held-out questions,
#   4. OUT/grid/results.{json,md,png}. Every step resumes: finished work is not redone.
# GRID, GRID_OUT and BUDGETS run another grid from the same data and start (the labelled follow-up in
# launch_scripts/grids/followup_llm_frozen.yaml); the study itself is the defaults. OUT, GRID and
# GRID_OUT are relative to the repository root, START_FROM to the caller's directory.
#
#   bash launch_scripts/study_selfkd_vs_sft.sh                  # everything under study_out/
#   OUT=/tmp/study SEEDS=0 bash launch_scripts/study_selfkd_vs_sft.sh
#   START_FROM=docs/results/selfkd_vs_sft/start bash launch_scripts/study_selfkd_vs_sft.sh   # skip [2]'s training
#   GRID=launch_scripts/grids/followup_llm_frozen.yaml GRID_OUT=study_out/followup_llm_frozen BUDGETS=full \
#     bash launch_scripts/study_selfkd_vs_sft.sh                # the follow-up, after the study
set -euo pipefail
# A relative START_FROM is the caller's; the script runs from the repository root.
START_FROM=${START_FROM:+$(realpath "$START_FROM")}
cd "$(dirname "$0")/.."
source launch_scripts/setup_env.sh

OUT=${OUT:-study_out}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-40000}
HELDOUT_SAMPLES=${HELDOUT_SAMPLES:-400}
SAMPLES_PER_SHARD=${SAMPLES_PER_SHARD:-500}
START_STEPS=${START_STEPS:-5000}
START_MIN_VL=${START_MIN_VL:-70}
GRID=${GRID:-launch_scripts/grids/study_selfkd_vs_sft.yaml}
GRID_OUT=${GRID_OUT:-$OUT/grid}
BUDGETS=${BUDGETS:-full,10pct}
IFS=, read -ra BUDGET_NAMES <<< "$BUDGETS"
for budget in "${BUDGET_NAMES[@]}"; do
  case "$budget" in
    full | 10pct) ;;
    *) echo "BUDGETS=$BUDGETS: expected full and/or 10pct, got '$budget'" >&2; exit 1 ;;
  esac
done
source launch_scripts/local_ranks.sh
PORT=${MASTER_PORT:-29531}
mkdir -p "$OUT"

echo "== [1/4] demo data -> $OUT/data"
if [ ! -f "$OUT/data.json" ]; then
  python tools/make_demo_data.py --out "$OUT/data" --train "$TRAIN_SAMPLES" --heldout "$HELDOUT_SAMPLES" --seed 0 \
    --workers 2 --samples_per_shard "$SAMPLES_PER_SHARD" > "$OUT/data.json.tmp"
  mv "$OUT/data.json.tmp" "$OUT/data.json"
fi
cat "$OUT/data.json"
spec() { python -c "import json, sys; print(json.load(open('$OUT/data.json'))[sys.argv[1]])" "$1"; }
TRAIN_SHARDS=$(spec train_shards)
HELDOUT_SHARDS=$(spec heldout_shards)
# The 10% budget: the first tenth of the training shards (same scenes for every run).
TENTH=$(python - "$TRAIN_SHARDS" <<'PY'
import sys
from trainer.data.shards import expand_shard_spec
shards = expand_shard_spec(sys.argv[1])
print(",".join(shards[: max(1, len(shards) // 10)]))
PY
)

echo "== [2/4] the start: typed-question training of the random toy model (--stage vl), $NUM_GPUS ranks"
# Where OUT's start came from ("trained" here, or START_FROM's path): a rerun must not mix starts.
START_SOURCE=${START_FROM:-trained}
if [ -f "$OUT/start/source" ] && [ "$(cat "$OUT/start/source")" != "$START_SOURCE" ]; then
  echo "$OUT/start came from $(cat "$OUT/start/source"), not $START_SOURCE: use another OUT" >&2
  exit 1
fi
if [ ! -f "$OUT/start/eval/report.json" ]; then
  mkdir -p "$OUT/start"
  echo "$START_SOURCE" > "$OUT/start/source"
  if [ -n "${START_FROM:-}" ]; then
    # A start trained earlier by this step (docs/results/selfkd_vs_sft/start is the committed one):
    # it is scored here like a new one and must pass the same bar.
    if [ ! -d "$START_FROM" ] || [ "$START_FROM" = "$(realpath -m "$OUT/start/export")" ]; then
      echo "START_FROM=$START_FROM: expected an exported model directory (tools/export_hf.py) outside $OUT/start" >&2
      exit 1
    fi
    echo "using the trained start $START_FROM (no start training)"
    rm -rf "$OUT/start/export"
    cp -r "$START_FROM" "$OUT/start/export"
  else
    python -m trainer.supervise -- deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" trainer/main.py \
      --ds_config ds_configs/zero3.json --train_shards "$TRAIN_SHARDS" --model toy --stage vl --kd_alpha 0 \
      --trainable llm,projector,vision --lr 1e-3 --warmup_steps 100 --max_steps "$START_STEPS" \
      --micro_batch_size 16 --grad_accum 1 --num_workers 1 --max_seq_len 512 --log_every 50 --seed 0 \
      --save_dir "$OUT/start/ckpt" --save_every 1000 --keep_last 1 --resume auto --log_dir "$OUT/start/tb"
    python tools/export_hf.py --checkpoint "$OUT/start/ckpt" --out "$OUT/start/export"
  fi
  python tools/evaluate.py --model "$OUT/start/export" --shards "$HELDOUT_SHARDS" --batch_size 32 \
    --out "$OUT/start/eval/report.json"
fi
START_VL=$(python -c "import json; print(json.load(open('$OUT/start/eval/report.json'))['vl_score'])")
echo "start: VL $START_VL on held-out (needed: $START_MIN_VL)"
if ! python -c "import sys; sys.exit(0 if $START_VL >= $START_MIN_VL else 1)"; then
  echo "the start does not have the typed-question skill (VL $START_VL < $START_MIN_VL): a gap measured from it" \
       "would say little; see $OUT/start/eval/report.json" >&2
  exit 1
fi

echo "== [3/4] the grid: recipes x budgets ($BUDGETS) x seeds ($GRID)"
BUDGET_ARGS=()
for budget in "${BUDGET_NAMES[@]}"; do
  case "$budget" in
    full) BUDGET_ARGS+=(--budget full="$TRAIN_SHARDS") ;;
    10pct) BUDGET_ARGS+=(--budget 10pct="$TENTH") ;;
  esac
done
python tools/compare_recipes.py --grid "$GRID" --out "$GRID_OUT" --start "$OUT/start/export" \
  --heldout_shards "$HELDOUT_SHARDS" "${BUDGET_ARGS[@]}" \
  --num_gpus "$NUM_GPUS" --master_port "$((PORT + 1))" --prune_checkpoints ${SEEDS:+--seeds "$SEEDS"}

echo "== [4/4] results"
cat "$GRID_OUT/results.md"
echo "every run: $GRID_OUT/results.json   plot: $GRID_OUT/results.png"
