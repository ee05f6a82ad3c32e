"""Child processes for the benchmark: runzeo servers and proxies.

Every process is started by ``Procs.spawn`` and stopped by its PID (SIGTERM,
then SIGKILL after a bounded wait) from ``Procs.stop_all``, which the
benchmark calls in a ``finally``. Children also get ``PR_SET_PDEATHSIG`` so a
benchmark killed with SIGKILL does not leave them behind, and their own
session so a Ctrl-C in the terminal reaches only the benchmark, which then
stops them in order.
"""
import ctypes
import datetime
import importlib.metadata
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import time

HOST = '127.0.0.1'
_PR_SET_PDEATHSIG = 1


def _die_with_parent():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:          # not Linux: cleanup relies on stop_all alone
        pass


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port):
    """Is something listening on 127.0.0.1:*port* (or, for a str, on the
    unix socket at that path)?

    Read from /proc/net/tcp rather than by connecting, so that neither
    runzeo nor the proxy sees (and logs) a probe connection.
    """
    if isinstance(port, str):
        return os.path.exists(port) and _unix_listening(port)
    want = f'0100007F:{port:04X}'
    try:
        with open('/proc/net/tcp') as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1] == want and fields[3] == '0A':   # TCP_LISTEN
                    return True
        return False
    except (OSError, StopIteration, IndexError):
        try:            # no /proc: fall back to a probe connection
            socket.create_connection((HOST, port), timeout=0.5).close()
            return True
        except OSError:
            return False


def tail(path, lines=20):
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError:
        return ''


class Proc:
    def __init__(self, name, popen, log_path):
        self.name = name
        self.popen = popen
        self.log_path = log_path

    @property
    def pid(self):
        return self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def wait_port(self, port, timeout=30.0):
        """Wait until *port* accepts connections; fail if the process dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f'{self.name} exited with {self.popen.returncode}; '
                    f'log {self.log_path}:\n{tail(self.log_path)}')
            if listening(port):
                return
            time.sleep(0.05)
        raise RuntimeError(f'{self.name} did not listen on {port} within '
                           f'{timeout:.0f}s; log {self.log_path}:\n'
                           f'{tail(self.log_path)}')

    def status(self):
        """``/proc/PID/status`` fields in kB (VmRSS, VmHWM)."""
        out = {}
        try:
            with open(f'/proc/{self.pid}/status') as f:
                for line in f:
                    key, _, value = line.partition(':')
                    if key in ('VmRSS', 'VmHWM'):
                        out[key] = int(value.split()[0])
        except OSError:
            pass
        return out

    def cpu_seconds(self):
        return pid_cpu_seconds(self.pid)


def pid_cpu_seconds(pid):
    """user + system CPU time a process has used so far (all threads)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError):
        return float('nan')


def system_busy_seconds():
    """CPU time all cores have spent busy (not idle or iowait) since boot."""
    try:
        with open('/proc/stat') as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float('nan')
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / os.sysconf('SC_CLK_TCK')


class OtherLoad:
    """How much CPU processes outside the benchmark use (in cores).

    The machine's busy time minus the CPU time of the benchmark's own
    processes (``pids()``): a measure of how disturbed a run was.
    """

    def __init__(self, pids):
        self.pids = pids

    def sample(self):
        ours = sum(pid_cpu_seconds(p) for p in self.pids())
        return time.monotonic(), system_busy_seconds(), ours

    @staticmethod
    def cores(a, b):
        dt = b[0] - a[0]
        if dt <= 0:
            return float('nan')
        return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / dt

    def wait_quiet(self, max_seconds, threshold=0.25, log=None):
        """Wait (bounded) until others use less than *threshold* cores."""
        deadline = time.monotonic() + max_seconds
        while True:
            a = self.sample()
            time.sleep(1.0)
            load = self.cores(a, self.sample())
            if load < threshold:
                return load
            if time.monotonic() >= deadline:
                if log:
                    log(f'machine still busy ({load:.2f} cores used by other '
                        f'processes); measuring anyway')
                return load
            if log:
                log(f'waiting for a quiet machine: {load:.2f} cores used by '
                    f'other processes')


class Procs:
    def __init__(self):
        self.procs = []

    def spawn(self, name, argv, log_path, cwd=None, env=None):
        log = open(log_path, 'ab')
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=cwd, env=env,
                start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc, timeout=15.0):
        p = proc.popen
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGTERM)
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f'bench: {proc.name} (pid {p.pid}) ignored SIGTERM for '
                      f'{timeout:.0f}s; killing it', file=sys.stderr)
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5)
            except ProcessLookupError:
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self):
        # Proxies first (they were started after their servers).
        for proc in reversed(list(self.procs)):
            try:
                self.stop(proc)
            except Exception as e:      # keep stopping the others
                print(f'bench: stopping {proc.name}: {e}', file=sys.stderr)


def _unix_listening(path):
    """A unix socket path is listening if it is in /proc/net/unix with the
    listening flag (no probe connection)."""
    try:
        with open('/proc/net/unix') as f:
            next(f)
            for line in f:
                fields = line.split()
                # Flags 00010000 = __SO_ACCEPTCON (listening).
                if len(fields) >= 8 and fields[-1] == path and \
                        fields[3] == '00010000':
                    return True
    except (OSError, StopIteration):
        pass
    return False


def address(host, port):
    """A ZEO/zrelay address string: HOST:PORT, or a unix socket path."""
    return port if isinstance(port, str) else f'{host}:{port}'


def client_addr(host, port):
    """A ClientStorage/socket address: (host, port) or a unix socket path."""
    return port if isinstance(port, str) else (host, port)


def runzeo_conf(path, port, data_dir, msgpack):
    conf = f"""\
<zeo>
  address {address(HOST, port)}
  msgpack {'true' if msgpack else 'false'}
</zeo>
<filestorage 1>
  path {os.path.join(data_dir, 'Data.fs')}
</filestorage>
<eventlog>
  level WARNING
  <logfile>
    path {os.path.join(data_dir, 'zeo.log')}
  </logfile>
</eventlog>
"""
    with open(path, 'w') as f:
        f.write(conf)


def zrelay_conf(path, listen_port, backend_port, log_level='warn'):
    with open(path, 'w') as f:
        f.write(f"""\
log_level = "{log_level}"
[client]
listen = "{HOST}:{listen_port}"
[backend]
address = "{address(HOST, backend_port)}"
""")


# ------------------------------------------------- shared by the benches ----

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def percentile(sorted_values, q):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float('nan')
    k = math.ceil(q / 100.0 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, k))]


def git_rev():
    try:
        rev = subprocess.run(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'],
                             capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return 'no commit yet (uncommitted work tree)'
        dirty = subprocess.run(['git', '-C', REPO, 'status', '--porcelain',
                                '--untracked-files=no'],
                               capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + (' (dirty)' if dirty.stdout.strip() else '')
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def zrelay_version(path):
    try:
        out = subprocess.run([path, '--version'], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


def package_version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


def machine_info(packages):
    """(label, value) pairs describing this machine and the Python packages
    named, for the header of a results file."""
    cpu = 'unknown'
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    return [
        ('date', datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')),
        ('nproc', str(len(os.sched_getaffinity(0)))),
        ('CPU', cpu),
        ('kernel', f'{platform.system()} {platform.release()}'),
        ('Python', platform.python_version()),
        (' / '.join(packages), ' / '.join(package_version(p) for p in packages)),
    ]


def zrelay_line(path):
    return ('zrelay', f'{zrelay_version(path)}, git {git_rev()}, '
                      f'{os.path.relpath(path, REPO)}')


def write_results(path, title, script, section, info, body):
    """Writes a results file: a heading, where the method is documented
    (*section* of docs/benchmarks.md), the machine (*info*: (key, value)
    pairs), then the report *body*."""
    with open(path, 'w') as f:
        f.write(f'# zrelay {title}: latest results\n\n'
                f'Written by `bench/{script}`; method in '
                f'`docs/benchmarks.md`{f" ({section})" if section else ""}.'
                f'\n\n')
        for key, value in info:
            f.write(f'- {key}: {value}\n')
        f.write('\n' + body + '\n')


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def run_main(main, name, errors=()):
    """A bench's entry point: exit with main()'s code, 130 on Ctrl-C, 1 with
    a one-line message for the failures a bench expects (a process that did
    not start, a refused connection, a protocol error): no traceback.
    SIGTERM and SIGHUP exit like Ctrl-C does, through main()'s cleanup
    (every child stopped, temporary directories removed)."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f'{name}: interrupted', file=sys.stderr)
        sys.exit(130)
    except (RuntimeError, OSError, subprocess.CalledProcessError) + tuple(errors) as e:
        print(f'{name}: error: {e}', file=sys.stderr)
        sys.exit(1)
