#!/usr/bin/env bash
# Remove the test namespaces h1 and h2. Processes still inside them (test runs, slurmd job
# steps) are listed by `ip netns pids` and stopped by PID first. Idempotent.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root

for ns in "$NS1" "$NS2"; do
    ns_exists "$ns" || continue
    mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
    if ((${#pids[@]})); then
        echo "stopping ${#pids[@]} process(es) left in $ns: ${pids[*]}" >&2
        kill -TERM "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 50); do
            [[ -z $(ip netns pids "$ns" 2>/dev/null) ]] && break
            sleep 0.1
        done
        mapfile -t pids < <(ip netns pids "$ns" 2>/dev/null || true)
        if ((${#pids[@]})); then
            kill -KILL "${pids[@]}" 2>/dev/null || true
        fi
    fi
    ip netns delete "$ns"
done
# The veth pair disappears with its namespaces; a half-made one may be left in the root one.
for dev in "mpv-$NS1" "mpv-$NS2"; do
    ip link delete "$dev" 2>/dev/null || true
done
echo "namespaces $NS1 and $NS2 removed"
