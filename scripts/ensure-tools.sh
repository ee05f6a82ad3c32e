#!/usr/bin/env bash
# Install the external tools the tests run that are not Python packages
# (those are scripts/ensure-venv.sh's job). Today: promtool, which
# tests/dashboards.rs uses to check and unit-test dashboards/zrelay-alerts.yml.
#
# Fast path: every tool already on PATH -> do nothing and print nothing.
# Otherwise install from the distribution (Debian/Ubuntu: package
# `prometheus` ships /usr/bin/promtool), without starting the prometheus
# service the package would otherwise enable.
# Usage: scripts/ensure-tools.sh   (needs root or sudo on the slow path)
set -euo pipefail

if command -v promtool >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-tools: promtool is missing and this is not a Debian-like system;" >&2
    echo "ensure-tools: install it from https://prometheus.io/download/ (it ships in the prometheus tarball)" >&2
    exit 1
fi

sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "ensure-tools: promtool is missing; run as root: apt-get install prometheus" >&2
        exit 1
    fi
fi

echo "ensure-tools: installing promtool (Debian package prometheus)" >&2
export DEBIAN_FRONTEND=noninteractive
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq
    -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)

# Package lists may be absent (slim images) or stale: update only when apt
# does not know a candidate for the package.
if ! apt-cache policy prometheus 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    "${apt[@]}" update >/dev/null
fi

# Keep the package's maintainer scripts from starting a prometheus service:
# invoke-rc.d consults /usr/sbin/policy-rc.d, and 101 means "action not
# allowed". Container images often have one already; only add (and later
# remove) ours if there is none.
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
if ! "${apt[@]}" install -y --no-install-recommends prometheus >"$log" 2>&1; then
    cat "$log" >&2
    echo "ensure-tools: apt-get install prometheus failed" >&2
    exit 1
fi

# The package enables prometheus.service for the next boot; only promtool
# is wanted here.
if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    "${sudo[@]}" systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi

if ! command -v promtool >/dev/null 2>&1; then
    echo "ensure-tools: installed prometheus but promtool is still not on PATH" >&2
    exit 1
fi
echo "ensure-tools: $(promtool --version 2>&1 | head -n1)" >&2
