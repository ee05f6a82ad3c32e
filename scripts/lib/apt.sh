# Shared by scripts/ensure-*.sh: install Debian packages quietly, without
# letting their maintainer scripts start the services they ship.
#
#   . scripts/lib/apt.sh
#   apt_install WHO "SERVICE..." PACKAGE...
#
# WHO prefixes the messages; SERVICE... (space-separated, may be empty) are
# the systemd units the packages enable, stopped and disabled afterwards
# (only the binaries are wanted). Needs root or sudo. Runs in a subshell:
# its traps and shell options do not leak into the caller. Returns non-zero
# with a message on stderr when the packages cannot be installed.

apt_install() (
    set -euo pipefail
    local who=$1 services=$2
    shift 2
    local pkgs=("$@")
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "$who: need ${pkgs[*]} and this is not a Debian-like system;" >&2
        echo "$who: install their equivalents with your package manager" >&2
        return 1
    fi
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            echo "$who: run as root: apt-get install ${pkgs[*]}" >&2
            return 1
        fi
    fi
    echo "$who: installing ${pkgs[*]} (Debian packages)" >&2
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq
        -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)

    # Package lists may be absent (slim images) or stale: update only when
    # apt does not know a candidate for one of the packages.
    local p
    for p in "${pkgs[@]}"; do
        if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
            "${apt[@]}" update >/dev/null
            break
        fi
    done

    # Keep maintainer scripts from starting services: invoke-rc.d consults
    # /usr/sbin/policy-rc.d, and 101 means "action not allowed". Container
    # images often have one already; only add (and later remove) ours if
    # there is none.
    local policy=/usr/sbin/policy-rc.d ours=0
    local log
    log="$(mktemp)"
    if [[ ! -e "$policy" ]]; then
        "${sudo[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
        ours=1
    fi
    trap 'rm -f "$log"; if [[ $ours == 1 ]]; then "${sudo[@]}" rm -f "$policy"; fi' EXIT

    # dpkg and debconf chatter goes to a log that is shown only on failure.
    if ! "${apt[@]}" install -y --no-install-recommends "${pkgs[@]}" >"$log" 2>&1; then
        cat "$log" >&2
        echo "$who: apt-get install ${pkgs[*]} failed" >&2
        return 1
    fi

    # The packages enable their services for the next boot.
    if [[ -n "$services" && -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
        local s
        for s in $services; do
            "${sudo[@]}" systemctl disable --now "$s" >/dev/null 2>&1 || true
        done
    fi
)
