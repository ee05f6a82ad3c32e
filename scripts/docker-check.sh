#!/usr/bin/env bash
# make docker-check: build the runtime image from a Debian base made with
# debootstrap and the host-built release binary, then check it without
# running a container (`podman run` cannot work in this sandbox: crun cannot
# set rlimits/cgroups). Steps:
#   1. scripts/ensure-docker-tools.sh (podman, debootstrap, docker-compose)
#   2. base image localhost/zrelay-debian-base:bookworm (debootstrap minbase
#      + podman import), kept between runs; DOCKER_CHECK_REBASE=1 remakes it
#   3. podman build --isolation chroot --target runtime-host (stripped
#      target/release/zrelay), image localhost/zrelay:latest; prints its size
#   4. podman image mount; chroot into it (as uid 10001): zrelay --version,
#      zrelay check-config on the compose configs and config/etc-zrelay with
#      certificates made by the image's own `zrelay cert`, then docker/smoke.sh
#      (runzeo + zrelay primary and replica from the image, a real client)
#   5. systemd-analyze verify of docker/systemd/*.service against the image
#   6. compose.yml and compose-ha.yml: docker-compose config, scripts/check_compose.py (schema,
#      files, ports, metrics), promtool check config docker/prometheus.yml
# Needs root (debootstrap, mounts, chroot). Prints the time of each step.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
work="$root/target/docker"
base=localhost/zrelay-debian-base:bookworm
image=localhost/zrelay:latest
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export BUILDAH_ISOLATION=chroot
started=$(date +%s)
last=$started
step() {
    local now; now=$(date +%s)
    echo "docker-check: [$((now - last))s] $*" >&2
    last=$now
}

scripts/ensure-docker-tools.sh
mkdir -p "$work"

if ! podman info >/dev/null 2>&1; then
    echo "docker-check: podman info failed" >&2
    podman info >&2
    exit 1
fi

if [[ "${DOCKER_CHECK_REBASE:-0}" == 1 ]] || ! podman image exists "$base"; then
    step "making $base with debootstrap (minbase, bookworm, $mirror)"
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
    # Slim like debian:bookworm-slim: no apt caches, docs, man pages or
    # locales, now or in later installs.
    rm -rf "$work/rootfs/var/cache/apt/"* "$work/rootfs/var/lib/apt/lists/"* \
        "$work/rootfs/usr/share/doc/"* "$work/rootfs/usr/share/man/"* \
        "$work/rootfs/usr/share/locale/"* "$work/rootfs/usr/share/info/"*
    cat > "$work/rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
CFG
    tar -C "$work/rootfs" -c . | podman import --message "debootstrap minbase bookworm" - "$base" >/dev/null
    rm -rf "$work/rootfs"
    step "base image ready"
else
    step "base image $base exists (DOCKER_CHECK_REBASE=1 remakes it)"
fi

# The pinned ZEO/ZODB as wheels for the image's Python (Debian 12: CPython
# 3.11), fetched by the host's pip: the build itself may not reach PyPI.
rm -f docker/wheels/*.whl
scripts/ensure-venv.sh
.venv/bin/python -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
    --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
    --platform manylinux_2_36_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d docker/wheels -r requirements.txt
step "wheels for the image: $(ls docker/wheels/*.whl | wc -l) files in docker/wheels/"

[[ -x target/release/zrelay ]] || { scripts/ensure-tools.sh && cargo build --release; }
install -m 0755 target/release/zrelay "$work/zrelay"
strip "$work/zrelay"
step "stripped host binary: $(du -h "$work/zrelay" | cut -f1)"

podman build --isolation chroot --format docker -f docker/Dockerfile --target runtime-host \
    --build-arg BASE_IMAGE="$base" --build-arg ZRELAY_BINARY=target/docker/zrelay \
    --build-arg PIP_OPTS="--no-index --find-links /wheels" \
    --build-arg VERSION="$(target/docker/zrelay --version | cut -d' ' -f2)" \
    -t "$image" . >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }
size=$(podman image inspect --format '{{.Size}}' "$image")
base_size=$(podman image inspect --format '{{.Size}}' "$base")
step "built $image: $((size / 1000000)) MB (base $((base_size / 1000000)) MB)"
podman image inspect --format '{{json .Config.Labels}} user={{.Config.User}} healthcheck={{json .HealthCheck}}' "$image" >&2

mnt=$(podman image mount "$image")
mounts=()
cleanup() {
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[$i]}" 2>/dev/null || true; done
    podman image unmount "$image" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# Scratch space on top of the read-only image: /tmp and /etc/zrelay (the
# configs and the certificates the image's zrelay makes), /dev, /proc.
for d in tmp etc/zrelay; do
    mount -t tmpfs -o mode=1777,size=256m tmpfs "$mnt/$d"; mounts+=("$mnt/$d")
done
mount --bind /dev "$mnt/dev"; mounts+=("$mnt/dev")
mount -t proc proc "$mnt/proc"; mounts+=("$mnt/proc")
as_zrelay=(chroot --userspec=10001:10001 "$mnt" env -i HOME=/var/lib/zrelay
    PATH=/opt/zrelay/venv/bin:/usr/local/bin:/usr/bin:/bin)

"${as_zrelay[@]}" zrelay --version
"${as_zrelay[@]}" sh -c 'python3 -c "import ZEO, ZODB, importlib.metadata as m; print(\"ZEO\", m.version(\"ZEO\"), \"ZODB\", m.version(\"ZODB\"))"; runzeo --help >/dev/null && echo runzeo OK'

mkdir -p "$mnt/etc/zrelay/tls" && chown 10001:10001 "$mnt/etc/zrelay/tls"
"${as_zrelay[@]}" zrelay cert --dir /etc/zrelay/tls primary replica node1 node2 node3 >/dev/null
"${as_zrelay[@]}" sh -c 'python3 -c "import secrets; print(secrets.token_hex(32))" > /etc/zrelay/tls/admin.token && cp /etc/zrelay/tls/admin.token /etc/zrelay/admin.token'
install -m 0644 config/etc-zrelay/node1.toml config/etc-zrelay/node1-zeo.conf "$mnt/etc/zrelay/"
for n in primary replica; do
    install -D -m 0644 "docker/config/$n/zrelay.toml" "$mnt/tmp/compose/$n.toml"
done
for n in node1 node2 node3; do
    install -D -m 0644 "docker/config/ha/$n.toml" "$mnt/tmp/compose/$n.toml"
done
for f in /tmp/compose/primary.toml /tmp/compose/replica.toml /tmp/compose/node1.toml \
        /tmp/compose/node2.toml /tmp/compose/node3.toml /etc/zrelay/node1.toml; do
    "${as_zrelay[@]}" zrelay check-config "$f"
done
step "zrelay --version, check-config of the compose and /etc/zrelay sample configs inside the image"

install -m 0755 docker/smoke.sh "$mnt/tmp/smoke.sh"
install -d -o 10001 -g 10001 "$mnt/tmp/smoke"
install -m 0644 scripts/demo_workload.py "$mnt/tmp/smoke/demo_workload.py"
ports=$(python3 -c '
import socket
ss = [socket.socket() for _ in range(7)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')
# shellcheck disable=SC2086
if ! timeout 180 "${as_zrelay[@]}" /tmp/smoke.sh /tmp/smoke $ports; then
    for f in "$mnt"/tmp/smoke/*/*.log; do echo "---- $f" >&2; tail -n 20 "$f" >&2; done
    exit 1
fi
step "smoke test (runzeo + zrelay primary/replica from the image, real ZODB client) passed"

# The units must parse, and their binaries exist where the image puts
# them: verify instance copies whose ExecStart paths point into the mounted
# image (`systemd-analyze verify --root` does not load instance units).
if command -v systemd-analyze >/dev/null 2>&1; then
    unitdir=$(mktemp -d)
    for u in zrelay runzeo; do
        sed -e "s#/usr/local/bin/zrelay#$mnt/usr/local/bin/zrelay#g" \
            -e "s#/opt/zrelay/venv/bin/runzeo#$mnt/opt/zrelay/venv/bin/runzeo#g" \
            "docker/systemd/$u@.service" > "$unitdir/$u@node1.service"
    done
    if ! out=$(systemd-analyze verify --man=no "$unitdir/zrelay@node1.service" \
            "$unitdir/runzeo@node1.service" 2>&1) || [[ -n "$out" ]]; then
        echo "$out" >&2
        echo "docker-check: systemd units do not verify against the image" >&2
        exit 1
    fi
    rm -rf "$unitdir"
    step "systemd-analyze verify of docker/systemd/*.service (binaries from the image)"
fi
cleanup
trap - EXIT

(cd docker && ZRELAY_IMAGE="$image" docker-compose -f compose.yml config -q)
scripts/check_compose.py
(cd docker && ZRELAY_IMAGE="$image" docker-compose -f compose-ha.yml config -q)
scripts/check_compose.py compose-ha.yml
tmp=$(mktemp -d)
cp docker/prometheus.yml dashboards/zrelay-alerts.yml "$tmp/"
command -v promtool >/dev/null || scripts/ensure-tools.sh
promtool check config "$tmp/prometheus.yml" >/dev/null
rm -rf "$tmp"
step "compose.yml, compose-ha.yml: docker-compose config, schema, files, ports, metrics; promtool check config"
echo "docker-check: OK in $(( $(date +%s) - started ))s; image $image $((size / 1000000)) MB" >&2
