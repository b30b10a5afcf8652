#!/usr/bin/env bash
# The test suite: sets up .venv (see launch_scripts/setup_env.sh), then runs pytest.
#   bash tests/run.sh                        # everything, as CI does
#   bash tests/run.sh -m "not slow"          # the quick loop
#   bash tests/run.sh tests/test_config.py -k precedence
set -euo pipefail
cd "$(dirname "$0")/.."
source launch_scripts/setup_env.sh
paths=(tests)
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then paths=(); break; fi
done
exec python -m pytest -ra -p no:cacheprovider -W ignore::DeprecationWarning "${paths[@]}" "$@"
