#!/usr/bin/env bash
# make demo-ha: automatic failover on loopback. A local etcd (installed by
# scripts/ensure-tools.sh) and three nodes, each a runzeo with a zrelay
# beside it configured with [coordinator]: the node holding the leader key
# in etcd is the primary. Writes go through a replica's door; then the
# primary is killed (zrelay and runzeo, SIGKILL), the most caught-up replica
# is elected, and a write through a door lands on the new primary. Keeps
# running until Ctrl-C (DEMO_EXIT=1: stop at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
ZRELAY=${ZRELAY:-$ROOT/target/release/zrelay}
DEMO=${DEMO_DIR:-$ROOT/demo-ha-data}
BASE=${DEMO_BASE_PORT:-8500}   # ports BASE..BASE+43 on 127.0.0.1
TTL=${DEMO_TTL:-5}

ETCD_CLIENT=$BASE; ETCD_PEER=$((BASE+1))
client() { echo $((BASE+10+$1)); }
backend() { echo $((BASE+20+$1)); }
admin() { echo $((BASE+30+$1)); }
repl() { echo $((BASE+40+$1)); }

command -v etcd >/dev/null || { echo "etcd not found: run scripts/ensure-tools.sh (make tools)" >&2; exit 1; }
rm -rf "$DEMO"; mkdir -p "$DEMO/etcd"
declare -A pid
cleanup() {
  trap - EXIT INT TERM
  echo; echo "stopping demo-ha..."
  for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

etcd --name demo --data-dir "$DEMO/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "demo=http://127.0.0.1:$ETCD_PEER" --log-level warn >"$DEMO/etcd/etcd.log" 2>&1 &
pid[etcd]=$!

"$ZRELAY" cert --dir "$DEMO/certs" node1 node2 node3 >/dev/null
BOOK=""
for k in 1 2 3; do
  BOOK+="[[cluster.nodes]]
name = \"node$k\"
client = \"127.0.0.1:$(client $k)\"
replication = \"127.0.0.1:$(repl $k)\"
"
done
for k in 1 2 3; do
  d=$DEMO/node$k; mkdir -p "$d"
  cat > "$d/zeo.conf" <<CONF
<zeo>
  address 127.0.0.1:$(backend $k)
</zeo>
<filestorage 1>
  path $d/Data.fs
  blob-dir $d/blobs
</filestorage>
CONF
  if [ $k = 1 ]; then
    role='role = "primary"'
  else
    role="role = \"replica\"
upstream = \"127.0.0.1:$(repl 1)\"
upstream_name = \"node1\""
  fi
  cat > "$d/zrelay.toml" <<CONF
node_name = "node$k"
data_dir = "$d/state"
[client]
listen = "127.0.0.1:$(client $k)"
[backend]
address = "127.0.0.1:$(backend $k)"
[admin]
listen = "127.0.0.1:$(admin $k)"
[replication]
$role
listen = "127.0.0.1:$(repl $k)"
ack_mode = "semi-sync"
ack_level = "received"
ack_timeout_ms = 15000
[replication.tls]
ca_file = "$DEMO/certs/ca.pem"
cert_file = "$DEMO/certs/node$k.pem"
key_file = "$DEMO/certs/node$k-key.pem"
$BOOK
[coordinator]
kind = "etcd"
endpoints = ["http://127.0.0.1:$ETCD_CLIENT"]
name = "demo"
ttl_secs = $TTL
loop_wait_secs = 1
fence_margin_ms = 1000
CONF
done

"$PY" scripts/wait_port.py 127.0.0.1 "$ETCD_CLIENT" 20
for k in 1 2 3; do
  "$ROOT/.venv/bin/runzeo" -C "$DEMO/node$k/zeo.conf" >"$DEMO/node$k/runzeo.log" 2>&1 &
  pid[zeo$k]=$!
done
for k in 1 2 3; do "$PY" scripts/wait_port.py 127.0.0.1 "$(backend $k)" 20; done
for k in 1 2 3; do
  "$ZRELAY" run --config "$DEMO/node$k/zrelay.toml" 2>"$DEMO/node$k/zrelay.log" &
  pid[zrelay$k]=$!
done
for k in 1 2 3; do "$PY" scripts/wait_port.py 127.0.0.1 "$(client $k)" 20; done

wait_status() { "$PY" scripts/wait_status.py "$@"; } # ADMIN_PORT EXPR [SECONDS]
etcd_status() { "$ZRELAY" status --config "$DEMO/node$1/zrelay.toml" || true; }
admins() { for k in "$@"; do printf -- '--admin 127.0.0.1:%s ' "$(admin $k)"; done; }

echo "== node1 takes the leader key in etcd; node2 and node3 follow it =="
wait_status "$(admin 1)" 'd["role"] == "primary" and d.get("coordinator", {}).get("holding")'
wait_status "$(admin 2)" 'd["upstream"]["state"] == "live"'
wait_status "$(admin 3)" 'd["upstream"]["state"] == "live"'
etcd_status 2
echo
echo "== a write through node2's door (127.0.0.1:$(client 2)) lands on the primary; read back at node3's door =="
"$PY" scripts/demo_workload.py "127.0.0.1:$(client 2)" "127.0.0.1:$(client 3)"
echo
# shellcheck disable=SC2046
"$ZRELAY" status $(admins 1 2 3) || true
echo
echo "== kill -9 node1 (zrelay and runzeo): its lease expires within ${TTL}s, the best replica is elected =="
killed=$(date +%s.%N)
kill -9 "${pid[zrelay1]}" "${pid[zeo1]}"
wait "${pid[zrelay1]}" "${pid[zeo1]}" 2>/dev/null || true
unset 'pid[zrelay1]' 'pid[zeo1]'
"$PY" - "$(admin 2)" "$(admin 3)" "$killed" <<'PYEOF'
import json, sys, time, urllib.request
killed = float(sys.argv[3])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    for port in sys.argv[1:3]:
        try:
            d = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2))
        except OSError:
            continue
        if d["role"] == "primary" and d.get("coordinator", {}).get("holding"):
            print(f"{d['node']} is primary (epoch {d['role_state']['epoch']}) "
                  f"{time.time() - killed:.1f}s after the kill")
            sys.exit(0)
    time.sleep(0.1)
sys.exit("no new primary within 60s")
PYEOF
echo
etcd_status 2
echo
echo "== clients keep going through their doors: a write at node3's door (127.0.0.1:$(client 3)), read back at node2's =="
"$PY" scripts/demo_workload.py "127.0.0.1:$(client 3)" "127.0.0.1:$(client 2)"
echo
# shellcheck disable=SC2046
"$ZRELAY" status $(admins 2 3) || true

cat <<INFO

The HA demo is running (node1 is down). Look at:
  clients (doors)  127.0.0.1:$(client 2)  127.0.0.1:$(client 3)   any door reaches the primary
  cluster in etcd  $ZRELAY status --config $DEMO/node2/zrelay.toml
  maintenance      $ZRELAY pause --config $DEMO/node2/zrelay.toml --reason "planned work" (resume: zrelay resume)
  status           http://127.0.0.1:$(admin 2)/status   http://127.0.0.1:$(admin 3)/status
  logs             $DEMO/node{1,2,3}/zrelay.log   $DEMO/etcd/etcd.log

Ctrl-C to stop.
INFO
if [ "${DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
wait
