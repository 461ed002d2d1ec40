# shellcheck shell=bash
# Waiting for and stopping background children in the launch scripts (sourced). A script that
# traps signals runs its long commands in the background and waits, because bash runs a trap
# only once a foreground command has ended; each trap must increment rlmt_signal_count.

rlmt_signal_count=0

# Wait for child PID through any number of trapped signals; sets $rlmt_rc to its exit status.
# A trapped signal makes `wait` return at once with 128+n while the child's status stays pending
# (even when the child has exited meanwhile), so wait again; that second wait returns 127 only
# when the first status was the child's own after all (the trap ran just before `wait`).
rlmt_wait() {
  local pid="$1" before prev=""
  while :; do
    before=$rlmt_signal_count
    rlmt_rc=0
    wait "$pid" || rlmt_rc=$?
    if [[ -n "$prev" && $rlmt_rc -eq 127 ]]; then
      rlmt_rc=$prev
      return 0
    fi
    if ((rlmt_rc > 128 && rlmt_signal_count != before)); then
      prev=$rlmt_rc
      continue
    fi
    return 0
  done
}

# Stop child PID: SIGTERM, then SIGKILL after $2 seconds (default 30).
rlmt_stop() {
  local pid="$1" grace="${2:-30}" i
  kill -TERM "$pid" 2> /dev/null || return 0
  for ((i = 0; i < grace * 2; i++)); do
    kill -0 "$pid" 2> /dev/null || break
    sleep 0.5
  done
  kill -KILL "$pid" 2> /dev/null || true
  wait "$pid" 2> /dev/null || true
}
