#!/usr/bin/env bash
# The GPU benchmark suite on one GPU machine (H100/H200; Python 3.12, torch with CUDA, no network,
# no Megatron-Core installed), one stage per command so each stays within 10 minutes. Results go
# to $OUT (default gpu_results/): OUT/results.md (the sections the benchmarks append; merge them
# into docs/benchmarks.md), OUT/<stage>.log, OUT/<stage>.json.
#
#   bash benchmarks/gpu_suite.sh STAGE [extra args for the stage's benchmark]
#
# Stages (each installs what it needs first; idempotent while the machine stays up):
#   tests     pytest tests/gpu (bf16 parity, 8B-shaped layers, fusions, recompute, CUDA IPC)
#   train     benchmarks/train_step.py        policy step vs transformers + AdamW (SDPA; TE rows
#                                             too once TE is installed, see te_setup/README.md)
#   logprobs  benchmarks/logprob_pass.py      old/ref logprob pass: full logits vs fused vs chunked head
#   sync      benchmarks/weight_sync.py       8B export + sync into the colocated engine, CUDA IPC row
#   grpo      benchmarks/grpo_step.py         one RLMT GRPO step on one GPU, by phase
#   fp8       benchmarks/fp8_parity.py        FP8 vs bf16 loss parity (needs TE: te_setup first)
#
# Before the first stage, copy .whl/base (made on a machine with network access by
# benchmarks/te_setup/fetch_wheels.sh, ~6.6 MB) into the checkout on the GPU machine, then run
#   bash benchmarks/gpu_suite.sh tests
#   bash benchmarks/gpu_suite.sh train
#   ... then the same for logprobs, sync, grpo. For the TE/FP8 rows: the five stash steps of
#   te_setup/README.md, then `bash benchmarks/gpu_suite.sh train` (now with the TE rows) and `... fp8`
#   on the same machine (install_on_gpu.sh runs first when TE pieces are stashed).
#
# Settings: OUT (results folder), PYTHON (interpreter for everything after the CUDA check,
# default python3), TE_SITE (install target, default /tmp/site), BASE_WHEELS (default
# .whl/base), TE_PIECES (stashed TE pieces, default /tmp/te_pieces).
set -euo pipefail

stage=${1:?usage: gpu_suite.sh tests|train|logprobs|sync|grpo|fp8 [args...]}
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${OUT:-$repo/gpu_results}
mkdir -p "$out"
site=${TE_SITE:-/tmp/site}
base=${BASE_WHEELS:-$repo/.whl/base}
py=${PYTHON:-python3}
pieces=${TE_PIECES:-/tmp/te_pieces}
log() { printf 'gpu_suite: %s\n' "$*" >&2; }

python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  || { log "no CUDA device here: this suite is for the GPU machine (the CPU runs are the tests)"; exit 2; }

install() {
  if [[ -d $pieces ]] && compgen -G "$pieces/*.part-*" >/dev/null; then
    # TE pieces were stashed: the full install (TE + Megatron-Core + pydantic + this package)
    bash benchmarks/te_setup/install_on_gpu.sh "$base" >/dev/null
  elif PYTHONPATH=$site "$py" -c "import megatron.core, pydantic" 2>/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
      --target "$site" "$repo" >/dev/null
  else
    [[ -d $base ]] || { log "$base is missing: run benchmarks/te_setup/fetch_wheels.sh here and carry .whl/base"; exit 2; }
    log "installing Megatron-Core, pydantic and rlmt_megatron into $site (no Transformer Engine)"
    mapfile -t wheels < <(compgen -G "$base/*.whl" | grep -v '/transformer_engine-')
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      "${wheels[@]}" "$repo" >/dev/null
  fi
  export PYTHONPATH=$site:$repo PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  "$py" - <<'PY' >&2
from importlib.metadata import version, PackageNotFoundError
import torch
try:
    te = version("transformer-engine")
except PackageNotFoundError:
    te = "absent"
print(f"gpu_suite: {torch.cuda.get_device_name()}, torch {torch.__version__}, megatron-core "
      f"{version('megatron-core')}, transformers {version('transformers')}, transformer-engine {te}")
PY
}

install
results=$out/results.md
set -o pipefail
case $stage in
  tests)    "$py" -m pytest -q -s tests/gpu "$@" 2>&1 | tee "$out/tests.log" ;;
  train)    "$py" benchmarks/train_step.py --json "$out/train.json" --write "$results" "$@" 2>&1 | tee "$out/train.log" ;;
  logprobs) "$py" benchmarks/logprob_pass.py --write "$results" "$@" 2>&1 | tee "$out/logprobs.log" ;;
  sync)     "$py" benchmarks/weight_sync.py --write "$results" "$@" 2>&1 | tee "$out/sync.log" ;;
  grpo)     "$py" benchmarks/grpo_step.py --json "$out/grpo.json" --write "$results" "$@" 2>&1 | tee "$out/grpo.log" ;;
  fp8)      "$py" benchmarks/fp8_parity.py --out-dir "$out" --plot --write "$results" "$@" 2>&1 | tee "$out/fp8.log" ;;
  *)        log "unknown stage '$stage' (tests, train, logprobs, sync, grpo, fp8)"; exit 2 ;;
esac
