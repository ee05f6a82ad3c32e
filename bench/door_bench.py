#!/usr/bin/env python3
"""Door benchmark: loads of read-write clients at a REPLICA's door.

On 127.0.0.1, in temporary directories: a primary (runzeo + zrelay) and a
replica (runzeo + zrelay, streaming over mutual TLS). Client processes
(``bench/door_clients.py``, real ``ZEO.ClientStorage``) connect to the
replica's zrelay read-write, so their sessions are forwarded to the primary,
and do uncached ``loadBefore`` calls at their snapshot while one more client
commits at 100 txn/s through the same door. Side by side, in one run:

* **offload on** (the default): loads served by the replica when provably
  fresh; the fraction served locally comes from the replica's
  ``zrelay_door_loads_total``;
* **offload off** (``offload_loads = false``): every load goes to the primary;
* **local read-only session** at the replica door (zrelay's pass-through
  overhead on a local load);
* **direct** on the replica's runzeo (no proxy: the floor).

Also the primary runzeo's CPU seconds per 1,000 loads with and without
offload (from /proc). Prints a markdown report (also
``bench/door-results-latest.md``). Every loop is bounded; every child is
stopped by PID at the end.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import procs as P  # noqa: E402

HOST = P.HOST
CLIENTS = os.path.join(HERE, 'door_clients.py')


def log(msg):
    print(f'door_bench: {msg}', file=sys.stderr, flush=True)


def http(port, path):
    with urllib.request.urlopen(f'http://{HOST}:{port}{path}', timeout=5) as r:
        return r.read().decode()


def metric_sum(text, prefix):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(' ', 1)[1])
    return total


class Node:
    def __init__(self, name, d):
        self.name, self.dir = name, d
        os.makedirs(d, exist_ok=True)
        self.zeo_port = P.free_port()
        self.client_port = P.free_port()
        self.admin_port = P.free_port()
        self.repl_port = P.free_port()
        self.zeo = self.zrelay = None


def start_zeo(procs, node):
    conf = os.path.join(node.dir, 'zeo.conf')
    P.runzeo_conf(conf, node.zeo_port, node.dir, msgpack=False)
    node.zeo = procs.spawn(f'runzeo-{node.name}',
                           [sys.executable, '-m', 'ZEO.runzeo', '-C', conf],
                           os.path.join(node.dir, 'runzeo.out'), cwd=node.dir)
    node.zeo.wait_port(node.zeo_port)


def start_zrelay(procs, zrelay, node, certs, role, upstream=None, door=''):
    lines = [f'node_name = "{node.name}"', 'log_level = "warn"',
             '[client]', f'listen = "{HOST}:{node.client_port}"',
             '[backend]', f'address = "{HOST}:{node.zeo_port}"',
             '[admin]', f'listen = "{HOST}:{node.admin_port}"',
             '[replication]', f'role = "{role}"']
    if role == 'primary':
        lines += [f'listen = "{HOST}:{node.repl_port}"']
    else:
        lines += [f'upstream = "{HOST}:{upstream}"', 'upstream_name = "primary"']
    lines += ['[replication.tls]', f'ca_file = "{certs}/ca.pem"',
              f'cert_file = "{certs}/{role}.pem"',
              f'key_file = "{certs}/{role}-key.pem"', door]
    conf = os.path.join(node.dir, 'zrelay.toml')
    with open(conf, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    node.zrelay = procs.spawn(f'zrelay-{node.name}',
                              [zrelay, 'run', '--config', conf],
                              os.path.join(node.dir, 'zrelay.log'))
    node.zrelay.wait_port(node.client_port)
    node.zrelay.wait_port(node.admin_port)


def wait_door(replica, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            st = json.loads(http(replica.admin_port, '/status'))
            if (st.get('door') or {}).get('local_usable') and \
                    (st.get('door') or {}).get('primary'):
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError('replica door not ready')


def client(args):
    return subprocess.Popen([sys.executable, CLIENTS] + args,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=P._die_with_parent)


def finish(p, timeout):
    out, err = p.communicate(timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f'client failed: {err.decode()[-2000:]}')
    return json.loads(out.decode().strip().splitlines()[-1])


def run_loads(addr, oids_file, seconds, n_clients, ro, writer_addr, rate):
    w = client(['write', writer_addr, str(rate), str(seconds + 1)]) if writer_addr else None
    loaders = [client(['load', addr, str(seconds), oids_file, ro])
               for _ in range(n_clients)]
    lat = []
    for p in loaders:
        lat += finish(p, seconds + 60)['lat_us']
    if w:
        finish(w, seconds + 60)
    lat.sort()
    return lat


def summary(lat):
    return {
        'n': len(lat),
        'p50': P.percentile(lat, 50),
        'p99': P.percentile(lat, 99),
        'mean': statistics.fmean(lat) if lat else float('nan'),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--zrelay', default=os.path.join(REPO, 'target/release/zrelay'))
    ap.add_argument('--seconds', type=float, default=8.0)
    ap.add_argument('--clients', type=int, default=2)
    ap.add_argument('--rate', type=float, default=100.0)
    ap.add_argument('--objects', type=int, default=2000)
    ap.add_argument('--quick', action='store_true')
    ap.add_argument('--out', default=os.path.join(HERE, 'door-results-latest.md'))
    args = ap.parse_args()
    if args.quick:
        args.seconds = 3.0
    tmp = tempfile.mkdtemp(prefix='zrelay-door-bench-')
    procs = P.Procs()
    rows = {}
    try:
        certs = os.path.join(tmp, 'certs')
        subprocess.run([args.zrelay, 'cert', '--dir', certs, 'primary', 'replica'],
                       check=True, capture_output=True)
        primary = Node('primary', os.path.join(tmp, 'primary'))
        replica = Node('replica', os.path.join(tmp, 'replica'))
        start_zeo(procs, primary)
        start_zeo(procs, replica)
        start_zrelay(procs, args.zrelay, primary, certs, 'primary')
        start_zrelay(procs, args.zrelay, replica, certs, 'replica',
                     upstream=primary.repl_port)
        door = f'{HOST}:{replica.client_port}'
        pop = finish(client(['populate', f'{HOST}:{primary.client_port}',
                             str(args.objects)]), 120)
        oids_file = os.path.join(tmp, 'oids.json')
        with open(oids_file, 'w') as f:
            json.dump(pop, f)
        wait_door(replica)
        pzeo_pid = primary.zeo.popen.pid

        # The writer alone: the primary CPU it costs, subtracted below.
        log('writer alone ...')
        c0 = P.pid_cpu_seconds(pzeo_pid)
        finish(client(['write', door, str(args.rate), str(args.seconds)]), args.seconds + 60)
        writer_cpu_per_s = (P.pid_cpu_seconds(pzeo_pid) - c0) / args.seconds

        other = P.OtherLoad(lambda: [p.popen.pid for p in procs.procs])

        def measured(label, addr, ro, door_row=True):
            log(f'{label} ...')
            o0 = other.sample()
            m0 = http(replica.admin_port, '/metrics')
            c0 = P.pid_cpu_seconds(pzeo_pid)
            t0 = time.monotonic()
            lat = run_loads(addr, oids_file, args.seconds, args.clients, ro,
                            door, args.rate)
            elapsed = time.monotonic() - t0
            c1 = P.pid_cpu_seconds(pzeo_pid)
            m1 = http(replica.admin_port, '/metrics')
            local = (metric_sum(m1, 'zrelay_door_loads_total{served_by="local"')
                     - metric_sum(m0, 'zrelay_door_loads_total{served_by="local"'))
            fwd = (metric_sum(m1, 'zrelay_door_loads_total{served_by="primary"')
                   - metric_sum(m0, 'zrelay_door_loads_total{served_by="primary"'))
            r = summary(lat)
            r['local_fraction'] = (local / (local + fwd)
                                   if door_row and local + fwd else None)
            loads_cpu = max(0.0, (c1 - c0) - writer_cpu_per_s * elapsed)
            r['primary_cpu_per_1000'] = loads_cpu / max(1, r['n']) * 1000
            # Clients count as "other": subtract nothing, report as measured.
            r['other_cores'] = P.OtherLoad.cores(o0, other.sample())
            rows[label] = r

        measured('offload on (replica door, read-write)', door, '0')
        measured('read-only session at the replica door (local)', door, '1',
                 door_row=False)
        measured('direct on the replica runzeo (no proxy)',
                 f'{HOST}:{replica.zeo_port}', '1', door_row=False)
        # Same door, offload off.
        procs.stop(replica.zrelay)
        start_zrelay(procs, args.zrelay, replica, certs, 'replica',
                     upstream=primary.repl_port,
                     door='[door]\noffload_loads = false')
        wait_door(replica)
        measured('offload off (every load forwarded to the primary)', door, '0')
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    lines = ['# Door benchmark: loads of read-write clients at a replica', '']
    for k, v in P.machine_info(['ZEO', 'ZODB']) + [P.zrelay_line(args.zrelay)]:
        lines.append(f'- {k}: {v}')
    lines += ['', f'{args.clients} loader processes (uncached `loadBefore` at their snapshot, '
              f'one call at a time) for {args.seconds:.0f} s each, while one client commits '
              f'at {args.rate:.0f} txn/s through the replica door (in every row). '
              f'"Served locally" counts the read-write rows\' loads by '
              f'`zrelay_door_loads_total`; the primary runzeo\'s CPU is what remains '
              f'after subtracting the writer alone ({writer_cpu_per_s:.3f} s/s).', '',
              '| path | loads | p50 µs | p99 µs | served locally | primary runzeo CPU s / 1,000 loads | other CPU (cores, incl. the clients) |',
              '|---|---:|---:|---:|---:|---:|---:|']
    for label, r in rows.items():
        frac = '-' if r['local_fraction'] is None else f"{100 * r['local_fraction']:.1f} %"
        lines.append(f"| {label} | {r['n']} | {r['p50']:.0f} | {r['p99']:.0f} | {frac} | "
                     f"{r['primary_cpu_per_1000']:.3f} | {r['other_cores']:.2f} |")
    on = rows.get('offload on (replica door, read-write)')
    ro = rows.get('read-only session at the replica door (local)')
    direct = rows.get('direct on the replica runzeo (no proxy)')
    off = rows.get('offload off (every load forwarded to the primary)')
    if on and ro and direct and off:
        lines += ['',
                  f"Offloaded p50 − direct p50: {on['p50'] - direct['p50']:+.0f} µs; "
                  f"pass-through (local read-only session) − direct: "
                  f"{ro['p50'] - direct['p50']:+.0f} µs; forwarded − direct: "
                  f"{off['p50'] - direct['p50']:+.0f} µs.",
                  f"Primary runzeo CPU per 1,000 loads: {on['primary_cpu_per_1000']:.3f} s with "
                  f"offload, {off['primary_cpu_per_1000']:.3f} s without."]
    text = '\n'.join(lines) + '\n'
    print(text)
    with open(args.out, 'w') as f:
        f.write(text)


if __name__ == '__main__':
    main()
