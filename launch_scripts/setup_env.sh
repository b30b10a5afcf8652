# Sourced by demo.sh and tests/run.sh: creates .venv at the repo root on first use, installs
# the pinned requirements.txt into it and the project itself (`pip install -e .`: the trainer
# and datagen packages); later calls reuse it (re-installing only when requirements.txt or
# pyproject.toml changed). Set VENV=/path to use another location.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
# DeepSpeed JIT-builds its ops (shm_comm on CPU ranks) into torch's extension cache, by default one
# per user: two environments (two checkouts, a clean clone beside a working tree) would overwrite
# each other's build and rebuild at every start. One cache per environment.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$REPO_ROOT/requirements.txt" "$REPO_ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing requirements.txt into $VENV (first run: a few minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$REPO_ROOT/requirements.txt"
  python -m pip install -q --no-deps --no-build-isolation -e "$REPO_ROOT"
  rm -rf "$VENV/torch_extensions"  # ops built against the old torch/deepspeed are rebuilt
  # DeepSpeed's shared-memory collective for CPU ranks (nothing on a GPU machine), built now
  # rather than JIT-built by the first launch, about a minute into someone's first run.
  python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
  echo "$WANT" > "$STAMP"
fi
