# Sourced by demo.sh and tests/run.sh: creates .venv at the repo root on first use and
# installs requirements.txt into it; later calls reuse it (re-installing only when
# requirements.txt changed). Set VENV=/path to use another location.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REPO_ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[setup] installing requirements.txt into $VENV (first run: a few minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$REPO_ROOT/requirements.txt"
  echo "$WANT" > "$STAMP"
fi
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
