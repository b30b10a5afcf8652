# Sourced by train.sh and slurm_train.sbatch: use the project's environment without
# installing anything (compute nodes may have no network): $VENV, else .venv at the repo
# root (what launch_scripts/setup_env.sh creates), else whatever python/deepspeed are on PATH.
REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV=${VENV:-$REPO_ROOT/.venv}
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"   # as setup_env.sh
fi
if [ "${DRY_RUN:-0}" != "1" ] && ! command -v deepspeed >/dev/null; then
  echo "$(basename "$0"): deepspeed not found: no environment at $VENV and none on PATH." >&2
  echo "  Create one with 'bash tests/run.sh' (or 'source launch_scripts/setup_env.sh'), or set VENV=/path/to/venv." >&2
  exit 127
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
