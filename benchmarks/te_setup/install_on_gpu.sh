#!/usr/bin/env bash
# On the GPU machine (Python 3.12, torch with CUDA, no network): install Transformer Engine,
# Megatron-Core, pydantic and this package into one --target folder, from the pieces stashed by
# stash_piece.sh and the small wheels carried in .whl/base (both made by fetch_wheels.sh).
#
#   bash benchmarks/te_setup/install_on_gpu.sh [BASE_DIR]      (BASE_DIR defaults to .whl/base)
#   eval "$(bash benchmarks/te_setup/install_on_gpu.sh | tail -n1)"   # sets PYTHONPATH
#
# Steps: reassemble the core wheel with cat and check its sha256; pip install --no-index
# --no-deps --target SITE the core, meta, Megatron-Core and pydantic wheels; build the torch
# extension from the transformer-engine-torch sdist (~2 min on 16 cores) into a separate folder
# and move its transformer_engine/wheel_lib/*.so and dist-info into SITE/transformer_engine
# (pip --target never merges into an existing package folder, and TE looks for the extension
# only there); install this repository without its dependencies; import transformer_engine.pytorch.
# Idempotent on a warm machine: a TE install that already imports is kept.
# The last line printed is `export PYTHONPATH=...`.
#
# Environment: TE_PIECES (default /tmp/te_pieces), TE_SITE (/tmp/site), TE_WORK (/tmp/te_work),
# PYTHON (python3), NVTE_CUDA_ARCHS (90: Hopper), MAX_JOBS (16), TE_SKIP_BUILD=1 (reassemble and
# check only: what the CPU tests run).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
base=${1:-$repo/.whl/base}
# absolute: reassembly changes directory, and PYTHONPATH must not depend on where it is read
pieces=$(realpath -m "${TE_PIECES:-/tmp/te_pieces}")
site=$(realpath -m "${TE_SITE:-/tmp/site}")
work=$(realpath -m "${TE_WORK:-/tmp/te_work}")
py=${PYTHON:-python3}

log() { printf 'install_on_gpu: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

reassemble() {  # prints the path of the checked core wheel
  [[ -f $pieces/SHA256SUMS && -f $pieces/PARTS ]] \
    || die "no SHA256SUMS/PARTS in $pieces: stash every piece first (stash_piece.sh .whl/te/part-N)"
  local name want have sum
  name=$(awk '{print $2}' "$pieces/SHA256SUMS")
  want=$(cat "$pieces/PARTS")
  mkdir -p "$work"
  if [[ -f $work/$name ]] && (cd "$work" && sha256sum --quiet -c "$pieces/SHA256SUMS" >/dev/null 2>&1); then
    printf '%s\n' "$work/$name"; return
  fi
  local missing=()
  for ((i = 0; i < want; i++)); do
    [[ -f $pieces/$name.part-$(printf %02d "$i") ]] || missing+=("part-$((i + 1))")
  done
  ((${#missing[@]} == 0)) || die "$pieces lacks ${missing[*]} of $want pieces of $name (stash_piece.sh .whl/te/part-N for each)"
  have=$(compgen -G "$pieces/$name.part-*" | wc -l)
  ((have == want)) || die "$pieces holds $have pieces of $name, PARTS says $want"
  cat "$pieces/$name".part-* >"$work/$name.tmp"   # the glob sorts part-00, part-01, ...
  mv "$work/$name.tmp" "$work/$name"
  sum=$(sha256sum "$work/$name" | cut -d' ' -f1)
  [[ $sum == "$(cut -d' ' -f1 "$pieces/SHA256SUMS")" ]] \
    || { rm -f "$work/$name"; die "reassembled $name has sha256 $sum, expected $(cut -d' ' -f1 "$pieces/SHA256SUMS")"; }
  log "reassembled $name ($(stat -c %s "$work/$name") bytes, sha256 ok)"
  printf '%s\n' "$work/$name"
}

te_imports() { PYTHONPATH=$site "$py" -c "import transformer_engine.pytorch" >/dev/null 2>&1; }

if [[ ${TE_SKIP_BUILD:-0} != 1 ]] && te_imports; then
  log "transformer_engine.pytorch already imports from $site: keeping it"
else
  core=$(reassemble)
  if [[ ${TE_SKIP_BUILD:-0} == 1 ]]; then
    log "TE_SKIP_BUILD=1: stopping after the checked reassembly"
    exit 0
  fi
  [[ -d $base ]] || die "$base is not a folder (name .whl/base in the call's carry)"
  sdist=$(compgen -G "$base/transformer_engine_torch-*.tar.gz" | head -n1) \
    || die "no transformer_engine_torch-*.tar.gz in $base (made by fetch_wheels.sh)"

  log "installing wheels into $site"
  mapfile -t wheels < <(compgen -G "$base/*.whl")
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$core" "${wheels[@]}"

  log "building the torch extension from $(basename "$sdist") (about 2 minutes)"
  rm -rf "$work/torch_ext"
  # NVTE_PYTORCH_FORCE_BUILD: skip the sdist's attempt to download a prebuilt wheel (no network).
  PYTHONPATH=$site NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} NVTE_FRAMEWORK=pytorch \
    NVTE_PYTORCH_FORCE_BUILD=TRUE \
    "$py" -m pip install -q --no-index --no-build-isolation --no-deps --no-cache-dir --target "$work/torch_ext" "$sdist"
  compgen -G "$work/torch_ext/transformer_engine/wheel_lib/transformer_engine_torch*.so" >/dev/null \
    || die "the build left no transformer_engine/wheel_lib/transformer_engine_torch*.so in $work/torch_ext"
  mkdir -p "$site/transformer_engine/wheel_lib"
  cp "$work"/torch_ext/transformer_engine/wheel_lib/* "$site/transformer_engine/wheel_lib/"
  cp -r "$work"/torch_ext/transformer_engine_torch-*.dist-info "$site/"
fi

log "installing rlmt_megatron from $repo without dependencies"
"$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
  --target "$site" "$repo" >/dev/null

PYTHONPATH=$site "$py" - <<'PY' >&2 || die "import transformer_engine.pytorch failed (see above)"
from importlib.metadata import version
import torch, transformer_engine, transformer_engine.pytorch as te
ok, why = te.is_fp8_available(return_reason=True)
print(f"install_on_gpu: transformer_engine {transformer_engine.__version__}, megatron-core {version('megatron-core')}, "
      f"torch {torch.__version__}, FP8 {'available' if ok else 'unavailable: ' + why}")
PY
echo "export PYTHONPATH=$site"
