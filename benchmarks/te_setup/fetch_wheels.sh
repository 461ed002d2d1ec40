#!/usr/bin/env bash
# Download, on the development machine (pip + pypi.org), everything the GPU machine needs for
# Transformer Engine and Megatron-Core, and cut the large TE core wheel into pieces that one
# device call each can carry (a call carries at most 64 MiB).
#
#   benchmarks/te_setup/fetch_wheels.sh [DEST]        (DEST defaults to <repo>/.whl, git-ignored)
#
# Result:
#   DEST/base/            small wheels + the transformer-engine-torch sdist (one carry, ~10 MB)
#   DEST/te/part-N/       piece N of the core wheel, plus SHA256SUMS (sha256 of the WHOLE wheel)
#                         and PARTS (how many pieces there are), so any piece names its wheel
#   DEST/te/SHA256SUMS    the same checksum, beside the pieces
#   DEST/full/            the core wheel itself (kept so that a second run downloads nothing)
# Idempotent: what is already there (and checks out) is skipped.
#
# Environment: PYTHON (default python3), TE_PIECE_BYTES (default 56 MiB), PIP_DOWNLOAD_EXTRA
# (extra pip arguments, e.g. an index), TE_FETCH_ONLY=base|te (one half only; tests use it).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
dest=${1:-$repo/.whl}
py=${PYTHON:-python3}
piece_bytes=${TE_PIECE_BYTES:-$((56 * 1024 * 1024))}
only=${TE_FETCH_ONLY:-}

TE_VERSION=2.20.2
MCORE_VERSION=0.19.2
# pydantic pins: the releases the development venv runs (pydantic pins pydantic-core exactly).
BASE_WHEELS=(
  "transformer-engine==$TE_VERSION"
  "megatron-core==$MCORE_VERSION"
  "pydantic==2.14.3"
  "pydantic-core==2.50.4"
  "annotated-types==0.8.0"
  "typing-inspection==0.4.5"
)
CORE_WHEEL="transformer-engine-cu13==$TE_VERSION"
SDIST_NAME=transformer-engine-torch

# The GPU machine: CPython 3.12 on x86-64 Linux. pip matches manylinux_2_N tags exactly, so the
# usual ones are all named.
PLATFORM_ARGS=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for tag in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64 any; do
  PLATFORM_ARGS+=(--platform "$tag")
done

log() { printf 'fetch_wheels: %s\n' "$*" >&2; }

# The file name a wheel of NAME==VERSION starts with (wheel names use '_' for '-').
wheel_prefix() { local spec=$1; local name=${spec%%==*} version=${spec##*==}; printf '%s-%s-' "${name//-/_}" "$version"; }

have() { compgen -G "$1" >/dev/null; }

download_wheel() {  # SPEC DIR: pip download one wheel unless it is there
  local spec=$1 dir=$2 prefix
  prefix=$(wheel_prefix "$spec")
  if have "$dir/$prefix*.whl"; then
    log "have $(basename "$(compgen -G "$dir/$prefix*.whl" | head -n1)")"
    return
  fi
  log "downloading $spec"
  # shellcheck disable=SC2086  # PIP_DOWNLOAD_EXTRA is a list of words on purpose
  "$py" -m pip download --quiet --no-deps --only-binary=:all: "${PLATFORM_ARGS[@]}" ${PIP_DOWNLOAD_EXTRA:-} \
    -d "$dir" "$spec"
  have "$dir/$prefix*.whl" || { log "pip saved no $prefix*.whl in $dir"; exit 1; }
}

download_sdist() {  # pip download of an sdist would build it; fetch the file from PyPI's JSON API
  local dir=$1 file="${SDIST_NAME//-/_}-$TE_VERSION.tar.gz"
  if [[ -s $dir/$file ]]; then log "have $file"; return; fi
  log "downloading $file"
  "$py" - "$SDIST_NAME" "$TE_VERSION" "$dir" <<'PY'
import hashlib, json, sys, urllib.error, urllib.parse, urllib.request
from pathlib import Path

name, version, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])
page = f"https://pypi.org/pypi/{name}/{version}/json"

def get_json(url):
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.load(r)

try:  # the release's own page; some mirrors serve only the project page, whose "releases" has it too
    files = get_json(page)["urls"]
except urllib.error.HTTPError as e:
    if e.code != 404:
        raise
    page = f"https://pypi.org/pypi/{name}/json"
    files = get_json(page)["releases"].get(version, [])
sdists = [u for u in files if u["packagetype"] == "sdist"]
if not sdists:
    sys.exit(f"fetch_wheels: PyPI lists no sdist for {name}=={version}")
url = sdists[0]
# a mirror may give file URLs relative to the JSON page
with urllib.request.urlopen(urllib.parse.urljoin(page, url["url"]), timeout=300) as r:
    data = r.read()
if hashlib.sha256(data).hexdigest() != url["digests"]["sha256"]:
    sys.exit(f"fetch_wheels: sha256 of {url['filename']} differs from PyPI's")
tmp = folder / (url["filename"] + ".tmp")
tmp.write_bytes(data)
tmp.rename(folder / url["filename"])
PY
  [[ -s $dir/$file ]] || { log "expected $dir/$file after the download"; exit 1; }
}

pieces_ok() {  # TE_DIR: the pieces there are within the size limit and add up to the checksum
  local te=$1 n i piece
  n=$(cat "$te/part-1/PARTS" 2>/dev/null) || return 1
  for ((i = 1; i <= n; i++)); do
    piece=$(compgen -G "$te/part-$i/*.part-*") || return 1
    (($(stat -c %s "$piece") <= piece_bytes)) || return 1
    cat "$piece"
  done | sha256sum | cut -d' ' -f1 | grep -qx "$(cut -d' ' -f1 "$te/SHA256SUMS")"
}

split_core() {  # WHEEL TE_DIR: pieces of <= piece_bytes in TE_DIR/part-N/, checksum beside
  local wheel=$1 te=$2 name sum parts
  name=$(basename "$wheel")
  if [[ -f $te/SHA256SUMS ]] && (cd "$(dirname "$wheel")" && sha256sum --quiet -c "$te/SHA256SUMS" 2>/dev/null) \
     && pieces_ok "$te"; then
    log "have $(compgen -G "$te/part-*" | wc -l) pieces of $name"
    return
  fi
  rm -rf "$te" && mkdir -p "$te/.split"
  sum=$(sha256sum "$wheel" | cut -d' ' -f1)
  split -b "$piece_bytes" -d -a 2 "$wheel" "$te/.split/$name.part-"
  parts=$(compgen -G "$te/.split/*" | wc -l)
  local i=0 piece
  for piece in "$te/.split"/*; do  # part-1 holds .part-00, part-2 .part-01, ...
    i=$((i + 1))
    mkdir -p "$te/part-$i"
    mv "$piece" "$te/part-$i/"
    printf '%s  %s\n' "$sum" "$name" >"$te/part-$i/SHA256SUMS"
    echo "$parts" >"$te/part-$i/PARTS"
  done
  rmdir "$te/.split"
  printf '%s  %s\n' "$sum" "$name" >"$te/SHA256SUMS"
  log "split $name ($(stat -c %s "$wheel") bytes) into $parts pieces of <= $piece_bytes bytes"
}

mkdir -p "$dest/base" "$dest/full"
dest=$(cd "$dest" && pwd)  # absolute: split_core changes directory
if [[ $only != te ]]; then
  for spec in "${BASE_WHEELS[@]}"; do download_wheel "$spec" "$dest/base"; done
  download_sdist "$dest/base"
fi
if [[ $only != base ]]; then
  download_wheel "$CORE_WHEEL" "$dest/full"
  split_core "$(compgen -G "$dest/full/$(wheel_prefix "$CORE_WHEEL")*.whl" | head -n1)" "$dest/te"
fi

log "done:"
du -sh "$dest"/base "$dest"/te/part-* 2>/dev/null | sed 's/^/  /' >&2
