#!/usr/bin/env bash
# The main job on a CPU machine: a real RLMT run on tiny, locally built models.
#   1. build tiny HF models (Llama policy, Llama reward model, locally trained tokenizer);
#   2. train the reward model on synthetic preferences (rlmt-train-rm) so its scores mean
#      something: coherent helpful answers beat curt, shuffled, looping, cut-off, unrelated,
#      gibberish and [NULL] ones, and less broken text beats more broken text; then print its
#      accuracy on a held-out preference set written with other prompts, other sentences and
#      other kinds of bad answer (testing/rm_accuracy.py);
#   3. SFT warm-start in the thinking format <think>…</think> answer (rlmt-sft);
#   4. GRPO against the reward model on the demo's own prompts (asks like the SFT set's), policy at
#      TP=2 over two processes; RLMT_DEMO_PROMPTS=FILE runs it on other prompts;
#   5. plot the curves (rlmt-plot) and print the summary: reward and format rate of the first and
#      last steps, the answers' quality by a rule-based judge independent of the RM, and how well
#      the RM's scores rank the policy's own answers by that quality (testing/answer_quality.py).
# Everything goes to runs/demo/ (or $1): metrics.jsonl, TensorBoard events, W&B offline files,
# per-step samples, checkpoints, the final HF policy, and plots/*.png. Arguments after the folder
# are rlmt-train overrides for the GRPO stage, e.g. two rollout engines, each in its own process,
# generating the next step while this one trains (asynchronous, corrected by TIS):
#   bash tools/run_demo.sh runs/demo2 rollout.engines=2 rollout.engine_process=subprocess \
#     rollout.max_staleness=1 algorithm.rollout_correction.mode=tis
# The folder is cleared first only if this script made it (marker file .rlmt_demo); any other
# folder that is not empty is refused, so nobody's files are deleted.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo/runs/demo}"
grpo_overrides=("${@:2}")
# One line before each stage: the first ones take minutes and print nothing by themselves.
stage() { echo "== $*"; }
stage "RLMT CPU demo into $out"
if [ -e "$out" ] && [ ! -f "$out/.rlmt_demo" ] && { [ ! -d "$out" ] || [ -n "$(ls -A "$out")" ]; }; then
  echo "error: $out exists and is not an empty folder made by tools/run_demo.sh (no $out/.rlmt_demo): give another folder, or empty or remove it yourself" >&2
  exit 2
fi
rm -rf "$out"
mkdir -p "$out"
touch "$out/.rlmt_demo"
# tests stop here: the folder handling is all they check
if [ -n "${RLMT_DEMO_FOLDER_ONLY:-}" ]; then exit 0; fi
stage "0/5 Python environment: virtualenv and pip install of torch and the package (minutes the first time)"
source "$repo/tools/setup_env.sh" test
# The libraries' start-up notices, identical on every command, are silenced one by one (every
# other warning and every error still shows): Megatron's "Transformer Engine and Apex are not
# installed" (CPU fallbacks are expected here), torch's deprecations of the collectives Megatron
# calls, autograd's non-leaf .grad notice from the CPU compat layer, and transformers' advisory
# warnings (TRANSFORMERS_NO_ADVISORY_WARNINGS). PYTHONWARNINGS matches message prefixes.
demo_warnings="ignore:Transformer Engine and Apex are not installed:UserWarning"
demo_warnings+=",ignore:\`torch.distributed.:FutureWarning"
demo_warnings+=",ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"
export OMP_NUM_THREADS=1 PYTHONWARNINGS="$demo_warnings" TRANSFORMERS_NO_ADVISORY_WARNINGS=1 WANDB_SILENT=true
# torchrun's standalone rendezvous binds a port the OS picks, so two demos run side by side.
run2() { python -m torch.distributed.run --standalone --nproc-per-node 2 "$@"; }
quiet() { grep -vE "^(\s|Setting up (optimizer|DistributedDataParallel)|> |Loading weights|Implicit initialization|RerunStateMachine|Params for bucket|Number of buckets|Total number of)" || true; }

stage "1/5 tiny HF models (Llama policy, Llama reward model, tokenizer)"
python -m rlmt_megatron.testing.tiny_models --out "$out/models" | tail -1
stage "1/5 synthetic demo data (SFT thinking traces, preferences, held-out preferences, GRPO prompts)"
python -m rlmt_megatron.testing.demo_data --out "$out/data"
# GRPO's prompts are the demo's own, of the kind the policy was warm-started on: the tiny policy
# answers them in sentences, helpful or curt, that the RM and the rule-based judge can rank, so
# the summary can show whether a rising reward means better answers. On WildChat-IF's prompts
# (RLMT_DEMO_PROMPTS=../shared/data/wildchat-if/wildchat-if_train.parquet) it writes broken text
# and the judged quality stays near 0 (docs/rlmt_train.md, "The CPU demo").
prompts="${RLMT_DEMO_PROMPTS:-$out/data/grpo_prompts.jsonl}"

stage "2/5 reward model on synthetic preferences (Bradley-Terry)"
rlmt-train-rm "$repo/examples/demo/rm.yaml" model="$out/models/llama-rm" \
  "data=[$out/data/preferences.jsonl]" out_dir="$out/rm" 2>&1 | quiet
stage "2/5 reward model on held-out preferences (other prompts, sentences and kinds of bad answer)"
python -m rlmt_megatron.testing.rm_accuracy --rm "$out/rm/hf" --pairs "$out/data/heldout_preferences.jsonl" \
  --out "$out/rm/heldout_scores.jsonl" --report "$out/rm/heldout_accuracy.json" 2>&1 | quiet

stage "3/5 SFT warm-start on synthetic thinking traces"
rlmt-sft "$repo/examples/demo/sft.yaml" model="$out/models/llama-policy" \
  "data=[$out/data/sft_thinking.jsonl]" out_dir="$out/sft" 2>&1 | quiet

stage "4/5 RLMT: GRPO against the reward model (TP=2, two processes)"
run2 -m rlmt_megatron.cli.train "$repo/examples/demo/grpo.yaml" run.out_dir="$out/grpo" \
  models.policy="$out/sft/hf" models.reward="$out/rm/hf" "data.prompts=[$prompts]" \
  build.parallel.tp=2 "${grpo_overrides[@]}" 2>&1 | quiet

stage "5/5 curves"
rlmt-plot "$out/grpo" | tail -1
# The summary: reward and format rate of the first and last fifth of the steps, next to a
# rule-based judge of the same steps' answers that does not use the RM (well-formed sentences of
# the helpful style, 0..1; testing/answer_quality.py says why it is a fair judge here), and the
# rank correlation of the RM's scores with that judge on the policy's own samples.
python -m rlmt_megatron.testing.answer_quality "$out/grpo"
echo "demo finished: outputs in $out/grpo (metrics.jsonl, tensorboard/, wandb/, samples/, plots/, final_hf/)"
