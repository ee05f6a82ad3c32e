#!/usr/bin/env bash
# make demo: a runzeo + zrelay on loopback, a sample workload through the
# proxy, then keep running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
ZRELAY=$ROOT/target/release/zrelay
DEMO=${DEMO_DIR:-$ROOT/demo-data}
CLIENT_PORT=${DEMO_CLIENT_PORT:-8100}
BACKEND_PORT=${DEMO_BACKEND_PORT:-8200}

rm -rf "$DEMO"; mkdir -p "$DEMO/primary"
pids=()
cleanup() {
  trap - EXIT INT TERM
  echo; echo "stopping demo..."
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

cat > "$DEMO/primary/zeo.conf" <<CONF
<zeo>
  address 127.0.0.1:$BACKEND_PORT
</zeo>
<filestorage 1>
  path $DEMO/primary/Data.fs
  blob-dir $DEMO/primary/blobs
</filestorage>
CONF
cat > "$DEMO/primary/zrelay.toml" <<CONF
node_name = "primary"
[client]
listen = "127.0.0.1:$CLIENT_PORT"
[backend]
address = "127.0.0.1:$BACKEND_PORT"
CONF

"$ROOT/.venv/bin/runzeo" -C "$DEMO/primary/zeo.conf" >"$DEMO/primary/runzeo.log" 2>&1 &
pids+=($!)
"$PY" scripts/wait_port.py 127.0.0.1 "$BACKEND_PORT" 20
"$ZRELAY" run --config "$DEMO/primary/zrelay.toml" 2>"$DEMO/primary/zrelay.log" &
pids+=($!)
"$PY" scripts/wait_port.py 127.0.0.1 "$CLIENT_PORT" 20

echo "== sample workload through zrelay (127.0.0.1:$CLIENT_PORT) =="
"$PY" scripts/demo_workload.py "127.0.0.1:$CLIENT_PORT"

cat <<INFO

zrelay is running. Look at:
  clients connect to   127.0.0.1:$CLIENT_PORT   (ZEO.ClientStorage(('127.0.0.1', $CLIENT_PORT)))
  backend runzeo       127.0.0.1:$BACKEND_PORT
  zrelay log           $DEMO/primary/zrelay.log
  runzeo log           $DEMO/primary/runzeo.log
  try it:              .venv/bin/python scripts/demo_workload.py 127.0.0.1:$CLIENT_PORT

Ctrl-C to stop.
INFO
wait
