#!/usr/bin/env python3
"""Side-by-side benchmark: ZEO clients talking to runzeo directly vs through zrelay.

One run starts, all on 127.0.0.1 and in a temporary directory:

* two unmodified ``runzeo`` servers with a FileStorage each, one speaking
  pickle (``Z5``), one msgpack (``M5``, ``<zeo> msgpack true </zeo>``);
* a zrelay in front of each (``--self-test``: a trivial Python forwarder
  instead, to exercise the proxied path without a zrelay build);
* four worker processes for the ZODB clients;
* HAProxy (``mode tcp``, one thread) in front of each server: what an
  operator would put there instead of zrelay; zrelay is held to it (its
  added latency at most HAProxy's, its commit throughput at least
  HAProxy's). ``--no-haproxy`` leaves it out; ``make bench`` installs it
  (``scripts/ensure-bench-tools.sh``);
* with ``--baseline``, also ``bench/baseline_relay.c`` (built with cc), a
  minimal poll() relay in front of each server: its column shows what any
  same-host proxy costs on this machine, so zrelay's own share is visible.

It then runs every workload ``--runs`` times per encoding, alternating
direct and proxied (and which of the two goes first), and prints a markdown
table of medians over the runs, the proxied/direct ratio and the latency the
proxy adds per round trip. The same table, with machine information, goes to
``bench/results-latest.md``. Progress goes to stderr.

Workloads (``--only`` picks some):

  load     uncached loadBefore round trips: a fresh raw-socket client asks
           for distinct, previously written objects one at a time
  ping     ping round trips on a raw-socket client
  commit1  small commits (one small object each) by 1 ZODB client process
  commit4  the same with 4 client processes at once
  bulk     commits of 100 x 1 KiB objects by 1 ZODB client; MB/s of payload

This is a benchmark, not a test: it fails only if something does not work.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import procs as P        # noqa: E402
import workloads as W    # noqa: E402
import zeoraw            # noqa: E402

HOST = P.HOST
WORKLOADS = ('load', 'ping', 'commit1', 'commit4', 'bulk')
ENCODINGS = ('pickle', 'msgpack')
MODES = ('direct', 'proxied')          # + 'haproxy', + 'baseline'
N_WORKERS = 4

# Targets the proxy is held to.
TARGET_ADDED_US = 25.0          # added latency per round trip (p50)
TARGET_THROUGHPUT_RATIO = 0.97  # proxied / direct commit throughput

# (workload, metric, unit, higher_is_better)
METRICS = {
    'load': [('p50', 'µs', False), ('p99', 'µs', False)],
    'ping': [('p50', 'µs', False), ('p99', 'µs', False)],
    'commit1': [('txn/s', 'txn/s', True), ('p50', 'ms', False),
                ('p99', 'ms', False)],
    'commit4': [('txn/s', 'txn/s', True), ('p50', 'ms', False),
                ('p99', 'ms', False)],
    'bulk': [('MB/s', 'MB/s', True), ('p50', 'ms', False)],
}
TITLES = {
    'load': 'loadBefore, uncached (raw)',
    'ping': 'ping (raw)',
    'commit1': 'small commits, 1 client',
    'commit4': 'small commits, 4 clients',
    'bulk': 'bulk commits, 100 × 1 KiB',
}


class Settings:
    """Counts and durations; every loop is bounded by both."""

    def __init__(self, args):
        quick = args.quick
        self.runs = args.runs if args.runs else (2 if quick else 5)
        self.n_objects = args.loads or (300 if quick else 2000)
        self.n_pings = args.pings or (300 if quick else 2000)
        self.commit_seconds = args.seconds or (0.5 if quick else 2.0)
        self.max_txns = 20000          # per client per run
        self.raw_max_seconds = 20.0    # per raw run


def log(msg):
    print(f'[{time.monotonic() - T0:6.1f}s] {msg}', file=sys.stderr, flush=True)


T0 = time.monotonic()


# ------------------------------------------------------------- topology ----

class Endpoint:
    """One runzeo server and the proxy in front of it."""

    def __init__(self, encoding):
        self.encoding = encoding
        self.server = None
        self.server_port = None
        self.proxy = None
        self.proxy_port = None
        self.proxy_rss_start = {}
        self.baseline = None
        self.baseline_port = None
        self.haproxy = None
        self.haproxy_port = None

    def port(self, mode):
        return {'direct': self.server_port, 'proxied': self.proxy_port,
                'baseline': self.baseline_port,
                'haproxy': self.haproxy_port}[mode]

    def process(self, mode):
        """The proxy process of *mode* (None for direct)."""
        return {'direct': None, 'proxied': self.proxy,
                'baseline': self.baseline, 'haproxy': self.haproxy}[mode]


def build_baseline_relay(tmp):
    """Compile bench/baseline_relay.c; return the binary's path."""
    cc = shutil.which(os.environ.get('CC', 'cc'))
    if not cc:
        raise RuntimeError('--baseline needs a C compiler (cc, or $CC)')
    out = os.path.join(tmp, 'baseline_relay')
    subprocess.run([cc, '-O2', '-o', out,
                    os.path.join(HERE, 'baseline_relay.c')],
                   check=True, timeout=120)
    return out


def haproxy_conf(path, listen_port, backend_port):
    """HAProxy as an operator would run it for ZEO: plain TCP relay, one
    thread, TCP_NODELAY is its default for `mode tcp`."""
    with open(path, 'w') as f:
        f.write(f"""\
global
    nbthread 1
    maxconn 1000
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend zeo
    bind {HOST}:{listen_port}
    default_backend zeo
backend zeo
    server zeo {P.address(HOST, backend_port)}
""")


def start_topology(procs, tmp, args, encodings):
    baseline_bin = build_baseline_relay(tmp) if args.baseline else None
    endpoints = []
    for enc in encodings:
        ep = Endpoint(enc)
        d = os.path.join(tmp, enc)
        os.makedirs(d)
        ep.server_port = (os.path.join(d, 'zeo.sock') if args.backend_unix
                          else P.free_port())
        conf = os.path.join(d, 'zeo.conf')
        P.runzeo_conf(conf, ep.server_port, d, msgpack=(enc == 'msgpack'))
        ep.server = procs.spawn(f'runzeo-{enc}',
                                [sys.executable, '-m', 'ZEO.runzeo', '-C', conf],
                                os.path.join(d, 'runzeo.out'), cwd=d)
        endpoints.append(ep)
    for ep in endpoints:
        ep.server.wait_port(ep.server_port)
        d = os.path.join(tmp, ep.encoding)
        ep.proxy_port = P.free_port()
        if args.self_test:
            argv = [sys.executable, os.path.join(HERE, 'forwarder.py'),
                    str(ep.proxy_port), str(ep.server_port)]
            name = f'forwarder-{ep.encoding}'
        else:
            conf = os.path.join(d, 'zrelay.toml')
            P.zrelay_conf(conf, ep.proxy_port, ep.server_port,
                          args.zrelay_log_level)
            argv = [args.zrelay, 'run', '--config', conf]
            name = f'zrelay-{ep.encoding}'
        ep.proxy = procs.spawn(name, argv, os.path.join(d, f'{name}.log'), cwd=d)
        ep.proxy.wait_port(ep.proxy_port)
        if baseline_bin:
            ep.baseline_port = P.free_port()
            ep.baseline = procs.spawn(
                f'baseline-relay-{ep.encoding}',
                [baseline_bin, str(ep.baseline_port), str(ep.server_port)],
                os.path.join(d, 'baseline-relay.log'), cwd=d)
            ep.baseline.wait_port(ep.baseline_port)
        if args.haproxy:
            ep.haproxy_port = P.free_port()
            conf = os.path.join(d, 'haproxy.cfg')
            haproxy_conf(conf, ep.haproxy_port, ep.server_port)
            ep.haproxy = procs.spawn(
                f'haproxy-{ep.encoding}', [args.haproxy, '-db', '-f', conf],
                os.path.join(d, 'haproxy.log'), cwd=d)
            ep.haproxy.wait_port(ep.haproxy_port)
    return endpoints


PREFLIGHT_SESSIONS = 3


def preflight(ep, modes):
    """Both paths answer, and the proxied one reaches the same storage with
    the expected encoding, in several sessions in a row."""
    want = b'Z5' if ep.encoding == 'pickle' else b'M5'
    seen = {}
    for mode in modes + ('proxied',) * (PREFLIGHT_SESSIONS - 1):
        try:
            with zeoraw.connect(HOST, ep.port(mode)) as c:
                if c.protocol != want:
                    raise RuntimeError(f'negotiated {c.protocol!r}, '
                                       f'expected {want!r}')
                c.call('ping')
                seen[mode] = c.call('lastTransaction')
        except Exception as e:
            reason = ('no answer within 10 s' if isinstance(e, TimeoutError)
                      else repr(e))
            where = {'direct': f'runzeo on port {ep.server_port}',
                     'proxied': f'{ep.proxy.name} on port {ep.proxy_port}',
                     'baseline': f'baseline relay on port {ep.baseline_port}',
                     'haproxy': f'haproxy on port {ep.haproxy_port}',
                     }[mode]
            extra = ''
            if mode == 'proxied':
                extra = f'\n{ep.proxy.name} log:\n{P.tail(ep.proxy.log_path)}'
            raise RuntimeError(f'{ep.encoding}: {where} does not work: '
                               f'{reason}{extra}') from e
    if len(set(seen.values())) != 1:
        raise RuntimeError(f'{ep.encoding}: lastTransaction differs between '
                           f'paths: {seen!r}')


# ------------------------------------------------------------ measuring ----

def measure(workload, port, settings, pool, oids):
    """One run of *workload* against *port*; return ``{metric: value}``."""
    if workload in ('load', 'ping'):
        count = settings.n_objects if workload == 'load' else settings.n_pings
        lat = sorted(W.raw_latency(HOST, port, workload, oids, count,
                                   settings.raw_max_seconds))
        return {'p50': P.percentile(lat, 50) / 1e3,
                'p99': P.percentile(lat, 99) / 1e3,
                'n': len(lat)}
    n_clients = 4 if workload == 'commit4' else 1
    kind = 'bulk' if workload == 'bulk' else 'small'
    results = pool.commits(n_clients, HOST, port, kind,
                           settings.commit_seconds, settings.max_txns)
    lat = sorted(ns for _, _, lats in results for ns in lats)
    n_txns = sum(n for n, _, _ in results)
    rate = sum(n / elapsed for n, elapsed, _ in results if elapsed > 0)
    out = {'p50': P.percentile(lat, 50) / 1e6, 'p99': P.percentile(lat, 99) / 1e6,
           'n': n_txns}
    if kind == 'bulk':
        out['MB/s'] = rate * W.BULK_OBJECTS * W.BULK_OBJECT_BYTES / 1e6
    else:
        out['txn/s'] = rate
    return out


def run_all(endpoints, settings, pool, oids, workloads, other, modes):
    """Run everything; return ``(samples, other_cores)``.

    ``samples[(workload, encoding, metric, mode)]`` is the list of per-run
    values; ``other_cores[workload]`` the CPU (in cores) that processes
    outside the benchmark used meanwhile.
    """
    samples = {}
    other_cores = {}
    for workload in workloads:
        before = other.sample()
        for ep in endpoints:
            for r in range(settings.runs):
                # Rotate which mode goes first: with two modes this
                # alternates direct-proxied / proxied-direct.
                k = r % len(modes)
                order = modes[k:] + modes[:k]
                for mode in order:
                    proc = ep.process(mode)
                    cpu0 = proc.cpu_seconds() if proc else None
                    res = measure(workload, ep.port(mode), settings, pool,
                                  oids[ep.encoding])
                    if proc:
                        res['cpu_s'] = proc.cpu_seconds() - cpu0
                    for metric, value in res.items():
                        samples.setdefault(
                            (workload, ep.encoding, metric, mode), []
                        ).append(value)
                    main = METRICS[workload][0]
                    log(f'{workload:8} {ep.encoding:7} run {r + 1}/'
                        f'{settings.runs} {mode:8} {main[0]} '
                        f'{res[main[0]]:9.1f} {main[1]:5} (n={res["n"]})')
        other_cores[workload] = other.cores(before, other.sample())
        log(f'{workload}: other processes used '
            f'{other_cores[workload]:.2f} cores meanwhile')
    return samples, other_cores


# ------------------------------------------------------------- reporting ----

def fmt(value, unit):
    if value != value:      # NaN
        return '–'
    if unit == 'µs':
        return f'{value:.1f}'
    if unit == 'ms':
        return f'{value:.2f}'
    return f'{value:.1f}' if value < 1000 else f'{value:.0f}'


def spread(values):
    """(max − min) / median over the runs, in percent."""
    m = statistics.median(values)
    return (max(values) - min(values)) / m * 100.0 if m else float('nan')


def _added_us(direct, other, unit):
    return (other - direct) * (1000.0 if unit == 'ms' else 1.0)


def build_table(samples, workloads, encodings, proxy_label, baseline,
                haproxy):
    """Markdown table of medians; returns ``(table, verdicts)``.

    With HAProxy measured, the targets are HAProxy's figures from the same
    run (zrelay's added p50 latency at most HAProxy's, its throughput at
    least HAProxy's); otherwise the fixed ones (TARGET_*).
    """
    head = ['workload', 'enc', 'metric', 'direct', proxy_label, 'ratio',
            'added']
    align = ['---', '---', '---', '---:', '---:', '---:', '---:']
    if haproxy:
        head += ['HAProxy', 'HAProxy added', f'{proxy_label} vs HAProxy']
        align += ['---:', '---:', '---:']
    head.append('target')
    align.append('---')
    if baseline:
        head += ['C relay', 'C relay vs direct']
        align += ['---:', '---:']
    head.append('spread')
    align.append('---:')
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(align) + '|']
    verdicts = []
    for workload in workloads:
        for enc in encodings:
            for metric, unit, higher_better in METRICS[workload]:
                runs = {mode: samples.get((workload, enc, metric, mode))
                        for mode in ('direct', 'proxied', 'baseline',
                                     'haproxy')}
                d, p = runs['direct'], runs['proxied']
                if not d or not p:
                    continue
                dm, pm = statistics.median(d), statistics.median(p)
                ratio = pm / dm if dm else float('nan')
                h = runs['haproxy'] if haproxy else None
                hm = statistics.median(h) if h else None
                added = target = ''
                us = _added_us(dm, pm, unit)
                if not higher_better:
                    added = f'{us:+.1f} µs'
                latency_goal = metric == 'p50' and workload in ('load', 'ping')
                if latency_goal and hm is not None:
                    h_us = _added_us(dm, hm, unit)
                    ok = us <= h_us
                    target = f'≤ HAProxy: {"met" if ok else "MISSED"}'
                    verdicts.append((f'{workload} {enc} added p50 vs HAProxy',
                                     ok))
                elif latency_goal:
                    ok = us <= TARGET_ADDED_US
                    target = (f'≤ +{TARGET_ADDED_US:.0f} µs: '
                              f'{"met" if ok else "MISSED"}')
                    verdicts.append((f'{workload} {enc} added p50', ok))
                elif higher_better and hm is not None:
                    ok = pm >= hm
                    target = f'≥ HAProxy: {"met" if ok else "MISSED"}'
                    verdicts.append((f'{workload} {enc} throughput vs HAProxy',
                                     ok))
                elif higher_better:
                    ok = ratio >= TARGET_THROUGHPUT_RATIO
                    target = (f'≥ {TARGET_THROUGHPUT_RATIO:.2f}×: '
                              f'{"met" if ok else "MISSED"}')
                    verdicts.append((f'{workload} {enc} throughput', ok))
                label = metric if metric == unit else f'{metric} ({unit})'
                cells = [TITLES[workload], enc, label, fmt(dm, unit),
                         fmt(pm, unit), f'{ratio:.3f}', added]
                spread_of = [d, p]
                if haproxy and hm is not None:
                    cells.append(fmt(hm, unit))
                    if higher_better:
                        cells += [f'{hm / dm:.3f}×', f'{pm / hm:.3f}×']
                    else:
                        cells += [f'{_added_us(dm, hm, unit):+.1f} µs',
                                  f'{_added_us(hm, pm, unit):+.1f} µs']
                    spread_of.append(h)
                elif haproxy:
                    cells += ['', '', '']
                cells.append(target)
                b = runs['baseline']
                if baseline and b:
                    bm = statistics.median(b)
                    cells.append(fmt(bm, unit))
                    cells.append(f'{bm / dm:.3f}×' if higher_better else
                                 f'{_added_us(dm, bm, unit):+.1f} µs')
                    spread_of.append(b)
                elif baseline:
                    cells += ['', '']
                cells.append(f'{max(spread(x) for x in spread_of):.0f}%')
                lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines), verdicts


def proxy_label_of(args):
    return 'forwarder' if args.self_test else 'zrelay'


def cpu_table(samples, workloads, encodings, modes, proxy_label):
    """Proxy CPU time (user + system) per round trip in the raw workloads,
    summed over all runs of a mode: far less sensitive to a busy machine
    than wall-clock latency (10 ms clock ticks over thousands of round
    trips)."""
    names = {'proxied': proxy_label, 'haproxy': 'HAProxy',
             'baseline': 'C relay'}
    shown = [m for m in modes if m in names]
    lines = ['| workload | enc | ' + ' | '.join(
                 f'{names[m]} CPU µs/round trip' for m in shown) + ' |',
             '|---|---|' + '---:|' * len(shown)]
    for workload in workloads:
        if workload not in ('load', 'ping'):
            continue
        for enc in encodings:
            cells = []
            for m in shown:
                cpu = samples.get((workload, enc, 'cpu_s', m))
                n = samples.get((workload, enc, 'n', m))
                cells.append(f'{sum(cpu) / sum(n) * 1e6:.1f}'
                             if cpu and n and sum(n) else '–')
            lines.append(f'| {TITLES[workload]} | {enc} | '
                         + ' | '.join(cells) + ' |')
    return '\n'.join(lines) if len(lines) > 2 else ''


def machine_info(args):
    info = P.machine_info(['ZEO', 'ZODB', 'msgpack'])
    if args.self_test:
        info.append(('proxy', 'SELF-TEST: Python forwarder (bench/forwarder.py), '
                              'not zrelay'))
    else:
        info.append(P.zrelay_line(args.zrelay))
    info.append(('backend link', 'unix socket (runzeo, direct clients and '
                 'proxies on it)' if args.backend_unix else 'TCP loopback'))
    if args.haproxy:
        v = subprocess.run([args.haproxy, '-v'], capture_output=True,
                           text=True, timeout=10).stdout.split('\n')[0]
        info.append(('HAProxy', f'{v.strip()} (mode tcp, nbthread 1)'))
    return info


def proxy_lines(endpoints, proxy_label, cpu_seconds):
    out = []
    for ep in endpoints:
        st = ep.proxy.status()
        if not st:
            out.append(f'- {proxy_label} ({ep.encoding}): RSS not available')
            continue
        out.append(
            f'- {proxy_label} in front of the {ep.encoding} server: '
            f'VmRSS after the run **{st.get("VmRSS", 0) / 1024:.1f} MiB** '
            f'(peak VmHWM {st.get("VmHWM", 0) / 1024:.1f} MiB; '
            f'{ep.proxy_rss_start.get("VmRSS", 0) / 1024:.1f} MiB at start); '
            f'CPU time used {cpu_seconds[ep.encoding]:.1f} s')
    return out


def render(table, verdicts, proxy_lines_, other_cores, settings, args,
           wall, modes):
    met = sum(ok for _, ok in verdicts)
    missed = [name for name, ok in verdicts if not ok]
    summary = f'Targets met: {met}/{len(verdicts)}'
    if missed:
        summary += ' (missed: ' + ', '.join(missed) + ')'
    order = ('rotating ' + '/'.join(modes) if len(modes) > 2
             else 'alternating direct/proxied')
    params = (f'{settings.runs} runs per mode, {order}; '
              f'{settings.n_objects} distinct objects loaded per load run, '
              f'{settings.n_pings} pings per run, '
              f'{settings.commit_seconds:g} s per commit run'
              + ('; --quick' if args.quick else ''))
    other = ', '.join(f'{w} {c:.2f}' for w, c in other_cores.items())
    return '\n'.join([
        table, '',
        summary, '',
        *proxy_lines_,
        f'- CPU used by other processes on the machine meanwhile, in cores '
        f'(of {len(os.sched_getaffinity(0))}): {other}', '',
        f'Medians over runs. ratio = proxied / direct; added = proxied − '
        f'direct; '
        + (f'{proxy_label_of(args)} vs HAProxy = its value − HAProxy\'s '
           f'(latency) or its value / HAProxy\'s (throughput); '
           if args.haproxy else '')
        + f'spread = largest (max − min) / median of either column. '
        f'{params}. Total {wall:.0f} s.',
    ])


# ------------------------------------------------------------------ main ----

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description='Benchmark ZEO direct vs through zrelay (prints a '
                    'markdown table; see docs/benchmarks.md).')
    ap.add_argument('--zrelay', default=os.path.join(REPO, 'target', 'release',
                                                     'zrelay'),
                    help='zrelay binary (default: target/release/zrelay)')
    ap.add_argument('--runs', type=int, default=0,
                    help='runs per workload, encoding and mode (default 5; '
                         '2 with --quick)')
    ap.add_argument('--quick', action='store_true',
                    help='small counts and short runs: a smoke run, not numbers')
    ap.add_argument('--only', action='append', choices=WORKLOADS,
                    metavar='WORKLOAD',
                    help=f'run only this workload (repeatable): '
                         f'{", ".join(WORKLOADS)}')
    ap.add_argument('--encoding', choices=ENCODINGS + ('both',), default='both',
                    help='which server(s) to measure (default both)')
    ap.add_argument('--loads', type=int, default=0,
                    help='objects written and loaded per load run (default 2000)')
    ap.add_argument('--pings', type=int, default=0,
                    help='pings per ping run (default 2000)')
    ap.add_argument('--seconds', type=float, default=0,
                    help='duration of each commit run (default 2.0)')
    ap.add_argument('--zrelay-log-level', default='warn', metavar='LEVEL',
                    help='zrelay log_level (default warn); its log is in the '
                         'temporary directory, see --keep')
    ap.add_argument('--baseline', action='store_true',
                    help='also measure through bench/baseline_relay.c (built '
                         'with cc), a minimal relay: what any same-host '
                         'proxy costs on this machine')
    ap.add_argument('--haproxy', default='haproxy', metavar='PATH',
                    help='haproxy binary measured beside zrelay (default: '
                         'haproxy on PATH; scripts/ensure-bench-tools.sh '
                         'installs it)')
    ap.add_argument('--no-haproxy', dest='haproxy', action='store_const',
                    const=None, help='do not measure HAProxy')
    ap.add_argument('--backend-unix', action='store_true',
                    help='runzeo listens on a unix socket: direct clients '
                         'and the proxies reach it there (clients still '
                         'reach the proxies over TCP)')
    ap.add_argument('--self-test', action='store_true',
                    help='put a trivial Python forwarder where zrelay goes, '
                         'to check the script without a zrelay build')
    ap.add_argument('--out', default=None,
                    help='markdown file to write (default '
                         'bench/results-latest.md; none with --self-test)')
    ap.add_argument('--wait-idle', type=float, default=0, metavar='SECONDS',
                    help='before measuring, wait up to SECONDS for other '
                         'processes to leave the CPUs alone (default 0)')
    ap.add_argument('--keep', action='store_true',
                    help='keep the temporary directory (data and logs)')
    args = ap.parse_args(argv)
    if args.runs < 0 or args.loads < 0 or args.pings < 0 or args.seconds < 0:
        ap.error('counts and durations must be positive')
    if not args.self_test:
        args.zrelay = os.path.abspath(args.zrelay)
        if not os.access(args.zrelay, os.X_OK):
            ap.error(f'no zrelay binary at {args.zrelay} (build it with '
                     f'`cargo build --release`, or use --self-test)')
    if args.haproxy:
        found = shutil.which(args.haproxy)
        if not found:
            ap.error(f'no haproxy at {args.haproxy!r}: run '
                     f'scripts/ensure-bench-tools.sh (or pass --no-haproxy)')
        args.haproxy = found
    if args.backend_unix and (args.baseline or args.self_test):
        ap.error('--backend-unix: the C relay and the forwarder speak TCP only')
    if args.out is None and not args.self_test:
        args.out = os.path.join(HERE, 'results-latest.md')
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = Settings(args)
    workloads = [w for w in WORKLOADS if not args.only or w in args.only]
    encodings = ENCODINGS if args.encoding == 'both' else (args.encoding,)
    proxy_label = proxy_label_of(args)
    modes = (MODES + (('haproxy',) if args.haproxy else ())
             + (('baseline',) if args.baseline else ()))

    # Fork the ZODB client workers first, while this process has no thread.
    pool = W.WorkerPool(N_WORKERS)
    procs = P.Procs()
    other = P.OtherLoad(lambda: [os.getpid()] + [p.pid for p in pool.procs]
                        + [p.pid for p in procs.procs])
    tmp = tempfile.mkdtemp(prefix='zrelay-bench-')
    failed = False
    try:
        log(f'starting runzeo ×{len(encodings)} and {proxy_label} ×'
            f'{len(encodings)} in {tmp}')
        endpoints = start_topology(procs, tmp, args, encodings)
        oids = {}
        for ep in endpoints:
            preflight(ep, modes)
            ep.proxy_rss_start = ep.proxy.status()
            log(f'{ep.encoding}: populating {settings.n_objects} objects')
            oids[ep.encoding] = pool.populate(
                host=HOST, port=ep.server_port, n_load=settings.n_objects,
                n_workers=N_WORKERS)
        if args.wait_idle:
            other.wait_quiet(args.wait_idle, log=log)
        cpu0 = {ep.encoding: ep.proxy.cpu_seconds() for ep in endpoints}
        samples, other_cores = run_all(endpoints, settings, pool, oids,
                                       workloads, other, modes)
        cpu = {ep.encoding: ep.proxy.cpu_seconds() - cpu0[ep.encoding]
               for ep in endpoints}
        for ep in endpoints:
            if not ep.proxy.alive():
                raise RuntimeError(f'{ep.proxy.name} died during the run; log:'
                                   f'\n{P.tail(ep.proxy.log_path)}')
        table, verdicts = build_table(samples, workloads, encodings,
                                      proxy_label, args.baseline,
                                      bool(args.haproxy))
        cpu_tab = cpu_table(samples, workloads, encodings, modes,
                            proxy_label)
        if cpu_tab:
            table += '\n\nProxy CPU per round trip (user + system, all runs):\n\n' + cpu_tab
        info = machine_info(args)
        body = render(table, verdicts,
                      proxy_lines(endpoints, proxy_label, cpu), other_cores,
                      settings, args, time.monotonic() - T0, modes)
    except Exception:           # not on Ctrl-C: then just clean up
        failed = True
        raise
    finally:
        pool.close()
        procs.stop_all()
        if args.keep or failed:
            log(f'kept {tmp} (data and logs)')
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(body)
    if args.out:
        P.write_results(args.out, 'benchmark', 'bench.py', None, info, body)
        log(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    P.run_main(main, 'bench', (W.WorkerError, zeoraw.ProtocolError, zeoraw.ServerError, EOFError))
