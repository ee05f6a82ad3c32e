"""Helpers shared by the test scripts: checks that fail with a message, and
real ZODB clients (ClientStorage/DB) opened the way the tests need them."""
import contextlib
import faulthandler
import logging
import os
import ssl
import sys
import time

import transaction
from ZEO.ClientStorage import ClientStorage
from ZODB import DB

WAIT_TIMEOUT = float(os.environ.get('ZRELAY_WAIT_TIMEOUT', 15))


class Failure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def check_eq(got, want, what):
    if got != want:
        raise Failure(f'{what}: got {got!r}, want {want!r}')


def parse_addr(text):
    """'host:port' -> (host, port); an absolute path is a unix socket;
    'A|B|...' -> a list (ClientStorage tries every address, as a client
    that knows several doors)."""
    if not isinstance(text, str) or text.startswith('/'):
        return text
    if '|' in text:
        return [parse_addr(a) for a in text.split('|')]
    host, port = text.rsplit(':', 1)
    return (host, int(port))


def tls_for(addr):
    """(ssl_context, server_hostname) for an address listed in
    ZRELAY_TLS_ADDRS (comma-separated HOST:PORT), else (None, None).
    The context trusts ZRELAY_TLS_CA and presents ZRELAY_TLS_CERT /
    ZRELAY_TLS_KEY if set; the server name is ZRELAY_TLS_HOSTNAME;
    ZRELAY_TLS_MAX_VERSION=1.2 caps the client at TLS 1.2."""
    listed = os.environ.get('ZRELAY_TLS_ADDRS', '')
    a = parse_addr(addr)
    key = f'{a[0]}:{a[1]}' if isinstance(a, tuple) else a
    if key not in listed.split(','):
        return None, None
    ctx = ssl.create_default_context(cafile=os.environ['ZRELAY_TLS_CA'])
    if os.environ.get('ZRELAY_TLS_MAX_VERSION') == '1.2':
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cert = os.environ.get('ZRELAY_TLS_CERT')
    if cert:
        ctx.load_cert_chain(cert, os.environ['ZRELAY_TLS_KEY'])
    return ctx, os.environ.get('ZRELAY_TLS_HOSTNAME', 'localhost')


def open_storage(addr, **kw):
    """A ClientStorage with server_sync unless told otherwise: tm.begin()
    pings the server, so every invalidation sent before is processed by then
    (without it, invalidations arrive asynchronously). With
    ZRELAY_EXPECT_PROTOCOL set, checks the negotiated protocol. Addresses
    listed in ZRELAY_TLS_ADDRS are reached over TLS (see tls_for)."""
    kw.setdefault('wait_timeout', WAIT_TIMEOUT)
    kw.setdefault('server_sync', True)
    ctx, hostname = tls_for(addr)
    if ctx is not None:
        kw.setdefault('ssl', ctx)
        kw.setdefault('ssl_server_hostname', hostname)
    storage = ClientStorage(parse_addr(addr), **kw)
    want = os.environ.get('ZRELAY_EXPECT_PROTOCOL')
    if want:
        check_eq(storage.protocol_version, want.encode(),
                 'negotiated protocol')
    return storage


def open_db(addr, **kw):
    return DB(open_storage(addr, **kw))


def new_conn(db):
    """A connection with its own transaction manager (several per thread)."""
    tm = transaction.TransactionManager()
    return tm, db.open(transaction_manager=tm)


@contextlib.contextmanager
def client(addr, **kw):
    """``(db, tm, conn)``: a DB on *addr* (``open_db`` keywords) with one
    connection; its transaction is aborted and the DB closed on the way
    out, also on a failure."""
    db = open_db(addr, **kw)
    try:
        tm, conn = new_conn(db)
        try:
            yield db, tm, conn
        finally:
            tm.abort()
    finally:
        db.close()


def wait_until(cond, what, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise Failure(f'timed out after {timeout}s waiting for {what}')
        time.sleep(0.02)


def run(commands, argv, usage='ARGS...', min_args=0, convert=lambda a: a):
    """Runs `commands[argv[1]](*argv[2:])` as a test script: exit 0 and an
    'ok' line, or exit 1 and 'FAIL name: reason' for a Failure. Every
    thread's stack is dumped before the harness's own timeout would kill
    the script. ZRELAY_ZEO_LOG=FILE appends ZEO's client log at DEBUG to
    FILE (each line names its storage's thread: `name=` of the client)."""
    if len(argv) < 2 + min_args or argv[1] not in commands:
        print(f'usage: {argv[0]} {{{",".join(sorted(commands))}}} {usage}',
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format='%(asctime)s %(levelname)s %(name)s '
                               '%(message)s')
    zeo_log = os.environ.get('ZRELAY_ZEO_LOG')
    if zeo_log:
        # ZEO's client at DEBUG (connects, register, verification) into a
        # file of its own, one line per event with its thread (the
        # storage's name): what a client saw during a role change.
        h = logging.FileHandler(zeo_log)
        h.setFormatter(logging.Formatter(
            '%(asctime)s %(threadName)s %(levelname)s %(name)s %(message)s'))
        h.setLevel(logging.DEBUG)
        for root_h in logging.getLogger().handlers:
            root_h.setLevel(logging.WARNING)
        zeo = logging.getLogger('ZEO')
        zeo.setLevel(logging.DEBUG)
        zeo.addHandler(h)
    faulthandler.dump_traceback_later(float(os.environ.get(
        'ZRELAY_PY_TIMEOUT', 110)), exit=True)
    name = argv[1]
    started = time.monotonic()
    try:
        commands[name](*[convert(a) for a in argv[2:]])
    except Failure as e:
        print(f'FAIL {name}: {e}', file=sys.stderr, flush=True)
        return 1
    print(f'ok {name} {time.monotonic() - started:.2f}s', flush=True)
    return 0
