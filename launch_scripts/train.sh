#!/usr/bin/env bash
# Train through the deepspeed launcher, on one node or several (hostfile + ssh/pdsh).
#
#   NUM_GPUS=8 bash launch_scripts/train.sh --config launch_scripts/recipes/selfkd_qwen2vl7b.yaml
#   NUM_NODES=4 HOSTFILE=hostfile bash launch_scripts/train.sh --config ...   # hostfile: "node1 slots=8" lines
#   DRY_RUN=1 NUM_NODES=4 HOSTFILE=hostfile bash launch_scripts/train.sh ...  # print the command only
#
# Every argument is passed to trainer/main.py unchanged. On a SLURM cluster use
# launch_scripts/slurm_train.sbatch instead (no ssh between nodes needed).
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_NODES=${NUM_NODES:-1}
NUM_GPUS=${NUM_GPUS:-8}              # per node
HOSTFILE=${HOSTFILE:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3.json}
DRY_RUN=${DRY_RUN:-0}

if [ "$NUM_NODES" -gt 1 ] && [ -z "$HOSTFILE" ]; then
  echo "train.sh: NUM_NODES=$NUM_NODES needs HOSTFILE (lines like 'node1 slots=8')" >&2
  exit 2
fi

cmd=(deepspeed --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
[ -n "$HOSTFILE" ] && cmd+=(--hostfile "$HOSTFILE")
[ -n "$MASTER_ADDR" ] && cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(trainer/main.py --ds_config "$DS_CONFIG" "$@")

if [ "$DRY_RUN" = "1" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
