# shellcheck shell=bash
# The runtime environment of every rlmt process, in one place. Sourced (never executed) where
# Python is started: by launch/torchrun.sh on each node, and in the SGLang step of
# launch/slurm/disaggregated.sbatch. Not by the batch shells: what they export would reach every
# node through srun, and per-node values (threads per rank) must be computed on the node.
# Sourcing it twice changes nothing. Every value is a default: the caller's environment wins.
#
#   RLMT_PYTHON          interpreter of the project's environment (default: python on PATH)
#   RLMT_PROCS_PER_NODE  processes this node starts (set by launch/torchrun.sh; default 1)
#   RLMT_CACHE_ROOT   shared cache root for model hubs (default: ~/.cache/rlmt)
#   RLMT_LOCAL_CACHE  node-local cache root for compiled kernels (default: /tmp/rlmt-cache-$USER)

: "${RLMT_PYTHON:=python}"
export RLMT_PYTHON

# --- collectives ---------------------------------------------------------------------------
# The process-group timeout itself (NCCL and gloo alike) is set by the trainer when it creates
# the groups (run config); these make a timed-out or broken NCCL collective end the process
# instead of leaving every rank blocked, and record what each rank was waiting on.
# Abort the communicators and exit when a collective times out or fails (1 = tear down).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# Flight recorder: keep the last collectives of each rank and dump them on a timeout, so the
# dump names the collective (and sequence number) each rank was stuck in.
export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
# Where those dumps go (one file per rank: <prefix><rank>); node-local /tmp unless redirected.
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE="${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-/tmp/rlmt_nccl_trace_rank_}"
# cuBLAS workspace fixed so that run.deterministic=true can use deterministic GEMMs.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"
# NCCL's own log level: warnings only (set INFO to debug topology or network selection).
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# torchrun waits this long for its workers after forwarding SIGTERM before it SIGKILLs them
# (torch's default is 30 s): the trainer needs the time to write its checkpoint. Keep it below
# the 120 s warning the SLURM scripts ask for (--signal=B:TERM@120). torch 2.13 reads it; older
# releases ignore it and keep 30 s.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"

# --- GPU ------------------------------------------------------------------------------------
# One hardware work queue per device, so kernels are issued in program order: Megatron's
# overlap of TP/SP communication with computation depends on that ordering.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# --- CPU threads ----------------------------------------------------------------------------
# Several ranks share a node's cores; without a cap each rank's OpenMP pool takes all of them
# and they thrash. Default: the node's (allocated) cores / processes on the node.
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  _rlmt_cores="${SLURM_CPUS_ON_NODE:-$(getconf _NPROCESSORS_ONLN)}"
  _rlmt_procs="${RLMT_PROCS_PER_NODE:-1}"
  export OMP_NUM_THREADS=$((_rlmt_cores / _rlmt_procs > 0 ? _rlmt_cores / _rlmt_procs : 1))
  unset _rlmt_cores _rlmt_procs
fi
# HF tokenizers' thread pool deadlocks in processes forked after it started (DataLoader
# workers, engine children); rlmt tokenizes in the main thread anyway.
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

# --- logs -----------------------------------------------------------------------------------
# Lines reach the SLURM output file when printed, not when a buffer fills (or never, on a kill).
export PYTHONUNBUFFERED=1
# A segfault or a fatal signal prints every thread's Python stack.
export PYTHONFAULTHANDLER=1

# --- Weights & Biases -------------------------------------------------------------------------
# Online only with a key; otherwise offline files under the run directory (`wandb sync` later).
# The recipe's monitoring.wandb.mode, when set, still wins.
if [[ -z "${WANDB_MODE:-}" ]]; then
  if [[ -n "${WANDB_API_KEY:-}" ]]; then export WANDB_MODE=online; else export WANDB_MODE=offline; fi
fi
# RLMT_WANDB_PROJECT (optional) is passed to the trainer as monitoring.wandb.project by
# launch/torchrun.sh: the config's project is explicit, so $WANDB_PROJECT alone would be ignored.

# --- caches -----------------------------------------------------------------------------------
# Hub downloads are large and identical on every node: keep them on a shared filesystem, once.
: "${RLMT_CACHE_ROOT:=${HOME:-/tmp}/.cache/rlmt}"
export RLMT_CACHE_ROOT
export HF_HOME="${HF_HOME:-$RLMT_CACHE_ROOT/huggingface}"
export TORCH_HOME="${TORCH_HOME:-$RLMT_CACHE_ROOT/torch}"
# Compiled kernels are written concurrently by every rank; on a shared (NFS/Lustre) filesystem
# that races and is slow, so they go to node-local disk.
: "${RLMT_LOCAL_CACHE:=/tmp/rlmt-cache-${USER:-$(id -un)}}"
export RLMT_LOCAL_CACHE
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$RLMT_LOCAL_CACHE/triton}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$RLMT_LOCAL_CACHE/inductor}"
