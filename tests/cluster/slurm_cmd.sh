#!/usr/bin/env bash
# Run a Slurm command (sbatch, squeue, scontrol, ...) against the test cluster of slurm_up.sh:
#   tests/cluster/slurm_cmd.sh STATE_DIR sinfo -N
# The controller listens in namespace h1, so the command runs there with SLURM_CONF set.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$HERE/common.sh"
[[ $# -ge 2 ]] || die "usage: $0 STATE_DIR COMMAND [ARGS...]"
STATE=$(cd "$1" && pwd)
shift
export SLURM_CONF=$STATE/slurm.conf
exec nsenter --net="/run/netns/$NS1" "$@"
