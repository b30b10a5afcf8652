#!/usr/bin/env bash
# Train through the deepspeed launcher, on one node or several (hostfile + ssh/pdsh).
#
#   NUM_GPUS=8 bash launch_scripts/train.sh --config launch_scripts/recipes/selfkd_qwen2vl7b.yaml
#   NUM_NODES=4 HOSTFILE=hostfile bash launch_scripts/train.sh --config ...   # hostfile: "node1 slots=8" lines
#   DRY_RUN=1 NUM_NODES=4 HOSTFILE=hostfile bash launch_scripts/train.sh ...  # print the command only
#   salloc -N 4 ... then: bash launch_scripts/train.sh ...    # inside an allocation: nodes, hostfile and
#                                                              # master come from SLURM_JOB_NODELIST
#
# Every argument is passed to trainer/main.py unchanged. On a SLURM cluster use
# launch_scripts/slurm_train.sbatch instead (no ssh between nodes needed).
#
# The launch runs under trainer.supervise: SIGUSR1 or SIGTERM to this script's process makes
# every rank finish its step, save and exit 75 (resume with --resume auto); no rank outlives
# the launch; the exit code is the ranks' (0 finished, 75 stopped and saved, other: failed;
# docs/reliability.md). The environment is .venv (or $VENV) when present.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch_scripts/find_env.sh

NUM_GPUS=${NUM_GPUS:-8}              # per node
HOSTFILE=${HOSTFILE:-}
MASTER_ADDR=${MASTER_ADDR:-}
if [ -n "${SLURM_JOB_NODELIST:-}" ] && [ -z "$HOSTFILE" ]; then
  # Inside a SLURM allocation: one hostfile line per allocated node, rank 0 on the first.
  NUM_NODES=${NUM_NODES:-${SLURM_JOB_NUM_NODES:-1}}
  HOSTFILE=logs/hostfile-${SLURM_JOB_ID:-local}
  mkdir -p logs
  python3 -m trainer.slurm hosts "$SLURM_JOB_NODELIST" | head -n "$NUM_NODES" | sed "s/\$/ slots=$NUM_GPUS/" > "$HOSTFILE"
  MASTER_ADDR=${MASTER_ADDR:-$(head -n1 "$HOSTFILE" | cut -d' ' -f1)}
fi
NUM_NODES=${NUM_NODES:-1}
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-}             # set to override the run's --ds_config (else: YAML, then zero3.json)
DRY_RUN=${DRY_RUN:-0}

if [ "$NUM_NODES" -gt 1 ] && [ -z "$HOSTFILE" ]; then
  echo "train.sh: NUM_NODES=$NUM_NODES needs HOSTFILE (lines like 'node1 slots=8')" >&2
  exit 2
fi

cmd=(python -m trainer.supervise -- deepspeed --num_nodes "$NUM_NODES" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT")
[ -n "$HOSTFILE" ] && cmd+=(--hostfile "$HOSTFILE")
[ -n "$MASTER_ADDR" ] && cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(trainer/main.py)
[ -n "$DS_CONFIG" ] && cmd+=(--ds_config "$DS_CONFIG")
cmd+=("$@")

if [ "$DRY_RUN" = "1" ]; then
  if [ -n "$HOSTFILE" ] && [ -f "$HOSTFILE" ]; then
    # The launcher gives node ranks in hostfile order.
    awk '{print "node " NR-1 ": " $1}' "$HOSTFILE" | head -n "$NUM_NODES"
  fi
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
