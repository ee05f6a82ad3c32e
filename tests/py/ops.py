"""Clients for the operations tests (tests/ops.rs): drain and reload seen by
real ZEO clients.

Usage: ops.py COMMAND ARGS...

Commands:
  hold ADDR       interactive: opens a transaction (tpc_begin + a store of
                  the root) and prints BEGUN; on "finish" votes and finishes
                  it (prints committed=<hex>), then waits until the proxy
                  closes the session (prints CLOSED)
  refused ADDR    a new ClientStorage cannot connect (prints refused)
  churn ADDR N    N commits rewriting one 20 kB object (garbage for a pack);
                  prints last=<hex>
"""
import sys

from ZEO.Exceptions import ClientDisconnected
from ZODB.Connection import TransactionMetaData
from ZODB.utils import z64

from zclient import check_eq, open_storage, run, wait_until, Failure

COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__] = fn
    return fn


@command
def hold(addr):
    st = open_storage(addr)
    try:
        data, serial = st.load(z64)
        t = TransactionMetaData(description='held across a drain')
        st.tpc_begin(t)
        st.store(z64, serial, data, '', t)
        # The store is async: a sync call proves the proxy has seen both.
        st._call('lastTransaction')
        print('BEGUN', flush=True)
        check_eq(sys.stdin.readline().strip(), 'finish', 'command')
        st.tpc_vote(t)
        tid = st.tpc_finish(t)
        print(f'committed={tid.hex()}', flush=True)
        wait_until(lambda: not st.is_connected(),
                   'the proxy to close the drained session', timeout=30)
        print('CLOSED', flush=True)
    finally:
        st.close()


@command
def refused(addr):
    try:
        st = open_storage(addr, wait_timeout=2)
    except ClientDisconnected:
        print('refused', flush=True)
        return
    st.close()
    raise Failure('a new client connected to a draining proxy')


@command
def churn(addr, n):
    from persistent.mapping import PersistentMapping
    from zclient import new_conn, open_db
    db = open_db(addr)
    try:
        tm, conn = new_conn(db)
        for i in range(int(n)):
            tm.begin()
            conn.root()['churn'] = PersistentMapping(i=i, pad='x' * 20000)
            tm.commit()
        print(f'last={db.storage.lastTransaction().hex()}', flush=True)
    finally:
        db.close()


if __name__ == '__main__':
    sys.exit(run(COMMANDS, sys.argv))
