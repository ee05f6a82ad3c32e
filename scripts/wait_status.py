"""wait_status.py PORT EXPR [SECONDS]: poll zrelay's /status at
127.0.0.1:PORT until the Python expression EXPR, evaluated with the status
JSON as `d`, holds (default 30 s); exit 1 with a message on timeout.
Used by the demo scripts to wait for a role change or a live stream."""
import json
import sys
import time
import urllib.request

port, expr = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + float(sys.argv[3] if len(sys.argv) > 3 else 30)
while time.monotonic() < deadline:
    try:
        d = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2))
        if eval(expr):
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"timed out waiting for {expr} at 127.0.0.1:{port}")
