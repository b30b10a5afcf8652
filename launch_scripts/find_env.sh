# Sourced by train.sh and slurm_train.sbatch: use the project's environment without
# installing anything (compute nodes may have no network): $VENV, else .venv at the repo
# root (what launch_scripts/setup_env.sh creates), else whatever python/deepspeed are on PATH.
REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV=${VENV:-$REPO_ROOT/.venv}
if [ -f "$VENV/bin/activate" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate"
fi
# DeepSpeed's JIT-built ops in the environment's own cache, as setup_env.sh does (a conda or other
# active environment counts too; with none, torch's per-user default stays).
ENV_PREFIX=${VIRTUAL_ENV:-${CONDA_PREFIX:-}}
if [ -n "$ENV_PREFIX" ]; then
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ENV_PREFIX/torch_extensions}"
fi
if [ "${DRY_RUN:-0}" != "1" ] && ! command -v deepspeed >/dev/null; then
  echo "$(basename "$0"): deepspeed not found: no environment at $VENV and none on PATH." >&2
  echo "  Create one with 'bash tests/run.sh' (or 'source launch_scripts/setup_env.sh'), or set VENV=/path/to/venv." >&2
  exit 127
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
