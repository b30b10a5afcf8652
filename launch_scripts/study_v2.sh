#!/usr/bin/env bash
# Study v2: Self-KD vs SFT from a start that reads and hears (docs/study.md). The protocol is in
# this script and its two grid files, committed before any of their runs; CPU-only is fine.
#   1. data: the aligned start's (launch_scripts/build_aligned_start.sh; same command, same files),
#   2. the start: docs/results/selfkd_vs_sft_v2/start (START_FROM), scored again on the held-out
#      questions and sentences; the grid runs only when it meets the start's targets
#      (tools/start_report.py: VL >= 70, WER <= 10%, VA <= VL - 15, >= 80% right-kind spoken answers),
#   3. the scarce budget (launch_scripts/grids/study_v2_scarce.yaml: the first 2 of the 16 training
#      shards, 1,000 of the 8,000 scenes): SFT, Self-KD alpha 0.25/0.5/0.75/1.0 (shared teacher), alpha
#      0.75 with the frozen and the EMA teacher, 5 seeds,
#   4. the larger budget (launch_scripts/grids/study_v2_larger.yaml: all 16 shards): SFT, alpha 0.75
#      shared and frozen, 3 seeds,
#   5. the mechanism (tools/study_mechanism.py): per-layer attention share from the question to the
#      image, typed vs spoken, and the "yes" share, for the start, the SFT runs and the best Self-KD
#      recipe's runs (scarce budget), paired by seed; OUT/mechanism/{mechanism.json,mechanism.png}.
# Every step resumes: finished runs are not redone.
#
#   bash launch_scripts/study_v2.sh                   # everything under study_v2_out/
#   OUT=/tmp/v2 SEEDS=0 BUDGETS=scarce bash launch_scripts/study_v2.sh
set -euo pipefail
START_FROM=$(realpath "${START_FROM:-$(dirname "$0")/../docs/results/selfkd_vs_sft_v2/start}")
cd "$(dirname "$0")/.."
source launch_scripts/setup_env.sh

OUT=${OUT:-study_v2_out}
SCARCE_SHARDS=${SCARCE_SHARDS:-2}
# The start's targets (tools/start_report.py); the protocol's values are these defaults.
# The WER leaves out the held-out sentences the start's lineage heard in its alignment data (docs/study.md).
EXCLUDE_SENTENCES=${EXCLUDE_SENTENCES:-docs/results/selfkd_vs_sft_v2/once_spoken_heldout.json}
START_TARGETS=(--exclude_sentences "$EXCLUDE_SENTENCES"
               --min_vl "${START_MIN_VL:-70}" --max_wer "${START_MAX_WER:-0.10}" --min_gap "${START_MIN_GAP:-15}"
               --min_kind "${START_MIN_KIND:-0.80}")
BUDGETS=${BUDGETS:-scarce,larger}
SCARCE_GRID=${SCARCE_GRID:-launch_scripts/grids/study_v2_scarce.yaml}
LARGER_GRID=${LARGER_GRID:-launch_scripts/grids/study_v2_larger.yaml}
MECHANISM_LIMIT=${MECHANISM_LIMIT:-100}
IFS=, read -ra BUDGET_NAMES <<< "$BUDGETS"
for budget in "${BUDGET_NAMES[@]}"; do
  case "$budget" in
    scarce) grid=$SCARCE_GRID ;;
    larger) grid=$LARGER_GRID ;;
    *) echo "BUDGETS=$BUDGETS: expected scarce and/or larger, got '$budget'" >&2; exit 1 ;;
  esac
  if [ ! -f "$grid" ]; then
    echo "$grid: no such grid file; the protocol's grids are committed after the pilot and before any run" \
         "(docs/study.md)" >&2
    exit 1
  fi
done
source launch_scripts/local_ranks.sh
PORT=${MASTER_PORT:-29561}
mkdir -p "$OUT"

echo "== [1/5] data -> $OUT/data"
source launch_scripts/v2_data.sh
TRAIN_SHARDS=$(spec train_shards)
HELDOUT_SHARDS=$(spec heldout_shards)
SCARCE=$(python - "$TRAIN_SHARDS" "$SCARCE_SHARDS" <<'PY'
import sys
from trainer.data.shards import expand_shard_spec
print(",".join(expand_shard_spec(sys.argv[1])[: int(sys.argv[2])]))
PY
)

echo "== [2/5] the start: $START_FROM"
if [ ! -f "$OUT/start/eval/start_report.json" ]; then
  python tools/evaluate.py --model "$START_FROM" --shards "$HELDOUT_SHARDS" --batch_size 32 --out "$OUT/start/eval/report.json"
  python tools/evaluate.py --model "$START_FROM" --transcribe --shards "$(spec asr_heldout_shards)" --batch_size 32 \
    --out "$OUT/start/eval/transcribe.json"
fi
if ! python tools/start_report.py --answers "$OUT/start/eval/report.json" --transcribe "$OUT/start/eval/transcribe.json" \
       --out "$OUT/start/eval/start_report.json" "${START_TARGETS[@]}"; then
  echo "the start misses its targets (above): the study does not run from it" >&2
  exit 1
fi

n=0
for budget in "${BUDGET_NAMES[@]}"; do
  case "$budget" in
    scarce) grid=$SCARCE_GRID; shards=$SCARCE ;;
    larger) grid=$LARGER_GRID; shards=$TRAIN_SHARDS ;;
  esac
  echo "== [$((3 + n))/5] the $budget budget ($grid)"
  python tools/compare_recipes.py --grid "$grid" --out "$OUT/$budget" --start "$START_FROM" \
    --heldout_shards "$HELDOUT_SHARDS" --budget "$budget=$shards" --num_gpus "$NUM_GPUS" \
    --master_port "$((PORT + 1 + 100 * n))" --prune_checkpoints ${SEEDS:+--seeds "$SEEDS"}
  cat "$OUT/$budget/results.md"
  n=$((n + 1))
done

echo "== [5/5] the mechanism: attention to the image and the yes share, typed vs spoken"
if [ -d "$OUT/scarce/runs" ]; then
  python tools/study_mechanism.py --start "$START_FROM" --grid_out "$OUT/scarce" --budget scarce \
    --shards "$HELDOUT_SHARDS" --limit "$MECHANISM_LIMIT" --start_report "$OUT/start/eval/report.json" \
    --out "$OUT/mechanism"
fi
echo "results: $OUT/{scarce,larger}/results.{json,md,png}   mechanism: $OUT/mechanism/"
