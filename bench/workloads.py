"""The benchmark workloads.

Two kinds:

* raw round trips (``raw_latency``), run in the benchmark process itself on a
  ``zeoraw.RawZeo`` socket: one request at a time, each timed alone;
* ZODB commits, run by real ``ZODB.DB`` + ``ZEO.ClientStorage`` clients in
  worker processes (``WorkerPool``), so several clients commit concurrently
  and the benchmark process stays out of their way.

The worker processes are forked once, at start-up, before the benchmark
process has any thread; each one then serves task after task over its own
pipe. Every wait on a pipe has a timeout and every loop a count and a time
limit.
"""
import ctypes
import multiprocessing
import os
import signal
import time
import traceback

import procs as P
import zeoraw

BULK_OBJECTS = 100          # objects per bulk transaction
BULK_OBJECT_BYTES = 1024    # payload per bulk object
CONNECT_TIMEOUT = 30.0      # ClientStorage(wait_timeout=...)


# ------------------------------------------------------------- populate ----

def populate(host, port, n_load, n_workers):
    """Create the objects every workload uses; return their oids.

    * ``n_load`` small objects for the uncached-load workload;
    * one mapping per commit worker, so concurrent committers never conflict;
    * ``BULK_OBJECTS`` mappings per commit worker for the bulk workload.
    """
    import transaction
    import ZODB
    from persistent.mapping import PersistentMapping
    from ZEO.ClientStorage import ClientStorage

    storage = ClientStorage(P.client_addr(host, port),
                            wait_timeout=CONNECT_TIMEOUT)
    db = ZODB.DB(storage)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        load_oids = []
        batch = 500
        for start in range(0, n_load, batch):
            objs = [PersistentMapping({'i': i, 'pad': b'.' * 64})
                    for i in range(start, min(n_load, start + batch))]
            root[f'load{start}'] = objs
            tm.commit()
            load_oids.extend(o._p_oid for o in objs)
        for w in range(n_workers):
            root[f'small{w}'] = PersistentMapping({'n': 0})
            root[f'bulk{w}'] = [PersistentMapping({'d': b''})
                                for _ in range(BULK_OBJECTS)]
            tm.commit()
        conn.close()
        return load_oids
    finally:
        db.close()


# ---------------------------------------------------------- raw latency ----

def raw_latency(host, port, kind, oids, count, max_seconds, warmup=50):
    """Time ``count`` round trips on one fresh connection; return ns list.

    ``kind`` is ``'load'`` (loadBefore of each oid in ``oids`` in turn, each
    a distinct object, so nothing on the way can have it cached) or
    ``'ping'``.
    """
    lat = []
    with zeoraw.connect(host, port) as c:
        # Warm the connection (and the proxy's session) up with requests that
        # are not measured; loads warm up on the root, which is never timed.
        for _ in range(warmup):
            if kind == 'load':
                c.call('loadBefore', zeoraw.Z64, zeoraw.MAXTID)
            else:
                c.call('ping')
        deadline = time.monotonic() + max_seconds
        for i in range(count):
            if kind == 'load':
                msgid, frame = c.request('loadBefore', oids[i % len(oids)],
                                         zeoraw.MAXTID)
            else:
                msgid, frame = c.request('ping')
            ns, result = c.timed_call(msgid, frame)
            if kind == 'load' and not (isinstance(result, (tuple, list))
                                       and len(result) == 3 and result[0]):
                raise zeoraw.ProtocolError(f'bad loadBefore reply {result!r:.200}')
            lat.append(ns)
            if (i & 63) == 0 and time.monotonic() > deadline:
                break
    return lat


# ---------------------------------------------------------- commit tasks ----

def _commit_task(pipe, host, port, wid, kind, seconds, max_txns, go_timeout):
    """Connect, report ready, wait for 'go', commit for ``seconds``.

    ``kind``: ``'small'`` changes one small object per transaction;
    ``'bulk'`` rewrites ``BULK_OBJECTS`` objects of ``BULK_OBJECT_BYTES``
    each per transaction. Returns ``(n_txns, elapsed_s, latencies_ns)``.
    """
    import transaction
    import ZODB
    from ZEO.ClientStorage import ClientStorage

    storage = ClientStorage(P.client_addr(host, port),
                            wait_timeout=CONNECT_TIMEOUT)
    db = ZODB.DB(storage, pool_size=1)
    try:
        tm = transaction.TransactionManager()
        conn = db.open(tm)
        root = conn.root()
        if kind == 'small':
            obj = root[f'small{wid}']
            obj['n']                 # load it now, not in the timed loop
        else:
            objs = root[f'bulk{wid}']
            for o in objs:
                o['d']
            # Fresh bytes per object and transaction, made before timing.
            pool = os.urandom(BULK_OBJECT_BYTES * (BULK_OBJECTS + 64))
        tm.begin()
        pipe.send(('ready', wid))
        if not pipe.poll(go_timeout) or pipe.recv() != 'go':
            raise RuntimeError('no go signal')

        clock = time.perf_counter_ns
        lat = []
        t_start = clock()
        t_end = t_start + int(seconds * 1e9)
        n = 0
        while n < max_txns:
            if kind == 'small':
                obj['n'] = n
            else:
                off = (n * 97) % 64 * BULK_OBJECT_BYTES
                for j, o in enumerate(objs):
                    a = off + j * BULK_OBJECT_BYTES
                    o['d'] = pool[a:a + BULK_OBJECT_BYTES]
            t0 = clock()
            tm.commit()
            t1 = clock()
            lat.append(t1 - t0)
            n += 1
            tm.begin()
            if t1 >= t_end:
                break
        elapsed = (clock() - t_start) / 1e9
        conn.close()
        return n, elapsed, lat
    finally:
        db.close()


def _populate_task(pipe, **kw):
    return populate(**kw)


TASKS = {'commit': _commit_task, 'populate': _populate_task}


def _worker_main(pipe, wid, idle_timeout):
    # Die with the benchmark even if it is SIGKILLed; leave Ctrl-C handling
    # to the benchmark process, which stops the workers itself.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except Exception:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while pipe.poll(idle_timeout):
        try:
            msg = pipe.recv()
        except EOFError:
            break
        if msg is None:
            break
        name, kwargs = msg
        try:
            result = TASKS[name](pipe, **kwargs)
        except BaseException:
            pipe.send(('error', wid, traceback.format_exc()))
        else:
            pipe.send(('done', wid, result))


class WorkerError(RuntimeError):
    pass


class WorkerPool:
    """``n`` forked worker processes, each serving tasks over a pipe."""

    def __init__(self, n, idle_timeout=900.0):
        ctx = multiprocessing.get_context('fork')
        self.pipes = []
        self.procs = []
        for wid in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(child, wid, idle_timeout),
                            name=f'bench-worker-{wid}', daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)

    def _expect(self, wids, what, timeout):
        """Wait for message ``what`` from each worker in ``wids``."""
        out = {}
        deadline = time.monotonic() + timeout
        for wid in wids:
            pipe = self.pipes[wid]
            if not pipe.poll(max(0.0, deadline - time.monotonic())):
                raise WorkerError(f'worker {wid}: no {what!r} within '
                                  f'{timeout:.0f}s')
            msg = pipe.recv()
            if msg[0] == 'error':
                raise WorkerError(f'worker {wid} failed:\n{msg[2]}')
            if msg[0] != what:
                raise WorkerError(f'worker {wid}: got {msg!r:.200}, '
                                  f'expected {what!r}')
            out[wid] = msg[2] if what == 'done' else None
        return out

    def populate(self, timeout=120.0, **kw):
        self.pipes[0].send(('populate', kw))
        return self._expect([0], 'done', timeout)[0]

    def commits(self, n, host, port, kind, seconds, max_txns,
                connect_timeout=60.0):
        """Run a commit task on workers ``0..n-1`` with a common start.

        Returns a list of ``(n_txns, elapsed_s, latencies_ns)``.
        """
        wids = list(range(n))
        for wid in wids:
            self.pipes[wid].send(('commit', dict(
                host=host, port=port, wid=wid, kind=kind, seconds=seconds,
                max_txns=max_txns, go_timeout=connect_timeout)))
        self._expect(wids, 'ready', connect_timeout)
        for wid in wids:
            self.pipes[wid].send('go')
        done = self._expect(wids, 'done', seconds + 60.0)
        return [done[w] for w in wids]

    def close(self, timeout=5.0):
        for pipe in self.pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()       # SIGTERM to this worker's own PID
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join(2)
        for pipe in self.pipes:
            pipe.close()
