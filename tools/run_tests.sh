#!/usr/bin/env bash
# The whole test suite on a CPU machine (sets up the virtualenv first). Extra args go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh" test
cd "$repo"
export OMP_NUM_THREADS=1
python -m pytest -q tests "$@"
