"""Replication helpers for tests/replication.rs: workloads, comparisons and
checks, run with real ZEO clients against a primary/replica pair.

Usage: repl.py COMMAND ARGS...

ADDR is HOST:PORT or an absolute unix socket path. Each command asserts
what it sees and exits non-zero with a "FAIL <command>: ..." line on stderr
when something is wrong; results are printed as key=value words on stdout.

If ZRELAY_EXPECT_PROTOCOL is set (e.g. "M5"), every ClientStorage checks
that it negotiated that protocol.

Commands:
  lasttid ADDR                       last=<hex>
  set ADDR KEYS VALUE                root[KEY]['v'] = VALUE for KEYS k1,k2..
  workload PROXY BACKEND SMALL BIG_MB
                                     the mix (see workload()); last=<hex>
  big ADDR MB                        one transaction of MB megabytes
  blobs ADDR N                       one transaction creating N blobs
  pack ADDR                          pack as of now
  metadata ADDR                      unusual transaction metadata
  compare DIR1 DIR2                  Data.fs + blobs of two runzeo dirs
  writer ADDR                        interactive: commit until "stop"
  crash-tail PRIMARY_DIR REPLICA_DIR TID
                                     fake a runzeo crash mid-commit of TID
  fresh-cache PRIMARY PRIMARY_BACKEND REPLICA ADMIN ROUNDS
  pcache-prime PRIMARY REPLICA VAR KEY
  pcache-check REPLICA VAR KEY OID WANT
  refuse-writes REPLICA REPLICA_BACKEND
"""
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
import urllib.request

import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent.list import PersistentList
from persistent.mapping import PersistentMapping
from ZEO.Exceptions import ClientDisconnected
from ZODB import DB
from ZODB.blob import Blob
from ZODB.Connection import TransactionMetaData
from ZODB.FileStorage import FileIterator
from ZODB.POSException import ConflictError
from ZODB.POSException import POSKeyError
from ZODB.POSException import ReadOnlyError
from ZODB.utils import p64
from ZODB.utils import z64

from zclient import (Failure, check, check_eq, new_conn, open_db,
                     open_storage, run, wait_until)

COMMANDS = {}


def command(fn):
    name = fn.__name__.replace('_', '-')
    COMMANDS['set' if name == 'set-value' else name] = fn
    return fn


def commit(tm, note=None, user=None, ext=None):
    t = tm.get()
    if note:
        t.note(note)
    if user:
        t.setUser(user)
    for k, v in (ext or {}).items():
        t.setExtendedInfo(k, v)
    tm.commit()


def hx(tid):
    return tid.hex()


def last_tid(addr):
    st = open_storage(addr, read_only=True)
    try:
        return st.lastTransaction()
    finally:
        st.close()


def read_command():
    line = sys.stdin.readline()
    if not line:
        raise Failure('stdin closed while waiting for a command')
    return line.strip()


# --------------------------------------------------------------- commands

@command
def lasttid(addr):
    print(f'last={hx(last_tid(addr))}')


@command
def set_value(addr, keys, value):
    """root[KEY]['v'] = VALUE for each of the comma-separated KEYS, in one
    transaction; prints its tid."""
    db = open_db(addr)
    try:
        tm, conn = new_conn(db)
        root = conn.root()
        for key in keys.split(','):
            if key not in root:
                root[key] = PersistentMapping()
            root[key]['v'] = value
        commit(tm, f'set {keys}={value}', user='setter')
        print(f'tid={hx(db.storage.lastTransaction())}')
    finally:
        db.close()


@command
def pack(addr):
    """Pack the storage as of now (after the clock passed its last tid)."""
    from ZODB.TimeStamp import TimeStamp
    db = open_db(addr)
    try:
        t = TimeStamp(db.storage.lastTransaction()).timeTime()
        wait_until(lambda: time.time() > t + 0.01, 'clock past last tid')
        db.pack()
        print(f'packed last={hx(db.storage.lastTransaction())}')
    finally:
        db.close()


def big_txn(tm, root, mb, what):
    """One transaction of about MB megabytes: 1 MB records plus, from 16
    MB up, one record of a quarter of the size."""
    chunks = PersistentList()
    left = mb
    if mb >= 16:
        chunks.append(os.urandom(mb // 4 * 1024 * 1024))
        left -= mb // 4
    for _ in range(left):
        chunks.append(PersistentMapping(data=os.urandom(1024 * 1024)))
    root[what] = chunks
    commit(tm, f'{what}: {mb} MB')
    return root[what]._p_serial


@command
def big(addr, mb):
    db = open_db(addr)
    try:
        tm, conn = new_conn(db)
        started = time.monotonic()
        tid = big_txn(tm, conn.root(), int(mb), 'big')
        print(f'tid={hx(tid)} seconds={time.monotonic() - started:.2f}')
    finally:
        db.close()


@command
def metadata(addr):
    """Transactions whose metadata must survive replication byte for byte:
    extensions with many value types, non-UTF-8 user and description,
    empty metadata, long texts."""
    db = open_db(addr)
    try:
        tm, conn = new_conn(db)
        root = conn.root()
        root['meta'] = PersistentMapping(v=0)
        commit(tm, 'meta setup')
        exts = [
            {},
            {'float': 1.5, 'neg': -7, 'big': 2 ** 63 - 1, 'none': None,
             'true': True, 'false': False, 'bytes': b'\x00\xff',
             'list': [1, [2, 3], ()], 'tuple': (1, 'a'), 'empty': {},
             'unicode key ✓': 'välue', 'long': 'L' * 30000},
            {str(i): i for i in range(300)},
        ]
        if os.environ.get('ZRELAY_EXPECT_PROTOCOL') != 'M5':
            # msgpack carries neither sets nor ints beyond 64 bits (and
            # ZEO's server unpickler refuses modules such as datetime)
            exts.append({'set': frozenset([3]), 'huge': 2 ** 70,
                         'neg huge': -2 ** 80})
        for i, ext in enumerate(exts):
            tm.begin()
            root['meta']['v'] = i + 1
            t = tm.get()
            t.setUser('ü' * (i * 100))
            t.note('d' * (i * 1000) + ' ✓')
            for k, v in ext.items():
                t.setExtendedInfo(k, v)
            tm.commit()
        # raw storage API: non-UTF-8 user and description
        st = db.storage
        tm.begin()
        oid, serial = root['meta']._p_oid, root['meta']._p_serial
        data = st.load(oid)[0]
        t = TransactionMetaData(b'\xff\xfe user', b'\x80 descr \xc3', {})
        st.tpc_begin(t)
        st.store(oid, serial, data, '', t)
        st.tpc_vote(t)
        st.tpc_finish(t)
        tm.abort()
        print(f'tid={hx(st.lastTransaction())}')
    finally:
        db.close()


@command
def blobs(addr, n):
    """One transaction creating N blobs (a non-shared blob dir)."""
    db = open_db(addr, blob_dir=tempfile.mkdtemp(prefix='blobs-b-'),
                 shared_blob_dir=False)
    try:
        tm, conn = new_conn(db)
        root = conn.root()
        for i in range(int(n)):
            root[f'blob{i}'] = Blob(os.urandom(100_000 + i))
        commit(tm, f'{n} blobs')
        print(f'tid={hx(db.storage.lastTransaction())}')
    finally:
        db.close()


@command
def workload(proxy, backend, small, big_mb):
    """Through the primary proxy: new objects, updates, a conflict resolved
    by the server (BTrees.Length), an unresolvable ConflictError, undo,
    deleteObject, blobs (non-shared blob dir), one big transaction and SMALL
    small transactions; interleaved with commits made directly on the
    primary BACKEND (which the proxy never sees)."""
    small, big_mb = int(small), int(big_mb)
    db = open_db(proxy, blob_dir=tempfile.mkdtemp(prefix='blobs-w-'),
                 shared_blob_dir=False)
    db2 = open_db(proxy)
    direct = open_db(backend)
    try:
        tm, conn = new_conn(db)
        tm2, conn2 = new_conn(db2)
        dtm, dconn = new_conn(direct)
        root = conn.root()

        # new objects, with metadata worth comparing
        root['tree'] = OOBTree()
        for i in range(200):
            root['tree'][i] = PersistentMapping(i=i, s='x' * i)
        root['counter'] = Length(0)
        root['m'] = PersistentMapping(v=0)
        root['dtree'] = OOBTree()
        commit(tm, 'create ✓ zażółć', user='wörker',
               ext={'k': 'ünï', 'nested': {'a': (1, 2), 'b': 'ß'}, 'n': 7})

        # updates
        for i in range(0, 200, 7):
            root['tree'][i]['s'] = f'updated {i}'
        commit(tm, 'update')

        # a conflict the server resolves (BTrees.Length)
        tm2.begin()
        check_eq(conn2.root()['counter'](), 0, 'counter seen by db2')
        root['counter'].change(1)
        commit(tm)
        conn2.root()['counter'].change(10)
        commit(tm2, 'resolved by the server')
        tm.begin()
        check_eq(root['counter'](), 11, 'counter after resolution')

        # an unresolvable conflict
        tm2.begin()
        check_eq(conn2.root()['m']['v'], 0, 'm seen by db2')
        root['m']['v'] = 1
        commit(tm)
        conn2.root()['m']['v'] = 2
        try:
            commit(tm2)
        except ConflictError:
            tm2.abort()
        else:
            raise Failure('conflicting commit succeeded')

        # undo
        root['u'] = PersistentMapping(v=1)
        commit(tm, 'u=1')
        root['u']['v'] = 2
        commit(tm, 'u=2')
        log = db.undoLog(0, 5)
        check_eq(log[0]['description'], 'u=2', 'newest undoLog entry')
        db.undo(log[0]['id'], tm.get())
        commit(tm, 'undo u=2')
        tm.begin()
        check_eq(root['u']['v'], 1, 'u after undo')

        # deleteObject (ClientStorage API) of an unreachable object
        root['doomed'] = PersistentMapping(x=1)
        commit(tm, 'doomed')
        doomed = root['doomed']
        oid, serial = doomed._p_oid, doomed._p_serial
        del root['doomed']
        commit(tm, 'unlink doomed')
        st = db.storage
        t = TransactionMetaData(b'deleter', b'deleteObject', {})
        st.tpc_begin(t)
        st.deleteObject(oid, serial, t)
        st.tpc_vote(t)
        st.tpc_finish(t)
        try:
            st.load(oid)
        except POSKeyError:
            pass
        else:
            raise Failure('deleted object still loads')

        # blobs, one per transaction (two in one: see the `blobs` command)
        root['blob'] = Blob(os.urandom(1536 * 1024 + 7))
        commit(tm, 'blob v1')
        root['eblob'] = Blob(b'')
        commit(tm, 'empty blob')
        with root['blob'].open('w') as f:
            f.write(os.urandom(256 * 1024 + 3))
        commit(tm, 'blob v2')

        # one big transaction
        if big_mb:
            big_txn(tm, root, big_mb, 'big')

        # many small ones, interleaved with direct commits on the backend
        for i in range(small):
            tm.begin()
            root['tree'][1000 + i] = PersistentMapping(n=i)
            if i % 10 == 0:
                root['counter'].change(1)
            commit(tm, f'small {i}')
            if i % 50 == 25:
                dtm.begin()
                dconn.root()['dtree'][f'd{i}'] = PersistentMapping(direct=i)
                commit(dtm, f'direct {i}', user='bypass')
        # the last transaction bypasses the proxy
        dtm.begin()
        dconn.root()['dtree']['last'] = 'direct'
        dconn.root()['counter'].change(100)
        commit(dtm, 'direct last', ext={'via': 'backend'})
        last = direct.storage.lastTransaction()
        tm.begin()
        check_eq(root['dtree']['last'], 'direct', 'proxy sees direct commit')
        tm.abort()
        tm2.abort()
        print(f'last={hx(last)}')
    finally:
        db.close()
        db2.close()
        direct.close()


def blob_files(d):
    out = {}
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = [n for n in dirnames if n != 'tmp']
        for name in filenames:
            if name.endswith('.blob'):
                path = os.path.join(dirpath, name)
                with open(path, 'rb') as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[os.path.relpath(path, d)] = digest
    return out


def txn_records(path):
    """Every transaction of a Data.fs: metadata and records."""
    out = []
    it = FileIterator(path)
    try:
        for t in it:
            recs = [(r.oid, r.tid, r.data, r.data_txn) for r in t]
            out.append((t.tid, t.status, t.user, t.description,
                        t.extension_bytes, recs))
    finally:
        it.close()
    return out


def show_txn(t):
    tid, status, user, desc, ext, recs = t
    return (f'tid={hx(tid)} status={status!r} user={user!r} '
            f'desc={desc[:60]!r} ext={ext[:60]!r} records=' +
            ', '.join(f'{hx(o)}@{hx(rt)} {len(d) if d else d} '
                      f'{hx(dt) if dt else dt}' for o, rt, d, dt in recs[:5]))


@command
def compare(dir1, dir2):
    """Both runzeo dirs hold the same transactions (tid, status, user,
    description, extension bytes, each record's oid/tid/data/data_txn), in
    strictly increasing tid order, and the same blob files."""
    a = txn_records(os.path.join(dir1, 'Data.fs'))
    b = txn_records(os.path.join(dir2, 'Data.fs'))
    for name, txns in (('primary', a), ('replica', b)):
        tids = [t[0] for t in txns]
        for x, y in zip(tids, tids[1:]):
            check(x < y, f'{name} tids not strictly increasing: '
                         f'{hx(x)} then {hx(y)}')
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            what = [n for n, p, q in zip(
                ('tid', 'status', 'user', 'description', 'extension',
                 'records'), x, y) if p != q]
            raise Failure(
                f'transaction #{i} differs in {what}:\n'
                f'  primary {show_txn(x)}\n  replica {show_txn(y)}')
    if len(a) != len(b):
        ta, tb = {t[0] for t in a}, {t[0] for t in b}
        raise Failure(
            f'{len(a)} transactions on the primary, {len(b)} on the replica; '
            f'missing on the replica: {[hx(t) for t in sorted(ta - tb)][:10]}'
            f'; extra on the replica: {[hx(t) for t in sorted(tb - ta)][:10]}')
    ba = blob_files(os.path.join(dir1, 'blobs'))
    bb = blob_files(os.path.join(dir2, 'blobs'))
    if ba != bb:
        diff = sorted(k for k in ba.keys() | bb.keys()
                      if ba.get(k) != bb.get(k))
        raise Failure(f'blob files differ: {diff[:10]} '
                      f'(primary {len(ba)}, replica {len(bb)})')
    nrec = sum(len(t[5]) for t in a)
    last = hx(a[-1][0]) if a else '0' * 16
    print(f'identical txns={len(a)} records={nrec} blobs={len(ba)} '
          f'last={last}')


@command
def crash_tail(primary_dir, replica_dir, tid):
    """Make the (stopped) replica's Data.fs look like its runzeo died in the
    middle of committing TID: append the primary's transaction TID with the
    checkpoint status 'c' that FileStorage writes at vote and clears at
    finish. The replica's file must end where TID starts on the primary."""
    tid = bytes.fromhex(tid)
    ppath = os.path.join(primary_dir, 'Data.fs')
    rpath = os.path.join(replica_dir, 'Data.fs')
    it = FileIterator(ppath)
    try:
        found = [(t._tpos, t._tend) for t in it if t.tid == tid]
    finally:
        it.close()
    check(found, f'no transaction {hx(tid)} on the primary')
    start, end = found[0]
    size = os.path.getsize(rpath)
    check_eq(size, start, 'replica Data.fs size (= where the txn starts)')
    with open(ppath, 'rb') as f:
        f.seek(start)
        txn = bytearray(f.read(end + 8 - start))
    check_eq(bytes(txn[:8]), tid, 'transaction header tid')
    check_eq(txn[16:17], b' ', 'transaction status')
    txn[16:17] = b'c'
    with open(rpath, 'ab') as f:
        f.write(txn)
    print(f'appended={len(txn)}')


@command
def writer(addr):
    """Commit small transactions until "stop" arrives on stdin, retrying
    through disconnects (the harness restarts and kills things meanwhile).

    Prints READY after the first commit. "mark" makes it print MARKED once
    three more commits have succeeded after the command. At "stop" it prints
    commits=N errors=E last=<hex> (the storage's lastTransaction)."""
    db = open_db(addr, wait_timeout=60)
    commands = []
    lock = threading.Lock()

    def reader():
        while True:
            line = sys.stdin.readline()
            if not line:
                line = 'stop'
            with lock:
                commands.append(line.strip())
            if line.strip() == 'stop':
                return

    try:
        tm, conn = new_conn(db)
        root = conn.root()
        root['w'] = OOBTree()
        root['wcount'] = Length(0)
        commit(tm, 'writer setup')
        print('READY', flush=True)
        threading.Thread(target=reader, daemon=True).start()
        n = errors = 0
        marks = []  # commits still needed per pending mark
        stop = False
        deadline = time.monotonic() + 100
        while not stop:
            check(time.monotonic() < deadline, 'no "stop" within 100s')
            with lock:
                for c in commands:
                    if c == 'mark':
                        marks.append(3)
                    elif c == 'stop':
                        stop = True
                    else:
                        raise Failure(f'unknown command {c!r}')
                commands.clear()
            try:
                tm.begin()
                root['w'][n] = PersistentMapping(n=n, pad='p' * (n % 300))
                root['wcount'].change(1)
                commit(tm, f'writer {n}')
            except Exception as e:
                # ClientDisconnected, a tpc_finish cut by a disconnect
                # (committed or not), a conflict after such a finish...
                errors += 1
                logging.warning('commit %d failed (%s: %s); retrying', n,
                                type(e).__name__, e)
                try:
                    tm.abort()
                except Exception:
                    logging.exception('abort failed')
                time.sleep(0.05)
                continue
            n += 1
            marks = [m - 1 for m in marks]
            while marks and marks[0] <= 0:
                marks.pop(0)
                print('MARKED', flush=True)
            # pace: leave the CPU to the servers
            time.sleep(0.002)
        tm.abort()
        last = db.storage.lastTransaction()
        print(f'commits={n} errors={errors} last={hx(last)}', flush=True)
    finally:
        db.close()


def admin_applied(admin):
    with urllib.request.urlopen(f'http://{admin}/status', timeout=5) as r:
        st = json.loads(r.read())
    t = (st.get('upstream') or {}).get('applied_tid')
    return bytes.fromhex(t) if t else z64


@command
def fresh_cache(primary, backend, replica, admin, rounds):
    """A replica client holding objects in its cache sees each commit of
    the primary at its next transaction once the replica applied it, and
    never an old value once its lastTransaction or the replica's applied
    tid, read before the transaction began, covers the commit. Commits:
    ROUNDS plain updates through the PRIMARY proxy, a conflict the server
    resolves, a commit made directly on the primary BACKEND, an undo."""
    rounds = int(rounds)
    pdb = open_db(primary)
    pdb2 = open_db(primary)
    ddb = open_db(backend)
    rdb = open_db(replica, read_only=True)
    waits = []
    try:
        ptm, pconn = new_conn(pdb)
        ptm2, pconn2 = new_conn(pdb2)
        dtm, dconn = new_conn(ddb)
        proot = pconn.root()
        proot['fresh'] = PersistentMapping(v=0)
        proot['flist'] = PersistentList([0])
        proot['fcount'] = Length(0)
        commit(ptm, 'fresh 0')
        t0 = proot['fresh']._p_serial
        rtm, rconn = new_conn(rdb)
        seen_inv = []
        orig_inv = rdb.storage.invalidateTransaction

        def record_inv(tid, oids):
            seen_inv.append((hx(tid), sorted(hx(o) for o in oids)))
            del seen_inv[:-4]
            return orig_inv(tid, oids)
        rdb.storage.invalidateTransaction = record_inv

        def replica_has_it():
            rtm.begin()
            return 'fresh' in rconn.root()
        wait_until(replica_has_it, 'the replica to show the first commit')
        check(rdb.storage.lastTransaction() >= t0, 'replica lastTransaction')

        def state(r):
            return (r['fresh']['v'], list(r['flist']), r['fcount']())

        def diagnose(got):
            """On a stale read: what a fresh client of the replica reads,
            and the invalidations the stale client received."""
            fdb = open_db(replica, read_only=True)
            try:
                ftm, fconn = new_conn(fdb)
                fresh = state(fconn.root())
                ftm.abort()
            finally:
                fdb.close()
            r = rconn.root()
            oids = {n: hx(r[n]._p_oid) for n in ('fresh', 'flist', 'fcount')}
            print(f'STALE client reads {got}; a fresh replica client reads '
                  f'{fresh}; oids {oids}; invalidations {seen_inv}',
                  file=sys.stderr, flush=True)

        def expect(what, tid, want):
            """Poll the replica client until it reads `want`; never an old
            state once the commit `tid` is covered."""
            started = time.monotonic()
            deadline = started + 15
            while True:
                # Both read before the transaction begins: its snapshot
                # covers them (server_sync), later invalidations do not
                # count.
                applied = admin_applied(admin)
                seen = rdb.storage.lastTransaction()
                rtm.begin()
                got = state(rconn.root())
                if got == want:
                    break
                if seen >= tid or applied >= tid:
                    diagnose(got)
                check(seen < tid,
                      f'{what}: stale read: the client\'s lastTransaction '
                      f'{hx(seen)} covers commit {hx(tid)} but it reads '
                      f'{got}, want {want}')
                check(applied < tid,
                      f'{what}: stale read: the replica applied {hx(applied)} '
                      f'(covering commit {hx(tid)}) before this transaction '
                      f'began, yet it reads {got}, want {want}')
                check(time.monotonic() < deadline,
                      f'{what}: the replica client still reads {got} after '
                      f'15s, want {want} (applied {hx(applied)}, commit '
                      f'{hx(tid)})')
                time.sleep(0.01)
            waits.append(time.monotonic() - started)

        expect('initial', t0, (0, [0], 0))
        for i in range(1, rounds + 1):
            ptm.begin()
            proot['fresh']['v'] = i
            proot['flist'].append(i)
            if i % 3 == 0:
                # more than one new object in a transaction
                proot[f'new{i}'] = PersistentMapping(v=i)
            commit(ptm, f'fresh {i}')
            expect(f'round {i}', proot['fresh']._p_serial,
                   (i, list(range(i + 1)), 0))
            if i % 3 == 0:
                check_eq(rconn.root()[f'new{i}']['v'], i, f'new{i}')
        v, lst = rounds, list(range(rounds + 1))

        # a conflict resolved by the server: data no client sent
        ptm2.begin()
        pconn2.root()['fcount']()
        ptm.begin()
        proot['fcount'].change(1)
        commit(ptm, 'count +1')
        pconn2.root()['fcount'].change(10)
        commit(ptm2, 'count +10, resolved')
        expect('resolved conflict', pdb2.storage.lastTransaction(),
               (v, lst, 11))

        # a commit that bypasses the proxy
        dtm.begin()
        dconn.root()['fresh']['v'] = 'direct'
        commit(dtm, 'direct')
        direct_tid = ddb.storage.lastTransaction()
        expect('direct commit', direct_tid, ('direct', lst, 11))

        # undo it through the proxy: records the client never sent
        ptm.begin()
        log = pdb.undoLog(0, 5)
        check_eq(log[0]['description'], 'direct', 'newest undoLog entry')
        pdb.undo(log[0]['id'], ptm.get())
        commit(ptm, 'undo direct')
        expect('undo', pdb.storage.lastTransaction(), (v, lst, 11))
        for tm in (rtm, ptm, ptm2, dtm):
            tm.abort()
        print(f'steps={len(waits)} max_wait={max(waits):.3f}')
    finally:
        for db in (pdb, pdb2, ddb, rdb):
            db.close()


@command
def pcache_prime(primary, replica, var, key):
    """Commit root[KEY] = {v: 0} on the primary, load it through a replica
    client with a persistent cache in VAR, close that client (its cache
    file stays). Prints oid=<hex>."""
    pdb = open_db(primary)
    try:
        tm, conn = new_conn(pdb)
        conn.root()[key] = PersistentMapping(v=0)
        commit(tm, f'prime {key}')
        oid = conn.root()[key]._p_oid
    finally:
        pdb.close()
    rdb = open_db(replica, read_only=True, client='pc', var=var)
    try:
        rtm, rconn = new_conn(rdb)

        def seen():
            rtm.begin()
            return key in rconn.root()
        wait_until(seen, f'the replica to show {key}')
        check_eq(rconn.root()[key]['v'], 0, 'value through the replica')
        rtm.abort()
    finally:
        rdb.close()
    print(f'oid={hx(oid)}')


@command
def pcache_check(replica, var, key, oid, want):
    """The persistent cache in VAR holds an old revision of OID; a client
    reopening it on the replica must read root[KEY]['v'] == WANT."""
    from ZEO.cache import ClientCache
    oid = bytes.fromhex(oid)
    path = os.path.join(var, 'pc-1.zec')
    check(os.path.exists(path), f'no cache file {path}')
    cache = ClientCache(path)
    try:
        cached = cache.load(oid)
        check(cached is not None, 'the cache file lost the object')
        before = cache.getLastTid()
    finally:
        cache.close()
    rdb = open_db(replica, read_only=True, client='pc', var=var)
    try:
        tm, conn = new_conn(rdb)
        tm.begin()
        got = conn.root()[key]['v']
        check_eq(got, want, f'value of {key} after reconnecting with a '
                            f'cache of {hx(before)}')
        tm.abort()
    finally:
        rdb.close()
    print(f'cache_tid={hx(before)} value={got}')


def expect_read_only_error(what, fn):
    try:
        fn()
    except ReadOnlyError:
        return
    except Exception as e:
        raise Failure(f'{what}: {type(e).__name__}: {e} '
                      f'instead of ReadOnlyError')
    raise Failure(f'{what}: no ReadOnlyError')


@command
def refuse_writes(replica, backend):
    """Every way to write through the replica proxy fails; the replica's
    backend does not move."""
    before = last_tid(backend)

    # a writable client never connects
    started = time.monotonic()
    try:
        st = open_storage(replica, read_only=False, wait_timeout=3)
    except (ClientDisconnected, ReadOnlyError):
        pass
    else:
        st.close()
        raise Failure('read_only=False client connected to the replica')
    check(time.monotonic() - started < 30, 'refusal took too long')

    # read_only_fallback degrades to read-only
    st = open_storage(replica, read_only=False, read_only_fallback=True)
    try:
        check(st.isReadOnly(), 'read_only_fallback client is not read-only')
        db = DB(st)
        tm, conn = new_conn(db)
        len(conn.root())  # reads work
        conn.root()['x'] = 1
        expect_read_only_error('commit with read_only_fallback', tm.commit)
        tm.abort()
        db.close()
    finally:
        st.close()

    st = open_storage(replica, read_only=True)
    try:
        db = DB(st)
        tm, conn = new_conn(db)
        conn.root()['x'] = 1
        expect_read_only_error('commit with read_only=True', tm.commit)
        tm.abort()
        root_oid = z64
        # raw calls that bypass the client's own read-only checks
        expect_read_only_error('new_oids', lambda: st._call('new_oids'))
        expect_read_only_error('new_oids(5)', lambda: st._call('new_oids', 5))
        data, root_serial = st.load(root_oid)

        def store_and_vote(txn_id, *writes):
            st._async('tpc_begin', txn_id, b'raw', b'raw write', {}, None,
                      ' ')
            for w in writes:
                st._async(*w)
            try:
                st._call('vote', txn_id)
            finally:
                st._call('tpc_abort', txn_id)

        expect_read_only_error('tpc_begin/storea/vote', lambda: store_and_vote(
            1001, ('storea', root_oid, root_serial, data, 1001)))
        expect_read_only_error('storea of a new oid + vote', lambda: (
            store_and_vote(1002, ('storea', p64(999999), z64, data, 1002))))
        expect_read_only_error('deleteObject + vote', lambda: store_and_vote(
            1003, ('deleteObject', root_oid, root_serial, 1003)))
        expect_read_only_error('restorea + vote', lambda: store_and_vote(
            1007, ('restorea', root_oid, root_serial, data, None, 1007)))
        expect_read_only_error('undoa + vote', lambda: store_and_vote(
            1004, ('undoa', root_serial, 1004)))
        expect_read_only_error('checkCurrentSerialInTransaction + vote',
                               lambda: store_and_vote(
                                   1005, ('checkCurrentSerialInTransaction',
                                          root_oid, root_serial, 1005)))

        def finish_without_vote():
            st._async('tpc_begin', 1006, b'', b'', {}, None, ' ')
            st._async('storea', root_oid, root_serial, data, 1006)
            try:
                st._call('tpc_finish', 1006)
            finally:
                st._call('tpc_abort', 1006)
        expect_read_only_error('tpc_finish', finish_without_vote)
        expect_read_only_error('pack', lambda: st.pack(wait=True))
        # the session still serves reads
        check_eq(st.load(root_oid)[1], root_serial, 'root serial after')
        check_eq(hx(st.lastTransaction()), hx(before),
                 'lastTransaction seen by the replica client')
        db.close()
    finally:
        st.close()
    after = last_tid(backend)
    check_eq(hx(after), hx(before), 'replica backend lastTransaction')
    print(f'last={hx(after)}')


def main(argv):
    return run(COMMANDS, argv)


if __name__ == '__main__':
    sys.exit(main(sys.argv))
