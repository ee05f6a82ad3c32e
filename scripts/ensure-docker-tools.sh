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
. "$(dirname "$0")/lib/apt.sh"
apt_install ensure-docker-tools "" "${missing[@]}"
echo "ensure-docker-tools: $(podman --version), debootstrap $(dpkg-query -W -f='${Version}' debootstrap), $(docker-compose version --short 2>/dev/null)" >&2
