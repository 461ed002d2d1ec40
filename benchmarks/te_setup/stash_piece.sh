#!/usr/bin/env bash
# On the GPU machine: keep one carried piece of the TE core wheel for install_on_gpu.sh.
# A device call carries at most 64 MiB, so the 276 MB wheel arrives over several back-to-back
# calls; files under /tmp survive between calls while the machine stays warm (~30 s idle).
#
#   bash benchmarks/te_setup/stash_piece.sh .whl/te/part-N
#
# Environment: TE_PIECES (default /tmp/te_pieces).
set -euo pipefail

part=${1:?usage: stash_piece.sh PART_DIR (e.g. .whl/te/part-1)}
pieces=${TE_PIECES:-/tmp/te_pieces}

[[ -d $part ]] || { echo "stash_piece: $part is not a folder (was it named in the call's carry?)" >&2; exit 1; }
for need in SHA256SUMS PARTS; do
  [[ -f $part/$need ]] || { echo "stash_piece: $part/$need is missing: not a folder made by fetch_wheels.sh" >&2; exit 1; }
done
compgen -G "$part/*.part-*" >/dev/null || { echo "stash_piece: no *.part-* file in $part" >&2; exit 1; }

mkdir -p "$pieces"
if [[ -f $pieces/SHA256SUMS ]] && ! cmp -s "$pieces/SHA256SUMS" "$part/SHA256SUMS"; then
  # Pieces of another wheel (an older fetch): they must not be mixed with this one's.
  echo "stash_piece: $pieces held pieces of another wheel; starting over" >&2
  rm -f "$pieces"/*
fi
cp "$part"/*.part-* "$part/SHA256SUMS" "$part/PARTS" "$pieces/"
have=$(compgen -G "$pieces/*.part-*" | wc -l)
echo "stash_piece: $(basename "$(compgen -G "$part/*.part-*" | head -n1)") stashed in $pieces ($have of $(cat "$pieces/PARTS") pieces there)"
