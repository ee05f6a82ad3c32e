#!/usr/bin/env bash
# make demo: a primary and a replica on loopback, each a runzeo with a zrelay
# beside it, replicating over mutual TLS; a sample write on the primary read
# back from the replica; a switchover to the replica and back; then keep
# running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
ZRELAY=${ZRELAY:-$ROOT/target/release/zrelay}
DEMO=${DEMO_DIR:-$ROOT/demo-data}
BASE=${DEMO_BASE_PORT:-8100}   # ports BASE..BASE+7 on 127.0.0.1

P_CLIENT=$BASE;       R_CLIENT=$((BASE+1))
P_BACKEND=$((BASE+2)); R_BACKEND=$((BASE+3))
P_ADMIN=$((BASE+4));  R_ADMIN=$((BASE+5))
P_REPL=$((BASE+6));    R_REPL=$((BASE+7))

rm -rf "$DEMO"; mkdir -p "$DEMO/primary" "$DEMO/replica"
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo; echo "stopping demo..."
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$ZRELAY" cert --dir "$DEMO/certs" primary replica >/dev/null
# Role changes (switchover) are admin POSTs: a bearer token protects them.
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DEMO/admin.token"
TOKEN="$DEMO/admin.token"
BOOK="[[cluster.nodes]]
name = \"primary\"
replication = \"127.0.0.1:$P_REPL\"
[[cluster.nodes]]
name = \"replica\"
replication = \"127.0.0.1:$R_REPL\"
"

for node in primary replica; do
  if [ $node = primary ]; then port=$P_BACKEND; else port=$R_BACKEND; fi
  cat > "$DEMO/$node/zeo.conf" <<CONF
<zeo>
  address 127.0.0.1:$port
</zeo>
<filestorage 1>
  path $DEMO/$node/Data.fs
  blob-dir $DEMO/$node/blobs
</filestorage>
CONF
done

cat > "$DEMO/primary/zrelay.toml" <<CONF
node_name = "primary"
data_dir = "$DEMO/primary/state"
[client]
listen = "127.0.0.1:$P_CLIENT"
[backend]
address = "127.0.0.1:$P_BACKEND"
[admin]
listen = "127.0.0.1:$P_ADMIN"
token_file = "$TOKEN"
[replication]
role = "primary"
listen = "127.0.0.1:$P_REPL"
allowed_peers = ["replica"]
[replication.tls]
ca_file = "$DEMO/certs/ca.pem"
cert_file = "$DEMO/certs/primary.pem"
key_file = "$DEMO/certs/primary-key.pem"
$BOOK
CONF
cat > "$DEMO/replica/zrelay.toml" <<CONF
node_name = "replica"
data_dir = "$DEMO/replica/state"
[client]
listen = "127.0.0.1:$R_CLIENT"
[backend]
address = "127.0.0.1:$R_BACKEND"
[admin]
listen = "127.0.0.1:$R_ADMIN"
token_file = "$TOKEN"
[replication]
role = "replica"
upstream = "127.0.0.1:$P_REPL"
upstream_name = "primary"
listen = "127.0.0.1:$R_REPL"
allowed_peers = ["primary"]
[replication.tls]
ca_file = "$DEMO/certs/ca.pem"
cert_file = "$DEMO/certs/replica.pem"
key_file = "$DEMO/certs/replica-key.pem"
$BOOK
CONF

for node in primary replica; do
  "$ROOT/.venv/bin/runzeo" -C "$DEMO/$node/zeo.conf" >"$DEMO/$node/runzeo.log" 2>&1 &
  pids+=($!)
done
"$PY" scripts/wait_port.py 127.0.0.1 "$P_BACKEND" 20
"$PY" scripts/wait_port.py 127.0.0.1 "$R_BACKEND" 20
for node in primary replica; do
  "$ZRELAY" run --config "$DEMO/$node/zrelay.toml" 2>"$DEMO/$node/zrelay.log" &
  pids+=($!)
done
"$PY" scripts/wait_port.py 127.0.0.1 "$P_CLIENT" 20
"$PY" scripts/wait_port.py 127.0.0.1 "$R_CLIENT" 20

echo "== write through the primary (127.0.0.1:$P_CLIENT), read back from the replica (127.0.0.1:$R_CLIENT) =="
"$PY" scripts/demo_workload.py "127.0.0.1:$P_CLIENT" "127.0.0.1:$R_CLIENT"
echo
echo "== any node is a door: a read-write client at the replica (127.0.0.1:$R_CLIENT) =="
"$PY" scripts/demo_door.py "127.0.0.1:$R_CLIENT" "127.0.0.1:$P_CLIENT"
echo
echo "== the cluster as zrelay sees it =="
"$ZRELAY" status --admin "127.0.0.1:$P_ADMIN" --admin "127.0.0.1:$R_ADMIN" || true
echo
echo "== transaction-by-transaction comparison =="
"$ZRELAY" verify --primary "127.0.0.1:$P_BACKEND" --replica "127.0.0.1:$R_BACKEND" 2>/dev/null || true
echo
# Until each side's door knows the other, a role change could not name it.
wait_status() { "$PY" scripts/wait_status.py "$@"; } # ADMIN_PORT EXPR [SECONDS]: poll /status until EXPR on it (d) holds
switchover() { # FROM_ADMIN TO_NODE OTHER_ADMIN
  echo "== switchover to $2: no new commits, $2 applies everything, roles swap =="
  "$ZRELAY" switchover --admin "127.0.0.1:$1" --to "$2" --token-file "$TOKEN"
  echo
  wait_status "$3" 'd["role"] == "primary"'
  wait_status "$1" 'd["role"] == "replica" and d["upstream"]["state"] == "live"'
  "$ZRELAY" status --admin "127.0.0.1:$P_ADMIN" --admin "127.0.0.1:$R_ADMIN" || true
}
wait_status "$R_ADMIN" 'd["upstream"]["state"] == "live"'
switchover "$P_ADMIN" replica "$R_ADMIN"
echo "== clients keep going through either door: a write at 127.0.0.1:$P_CLIENT lands on the new primary =="
"$PY" scripts/demo_workload.py "127.0.0.1:$P_CLIENT" "127.0.0.1:$R_CLIENT"
echo
switchover "$R_ADMIN" primary "$P_ADMIN"

cat <<INFO

The demo cluster is running. Look at:
  write clients ->  127.0.0.1:$P_CLIENT   ZEO.ClientStorage(('127.0.0.1', $P_CLIENT))
  any client    ->  127.0.0.1:$R_CLIENT   the replica's door: writes go to the primary, reads stay here
  metrics          http://127.0.0.1:$P_ADMIN/metrics   http://127.0.0.1:$R_ADMIN/metrics
  status           http://127.0.0.1:$P_ADMIN/status    http://127.0.0.1:$R_ADMIN/status
  health (LB)      http://127.0.0.1:$P_ADMIN/primary   http://127.0.0.1:$R_ADMIN/replica?lag=1s
  cluster table    $ZRELAY status --admin 127.0.0.1:$P_ADMIN --admin 127.0.0.1:$R_ADMIN
  nagios check     $ZRELAY check --admin 127.0.0.1:$R_ADMIN --max-lag 5s
  more writes      $PY scripts/demo_workload.py 127.0.0.1:$P_CLIENT 127.0.0.1:$R_CLIENT
  switchover       $ZRELAY switchover --admin 127.0.0.1:$P_ADMIN --to replica --token-file $TOKEN
  logs             $DEMO/{primary,replica}/zrelay.log

Ctrl-C to stop.
INFO
wait
