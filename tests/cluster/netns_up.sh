#!/usr/bin/env bash
# Make two test "hosts" on this machine: network namespaces h1 and h2 joined by one veth pair,
# named eth0 on both sides, 10.200.0.1/24 in h1 and 10.200.0.2/24 in h2. Idempotent: a complete
# pair is left alone, a half-made one is removed and made again.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root
command -v ip >/dev/null || die "the ip command (iproute2) is missing"

ready() {
    ns_exists "$NS1" && ns_exists "$NS2" || return 1
    ip -n "$NS1" -o -4 addr show dev eth0 2>/dev/null | grep -q "inet $ADDR1/" || return 1
    ip -n "$NS2" -o -4 addr show dev eth0 2>/dev/null | grep -q "inet $ADDR2/" || return 1
    ip -n "$NS1" link show dev eth0 | grep -q LOWER_UP || return 1
    ip -n "$NS2" link show dev eth0 | grep -q LOWER_UP
}

if ready; then
    echo "namespaces $NS1 ($ADDR1) and $NS2 ($ADDR2) already up"
    exit 0
fi

"$(dirname "${BASH_SOURCE[0]}")/netns_down.sh" >/dev/null

ip netns add "$NS1"
ip netns add "$NS2"
# Temporary names in the root namespace; renamed to eth0 once inside each namespace.
ip link add "mpv-$NS1" type veth peer name "mpv-$NS2"
ip link set "mpv-$NS1" netns "$NS1"
ip link set "mpv-$NS2" netns "$NS2"
ip -n "$NS1" link set "mpv-$NS1" name eth0
ip -n "$NS2" link set "mpv-$NS2" name eth0
ip -n "$NS1" addr add "$ADDR1/$PREFIX_LEN" dev eth0
ip -n "$NS2" addr add "$ADDR2/$PREFIX_LEN" dev eth0
for ns in "$NS1" "$NS2"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
done

for _ in $(seq 50); do
    ready && break
    sleep 0.1
done
ready || die "namespaces made but eth0 did not come up in both"
echo "namespaces $NS1 ($ADDR1) and $NS2 ($ADDR2) up"
