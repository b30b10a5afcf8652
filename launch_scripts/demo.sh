#!/usr/bin/env bash
# The whole pipeline on embedded defaults, on any machine (CPU-only is fine):
#   1. set up .venv and install requirements.txt,
#   2. render a small demo set (coloured shapes, grounded questions spoken by eSpeak NG,
#      a held-out split) and write it as WebDataset shards,
#   3. train the tiny omni model with Self-KD under ZeRO-3 on 2 CPU ranks (or all GPUs),
#   4. export the checkpoint, 5. score typed (VL) vs spoken (VA) questions on the held-out split.
#
#   bash launch_scripts/demo.sh                    # everything under demo_out/
#   OUT=/tmp/demo MAX_STEPS=50 bash launch_scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source launch_scripts/setup_env.sh

OUT=${OUT:-demo_out}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-800}
HELDOUT_SAMPLES=${HELDOUT_SAMPLES:-120}
MAX_STEPS=${MAX_STEPS:-300}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
else
  NUM_GPUS=${NUM_GPUS:-2}   # CPU ranks over gloo
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

echo "== [1/4] demo data -> $OUT/data"
mkdir -p "$OUT"
python tools/make_demo_data.py --out "$OUT/data" --train "$TRAIN_SAMPLES" --heldout "$HELDOUT_SAMPLES" --seed 0 --workers 2 \
  | tee "$OUT/data.json"
spec() { python -c "import json, sys; print(json.load(open('$OUT/data.json'))[sys.argv[1]])" "$1"; }
TRAIN_SHARDS=$(spec train_shards)
HELDOUT_SHARDS=$(spec heldout_shards)

echo "== [2/4] Self-KD training, ZeRO-3, $NUM_GPUS ranks"
deepspeed --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29511}" trainer/main.py \
  --ds_config ds_configs/zero3.json \
  --model tiny \
  --train_shards "$TRAIN_SHARDS" \
  --eval_shards "$HELDOUT_SHARDS" \
  --eval_every 100 \
  --kd_alpha 0.75 --teacher shared \
  --micro_batch_size 8 --grad_accum 1 --lr 2e-3 --warmup_steps 20 --max_steps "$MAX_STEPS" \
  --num_workers 1 --max_seq_len 512 \
  --save_dir "$OUT/checkpoints" --save_every 100 --keep_last 2 --resume auto \
  --log_dir "$OUT/tensorboard"

echo "== [3/4] export"
CKPT=$(python -c "from trainer.checkpoint import complete_checkpoints as c; print(c('$OUT/checkpoints')[-1])")
python tools/export_hf.py --checkpoint "$CKPT" --out "$OUT/export"

echo "== [4/4] evaluation: typed (VL) vs spoken (VA) on the held-out split"
python tools/evaluate.py --model "$OUT/export" --shards "$HELDOUT_SHARDS" --out "$OUT/eval/report.json"

cat <<DONE

Demo finished.
  TensorBoard logs : $OUT/tensorboard      (tensorboard --logdir $OUT/tensorboard)
  checkpoint       : $CKPT
  exported model   : $OUT/export
  evaluation       : $OUT/eval/report.json (+ report.predictions.jsonl, report.png)
DONE
