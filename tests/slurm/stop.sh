#!/usr/bin/env bash
# Stop the private test cluster started by start.sh and remove its state directory.
#
# Only the PIDs recorded in this state directory's pidfiles are signalled, and only
# when that PID still runs the expected daemon (a stale pidfile may name a reused PID).
# Same environment as start.sh: SQ_SLURM_DIR (default /tmp/sq-slurm-$UID).
# Set SQ_SLURM_KEEP_STATE=1 to keep the logs for a post-mortem.
set -uo pipefail

STATE_DIR="${SQ_SLURM_DIR:-/tmp/sq-slurm-$(id -u)}"
[[ -d "$STATE_DIR" ]] || exit 0
export SLURM_CONF="$STATE_DIR/etc/slurm.conf"
export PATH="$PATH:/usr/sbin"

pid_of() {  # pid_of NAME: the PID in NAME's pidfile if it still runs NAME, else nothing
    local pid
    pid="$(cat "$STATE_DIR/run/$1.pid" 2>/dev/null)" || return 0
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1"* ]] && echo "$pid"
}

# Cancel leftover jobs first so slurmd does not leave orphaned job steps behind
# (only while our controller runs: scancel retries for a long time otherwise).
if [[ -n "$(pid_of slurmctld)" ]] && command -v scancel >/dev/null 2>&1; then
    timeout 10 scancel --full --quiet --user="$(id -un)" >/dev/null 2>&1 || true
fi

# SIGTERM to all three at once (each takes about 2 s to exit), a bounded wait,
# then SIGKILL for any that is still there. The state is thrown away anyway.
pids=()
for name in slurmd slurmctld munged; do
    pid="$(pid_of "$name")"
    if [[ -n "$pid" ]]; then
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    elif [[ -s "$STATE_DIR/run/$name.pid" ]]; then
        echo "stop.sh: $name pidfile is stale; nothing to stop" >&2
    fi
done
for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        echo "stop.sh: pid $pid ignored SIGTERM for 10 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
done

if [[ "${SQ_SLURM_KEEP_STATE:-0}" == 1 ]]; then
    echo "stop.sh: daemons stopped; state kept in $STATE_DIR" >&2
else
    rm -rf "$STATE_DIR"
fi
