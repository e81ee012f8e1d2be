#!/usr/bin/env bash
# Stop the test Slurm cluster started by slurm_up.sh STATE_DIR: cancel its jobs, then stop the
# daemons by the PIDs recorded in STATE_DIR/pids, and remove munge's private folder. Idempotent;
# the namespaces are left for netns_down.sh.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"
require_root
[[ $# -eq 1 ]] || die "usage: $0 STATE_DIR"
STATE=$1
PIDS=$STATE/pids
export SLURM_CONF=$STATE/slurm.conf

daemon_alive() {
    local name pid
    [[ -s $PIDS ]] || return 1
    while read -r name pid; do
        [[ $name == slurmctld ]] && pid_is "$pid" "$name" && return 0
    done <"$PIDS"
    return 1
}

# Running jobs first, so that slurmd's job steps (which outlive slurmd) end too.
if daemon_alive && ns_exists "$NS1"; then
    in_ns "$NS1" timeout 10 scancel --full --quiet --user=root 2>/dev/null || true
    for _ in $(seq 40); do
        [[ -z $(in_ns "$NS1" timeout 5 squeue -h -o %i 2>/dev/null) ]] && break
        sleep 0.25
    done
fi

if [[ -s $PIDS ]]; then
    # Reverse order: slurmd before slurmctld before munged.
    tac "$PIDS" | while read -r name pid; do
        stop_pid "$pid" "$name" 10
    done
    rm -f "$PIDS"
fi
# slurmstepd processes left by a job that did not end are stopped by PID in netns_down.sh
# (every process in the test namespaces).

if [[ -s $STATE/munge_dir ]]; then
    munge_dir=$(cat "$STATE/munge_dir")
    [[ $munge_dir == /tmp/mp-munge.* ]] && rm -rf "$munge_dir"
    rm -f "$STATE/munge_dir"
fi
echo "test Slurm cluster in $STATE stopped"
