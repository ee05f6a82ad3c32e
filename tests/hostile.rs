//! Hostile clients against the real binary (loopback only, bounded): many
//! connections from one address, frames announcing 200 MB, a client that
//! stops reading its replies, and thousands of tiny async messages. For
//! each, zrelay's RSS (from /proc) stays under the client buffer budget plus
//! a fixed overhead, and a well-behaved client (another loopback address)
//! keeps committing.
//!
//! Hostile connections come from their own 127.0.0.x source addresses, so
//! the per-peer limit applies to them and not to the well-behaved client.

mod support;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::cluster::{http_get, metric_value, wait_until};
use support::{
    encode_call, framed, free_port, scenario, scenario_cmd, Addr, Enc, Relay, RelayOpts, Val, Zeo,
    ZeoOpts,
};

const MIB: u64 = 1024 * 1024;
const BUDGET: u64 = 32 * MIB;
const PER_PEER: usize = 20;
/// RSS allowed above the quiet baseline besides the budget: the sessions'
/// free buffers (256 KiB each at most), allocator slack, socket buffers.
const OVERHEAD: u64 = 40 * MIB;

/// A `kB` field of /proc/PID/status, in bytes.
fn status_bytes(pid: i32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
    kb * 1024
}

/// Samples the process's RSS (`VmRSS`) and private writable address space
/// (`VmData`: what it allocated, touched or not) every 10 ms and keeps the
/// peaks since they were last taken.
struct RssWatch {
    peak: Arc<AtomicU64>,
    data_peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: i32) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(0));
        let data_peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, d, s) = (peak.clone(), data_peak.clone(), stop.clone());
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(status_bytes(pid, "VmRSS:"), Ordering::Relaxed);
                d.fetch_max(status_bytes(pid, "VmData:"), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(10));
            }
        });
        RssWatch {
            peak,
            data_peak,
            stop,
            thread: Some(thread),
        }
    }

    /// Peak RSS since the last call.
    fn take_peak(&self) -> u64 {
        self.peak.swap(0, Ordering::Relaxed)
    }

    /// Peak VmData since the last call.
    fn take_data_peak(&self) -> u64 {
        self.data_peak.swap(0, Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP connection to `to` from the loopback address 127.0.0.`src`.
fn connect_from(src: u8, to: &Addr) -> std::io::Result<TcpStream> {
    let Addr::Tcp(to) = to else {
        panic!("TCP only")
    };
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, src)), 0).into())?;
    sock.connect_timeout(&(*to).into(), Duration::from_secs(5))?;
    let s: TcpStream = sock.into();
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads one frame within `timeout`: `Ok(None)` on EOF.
fn read_frame(s: &mut TcpStream, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
    s.set_read_timeout(Some(timeout))?;
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf)?;
    Ok(Some(buf))
}

/// Handshake and `register('1', False)`; returns the stream.
fn registered_from(src: u8, to: &Addr, enc: Enc) -> TcpStream {
    let mut s = connect_from(src, to).expect("connect");
    read_frame(&mut s, Duration::from_secs(10))
        .expect("offer")
        .expect("offer before EOF");
    s.write_all(&framed(enc.protocol())).unwrap();
    let reg = encode_call(
        enc,
        1,
        false,
        "register",
        &[Val::Str("1"), Val::Bool(false)],
    );
    s.write_all(&framed(&reg)).unwrap();
    loop {
        let f = read_frame(&mut s, Duration::from_secs(10))
            .expect("register reply")
            .expect("register reply before EOF");
        if support::contains(&f, b".reply") {
            return s;
        }
    }
}

fn closed_within(s: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

struct Bench {
    enc: Enc,
    _zeo: Zeo,
    relay: Relay,
    admin: SocketAddr,
}

impl Bench {
    fn metric(&self, sample: &str) -> f64 {
        let (code, body) = http_get(self.admin, "/metrics");
        assert_eq!(code, 200);
        metric_value(&body, sample)
    }
}

/// Sends bursts of 20000 async `ping`s, each followed by one sync call
/// whose reply proves the burst went through, for about 3 seconds.
fn async_bursts(src: u8, to: &Addr, enc: Enc) {
    let mut chatty = registered_from(src, to, enc);
    let ping = framed(&encode_call(enc, 0, true, "ping", &[]));
    let mut burst = Vec::new();
    for _ in 0..20_000 {
        burst.extend_from_slice(&ping);
    }
    burst.extend(framed(&encode_call(enc, 7, false, "lastTransaction", &[])));
    chatty
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut bursts = 0;
    while bursts == 0 || started.elapsed() < Duration::from_secs(3) {
        chatty.write_all(&burst).expect("send 20000 async messages");
        loop {
            let f = read_frame(&mut chatty, Duration::from_secs(30))
                .expect("lastTransaction reply")
                .expect("reply before EOF");
            if support::contains(&f, b".reply") {
                break;
            }
        }
        bursts += 1;
    }
    eprintln!(
        "{bursts} bursts of 20000 async messages to {to} in {:?}",
        started.elapsed()
    );
}

fn parse_stat(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
fn hostile_clients_stay_within_budget() {
    let enc = Enc::Pickle;
    let zeo = Zeo::start(enc, ZeoOpts::default());
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let relay = Relay::start(
        zeo.addr(),
        RelayOpts {
            top: format!("log_level = \"info\"\n[admin]\nlisten = \"{admin}\"\n"),
            client: format!(
                "buffer_budget_bytes = {BUDGET}\nbuffer_wait_ms = 2000\n\
                 max_connections_per_peer = {PER_PEER}\nwrite_stall_timeout_ms = 3000\n"
            ),
            ..RelayOpts::default()
        },
    );
    let mut b = Bench {
        enc,
        _zeo: zeo,
        relay,
        admin,
    };
    let front = b.relay.addr().clone();
    // A root record of ~300 KB (the "basic" scenario's root['big']).
    scenario("basic", enc, &[&front]);

    let watch = RssWatch::start(b.relay.pid());
    let mut worker = scenario_cmd("garbage-neighbour", enc, &[&front]).spawn();
    worker.expect_line("READY", Duration::from_secs(60));
    // A quiet measuring period for the worker's commit latency.
    thread::sleep(Duration::from_secs(3));
    worker.send_line("mark");
    let quiet = worker.expect_prefix("stats ", Duration::from_secs(30));
    let baseline = watch.take_peak();
    eprintln!("quiet: {quiet}; zrelay RSS {} MiB", baseline / MIB);
    let limit = baseline + BUDGET + OVERHEAD;
    let mut report = Vec::new();
    let mut phase = |name: &str, worker: &mut support::PyChild| {
        worker.send_line("mark");
        let stats = worker.expect_prefix("stats ", Duration::from_secs(60));
        let peak = watch.take_peak();
        eprintln!(
            "{name}: {stats}; zrelay RSS peak {} MiB (limit {} MiB)",
            peak / MIB,
            limit / MIB
        );
        assert!(
            parse_stat(&stats, "commits") >= 1.0,
            "{name}: no commit: {stats}"
        );
        assert!(peak <= limit, "{name}: RSS {peak} over {limit}");
        report.push((name.to_string(), stats, peak));
    };

    // 1. Many connections from one address: PER_PEER get the offer, the
    // rest are closed at once; another address is unaffected.
    let mut conns = Vec::new();
    let (mut greeted, mut closed) = (0, 0);
    for _ in 0..(PER_PEER * 5) {
        let mut s = connect_from(2, &front).expect("connect");
        match read_frame(&mut s, Duration::from_secs(10)) {
            Ok(Some(offer)) => {
                assert_eq!(&offer[..], enc.protocol());
                greeted += 1;
            }
            Ok(None) => closed += 1,
            Err(e) => panic!("neither an offer nor a close: {e}"),
        }
        conns.push(s);
    }
    assert_eq!((greeted, closed), (PER_PEER, PER_PEER * 4));
    let mut other = connect_from(3, &front).unwrap();
    assert!(read_frame(&mut other, Duration::from_secs(10))
        .unwrap()
        .is_some());
    assert!(
        b.metric("zrelay_client_connections_refused_total{reason=\"per_peer_limit\"}")
            >= (PER_PEER * 4) as f64
    );
    phase("many connections from one address", &mut worker);
    drop(conns);
    drop(other);

    // 2. Frames announcing 200 MB, sent as fast as zrelay takes them, from
    // four addresses at once: the budget stops reading them (backpressure)
    // and each is closed after buffer_wait_ms without budget.
    // Nor is the announced length allocated (not even as untouched address
    // space): buffers grow with the bytes that arrived.
    let data_before = watch.take_data_peak();
    let senders: Vec<_> = (4..8u8)
        .map(|src| {
            let front = front.clone();
            thread::spawn(move || {
                let mut s = registered_from(src, &front, enc);
                s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut sent = 0u64;
                let chunk = vec![0x55u8; MIB as usize];
                let _ = s.write_all(&(200 * MIB as u32).to_be_bytes());
                while sent < 200 * MIB {
                    match s.write(&chunk) {
                        Ok(n) => sent += n as u64,
                        Err(_) => break,
                    }
                }
                let closed = closed_within(&mut s, Duration::from_secs(30));
                (sent, closed)
            })
        })
        .collect();
    for t in senders {
        let (sent, closed) = t.join().unwrap();
        eprintln!(
            "200 MB frame: {} MiB written before the relay pushed back",
            sent / MIB
        );
        assert!(sent < 200 * MIB, "the whole 200 MB frame was taken");
        assert!(closed, "the stalled session was not closed");
    }
    let data_peak = watch.take_data_peak();
    eprintln!(
        "200 MB frames: zrelay VmData {} MiB before, peak {} MiB",
        data_before / MIB,
        data_peak / MIB
    );
    // Capacity runs up to a few times the bytes held (doubling growth) and
    // the bytes held are bounded by the budget: measured 128 MiB above the
    // start here; reserving the announced lengths was 4 x 200 MB.
    assert!(
        data_peak <= data_before + 6 * BUDGET + OVERHEAD,
        "VmData {data_peak} vs {data_before} before: announced lengths were reserved"
    );
    assert!(b.metric("zrelay_client_buffer_stalls_total") >= 1.0);
    assert!(b.metric("zrelay_client_sessions_ended_total{reason=\"buffer_budget\"}") >= 1.0);
    wait_until(Duration::from_secs(10), "budget released", || {
        b.metric("zrelay_client_buffered_bytes") == 0.0
    });
    phase("frames announcing 200 MB", &mut worker);

    // 3. A client that stops reading its replies: 300 loads of the 300 KB
    // root record (90 MB of replies) and never a read.
    let mut lazy = registered_from(8, &front, enc);
    let root = [0u8; 8];
    let maxtid = [0x7fu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
    let mut batch = Vec::new();
    for i in 0..300 {
        batch.extend(framed(&encode_call(
            enc,
            100 + i,
            false,
            "loadBefore",
            &[Val::Bytes(&root), Val::Bytes(&maxtid)],
        )));
    }
    lazy.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = lazy.write_all(&batch);
    // zrelay stops reading that session, then closes it after
    // write_stall_timeout_ms without progress (its replies, and every later
    // invalidation, would otherwise pile up in runzeo).
    wait_until(Duration::from_secs(30), "stalled client closed", || {
        b.metric("zrelay_client_sessions_ended_total{reason=\"client_stalled\"}") >= 1.0
    });
    assert!(
        closed_within(&mut lazy, Duration::from_secs(30)),
        "not closed"
    );
    phase("a client not reading its replies", &mut worker);
    drop(lazy);

    // 4. Thousands of tiny async messages without a sync call, then one
    // sync call that must be answered after all of them; repeated for a
    // few seconds so the worker's latency is measured under the load.
    async_bursts(9, &front, enc);
    phase("20000 tiny async messages", &mut worker);

    worker.send_line("stop");
    let out = worker.finish();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("commits="), "{stdout}");
    b.relay.assert_running();
    assert!(!b.relay.log().contains("panicked"));
    // The same async bursts straight at runzeo, with a direct worker: the
    // ZEO server runs each connection's messages in order on one thread, so
    // a flood of async calls delays everyone's commits there too. zrelay
    // must not make that worse.
    let zeo_addr = b._zeo.addr().clone();
    let mut direct = scenario_cmd("garbage-neighbour", enc, &[&zeo_addr]).spawn();
    direct.expect_line("READY", Duration::from_secs(60));
    direct.send_line("mark");
    direct.expect_prefix("stats ", Duration::from_secs(30));
    async_bursts(10, &zeo_addr, enc);
    direct.send_line("mark");
    let direct_stats = direct.expect_prefix("stats ", Duration::from_secs(60));
    eprintln!("20000 tiny async messages, direct to runzeo: {direct_stats}");
    direct.send_line("stop");
    direct.finish();
    let q50 = parse_stat(&quiet, "p50_ms");
    for (name, stats, _) in &report {
        if name.contains("async") {
            // Bounded by the backend's own behaviour under the same flood.
            let (p90, d90) = (
                parse_stat(stats, "p90_ms"),
                parse_stat(&direct_stats, "p90_ms"),
            );
            assert!(
                p90 <= 2.0 * d90 + 50.0,
                "{name}: commit p90 {p90} ms through zrelay vs {d90} ms direct"
            );
            continue;
        }
        let p50 = parse_stat(stats, "p50_ms");
        // 2x the quiet median is the goal (see docs/benchmarks.md for the
        // measured values); the bound leaves room for a loaded CI host.
        assert!(
            p50 <= 3.0 * q50 + 25.0,
            "{name}: commit p50 {p50} ms vs {q50} ms quiet"
        );
    }
    let _ = b.enc;
}
