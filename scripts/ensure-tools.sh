#!/usr/bin/env bash
# Install the external tools the build and the tests need that are not
# Python packages (those are scripts/ensure-venv.sh's job):
#   promtool  (Debian prometheus)        tests/dashboards.rs checks dashboards/zrelay-alerts.yml
#   etcd      (Debian etcd-server)       tests/coordinator.rs starts real etcd members
#   protoc    (Debian protobuf-compiler) build time: the etcd-client crate compiles etcd's .proto files,
#             which import protobuf's well-known types (Debian libprotobuf-dev, a Recommends we
#             do not get with --no-install-recommends, so it is checked as a file below)
#   ip, tc    (Debian iproute2)          tests/support/netns.rs: namespaces, veth, bridge, tbf
#   nft       (Debian nftables)          tests/support/netns.rs: partitions (drop rules in a namespace)
#
# Fast path: every tool already on PATH -> do nothing and print nothing.
# Otherwise install every missing one from the distribution in ONE apt-get
# call, without starting the services some of these packages would enable
# (prometheus, etcd).
# Usage: scripts/ensure-tools.sh   (needs root or sudo on the slow path)
set -euo pipefail

# tool -> Debian package
declare -A pkg_of=(
    [promtool]=prometheus
    [etcd]=etcd-server
    [protoc]=protobuf-compiler
    [ip]=iproute2
    [tc]=iproute2
    [nft]=nftables
)
# Services the packages above enable; only their binaries are wanted.
services=(prometheus.service etcd.service)

# /usr/sbin is not on every root PATH (sudo, cron); ip/tc/nft live there.
export PATH="$PATH:/usr/sbin:/sbin"

missing_tools=()
missing_pkgs=()
for tool in promtool etcd protoc ip tc nft; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        missing_tools+=("$tool")
        p="${pkg_of[$tool]}"
        if [[ " ${missing_pkgs[*]-} " != *" $p "* ]]; then
            missing_pkgs+=("$p")
        fi
    fi
done
# Not a tool but a file protoc needs: google/protobuf/descriptor.proto & co.
wkt=/usr/include/google/protobuf/descriptor.proto
if [[ ! -e "$wkt" ]] && [[ -z "${PROTOC_INCLUDE:-}" ]]; then
    missing_tools+=("$wkt")
    missing_pkgs+=(libprotobuf-dev)
fi
if [[ ${#missing_tools[@]} -eq 0 ]]; then
    exit 0
fi

echo "ensure-tools: missing ${missing_tools[*]}" >&2
. "$(dirname "$0")/lib/apt.sh"
apt_install ensure-tools "${services[*]}" "${missing_pkgs[@]}"
# Without systemd (containers) a policy-rc.d that already existed may still
# have allowed the sysvinit script to start etcd: stop it the same way.
if [[ -x /etc/init.d/etcd ]] && pgrep -x etcd >/dev/null 2>&1; then
    sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    "${sudo[@]}" /etc/init.d/etcd stop >/dev/null 2>&1 || true
fi

still=()
for tool in "${missing_tools[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || [[ -e "$tool" ]] || still+=("$tool")
done
if [[ ${#still[@]} -ne 0 ]]; then
    echo "ensure-tools: installed ${missing_pkgs[*]} but ${still[*]} still not on PATH" >&2
    exit 1
fi
echo "ensure-tools: installed ${missing_tools[*]}" >&2
