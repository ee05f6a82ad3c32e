#!/usr/bin/env bash
# Install the programs `make bench` compares zrelay with that are not Python
# packages: HAProxy (`mode tcp`, what an operator would put in front of ZEO
# instead of zrelay), a C compiler for bench/baseline_relay.c, and strace +
# valgrind for bench/rt_profile.py.
#
# Fast path: everything already on PATH -> do nothing and print nothing.
# Otherwise install from the distribution (Debian/Ubuntu packages `haproxy`
# and `gcc`) without starting the haproxy service the package would enable:
# the bench runs its own haproxy processes on loopback.
# Usage: scripts/ensure-bench-tools.sh   (needs root or sudo on the slow path)
set -euo pipefail

want=()
command -v haproxy >/dev/null 2>&1 || want+=(haproxy)
command -v "${CC:-cc}" >/dev/null 2>&1 || want+=(gcc)
# bench/rt_profile.py: syscalls and user instructions per round trip.
command -v strace >/dev/null 2>&1 || want+=(strace)
command -v valgrind >/dev/null 2>&1 || want+=(valgrind)
if [[ ${#want[@]} -eq 0 ]]; then
    exit 0
fi

. "$(dirname "$0")/lib/apt.sh"
apt_install ensure-bench-tools "haproxy.service" "${want[@]}"

if ! command -v haproxy >/dev/null 2>&1; then
    echo "ensure-bench-tools: installed haproxy but it is still not on PATH" >&2
    exit 1
fi
echo "ensure-bench-tools: $(haproxy -v 2>&1 | head -n1)" >&2
