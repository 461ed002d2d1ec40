#!/usr/bin/env bash
# shellcheck disable=SC2015  # "check && check || die" is meant: die when either check fails
# Start an rlmt run under torchrun on this node (run it once per node).
#
#   launch/torchrun.sh [--nproc-per-node N] [--cpu] RECIPE.yaml [key=value ...]
#
# Rendezvous, each value from the first source that has it:
#   nodes        NNODES        | SLURM_STEP_NUM_NODES, SLURM_NNODES   | 1
#   node rank    NODE_RANK     | SLURM_NODEID                         | 0
#   master host  MASTER_ADDR   | first host of SLURM_STEP_NODELIST or SLURM_JOB_NODELIST
#                                (scontrol show hostnames)            | 127.0.0.1
#   master port  MASTER_PORT   | 20000 + SLURM_JOB_ID % 20000         | 29500
#   GPUs/node    GPUS_PER_NODE | SLURM_GPUS_ON_NODE | nvidia-smi -L   | 0
# One node without MASTER_PORT uses torchrun --standalone (a free port: runs sharing a node never
# collide). Processes per node: --nproc-per-node, else one per GPU; without GPUs (or with --cpu,
# which also hides the GPUs) CPU_PROCS_PER_NODE, default 1.
#
# Other environment: RLMT_PYTHON (interpreter, default python), RLMT_MODULE (default
# rlmt_megatron.cli.train; e.g. rlmt_megatron.cli.supervised with args "sft CONFIG"),
# RLMT_WANDB_PROJECT (becomes monitoring.wandb.project), RLMT_RDZV_TIMEOUT_S (multi-node join
# timeout, default 900), and everything launch/env.sh reads.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() { echo "launch/torchrun.sh: error: $*" >&2; exit 2; }
usage() { awk 'NR > 2 && /^#/ { sub(/^# ?/, ""); print; next } NR > 2 { exit }' "${BASH_SOURCE[0]}"; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

nproc=""
cpu_only=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc-per-node) [[ $# -ge 2 ]] || die "--nproc-per-node needs a value"; nproc="$2"; shift 2 ;;
    --nproc-per-node=*) nproc="${1#*=}"; shift ;;
    --cpu) cpu_only=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || die "missing RECIPE.yaml (usage: launch/torchrun.sh [--nproc-per-node N] [--cpu] RECIPE.yaml [key=value ...])"
module="${RLMT_MODULE:-rlmt_megatron.cli.train}"
if [[ "$module" == rlmt_megatron.cli.train && ! -f "$1" ]]; then
  die "recipe '$1' not found (relative paths are read from $(pwd))"
fi

# --- nodes -------------------------------------------------------------------------------------
in_slurm=0
[[ -n "${SLURM_JOB_ID:-}" ]] && in_slurm=1
nnodes="${NNODES:-${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-1}}}"
node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
is_uint "$nnodes" && ((nnodes >= 1)) || die "NNODES must be a positive integer (got '$nnodes')"
is_uint "$node_rank" && ((node_rank < nnodes)) || die "NODE_RANK must be in [0, $nnodes) (got '$node_rank')"

master_addr="${MASTER_ADDR:-}"
if [[ -z "$master_addr" && $nnodes -gt 1 ]]; then
  nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}"
  [[ $in_slurm -eq 1 && -n "$nodelist" ]] || die "$nnodes nodes need MASTER_ADDR (or a SLURM job's node list)"
  command -v scontrol > /dev/null || die "scontrol not found: cannot expand SLURM node list '$nodelist'"
  # Whole output first: `| head -n 1` would end scontrol with SIGPIPE, fatal under pipefail.
  hosts="$(scontrol show hostnames "$nodelist")" || die "scontrol show hostnames '$nodelist' failed"
  master_addr="${hosts%%$'\n'*}"
  [[ -n "$master_addr" ]] || die "scontrol show hostnames '$nodelist' printed no host"
fi
master_port="${MASTER_PORT:-}"
if [[ -z "$master_port" && $nnodes -gt 1 ]]; then
  # Derived from the job id so every node of a job computes the same port without talking,
  # and two jobs sharing a first node rarely collide.
  if [[ $in_slurm -eq 1 ]] && is_uint "$SLURM_JOB_ID"; then master_port=$((20000 + SLURM_JOB_ID % 20000)); else master_port=29500; fi
fi
[[ -z "$master_port" ]] || is_uint "$master_port" || die "MASTER_PORT must be a port number (got '$master_port')"

# --- processes per node ------------------------------------------------------------------------
if [[ $cpu_only -eq 1 ]]; then
  gpus=0
  export CUDA_VISIBLE_DEVICES=""
elif [[ -n "${GPUS_PER_NODE:-}" ]]; then
  gpus="$GPUS_PER_NODE"
elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
  gpus="$SLURM_GPUS_ON_NODE"
elif command -v nvidia-smi > /dev/null; then
  gpus="$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)"
else
  gpus=0
fi
is_uint "$gpus" || die "GPUS_PER_NODE must be a non-negative integer (got '$gpus')"
if [[ -z "$nproc" ]]; then
  if ((gpus > 0)); then nproc="$gpus"; else nproc="${CPU_PROCS_PER_NODE:-1}"; fi
fi
is_uint "$nproc" && ((nproc >= 1)) || die "processes per node must be a positive integer (got '$nproc')"

# env.sh shares the node's cores between these ranks (OMP_NUM_THREADS, unless the caller set it).
export RLMT_PROCS_PER_NODE="$nproc"
# shellcheck source=launch/env.sh
source "$here/env.sh"
# shellcheck source=launch/proc.sh
source "$here/proc.sh"

# --- command -----------------------------------------------------------------------------------
if [[ $nnodes -eq 1 && -z "$master_port" ]]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes "$nnodes" --node-rank "$node_rank" --master-addr "${master_addr:-127.0.0.1}"
    --master-port "$master_port" --rdzv-conf "timeout=${RLMT_RDZV_TIMEOUT_S:-900}")
fi
args=("$@")
if [[ -n "${RLMT_WANDB_PROJECT:-}" ]]; then
  given=0
  for a in "${args[@]}"; do [[ "$a" == monitoring.wandb.project=* ]] && given=1; done
  [[ $given -eq 1 ]] || args+=("monitoring.wandb.project=$RLMT_WANDB_PROJECT")
fi

echo "[rlmt-launch] $(hostname -s): node $node_rank/$nnodes, master ${master_addr:-local}:${master_port:-auto}," \
  "$nproc proc(s)/node, $gpus GPU(s)/node, OMP_NUM_THREADS=$OMP_NUM_THREADS, python=$RLMT_PYTHON" >&2
"$RLMT_PYTHON" -m torch.distributed.run "${rdzv[@]}" --nproc-per-node "$nproc" --max-restarts 0 \
  -m "$module" "${args[@]}" &
torchrun_pid=$!

# SIGTERM (from SLURM, srun or the batch script) goes to the ranks, torchrun's direct children;
# torchrun sees them exit and ends on its own, without its shutdown timeout (after which it would
# SIGKILL them). Signalling torchrun or every process works too: the checkpoint writer's helpers
# ignore the stop signals (rlmt_megatron/checkpoint/dist_ckpt.py). SIGINT (Ctrl-C) is passed on
# as SIGTERM, the trainer's stop signal: the ranks inherit SIGINT ignored, as children started
# in the background of a script do. torchrun exits 1 either way: launch/slurm/common.sh decides
# from exit_status.json.
# shellcheck disable=SC2329  # called by the traps below
forward() {
  local ranks
  rlmt_signal_count=$((rlmt_signal_count + 1))
  ranks="$(pgrep -P "$torchrun_pid" 2> /dev/null || true)"
  if [[ -n "$ranks" ]]; then
    echo "[rlmt-launch] $1: SIGTERM to the ranks (pids $(echo "$ranks" | tr '\n' ' '))" >&2
    # shellcheck disable=SC2086  # one pid per word
    kill -TERM $ranks 2> /dev/null || true
  else
    kill -TERM "$torchrun_pid" 2> /dev/null || true
  fi
}
trap 'forward SIGTERM' TERM
trap 'forward SIGINT' INT
rlmt_wait "$torchrun_pid"
exit "$rlmt_rc"
