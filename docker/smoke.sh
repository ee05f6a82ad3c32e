#!/bin/bash
# Smoke test run INSIDE the runtime image (scripts/docker-check.sh chroots
# into the mounted image as user zrelay): a primary and a replica, each
# runzeo + zrelay from the image, over mutual TLS on loopback. A real ZODB
# client commits through the primary and reads back through the replica;
# then /health, verify, drain and reload.
# Usage: smoke.sh WORKDIR PORT1 ... PORT7 (free loopback ports)
set -euo pipefail
w=$1; shift
zp=$1 zr=$2 pc=$3 pa=$4 pr=$5 rc=$6 ra=$7
mkdir -p "$w/p" "$w/r"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

zrelay cert --dir "$w/tls" primary replica >/dev/null
python3 -c 'import secrets; print(secrets.token_hex(32))' > "$w/admin.token"
for n in p r; do
    port=$zp; [[ $n == r ]] && port=$zr
    cat > "$w/$n/zeo.conf" <<CONF
<zeo>
  address 127.0.0.1:$port
</zeo>
<filestorage 1>
  path $w/$n/Data.fs
  blob-dir $w/$n/blobs
</filestorage>
CONF
    runzeo -C "$w/$n/zeo.conf" >"$w/$n/runzeo.log" 2>&1 &
    pids+=($!)
done
cat > "$w/p/zrelay.toml" <<CONF
node_name = "primary"
[client]
listen = "127.0.0.1:$pc"
[backend]
address = "127.0.0.1:$zp"
[admin]
listen = "127.0.0.1:$pa"
token_file = "$w/admin.token"
[replication]
role = "primary"
listen = "127.0.0.1:$pr"
[replication.tls]
ca_file = "$w/tls/ca.pem"
cert_file = "$w/tls/primary.pem"
key_file = "$w/tls/primary-key.pem"
CONF
cat > "$w/r/zrelay.toml" <<CONF
node_name = "replica"
[client]
listen = "127.0.0.1:$rc"
[backend]
address = "127.0.0.1:$zr"
[admin]
listen = "127.0.0.1:$ra"
token_file = "$w/admin.token"
[replication]
role = "replica"
upstream = "127.0.0.1:$pr"
upstream_name = "primary"
[replication.tls]
ca_file = "$w/tls/ca.pem"
cert_file = "$w/tls/replica.pem"
key_file = "$w/tls/replica-key.pem"
CONF
for n in p r; do
    zrelay check-config "$w/$n/zrelay.toml"
    zrelay run --config "$w/$n/zrelay.toml" >"$w/$n/zrelay.log" 2>&1 &
    pids+=($!)
done

# Wait (bounded) for both admin endpoints to report a healthy backend.
for a in $pa $ra; do
    for i in $(seq 1 150); do
        ZRELAY_ADMIN_URL=http://127.0.0.1:$a python3 /opt/zrelay/healthcheck.py 2>/dev/null && break
        [[ $i == 150 ]] && { echo "smoke: admin $a never healthy"; tail -n 20 "$w"/*/*.log; exit 1; }
        sleep 0.2
    done
done
echo "smoke: both nodes healthy (image HEALTHCHECK script)"
python3 "$w/demo_workload.py" "127.0.0.1:$pc" "127.0.0.1:$rc"
zrelay verify --primary "127.0.0.1:$zp" --replica "127.0.0.1:$zr"
zrelay status --admin "127.0.0.1:$pa" --admin "127.0.0.1:$ra"
zrelay reload --admin "127.0.0.1:$ra" --token-file "$w/admin.token"
zrelay drain --admin "127.0.0.1:$pa" --token-file "$w/admin.token"
if zrelay drain --admin "127.0.0.1:$pa" 2>/dev/null; then
    echo "smoke: drain without a token was accepted"; exit 1
fi
echo "smoke: OK"
