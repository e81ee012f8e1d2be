#!/usr/bin/env bash
# Start a test Slurm cluster on this machine: munged, slurmctld and slurmd "node1" in namespace
# h1 (10.200.0.1), slurmd "node2" in namespace h2 (10.200.0.2).
#
#   tests/cluster/slurm_up.sh STATE_DIR
#
# Everything (slurm.conf, munge key and socket, spool, logs) lives under STATE_DIR, nothing under
# /etc is changed; the daemons' PIDs are written to STATE_DIR/pids for slurm_down.sh. Run Slurm
# commands against it with tests/cluster/slurm_cmd.sh STATE_DIR sinfo ... Idempotent: if the
# daemons in STATE_DIR/pids are alive and both nodes answer, nothing is done.
#
# Exit status: 0 up; 3 the Slurm/munge packages are missing and apt-get could not install them;
# anything else: the cluster did not come up (see the logs under STATE_DIR/log).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"
require_root
[[ $# -eq 1 ]] || die "usage: $0 STATE_DIR"
mkdir -p "$1"
STATE=$(cd "$1" && pwd)
PIDS=$STATE/pids
export SLURM_CONF=$STATE/slurm.conf
UP_TIMEOUT=${SLURM_UP_TIMEOUT:-60}

# --- packages -----------------------------------------------------------------------------------
PACKAGES=(slurmctld slurmd slurm-client munge)
have_packages() {
    local c
    for c in slurmctld slurmd sbatch srun scontrol sinfo munged; do
        command -v "$c" >/dev/null || return 1
    done
}
if ! have_packages; then
    command -v apt-get >/dev/null || { echo "no apt-get to install ${PACKAGES[*]}" >&2; exit 3; }
    echo "installing ${PACKAGES[*]} with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${PACKAGES[@]}" >"$STATE/apt.log" 2>&1; then
        { apt-get update && apt-get install -y --no-install-recommends "${PACKAGES[@]}"; } \
            >>"$STATE/apt.log" 2>&1 || {
            tail -n 5 "$STATE/apt.log" >&2
            echo "apt-get could not install ${PACKAGES[*]} (log: $STATE/apt.log)" >&2
            exit 3
        }
    fi
    have_packages || { echo "installed ${PACKAGES[*]} but commands are still missing" >&2; exit 3; }
fi

# --- already up? --------------------------------------------------------------------------------
nodes_idle() {
    local states
    states=$(in_ns "$NS1" sinfo -h -N -o '%N %T' 2>/dev/null) || return 1
    grep -q '^node1 idle' <<<"$states" && grep -q '^node2 idle' <<<"$states"
}
all_alive() {
    [[ -s $PIDS ]] || return 1
    local name pid
    while read -r name pid; do
        pid_is "$pid" "$name" || return 1
    done <"$PIDS"
}
if all_alive && nodes_idle; then
    echo "test Slurm cluster in $STATE already up"
    exit 0
fi
# Half up (an earlier run died): stop what is left and start again.
"$HERE/slurm_down.sh" "$STATE" >/dev/null 2>&1 || true
"$HERE/netns_up.sh" >/dev/null

mkdir -p "$STATE"/{log,state,spool}
: >"$PIDS"
record() { echo "$1 $2" >>"$PIDS"; }

# --- munge: a private daemon, key and socket -----------------------------------------------------
# munged runs as the munge user and checks that its directories belong to it, so it gets a folder
# of its own under /tmp (STATE may sit below a root-only directory such as pytest's). It runs in
# h1 like the other daemons (its socket is a file, reachable from every namespace), so that
# netns_down.sh stops it even after a crashed run; folders of such runs are removed here.
for dir in /tmp/mp-munge.*; do
    [[ -d $dir ]] || continue
    pid=$(cat "$dir/munged.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && pid_is "$pid" "$dir"; then continue; fi
    rm -rf "$dir"
done
MUNGE_DIR=$(mktemp -d /tmp/mp-munge.XXXXXX)
echo "$MUNGE_DIR" >"$STATE/munge_dir"
chmod 0755 "$MUNGE_DIR"
dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
chmod 0400 "$MUNGE_DIR/munge.key"
chown -R munge:munge "$MUNGE_DIR"
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
nsenter --net="/run/netns/$NS1" setpriv --reuid=munge --regid=munge --init-groups -- munged --foreground \
    --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" --pid-file="$MUNGE_DIR/munged.pid" \
    --seed-file="$MUNGE_DIR/munged.seed" --log-file="$MUNGE_DIR/munged.log" \
    >"$STATE/log/munged.out" 2>&1 &
record munged $!
for _ in $(seq 50); do
    [[ -S $MUNGE_SOCKET ]] && break
    sleep 0.1
done
[[ -S $MUNGE_SOCKET ]] || { cat "$STATE/log/munged.out" "$MUNGE_DIR/munged.log" >&2; die "munged did not start"; }

# --- slurm.conf ----------------------------------------------------------------------------------
# slurmctld checks that SlurmctldHost names this machine; it listens on h1's address.
CTL_HOST=$(hostname -s)
cat >"$SLURM_CONF" <<CONF
# Test cluster written by tests/cluster/slurm_up.sh; see tests/test_cluster.py.
ClusterName=mptest
SlurmctldHost=$CTL_HOST($ADDR1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
# Quick ends: a cancelled or failed job's processes get SIGKILL 5 s after SIGTERM, and a finished
# job stays visible to scontrol for 10 minutes (there is no accounting database for sacct).
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=node1 NodeAddr=$ADDR1 CPUs=2 State=UNKNOWN
NodeName=node2 NodeAddr=$ADDR2 CPUs=2 State=UNKNOWN
PartitionName=test Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF

# --- daemons -------------------------------------------------------------------------------------
# Only the network namespace is switched (nsenter --net): `ip netns exec` would remount /sys.
# Started with nsenter directly, not through the in_ns function: a function run with `&` is a
# subshell, and $! would be its PID rather than the daemon's (nsenter execs the daemon).
nsenter --net="/run/netns/$NS1" slurmctld -D -i -f "$SLURM_CONF" >"$STATE/log/slurmctld.out" 2>&1 &
record slurmctld $!
for _ in $(seq 100); do
    in_ns "$NS1" scontrol ping >/dev/null 2>&1 && break
    sleep 0.1
done
in_ns "$NS1" scontrol ping >/dev/null 2>&1 || {
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmctld.out" >&2 || true
    die "slurmctld did not answer"
}
nsenter --net="/run/netns/$NS1" slurmd -D -N node1 -f "$SLURM_CONF" >"$STATE/log/slurmd.node1.out" 2>&1 &
record slurmd $!
nsenter --net="/run/netns/$NS2" slurmd -D -N node2 -f "$SLURM_CONF" >"$STATE/log/slurmd.node2.out" 2>&1 &
record slurmd $!

for _ in $(seq $((UP_TIMEOUT * 4))); do
    nodes_idle && break
    all_alive || break
    sleep 0.25
done
if ! nodes_idle; then
    in_ns "$NS1" sinfo -N >&2 || true
    tail -n 20 "$STATE"/log/*.log "$STATE"/log/*.out >&2 || true
    die "nodes node1 and node2 did not become idle within ${UP_TIMEOUT}s"
fi
echo "test Slurm cluster up: SLURM_CONF=$SLURM_CONF, controller and node1 in $NS1, node2 in $NS2"
