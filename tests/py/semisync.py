"""Semi-synchronous commit helpers for tests/semisync.rs (real ZEO clients).

Usage: semisync.py COMMAND ARGS...

Commands:
  commit ADDR KEY       one commit of root[KEY]; tid=<hex> secs=<float>
                        oid=<hex of root[KEY]>
  observer ADDR         a connected client: "probe" prints AT <hex> (its
                        cache's last tid, learnt from invalidations); "wait
                        HEX" prints AT HEX once it has it (30 s); "load
                        OID" asks the server (not the cache) for OID's
                        current revision and prints LOADED <its tid>; "stop"
  acked-writer ADDR [gated]
                        commit until "stop" on stdin (or 100 s), printing
                        "ACK <hex>" after every commit the server confirmed;
                        failures (the primary killed) are retried;
                        gated: print READY once connected, and start
                        committing on a first line ("go") on stdin
"""
import logging
import os
import sys
import threading
import time

from persistent.mapping import PersistentMapping

from zclient import (Failure, check, new_conn, open_db, open_storage, run,
                     wait_until)

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__.replace('_', '-')] = fn
    return fn


@command
def commit(addr, key):
    db = open_db(addr, wait_timeout=60)
    try:
        tm, conn = new_conn(db)
        started = time.monotonic()
        conn.root()[key] = PersistentMapping(at=time.time())
        tm.commit()
        secs = time.monotonic() - started
        tid = db.storage.lastTransaction()
        oid = conn.root()[key]._p_oid
        print(f'tid={tid.hex()} secs={secs:.3f} oid={oid.hex()}', flush=True)
    finally:
        db.close()


@command
def observer(addr):
    st = open_storage(addr)
    try:
        print('READY', flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == 'stop':
                break
            if words[0] == 'probe':
                print(f'AT {st.lastTransaction().hex()}', flush=True)
            elif words[0] == 'load':
                # A round trip to the server (not the cache): the current
                # revision of oid words[1]; prints its start tid.
                _, start, _ = st._call('loadBefore', bytes.fromhex(words[1]),
                                       b'\xff' * 8)
                print(f'LOADED {start.hex()}', flush=True)
            elif words[0] == 'wait':
                wait_until(lambda: st.lastTransaction().hex() == words[1],
                           f'tid {words[1]}', timeout=30.0)
                print(f'AT {words[1]}', flush=True)
            else:
                raise Failure(f'unknown command {line!r}')
    finally:
        st.close()


@command
def acked_writer(addr, gated=''):
    db = open_db(addr, wait_timeout=60)
    stop = threading.Event()
    tm, conn = new_conn(db)
    root = conn.root()
    if gated:
        # Connected and loaded; the first commit waits for "go" on stdin.
        print('READY', flush=True)
        sys.stdin.readline()

    def reader():
        sys.stdin.readline()
        stop.set()
        # A commit blocked on a dead server would wait for a reconnection
        # (wait_timeout); every ACK line is printed already.
        time.sleep(0.5)
        print('stopped', flush=True)
        os._exit(0)

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + 100
    n = 0
    if not gated:
        print('READY', flush=True)
    while not stop.is_set():
        check(time.monotonic() < deadline, 'no "stop" within 100s')
        try:
            tm.begin()
            root[f'a{n % 50}'] = PersistentMapping(n=n)
            tm.commit()
            n += 1
            print(f'ACK {db.storage.lastTransaction().hex()}', flush=True)
        except Exception as e:
            logging.info('commit failed (%s); retrying', type(e).__name__)
            try:
                tm.abort()
            except Exception:
                pass
            time.sleep(0.05)
    print(f'commits={n}', flush=True)


if __name__ == '__main__':
    sys.exit(run(COMMANDS, sys.argv))
