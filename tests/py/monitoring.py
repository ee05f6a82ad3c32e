"""What ZEO's own monitoring reports through a proxy: the `connections`
count of server_status(), ruok and ZEO.nagios (tests/transparency.rs).

Usage: monitoring.py counts ADDR K MODE
  Opens K ClientStorages on ADDR (MODE: rw or ro), then prints
  `status=N ruok=N nagios=N` (ZEO's connections count seen by each of
  them) and closes the storages.
"""
import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile

from zclient import check, open_storage, parse_addr, run


def recv_exact(s, n):
    data = b''
    while len(data) < n:
        chunk = s.recv(n - len(data))
        check(chunk, 'connection closed inside a ruok frame')
        data += chunk
    return data


def recv_frame(s):
    (n,) = struct.unpack('>I', recv_exact(s, 4))
    return recv_exact(s, n)


def ruok(addr):
    """The ruok JSON, read as a monitor would (the nagios plugin's way)."""
    a = parse_addr(addr)
    family = socket.AF_UNIX if isinstance(a, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(a)
        s.sendall(b'\x00\x00\x00\x04ruok')
        recv_frame(s)  # the server's protocol offer
        return json.loads(recv_frame(s).decode('ascii'))


def nagios(addr):
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [sys.executable, '-m', 'ZEO.nagios', '-m', '-s',
             os.path.join(d, 'status'), addr],
            capture_output=True, text=True, timeout=30)
    check(out.returncode == 0,
          f'ZEO.nagios exit {out.returncode}: {out.stdout} {out.stderr}')
    m = re.search(r'\bconnections=(\d+)', out.stdout)
    check(m, f'no connections= in nagios output {out.stdout!r}')
    return int(m.group(1))


def counts(addr, k, mode):
    check(mode in ('rw', 'ro'), f'mode {mode!r}')
    storages = [open_storage(addr, read_only=(mode == 'ro'))
                for _ in range(int(k))]
    try:
        status = storages[0].server_status()
        r = ruok(addr)['1']['connections']
        n = nagios(addr)
        print(f'status={status["connections"]} ruok={r} nagios={n}',
              flush=True)
    finally:
        for s in storages:
            s.close()


COMMANDS = {'counts': counts}

if __name__ == '__main__':
    sys.exit(run(COMMANDS, sys.argv))
