"""Client-port TLS cost: the same ZEO client calls through two zrelays in
front of one runzeo, one plaintext and one with [client.tls] (client
certificate required), and straight to a second runzeo speaking TLS itself
(`<ssl>`), interleaved so all see the same machine load.

Usage: .venv/bin/python bench/tls_bench.py [--zrelay target/release/zrelay]
       [--calls 2000] [--commits 300] [--rounds 3]

Measures per round trip: a sync `ping` (ClientStorage._call) and a small
commit (tpc_begin/storea/vote/tpc_finish through ZODB.DB), p50/p90/p99 in
microseconds. Prints a markdown table.
"""
import argparse
import os
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import procs as P  # noqa: E402

import transaction  # noqa: E402
from persistent.mapping import PersistentMapping  # noqa: E402
from ZEO.ClientStorage import ClientStorage  # noqa: E402
from ZODB import DB  # noqa: E402


def measure(storage, db, calls, commits):
    pings = []
    for _ in range(calls):
        t = time.perf_counter()
        storage._call('ping')
        pings.append(time.perf_counter() - t)
    tm = transaction.TransactionManager()
    conn = db.open(transaction_manager=tm)
    root = conn.root()
    if 'b' not in root:
        root['b'] = PersistentMapping(n=0)
        tm.commit()
    commit_times = []
    for i in range(commits):
        tm.begin()
        root['b']['n'] = i
        t = time.perf_counter()
        tm.commit()
        commit_times.append(time.perf_counter() - t)
    conn.close()
    return sorted(pings), sorted(commit_times)


def stats(xs):
    return tuple(P.percentile(xs, q) * 1e6 for q in (50, 90, 99))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--zrelay', default=os.path.join(P.REPO, 'target', 'release', 'zrelay'))
    ap.add_argument('--calls', type=int, default=2000)
    ap.add_argument('--commits', type=int, default=300)
    ap.add_argument('--rounds', type=int, default=3)
    args = ap.parse_args()

    d = tempfile.mkdtemp(prefix='zrelay-tlsbench-')
    procs = P.Procs()
    try:
        certs = os.path.join(d, 'certs')
        subprocess.run([args.zrelay, 'cert', '--dir', certs, 'relay', 'app'],
                       check=True, stdout=subprocess.DEVNULL)
        zport = P.free_port()
        P.runzeo_conf(os.path.join(d, 'zeo.conf'), zport, d, msgpack=False)
        z = procs.spawn('runzeo', [os.path.join(P.REPO, '.venv', 'bin', 'runzeo'),
                                   '-C', os.path.join(d, 'zeo.conf')],
                        os.path.join(d, 'runzeo.out'))
        z.wait_port(zport)
        ports = {}
        for kind in ('plain', 'tls'):
            port = P.free_port()
            conf = os.path.join(d, f'{kind}.toml')
            tls = '' if kind == 'plain' else f"""
[client.tls]
cert_file = "{certs}/relay.pem"
key_file = "{certs}/relay-key.pem"
ca_file = "{certs}/ca.pem"
require_client_cert = true
read_write_clients = ["app"]
"""
            with open(conf, 'w') as f:
                f.write(f'log_level = "warn"\n[client]\nlisten = "{P.HOST}:{port}"\n'
                        f'{tls}[backend]\naddress = "{P.HOST}:{zport}"\n')
            p = procs.spawn(f'zrelay-{kind}', [args.zrelay, 'run', '--config', conf],
                            os.path.join(d, f'{kind}.log'))
            p.wait_port(port)
            ports[kind] = port

        # For comparison: a second runzeo speaking TLS itself (<ssl>), direct.
        sport = P.free_port()
        sd = os.path.join(d, 'ssl')
        os.makedirs(sd)
        P.runzeo_conf(os.path.join(sd, 'zeo.conf'), sport, sd, msgpack=False)
        conf = open(os.path.join(sd, 'zeo.conf')).read().replace(
            '</zeo>', f'  <ssl>\n    certificate {certs}/relay.pem\n    key {certs}/relay-key.pem\n'
                      f'    authenticate {certs}/ca.pem\n  </ssl>\n</zeo>')
        open(os.path.join(sd, 'zeo.conf'), 'w').write(conf)
        zs = procs.spawn('runzeo-ssl', [os.path.join(P.REPO, '.venv', 'bin', 'runzeo'),
                                        '-C', os.path.join(sd, 'zeo.conf')],
                         os.path.join(sd, 'runzeo.out'))
        zs.wait_port(sport)
        ports['direct-tls (runzeo <ssl>)'] = sport
        ctx = ssl.create_default_context(cafile=f'{certs}/ca.pem')
        ctx.load_cert_chain(f'{certs}/app.pem', f'{certs}/app-key.pem')
        clients = {}
        for kind, port in ports.items():
            kw = dict(ssl=ctx, ssl_server_hostname='relay') if kind != 'plain' else {}
            st = ClientStorage((P.HOST, port), wait_timeout=30, **kw)
            clients[kind] = (st, DB(st))
        results = {k: ([], []) for k in clients}
        for _ in range(args.rounds):
            for kind, (st, db) in clients.items():
                pings, commits = measure(st, db, args.calls, args.commits)
                results[kind][0].extend(pings)
                results[kind][1].extend(commits)
        for st, db in clients.values():
            db.close()
        print('| path | ping p50 / p90 / p99 (µs) | commit p50 / p90 / p99 (µs) |')
        print('|---|---|---|')
        for kind, (pings, commits) in results.items():
            ps = stats(sorted(pings))
            cs = stats(sorted(commits))
            print(f'| {kind} | {ps[0]:.0f} / {ps[1]:.0f} / {ps[2]:.0f} '
                  f'| {cs[0]:.0f} / {cs[1]:.0f} / {cs[2]:.0f} |')
    finally:
        procs.stop_all()


if __name__ == '__main__':
    main()
