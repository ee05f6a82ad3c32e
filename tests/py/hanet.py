"""Clients for the partition tests (tests/partitions.rs): real ZODB clients
run inside a node's network namespace against its door.

Usage: hanet.py COMMAND ARGS...

Commands:
  bank-init ADDR N TOTAL WRITERS
        N accounts holding TOTAL, one counter per writer; prints tid=
  writer DOOR ID N
        interactive. Transfers between the N accounts and bumps counter ID
        in the same transaction, through DOOR, until "stop" on stdin.
        Prints READY after its first commit, then "ACK <tid> <unix time>"
        for every commit the server acknowledged (the time when commit()
        returned). A failed commit (fenced, cut, no primary) is retried;
        one that failed after it was sent counts as "unknown outcome".
        At "stop": acked=A unknown=U, and exits.
  reads DOOR N TOTAL SECONDS
        a read-only client (opened now) reads the bank in new transactions
        for SECONDS: every snapshot sums to TOTAL; prints reads= errors=
        last=<its last tid>; fails if no read succeeded.
  check ADDR N TOTAL WRITERS
        the bank sums to TOTAL; prints counter<i>=<value> for each writer
  hold-vote DOOR
        interactive. Changes root['held'] through DOOR and takes the
        transaction through tpc_vote (the server's commit lock is now
        held for it), prints VOTED, then waits for stdin to close and
        exits without finishing it.
  lasttid ADDR                      last=<hex>
  history DATA_FS
        "T <tid> <sha256 of the transaction's records and metadata>" per
        transaction, in file order (tids strictly increasing)
"""
import hashlib
import os
import random
import sys
import threading
import time

from ZODB.FileStorage import FileIterator
from ZODB.POSException import ConflictError

import bank
from zclient import (Failure, check, check_eq, new_conn, open_db,
                     open_storage, run)


def bank_init(addr, n, total, writers):
    tid = bank.init(addr, n, total, writers, wait_timeout=60)
    print(f'tid={tid.hex()}')


def writer(door, ident, n):
    ident, n = int(ident), int(n)
    stop = threading.Event()
    # 'inflight': a commit was sent and its outcome is not reported yet.
    counts = {'acked': 0, 'unknown': 0, 'inflight': 0}
    lock = threading.Lock()

    def control():
        sys.stdin.readline()
        stop.set()
        # A commit blocked on an unreachable primary would wait for its
        # reconnection; every ACK line is out already.
        time.sleep(0.3)
        with lock:
            unknown = counts['unknown'] + counts['inflight']
            print(f'acked={counts["acked"]} unknown={unknown}', flush=True)
            os._exit(0)

    threading.Thread(target=control, daemon=True).start()
    rng = random.Random(ident)
    db = open_db(door, wait_timeout=120)
    tm, conn = new_conn(db)
    ready = False
    deadline = time.monotonic() + 380
    while not stop.is_set():
        check(time.monotonic() < deadline, 'no "stop" within 380s')
        phase = 'begin'
        try:
            acct, _ = bank.transfer(tm, conn, rng, n, ident)
            phase = 'commit'
            with lock:
                counts['inflight'] = 1
            tm.commit()
        except ConflictError:
            tm.abort()
            with lock:
                counts['inflight'] = 0
            continue
        except Exception as e:  # noqa: BLE001 - fenced, cut, no primary
            try:
                tm.abort()
            except Exception:  # noqa: BLE001
                pass
            if 'newer than' in repr(e):
                raise Failure(f'writer {ident}: {e!r}')
            with lock:
                counts['inflight'] = 0
                if phase == 'commit' and 'ReadOnlyError' not in repr(e):
                    counts['unknown'] += 1
            time.sleep(0.05)
            continue
        at = time.time()
        tid = acct._p_serial.hex()
        with lock:
            if stop.is_set():
                # The report may be printed already: this one is unknown.
                break
            counts['inflight'] = 0
            counts['acked'] += 1
            print(f'ACK {tid} {at:.6f}', flush=True)
        if not ready:
            print('READY', flush=True)
            ready = True
        time.sleep(0.02)
    time.sleep(5)


def reads(door, n, total, seconds):
    n, total, seconds = int(n), int(total), float(seconds)
    db = open_db(door, read_only=True, wait_timeout=30)
    ok = errors = 0
    try:
        tm, conn = new_conn(db)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                tm.begin()
                s = bank.total(conn, n)
                tm.abort()
            except Exception:  # noqa: BLE001 - counted
                errors += 1
                try:
                    tm.abort()
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(0.1)
                continue
            check_eq(s, total, 'bank total in a snapshot')
            ok += 1
            conn.cacheMinimize()
            time.sleep(0.05)
        check(ok > 0, f'no read succeeded ({errors} errors)')
        print(f'reads={ok} errors={errors} '
              f'last={db.storage.lastTransaction().hex()}')
    finally:
        db.close()


def check_bank(addr, n, total, writers):
    n, total = int(n), int(total)
    db = open_db(addr, wait_timeout=60)
    try:
        tm, conn = new_conn(db)
        check_eq(bank.total(conn, n), total, 'bank total')
        print(' '.join(f'counter{i}={bank.counter(conn, i)}'
                       for i in range(int(writers))))
        tm.abort()
    finally:
        db.close()


def lasttid(addr):
    st = open_storage(addr, wait_timeout=30)
    try:
        print(f'last={st.lastTransaction().hex()}')
    finally:
        st.close()


def history(path):
    it = FileIterator(path)
    prev = b''
    try:
        for t in it:
            check(t.tid > prev, f'tids not increasing at {t.tid.hex()}')
            prev = t.tid
            h = hashlib.sha256()
            for part in (t.status.encode(), t.user, t.description,
                         t.extension_bytes):
                h.update(len(part).to_bytes(8, 'big') + part)
            for r in t:
                data = r.data or b''
                h.update(r.oid + len(data).to_bytes(8, 'big') + data +
                         (r.data_txn or b'\0' * 8))
            print(f'T {t.tid.hex()} {h.hexdigest()}')
    finally:
        it.close()


def hold_vote(door):
    db = open_db(door, wait_timeout=60)
    tm, conn = new_conn(db)
    conn.root()['held'] = time.time()
    t = tm.get()
    conn.tpc_begin(t)
    conn.commit(t)
    conn.tpc_vote(t)
    print('VOTED', flush=True)
    sys.stdin.read()
    os._exit(0)     # not tpc_finish, not even an abort


COMMANDS = {
    'bank-init': bank_init,
    'hold-vote': hold_vote,
    'writer': writer,
    'reads': reads,
    'check': check_bank,
    'lasttid': lasttid,
    'history': history,
}

if __name__ == '__main__':
    sys.exit(run(COMMANDS, sys.argv))
