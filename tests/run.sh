#!/usr/bin/env bash
# The test suite: sets up .venv (see launch_scripts/setup_env.sh), then runs pytest on
# TEST_WORKERS pytest-xdist workers (default 2: a launch's start-up, a SLURM requeue and the
# single-process tests leave a core idle that the other worker uses; tests/README.md).
#   bash tests/run.sh                        # everything, as CI does
#   bash tests/run.sh -m "not slow"          # the quick loop
#   bash tests/run.sh tests/test_config.py -k precedence
#   TEST_WORKERS=0 bash tests/run.sh ...     # one process (pdb, -s)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch_scripts/setup_env.sh
paths=(tests)
for arg in "$@"; do
  if [ -e "${arg%%::*}" ]; then paths=(); break; fi
done
exec python -m pytest -ra -p no:cacheprovider -W ignore::DeprecationWarning -n "${TEST_WORKERS:-2}" --dist loadgroup \
  "${paths[@]}" "$@"
