#!/usr/bin/env python3
"""Semi-synchronous commit benchmark: what acknowledgements cost.

Side by side in one run, on 127.0.0.1 in a temporary directory (removed at
the end): a primary zrelay + runzeo and a replica zrelay + runzeo over
mutual TLS (as ``bench/repl_bench.py`` starts them), once per mode:

* ``async``: the default; commits return when the primary's backend has them;
* ``semi-sync received``: ``ack_mode = "semi-sync"``, ``ack_level =
  "received"``; the replica zrelay fsyncs each transaction in its spool
  (``data_dir/spool/``) and acknowledges it before applying it;
* ``semi-sync applied``: ``ack_level = "applied"``; the replica's backend
  has committed it.

For each, raw ZEO 5 writers (``bench/repl_clients.py writer``, one object
each, no conflicts) commit as fast as they can, 1 and then 4 at once:
commit latency (``tpc_begin`` sent to ``tpc_finish`` reply received) p50 and
p99, and transactions per second; and (semi-sync) the mean time from the
primary zrelay's feed seeing a commit to its acknowledgement
(``zrelay_semisync_ack_wait_seconds``). Prints a markdown table (also written to
``bench/semisync-results-latest.md``). A benchmark, not a test: it fails only
if something does not work. Loops are bounded in count and time; every
child is stopped by its PID at the end.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import procs as P          # noqa: E402
import repl_bench as R     # noqa: E402
import zeoraw              # noqa: E402

MODES = (
    ('async', [], []),
    ('semi-sync received',
     ['ack_mode = "semi-sync"', 'ack_level = "received"'], ['spool']),
    ('semi-sync applied',
     ['ack_mode = "semi-sync"', 'ack_level = "applied"'], []),
)
TARGET_RECEIVED_RATIO = 1.3


def tls_rtt_probe(certs, rounds=2000):
    """Loopback TLS 1.3 round trip with mutual authentication (the
    replication stream's setting), Python ``ssl`` on both ends, 64-byte
    messages: (p50, p99) ms. An upper bound of the floor one Txn + one
    Received costs on the wire (zrelay's rustls ends are faster)."""
    import socket
    import ssl
    import threading
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    srv_ctx.load_cert_chain(f'{certs}/primary.pem', f'{certs}/primary-key.pem')
    srv_ctx.load_verify_locations(f'{certs}/ca.pem')
    srv_ctx.verify_mode = ssl.CERT_REQUIRED
    cli_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cli_ctx.load_cert_chain(f'{certs}/replica.pem', f'{certs}/replica-key.pem')
    cli_ctx.load_verify_locations(f'{certs}/ca.pem')
    lsock = socket.socket()
    lsock.bind((R.HOST, 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]

    def serve():
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with srv_ctx.wrap_socket(conn, server_side=True) as s:
            for _ in range(rounds):
                data = s.recv(64)
                if not data:
                    return
                s.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    raw = socket.create_connection((R.HOST, port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    with cli_ctx.wrap_socket(raw, server_hostname='primary') as s:
        msg = b'x' * 64
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            s.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(s.recv(64))
            lat.append(time.perf_counter_ns() - t0)
    t.join(10)
    lsock.close()
    lat.sort()
    return P.percentile(lat, 50) / 1e6, P.percentile(lat, 99) / 1e6


def writers_run(registry, tmp, label, port, n, seconds):
    ws = [R.Child(registry, f'writer-{label}-{i}',
                  ['writer', '--port', str(port), '--seconds', str(seconds),
                   '--max-txns', str(int(20000 * seconds))],
                  os.path.join(tmp, f'writer-{i}.log'))
          for i in range(n)]
    for w in ws:
        w.expect('ready', 60)
    for w in ws:
        w.send('go')
    results = [w.expect('result', seconds + 60) for w in ws]
    for w in ws:
        w.finish()
    lat = sorted(x for r in results for x in r['latency_ns'])
    txns = sum(len(r['tids']) for r in results)
    elapsed = max(r['elapsed'] for r in results)
    return {'writers': n, 'txns': txns, 'txn_s': txns / elapsed,
            'p50': P.percentile(lat, 50) / 1e6,
            'p99': P.percentile(lat, 99) / 1e6}


def run_mode(procs, registry, args, tmp, certs, name, primary_extra, spool):
    tag = ''.join(ch if ch.isalnum() else '_' for ch in name)
    primary = R.Node('primary', os.path.join(tmp, f'{tag}-primary'))
    replica = R.Node('replica', os.path.join(tmp, f'{tag}-replica'))
    R.start_runzeo(procs, primary)
    R.start_runzeo(procs, replica)
    R.start_zrelay(procs, args, primary, certs, 'primary',
                   extra=primary_extra + ['ack_timeout_ms = 30000'])
    # The replica's data_dir (role.json, spool/): it spools only for a
    # primary that counts `Received` acks.
    R.start_zrelay(procs, args, replica, certs, 'replica',
                   upstream=primary.repl_port,
                   top=[f'data_dir = "{os.path.join(replica.dir, "state")}"'])
    with zeoraw.connect(R.HOST, primary.zeo_port) as c:
        last = c.call('lastTransaction').hex()
    R.wait_live(replica, want_tid=None if last == '0' * 16 else last)
    out = []
    name_sum = 'zrelay_semisync_ack_wait_seconds_sum'
    name_count = 'zrelay_semisync_ack_wait_seconds_count'
    for n in (1, 4):
        before = R.metrics(primary.admin_port)
        r = writers_run(registry, primary.dir, f'{tag}-{n}',
                        primary.client_port, n, args.seconds)
        after = R.metrics(primary.admin_port)
        count = R.metric_delta(before, after, name_count)
        # Mean time from the primary zrelay seeing the commit (its feed)
        # to the acknowledgement: the replica's share of the wait.
        r['ack_wait'] = (R.metric_delta(before, after, name_sum) / count * 1e3
                         if count else float('nan'))
        r['mode'] = name
        R.log(f'{name}, {n} writer(s): {r["txn_s"]:.0f} txn/s, commit p50 '
              f'{r["p50"]:.2f} ms, p99 {r["p99"]:.2f} ms')
        out.append(r)
    st = R.status(primary.admin_port).get('semisync') or {}
    if st.get('degrades_total'):
        raise RuntimeError(f'{name}: the primary degraded to async during '
                           f'the run: {st}')
    for node in (replica, primary):
        if not node.zrelay.alive():
            raise RuntimeError(f'{node.zrelay.name} died; log:\n'
                               f'{P.tail(node.zrelay.log_path)}')
        R.stop_node(procs, node)
    return out


def render(rows, fsync, fs, tls_rtt):
    base = {r['writers']: r for r in rows if r['mode'] == 'async'}
    lines = [f'Storage and spool: {fs}; fsync p50 {fsync[0]:.3f} ms, '
             f'p99 {fsync[1]:.3f} ms. Loopback TLS 1.3 round trip '
             f'(Python ssl, 64 B): p50 {tls_rtt[0]:.3f} ms, p99 '
             f'{tls_rtt[1]:.3f} ms.', '',
             '| mode | writers | txn/s | commit p50 ms | commit p99 ms | '
             'p50 vs async | ack wait mean ms |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for r in rows:
        ratio = r['p50'] / base[r['writers']]['p50']
        lines.append(f'| {r["mode"]} | {r["writers"]} | {r["txn_s"]:.0f} | '
                     f'{r["p50"]:.2f} | {r["p99"]:.2f} | {ratio:.2f}x | '
                     f'{R.f2(r["ack_wait"])} |')
    rec = [r for r in rows if r['mode'] == 'semi-sync received'
           and r['writers'] == 1]
    if rec:
        ratio = rec[0]['p50'] / base[1]['p50']
        verdict = 'met' if ratio <= TARGET_RECEIVED_RATIO else 'NOT met'
        floor = base[1]['p50'] + fsync[0] + tls_rtt[0]
        lines += ['', f'Goal semi-sync received p50 <= '
                      f'{TARGET_RECEIVED_RATIO}x async (1 writer): '
                      f'{ratio:.2f}x, {verdict}. Physical floor (async p50 + '
                      f'fsync p50 + TLS round trip p50): {floor:.2f} ms = '
                      f'{floor / base[1]["p50"]:.2f}x async.']
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--zrelay', default=os.path.join(
        R.REPO, 'target', 'release', 'zrelay'))
    ap.add_argument('--seconds', type=float, default=5.0,
                    help='per measurement (default 5)')
    ap.add_argument('--dir', default=tempfile.gettempdir(),
                    help='where the storages and the spool live')
    ap.add_argument('--zrelay-log-level', default='warn')
    ap.add_argument('--out', default=os.path.join(
        HERE, 'semisync-results-latest.md'))
    args = ap.parse_args(argv)
    args.zrelay = os.path.abspath(args.zrelay)
    args.no_capture = False  # repl_bench's option: capture stays on here
    if not os.access(args.zrelay, os.X_OK):
        ap.error(f'no zrelay binary at {args.zrelay} (cargo build --release)')
    procs = P.Procs()
    registry = []
    tmp = tempfile.mkdtemp(prefix='zrelay-semisync-bench-', dir=args.dir)
    rows = []
    try:
        certs = os.path.join(tmp, 'certs')
        subprocess.run([args.zrelay, 'cert', '--dir', certs, 'primary',
                        'replica'], check=True, capture_output=True,
                       timeout=60)
        fsync = R.fsync_probe(tmp)
        fs = f'`{args.dir}` ({R.fs_type(tmp)})'
        tls_rtt = tls_rtt_probe(certs)
        for name, extra, spool in MODES:
            rows += run_mode(procs, registry, args, tmp, certs, name, extra,
                             bool(spool))
    finally:
        for ch in registry:
            ch.kill()
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    body = render(rows, fsync, fs, tls_rtt)
    print(body)
    if args.out:
        P.write_results(args.out, 'semi-sync benchmark', 'semisync_bench.py',
                        'Semi-synchronous commits', R.machine_info(args), body)
    return 0


if __name__ == '__main__':
    P.run_main(main, 'semisync_bench')
