#!/usr/bin/env bash
# Start a private single-node SLURM cluster (munged + slurmctld + slurmd) for tests.
#
# Everything lives in one state directory (config, spool, logs, pidfiles, munge
# socket and key, an srun wrapper); nothing outside it is touched, not even an
# existing /etc/slurm/slurm.conf, and stop.sh removes it all again.
# Idempotent: if the daemons of this state directory are already running and the
# node answers, it returns at once. Needs root (slurmd launches the jobs).
#
# Environment (all optional):
#   SQ_SLURM_DIR         state directory        (default /tmp/sq-slurm-$UID)
#   SQ_SLURM_CTLD_PORT   slurmctld port         (default 16817)
#   SQ_SLURM_SLURMD_PORT slurmd port            (default 16818)
#   SQ_SLURM_CPUS        CPUs of the node       (default 2, a small cluster node)
#   SQ_SLURM_WAIT_S      seconds to wait for the node to become idle (default 60)
#   SQ_SLURM_MIN_MEM_MB  refuse (77) a machine with less memory (default 4096)
#   SQ_SLURM_NO_INSTALL  set to 1 to never call apt-get
#
# Exit codes:
#   0  ready; the last two stdout lines are "SLURM_CONF=<file>" (the cluster's
#      config) and "SLURM_WRAPPERS=<dir>" (put it first on PATH for the jobs:
#      its srun finds this cluster although the executor plugin strips SLURM_CONF).
#   77 not possible here: not Linux, not root, SLURM missing with no apt-get (or
#      SQ_SLURM_NO_INSTALL=1), or the machine is smaller than the node asked for.
#   1  broken: anything else (apt-get failed, a daemon did not start, the node
#      never became idle, ...). The last stderr line says what, after the tail
#      of the daemon log that usually says why.
set -uo pipefail

STATE_DIR="${SQ_SLURM_DIR:-/tmp/sq-slurm-$(id -u)}"
CTLD_PORT="${SQ_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${SQ_SLURM_SLURMD_PORT:-16818}"
NODE_CPUS="${SQ_SLURM_CPUS:-2}"
WAIT_S="${SQ_SLURM_WAIT_S:-60}"
MIN_MEM_MB="${SQ_SLURM_MIN_MEM_MB:-4096}"
NODE="$(hostname -s)"
CONF="$STATE_DIR/etc/slurm.conf"
MUNGE_DIR="$STATE_DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
WRAPPERS="$STATE_DIR/bin"
PACKAGES=(munge slurmctld slurmd slurm-client)
export SLURM_CONF="$CONF"

stop_what_started() {  # keep the logs for a post-mortem
    [[ -n "${STARTING:-}" ]] && SQ_SLURM_KEEP_STATE=1 "$(dirname "$0")/stop.sh" >/dev/null 2>&1
}

cannot_run() {  # this machine cannot host the cluster: the "not possible here" code
    stop_what_started
    echo "start.sh: not possible here: $*" >&2
    exit 77
}

broken() {  # it should have worked and did not: a real failure
    stop_what_started
    echo "start.sh: broken: $*" >&2
    exit 1
}

ready() {
    echo "SLURM_CONF=$CONF"
    echo "SLURM_WRAPPERS=$WRAPPERS"
    exit 0
}

show_log_tail() {  # a daemon's own log usually says why it died
    local log="$1"
    [[ -s "$log" ]] && { echo "--- last lines of $log:" >&2; tail -n 15 "$log" >&2; }
}

daemon_alive() {  # daemon_alive NAME: its pidfile names a live process running NAME
    local pid
    pid="$(cat "$STATE_DIR/run/$1.pid" 2>/dev/null)" || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$1"* ]]
}

started() {  # started NAME: bounded wait for NAME's pidfile (daemons write it after forking)
    local deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        daemon_alive "$1" && return 0
        sleep 0.1
    done
    show_log_tail "$STATE_DIR/log/$1.log"
    broken "$1 did not start (no live pid in $STATE_DIR/run/$1.pid)"
}

node_state() {
    timeout 5 sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'
}

wait_for_idle() {  # bounded wait until the node accepts jobs
    local deadline=$((SECONDS + WAIT_S)) state=""
    while ((SECONDS < deadline)); do
        daemon_alive slurmd || { echo "start.sh: slurmd exited" >&2; break; }
        state="$(node_state)"
        case "$state" in
            idle | mixed | allocated) return 0 ;;
            down | drained | draining | fail*)
                # A restarted slurmd can leave the node down; it is ours, so resume it.
                scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 ;;
        esac
        sleep 1
    done
    echo "start.sh: node $NODE is '${state:-not reported}' after ${WAIT_S}s" >&2
    scontrol show node "$NODE" >&2 2>/dev/null
    show_log_tail "$STATE_DIR/log/slurmctld.log"
    show_log_tail "$STATE_DIR/log/slurmd.log"
    return 1
}

[[ "$NODE_CPUS" =~ ^[1-9][0-9]*$ ]] || broken "SQ_SLURM_CPUS='$NODE_CPUS': give a whole number of CPUs"

# ---- fast path: our cluster is already up ----------------------------------
if daemon_alive munged && daemon_alive slurmctld && daemon_alive slurmd; then
    wait_for_idle || broken "running cluster in $STATE_DIR does not answer"
    ready
fi

# ---- packages ---------------------------------------------------------------
[[ "$(uname -s)" == Linux ]] || cannot_run "not Linux ($(uname -s))"
export PATH="$PATH:/usr/sbin"  # the daemons live there; not always on a user's PATH
missing=()
for tool in munged munge unmunge slurmctld slurmd sbatch srun sinfo squeue scontrol; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
    [[ "${SQ_SLURM_NO_INSTALL:-0}" == 1 ]] && cannot_run "missing ${missing[*]} and SQ_SLURM_NO_INSTALL=1"
    [[ "$(id -u)" == 0 ]] || cannot_run "missing ${missing[*]}; installing them needs root"
    command -v apt-get >/dev/null 2>&1 || cannot_run "missing ${missing[*]} and no apt-get"
    echo "start.sh: installing ${PACKAGES[*]} (missing: ${missing[*]})" >&2
    apt_log="$(mktemp)"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >"$apt_log" 2>&1; then
        # A stale package index is the usual cause; refresh once and retry.
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$apt_log" 2>&1
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${PACKAGES[@]}" >>"$apt_log" 2>&1; then
            tail -n 15 "$apt_log" >&2
            rm -f "$apt_log"
            broken "apt-get install ${PACKAGES[*]} failed (its output above)"
        fi
    fi
    rm -f "$apt_log"
fi
# slurmd must be root to start jobs as the submitting user.
[[ "$(id -u)" == 0 ]] || cannot_run "slurmd needs root to launch jobs (running as $(id -un))"

# ---- configuration ----------------------------------------------------------
# The node line comes from slurmd itself (RealMemory), with SQ_SLURM_CPUS CPUs:
# a small node, like the 2-CPU nodes the profiles/slurm defaults must fit.
hw="$(slurmd -C 2>/dev/null | head -n 1)"
[[ "$hw" == NodeName=* ]] || broken "'slurmd -C' did not describe this machine: ${hw:-no output}"
real_memory="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
machine_cpus="$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
# profiles/slurm asks 4000 MB per job by default; a smaller node would queue it forever.
((${real_memory:-0} >= MIN_MEM_MB)) || cannot_run "machine has ${real_memory:-unknown} MB; the test jobs need $MIN_MEM_MB MB"
((${machine_cpus:-0} >= NODE_CPUS)) || cannot_run "machine has ${machine_cpus:-unknown} CPUs; the test node needs $NODE_CPUS"
# A half-started cluster from an earlier run is stopped first, so we start clean.
"$(dirname "$0")/stop.sh" >/dev/null 2>&1 || true
mkdir -p "$STATE_DIR"/{etc,run,log,state,spool} "$MUNGE_DIR" "$WRAPPERS" &&
    chmod 0700 "$STATE_DIR" "$MUNGE_DIR" || broken "cannot create the state directory $STATE_DIR"

STARTING=1  # from here on, a failure stops what was started

cat >"$CONF" <<EOF
# Written by tests/slurm/start.sh: private single-node test cluster.
ClusterName=sqtest
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No systemd/cgroup delegation here: track processes by parent id, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# No slurmdbd: sacct cannot work, so the workflow profile polls with squeue,
# which sees a finished job for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
MinJobAge=300
ReturnToService=2
# The node has the CPUs written below even where the machine has more.
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$NODE_CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$NODE_CPUS ThreadsPerCore=1 RealMemory=$real_memory State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
# Unused with proctrack/linuxproc + task/none; there so that a slurmd which
# does load cgroup support finds a valid file beside slurm.conf.
cat >"$STATE_DIR/etc/cgroup.conf" <<EOF
CgroupPlugin=autodetect
EOF

# Inside a job the executor plugin strips every SLURM_* variable (SLURM_CONF too)
# before its srun, which would then read /etc/slurm/slurm.conf: another cluster's,
# or none. This srun, first on the jobs' PATH, points it back at this cluster.
real_srun="$(command -v srun)"
cat >"$WRAPPERS/srun" <<EOF && chmod 0755 "$WRAPPERS/srun" || broken "cannot write $WRAPPERS/srun"
#!/bin/sh
# Written by tests/slurm/start.sh: srun of the private test cluster in $STATE_DIR.
SLURM_CONF='$CONF' exec '$real_srun' "\$@"
EOF

# ---- munged (private key and socket) ----------------------------------------
if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$MUNGE_DIR/munge.key"
fi
munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$STATE_DIR/run/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" --force 2>>"$STATE_DIR/log/munged.log" || {
    show_log_tail "$STATE_DIR/log/munged.log"
    broken "munged did not start"
}
started munged
for _ in $(seq 50); do [[ -S "$MUNGE_SOCKET" ]] && break; sleep 0.1; done
munge --socket="$MUNGE_SOCKET" -n 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1 || {
    show_log_tail "$STATE_DIR/log/munged.log"
    broken "munge round trip through $MUNGE_SOCKET failed"
}

# ---- slurmctld and slurmd ---------------------------------------------------
# -c: start from a clean state (no jobs left over from an earlier run).
slurmctld -c -f "$CONF" 2>>"$STATE_DIR/log/slurmctld.log" || {
    show_log_tail "$STATE_DIR/log/slurmctld.log"
    broken "slurmctld did not start"
}
started slurmctld
# Bounded: scontrol alone retries for a long time when nobody answers.
controller_up=""
deadline=$((SECONDS + 20))
while ((SECONDS < deadline)) && daemon_alive slurmctld; do
    timeout 3 scontrol ping >/dev/null 2>&1 && { controller_up=1; break; }
    sleep 0.2
done
[[ -n "$controller_up" ]] || {
    show_log_tail "$STATE_DIR/log/slurmctld.log"
    broken "slurmctld does not answer 'scontrol ping'"
}
slurmd -f "$CONF" -N "$NODE" 2>>"$STATE_DIR/log/slurmd.log" || {
    show_log_tail "$STATE_DIR/log/slurmd.log"
    broken "slurmd did not start"
}
started slurmd
wait_for_idle || broken "node $NODE never became idle"
echo "start.sh: SLURM node $NODE ($NODE_CPUS CPUs) idle (state in $STATE_DIR)" >&2
ready
