#!/usr/bin/env python3
"""Memory benchmark: a primary zrelay's RSS with many sessions and two
replicas, and while one replica stops reading.

Everything runs on 127.0.0.1 in a temporary directory (removed at the end):
three unmodified ``runzeo`` (FileStorage, pickle), a primary zrelay and two
replica zrelays streaming from it over mutual TLS (``zrelay cert``).

1. **Sessions**: 100 idle sessions (registered raw connections that send
   nothing) and 20 busy ones (``bench/repl_clients.py writer`` processes at a
   fixed rate each) on the primary, both replicas streaming; the primary
   zrelay's VmRSS is sampled every 0.25 s.
2. **A stopped replica**: one replica zrelay gets SIGSTOP and the writers
   commit as fast as they can for ``--stop-seconds`` (default 60 s). Its
   stream stops being read: the primary's per-replica live queue fills and
   falls back to reading history, so RSS must stay bounded. The peak VmRSS
   and VmHWM are reported; then SIGCONT and the time the replica takes to
   catch up.

Prints a markdown report (also ``bench/mem-results-latest.md``); progress on
stderr. A benchmark, not a test: it fails only if something does not work.
Every loop is bounded in count and time; every child is stopped by its PID.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procs as P          # noqa: E402
import repl_bench as R     # noqa: E402
import zeoraw              # noqa: E402

HOST = P.HOST
TARGET_RSS_MIB = 50.0

T0 = time.monotonic()


def log(msg):
    print(f'[{time.monotonic() - T0:6.1f}s] {msg}', file=sys.stderr,
          flush=True)


def rss_kib(pid):
    """(VmRSS, VmHWM) in KiB."""
    out = {}
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                k, _, v = line.partition(':')
                if k in ('VmRSS', 'VmHWM'):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out.get('VmRSS', 0), out.get('VmHWM', 0)


class Sampler:
    """Samples a process's VmRSS in a thread; keeps the maximum."""

    def __init__(self, pid, every=0.25):
        self.pid, self.every = pid, every
        self.max_rss = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss, _ = rss_kib(self.pid)
            self.max_rss = max(self.max_rss, rss)
            self.samples += 1
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)


def start_zrelay(procs, args, node, certs, role, cert, upstream=None):
    node.client_port = P.free_port()
    node.admin_port = P.free_port()
    lines = [f'node_name = "{node.name}"', 'log_level = "warn"',
             '[client]', f'listen = "{HOST}:{node.client_port}"',
             '[backend]', f'address = "{HOST}:{node.zeo_port}"',
             '[admin]', f'listen = "{HOST}:{node.admin_port}"',
             '[replication]', f'role = "{role}"']
    if role == 'primary':
        node.repl_port = P.free_port()
        lines += [f'listen = "{HOST}:{node.repl_port}"']
    else:
        lines += [f'upstream = "{HOST}:{upstream}"',
                  'upstream_name = "primary"']
    lines += ['[replication.tls]', f'ca_file = "{certs}/ca.pem"',
              f'cert_file = "{certs}/{cert}.pem"',
              f'key_file = "{certs}/{cert}-key.pem"']
    conf = os.path.join(node.dir, 'zrelay.toml')
    with open(conf, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    node.zrelay = procs.spawn(f'zrelay-{node.name}',
                              [args.zrelay, 'run', '--config', conf],
                              os.path.join(node.dir, 'zrelay.log'),
                              cwd=node.dir)
    node.zrelay.wait_port(node.client_port)
    node.zrelay.wait_port(node.admin_port)


def last_tid(port):
    with zeoraw.connect(HOST, port) as c:
        return c.call('lastTransaction').hex()


def writers(registry, tmp, port, n, rate, seconds, tag):
    out = []
    for w in range(n):
        argv = ['writer', '--port', str(port), '--seconds', str(seconds),
                '--warmup', '2', '--max-txns',
                str(int(max(rate, 2000) * seconds) + 10)]
        if rate:
            argv += ['--rate', str(rate)]
        out.append(R.Child(registry, f'writer{w}-{tag}', argv,
                           os.path.join(tmp, f'writer{w}-{tag}.log')))
    for wr in out:
        wr.expect('ready', 120)
    return out


def run_writers(ws, seconds):
    for wr in ws:
        wr.send('go')
    results = [wr.expect('result', seconds + 120) for wr in ws]
    for wr in ws:
        wr.finish()
    return sum(len(r['tids']) for r in results)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--zrelay', default=os.path.join(P.REPO, 'target',
                                                     'release', 'zrelay'))
    ap.add_argument('--idle', type=int, default=100)
    ap.add_argument('--busy', type=int, default=20)
    ap.add_argument('--busy-rate', type=float, default=10.0,
                    help='commits per second per busy session (default 10)')
    ap.add_argument('--busy-seconds', type=float, default=20.0)
    ap.add_argument('--stop-writers', type=int, default=4,
                    help='writers committing flat out while a replica is '
                         'stopped (default 4)')
    ap.add_argument('--stop-seconds', type=float, default=60.0)
    ap.add_argument('--quick', action='store_true',
                    help='10 idle, 4 busy, 5 s phases: a smoke run')
    ap.add_argument('--out', default=os.path.join(HERE,
                                                  'mem-results-latest.md'))
    args = ap.parse_args(argv)
    if args.quick:
        args.idle, args.busy = 10, 4
        args.busy_seconds = args.stop_seconds = 5.0
    args.zrelay = os.path.abspath(args.zrelay)
    if not os.access(args.zrelay, os.X_OK):
        ap.error(f'no zrelay binary at {args.zrelay}')
    return args


def main(argv=None):
    args = parse_args(argv)
    procs = P.Procs()
    registry = []
    idle = []
    tmp = tempfile.mkdtemp(prefix='zrelay-mem-bench-')
    failed = False
    stopped = None
    try:
        certs = os.path.join(tmp, 'certs')
        subprocess.run([args.zrelay, 'cert', '--dir', certs, 'primary',
                        'replica1', 'replica2'], check=True,
                       capture_output=True, timeout=60)
        primary = R.Node('primary', os.path.join(tmp, 'primary'))
        reps = [R.Node(f'replica{i}', os.path.join(tmp, f'replica{i}'))
                for i in (1, 2)]
        for n in [primary] + reps:
            R.start_runzeo(procs, n)
        start_zrelay(procs, args, primary, certs, 'primary', 'primary')
        rss_start = rss_kib(primary.zrelay.pid)[0]
        for r in reps:
            start_zrelay(procs, args, r, certs, 'replica', r.name,
                         upstream=primary.repl_port)
        for r in reps:
            R.wait_live(r)
        log(f'primary + 2 replicas up; primary zrelay RSS '
            f'{rss_start / 1024:.1f} MiB')

        # 1. sessions
        for _ in range(args.idle):
            idle.append(zeoraw.connect(HOST, primary.client_port))
        log(f'{args.idle} idle sessions open')
        ws = writers(registry, tmp, primary.client_port, args.busy,
                     args.busy_rate, args.busy_seconds, 'busy')
        with Sampler(primary.zrelay.pid) as s1:
            committed1 = run_writers(ws, args.busy_seconds)
        last = last_tid(primary.zeo_port)
        for r in reps:
            R.wait_live(r, want_tid=last, timeout=120)
        rss1, hwm1 = rss_kib(primary.zrelay.pid)
        rep_rss1 = [rss_kib(r.zrelay.pid)[0] for r in reps]
        log(f'phase 1: {committed1} commits; primary zrelay RSS max '
            f'{s1.max_rss / 1024:.1f} MiB, now {rss1 / 1024:.1f} MiB')

        # 2. one replica stopped under flat-out commits
        stopped = reps[1].zrelay
        os.kill(stopped.pid, signal.SIGSTOP)
        ws = writers(registry, tmp, primary.client_port, args.stop_writers,
                     0, args.stop_seconds, 'stop')
        with Sampler(primary.zrelay.pid) as s2:
            t = time.monotonic()
            committed2 = run_writers(ws, args.stop_seconds)
            stop_wall = time.monotonic() - t
        rss2, hwm2 = rss_kib(primary.zrelay.pid)
        last = last_tid(primary.zeo_port)
        os.kill(stopped.pid, signal.SIGCONT)
        stopped = None
        t = time.monotonic()
        R.wait_live(reps[1], want_tid=last, timeout=600)
        catchup = time.monotonic() - t
        R.wait_live(reps[0], want_tid=last, timeout=120)
        rss3 = rss_kib(primary.zrelay.pid)[0]
        log(f'phase 2: {committed2} commits in {stop_wall:.0f} s; primary '
            f'zrelay RSS max {s2.max_rss / 1024:.1f} MiB; replica2 caught '
            f'up {catchup:.1f} s after SIGCONT')
        for n in [primary] + reps:
            if not n.zrelay.alive():
                raise RuntimeError(f'{n.zrelay.name} died')
    except Exception:
        failed = True
        raise
    finally:
        if stopped is not None:
            try:
                os.kill(stopped.pid, signal.SIGCONT)
            except OSError:
                pass
        for c in idle:
            c.close()
        for ch in registry:
            ch.kill()
        procs.stop_all()
        if failed:
            log(f'kept {tmp}')
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    mib = lambda k: f'{k / 1024:.1f}'  # noqa: E731
    peak = max(s1.max_rss, hwm1) / 1024
    lines = [
        '| measurement | value | target |',
        '|---|---:|---|',
        f'| primary zrelay RSS at start (no session, no replica) | '
        f'{mib(rss_start)} MiB |  |',
        f'| {args.idle} idle + {args.busy} busy sessions ({args.busy_rate:g} '
        f'commits/s each, {committed1} commits), 2 replicas streaming: '
        f'primary zrelay RSS max / at end (MiB) | **{mib(s1.max_rss)}** / '
        f'{mib(rss1)} | ≤ {TARGET_RSS_MIB:.0f} MiB: '
        f'{"met" if peak <= TARGET_RSS_MIB else "MISSED"} |',
        f'| replica zrelays RSS after phase 1 (MiB) | '
        f'{" / ".join(mib(x) for x in rep_rss1)} |  |',
        f'| replica2 SIGSTOPped, {args.stop_writers} writers flat out for '
        f'{stop_wall:.0f} s ({committed2} commits): primary zrelay RSS max '
        f'/ VmHWM / at end (MiB) | **{mib(s2.max_rss)}** / {mib(hwm2)} / '
        f'{mib(rss2)} | bounded |',
        f'| replica2 caught up after SIGCONT (s); primary RSS then (MiB) | '
        f'{catchup:.1f}; {mib(rss3)} |  |',
    ]
    info = P.machine_info(['ZEO', 'ZODB']) + [P.zrelay_line(args.zrelay)]
    body = '\n'.join(lines)
    print(body)
    P.write_results(args.out, 'memory benchmark', 'mem_bench.py', 'Memory',
                    info, body)
    log(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    P.run_main(main, 'mem_bench', (zeoraw.ProtocolError,))
