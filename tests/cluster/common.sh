# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# Shared names for the test "hosts" (network namespaces) and the test Slurm cluster.
# Sourced by the other scripts in tests/cluster/; not meant to be run on its own.
# These are the only addresses the test scripts ever use: a private /24 between two namespaces.

NS1=${CLUSTER_NS1:-h1}
NS2=${CLUSTER_NS2:-h2}
ADDR1=10.200.0.1
ADDR2=10.200.0.2
PREFIX_LEN=24

die() {
    echo "$(basename "$0"): $*" >&2
    exit 1
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (network namespaces and Slurm daemons need it)"
}

ns_exists() {
    [[ -e /run/netns/$1 ]]
}

# Run a command with only the network namespace switched. `ip netns exec` would also remount
# /sys, which breaks slurmd's look at /sys/fs/cgroup; nsenter --net does not.
in_ns() {
    local ns=$1
    shift
    nsenter --net="/run/netns/$ns" "$@"
}

# Is PID alive and still the process we started? (guards against a recycled PID)
pid_is() {
    local pid=$1 name=$2
    [[ -r /proc/$pid/cmdline ]] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$name"
}

# Stop one PID: SIGTERM, up to $3 seconds grace (default 10), then SIGKILL.
stop_pid() {
    local pid=$1 name=$2 grace=${3:-10} i
    pid_is "$pid" "$name" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < grace * 10; i++)); do
        pid_is "$pid" "$name" || return 0
        sleep 0.1
    done
    echo "$(basename "$0"): $name (pid $pid) ignored SIGTERM for ${grace}s, sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}
