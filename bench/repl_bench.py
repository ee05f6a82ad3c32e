#!/usr/bin/env python3
"""Replication benchmark: lag and catch-up of a zrelay primary/replica pair.

Everything runs on 127.0.0.1 in temporary directories (removed at the end):

* ``zrelay cert`` makes a CA and the certificates of ``primary`` and
  ``replica``;
* two unmodified ``runzeo`` servers (FileStorage, pickle ``Z5``), a primary
  zrelay in front of one (``[replication] role = "primary"``) and a replica
  zrelay in front of the other (``role = "replica"``), streaming over TLS 1.3
  with mutual authentication;
* client processes from ``bench/repl_clients.py``: raw ZEO 5 writers and one
  watcher that registers read-only on the replica zrelay *and* on the primary
  zrelay and timestamps every ``invalidateTransaction`` it receives.

Measured once with the FileStorages on disk (a temporary directory) and once
in tmpfs (``/dev/shm``, no fsync cost), see ``--storage``:

0. **Floors**: one writer straight on a bare runzeo (at the steady rate and
   flat out), and flat out through the primary zrelay with no replica
   connected.
1. **Lag at a steady rate** (default 100 txn/s, one writer): for each commit,
   lag = arrival of its invalidation at a client of the REPLICA − return of
   ``tpc_finish`` at the writer (both CLOCK_MONOTONIC). The same for a
   client of the PRIMARY is the baseline: what a client of the primary itself
   sees.
2. **Lag at the highest rate** the primary sustains: 1 and 4 writers
   committing as fast as they can.
3. **Catch-up**: a history of ~20,000 transactions of ~2.5 KB (~50 MB) is
   written once by a fixture straight into a FileStorage and copied; a
   primary is started on it, then an empty replica, timed until its applied
   tid equals the primary's last. The ceiling is ``zrelay bench-restore``
   (the replica's pipelined applier replaying the same history, read into
   memory first, into a fresh empty runzeo). Catch-up and ceiling rounds
   alternate.

Prints a markdown report (also written to ``bench/repl-results-latest.md``);
progress goes to stderr. A benchmark, not a test: it fails only if something
does not work. Every loop is bounded in count and time; every child process
is stopped by its PID at the end, also on errors, Ctrl-C and SIGTERM.
"""
import argparse
import datetime
import http.client
import json
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import procs as P        # noqa: E402
import zeoraw            # noqa: E402

HOST = P.HOST
CLIENTS = os.path.join(HERE, 'repl_clients.py')

# Targets (from the issue).
TARGET_LAG_P99_MS = 1.4          # replica client lag p99 at 100 txn/s
TARGET_CATCHUP_TXN_S = 4000.0    # what the ZRS storage wrapper reaches
TARGET_CATCHUP_RATIO = 0.80      # of the replica backend's own capacity
# Issue 11, against what the same run measured without replication:
TARGET_LAG_VS_BARE = 2.0         # lag p99 at the steady rate / bare commit p50
TARGET_FLAT_OUT = 0.9            # max-rate txn/s, replica streaming / none
TARGET_PRIMARY_CPU = 1.15        # primary runzeo CPU per commit, same ratio

T0 = time.monotonic()


def log(msg):
    print(f'[{time.monotonic() - T0:6.1f}s] {msg}', file=sys.stderr, flush=True)


class Settings:
    def __init__(self, args):
        q = args.quick
        self.rate = args.rate
        self.lag_seconds = args.lag_seconds or (3.0 if q else 15.0)
        self.max_seconds = args.max_seconds or (2.0 if q else 5.0)
        self.bare_seconds = 2.0 if q else 5.0
        self.pop_txns = args.txns or (2000 if q else 20000)
        self.pop_bytes = args.txn_bytes
        self.rounds = args.rounds or (1 if q else 2)


# ------------------------------------------------------------ processes ----

# --pin: the CPUs each side may use ({'primary': {0}, 'replica': {1}}); empty:
# no pinning. The primary side is every runzeo and zrelay not named
# "replica" plus the writers; the replica side is the replica's runzeo and
# zrelay plus the watcher. It stands for a replica on its own host: the
# primary's processes get the same CPU with or without a replica streaming.
PIN = {}


def pin(pid, side):
    """Pins every thread of *pid* to *side*'s CPUs (threads it starts later
    inherit the mask from the thread that starts them)."""
    cpus = PIN.get(side)
    if not cpus:
        return
    for tid in os.listdir(f'/proc/{pid}/task'):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:      # a thread that just ended
            pass


def side_of(name):
    return 'replica' if name == 'replica' else 'primary'


class Child:
    """A repl_clients.py process driven over stdin/stdout JSON lines."""

    def __init__(self, registry, name, argv, log_path):
        self.name = name
        self.log_path = log_path
        err = open(log_path, 'ab')
        try:
            self.popen = subprocess.Popen(
                [sys.executable, CLIENTS] + argv, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                preexec_fn=P._die_with_parent)
        finally:
            err.close()
        registry.append(self)
        pin(self.popen.pid,
            'replica' if name.startswith('watcher') else 'primary')
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.popen.stdout, selectors.EVENT_READ)

    def expect(self, key, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                raise RuntimeError(f'{self.name}: no {key!r} within '
                                   f'{timeout:.0f}s; log {self.log_path}:\n'
                                   f'{P.tail(self.log_path)}')
            line = self.popen.stdout.readline()
            if not line:
                self.popen.wait(5)
                raise RuntimeError(f'{self.name} exited with '
                                   f'{self.popen.returncode}:\n'
                                   f'{P.tail(self.log_path)}')
            msg = json.loads(line)
            if key in msg:
                return msg[key]

    def send(self, line):
        self.popen.stdin.write(line.encode() + b'\n')
        self.popen.stdin.flush()

    def finish(self, timeout=10.0):
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, signal.SIGTERM)
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)
            except ProcessLookupError:
                pass
        for f in (self.popen.stdin, self.popen.stdout):
            try:
                f.close()
            except OSError:
                pass


def http_get(port, path, timeout=2.0):
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request('GET', path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def status(port):
    return json.loads(http_get(port, '/status')[1])


def metrics(port):
    """``{name{labels}: value}`` from /metrics (comments skipped)."""
    out = {}
    for line in http_get(port, '/metrics')[1].splitlines():
        if not line or line.startswith('#'):
            continue
        key, _, value = line.rpartition(' ')
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


def metric_delta(before, after, name):
    return after.get(name, 0.0) - before.get(name, 0.0)


class Node:
    """One runzeo and (optionally) the zrelay beside it."""

    def __init__(self, name, d):
        self.name = name
        self.dir = d
        self.zeo = self.zrelay = None
        self.zeo_port = self.client_port = self.admin_port = None
        self.repl_port = None

    def procs(self):
        return [p for p in (self.zeo, self.zrelay) if p is not None]


def start_runzeo(procs, node):
    os.makedirs(node.dir, exist_ok=True)
    node.zeo_port = P.free_port()
    conf = os.path.join(node.dir, 'zeo.conf')
    P.runzeo_conf(conf, node.zeo_port, node.dir, msgpack=False)
    node.zeo = procs.spawn(f'runzeo-{node.name}',
                           [sys.executable, '-m', 'ZEO.runzeo', '-C', conf],
                           os.path.join(node.dir, 'runzeo.out'), cwd=node.dir)
    pin(node.zeo.pid, side_of(node.name))
    node.zeo.wait_port(node.zeo_port)


def start_zrelay(procs, args, node, certs, role, upstream=None, wait=True,
                 extra=(), top=()):
    """*extra*: more ``[replication]`` lines; *top*: more top-level lines
    (``data_dir``)."""
    node.client_port = P.free_port()
    node.admin_port = P.free_port()
    lines = [f'node_name = "{node.name}"',
             f'log_level = "{args.zrelay_log_level}"',
             *top,
             '[client]', f'listen = "{HOST}:{node.client_port}"',
             '[backend]', f'address = "{HOST}:{node.zeo_port}"',
             '[admin]', f'listen = "{HOST}:{node.admin_port}"',
             '[replication]', f'role = "{role}"']
    if role == 'primary':
        node.repl_port = P.free_port()
        lines += [f'listen = "{HOST}:{node.repl_port}"',
                  'allowed_peers = ["replica"]']
        if getattr(args, 'no_capture', False):
            lines.append('capture_max_bytes = 0')
    else:
        lines += [f'upstream = "{HOST}:{upstream}"',
                  'upstream_name = "primary"']
    lines += list(extra)
    lines += ['[replication.tls]',
              f'ca_file = "{certs}/ca.pem"',
              f'cert_file = "{certs}/{role}.pem"',
              f'key_file = "{certs}/{role}-key.pem"']
    conf = os.path.join(node.dir, 'zrelay.toml')
    with open(conf, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    node.zrelay = procs.spawn(f'zrelay-{node.name}',
                              [args.zrelay, 'run', '--config', conf],
                              os.path.join(node.dir, 'zrelay.log'),
                              cwd=node.dir)
    pin(node.zrelay.pid, side_of(node.name))
    if wait:
        node.zrelay.wait_port(node.client_port)
        node.zrelay.wait_port(node.admin_port)


def wait_live(replica, want_tid=None, timeout=60.0):
    """Wait until the replica's stream is live (and has applied want_tid)."""
    deadline = time.monotonic() + timeout
    st = None
    while time.monotonic() < deadline:
        try:
            st = status(replica.admin_port)
            up = st.get('upstream') or {}
            if up.get('state') == 'live' and (
                    want_tid is None or up.get('applied_tid') == want_tid):
                return st
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f'replica not live within {timeout:.0f}s; last status '
                       f'{st!r:.500}; log:\n{P.tail(replica.zrelay.log_path)}')


def stop_node(procs, node):
    for p in reversed(node.procs()):
        procs.stop(p)


def start_pair(procs, registry, args, settings, tmp, certs, tag):
    """Primary, then (after one max-rate run with no replica connected, to
    see what the primary role costs by itself) the replica."""
    primary = Node('primary', os.path.join(tmp, f'{tag}-primary'))
    replica = Node('replica', os.path.join(tmp, f'{tag}-replica'))
    start_runzeo(procs, primary)
    start_runzeo(procs, replica)
    start_zrelay(procs, args, primary, certs, 'primary')
    alone = writer_run(registry, tmp, 'primary, no replica connected',
                       primary.client_port, 0, settings.max_seconds, primary)
    start_zrelay(procs, args, replica, certs, 'replica',
                 upstream=primary.repl_port)
    with zeoraw.connect(HOST, primary.zeo_port) as c:
        last = c.call('lastTransaction').hex()
    wait_live(replica, want_tid=last)
    return primary, replica, alone


# ------------------------------------------------------------- stages ----

STAGE_METRIC = 'zrelay_replication_stage_seconds'
# (stage label, which zrelay records it, what it is), in path order.
STAGES = [
    ('finish_reply', 'primary', 'primary zrelay: session got tpc_finish reply'),
    ('observed', 'primary', 'primary zrelay: observer got the invalidation'),
    ('published', 'primary', 'primary zrelay: handed to the streams'),
    ('sent', 'primary', 'primary zrelay: frame written to TLS'),
    ('received', 'replica', 'replica zrelay: frame decoded'),
    ('begin_sent', 'replica', 'replica zrelay: tpc_begin..vote written'),
    ('voted', 'replica', 'replica zrelay: vote answered'),
    ('finished', 'replica', 'replica zrelay: tpc_finish answered'),
    ('invalidated', 'replica', 'replica zrelay: invalidation to the client'),
]


def tid_unix(tid_hex):
    """Unix seconds of a ZODB tid (ZODB.TimeStamp: minutes since 1900 in
    the high 4 bytes, the seconds as a fraction of 2**32/60 in the low)."""
    raw = bytes.fromhex(tid_hex)
    v = int.from_bytes(raw[:4], 'big')
    minute = v % 60
    v //= 60
    hour = v % 24
    v //= 24
    day = v % 31 + 1
    v //= 31
    month = v % 12 + 1
    year = v // 12 + 1900
    secs = int.from_bytes(raw[4:], 'big') * 60.0 / (1 << 32)
    base = datetime.datetime(year, month, day, hour, minute,
                             tzinfo=datetime.timezone.utc).timestamp()
    return base + secs


def wall_offset_ns():
    """CLOCK_REALTIME − CLOCK_MONOTONIC now (the clients stamp with the
    latter, one clock for every process of this host)."""
    best = None
    for _ in range(5):
        a = time.monotonic_ns()
        w = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, w - (a + b) // 2)
    return best[1]


def hist_quantile(buckets, q):
    """Quantile *q* (0..1) of a histogram given as sorted [(le, count)]
    cumulative counts, interpolated linearly inside the bucket (the way
    Prometheus' histogram_quantile does)."""
    if not buckets or buckets[-1][1] <= 0:
        return float('nan')
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float('inf'):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def stage_breakdown(before, after):
    """{stage: (p50_ms, p99_ms, count)} of the stage histogram's increase
    between two scrapes of one zrelay."""
    out = {}
    for stage, _, _ in STAGES:
        prefix = f'{STAGE_METRIC}_bucket{{stage="{stage}",le="'
        bs = []
        for k in after:
            if k.startswith(prefix):
                le = k[len(prefix):-2]
                le = float('inf') if le == '+Inf' else float(le)
                bs.append((le, after[k] - before.get(k, 0.0)))
        bs.sort()
        if bs and bs[-1][1] > 0:
            out[stage] = (hist_quantile(bs, 0.5) * 1e3,
                          hist_quantile(bs, 0.99) * 1e3, bs[-1][1])
    return out


def client_ages(tids, times_ns, offset_ns):
    """Sorted ages (ms since each tid's timestamp) of client events."""
    return sorted(((t + offset_ns) / 1e9 - tid_unix(tid)) * 1e3
                  for tid, t in zip(tids, times_ns))


# ------------------------------------------------------------------ lag ----

class CpuMeter:
    """CPU time (in cores) used by named processes between start and stop."""

    def __init__(self, named_pids):
        self.named = named_pids          # {name: pid}
        self.a = None

    def start(self):
        self.t = time.monotonic()
        self.a = {n: P.pid_cpu_seconds(p) for n, p in self.named.items()}
        self.busy = P.system_busy_seconds()

    def stop(self):
        dt = time.monotonic() - self.t
        cores = {n: (P.pid_cpu_seconds(p) - self.a[n]) / dt
                 for n, p in self.named.items()}
        ours = sum(cores.values())
        other = max(0.0, (P.system_busy_seconds() - self.busy) / dt - ours)
        return cores, other


def lag_run(registry, tmp, primary, replica, label, n_writers, rate,
            seconds, warmup=20):
    """One lag measurement; returns a result dict."""
    watcher = Child(registry, f'watcher-{label}',
                    ['watcher', '--watch', f'replica={replica.client_port}',
                     '--watch', f'primary={primary.client_port}'],
                    os.path.join(tmp, f'watcher-{label}.log'))
    watcher.expect('ready', 60)
    writers = []
    for w in range(n_writers):
        argv = ['writer', '--port', str(primary.client_port),
                '--seconds', str(seconds), '--warmup', str(warmup),
                '--max-txns', str(int(max(rate, 5000) * seconds * 2) + 10)]
        if rate:
            argv += ['--rate', str(rate)]
        writers.append(Child(registry, f'writer{w}-{label}', argv,
                             os.path.join(tmp, f'writer{w}-{label}.log')))
    for wr in writers:
        wr.expect('ready', 60)
    wait_live(replica)      # the warm-up commits are applied
    pids = {'primary runzeo': primary.zeo.pid,
            'primary zrelay': primary.zrelay.pid,
            'replica runzeo': replica.zeo.pid,
            'replica zrelay': replica.zrelay.pid,
            'writers': None, 'watcher': watcher.popen.pid}
    meter = CpuMeter({k: v for k, v in pids.items() if v})
    w_meters = [CpuMeter({'w': wr.popen.pid}) for wr in writers]
    m_rep0 = metrics(replica.admin_port)
    m_pri0 = metrics(primary.admin_port)
    meter.start()
    for m in w_meters:
        m.start()
    for wr in writers:
        wr.send('go')
    results = [wr.expect('result', seconds + 120) for wr in writers]
    cpu, other = meter.stop()
    cpu['writers'] = sum(m.stop()[0]['w'] for m in w_meters)
    for wr in writers:
        wr.finish()
    last = max(t for r in results for t in r['tids'])
    watcher.send(f'stop {last} 120')
    seen = watcher.expect('result', 180)
    watcher.finish()
    m_rep1 = metrics(replica.admin_port)
    m_pri1 = metrics(primary.admin_port)

    finish = {}
    latency = []
    for r in results:
        finish.update(zip(r['tids'], r['finish_ns']))
        latency.extend(r['latency_ns'])
    first_ns = min(r['first_ns'] for r in results)
    last_ns = max(r['last_ns'] for r in results)
    n = len(finish)
    out = {'label': label, 'writers': n_writers, 'rate': rate, 'txns': n,
           'txn_s': n / ((last_ns - first_ns) / 1e9),
           'commit_p50_ms': P.percentile(sorted(latency), 50) / 1e6,
           'commit_p99_ms': P.percentile(sorted(latency), 99) / 1e6,
           'cpu': cpu, 'other_cores': other}
    arrivals = {}
    for src in ('replica', 'primary'):
        arr = {}
        with_oids = 0
        for tid, t, n_oids in seen[src]:
            if tid in finish and tid not in arr:
                arr[tid] = t
                with_oids += n_oids > 0
        arrivals[src] = arr
        lags = sorted((arr[tid] - f) / 1e6 for tid, f in finish.items()
                      if tid in arr)
        out[src] = {'p50': P.percentile(lags, 50), 'p99': P.percentile(lags, 99),
                    'max': lags[-1] if lags else float('nan'),
                    'n': len(lags), 'missing': n - len(lags),
                    'with_oids': with_oids,
                    'last_arrival_ns': max(arr.values()) if arr else 0}
    both = sorted((arrivals['replica'][t] - arrivals['primary'][t]) / 1e6
                  for t in finish
                  if t in arrivals['replica'] and t in arrivals['primary'])
    out['hop'] = {'p50': P.percentile(both, 50), 'p99': P.percentile(both, 99)}
    # Where the lag goes: every stage as the age of the transaction (ms
    # since its tid's time) when it passed; the clients' events likewise.
    off = wall_offset_ns()
    stages = {}
    for name, m0, m1 in (('primary', m_pri0, m_pri1),
                         ('replica', m_rep0, m_rep1)):
        got = stage_breakdown(m0, m1)
        for stage, side, _ in STAGES:
            if side == name and stage in got:
                stages[stage] = got[stage]
    fin = client_ages(list(finish), list(finish.values()), off)
    stages['client_finish'] = (P.percentile(fin, 50), P.percentile(fin, 99),
                               len(fin))
    for src in ('primary', 'replica'):
        a = client_ages(list(arrivals[src]), list(arrivals[src].values()),
                        off)
        stages[f'client_{src}'] = (P.percentile(a, 50), P.percentile(a, 99),
                                   len(a))
    out['stages'] = stages
    out['drain_ms'] = (out['replica']['last_arrival_ns'] - last_ns) / 1e6
    name = 'zrelay_replication_apply_duration_seconds'
    cnt = metric_delta(m_rep0, m_rep1, name + '_count')
    out['apply_mean_ms'] = (metric_delta(m_rep0, m_rep1, name + '_sum')
                            / cnt * 1e3) if cnt else float('nan')
    out['applied'] = metric_delta(
        m_rep0, m_rep1, 'zrelay_replication_applied_transactions_total')
    name = 'zrelay_client_commit_duration_seconds'
    cnt = metric_delta(m_pri0, m_pri1, name + '_count')
    out['proxy_commit_mean_ms'] = (metric_delta(m_pri0, m_pri1, name + '_sum')
                                   / cnt * 1e3) if cnt else float('nan')
    cap = 'zrelay_replication_capture_total{outcome="%s"}'
    out['captured'] = metric_delta(m_pri0, m_pri1, cap % 'captured')
    out['published'] = sum(metric_delta(m_pri0, m_pri1, k)
                           for k in m_pri1
                           if k.startswith('zrelay_replication_capture_total{'))
    rep = out['replica']
    log(f'{label}: {n} txns, captured {out["captured"]:.0f}/'
        f'{out["published"]:.0f}, {out["txn_s"]:.0f} txn/s; replica lag p50 '
        f'{rep["p50"]:.2f} p99 {rep["p99"]:.2f} max {rep["max"]:.2f} ms '
        f'(missing {rep["missing"]}); primary client p50 '
        f'{out["primary"]["p50"]:.2f} ms; cpu '
        + ', '.join(f'{k} {v:.2f}' for k, v in cpu.items())
        + f'; other {other:.2f}')
    log(f'{label}: where the lag goes (ms since the tid, p50/p99): '
        + ', '.join(f'{k} {v[0]:.2f}/{v[1]:.2f}'
                    for k, v in stage_rows(out['stages'])))
    if rep['missing'] or out['primary']['missing']:
        raise RuntimeError(f'{label}: invalidations missing: replica '
                           f'{rep["missing"]}, primary '
                           f'{out["primary"]["missing"]} of {n}')
    return out


def writer_run(registry, tmp, label, port, rate, seconds, node):
    """One writer on *port*; commit latency and CPU per commit of *node*'s
    runzeo (and zrelay, if it has one)."""
    wr = Child(registry, f'writer-{label}',
               ['writer', '--port', str(port), '--seconds', str(seconds),
                '--max-txns', str(int(max(rate, 5000) * seconds * 2))]
               + (['--rate', str(rate)] if rate else []),
               os.path.join(tmp, 'writer-' + ''.join(
                   ch if ch.isalnum() else '_' for ch in label) + '.log'))
    wr.expect('ready', 60)
    c0 = node.zeo.cpu_seconds()
    z0 = node.zrelay.cpu_seconds() if node.zrelay else 0.0
    wr.send('go')
    r = wr.expect('result', seconds + 60)
    cpu = node.zeo.cpu_seconds() - c0
    zcpu = (node.zrelay.cpu_seconds() - z0) if node.zrelay else float('nan')
    wr.finish()
    n = len(r['tids'])
    lat = sorted(r['latency_ns'])
    res = {'label': label, 'rate': rate, 'txns': n,
           'txn_s': n / r['elapsed'],
           'p50': P.percentile(lat, 50) / 1e6,
           'p99': P.percentile(lat, 99) / 1e6,
           'cpu_ms_per_txn': cpu / max(n, 1) * 1e3,
           'zrelay_ms_per_txn': zcpu / max(n, 1) * 1e3}
    log(f'{label}, {"%g txn/s" % rate if rate else "max rate"}: '
        f'{res["txn_s"]:.0f} txn/s, commit p50 {res["p50"]:.2f} p99 '
        f'{res["p99"]:.2f} ms; CPU per commit: runzeo '
        f'{res["cpu_ms_per_txn"]:.2f} ms, zrelay '
        f'{res["zrelay_ms_per_txn"]:.2f} ms')
    return res


def bare_runs(procs, registry, tmp, settings):
    """The floor: one writer directly on a bare runzeo (no zrelay), at the
    steady rate and as fast as it can. Applying a transaction on the replica
    is one such commit on the replica's runzeo."""
    node = Node('bare', os.path.join(tmp, 'bare'))
    start_runzeo(procs, node)
    out = [writer_run(registry, tmp, 'bare runzeo', node.zeo_port, rate,
                      seconds, node)
           for rate, seconds in ((settings.rate, settings.bare_seconds),
                                 (0, settings.max_seconds))]
    stop_node(procs, node)
    shutil.rmtree(node.dir, ignore_errors=True)
    return out


# ------------------------------------------------------------- catch-up ----

def populate_seed(registry, settings, seed_dir):
    """Write the catch-up history once; return its summary.

    A child process writes it straight into a FileStorage (no server, no
    fsync: a fixture, not a measurement); every catch-up primary starts
    from a copy of that Data.fs (and its index).
    """
    os.makedirs(seed_dir)
    log(f'writing the catch-up history: {settings.pop_txns} transactions '
        f'of ~{settings.pop_bytes} bytes into {seed_dir}/Data.fs')
    pop = Child(registry, 'populate',
                ['populate', '--path', os.path.join(seed_dir, 'Data.fs'),
                 '--txns', str(settings.pop_txns),
                 '--bytes', str(settings.pop_bytes), '--max-seconds', '300'],
                os.path.join(seed_dir, 'populate.log'))
    populated = pop.expect('result', 330)
    pop.finish()
    populated['data_fs'] = os.path.getsize(os.path.join(seed_dir, 'Data.fs'))
    log(f'wrote {populated["txns"]} txns, {populated["bytes"] / 1e6:.1f} '
        f'MB in {populated["seconds"]:.1f} s; last tid '
        f'{populated["last_tid"]}')
    return populated


def copy_seed(seed_dir, d):
    os.makedirs(d, exist_ok=True)
    for name in ('Data.fs', 'Data.fs.index'):
        src = os.path.join(seed_dir, name)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(d, name))


def catchup(procs, args, settings, tmp, certs, seed_dir, populated):
    primary = Node('primary', os.path.join(tmp, 'cu-primary'))
    copy_seed(seed_dir, primary.dir)
    start_runzeo(procs, primary)
    with zeoraw.connect(HOST, primary.zeo_port) as c:
        last = c.call('lastTransaction').hex()
    if last != populated['last_tid']:
        raise RuntimeError(f'copied history ends at {last}, expected '
                           f'{populated["last_tid"]}')
    start_zrelay(procs, args, primary, certs, 'primary')

    rounds = []
    for r in range(settings.rounds):
        # Catch-up through the stream.
        replica = Node('replica', os.path.join(tmp, f'cu-replica{r}'))
        start_runzeo(procs, replica)
        meter_pids = {'primary runzeo': primary.zeo.pid,
                      'primary zrelay': primary.zrelay.pid,
                      'replica runzeo': replica.zeo.pid}
        t_spawn = time.monotonic()
        busy0 = P.system_busy_seconds()
        cpu0 = {n: P.pid_cpu_seconds(p) for n, p in meter_pids.items()}
        start_zrelay(procs, args, replica, certs, 'replica',
                     upstream=primary.repl_port, wait=False)
        meter_pids['replica zrelay'] = replica.zrelay.pid
        cpu0['replica zrelay'] = 0.0
        t_first = None
        deadline = t_spawn + args.catchup_timeout
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f'catch-up not done in '
                                   f'{args.catchup_timeout:.0f}s; log:\n'
                                   f'{P.tail(replica.zrelay.log_path)}')
            if not replica.zrelay.alive():
                raise RuntimeError(f'replica zrelay died; log:\n'
                                   f'{P.tail(replica.zrelay.log_path)}')
            try:
                st = status(replica.admin_port) \
                    if P.listening(replica.admin_port) else None
            except (OSError, ValueError):
                st = None
            up = (st or {}).get('upstream') or {}
            applied = up.get('applied_tid')
            if applied and t_first is None:
                t_first = time.monotonic()
            if applied == last:
                t_done = time.monotonic()
                break
            time.sleep(0.02)
        dt = t_done - t_spawn
        cpu_s = {n: P.pid_cpu_seconds(p) - cpu0[n]
                 for n, p in meter_pids.items()}
        cores = {n: v / dt for n, v in cpu_s.items()}
        other = max(0.0, (P.system_busy_seconds() - busy0) / dt
                    - sum(cores.values()))
        m = metrics(replica.admin_port)
        n_applied = m.get('zrelay_replication_applied_transactions_total', 0)
        b_applied = m.get('zrelay_replication_applied_bytes_total', 0)
        apply_mean = (m.get('zrelay_replication_apply_duration_seconds_sum', 0)
                      / n_applied * 1e3) if n_applied else float('nan')
        res = {'seconds': dt, 'txns': n_applied, 'bytes': b_applied,
               'txn_s': n_applied / dt, 'MB_s': b_applied / dt / 1e6,
               'first_applied_s': (t_first - t_spawn) if t_first else None,
               'apply_mean_ms': apply_mean, 'cpu': cores,
               'replica_runzeo_ms_per_txn':
                   cpu_s['replica runzeo'] / max(n_applied, 1) * 1e3,
               'other_cores': other}
        log(f'catch-up round {r + 1}: {n_applied:.0f} txns in {dt:.2f} s = '
            f'{res["txn_s"]:.0f} txn/s, {res["MB_s"]:.1f} MB/s; cpu '
            + ', '.join(f'{k} {v:.2f}' for k, v in cores.items())
            + f'; other {other:.2f}')
        if n_applied != populated['txns']:
            log(f'note: replica applied {n_applied:.0f} transactions, the '
                f'primary has {populated["txns"]}')
        stop_node(procs, replica)
        shutil.rmtree(replica.dir, ignore_errors=True)

        # The ceiling: bench-restore into a fresh empty runzeo.
        target = Node('target', os.path.join(tmp, f'cu-target{r}'))
        start_runzeo(procs, target)
        out_path = os.path.join(tmp, f'bench-restore{r}.out')
        zeo_cpu0 = P.pid_cpu_seconds(target.zeo.pid)
        br = procs.spawn('bench-restore',
                         [args.zrelay, 'bench-restore',
                          '--source', f'{HOST}:{primary.zeo_port}',
                          '--target', f'{HOST}:{target.zeo_port}'],
                         out_path, cwd=tmp)
        try:
            rc = br.popen.wait(args.catchup_timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError('bench-restore did not finish in '
                               f'{args.catchup_timeout:.0f}s')
        zeo_cpu = P.pid_cpu_seconds(target.zeo.pid) - zeo_cpu0
        procs.stop(br)
        with open(out_path, errors='replace') as f:
            text = f.read()
        lines = [ln for ln in text.splitlines() if ln.startswith('{')]
        if rc != 0 or not lines:
            raise RuntimeError(f'bench-restore failed ({rc}):\n{text[-2000:]}')
        ceil = json.loads(lines[-1])
        ceil['MB_s'] = ceil['bytes'] / ceil['apply_seconds'] / 1e6
        # The target runzeo is idle while the history is read.
        ceil['target_runzeo_cores'] = zeo_cpu / max(ceil['apply_seconds'],
                                                    1e-9)
        ceil['target_runzeo_ms_per_txn'] = (zeo_cpu
                                            / max(ceil['transactions'], 1)
                                            * 1e3)
        log(f'bench-restore round {r + 1}: read {ceil["read_txn_per_sec"]:.0f}'
            f' txn/s, apply {ceil["apply_txn_per_sec"]:.0f} txn/s '
            f'({ceil["MB_s"]:.1f} MB/s); target runzeo ~'
            f'{ceil["target_runzeo_cores"]:.2f} cores while applying')
        stop_node(procs, target)
        shutil.rmtree(target.dir, ignore_errors=True)
        rounds.append((res, ceil))
    stop_node(procs, primary)
    shutil.rmtree(primary.dir, ignore_errors=True)
    return rounds


def fsync_probe(d, n=200, size=2500):
    """p50/p99 (ms) of fsync after appending *size* bytes, in directory *d*."""
    path = os.path.join(d, 'fsync-probe')
    lat = []
    with open(path, 'wb') as f:
        for _ in range(n):
            f.write(os.urandom(size))
            f.flush()
            t = time.perf_counter()
            os.fsync(f.fileno())
            lat.append(time.perf_counter() - t)
    os.unlink(path)
    lat.sort()
    return P.percentile(lat, 50) * 1e3, P.percentile(lat, 99) * 1e3


# ------------------------------------------------------------- reporting ----

def f2(v):
    return '–' if v is None or v != v else f'{v:.2f}'


def fnum(v):
    return '–' if v != v else (f'{v:.0f}' if abs(v) >= 100 else f'{v:.1f}')


def load_label(r):
    if r['rate']:
        return f'{r["rate"]:g} txn/s, 1 writer'
    return f'max rate, {r["writers"]} writer' + ('s' if r['writers'] > 1
                                                 else '')


def verdicts_of(v):
    """[(name, ok)] for the targets, from one variant's results."""
    out = []
    for r in v['lag']:
        if r['rate']:
            out.append((f'lag p99 ≤ {TARGET_LAG_P99_MS} ms',
                        r['replica']['p99'] <= TARGET_LAG_P99_MS))
    for name, ratio, target, ok in relative_to_floors(v):
        out.append((f'{name} {target}', ok))
    if v['rounds']:
        s = catchup_summary(v['rounds'])
        out.append((f'catch-up ≥ {TARGET_CATCHUP_TXN_S:.0f} txn/s',
                    s['txn_s'] >= TARGET_CATCHUP_TXN_S))
        out.append((f'catch-up ≥ {TARGET_CATCHUP_RATIO * 100:.0f} % of '
                    f'ceiling', s['ratio'] >= TARGET_CATCHUP_RATIO))
    return out


def relative_to_floors(v):
    """[(name, ratio, target, ok)]: issue 11's goals, each a ratio to what
    the same run measured without replication (bare runzeo, or the primary
    zrelay with no replica connected)."""
    out = []
    steady = next((r for r in v['lag'] if r['rate']), None)
    max1 = next((r for r in v['lag'] if not r['rate'] and r['writers'] == 1),
                None)
    alone = v.get('alone')
    if steady and v['bare']:
        x = steady['replica']['p99'] / v['bare'][0]['p50']
        out.append(('lag p99 ÷ bare commit p50', x,
                    f'≤ {TARGET_LAG_VS_BARE:g}×', x <= TARGET_LAG_VS_BARE))
    if max1 and alone:
        x = max1['txn_s'] / alone['txn_s']
        out.append(('max-rate txn/s, replica streaming ÷ none', x,
                    f'≥ {TARGET_FLAT_OUT:g}×', x >= TARGET_FLAT_OUT))
        x = per_txn(max1, 'primary runzeo') / alone['cpu_ms_per_txn']
        out.append(('primary runzeo CPU per commit, replica streaming ÷ none',
                    x, f'≤ {TARGET_PRIMARY_CPU:g}×', x <= TARGET_PRIMARY_CPU))
    return out


def catchup_summary(rounds):
    return {
        'txn_s': statistics.median(r['txn_s'] for r, _ in rounds),
        'MB_s': statistics.median(r['MB_s'] for r, _ in rounds),
        'ceil': statistics.median(c['apply_txn_per_sec'] for _, c in rounds),
        'ceil_MB_s': statistics.median(c['MB_s'] for _, c in rounds),
        'ratio': statistics.median(r['txn_s'] / c['apply_txn_per_sec']
                                   for r, c in rounds),
    }


def per_txn(r, name):
    """CPU milliseconds *name* used per transaction in lag run *r*."""
    return r['cpu'][name] / r['txn_s'] * 1e3 if r['txn_s'] else float('nan')


def render_summary(variants, populated):
    names = [v['name'] for v in variants]
    out = ['| measurement | ' + ' | '.join(names) + ' | target |',
           '|---|' + '---:|' * len(names) + '---|']

    def row(label, cells, target=''):
        out.append(f'| {label} | ' + ' | '.join(cells) + f' | {target} |')

    row('fsync after a 2.5 KB append, p50 / p99 (ms)',
        [f'{f2(v["fsync"][0])} / {f2(v["fsync"][1])}' for v in variants])
    if any(v['bare'] for v in variants):
        def bare(v, i, fmt):
            return fmt(v['bare'][i]) if len(v['bare']) > i else '–'
        row(f'bare runzeo (no zrelay), 1 writer at '
            f'{variants[0]["bare"][0]["rate"]:g} txn/s: commit p50 / p99 '
            f'(ms); runzeo CPU per commit (ms)',
            [bare(v, 0, lambda b: f'{f2(b["p50"])} / {f2(b["p99"])}; '
                                  f'{f2(b["cpu_ms_per_txn"])}')
             for v in variants])
        row('bare runzeo (no zrelay), 1 writer as fast as it can: txn/s; '
            'runzeo CPU per commit (ms)',
            [bare(v, 1, lambda b: f'{fnum(b["txn_s"])}; '
                                  f'{f2(b["cpu_ms_per_txn"])}')
             for v in variants])
    if any(v.get('alone') for v in variants):
        row('primary zrelay with **no replica connected**, 1 writer as fast '
            'as it can: txn/s; CPU per commit (ms): runzeo / zrelay',
            [f'{fnum(a["txn_s"])}; {f2(a["cpu_ms_per_txn"])} / '
             f'{f2(a["zrelay_ms_per_txn"])}' if a else '–'
             for a in (v.get('alone') for v in variants)])
    lag_labels = []
    for v in variants:
        for r in v['lag']:
            if r['label'] not in [x[0] for x in lag_labels]:
                lag_labels.append((r['label'], load_label(r), r['rate']))
    for label, title, rate in lag_labels:
        rs = [next((r for r in v['lag'] if r['label'] == label), None)
              for v in variants]
        if rate:
            row(f'{title}: lag at a client of the **replica**, p50 / p99 / '
                f'max (ms)',
                [f'{f2(r["replica"]["p50"])} / **{f2(r["replica"]["p99"])}** '
                 f'/ {f2(r["replica"]["max"])}' if r else '–' for r in rs],
                f'p99 ≤ {TARGET_LAG_P99_MS} ms')
            row(f'{title}: lag at another client of the primary (baseline), '
                f'p50 / p99 / max (ms)',
                [f'{f2(r["primary"]["p50"])} / {f2(r["primary"]["p99"])} / '
                 f'{f2(r["primary"]["max"])}' if r else '–' for r in rs])
            row(f'{title}: writer\'s commit p50 / p99 (ms)',
                [f'{f2(r["commit_p50_ms"])} / {f2(r["commit_p99_ms"])}'
                 if r else '–' for r in rs])
        else:
            row(f'{title}: primary txn/s; replica lag p50 / p99 (ms); '
                f'primary runzeo CPU per commit (ms)',
                [f'{fnum(r["txn_s"])}; {f2(r["replica"]["p50"])} / '
                 f'{f2(r["replica"]["p99"])}; '
                 f'{f2(per_txn(r, "primary runzeo"))}' if r else '–'
                 for r in rs])
    names = []
    for v in variants:
        for name, _, target, _ in relative_to_floors(v):
            if name not in [n for n, _ in names]:
                names.append((name, target))
    for name, target in names:
        cells = []
        for v in variants:
            got = [x for n, x, _, _ in relative_to_floors(v) if n == name]
            cells.append(f'**{got[0]:.2f}×**' if got else '–')
        row(name, cells, target)
    if any(v['rounds'] for v in variants):
        sums = [catchup_summary(v['rounds']) if v['rounds'] else None
                for v in variants]
        row(f'catch-up of an empty replica ({populated["txns"]} txns, '
            f'{populated["bytes"] / 1e6:.0f} MB): txn/s (MB/s)',
            [f'**{s["txn_s"]:.0f}** ({s["MB_s"]:.1f})' if s else '–'
             for s in sums], f'≥ {TARGET_CATCHUP_TXN_S:.0f} txn/s')
        row('ceiling: `bench-restore` apply txn/s (MB/s)',
            [f'{s["ceil"]:.0f} ({s["ceil_MB_s"]:.1f})' if s else '–'
             for s in sums])
        row('catch-up / ceiling',
            [f'**{s["ratio"] * 100:.0f} %**' if s else '–' for s in sums],
            f'≥ {TARGET_CATCHUP_RATIO * 100:.0f} %')
    cells = []
    for v in variants:
        vs = verdicts_of(v)
        missed = [n for n, ok in vs if not ok]
        cells.append(f'{sum(ok for _, ok in vs)}/{len(vs)}'
                     + (' (missed: ' + '; '.join(missed) + ')' if missed
                        else ''))
    row('targets met', cells)
    return '\n'.join(out)


STAGE_ROWS = ([('client_finish', "writer: tpc_finish returned")]
              + [(st, what) for st, _, what in STAGES[:5]]
              + [('client_primary', "client of the primary: invalidation "
                  "arrived")]
              + [(st, what) for st, _, what in STAGES[5:]]
              + [('client_replica', "client of the replica: invalidation "
                  "arrived")])


def stage_rows(stages):
    return [(k, stages[k]) for k, _ in STAGE_ROWS if k in stages]


def render_stages(v):
    """Table: the steady run's stages, per-stage p50/p99 and the step."""
    r = next((r for r in v['lag'] if r['rate'] and r.get('stages')), None)
    if not r:
        return []
    st = r['stages']
    out = [f'Where the lag goes at {load_label(r)}: each stage as the age '
           'of the transaction when it passed it (ms since its tid\'s '
           'timestamp, set by the primary\'s runzeo at vote; zrelay '
           '`zrelay_replication_stage_seconds`, quantiles interpolated in '
           '100 µs buckets; client rows exact). Step = p50 minus the '
           'previous replication stage\'s p50:', '',
           '| stage | p50 | p99 | step (p50) |', '|---|---:|---:|---:|']
    prev = None
    for k, what in STAGE_ROWS:
        if k not in st:
            continue
        p50, p99, _ = st[k]
        side = k == 'client_primary'
        step = '' if prev is None or side else f'{p50 - prev:+.2f}'
        out.append(f'| {what} | {f2(p50)} | {f2(p99)} | {step} |')
        if not side:
            prev = p50
    out.append('')
    return out


def render_variant(v, populated):
    out = [f'### {v["name"]}: data in {v["fs"]}', '']
    out.append(f'fsync after a 2.5 KB append there: p50 {f2(v["fsync"][0])} '
               f'ms, p99 {f2(v["fsync"][1])} ms (FileStorage fsyncs every '
               f'commit).')
    out.append('')
    for b in v['bare']:
        out.append(f'- bare runzeo (no zrelay), 1 writer '
                   + (f'at {b["rate"]:g} txn/s' if b['rate']
                      else 'as fast as it can')
                   + f': {b["txns"]} commits, {fnum(b["txn_s"])} txn/s, '
                   f'commit p50 {f2(b["p50"])} ms, p99 {f2(b["p99"])} ms, '
                   f'runzeo CPU {f2(b["cpu_ms_per_txn"])} ms per commit')
    a = v.get('alone')
    if a:
        out.append(f'- primary zrelay (role primary) with no replica '
                   f'connected, 1 writer as fast as it can through it: '
                   f'{a["txns"]} commits, {fnum(a["txn_s"])} txn/s, commit '
                   f'p50 {f2(a["p50"])} ms, p99 {f2(a["p99"])} ms; CPU per '
                   f'commit: runzeo {f2(a["cpu_ms_per_txn"])} ms, zrelay '
                   f'{f2(a["zrelay_ms_per_txn"])} ms')
    if v['bare'] or a:
        out.append('')
    if v['lag']:
        out.append('Lag = invalidation arrival − the writer\'s `tpc_finish` '
                   'return, per transaction (ms):')
        out.append('')
        out.append('| load | commits | primary txn/s | commit p50 / p99 | '
                   'client of the primary p50 / p99 / max | '
                   'client of the replica p50 / p99 / max | '
                   'replica − primary client p50 / p99 | replica apply, mean '
                   '| replica drained after last commit |')
        out.append('|---|---:|---:|---:|---:|---:|---:|---:|---:|')
        for r in v['lag']:
            p, q = r['primary'], r['replica']
            out.append(
                f'| {load_label(r)} | {r["txns"]} | {fnum(r["txn_s"])} | '
                f'{f2(r["commit_p50_ms"])} / {f2(r["commit_p99_ms"])} | '
                f'{f2(p["p50"])} / {f2(p["p99"])} / {f2(p["max"])} | '
                f'{f2(q["p50"])} / {f2(q["p99"])} / {f2(q["max"])} | '
                f'{f2(r["hop"]["p50"])} / {f2(r["hop"]["p99"])} | '
                f'{f2(r["apply_mean_ms"])} | {fnum(r["drain_ms"])} |')
        out.append('')
        out.append('CPU used meanwhile, in cores (of '
                   f'{len(os.sched_getaffinity(0))}):')
        out.append('')
        names = list(v['lag'][0]['cpu'].keys())
        per_names = ('primary runzeo', 'primary zrelay', 'replica runzeo',
                     'replica zrelay')
        out.append('| load | ' + ' | '.join(names) + ' | other processes | '
                   'CPU per transaction (ms): ' + ' / '.join(per_names)
                   + ' |')
        out.append('|---|' + '---:|' * (len(names) + 2))
        for r in v['lag']:
            out.append(f'| {load_label(r)} | '
                       + ' | '.join(f2(r['cpu'][n]) for n in names)
                       + f' | {f2(r["other_cores"])} | '
                       + ' / '.join(f2(per_txn(r, n)) for n in per_names)
                       + ' |')
        out.append('')
        oids = [f'{r["replica"]["with_oids"]}/{r["replica"]["n"]}'
                for r in v['lag']]
        out.append('Invalidations received by the replica\'s client carrying '
                   'the real oids (rewritten by the replica zrelay): '
                   + ', '.join(oids) + '.')
        cap = [f'{r["captured"]:.0f}/{r["published"]:.0f}' for r in v['lag']]
        out.append('Commits the primary published from its capture (not read '
                   'back from its backend), of all it published: '
                   + ', '.join(cap) + '.')
        out.append('')
        out.extend(render_stages(v))
    if v['rounds']:
        out.append(f'Catch-up of an empty replica: {populated["txns"]} '
                   f'transactions, {populated["bytes"] / 1e6:.1f} MB of '
                   f'records (Data.fs {populated["data_fs"] / 1e6:.1f} MB, '
                   f'written in-process into a FileStorage by the fixture, '
                   f'no ZEO server, fsync off, at '
                   f'{populated["txns"] / populated["seconds"]:.0f} txn/s); '
                   f'rounds alternate catch-up and ceiling:')
        out.append('')
        out.append('| round | catch-up s | catch-up txn/s | MB/s | ceiling '
                   '(bench-restore apply) txn/s | MB/s | catch-up / ceiling '
                   '| replica runzeo CPU per txn: catch-up / ceiling (ms) |')
        out.append('|---|---:|---:|---:|---:|---:|---:|---:|')
        for i, (res, ceil) in enumerate(v['rounds']):
            ratio = res['txn_s'] / ceil['apply_txn_per_sec']
            out.append(
                f'| {i + 1} | {res["seconds"]:.2f} | {res["txn_s"]:.0f} | '
                f'{res["MB_s"]:.1f} | {ceil["apply_txn_per_sec"]:.0f} | '
                f'{ceil["MB_s"]:.1f} | {ratio * 100:.0f} % | '
                f'{f2(res["replica_runzeo_ms_per_txn"])} / '
                f'{f2(ceil["target_runzeo_ms_per_txn"])} |')
        out.append('')
        for i, (res, ceil) in enumerate(v['rounds']):
            out.append(
                f'- round {i + 1}: CPU during catch-up, in cores: '
                + ', '.join(f'{k} {v_:.2f}' for k, v_ in res['cpu'].items())
                + f', other processes {res["other_cores"]:.2f}; replica apply '
                f'mean {f2(res["apply_mean_ms"])} ms/txn; first transaction '
                f'applied {f2(res["first_applied_s"])} s after the replica '
                f'zrelay was spawned. bench-restore: history read at '
                f'{ceil["read_txn_per_sec"]:.0f} txn/s, applied at '
                f'{ceil["apply_txn_per_sec"]:.0f} txn/s, target runzeo at '
                f'{ceil["target_runzeo_cores"]:.2f} cores while applying')
        out.append('')
    return '\n'.join(out)


def render(variants, populated, settings, args, wall, notes):
    parts = [render_summary(variants, populated), '']
    for v in variants:
        parts.append(render_variant(v, populated))
    parts.append(
        f'Settings: steady run {settings.lag_seconds:g} s at '
        f'{settings.rate:g} txn/s, max-rate runs {settings.max_seconds:g} s '
        f'each, catch-up history {settings.pop_txns} × ~'
        f'{settings.pop_bytes} B, {settings.rounds} catch-up/ceiling '
        f'round(s) per storage' + ('; --quick (a smoke run, not numbers)'
                                   if args.quick else '')
        + f'. Total {wall:.0f} s.' + ''.join(' ' + n for n in notes))
    return '\n'.join(parts)


def machine_info(args):
    return P.machine_info(['ZEO', 'ZODB']) + [
        P.zrelay_line(args.zrelay),
        ('primary commits', 'read back from the backend (--no-capture)'
         if args.no_capture else 'captured when provably exact, else read '
         'back (see zrelay_replication_capture_total)'),
        ('CPUs', 'primary side (writers, primary or bare runzeo + zrelay) '
         'pinned to CPU 0, replica side (replica runzeo + zrelay, watcher) '
         'to CPU 1 (--pin)' if getattr(args, 'pin', False)
         else 'not pinned: every process may '
         'run on any CPU')]


# ------------------------------------------------------------------ main ----

def other_bench_running():
    try:
        out = subprocess.run(['pgrep', '-f', 'bench/bench.py'],
                             capture_output=True, text=True, timeout=10)
        return [int(p) for p in out.stdout.split()
                if int(p) != os.getpid()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def wait_for_other_bench(seconds):
    """Wait (bounded) until no bench/bench.py runs; return a note or ''."""
    if not other_bench_running():
        return ''
    if seconds:
        deadline = time.monotonic() + seconds
        log(f'bench/bench.py is running; waiting up to {seconds:.0f} s for it')
        while time.monotonic() < deadline:
            time.sleep(10)
            if not other_bench_running():
                log('bench/bench.py finished')
                return ''
        log('bench/bench.py still running; measuring anyway')
        return (f'bench/bench.py was still running after a {seconds:.0f} s '
                f'wait: measured alongside it.')
    return 'bench/bench.py was running at the start: measured alongside it.'


def fs_type(d):
    """Filesystem type of directory *d* (from /proc/mounts)."""
    best, kind = '', 'unknown'
    try:
        real = os.path.realpath(d)
        with open('/proc/mounts') as f:
            for line in f:
                fields = line.split()
                mnt = fields[1]
                if (real == mnt or real.startswith(mnt.rstrip('/') + '/')) \
                        and len(mnt) >= len(best):
                    best, kind = mnt, fields[2]
    except OSError:
        pass
    return kind


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description='Replication benchmark: lag and catch-up of a zrelay '
                    'primary/replica pair (see docs/benchmarks.md).')
    ap.add_argument('--zrelay', default=os.path.join(REPO, 'target', 'release',
                                                     'zrelay'))
    ap.add_argument('--quick', action='store_true',
                    help='small counts and short runs: a smoke run (~1 min)')
    ap.add_argument('--storage', choices=('disk', 'tmpfs', 'both'),
                    default='both',
                    help='where the FileStorages live: a temporary directory '
                         'on disk (--disk-dir), in tmpfs (--tmpfs-dir, no '
                         'fsync cost), or both in turn (default)')
    ap.add_argument('--disk-dir', default=tempfile.gettempdir())
    ap.add_argument('--tmpfs-dir', default='/dev/shm')
    ap.add_argument('--rate', type=float, default=100.0,
                    help='steady commit rate of the lag run (default 100)')
    ap.add_argument('--lag-seconds', type=float, default=0,
                    help='duration of the steady-rate run (default 15)')
    ap.add_argument('--max-seconds', type=float, default=0,
                    help='duration of each max-rate run (default 5)')
    ap.add_argument('--txns', type=int, default=0,
                    help='catch-up history: transactions (default 20000)')
    ap.add_argument('--txn-bytes', type=int, default=2500,
                    help='catch-up history: record bytes per transaction')
    ap.add_argument('--rounds', type=int, default=0,
                    help='catch-up + ceiling rounds per storage (default 2)')
    ap.add_argument('--catchup-timeout', type=float, default=300.0)
    ap.add_argument('--only', choices=('lag', 'catchup'), default=None)
    ap.add_argument('--wait-other-bench', type=float, default=0,
                    metavar='SECONDS',
                    help='first wait up to SECONDS while bench/bench.py runs')
    ap.add_argument('--zrelay-log-level', default='warn')
    ap.add_argument('--no-capture', action='store_true',
                    help='primary reads every commit back from its backend '
                         '(capture_max_bytes = 0) instead of publishing the '
                         "client's own commit when provably exact")
    ap.add_argument('--pin', action='store_true',
                    help='pin the primary side (writers, primary runzeo and '
                         'zrelay, bare runzeo) to CPU 0 and the replica side '
                         '(replica runzeo and zrelay, watcher) to CPU 1: a '
                         'replica on its own host, as deployed')
    ap.add_argument('--out', default=os.path.join(HERE,
                                                  'repl-results-latest.md'))
    ap.add_argument('--keep', action='store_true',
                    help='keep the temporary directories (data and logs)')
    args = ap.parse_args(argv)
    args.zrelay = os.path.abspath(args.zrelay)
    if not os.access(args.zrelay, os.X_OK):
        ap.error(f'no zrelay binary at {args.zrelay} (cargo build --release)')
    if args.storage in ('tmpfs', 'both') and not os.path.isdir(args.tmpfs_dir):
        ap.error(f'no directory {args.tmpfs_dir} (use --tmpfs-dir or '
                 f'--storage disk)')
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = Settings(args)
    if args.pin:
        PIN.update(primary={0}, replica={1})
    notes = [n for n in [wait_for_other_bench(args.wait_other_bench)] if n]
    storages = {'disk': [('disk', args.disk_dir)],
                'tmpfs': [('tmpfs', args.tmpfs_dir)],
                'both': [('disk', args.disk_dir),
                         ('tmpfs', args.tmpfs_dir)]}[args.storage]
    procs = P.Procs()
    registry = []
    tmps = []
    failed = False
    variants = []
    populated = None
    try:
        tmp = tempfile.mkdtemp(prefix='zrelay-repl-bench-')
        tmps.append(tmp)
        certs = os.path.join(tmp, 'certs')
        subprocess.run([args.zrelay, 'cert', '--dir', certs, 'primary',
                        'replica'], check=True, capture_output=True,
                       timeout=60)
        if args.only in (None, 'catchup'):
            # The history is written once and copied for each storage.
            seed_base = storages[-1][1]
            seed_tmp = tempfile.mkdtemp(prefix='zrelay-repl-seed-',
                                        dir=seed_base)
            tmps.append(seed_tmp)
            seed_dir = os.path.join(seed_tmp, 'seed')
            populated = populate_seed(registry, settings, seed_dir)
        for name, base in storages:
            vtmp = tempfile.mkdtemp(prefix=f'zrelay-repl-{name}-', dir=base)
            tmps.append(vtmp)
            v = {'name': name, 'dir': vtmp, 'lag': [], 'rounds': [],
                 'bare': [],
                 'fs': f'`{base}` ({fs_type(vtmp)})',
                 'fsync': fsync_probe(vtmp)}
            log(f'{name}: data in {vtmp} ({fs_type(vtmp)}); fsync p50 '
                f'{v["fsync"][0]:.3f} ms, p99 {v["fsync"][1]:.3f} ms')
            if args.only in (None, 'lag'):
                v['bare'] = bare_runs(procs, registry, vtmp, settings)
                log(f'{name}: starting primary + replica (runzeo + zrelay '
                    f'each)')
                primary, replica, alone = start_pair(
                    procs, registry, args, settings, vtmp, certs, 'lag')
                v['alone'] = alone
                v['lag'].append(lag_run(registry, vtmp, primary, replica,
                                        'steady', 1, settings.rate,
                                        settings.lag_seconds))
                for n in (1, 4):
                    v['lag'].append(lag_run(registry, vtmp, primary, replica,
                                            f'max{n}', n, 0,
                                            settings.max_seconds))
                for node in (replica, primary):
                    if not node.zrelay.alive():
                        raise RuntimeError(f'{node.zrelay.name} died; log:\n'
                                           f'{P.tail(node.zrelay.log_path)}')
                    stop_node(procs, node)
                    shutil.rmtree(node.dir, ignore_errors=True)
            if populated:
                v['rounds'] = catchup(procs, args, settings, vtmp, certs,
                                      seed_dir, populated)
            variants.append(v)
        if other_bench_running() and not notes:
            notes.append('bench/bench.py was running at the end: measured '
                         'alongside it.')
        info = machine_info(args)
    except Exception:
        failed = True
        raise
    finally:
        for ch in registry:
            ch.kill()
        procs.stop_all()
        for t in tmps:
            if args.keep or (failed and not t.startswith(args.tmpfs_dir)):
                log(f'kept {t} (data and logs)')
            else:
                shutil.rmtree(t, ignore_errors=True)

    if populated is None:
        populated = {'txns': 0, 'bytes': 0, 'data_fs': 0}
    body = render(variants, populated, settings, args, time.monotonic() - T0,
                  notes)
    print(body)
    if args.out:
        P.write_results(args.out, 'replication benchmark', 'repl_bench.py',
                        'Replication', info, body)
        log(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    P.run_main(main, 'repl_bench', (zeoraw.ProtocolError, zeoraw.ServerError))
