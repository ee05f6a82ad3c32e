#!/usr/bin/env python3
"""Client processes for the replication benchmark (``bench/repl_bench.py``).

Run as ``python bench/repl_clients.py ROLE ...``; each role is one process:

``writer``    commits small transactions (one object of ~100 bytes changed
              per transaction) through a ZEO address, at a fixed rate or as
              fast as it can, and records for each commit the tid and the
              moment ``tpc_finish`` returned.
``watcher``   registers read-only on one or more ZEO addresses and records,
              for every ``invalidateTransaction(tid, oids)`` that arrives,
              the tid, the number of oids and the moment it arrived.
``populate``  writes N transactions of one new object of B bytes each
              straight into a FileStorage file (no server), to make the
              catch-up history quickly.

Every timestamp is ``time.monotonic_ns()``: CLOCK_MONOTONIC, one clock for
the whole machine on Linux, so times taken in different processes compare.
A timestamp is taken as soon as the bytes that complete a message have been
read from the socket, before the message is decoded.

Control is a line protocol on stdin/stdout, one JSON object per line: the
process prints ``{"ready": ...}`` once connected, waits for a command line
from the parent, then prints ``{"result": ...}`` and exits. Errors go to
stderr with a non-zero exit. Every wait has a timeout and every loop a count
and a time limit.

The ZEO 5 messages used (pickle, ``Z5``): ``register(storage, read_only)``,
``new_oids(n)``, ``tpc_begin(id, user, description, ext, tid, status)``
(async), ``storea(oid, serial, data, id)`` (async), ``vote(id)``,
``tpc_finish(id)`` (returns the tid). Async messages are ``(0, True, name,
args)``; the server's ``info`` and ``invalidateTransaction`` calls to the
client come as ``(0, True, name, args)`` too.
"""
import argparse
import ctypes
import json
import os
import pickle
import selectors
import signal
import socket
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import zeoraw  # noqa: E402

Z64 = zeoraw.Z64
_HDR = struct.Struct('>I')
clock = time.monotonic_ns


def die_with_parent():
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:
        pass


def emit(obj):
    sys.stdout.write(json.dumps(obj) + '\n')
    sys.stdout.flush()


def wait_command(timeout):
    """One command line from the parent (stdin), or exit."""
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise SystemExit(f'no command from the parent within {timeout:.0f}s')
    line = sys.stdin.readline()
    if not line:
        raise SystemExit('parent closed stdin')
    return line.split()


def record(state_bytes):
    """A ZODB record: class pickle + state pickle (a PersistentMapping)."""
    return (b'\x80\x03cpersistent.mapping\nPersistentMapping\nq\x00N\x86q\x01.'
            + pickle.dumps({'data': {'pad': state_bytes}}, 3))


class Conn(zeoraw.RawZeo):
    """A raw ZEO connection that can send async messages and pipeline."""

    def frame(self, msgid, is_async, name, *args):
        payload = self._encode((msgid, is_async, name, args))
        return _HDR.pack(len(payload)) + payload

    def next_msgid(self):
        self._msgid += 1
        return self._msgid

    def read_reply(self, msgid):
        """Wait for the reply to *msgid*; return ``(result, arrival_ns)``.

        Async messages from the server (``info``, invalidations) are
        skipped. The arrival time is taken when the reply's bytes are in.
        """
        while True:
            payload = self._recv_frame()
            t = clock()
            result = self._reply(msgid, payload)
            if result is not zeoraw._OTHER:
                return result, t


# --------------------------------------------------------------- writer ----

def run_writer(args):
    c = Conn(args.host, args.port, timeout=30.0, encoding='Z')
    c.register('1', False)
    oid = c.call('new_oids', 1)[0]
    pad = os.urandom(64)
    txn_id = 0

    def commit(serial, n):
        nonlocal txn_id
        txn_id += 1
        data = record(pad + n.to_bytes(8, 'big'))
        vid = c.next_msgid()
        buf = (c.frame(0, True, 'tpc_begin', txn_id, b'', b'', {}, None, ' ')
               + c.frame(0, True, 'storea', oid, serial, data, txn_id)
               + c.frame(vid, False, 'vote', txn_id))
        t0 = clock()
        c.sock.sendall(buf)
        c.read_reply(vid)
        fid = c.next_msgid()
        c.sock.sendall(c.frame(fid, False, 'tpc_finish', txn_id))
        tid, t1 = c.read_reply(fid)
        return tid, t0, t1

    # Create the object and warm the path up (not recorded).
    serial = Z64
    for i in range(args.warmup):
        serial, _, _ = commit(serial, i)
    emit({'ready': True})
    cmd = wait_command(120.0)
    if cmd[0] != 'go':
        raise SystemExit(f'unexpected command {cmd!r}')
    interval = 1e9 / args.rate if args.rate > 0 else 0.0
    tids, t_start, t_finish, lat = [], [], [], []
    start = clock()
    end = start + int(args.seconds * 1e9)
    n = 0
    while n < args.max_txns:
        if interval:
            due = start + int(n * interval)
            now = clock()
            if due > now:
                time.sleep((due - now) / 1e9)
        serial, t0, t1 = commit(serial, n)
        tids.append(serial.hex())
        t_start.append(t0)
        t_finish.append(t1)
        lat.append(t1 - t0)
        n += 1
        if t1 >= end:
            break
    elapsed = (clock() - start) / 1e9
    c.close()
    emit({'result': {'tids': tids, 'finish_ns': t_finish, 'start_ns': t_start,
                     'latency_ns': lat, 'elapsed': elapsed,
                     'first_ns': t_start[0] if t_start else start,
                     'last_ns': t_finish[-1] if t_finish else start}})


# -------------------------------------------------------------- watcher ----

def run_watcher(args):
    """Record invalidations on every ``NAME=PORT`` until told to stop.

    Command: ``stop TIDHEX TIMEOUT``: keep reading until every address has
    seen an invalidation for a tid >= TIDHEX, or TIMEOUT seconds.
    """
    sel = selectors.DefaultSelector()
    conns = {}
    seen = {}
    for spec in args.watch:
        name, port = spec.split('=')
        c = Conn(args.host, int(port), timeout=30.0, encoding='Z')
        c.register('1', True)
        c.sock.setblocking(False)
        conns[name] = c
        seen[name] = []       # [tid_hex, arrival_ns, n_oids]
        sel.register(c.sock, selectors.EVENT_READ, name)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    emit({'ready': True})
    decode = zeoraw._pickle_decode
    stop_tid = None
    deadline = None
    hard_end = time.monotonic() + args.max_seconds
    newest = {name: b'' for name in conns}
    while time.monotonic() < hard_end:
        if stop_tid is not None:
            if all(newest[n] >= stop_tid for n in conns) \
                    or time.monotonic() > deadline:
                break
            timeout = max(0.0, min(0.5, deadline - time.monotonic()))
        else:
            timeout = 0.5
        for key, _ in sel.select(timeout):
            name = key.data
            if name is None:
                line = sys.stdin.readline().split()
                if not line:
                    raise SystemExit('parent closed stdin')
                if line[0] == 'stop':
                    stop_tid = bytes.fromhex(line[1])
                    deadline = time.monotonic() + float(line[2])
                continue
            c = conns[name]
            try:
                chunk = c.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            t = clock()
            if not chunk:
                raise SystemExit(f'{name}: server closed the connection')
            buf = c._buf
            buf += chunk
            while len(buf) >= 4:
                (size,) = _HDR.unpack_from(buf)
                if len(buf) < 4 + size:
                    break
                msg = decode(bytes(buf[4:4 + size]))
                del buf[:4 + size]
                if msg[2] == 'invalidateTransaction':
                    tid, oids = msg[3][0], msg[3][1]
                    seen[name].append([tid.hex(), t, len(oids)])
                    if tid > newest[name]:
                        newest[name] = tid
    for c in conns.values():
        c.close()
    emit({'result': seen})


# ------------------------------------------------------------- populate ----

def run_populate(args):
    """N transactions of one new B-byte object each, written straight into
    a FileStorage file (no ZEO server: this is the fixture, not the
    measurement). Its per-commit fsync is turned off: the file is copied
    before anything is measured on it."""
    import ZODB.FileStorage  # noqa: F401
    from ZODB.Connection import TransactionMetaData
    fsmod = sys.modules['ZODB.FileStorage.FileStorage']
    fsmod.fsync = None
    fs = fsmod.FileStorage(args.path, create=True)
    pool = os.urandom(1 << 20)
    overhead = len(record(b''))
    size = max(1, args.bytes - overhead - 5)
    t0 = time.monotonic()
    deadline = t0 + args.max_seconds
    total_bytes = 0
    tid = None
    try:
        for i in range(args.txns):
            if (i & 255) == 0 and time.monotonic() > deadline:
                raise SystemExit(f'populate: only {i} transactions in '
                                 f'{args.max_seconds:.0f}s')
            off = (i * 7919) % ((1 << 20) - size)
            data = record(pool[off:off + size])
            total_bytes += len(data)
            t = TransactionMetaData(b'', b'', {})
            fs.tpc_begin(t)
            fs.store(fs.new_oid(), Z64, data, '', t)
            fs.tpc_vote(t)
            tid = fs.tpc_finish(t)
    finally:
        fs.close()      # writes Data.fs.index
    emit({'result': {'txns': args.txns, 'bytes': total_bytes,
                     'seconds': time.monotonic() - t0,
                     'last_tid': tid.hex()}})


def main():
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us
    ap = argparse.ArgumentParser()
    ap.add_argument('role', choices=('writer', 'watcher', 'populate'))
    ap.add_argument('--host', default='127.0.0.1')
    ap.add_argument('--port', type=int)
    ap.add_argument('--rate', type=float, default=0.0,
                    help='writer: commits per second (0 = as fast as it can)')
    ap.add_argument('--seconds', type=float, default=5.0)
    ap.add_argument('--max-txns', type=int, default=200000)
    ap.add_argument('--warmup', type=int, default=20)
    ap.add_argument('--watch', action='append', default=[],
                    metavar='NAME=PORT')
    ap.add_argument('--max-seconds', type=float, default=600.0)
    ap.add_argument('--txns', type=int, default=1000)
    ap.add_argument('--bytes', type=int, default=2500)
    ap.add_argument('--path', help='populate: the Data.fs to write')
    args = ap.parse_args()
    {'writer': run_writer, 'watcher': run_watcher,
     'populate': run_populate}[args.role](args)


if __name__ == '__main__':
    try:
        main()
    except (socket.error, EOFError, zeoraw.ProtocolError,
            zeoraw.ServerError) as e:
        print(f'repl_clients: {type(e).__name__}: {e}', file=sys.stderr)
        sys.exit(1)
