"""Role-change scenarios for tests/roles.rs: a bank workload that keeps
committing through doors while the primary changes.

Usage: roles.py COMMAND ARGS...

Commands:
  bank-init ADDR N TOTAL      N accounts holding TOTAL, one counter per writer
  switch-load N TOTAL WDOORS RDOORS CACHEDIR
        interactive. Writers (one per WDOOR, "A|B" = a client given both
        doors' addresses; odd ones with a persistent
        cache in CACHEDIR) transfer money and bump their own counter in the
        same transaction; readers at every RDOOR check each snapshot sums to
        TOTAL. A commit refused by the fence (ReadOnlyError) or cut by a
        reconnect is retried. Prints READY once every writer committed.
        stdin: "mark" -> "MARKED" once every writer committed again after it
        (the clients continue); "pauses" -> "PAUSES S0 S1 ..." each
        writer's longest pause between two acknowledged commits since the
        previous "pauses" (seconds; when, in UTC, on stderr); "stop" ->
        stops, then checks at FINAL (the
        first WDOOR): total intact, and each writer's counter equals its
        acknowledged commits (plus at most its commits of unknown outcome):
        no acknowledged commit lost.
  write ADDR KEY VALUE        one commit
  read ADDR KEY               prints value=...
  cached-read ADDR KEY CACHEDIR
                              the same through a persistent cache (client
                              "cached" in CACHEDIR), kept for the next run
"""
import faulthandler
import random
import sys
import threading
import time

import transaction  # noqa: F401 - imported for its side effects on ZODB
from ZODB.POSException import ConflictError, ReadOnlyError

import bank
from zclient import Failure, check, check_eq, client, new_conn, open_db, run


def bank_init(addr, n, total, writers='4'):
    print(f'tid={bank.init(addr, n, total, writers).hex()}')


def switch_load(n, total, wdoors, rdoors, cachedir):
    n, total = int(n), int(total)
    wdoors = [d for d in wdoors.split(',') if d]
    rdoors = [d for d in rdoors.split(',') if d]
    stop = threading.Event()
    lock = threading.Lock()
    errors = []
    acked = [0] * len(wdoors)
    unknown = [0] * len(wdoors)
    refused = [0] * len(wdoors)
    conflicts = [0]
    reads = [0]
    mark = [0] * len(wdoors)  # commits at the last mark
    # Each writer's last acknowledgement (monotonic) and its longest pause
    # between two acknowledgements since the last "pauses" command, with
    # the wall-clock times it began and ended.
    last_ack = [None] * len(wdoors)
    longest = [(0.0, 0.0, 0.0)] * len(wdoors)

    def fail(msg):
        with lock:
            errors.append(msg)

    def writer(i, door):
        rng = random.Random(i)
        kw = {}
        if i % 2 == 1:
            kw = dict(client=f'w{i}', var=cachedir, cache_size=1 << 20)
        db = open_db(door, name=f'w{i}', **kw)
        try:
            tm, conn = new_conn(db)
            for _ in range(100_000):
                if stop.is_set() or errors:
                    return
                phase = 'begin'
                try:
                    bank.transfer(tm, conn, rng, n, i)
                    phase = 'commit'
                    tm.commit()
                except ConflictError:
                    tm.abort()
                    with lock:
                        conflicts[0] += 1
                    continue
                except ReadOnlyError:
                    # Fenced at vote: nothing committed.
                    tm.abort()
                    with lock:
                        refused[i] += 1
                    time.sleep(0.05)
                    continue
                except Exception as e:  # noqa: BLE001 - a reconnect
                    tm.abort()
                    msg = repr(e)
                    if 'newer than' in msg:
                        fail(f'writer {i}: {msg}')
                        return
                    if phase == 'commit':
                        with lock:
                            unknown[i] += 1
                    time.sleep(0.05)
                    continue
                now = time.monotonic()
                with lock:
                    acked[i] += 1
                    if last_ack[i] is not None:
                        gap = now - last_ack[i]
                        if gap > longest[i][0]:
                            wall = time.time()
                            longest[i] = (gap, wall - gap, wall)
                    last_ack[i] = now
        except Exception as e:  # noqa: BLE001
            fail(f'writer {i} at {door}: {e!r}')
        finally:
            db.close()

    def reader(i, door):
        db = open_db(door)
        try:
            tm, conn = new_conn(db)
            while not stop.is_set() and not errors:
                try:
                    tm.begin()
                    s = bank.total(conn, n)
                    tm.abort()
                except Exception as e:  # noqa: BLE001 - a reconnect
                    tm.abort()
                    if 'newer than' in repr(e):
                        fail(f'reader {i}: {e!r}')
                        return
                    time.sleep(0.05)
                    continue
                if s != total:
                    seen = [(k, bank[k]['b'], bank[k]._p_serial.hex())
                            for k in range(n)]
                    fail(f'reader {i} at {door}: sum {s} != {total} '
                         f'(view {conn._storage._start.hex()}: {seen})')
                    return
                conn.cacheMinimize()
                with lock:
                    reads[0] += 1
                time.sleep(0.01)
        finally:
            db.close()

    threads = [threading.Thread(target=writer, args=(i, d))
               for i, d in enumerate(wdoors)]
    threads += [threading.Thread(target=reader, args=(i, d))
                for i, d in enumerate(rdoors)]
    for t in threads:
        t.start()

    def wait_progress(what, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            with lock:
                if errors:
                    raise Failure('; '.join(errors))
                if all(acked[i] > mark[i] for i in range(len(wdoors))):
                    for i in range(len(wdoors)):
                        mark[i] = acked[i]
                    return
            if time.monotonic() > deadline:
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                raise Failure(f'{what}: writers stuck at {acked} '
                              f'(refused {refused}, unknown {unknown})')
            time.sleep(0.02)

    try:
        wait_progress('start')
        print('READY', flush=True)
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == 'mark':
                wait_progress('after the mark')
                print('MARKED', flush=True)
            elif cmd == 'pauses':
                with lock:
                    got = list(longest)
                    longest[:] = [(0.0, 0.0, 0.0)] * len(wdoors)
                print('PAUSES ' + ' '.join(f'{g:.3f}' for g, _, _ in got),
                      flush=True)
                for i, (g, a, b) in enumerate(got):
                    print(f'writer {i} longest pause {g:.3f} s: '
                          f'{time.strftime("%H:%M:%S", time.gmtime(a))}'
                          f'.{int(a % 1 * 1000):03d} -> '
                          f'{time.strftime("%H:%M:%S", time.gmtime(b))}'
                          f'.{int(b % 1 * 1000):03d} UTC', file=sys.stderr,
                          flush=True)
            elif cmd == 'stop':
                break
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    if errors:
        raise Failure('; '.join(errors))
    db = open_db(wdoors[0])
    try:
        tm, conn = new_conn(db)
        check_eq(bank.total(conn, n), total, 'bank total at the end')
        for i in range(len(wdoors)):
            got = bank.counter(conn, i)
            check(acked[i] <= got <= acked[i] + unknown[i],
                  f'writer {i}: counter {got}, acknowledged {acked[i]}, '
                  f'unknown outcome {unknown[i]}: a commit was lost')
        tm.abort()
    finally:
        db.close()
    print(f'acked={sum(acked)} refused={sum(refused)} '
          f'unknown={sum(unknown)} conflicts={conflicts[0]} reads={reads[0]}')


def write(addr, key, value):
    with client(addr) as (db, tm, conn):
        conn.root()[key] = value
        tm.commit()
        print(f'tid={db.storage.lastTransaction().hex()}')


def read(addr, key, **open_kw):
    with client(addr, **open_kw) as (_, _, conn):
        print(f'value={conn.root().get(key)!r}')


def cached_read(addr, key, cachedir):
    read(addr, key, client='cached', var=cachedir, cache_size=1 << 20)


COMMANDS = {
    'cached-read': cached_read,
    'bank-init': bank_init,
    'switch-load': switch_load,
    'write': write,
    'read': read,
}

if __name__ == '__main__':
    sys.exit(run(COMMANDS, sys.argv))
