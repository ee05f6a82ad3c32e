"""Wait until host:port accepts TCP connections (exit 1 after the deadline)."""
import socket
import sys
import time

host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + secs
while True:
    try:
        socket.create_connection((host, port), timeout=1).close()
        sys.exit(0)
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"{host}:{port} not accepting connections after {secs}s")
        time.sleep(0.05)
