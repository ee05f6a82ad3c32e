"""The bank workload of the HA test scripts (doors.py, roles.py, hanet.py):
N accounts holding a constant total, money moved between two of them per
transaction, and optionally one commit counter per writer (bumped in the
same transaction, so a backend's counters say which commits it has)."""
from persistent.mapping import PersistentMapping

from zclient import client


def init(addr, n, total, writers=0, **open_kw):
    """Creates the bank through *addr* in one commit; returns its tid."""
    n, total, writers = int(n), int(total), int(writers)
    with client(addr, **open_kw) as (db, tm, conn):
        root = conn.root()
        each = total // n
        accts = [PersistentMapping({'b': each}) for _ in range(n)]
        accts[0]['b'] += total - each * n
        root['bank'] = PersistentMapping(dict(enumerate(accts)))
        if writers:
            root['counters'] = PersistentMapping(
                {i: PersistentMapping({'n': 0}) for i in range(writers)})
        tm.commit()
        return db.storage.lastTransaction()


def transfer(tm, conn, rng, n, writer=None):
    """Begins a transaction that moves 1-50 between two accounts drawn by
    *rng* and bumps *writer*'s counter (if given); the caller commits.
    Returns the two accounts (for their serials after the commit)."""
    a, b = rng.sample(range(n), 2)
    amount = rng.randint(1, 50)
    tm.begin()
    root = conn.root()
    root['bank'][a]['b'] -= amount
    root['bank'][b]['b'] += amount
    if writer is not None:
        root['counters'][writer]['n'] += 1
    return root['bank'][a], root['bank'][b]


def total(conn, n):
    """The sum of the first *n* accounts as *conn* sees them."""
    bank = conn.root()['bank']
    return sum(bank[k]['b'] for k in range(n))


def counter(conn, writer):
    return conn.root()['counters'][writer]['n']
