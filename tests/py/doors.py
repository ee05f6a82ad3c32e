"""Door scenarios for tests/doors.rs: clients that write and read through
any node's door (forwarded to the primary, loads offloaded to replicas).

Usage: doors.py COMMAND ARGS...   (DOORS: comma-separated HOST:PORT list)

Commands:
  roundtrip DOOR                 commit through DOOR, read it back at once
  bank-init ADDR N TOTAL         N accounts holding TOTAL together
  bank SEED SECONDS N TOTAL WDOORS RDOORS
                                 writers transfer through every WDOOR;
                                 readers (read-write and read-only sessions)
                                 at every RDOOR check each snapshot sums to
                                 TOTAL and never goes back; writers read
                                 their own writes right after commit
  semantics DOOR PRIMARY         conflict errors, undo, blobs, new_oids and
                                 read-only refusals through DOOR behave as
                                 at PRIMARY
  writer DOOR                    interactive: commit until "stop"
  read-for DOOR SECONDS RO       read the bank in new transactions (RO=1:
                                 a read-only session)
  hold-lock ADDR                 interactive: a commit that voted and holds
                                 the storage's commit lock until "release",
                                 then aborts (LOCKED once it holds it)
  transfer ADDR A B AMOUNT       one transfer; prints tid=...
  probe-reader DOOR N TOTAL [CACHEDIR]
                                 interactive: a new client (with a
                                 persistent cache in CACHEDIR if given)
                                 reads the bank once (READ1); each
                                 "check TID" waits until its snapshot
                                 reaches TID and checks the total (OK),
                                 "stop" ends
"""
import random
import sys
import tempfile
import threading
import time

import transaction
from persistent.mapping import PersistentMapping
from ZODB.blob import Blob
from ZODB.POSException import ConflictError, ReadOnlyError
from ZODB.Connection import TransactionMetaData
from ZODB.utils import u64, z64

import bank as workload
from zclient import (Failure, check, check_eq, new_conn, open_db,
                     open_storage, run)


def hx(tid):
    return tid.hex()


def roundtrip(door):
    db = open_db(door)
    try:
        tm, conn = new_conn(db)
        root = conn.root()
        stamp = time.time()
        root['door'] = PersistentMapping({'stamp': stamp})
        tm.commit()
        tid = db.storage.lastTransaction()
        tm2, conn2 = new_conn(db)
        got = conn2.root()['door']['stamp']
        check_eq(got, stamp, 'read back through the same door')
        print(f'tid={hx(tid)} protocol={db.storage.protocol_version.decode()}')
    finally:
        db.close()


def bank_init(addr, n, total):
    print(f'tid={hx(workload.init(addr, n, total))}')


def bank(seed, seconds, n, total, wdoors, rdoors):
    seed, seconds, n, total = int(seed), float(seconds), int(n), int(total)
    print(f'seed={seed}', flush=True)
    wdoors = [d for d in wdoors.split(',') if d]
    rdoors = [d for d in rdoors.split(',') if d]
    deadline = time.monotonic() + seconds
    errors = []
    counts = {'commits': 0, 'conflicts': 0, 'reads': 0}
    lock = threading.Lock()

    def fail(msg):
        with lock:
            errors.append(msg)

    def writer(i, door):
        rng = random.Random(seed * 1000 + i)
        db = open_db(door)
        # A second session at the same door: it must see this writer's
        # commits as soon as they returned (read-your-writes through a door
        # whose loads may be served by the replica).
        db2 = open_db(door)
        try:
            tm, conn = new_conn(db)
            tm2, conn2 = new_conn(db2)
            for _ in range(10_000):
                if time.monotonic() > deadline or errors:
                    return
                a, b = rng.sample(range(n), 2)
                amount = rng.randint(1, 50)
                try:
                    tm.begin()
                    bank = conn.root()['bank']
                    bank[a]['b'] -= amount
                    bank[b]['b'] += amount
                    tm.commit()
                except ConflictError:
                    tm.abort()
                    with lock:
                        counts['conflicts'] += 1
                    continue
                # The tid of this commit (lastTransaction() may already be
                # someone else's newer one).
                tid = bank[a]._p_serial
                with lock:
                    counts['commits'] += 1
                tm2.begin()
                bank2 = conn2.root()['bank']
                for k in (a, b):
                    bank2[k]['b']  # loads it if it was invalidated
                    serial = bank2[k]._p_serial
                    if u64(serial) < u64(tid):
                        fail(f'writer {i} at {door}: account {k} read back '
                             f'at {hx(serial)}, older than own commit '
                             f'{hx(tid)}')
                        return
                tm2.abort()
        except Exception as e:  # noqa: BLE001 - reported as a failure
            fail(f'writer {i} at {door}: {e!r}')
        finally:
            db.close()
            db2.close()

    def reader(i, door, read_only):
        db = open_db(door, read_only=read_only)
        last = b'\0' * 8
        try:
            tm, conn = new_conn(db)
            for _ in range(100_000):
                if time.monotonic() > deadline or errors:
                    return
                tm.begin()
                snap = db.storage.lastTransaction()
                if snap < last:
                    fail(f'reader {i} at {door} (ro={read_only}): snapshot '
                         f'went back from {hx(last)} to {hx(snap)}')
                    return
                last = snap
                s = workload.total(conn, n)
                if s != total:
                    fail(f'reader {i} at {door} (ro={read_only}): sum {s} '
                         f'!= {total} at {hx(snap)}')
                    return
                tm.abort()
                conn.cacheMinimize()
                with lock:
                    counts['reads'] += 1
        except Exception as e:  # noqa: BLE001
            fail(f'reader {i} at {door}: {e!r}')
        finally:
            db.close()

    threads = []
    for i, d in enumerate(wdoors):
        threads.append(threading.Thread(target=writer, args=(i, d)))
    for i, d in enumerate(rdoors):
        threads.append(threading.Thread(target=reader, args=(2 * i, d, False)))
        threads.append(threading.Thread(target=reader,
                                        args=(2 * i + 1, d, True)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    check(not errors, '; '.join(errors[:5]))
    check(counts['commits'] > 0, 'no commit went through')
    check(counts['reads'] > 0, 'no snapshot was read')
    print(' '.join(f'{k}={v}' for k, v in counts.items()))


def semantics(door, primary):
    """What a forwarded client sees equals what a direct one sees."""
    ddb = open_db(door, blob_dir=tempfile.mkdtemp(prefix='door-blobs-'))
    pdb = open_db(primary, blob_dir=tempfile.mkdtemp(prefix='primary-blobs-'))
    try:
        # new_oids through the door
        oids = ddb.storage._call('new_oids', 3)
        check_eq(len(oids), 3, 'new_oids through the door')
        # A conflict between a door client and a primary client.
        tm1, c1 = new_conn(ddb)
        tm2, c2 = new_conn(pdb)
        c1.root()['c'] = PersistentMapping({'v': 0})
        tm1.commit()
        tm2.begin()
        tm1.begin()
        c1.root()['c']['v'] = 1
        c2.root()['c']['v'] = 2
        tm2.commit()
        try:
            tm1.commit()
        except ConflictError:
            tm1.abort()
        else:
            raise Failure('no ConflictError through the door')
        # The invalidation from the primary's commit reached the door client.
        tm1.begin()
        check_eq(c1.root()['c']['v'], 2, 'door client sees the other commit')
        check_eq(ddb.storage.lastTransaction(), pdb.storage.lastTransaction(),
                 'lastTransaction through the door and direct')
        # Undo through the door.
        c1.root()['u'] = 'before'
        tm1.commit()
        c1.root()['u'] = 'after'
        tm1.commit()
        undo_id = ddb.undoLog(0, 1)[0]['id']
        ddb.undo(undo_id, tm1.get())
        tm1.commit()
        tm1.begin()
        check_eq(c1.root()['u'], 'before', 'undo through the door')
        # A blob through the door, read back directly and through the door.
        blob = Blob()
        with blob.open('w') as f:
            f.write(b'door blob ' * 1000)
        c1.root()['blob'] = blob
        tm1.commit()
        tm2.begin()
        with c2.root()['blob'].open() as f:
            check_eq(f.read(), b'door blob ' * 1000, 'blob at the primary')
        tm1.begin()
        with c1.root()['blob'].open() as f:
            check_eq(f.read(), b'door blob ' * 1000, 'blob through the door')
        tm1.abort()
        tm2.abort()
    finally:
        ddb.close()
        pdb.close()
    # A read-only session through the door refuses writes.
    rdb = open_db(door, read_only=True)
    try:
        tm, conn = new_conn(rdb)
        conn.root()['x'] = 1
        try:
            tm.commit()
        except ReadOnlyError:
            tm.abort()
        else:
            raise Failure('read-only door session committed')
    finally:
        rdb.close()
    print('semantics=ok')


def writer(door):
    """Commits in a loop; prints 'committed N last=TID' on 'stop' or when
    the connection is lost (then 'lost=1')."""
    db = open_db(door)
    stop = threading.Event()
    state = {'n': 0, 'last': b'', 'lost': 0, 'errors': 0}

    def loop():
        tm, conn = new_conn(db)
        while not stop.is_set() and state['n'] < 100_000:
            try:
                tm.begin()
                conn.root()['w'] = state['n']
                tm.commit()
                state['n'] += 1
                state['last'] = db.storage.lastTransaction()
                if state['n'] == 5:
                    print('n=5', flush=True)
            except Exception:  # noqa: BLE001 - counted, retried
                state['errors'] += 1
                try:
                    tm.abort()
                except Exception:  # noqa: BLE001
                    pass
                time.sleep(0.05)
    t = threading.Thread(target=loop)
    t.start()
    print('ready', flush=True)
    for line in sys.stdin:
        if line.strip() == 'stop':
            break
    stop.set()
    t.join(30)
    print(f"committed={state['n']} errors={state['errors']} "
          f"last={hx(state['last'])}", flush=True)
    db.close()


def read_for(door, seconds, read_only):
    """New transactions reading the whole bank for SECONDS (snapshots never
    go back, sums hold); prints reads=N."""
    seconds, read_only = float(seconds), read_only == '1'
    db = open_db(door, read_only=read_only)
    try:
        tm, conn = new_conn(db)
        deadline = time.monotonic() + seconds
        last, reads, total = b'\0' * 8, 0, None
        while time.monotonic() < deadline and reads < 100_000:
            tm.begin()
            snap = db.storage.lastTransaction()
            check(snap >= last, f'snapshot went back: {hx(snap)} < {hx(last)}')
            last = snap
            bank = conn.root()['bank']
            s = sum(bank[k]['b'] for k in bank)
            if total is None:
                total = s
            check_eq(s, total, f'bank total at {hx(snap)}')
            tm.abort()
            conn.cacheMinimize()
            reads += 1
        print(f'reads={reads} last={hx(last)}')
    finally:
        db.close()


def hold_lock(addr):
    st = open_storage(addr)
    try:
        t = TransactionMetaData()
        st.tpc_begin(t)
        st.store(st.new_oid(), z64, b'lock probe', '', t)
        st.tpc_vote(t)
        print('LOCKED', flush=True)
        for line in sys.stdin:
            if line.strip() == 'release':
                break
        st.tpc_abort(t)
        print('RELEASED', flush=True)
    finally:
        st.close()


def transfer(addr, a, b, amount):
    a, b, amount = int(a), int(b), int(amount)
    db = open_db(addr, wait_timeout=60)
    try:
        tm, conn = new_conn(db)
        bank = conn.root()['bank']
        bank[a]['b'] -= amount
        bank[b]['b'] += amount
        tm.commit()
        print(f'tid={hx(bank[a]._p_serial)}', flush=True)
    finally:
        db.close()


def probe_reader(door, n, total, cachedir=''):
    n, total = int(n), int(total)
    kw = {}
    if cachedir:
        kw = dict(client='probe', var=cachedir, cache_size=1 << 20)
    db = open_db(door, wait_timeout=60, **kw)
    try:
        tm, conn = new_conn(db)

        def read():
            tm.begin()
            snap = db.storage.lastTransaction()
            bank = conn.root()['bank']
            vals = [(k, bank[k]['b'], hx(bank[k]._p_serial))
                    for k in range(n)]
            tm.abort()
            conn.cacheMinimize()
            return snap, vals

        snap, vals = read()
        print(f'READ1 at={hx(snap)}', flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if cmd[:1] == ['stop']:
                break
            if cmd[:1] != ['check']:
                continue
            want = bytes.fromhex(cmd[1])
            deadline = time.monotonic() + 30
            while True:
                snap, vals = read()
                if snap >= want:
                    break
                check(time.monotonic() < deadline,
                      f'snapshot stuck at {hx(snap)} < {cmd[1]}')
                time.sleep(0.02)
            s = sum(v for _, v, _ in vals)
            check(s == total, f'sum {s} != {total} at snapshot {hx(snap)}: '
                              f'(account, balance, serial) {vals}')
            print(f'OK at={hx(snap)}', flush=True)
    finally:
        db.close()


COMMANDS = {
    'hold-lock': hold_lock,
    'transfer': transfer,
    'probe-reader': probe_reader,
    'read-for': read_for,
    'roundtrip': roundtrip,
    'bank-init': bank_init,
    'bank': bank,
    'semantics': semantics,
    'writer': writer,
}

if __name__ == '__main__':
    sys.exit(run(COMMANDS, sys.argv))
