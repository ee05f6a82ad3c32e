#!/usr/bin/env python3
"""Failover benchmark: how long after the primary dies a new primary takes
commits through a door, and what is lost.

Per run, on 127.0.0.1 in a temporary directory (removed at the end): one
etcd member (Debian ``etcd-server``, started here), three nodes ``a``, ``b``,
``c`` (runzeo + zrelay each, ``[coordinator]`` on that etcd, semi-sync
commits acknowledged at ``received`` with a spool on every node, every node
with a replication listener). ``a`` starts as the primary. Two raw ZEO 5
writers (``bench/repl_clients.py``'s ``Conn``, no ZODB client in the way)
commit one small object each, every ``--interval-ms``, through the doors of
``b`` and ``c``; after any error a writer reconnects (50 ms apart) and
continues from the stored revision of its object.

Then ``a``'s zrelay and runzeo are SIGKILLed together (the host dies) and,
per writer:

* **writable**: kill -> first commit acknowledged again through its door;
  the best of the two is "the new primary accepts a commit through a door";
* **no commits**: last acknowledged commit before the kill -> first after
  (how long that client could not commit);
* **lost**: acknowledged commits missing from the new primary (its stored
  counter is below the last acknowledged one; semi-sync: must be 0);
* **promoted**: kill -> a survivor's ``/status`` shows it primary holding
  the leader key.

Two settings: the defaults (``ttl_secs = 10``, ``loop_wait_secs = 2``,
``fence_margin_ms = 2000``) and a tight one (4 / 1 / 1000), ``--runs`` runs
each; median and max. Goal at the defaults: writable <= ttl + 2 s, 0 lost.
Prints a markdown table (also written to ``bench/failover-results-latest.md``).
A benchmark, not a test: it fails only if something does not work. Loops
are bounded in count and time; every child is stopped by its PID.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procs as P          # noqa: E402
import repl_bench as R     # noqa: E402
import repl_clients as RC  # noqa: E402
import zeoraw              # noqa: E402

SETTINGS = (
    ('default', 10, 2, 2000),
    ('tight', 4, 1, 1000),
)
NAMES = ('a', 'b', 'c')
clock = time.monotonic


class Node:
    def __init__(self, name, d):
        self.name = name
        self.dir = d
        self.zeo_port = P.free_port()
        self.client_port = P.free_port()
        self.admin_port = P.free_port()
        self.repl_port = P.free_port()
        self.zeo = self.zrelay = None


def start_etcd(procs, tmp):
    client, peer = P.free_port(), P.free_port()
    url, purl = f'http://{P.HOST}:{client}', f'http://{P.HOST}:{peer}'
    env = {k: v for k, v in os.environ.items() if not k.startswith('ETCD_')}
    p = procs.spawn('etcd', [
        'etcd', '--name', 'm0', '--data-dir', os.path.join(tmp, 'etcd'),
        '--listen-client-urls', url, '--advertise-client-urls', url,
        '--listen-peer-urls', purl, '--initial-advertise-peer-urls', purl,
        '--initial-cluster', f'm0={purl}', '--initial-cluster-state', 'new',
        '--log-level', 'warn'], os.path.join(tmp, 'etcd.log'), env=env)
    p.wait_port(client)
    return url


def start_node(procs, args, node, certs, etcd, cluster, setting, upstream):
    _, ttl, loop_wait, margin = setting
    os.makedirs(node.dir, exist_ok=True)
    conf = os.path.join(node.dir, 'zeo.conf')
    P.runzeo_conf(conf, node.zeo_port, node.dir, msgpack=False)
    node.zeo = procs.spawn(f'runzeo-{node.name}',
                           [sys.executable, '-m', 'ZEO.runzeo', '-C', conf],
                           os.path.join(node.dir, 'runzeo.out'), cwd=node.dir)
    node.zeo.wait_port(node.zeo_port)
    role = ['role = "primary"'] if upstream is None else [
        'role = "replica"', f'upstream = "{P.HOST}:{upstream}"',
        'upstream_name = "a"']
    lines = [f'node_name = "{node.name}"',
             f'log_level = "{args.zrelay_log_level}"',
             f'data_dir = "{os.path.join(node.dir, "state")}"',
             '[client]', f'listen = "{P.HOST}:{node.client_port}"',
             '[backend]', f'address = "{P.HOST}:{node.zeo_port}"',
             '[admin]', f'listen = "{P.HOST}:{node.admin_port}"',
             '[replication]', *role,
             f'listen = "{P.HOST}:{node.repl_port}"',
             'ack_mode = "semi-sync"', 'ack_level = "received"',
             f'data_dir = "{os.path.join(node.dir, "spool")}"',
             '[replication.tls]', f'ca_file = "{certs}/ca.pem"',
             f'cert_file = "{certs}/{node.name}.pem"',
             f'key_file = "{certs}/{node.name}-key.pem"',
             '[coordinator]', 'kind = "etcd"', f'endpoints = ["{etcd}"]',
             f'name = "{cluster}"', f'ttl_secs = {ttl}',
             f'loop_wait_secs = {loop_wait}', f'fence_margin_ms = {margin}']
    path = os.path.join(node.dir, 'zrelay.toml')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    node.zrelay = procs.spawn(f'zrelay-{node.name}',
                              [args.zrelay, 'run', '--config', path],
                              os.path.join(node.dir, 'zrelay.log'),
                              cwd=node.dir)
    node.zrelay.wait_port(node.client_port)
    node.zrelay.wait_port(node.admin_port)


def status(node):
    try:
        return R.status(node.admin_port)
    except (OSError, ValueError):
        return {}


def holding(node):
    st = status(node)
    return (st.get('role') == 'primary'
            and (st.get('coordinator') or {}).get('holding') is True)


def wait(cond, what, timeout):
    deadline = clock() + timeout
    while clock() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise RuntimeError(f'{what}: not within {timeout:.0f}s')


class Writer(threading.Thread):
    """Commits one object through one door until stopped; reconnects after
    any error and continues from the stored revision."""

    def __init__(self, name, port, interval, max_seconds):
        super().__init__(daemon=True)
        self.name, self.port, self.interval = name, port, interval
        self.deadline = clock() + max_seconds
        self.stop = threading.Event()
        self.acks = []        # (counter, commit started, acknowledged)
        self.lost = 0
        self.error = None
        self.pad = os.urandom(64)

    def counter(self, data):
        i = data.find(self.pad)
        return int.from_bytes(data[i + 64:i + 72], 'big') if i >= 0 else 0

    def run(self):
        oid, serial, n, txn = None, zeoraw.Z64, 0, 0
        c = None
        while not self.stop.is_set() and clock() < self.deadline:
            try:
                if c is None:
                    c = RC.Conn(P.HOST, self.port, timeout=2.0, encoding='Z')
                    c.register('1', False)
                    if oid is None:
                        oid = c.call('new_oids', 1)[0]
                    elif self.acks:
                        data, serial, _ = c.call('loadBefore', oid,
                                                 zeoraw.MAXTID)
                        stored = self.counter(data)
                        self.lost += max(0, self.acks[-1][0] - stored)
                        n = stored
                txn += 1
                started = clock()
                vid = c.next_msgid()
                data = RC.record(self.pad + (n + 1).to_bytes(8, 'big'))
                c.sock.sendall(
                    c.frame(0, True, 'tpc_begin', txn, b'', b'', {}, None,
                            ' ')
                    + c.frame(0, True, 'storea', oid, serial, data, txn)
                    + c.frame(vid, False, 'vote', txn))
                c.read_reply(vid)
                fid = c.next_msgid()
                c.sock.sendall(c.frame(fid, False, 'tpc_finish', txn))
                serial, _ = c.read_reply(fid)
                n += 1
                self.acks.append((n, started, clock()))
                time.sleep(self.interval)
            except (OSError, EOFError, zeoraw.ServerError,
                    zeoraw.ProtocolError, ValueError):
                if c is not None:
                    c.close()
                c = None
                time.sleep(0.05)
        if c is not None:
            c.close()


def one_run(procs, args, tmp, certs, etcd, setting, k):
    label, ttl = setting[0], setting[1]
    rdir = os.path.join(tmp, f'{label}-{k}')
    nodes = [Node(n, os.path.join(rdir, n)) for n in NAMES]
    cluster = f'bench-{label}-{k}'
    a, b, c = nodes
    start_node(procs, args, a, certs, etcd, cluster, setting, None)
    wait(lambda: holding(a), 'a holds the leader key', 60)
    for n in (b, c):
        start_node(procs, args, n, certs, etcd, cluster, setting, a.repl_port)
    for n in (b, c):
        wait(lambda: (status(n).get('upstream') or {}).get('state') == 'live'
             and (status(n).get('door') or {}).get('primary') == 'a',
             f'{n.name} follows a', 60)
    ws = [Writer(f'via-{n.name}', n.client_port, args.interval_ms / 1000,
                 ttl * 4 + 60) for n in (b, c)]
    for w in ws:
        w.start()
    wait(lambda: all(len(w.acks) >= 20 for w in ws), 'writers warm', 60)
    time.sleep(args.settle)
    t_kill = clock()
    for p in (a.zrelay, a.zeo):
        os.kill(p.pid, signal.SIGKILL)
    promoted = None
    deadline = t_kill + ttl * 3 + 30
    while clock() < deadline:
        if promoted is None and any(holding(n) for n in (b, c)):
            promoted = clock() - t_kill
        if promoted is not None and all(
                any(t0 > t_kill for _, t0, _ in w.acks) for w in ws):
            break
        time.sleep(0.02)
    time.sleep(1.0)      # a few commits on the new primary
    for w in ws:
        w.stop.set()
    for w in ws:
        w.join(10)
    winner = next((n.name for n in (b, c) if holding(n)), '?')
    res = {'promoted': promoted, 'winner': winner, 'writers': []}
    for w in ws:
        # A commit counts for the new primary if it started after the kill
        # (one acknowledged just after it was answered by the old one).
        before = [t for _, t0, t in w.acks if t0 <= t_kill]
        after = [t for _, t0, t in w.acks if t0 > t_kill]
        res['writers'].append({
            'writer': w.name,
            'writable': (after[0] - t_kill) if after else None,
            'gap': (after[0] - before[-1]) if after and before else None,
            'lost': w.lost, 'acked': len(w.acks)})
    for n in (c, b):
        for p in (n.zrelay, n.zeo):
            procs.stop(p)
    for p in (a.zrelay, a.zeo):
        procs.stop(p)
    return res


def fmt(v):
    return '-' if v is None else f'{v:.2f}'


def render(results):
    lines = ['| setting | ttl / loop_wait / margin | runs | promoted median / '
             'max s | writable through a door median / max s | no commits '
             '(worst writer) median / max s | acked commits lost |',
             '|---|---|---:|---|---|---|---:|']
    for setting, runs in results:
        label, ttl, lw, margin = setting
        prom = [r['promoted'] for r in runs if r['promoted'] is not None]
        best = [min(w['writable'] for w in r['writers']
                    if w['writable'] is not None) for r in runs
                if any(w['writable'] is not None for w in r['writers'])]
        gaps = [max(w['gap'] for w in r['writers'] if w['gap'] is not None)
                for r in runs
                if any(w['gap'] is not None for w in r['writers'])]
        lost = sum(w['lost'] for r in runs for w in r['writers'])
        med = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        lines.append(
            f'| {label} | {ttl} s / {lw} s / {margin} ms | {len(runs)} | '
            f'{fmt(med(prom))} / {fmt(max(prom) if prom else None)} | '
            f'{fmt(med(best))} / {fmt(max(best) if best else None)} | '
            f'{fmt(med(gaps))} / {fmt(max(gaps) if gaps else None)} | '
            f'{lost} |')
    goal = [(s, runs) for s, runs in results if s[0] == 'default']
    if goal:
        (_, ttl, _, _), runs = goal[0]
        best = [min(w['writable'] for w in r['writers']
                    if w['writable'] is not None) for r in runs]
        ok = best and max(best) <= ttl + 2
        lost = sum(w['lost'] for r in runs for w in r['writers'])
        lines += ['', f'Goal at the defaults: new primary writable through '
                      f'a door <= ttl + 2 s = {ttl + 2} s: max '
                      f'{fmt(max(best) if best else None)} s, '
                      f'{"met" if ok else "NOT met"}; acknowledged commits '
                      f'lost: {lost} ({"met" if lost == 0 else "NOT met"}).']
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--zrelay', default=os.path.join(
        R.REPO, 'target', 'release', 'zrelay'))
    ap.add_argument('--runs', type=int, default=3)
    ap.add_argument('--only', choices=[s[0] for s in SETTINGS])
    ap.add_argument('--interval-ms', type=float, default=20.0,
                    help='pause between a writer\'s commits (default 20)')
    ap.add_argument('--settle', type=float, default=1.0,
                    help='seconds of steady load before the kill')
    ap.add_argument('--zrelay-log-level', default='info')
    ap.add_argument('--out', default=os.path.join(
        HERE, 'failover-results-latest.md'))
    args = ap.parse_args(argv)
    args.zrelay = os.path.abspath(args.zrelay)
    if not os.access(args.zrelay, os.X_OK):
        ap.error(f'no zrelay binary at {args.zrelay} (cargo build --release)')
    if shutil.which('etcd') is None:
        ap.error('no etcd (scripts/ensure-tools.sh installs etcd-server)')
    procs = P.Procs()
    tmp = tempfile.mkdtemp(prefix='zrelay-failover-bench-')
    results = []
    try:
        certs = os.path.join(tmp, 'certs')
        subprocess.run([args.zrelay, 'cert', '--dir', certs, *NAMES],
                       check=True, capture_output=True, timeout=60)
        etcd = start_etcd(procs, tmp)
        for setting in SETTINGS:
            if args.only and setting[0] != args.only:
                continue
            runs = []
            for k in range(args.runs):
                r = one_run(procs, args, tmp, certs, etcd, setting, k)
                R.log(f'{setting[0]} run {k + 1}: {json.dumps(r)}')
                runs.append(r)
            results.append((setting, runs))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    body = render(results)
    print(body)
    if args.out:
        P.write_results(args.out, 'failover benchmark', 'failover_bench.py',
                        'Failover', P.machine_info(['ZEO', 'ZODB'])
                        + [P.zrelay_line(args.zrelay)], body)
    return 0


if __name__ == '__main__':
    P.run_main(main, 'failover_bench')
