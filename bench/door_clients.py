"""Client processes for bench/door_bench.py (real ZEO ClientStorages).

  door_clients.py populate ADDR N        N small objects; prints their oids
  door_clients.py load ADDR SECONDS OIDS_FILE RO
                                         uncached loadBefore calls at the
                                         session's snapshot, one at a time;
                                         prints JSON {n, lat_us: [...]}
  door_clients.py write ADDR RATE SECONDS
                                         commits at RATE txn/s; prints JSON
"""
import json
import random
import sys
import time

import transaction
from persistent.mapping import PersistentMapping
from ZEO.ClientStorage import ClientStorage
from ZODB import DB
from ZODB.utils import p64, u64


def addr(s):
    host, port = s.rsplit(':', 1)
    return (host, int(port))


def populate(a, n):
    db = DB(ClientStorage(addr(a), wait_timeout=30))
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    objs = [PersistentMapping({'v': i, 'pad': 'x' * 200}) for i in range(int(n))]
    root['objs'] = PersistentMapping({i: o for i, o in enumerate(objs)})
    tm.commit()
    print(json.dumps({'oids': [o._p_oid.hex() for o in objs]}))
    db.close()


def load(a, seconds, oids_file, ro):
    with open(oids_file) as f:
        oids = [bytes.fromhex(o) for o in json.load(f)['oids']]
    st = ClientStorage(addr(a), wait_timeout=30, read_only=ro == '1')
    rng = random.Random(1)
    lat = []
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline and len(lat) < 200_000:
        before = p64(u64(st.lastTransaction()) + 1)
        oid = rng.choice(oids)
        t0 = time.perf_counter()
        st._call('loadBefore', oid, before)
        lat.append((time.perf_counter() - t0) * 1e6)
    st.close()
    print(json.dumps({'n': len(lat), 'lat_us': lat}))


def write(a, rate, seconds):
    db = DB(ClientStorage(addr(a), wait_timeout=30))
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    rate, seconds = float(rate), float(seconds)
    n, start = 0, time.monotonic()
    while time.monotonic() - start < seconds and n < 100_000:
        due = start + n / rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        tm.begin()
        conn.root()['w'] = n
        tm.commit()
        n += 1
    db.close()
    print(json.dumps({'commits': n}))


if __name__ == '__main__':
    cmd, args = sys.argv[1], sys.argv[2:]
    {'populate': populate, 'load': load, 'write': write}[cmd](*args)
