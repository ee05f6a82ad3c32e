#!/usr/bin/env bash
# Install what `make docker-check` needs: podman (builds the image with
# `--isolation chroot`, mounts it), debootstrap (makes the Debian base
# image, since there may be no image registry) and docker-compose (v1, for
# `config` validation and the compose-spec JSON schema it ships, used with
# python3-jsonschema/python3-yaml, which it depends on). Debian/Ubuntu only.
#
# Fast path: both on PATH -> do nothing and print nothing.
# Usage: scripts/ensure-docker-tools.sh   (needs root or sudo on the slow path)
set -euo pipefail

missing=()
command -v podman >/dev/null 2>&1 || missing+=(podman)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [[ ${#missing[@]} == 0 ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-docker-tools: need ${missing[*]}; this is not a Debian-like system" >&2
    exit 1
fi
sudo=()
if [[ "$(id -u)" != 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        sudo=(sudo)
    else
        echo "ensure-docker-tools: run as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
echo "ensure-docker-tools: installing ${missing[*]} (Debian packages)" >&2
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq
    -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
for p in "${missing[@]}"; do
    if ! apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        "${apt[@]}" update >/dev/null
        break
    fi
done
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    echo "ensure-docker-tools: apt-get install ${missing[*]} failed" >&2
    exit 1
fi
echo "ensure-docker-tools: $(podman --version), debootstrap $(dpkg-query -W -f='${Version}' debootstrap), $(docker-compose version --short 2>/dev/null)" >&2
