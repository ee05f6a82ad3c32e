#!/usr/bin/env bash
# Install the programs `make bench` compares zrelay with that are not Python
# packages: HAProxy (`mode tcp`, what an operator would put in front of ZEO
# instead of zrelay) and a C compiler for bench/baseline_relay.c.
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
if [[ ${#want[@]} -eq 0 ]]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-bench-tools: missing ${want[*]} and this is not a Debian-like system;" >&2
    echo "ensure-bench-tools: install them with your package manager" >&2
    exit 1
fi

sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "ensure-bench-tools: missing ${want[*]}; run as root: apt-get install ${want[*]}" >&2
        exit 1
    fi
fi

echo "ensure-bench-tools: installing ${want[*]} (Debian packages)" >&2
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq
    -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)

# Package lists may be absent (slim images) or stale: update only when apt
# does not know a candidate for one of the packages.
for p in "${want[@]}"; do
    if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        "${apt[@]}" update >/dev/null
        break
    fi
done

# Keep the package's maintainer scripts from starting a haproxy service:
# invoke-rc.d consults /usr/sbin/policy-rc.d, and 101 means "action not
# allowed". Only add (and later remove) ours if there is none.
policy=/usr/sbin/policy-rc.d
log="$(mktemp)"
cleanup=(rm -f "$log")
if [[ ! -e "$policy" ]]; then
    "${sudo[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    trap '"${sudo[@]}" rm -f "$policy"; "${cleanup[@]}"' EXIT
else
    trap '"${cleanup[@]}"' EXIT
fi

# dpkg and debconf chatter goes to a log that is shown only on failure.
if ! "${apt[@]}" install -y --no-install-recommends "${want[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    echo "ensure-bench-tools: apt-get install ${want[*]} failed" >&2
    exit 1
fi

# The package enables haproxy.service for the next boot; only the binary is
# wanted here.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now haproxy.service >/dev/null 2>&1 || true
fi

if ! command -v haproxy >/dev/null 2>&1; then
    echo "ensure-bench-tools: installed haproxy but it is still not on PATH" >&2
    exit 1
fi
echo "ensure-bench-tools: $(haproxy -v 2>&1 | head -n1)" >&2
