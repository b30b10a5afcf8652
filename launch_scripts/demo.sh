#!/usr/bin/env bash
# The paper's story at toy scale, on any machine (CPU-only is fine):
#   1. set up .venv and install requirements.txt,
#   2. render a small demo set (coloured shapes, grounded questions spoken by eSpeak NG,
#      a held-out split) and write it as WebDataset shards,
#   3. give the random-init tiny model a typed-question (vision-text) skill: --stage vl,
#   4. measure its typed (VL) vs spoken (VA) gap on the held-out split,
#   5. Self-KD under ZeRO-3 (typed path teaches the spoken path; 2 CPU ranks, or all GPUs),
#   6. export and measure VL vs VA again.
#
#   bash launch_scripts/demo.sh                    # everything under demo_out/
#   OUT=/tmp/demo VL_STEPS=100 KD_STEPS=100 bash launch_scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launch_scripts/setup_env.sh

OUT=${OUT:-demo_out}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-800}
HELDOUT_SAMPLES=${HELDOUT_SAMPLES:-120}
VL_STEPS=${VL_STEPS:-300}
KD_STEPS=${KD_STEPS:-450}
source launch_scripts/local_ranks.sh
PORT=${MASTER_PORT:-29511}

echo "== [1/5] demo data -> $OUT/data"
mkdir -p "$OUT"
python tools/make_demo_data.py --out "$OUT/data" --train "$TRAIN_SAMPLES" --heldout "$HELDOUT_SAMPLES" --seed 0 --workers 2 \
  | tee "$OUT/data.json"
spec() { python -c "import json, sys; print(json.load(open('$OUT/data.json'))[sys.argv[1]])" "$1"; }
TRAIN_SHARDS=$(spec train_shards)
HELDOUT_SHARDS=$(spec heldout_shards)
COMMON=(--ds_config ds_configs/zero3.json --train_shards "$TRAIN_SHARDS" --micro_batch_size 8 --grad_accum 1
        --warmup_steps 20 --num_workers 1 --max_seq_len 512 --log_every 10)

echo "== [2/5] typed-question training of the random tiny model (--stage vl), $NUM_GPUS ranks"
deepspeed --num_gpus "$NUM_GPUS" --master_port "$PORT" trainer/main.py "${COMMON[@]}" \
  --model tiny --stage vl --kd_alpha 0 --lr 3e-3 --max_steps "$VL_STEPS" \
  --save_dir "$OUT/checkpoints_vl" --save_every "$VL_STEPS" --log_dir "$OUT/tensorboard/vl"
python tools/export_hf.py --checkpoint "$OUT/checkpoints_vl" --out "$OUT/export_vl"   # the newest complete checkpoint

echo "== [3/5] before Self-KD: typed (VL) vs spoken (VA)"
python tools/evaluate.py --model "$OUT/export_vl" --shards "$HELDOUT_SHARDS" --out "$OUT/eval_before/report.json"

echo "== [4/5] Self-KD, ZeRO-3, $NUM_GPUS ranks: the typed path teaches the spoken path (projector + Whisper trained)"
deepspeed --num_gpus "$NUM_GPUS" --master_port "$((PORT + 1))" trainer/main.py "${COMMON[@]}" \
  --model "$OUT/export_vl" --stage selfkd --kd_alpha 0.75 --teacher shared --trainable projector,audio --lr 2e-3 \
  --max_steps "$KD_STEPS" --eval_shards "$HELDOUT_SHARDS" --eval_every 150 \
  --save_dir "$OUT/checkpoints" --save_every 150 --keep_last 2 --resume auto --log_dir "$OUT/tensorboard/selfkd"
python tools/export_hf.py --checkpoint "$OUT/checkpoints" --out "$OUT/export"

echo "== [5/5] after Self-KD: typed (VL) vs spoken (VA)"
python tools/evaluate.py --model "$OUT/export" --shards "$HELDOUT_SHARDS" --out "$OUT/eval/report.json"

score() { python -c "import json; r=json.load(open('$1')); print(f\"VL {r['vl_score']:.1f}  VA {r['va_score']:.1f}  gap {r['gap']:.1f}  (n={r['n']})\")"; }
cat <<DONE

Demo finished.
  before Self-KD   : $(score "$OUT/eval_before/report.json")
  after Self-KD    : $(score "$OUT/eval/report.json")
  TensorBoard logs : $OUT/tensorboard      (tensorboard --logdir $OUT/tensorboard)
  checkpoints      : $OUT/checkpoints
  exported model   : $OUT/export
  evaluation       : $OUT/eval/report.json (+ report.predictions.jsonl, report.png; before: $OUT/eval_before/)
DONE
