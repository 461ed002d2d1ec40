# shellcheck shell=bash
# Shared by the SLURM batch scripts (sourced). SLURM runs a *copy* of the batch script from its
# spool directory, so the repository is found from RLMT_REPO or the submit directory, never
# from the script's own path.
#
# Preemption, time limits and requeue (the trainer's side: rlmt_megatron/trainer/stop.py):
# the scripts ask for `--signal=B:TERM@120`, so the batch shell gets SIGTERM two minutes before
# the end. It forwards SIGTERM to its children (torchrun forwards it to every rank and waits
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT for them; srun forwards it to every node's torchrun). The
# trainer saves a checkpoint, writes <run.out_dir>/exit_status.json and exits 75. torchrun's own
# exit status says nothing (it exits 1), so after it ends the script decides from that file:
#   - written by this attempt: requeue when it says "requeue": true (status "stopped"); never
#     for "finished" or "engine_failed";
#   - absent (or left by an earlier attempt): requeue only if SIGTERM came, i.e. the trainer was
#     killed before it could write; a run that failed on its own is never requeued.
# Requeue is `scontrol requeue $SLURM_JOB_ID` (allowed by `--requeue`); the next start resumes
# from the newest complete checkpoint (run.resume=auto, the default). RLMT_MAX_REQUEUES
# (default 20) caps the chain.

rlmt_die() { echo "[rlmt-slurm] error: $*" >&2; exit 2; }
rlmt_log() { echo "[rlmt-slurm] $(date '+%F %T') $*" >&2; }

RLMT_REPO="${RLMT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f "$RLMT_REPO/launch/env.sh" ]] ||
  rlmt_die "RLMT_REPO=$RLMT_REPO is not the rlmt_megatron checkout (no launch/env.sh): submit from the repository root or export RLMT_REPO"
export RLMT_REPO
cd "$RLMT_REPO" || rlmt_die "cannot enter $RLMT_REPO"
# launch/env.sh is sourced on the nodes (torchrun.sh, the SGLang step), not here: see its header.
: "${RLMT_PYTHON:=python}"
export RLMT_PYTHON
# The batch shell's own helpers (grid lines, the run directory) run with this one; it differs
# from RLMT_PYTHON when the ranks run in a container the batch shell is not in.
: "${RLMT_BATCH_PYTHON:=$RLMT_PYTHON}"

# shellcheck source=launch/proc.sh
source "$RLMT_REPO/launch/proc.sh"

rlmt_children=()
rlmt_status_file=""
rlmt_launch_epoch=$(date +%s)
rlmt_got_term=0

_rlmt_on_term() {
  rlmt_got_term=1
  rlmt_signal_count=$((rlmt_signal_count + 1))
  rlmt_log "SIGTERM received (preemption or time limit): forwarding to ${rlmt_children[*]:-no child}"
  local pid
  for pid in "${rlmt_children[@]}"; do kill -TERM "$pid" 2> /dev/null || true; done
}
trap _rlmt_on_term TERM

# Start "$@" in the background (a foreground child would delay the trap until it exits) and
# remember it for SIGTERM forwarding; its pid is in $rlmt_last_pid.
rlmt_start() {
  "$@" &
  rlmt_last_pid=$!
  rlmt_children+=("$rlmt_last_pid")
}

# Poll URL until it answers HTTP 200, at most TIMEOUT_S seconds; fail early when PID (the
# server's launcher) has exited or SIGTERM arrived. Returns 0 when healthy, 1 otherwise.
rlmt_wait_for_health() {
  local url="$1" timeout_s="$2" pid="${3:-}" start=$SECONDS code
  while ((SECONDS - start < timeout_s)); do
    ((rlmt_got_term == 0)) || { rlmt_log "stopped waiting for $url: SIGTERM"; return 1; }
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2> /dev/null; then
      rlmt_log "the server process exited before $url answered"
      return 1
    fi
    if command -v curl > /dev/null; then
      code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 30 "$url" || true)"
    else
      code="$("$RLMT_PYTHON" -c 'import sys, urllib.request as u
try: print(u.urlopen(sys.argv[1], timeout=30).status)
except Exception as e: print(getattr(e, "code", 0))' "$url" || true)"
    fi
    [[ "$code" == 200 ]] && return 0
    sleep "${RLMT_HEALTH_POLL_S:-5}"
  done
  rlmt_log "$url did not answer 200 within ${timeout_s}s"
  return 1
}

# Wait for the SGLang server launched as PID to answer URL/health_generate (at most
# SGLANG_HEALTH_TIMEOUT_S, default 1800 s). When it does not: stop it and end the job (requeued
# if SIGTERM was the cause, exit 2 otherwise).
rlmt_wait_sglang() {
  local url="$1" pid="$2" timeout="${SGLANG_HEALTH_TIMEOUT_S:-1800}"
  rlmt_wait_for_health "$url/health_generate" "$timeout" "$pid" && return 0
  rlmt_stop "$pid"
  ((rlmt_got_term == 0)) || rlmt_finish 143
  rlmt_die "SGLang server at $url not healthy (reason above; the server's log is in this job's output)"
}

# Validate the rlmt-train config "$@" (RECIPE [key=value ...]) and note where its exit status
# will be written. Ends the job (exit 2, rlmt-train's message) on a bad config. When the batch
# shell's interpreter cannot import rlmt at all, the check is skipped and only SIGTERM decides
# the requeue; the same holds for other modules (RLMT_MODULE), which write no status file.
rlmt_track_run() {
  [[ "${RLMT_MODULE:-rlmt_megatron.cli.train}" == rlmt_megatron.cli.train ]] || return 0
  local out_dir rc=0
  out_dir="$(PYTHONPATH="$RLMT_REPO${PYTHONPATH:+:$PYTHONPATH}" "$RLMT_BATCH_PYTHON" "$RLMT_REPO/launch/run_dir.py" "$@")" || rc=$?
  if ((rc == 2)); then
    rlmt_die "the run's config does not load (message above)"
  elif ((rc != 0)); then
    rlmt_log "warning: $RLMT_BATCH_PYTHON could not resolve the run directory (exit $rc): requeue decisions rely on SIGTERM alone"
    return 0
  fi
  rlmt_status_file="$out_dir/exit_status.json"
  rlmt_log "run directory $out_dir"
}

# Prints "yes"/"no" and the reason: should this job be requeued (header of this file)?
_rlmt_requeue_decision() {
  local f="$rlmt_status_file"
  if [[ -n "$f" && -f "$f" ]] && (($(stat -c %Y "$f") >= rlmt_launch_epoch)); then
    # The trainer writes it with json.dumps(indent=2): one key per line (trainer/stop.py).
    local status
    status="$(sed -n 's/^[[:space:]]*"status":[[:space:]]*"\([^"]*\)".*/\1/p' "$f")"
    if grep -Eq '^[[:space:]]*"requeue":[[:space:]]*true' "$f"; then
      echo "yes $f: status $status, requeue true"
    else
      echo "no $f: status ${status:-unknown}, requeue false"
    fi
  elif ((rlmt_got_term == 1)); then
    echo "yes SIGTERM received and the trainer wrote no exit status (killed before it could)"
  else
    echo "no the run ended without SIGTERM and without asking for a requeue"
  fi
}

# After the main child ended with status $1: requeue when _rlmt_requeue_decision says so, exit.
rlmt_finish() {
  local rc="$1" restarts="${SLURM_RESTART_COUNT:-0}" max="${RLMT_MAX_REQUEUES:-20}" decision
  decision="$(_rlmt_requeue_decision)"
  if [[ "$decision" == yes* && -n "${SLURM_JOB_ID:-}" ]]; then
    if ((restarts < max)); then
      rlmt_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)) of at most $max): ${decision#yes }"
      scontrol requeue "$SLURM_JOB_ID" || rlmt_log "scontrol requeue $SLURM_JOB_ID failed (already requeued by the scheduler?)"
    else
      rlmt_log "not requeueing: $restarts restarts already (RLMT_MAX_REQUEUES=$max)"
    fi
  else
    rlmt_log "no requeue: ${decision#* }"
  fi
  rlmt_log "exit status $rc"
  exit "$rc"
}
