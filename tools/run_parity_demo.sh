#!/usr/bin/env bash
# The main job on a CPU machine: build the tiny models, convert HF -> Megatron at TP=2 (two
# processes), back to HF, compute logprobs and reward scores under Megatron at TP x PP, and
# check them against transformers. Outputs go to runs/parity/ (or $1).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$repo/tools/setup_env.sh" test
out="${1:-$repo/runs/parity}"
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
# torchrun's standalone rendezvous binds a port the OS picks, so two demos run side by side.
run2() { python -m torch.distributed.run --standalone --nproc-per-node 2 "$@"; }

echo "== 1/5 building tiny HF models"
python -m rlmt_megatron.testing.tiny_models --out "$out/models"
echo "== 2/5 HF -> Megatron distributed checkpoint (TP=2, 2 processes)"
run2 -m rlmt_megatron.cli.convert hf-to-mcore --hf "$out/models/llama-policy" --out "$out/mcore/llama-policy" --tp 2
echo "== 3/5 Megatron -> HF (1 process)"
rlmt-convert mcore-to-hf --ckpt "$out/mcore/llama-policy" --out "$out/export/llama-policy"
echo "== 4/5 logprobs (TP=1 x PP=2) and reward scores (TP=2) under Megatron"
run2 -m rlmt_megatron.cli.logprobs --model "$out/mcore/llama-policy" --pp 2 \
  --input "$repo/examples/data/chat_responses.jsonl" --out "$out/logprobs.jsonl"
run2 -m rlmt_megatron.cli.score --rm "$out/models/llama-rm" --tp 2 \
  --input "$repo/examples/data/chat_responses.jsonl" --out "$out/scores.jsonl"
python - "$out/scores.jsonl" <<'PY'
import json, sys
for row in map(json.loads, open(sys.argv[1])):
    print(f"  score {row['score']:+8.3f}  {row['messages'][-1]['content'][:50]}")
PY
echo "== 5/5 parity with transformers"
python -m rlmt_megatron.cli.parity_report --hf "$out/models/llama-policy" \
  --exported "$out/export/llama-policy" --logprobs "$out/logprobs.jsonl"
echo "demo finished: outputs in $out"
