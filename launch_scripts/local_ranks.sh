# Sourced by demo.sh and study_selfkd_vs_sft.sh (after setup_env.sh): NUM_GPUS, when not given,
# is every local GPU, else 2 CPU ranks over gloo; one OpenMP thread per rank unless set.
if [ -n "${NUM_GPUS:-}" ]; then
  :  # given: no need to ask torch (a 3 s import) what the machine has
elif python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  NUM_GPUS=${NUM_GPUS:-$(python -c "import torch; print(torch.cuda.device_count())")}
else
  NUM_GPUS=${NUM_GPUS:-2}   # CPU ranks over gloo
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
