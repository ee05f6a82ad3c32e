#!/usr/bin/env python3
"""Per-round-trip cost of a proxy, counted instead of timed.

Wall-clock latency on this shared 2-vCPU machine is noisy; counts are not.
For each encoding, on 127.0.0.1 in a temporary directory: one ``runzeo``,
one zrelay and one HAProxy (``mode tcp``, one thread) in front of it. Then,
per proxy and workload (``ping``, uncached ``load``), ``--count`` round trips
on one raw-socket connection (bench/zeoraw.py) while:

* ``strace -c -f -p PID`` counts the proxy's syscalls (``--strace``);
* zrelay runs under ``valgrind --tool=callgrind`` (``--callgrind``): its user
  instructions (Ir) per round trip, zeroed after the warm-up and dumped
  after the measured calls (``callgrind_control``).

Prints a markdown table: syscalls per round trip by name, and Ir per round
trip. Every loop is bounded; every child is stopped by PID at the end.
"""
import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B        # noqa: E402
import procs as P        # noqa: E402
import workloads as W    # noqa: E402
import zeoraw            # noqa: E402

HOST = P.HOST
WARMUP = 50   # unmeasured round trips first (strace counts them too)


def round_trips(port, kind, oids, count, before=None):
    """``before()`` runs after the warm-up, then ``count`` calls."""
    with zeoraw.connect(HOST, port) as c:
        for _ in range(WARMUP):
            if kind == 'load':
                c.call('loadBefore', zeoraw.Z64, zeoraw.MAXTID)
            else:
                c.call('ping')
        if before:
            before()
        for i in range(count):
            if kind == 'load':
                c.call('loadBefore', oids[i % len(oids)], zeoraw.MAXTID)
            else:
                c.call('ping')
        time.sleep(0.2)   # let the tracer see the last reply written


def strace_counts(pid, run):
    """Runs ``run()`` with strace attached to *pid*; {syscall: calls}."""
    fd, out = tempfile.mkstemp(suffix='.strace')
    os.close(fd)
    st = subprocess.Popen(['strace', '-c', '-f', '-q', '-o', out, '-p', str(pid)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)   # attached
        run()
    finally:
        st.send_signal(signal.SIGINT)
        st.wait(30)
    counts = {}
    with open(out) as f:
        for line in f:
            m = re.match(r'\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$', line)
            if m and m.group(2) != 'total':
                counts[m.group(2)] = int(m.group(1))
    os.unlink(out)
    return counts


def callgrind_ir(pid, outdir, run, annotate=0):
    """Ir of *pid* (running under callgrind) during ``run()``; with
    *annotate*, its top functions go to stderr."""
    for f in glob.glob(os.path.join(outdir, f'callgrind.out.{pid}*')):
        os.unlink(f)

    def zero():
        subprocess.run(['callgrind_control', '-z', str(pid)], check=True,
                       stdout=subprocess.DEVNULL, timeout=60)
    run(zero)
    subprocess.run(['callgrind_control', '-d', str(pid)], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)
    total = 0
    for f in glob.glob(os.path.join(outdir, f'callgrind.out.{pid}*')):
        with open(f, errors='replace') as fh:
            for line in fh:
                if line.startswith('summary:') or line.startswith('totals:'):
                    total = max(total, int(line.split()[1]))
        if annotate:
            ann = subprocess.run(["callgrind_annotate", f],
                                 capture_output=True, text=True, timeout=120).stdout
            print('\n'.join(ann.splitlines()[:annotate + 25]), file=sys.stderr)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--zrelay', default=os.path.join(P.REPO, 'target', 'release', 'zrelay'))
    ap.add_argument('--count', type=int, default=2000)
    ap.add_argument('--strace', action='store_true')
    ap.add_argument('--callgrind', action='store_true')
    ap.add_argument('--encodings', default='pickle,msgpack')
    ap.add_argument('--only', default='ping,load')
    ap.add_argument('--annotate', type=int, default=0, metavar='N',
                    help='print the N functions with the most Ir (stderr)')
    args = ap.parse_args()
    if not (args.strace or args.callgrind):
        args.strace = args.callgrind = True
    kinds = args.only.split(',')
    procs = P.Procs()
    tmp = tempfile.mkdtemp(prefix='zrelay-rtprof-')
    rows = []
    try:
        for enc in args.encodings.split(','):
            d = os.path.join(tmp, enc)
            os.makedirs(d)
            zport = P.free_port()
            conf = os.path.join(d, 'zeo.conf')
            P.runzeo_conf(conf, zport, d, msgpack=(enc == 'msgpack'))
            zeo = procs.spawn(f'runzeo-{enc}', [sys.executable, '-m', 'ZEO.runzeo', '-C', conf],
                              os.path.join(d, 'runzeo.out'), cwd=d)
            zeo.wait_port(zport)
            oids = W.populate(HOST, zport, args.count, 1)
            proxies = {}
            hport = P.free_port()
            B.haproxy_conf(os.path.join(d, 'haproxy.cfg'), hport, zport)
            h = procs.spawn('haproxy', ['haproxy', '-f', os.path.join(d, 'haproxy.cfg')],
                            os.path.join(d, 'haproxy.log'), cwd=d)
            h.wait_port(hport)
            proxies['haproxy'] = (h, hport)
            rport = P.free_port()
            rconf = os.path.join(d, 'zrelay.toml')
            P.zrelay_conf(rconf, rport, zport)
            r = procs.spawn('zrelay', [args.zrelay, 'run', '--config', rconf],
                            os.path.join(d, 'zrelay.log'), cwd=d)
            r.wait_port(rport)
            proxies['zrelay'] = (r, rport)
            for kind in kinds:
                if args.strace:
                    for name, (p, port) in proxies.items():
                        c = strace_counts(p.pid, lambda: round_trips(port, kind, oids, args.count))
                        n = args.count + WARMUP
                        per = {k: v / n for k, v in c.items() if v >= n / 10}
                        rows.append((enc, kind, name, 'syscalls/rt',
                                     f'{sum(per.values()):.2f}',
                                     ', '.join(f'{k} {v:.2f}' for k, v in sorted(per.items()))))
            procs.stop(r)
            if args.callgrind:
                cport = P.free_port()
                cconf = os.path.join(d, 'zrelay-cg.toml')
                P.zrelay_conf(cconf, cport, zport)
                cg = procs.spawn('zrelay-callgrind',
                                 ['valgrind', '--tool=callgrind', '--quiet',
                                  f'--callgrind-out-file={d}/callgrind.out.%p',
                                  args.zrelay, 'run', '--config', cconf],
                                 os.path.join(d, 'zrelay-cg.log'), cwd=d)
                cg.wait_port(cport, timeout=120)
                for kind in kinds:
                    ir = callgrind_ir(cg.pid, d,
                                      lambda zero: round_trips(cport, kind, oids, args.count,
                                                               before=zero),
                                      annotate=args.annotate)
                    rows.append((enc, kind, 'zrelay', 'Ir/rt', f'{ir / args.count:,.0f}', ''))
                procs.stop(cg, timeout=60)
                # HAProxy under the same tool: its user instructions too.
                hport2 = P.free_port()
                hcfg = os.path.join(d, 'haproxy-cg.cfg')
                B.haproxy_conf(hcfg, hport2, zport)
                hg = procs.spawn('haproxy-callgrind',
                                 ['valgrind', '--tool=callgrind', '--quiet',
                                  f'--callgrind-out-file={d}/callgrind.out.%p',
                                  'haproxy', '-f', hcfg],
                                 os.path.join(d, 'haproxy-cg.log'), cwd=d)
                hg.wait_port(hport2, timeout=120)
                for kind in kinds:
                    ir = callgrind_ir(hg.pid, d,
                                      lambda zero: round_trips(hport2, kind, oids, args.count,
                                                               before=zero))
                    rows.append((enc, kind, 'haproxy', 'Ir/rt', f'{ir / args.count:,.0f}', ''))
                procs.stop(hg, timeout=60)
            procs.stop_all()
    finally:
        procs.stop_all()
        if not args.annotate:
            shutil.rmtree(tmp, ignore_errors=True)
    print('| encoding | workload | proxy | measure | per round trip | detail |')
    print('|---|---|---|---|---:|---|')
    for row in rows:
        print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
    main()
