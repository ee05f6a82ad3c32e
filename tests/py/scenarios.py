"""ZEO client scenarios run by tests/relay.rs against a real server.

Usage: scenarios.py SCENARIO ADDR [ADDR2]

ADDR is HOST:PORT or an absolute unix socket path. Every scenario uses the
real ZEO.ClientStorage / ZODB.DB, asserts what it sees and exits non-zero
with a "FAIL <scenario>: ..." line on stderr when something is wrong.

If ZRELAY_EXPECT_PROTOCOL is set (e.g. "M5"), every ClientStorage checks
that it negotiated that protocol, so a msgpack test really speaks msgpack.

Interactive scenarios (reconnect, garbage-neighbour) print "READY" on stdout and then
follow commands read from stdin; see their docstrings.
"""
import hashlib
import io
import json
import os
import socket
import struct
import sys
import tempfile
import threading
import time

import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZEO.Exceptions import ClientDisconnected
from ZODB.blob import Blob
from ZODB.POSException import ConflictError
from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadConflictError
from ZODB.utils import p64
from zodbpickle import pickle as zpickle

from zclient import (Failure, check, check_eq, client, new_conn, open_db,
                     open_storage, parse_addr, run, tls_for, wait_until)

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__.replace('_', '-')] = fn
    return fn


def commit(tm, note=None):
    if note:
        tm.get().note(note)
    tm.commit()


def state_of(data):
    """The state pickle of a plain record (the second of its two pickles)."""
    f = io.BytesIO(data)
    zpickle.Unpickler(f).load()  # class metadata
    return zpickle.Unpickler(f).load()


def wait_past(tid):
    """Wait until the wall clock is past the time encoded in *tid*."""
    from ZODB.TimeStamp import TimeStamp
    t = TimeStamp(tid).timeTime()
    wait_until(lambda: time.time() > t + 0.01, 'clock past last tid')


# ------------------------------------------------------------ scenarios ---

@scenario
def basic(addr):
    """Create objects, modify them, read them back from a fresh client."""
    db = open_db(addr)
    tm, conn = new_conn(db)
    root = conn.root()
    root['basic'] = PersistentMapping(title='v1', items=PersistentList([1]))
    # enough new objects to need more than one new_oids batch (100 each)
    root['many'] = PersistentList(PersistentMapping(i=i) for i in range(150))
    root['big'] = 'x' * 300_000
    commit(tm, 'create')
    first = root['basic']._p_serial
    root['basic']['title'] = 'v2'
    root['basic']['items'].append(2)
    root['basic']['text'] = 'zażółć gęślą jaźń ✓'
    commit(tm, 'modify')
    last = root['basic']._p_serial
    check(last > first, 'second commit did not get a later tid')
    db.close()

    with client(addr) as (db, tm, conn):
        check_eq(db.storage.lastTransaction(), last, 'lastTransaction')
        root = conn.root()
        b = root['basic']
        check_eq(b['title'], 'v2', 'title')
        check_eq(list(b['items']), [1, 2], 'items')
        check_eq(b['text'], 'zażółć gęślą jaźń ✓', 'text')
        check_eq([m['i'] for m in root['many']], list(range(150)), 'many')
        check_eq(len(root['big']), 300_000, 'len(big)')
        # an older revision is still served (loadBefore with an explicit tid)
        data, start, end = db.storage.loadBefore(b._p_oid, last)
        check_eq((start, end), (first, last), 'loadBefore serials')
        tm.abort()


@scenario
def invalidation(addr):
    """A commit by A is seen by B at its next transaction boundary."""
    dba = open_db(addr)
    # B (server_sync): tm.begin() pings the server, so every invalidation
    # sent before A's tpc_finish reply must be processed by then.
    dbb = open_db(addr)
    # no server_sync: invalidations arrive asynchronously; poll for them
    dbc = open_db(addr, server_sync=False)
    try:
        tma, ca = new_conn(dba)
        ca.root()['inv'] = PersistentMapping(v=0)
        commit(tma)
        tmb, cb = new_conn(dbb)
        tmc, cc = new_conn(dbc)
        tmb.begin()
        check_eq(cb.root()['inv']['v'], 0, 'B initial value')

        def c_sees_initial():
            tmc.begin()
            return 'inv' in cc.root() and cc.root()['inv']['v'] == 0
        wait_until(c_sees_initial, 'C to see the initial commit')
        for i in range(1, 6):
            ca.root()['inv']['v'] = i
            commit(tma)
            tid = ca.root()['inv']._p_serial
            tmb.begin()
            check_eq(cb.root()['inv']['v'], i, f'B value after commit {i}')
            check_eq(dbb.storage.lastTransaction(), tid,
                     f'B lastTransaction after commit {i}')

            def c_sees():
                tmc.begin()
                return cc.root()['inv']['v'] == i
            wait_until(c_sees, f'C to see v={i}')
            check_eq(dbc.storage.lastTransaction(), tid,
                     f'C lastTransaction after commit {i}')
        # B writes, A sees it
        tmb.begin()
        cb.root()['inv']['v'] = 100
        commit(tmb)
        wait_until(lambda: (tma.begin(), ca.root()['inv']['v'])[1] == 100,
                   'A to see B\'s write')
        for tm in (tma, tmb, tmc):
            tm.abort()
    finally:
        for db in (dba, dbb, dbc):
            db.close()


@scenario
def conflict(addr):
    """Unresolvable conflicts and server errors reach the client intact."""
    with client(addr) as (dba, tma, ca), client(addr) as (dbb, tmb, cb):
        ra = ca.root()
        ra['c'] = PersistentMapping(v=0)
        ra['rc'] = PersistentMapping(v=0)
        ra['out'] = PersistentMapping(v=0)
        commit(tma)
        oid = ra['c']._p_oid
        s0 = ra['c']._p_serial

        # write/write conflict: PersistentMapping has no resolution
        tmb.begin()
        rb = cb.root()
        check_eq(rb['c']['v'], 0, 'B initial')
        ra['c']['v'] = 1
        commit(tma)
        s1 = ra['c']._p_serial
        rb['c']['v'] = 2
        try:
            commit(tmb)
        except ConflictError as e:
            check_eq(type(e), ConflictError, 'exception type')
            check_eq(e.oid, oid, 'ConflictError.oid')
            check_eq(tuple(e.serials), (s1, s0), 'ConflictError.serials')
            check_eq(e.get_class_name(), 'persistent.mapping.PersistentMapping',
                     'ConflictError class_name')
        else:
            raise Failure('conflicting commit succeeded')
        tmb.abort()
        tmb.begin()
        check_eq(rb['c']['v'], 1, 'B after abort')
        rb['c']['v'] = 2
        commit(tmb)

        # read conflict: B declared readCurrent(rc) and A changed rc
        tmb.begin()
        rc_oid = rb['rc']._p_oid
        check_eq(rb['rc']['v'], 0, 'B rc initial')
        cb.readCurrent(rb['rc'])
        rb['out']['v'] = 1
        ra['rc']['v'] = 1
        commit(tma)
        try:
            commit(tmb)
        except ReadConflictError as e:
            check_eq(type(e), ReadConflictError, 'exception type')
            check_eq(e.oid, rc_oid, 'ReadConflictError.oid')
        else:
            raise Failure('readCurrent conflict not detected')
        tmb.abort()

        # a plain error reply (flag 2): load of an oid that does not exist
        missing = p64(0xdead_beef)
        try:
            dba.storage.load(missing)
        except POSKeyError as e:
            check_eq(e.args[0], missing, 'POSKeyError oid')
        else:
            raise Failure('load of a missing oid succeeded')

        # the connections still work after all those errors
        tma.begin()
        ra['c']['v'] = 3
        commit(tma)
        tmb.begin()
        check_eq(rb['c']['v'], 3, 'B sees A after errors')
        tmb.abort()


@scenario
def resolved(addr):
    """Concurrent increments commit through server-side conflict resolution."""
    with client(addr) as (dba, tma, ca), client(addr) as (dbb, tmb, cb):
        ra = ca.root()
        ra['len'] = Length(0)
        ra['tree'] = OOBTree()
        commit(tma)
        tmb.begin()
        rb = cb.root()
        check_eq(rb['len'](), 0, 'B initial length')
        check_eq(len(rb['tree']), 0, 'B initial tree')
        ra['len'].change(1)
        ra['tree']['a'] = 1
        commit(tma)
        rb['len'].change(10)
        rb['tree']['b'] = 2
        commit(tmb)  # conflicts on both, resolved by the server
        tmb.begin()
        check_eq(rb['len'](), 11, 'B length after resolution')
        check_eq(dict(rb['tree'].items()), {'a': 1, 'b': 2}, 'B tree')
        tmb.abort()
        tma.abort()
    with client(addr) as (db, tm, conn):
        check_eq(conn.root()['len'](), 11, 'fresh client length')
        check_eq(dict(conn.root()['tree'].items()), {'a': 1, 'b': 2},
                 'fresh client tree')
        tm.abort()


@scenario
def undo(addr):
    """db.undo reverts a transaction found through undoLog."""
    with client(addr) as (db, tm, conn):
        root = conn.root()
        root['u'] = PersistentMapping(v=1)
        commit(tm, 'set v=1')
        root['u']['v'] = 2
        commit(tm, 'set v=2')
        log = db.undoLog(0, 20)
        check(len(log) >= 2, f'undoLog too short: {log!r}')
        check_eq(log[0]['description'], 'set v=2', 'newest undoLog entry')
        check_eq(log[1]['description'], 'set v=1', 'second undoLog entry')
        db.undo(log[0]['id'], tm.get())
        commit(tm, 'undo it')
        tm.begin()
        check_eq(root['u']['v'], 1, 'value after undo')
        log = db.undoLog(0, 20)
        check_eq(log[0]['description'], 'undo it', 'undo transaction logged')
        info = db.undoInfo(0, 20)
        check_eq(len(info), len(log), 'undoInfo length')
        tm.abort()
    with client(addr) as (db, tm, conn):
        check_eq(conn.root()['u']['v'], 1, 'fresh client after undo')
        tm.abort()


@scenario
def pack(addr):
    """Pack removes old revisions and garbage; current data stays."""
    with client(addr) as (db, tm, conn):
        root = conn.root()
        root['p'] = PersistentMapping(v=0)
        root['garbage'] = PersistentMapping(x=1)
        commit(tm)
        garbage_oid = root['garbage']._p_oid
        del root['garbage']
        commit(tm)
        for i in range(1, 6):
            root['p']['v'] = i
            commit(tm)
        oid = root['p']._p_oid
        last = db.storage.lastTransaction()
        check_eq(len(db.storage.history(oid, size=100)), 6, 'history before')
        # history is never served from the client cache, load may be
        check_eq(len(db.storage.history(garbage_oid, size=100)), 1,
                 'garbage history before')
        wait_past(last)
        db.pack()
        check_eq(len(db.storage.history(oid, size=100)), 1, 'history after')
        try:
            db.storage.history(garbage_oid)
        except POSKeyError:
            pass
        else:
            raise Failure('unreachable object survived the pack')
        check_eq(db.storage.lastTransaction(), last, 'lastTransaction')
        tm.abort()
    with client(addr) as (db, tm, conn):
        check_eq(conn.root()['p']['v'], 5, 'value after pack')
        conn.root()['p']['v'] = 6
        commit(tm)


@scenario
def history(addr):
    """storage.history returns each revision, newest first."""
    with client(addr) as (db, tm, conn):
        root = conn.root()
        root['h'] = PersistentMapping(v=0)
        commit(tm, 'h0')
        oid = root['h']._p_oid
        serials = [root['h']._p_serial]
        for i in (1, 2):
            root['h']['v'] = i
            tm.get().setUser('hist-user')
            commit(tm, f'h{i}')
            serials.append(root['h']._p_serial)
        hist = db.storage.history(oid, size=10)
        check_eq([h['tid'] for h in hist], serials[::-1], 'history tids')
        check_eq([h['description'] for h in hist], [b'h2', b'h1', b'h0'],
                 'history descriptions')
        check_eq(hist[0]['user_name'], b'/ hist-user', 'history user_name')
        check(all(h['size'] > 0 for h in hist), 'history sizes')
        check_eq(len(db.storage.history(oid, size=2)), 2, 'history size=2')
        # loadSerial serves every revision listed
        for want, serial in enumerate(serials):
            check_eq(state_of(db.storage.loadSerial(oid, serial)),
                     {'data': {'v': want}}, f'loadSerial revision {want}')
        tm.abort()


@scenario
def iterator(addr):
    """ClientStorage.iterator() returns every transaction with metadata."""
    with client(addr) as (db, tm, conn):
        root = conn.root()
        root['it'] = PersistentMapping(v=-1)
        commit(tm, 'setup')
        oid = root['it']._p_oid
        expect = []
        for i in range(5):
            root['it']['v'] = i
            t = tm.get()
            t.setUser(f'üser-{i}')
            t.note(f'descr ✓ {i} ' + 'd' * (i * 200 + 1))
            t.setExtendedInfo('k', 'ünï')
            t.setExtendedInfo('n', i)
            # a tuple: ZEO's msgpack decoding turns lists into tuples
            t.setExtendedInfo('nested', {'a': (1, 2), 'b': 'ß'})
            commit(tm)
            expect.append((root['it']._p_serial, i))
        tm.abort()

        txns = []
        for t in db.storage.iterator():
            txns.append((t.tid, t.status, t.user, t.description,
                         dict(t.extension), [(r.oid, r.tid) for r in t]))
        tids = [t[0] for t in txns]
        check(all(a < b for a, b in zip(tids, tids[1:])),
              'iterator tids not strictly increasing')
        check(len(txns) >= 7, f'only {len(txns)} transactions')
        check_eq(txns[-6][3], b'setup', 'setup transaction')
        for (tid, status, user, desc, ext, recs), (want_tid, i) in zip(
                txns[-5:], expect):
            check_eq(tid, want_tid, f'txn {i} tid')
            check_eq(status, ' ', f'txn {i} status')
            check_eq(user, f'/ üser-{i}'.encode(), f'txn {i} user')
            check_eq(desc, (f'descr ✓ {i} ' + 'd' * (i * 200 + 1)).encode(),
                     f'txn {i} description')
            check_eq(ext, {'k': 'ünï', 'n': i,
                           'nested': {'a': (1, 2), 'b': 'ß'}},
                     f'txn {i} extension')
            check_eq(recs, [(oid, tid)], f'txn {i} records')
        # a bounded range
        sub = [t.tid for t in db.storage.iterator(expect[1][0], expect[3][0])]
        check_eq(sub, [e[0] for e in expect[1:4]], 'iterator(start, stop)')


@scenario
def blobs(addr):
    """Blobs go up and come back (non-shared blob dirs, several MB)."""
    data1 = os.urandom(3 * 1024 * 1024 + 123)
    data2 = os.urandom(1536 * 1024 + 7)
    with client(addr, blob_dir=tempfile.mkdtemp(prefix='blobs-a-'),
                shared_blob_dir=False) as (db, tm, conn):
        root = conn.root()
        root['blob'] = Blob(data1)
        root['empty'] = Blob(b'')
        commit(tm, 'blob v1')
        oid = root['blob']._p_oid
        s1 = db.storage.lastTransaction()  # a committed Blob is a ghost
        with root['blob'].open('w') as f:
            f.write(data2)
        commit(tm, 'blob v2')
        tm.abort()

    with client(addr, blob_dir=tempfile.mkdtemp(prefix='blobs-b-'),
                shared_blob_dir=False) as (db, tm, conn):
        root = conn.root()
        with root['blob'].open('r') as f:
            got = f.read()
        check_eq(hashlib.sha256(got).hexdigest(),
                 hashlib.sha256(data2).hexdigest(), 'current blob content')
        with root['empty'].open('r') as f:
            check_eq(f.read(), b'', 'empty blob')
        with open(db.storage.loadBlob(oid, s1), 'rb') as f:
            got = f.read()
        check_eq(hashlib.sha256(got).hexdigest(),
                 hashlib.sha256(data1).hexdigest(), 'old blob revision')
        tm.abort()


@scenario
def concurrency(addr, threads=8, commits=10):
    """N clients commit concurrently: distinct objects + a shared counter."""
    with client(addr) as (db, tm, conn):
        root = conn.root()
        root['counter'] = Length(0)
        for i in range(threads):
            root[f'w{i}'] = PersistentMapping(n=0)
        commit(tm)

    errors = []
    start = threading.Barrier(threads)

    def worker(i):
        # No retries: every conflict here is resolvable by the server, so
        # any exception is a failure.
        try:
            wdb = open_db(addr)
            try:
                wtm, wconn = new_conn(wdb)
                start.wait(30)
                for _ in range(commits):
                    wtm.begin()
                    r = wconn.root()
                    r[f'w{i}']['n'] += 1
                    r['counter'].change(1)
                    wtm.commit()
            finally:
                wdb.close()
        except BaseException as e:  # reported by the main thread
            errors.append(f'worker {i}: {e!r}')

    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(90)
        check(not t.is_alive(), 'a worker hung')
    check(not errors, '; '.join(errors))

    with client(addr) as (db, tm, conn):
        root = conn.root()
        check_eq(root['counter'](), threads * commits, 'shared counter')
        for i in range(threads):
            check_eq(root[f'w{i}']['n'], commits, f'worker {i} object')
        tm.abort()


def recv_exact(sock, n):
    buf = b''
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise Failure(f'connection closed after {len(buf)} of {n} bytes')
        buf += chunk
    return buf


def recv_frame(sock):
    (n,) = struct.unpack('>I', recv_exact(sock, 4))
    return recv_exact(sock, n)


@scenario
def ruok(addr):
    """b'ruok' instead of a protocol gets one JSON status frame, then EOF."""
    family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    ctx, hostname = tls_for(addr)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(addr)
        if ctx is not None:
            s = ctx.wrap_socket(s, server_hostname=hostname)
        offer = recv_frame(s)
        check(offer in (b'Z5', b'M5'), f'server offer {offer!r}')
        s.sendall(struct.pack('>I', 4) + b'ruok')
        status = json.loads(recv_frame(s))
        check(isinstance(status, dict) and isinstance(status.get('1'), dict),
              f'no status of storage "1" in {status!r}')
        check_eq(s.recv(1), b'', 'connection closed after the status')
        print(json.dumps(status, sort_keys=True))


@scenario
def refused(addr):
    """A client the server must not admit: ClientStorage never connects
    (its TLS handshake is refused, or it never gets the server's offer)."""
    started = time.monotonic()
    try:
        st = open_storage(addr, wait_timeout=3)
    except ClientDisconnected:
        print(f'refused after {time.monotonic() - started:.1f}s')
        return
    st.close()
    raise Failure('the client connected')


def read_command():
    line = sys.stdin.readline()
    if not line:
        raise Failure('stdin closed while waiting for a command')
    return line.strip()


def track_connections(storage):
    """Count notify_connected/notify_disconnected calls on *storage*."""
    events = []
    on_conn, on_disc = storage.notify_connected, storage.notify_disconnected

    def connected(*a):
        events.append('connected')
        return on_conn(*a)

    def disconnected(*a):
        events.append('disconnected')
        return on_disc(*a)
    storage.notify_connected = connected
    storage.notify_disconnected = disconnected
    return events


def commit_retrying(tm, change, what, timeout=30.0):
    """Commit, retrying while the client is disconnected."""
    deadline = time.monotonic() + timeout
    tries = 0
    while True:
        tries += 1
        try:
            tm.begin()
            change()
            tm.commit()
            return tries
        except ClientDisconnected:
            tm.abort()
            if time.monotonic() > deadline:
                raise Failure(f'{what}: still disconnected after {timeout}s')
            time.sleep(0.1)


@scenario
def reconnect(addr):
    """Commit, print READY, wait for "go" on stdin, commit again.

    The harness breaks the connection between READY and "go" (restarts the
    proxy or the server). The same ClientStorage must reconnect by itself
    and commit; a fresh client then reads the new value.
    """
    db = open_db(addr)
    try:
        events = track_connections(db.storage)
        tm, conn = new_conn(db)
        conn.root()['r'] = PersistentMapping(v=1)
        commit(tm)
        print('READY', flush=True)
        check_eq(read_command(), 'go', 'command')

        def change():
            conn.root()['r']['v'] = 2
        tries = commit_retrying(tm, change, 'commit after the restart')
        check('disconnected' in events,
              f'client never saw a disconnect: events={events}')
        check(events[-1] == 'connected',
              f'client not reconnected: events={events}')
        print(f'tries={tries} events={",".join(events)}', flush=True)
    finally:
        db.close()
    with client(addr) as (db, tm, conn):
        check_eq(conn.root()['r']['v'], 2, 'value after reconnect')
        tm.abort()


def latency_stats(times):
    """'commits=N p50_ms=X p90_ms=Y max_ms=Z' for a list of seconds."""
    if not times:
        return 'commits=0'
    t = sorted(times)

    def pct(p):
        return t[min(len(t) - 1, int(p * len(t)))] * 1000
    return (f'commits={len(t)} p50_ms={pct(0.5):.1f} p90_ms={pct(0.9):.1f} '
            f'max_ms={t[-1] * 1000:.1f}')


@scenario
def garbage_neighbour(addr):
    """Commit and read back in a loop while the harness abuses the server.

    Prints READY after the first commit, keeps committing until it reads
    "stop" on stdin, then commits once more and checks everything it wrote
    with a fresh client. Must not see a single error or disconnect.
    "mark" on stdin prints "stats commits=N p50_ms=... max_ms=..." (commit
    latencies since the previous mark) and starts a new period; the final
    line "commits=N ..." covers the period after the last mark.
    """
    db = open_db(addr)
    reader = open_db(addr)
    stop = threading.Event()
    mark = threading.Event()
    times = []
    try:
        events = track_connections(db.storage)
        tm, conn = new_conn(db)
        rtm, rconn = new_conn(reader)
        conn.root()['w'] = PersistentMapping(n=0)
        commit(tm)
        n = 0

        def step():
            nonlocal n
            n += 1
            tm.begin()
            conn.root()['w']['n'] = n
            started = time.monotonic()
            commit(tm)
            times.append(time.monotonic() - started)
            rtm.begin()
            check_eq(rconn.root()['w']['n'], n, 'reader sees the commit')

        step()
        print('READY', flush=True)

        def read_commands():
            while True:
                cmd = read_command()
                if cmd == 'mark':
                    mark.set()
                else:
                    check_eq(cmd, 'stop', 'command')
                    stop.set()
                    return
        threading.Thread(target=read_commands, daemon=True).start()
        deadline = time.monotonic() + 100
        while not stop.is_set():
            check(time.monotonic() < deadline, 'no "stop" within 100s')
            step()
            if mark.is_set():
                print(f'stats {latency_stats(times)}', flush=True)
                times.clear()
                mark.clear()
        step()
        check_eq(events, [], 'connection events while working')
        rtm.abort()
        print(f'{latency_stats(times)} total={n}', flush=True)
    finally:
        db.close()
        reader.close()
    with client(addr) as (db, tm, conn):
        check_eq(conn.root()['w']['n'], n, 'fresh client final value')
        tm.abort()


def main(argv):
    return run(SCENARIOS, argv, usage='ADDR [ADDR2]', min_args=1,
               convert=parse_addr)


if __name__ == '__main__':
    sys.exit(main(sys.argv))
