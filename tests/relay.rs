//! The foundation relay against real components: an unmodified `runzeo`
//! backend, the `zrelay` binary, and real ZEO clients (`tests/py`).
//!
//! Every test builds its own runzeo + zrelay. `ZRELAY_TEST_DIRECT=1` runs
//! the client scenarios and the garbage tests that runzeo itself passes
//! straight against runzeo instead (the others still use the relay): a
//! scenario that passes direct but fails through the relay is a relay bug.
//!
//! Needs `<repo>/.venv` (`make test` or `scripts/ensure-venv.sh`).

mod support;

use std::time::{Duration, Instant};

use support::{
    scenario, scenario_cmd, Addr, Enc, Raw, Relay, RelayOpts, Val, Zeo, ZeoOpts, CLOSE_TIMEOUT,
};

/// A backend and, unless `ZRELAY_TEST_DIRECT` is set, a relay in front.
struct Stack {
    enc: Enc,
    zeo: Zeo,
    relay: Option<Relay>,
}

fn direct() -> bool {
    std::env::var_os("ZRELAY_TEST_DIRECT").is_some_and(|v| v != "0")
}

impl Stack {
    /// For tests runzeo passes on its own: direct under `ZRELAY_TEST_DIRECT`.
    fn new(enc: Enc) -> Stack {
        let zeo = Zeo::start(enc, ZeoOpts::default());
        let relay = (!direct()).then(|| Relay::start(zeo.addr(), RelayOpts::default()));
        Stack { enc, zeo, relay }
    }

    /// Always through the relay.
    fn relayed(enc: Enc, zeo_opts: ZeoOpts, relay_opts: RelayOpts) -> Stack {
        let zeo = Zeo::start(enc, zeo_opts);
        let relay = Some(Relay::start(zeo.addr(), relay_opts));
        Stack { enc, zeo, relay }
    }

    /// Where clients connect.
    fn front(&self) -> &Addr {
        self.relay.as_ref().map_or(self.zeo.addr(), Relay::addr)
    }

    fn relay(&mut self) -> &mut Relay {
        self.relay.as_mut().expect("this test needs the relay")
    }

    fn run(&self, name: &str) {
        scenario(name, self.enc, &[self.front()]);
    }

    /// The relay (if any) is still up and has not panicked.
    fn assert_relay_healthy(&mut self) {
        if let Some(relay) = self.relay.as_mut() {
            relay.assert_running();
            assert!(
                !relay.log().contains("panicked"),
                "zrelay panicked:\n{}",
                relay.log()
            );
        }
    }
}

/// A real client keeps committing (and reading back through a second
/// connection) while `abuse` runs; afterwards it must commit again, and it
/// must not have seen a single error or disconnect.
fn while_client_works(stack: &mut Stack, abuse: impl FnOnce(&mut Stack)) {
    let mut worker = scenario_cmd("garbage-neighbour", stack.enc, &[stack.front()]).spawn();
    worker.expect_line("READY", Duration::from_secs(60));
    abuse(stack);
    worker.send_line("stop");
    let out = worker.finish();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("commits="), "worker output: {stdout}");
    stack.assert_relay_healthy();
}

// ----------------------------------------------- client scenarios (real ZEO)

macro_rules! scenario_tests {
    ($($test:ident: $enc:ident $name:literal;)*) => {$(
        #[test]
        fn $test() {
            let mut stack = Stack::new(Enc::$enc);
            stack.run($name);
            stack.assert_relay_healthy();
        }
    )*};
}

scenario_tests! {
    basic_pickle: Pickle "basic";
    basic_msgpack: Msgpack "basic";
    invalidation_pickle: Pickle "invalidation";
    invalidation_msgpack: Msgpack "invalidation";
    conflict_pickle: Pickle "conflict";
    conflict_msgpack: Msgpack "conflict";
    resolved_pickle: Pickle "resolved";
    resolved_msgpack: Msgpack "resolved";
    undo_pickle: Pickle "undo";
    undo_msgpack: Msgpack "undo";
    pack_pickle: Pickle "pack";
    pack_msgpack: Msgpack "pack";
    history_pickle: Pickle "history";
    history_msgpack: Msgpack "history";
    iterator_pickle: Pickle "iterator";
    iterator_msgpack: Msgpack "iterator";
    blobs_pickle: Pickle "blobs";
    blobs_msgpack: Msgpack "blobs";
    concurrency_pickle: Pickle "concurrency";
    concurrency_msgpack: Msgpack "concurrency";
    ruok_pickle: Pickle "ruok";
    ruok_msgpack: Msgpack "ruok";
}

#[test]
fn unix_socket_backend() {
    let mut stack = Stack::relayed(
        Enc::Msgpack,
        ZeoOpts {
            unix_socket: true,
            ..ZeoOpts::default()
        },
        RelayOpts::default(),
    );
    assert!(matches!(stack.zeo.addr(), Addr::Unix(_)));
    stack.run("basic");
    stack.run("invalidation");
    stack.assert_relay_healthy();
}

// ------------------------------------------- garbage on a neighbouring socket

/// A named way to misbehave on a fresh raw connection.
type Case<'a> = (&'a str, &'a dyn Fn(&mut Raw));

/// Each case gets a fresh connection; the relay must close it promptly.
fn assert_cases_closed(front: &Addr, cases: &[Case]) {
    for (what, case) in cases {
        let mut raw = Raw::connect(front);
        case(&mut raw);
        let started = Instant::now();
        let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            raw.assert_closed(CLOSE_TIMEOUT)
        }));
        match got {
            Ok(bytes) => eprintln!(
                "{what}: closed after {:?}, {} bytes received",
                started.elapsed(),
                bytes.len()
            ),
            Err(e) => {
                eprintln!("case {what:?} failed");
                std::panic::resume_unwind(e);
            }
        }
    }
}

fn garbage_handshake(enc: Enc) {
    let mut stack = Stack::new(enc);
    let front = stack.front().clone();
    while_client_works(&mut stack, |_| {
        assert_cases_closed(
            &front,
            &[
                ("unknown protocol", &|r: &mut Raw| {
                    r.expect_frame(Duration::from_secs(10));
                    let _ = r.send_frame(b"\x00garbage\xff protocol");
                }),
                ("old protocol Z4", &|r: &mut Raw| {
                    r.expect_frame(Duration::from_secs(10));
                    let _ = r.send_frame(b"Z4");
                }),
            ],
        );
    });
}

#[test]
fn garbage_handshake_pickle() {
    garbage_handshake(Enc::Pickle);
}

#[test]
fn garbage_handshake_msgpack() {
    garbage_handshake(Enc::Msgpack);
}

#[test]
fn oversized_frame() {
    // runzeo has no limit and waits for the body forever: relay only.
    let mut stack = Stack::relayed(
        Enc::Pickle,
        ZeoOpts::default(),
        RelayOpts::client("max_message_bytes = 1048576"),
    );
    let front = stack.front().clone();
    while_client_works(&mut stack, |_| {
        assert_cases_closed(
            &front,
            &[
                ("4 GiB header instead of a handshake", &|r: &mut Raw| {
                    let _ = r.send(&[0xff, 0xff, 0xff, 0xff, b'Z', b'5']);
                }),
                ("unframed HTTP request (a 1.2 GB header)", &|r: &mut Raw| {
                    let _ = r.send(b"GET / HTTP/1.1\r\nHost: zrelay\r\n\r\n");
                }),
                ("2 MiB frame after register", &|r: &mut Raw| {
                    r.register(Enc::Pickle);
                    // Only the header and a few bytes: the relay must not
                    // wait for (or allocate) the announced body.
                    let mut bytes = (2u32 << 20).to_be_bytes().to_vec();
                    bytes.extend([0x80, 3, b'(']);
                    let _ = r.send(&bytes);
                }),
            ],
        );
    });
}

fn undecodable(enc: Enc) {
    let mut stack = Stack::new(enc);
    let front = stack.front().clone();
    let (garbage, wrong_shape, truncated): (&[u8], &[u8], &[u8]) = match enc {
        Enc::Pickle => (
            b"\x80\x03\xff\xfe not a pickle",
            b"\x80\x03K\x01K\x02\x86.", // (1, 2)
            b"\x80\x03(K\x01\x89X\x08\x00\x00\x00regi",
        ),
        Enc::Msgpack => (
            b"\xc1\xc1 not msgpack",
            b"\x92\x01\x02", // [1, 2]
            b"\x94\x01\xc2\xa8regi",
        ),
    };
    let register = |r: &mut Raw| {
        r.register(enc);
    };
    let handshake = |r: &mut Raw| {
        r.handshake(enc.protocol());
    };
    while_client_works(&mut stack, |_| {
        assert_cases_closed(
            &front,
            &[
                ("garbage before register", &|r: &mut Raw| {
                    handshake(r);
                    let _ = r.send_frame(garbage);
                }),
                ("garbage after register", &|r: &mut Raw| {
                    register(r);
                    let _ = r.send_frame(garbage);
                }),
                ("not a 4-tuple", &|r: &mut Raw| {
                    register(r);
                    let _ = r.send_frame(wrong_shape);
                }),
                ("truncated message", &|r: &mut Raw| {
                    register(r);
                    let _ = r.send_frame(truncated);
                }),
                ("unknown method", &|r: &mut Raw| {
                    register(r);
                    let _ =
                        r.send_frame(&support::encode_call(enc, 2, false, "no_such_method", &[]));
                }),
            ],
        );
    });
}

#[test]
fn undecodable_message_pickle() {
    undecodable(Enc::Pickle);
}

#[test]
fn undecodable_message_msgpack() {
    undecodable(Enc::Msgpack);
}

fn call_before_register(enc: Enc) {
    let mut stack = Stack::new(enc);
    let front = stack.front().clone();
    let call = |name: &'static str, args: Vec<Val<'static>>| {
        move |r: &mut Raw| {
            r.handshake(enc.protocol());
            let _ = r.send_frame(&support::encode_call(enc, 1, false, name, &args));
        }
    };
    let last = call("lastTransaction", vec![]);
    let load = call(
        "loadBefore",
        vec![
            Val::Bytes(&[0; 8]),
            Val::Bytes(&[0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
        ],
    );
    let begin = |r: &mut Raw| {
        r.handshake(enc.protocol());
        let args = [
            Val::Int(7),
            Val::Str("u"),
            Val::Str("d"),
            Val::Tuple(vec![]),
        ];
        let _ = r.send_frame(&support::encode_call(enc, 0, true, "tpc_begin", &args));
    };
    while_client_works(&mut stack, |_| {
        assert_cases_closed(
            &front,
            &[
                ("lastTransaction", &last),
                ("loadBefore", &load),
                ("async tpc_begin", &begin),
            ],
        );
    });
}

#[test]
fn call_before_register_pickle() {
    call_before_register(Enc::Pickle);
}

#[test]
fn call_before_register_msgpack() {
    call_before_register(Enc::Msgpack);
}

/// runzeo unpickles client messages with `builtins` allowed, so a message
/// naming `builtins.exec` runs code on the server before any register
/// (checked against runzeo directly). The relay must refuse pickles that
/// import globals instead of forwarding them.
#[test]
fn pickle_global_is_not_forwarded() {
    let mut stack = Stack::relayed(Enc::Pickle, ZeoOpts::default(), RelayOpts::default());
    let marker = stack.zeo.dir().join("pwned");
    let code = format!("open({:?}, 'w').close()", marker.display().to_string());
    let mut payload = b"\x80\x03cbuiltins\nexec\nX".to_vec();
    payload.extend(u32::try_from(code.len()).unwrap().to_le_bytes());
    payload.extend(code.as_bytes());
    payload.extend(b"\x85R.");
    let front = stack.front().clone();
    let mut raw = Raw::connect(&front);
    raw.handshake(b"Z5");
    let _ = raw.send_frame(&payload);
    raw.assert_closed(CLOSE_TIMEOUT);
    // A negative: give the backend a moment in which it would have run it.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        assert!(!marker.exists(), "the backend executed a client's pickle");
        std::thread::sleep(Duration::from_millis(50));
    }
    stack.run("basic");
    stack.assert_relay_healthy();
}

// -------------------------------------------------- faults and lifecycle

fn reconnect_after(enc: Enc, fault: impl FnOnce(&mut Stack)) {
    let mut stack = Stack::relayed(enc, ZeoOpts::default(), RelayOpts::default());
    let mut client = scenario_cmd("reconnect", enc, &[stack.front()]).spawn();
    client.expect_line("READY", Duration::from_secs(60));
    fault(&mut stack);
    client.send_line("go");
    let out = client.finish();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("events="), "reconnect output: {stdout}");
    stack.assert_relay_healthy();
}

#[test]
fn relay_restart_client_reconnects_pickle() {
    reconnect_after(Enc::Pickle, |s| s.relay().restart());
}

#[test]
fn relay_restart_client_reconnects_msgpack() {
    reconnect_after(Enc::Msgpack, |s| s.relay().restart());
}

#[test]
fn relay_kill_client_reconnects() {
    reconnect_after(Enc::Msgpack, |s| {
        let relay = s.relay();
        relay.kill();
        relay.start_again();
    });
}

#[test]
fn backend_restart_client_reconnects() {
    reconnect_after(Enc::Pickle, |s| s.zeo.restart());
}

/// With the backend down, a connecting client is closed promptly, not left
/// hanging. The relay may offer a protocol first; then the client answers
/// it like a real one would, and must be closed after that.
fn assert_refused_promptly(front: &Addr) {
    let started = Instant::now();
    let mut raw = Raw::connect(front);
    match raw.read_frame(CLOSE_TIMEOUT) {
        Ok(None) => {}
        Ok(Some(offer)) => {
            assert!(
                offer == b"Z5" || offer == b"M5",
                "protocol offer with the backend down: {offer:02x?}"
            );
            let _ = raw.send_frame(&offer);
            let rest = raw.assert_closed(CLOSE_TIMEOUT);
            assert_eq!(
                rest.len(),
                6,
                "more than a protocol offer with the backend down: {rest:02x?}"
            );
        }
        Err(e) => panic!("neither an offer nor EOF within {CLOSE_TIMEOUT:?}: {e}"),
    }
    eprintln!("closed after {:?}", started.elapsed());
}

#[test]
fn backend_down_then_up() {
    let mut stack = Stack::relayed(Enc::Msgpack, ZeoOpts::default(), RelayOpts::default());
    stack.run("basic");
    stack.zeo.stop();
    assert_refused_promptly(stack.front());
    assert_refused_promptly(stack.front());
    stack.assert_relay_healthy();
    stack.zeo.start_again();
    stack.run("basic");
    stack.assert_relay_healthy();
}

#[test]
fn relay_starts_before_backend() {
    let mut zeo = Zeo::prepare(Enc::Pickle, ZeoOpts::default());
    let mut relay = Relay::start(zeo.addr(), RelayOpts::default());
    assert_refused_promptly(relay.addr());
    zeo.start_again();
    scenario("basic", Enc::Pickle, &[relay.addr()]);
    relay.assert_running();
}

#[test]
fn sigterm_exits_cleanly_within_grace() {
    let grace = Duration::from_millis(3000);
    let mut stack = Stack::relayed(
        Enc::Msgpack,
        ZeoOpts::default(),
        RelayOpts::client(&format!("shutdown_grace_ms = {}", grace.as_millis())),
    );
    stack.run("basic");
    let front = stack.front().clone();
    // An idle registered session and one stuck mid-handshake.
    let mut idle = Raw::connect(&front);
    idle.register(Enc::Msgpack);
    let mut half = Raw::connect(&front);
    half.expect_frame(Duration::from_secs(10));

    let relay = stack.relay();
    let started = Instant::now();
    relay.sigterm();
    let limit = grace + Duration::from_secs(2);
    let status = relay
        .wait_exit(limit)
        .unwrap_or_else(|| panic!("zrelay still running {limit:?} after SIGTERM"));
    assert!(
        status.success(),
        "zrelay exited with {status} after SIGTERM"
    );
    eprintln!("zrelay exited after {:?}", started.elapsed());
    idle.assert_closed(CLOSE_TIMEOUT);
    half.assert_closed(CLOSE_TIMEOUT);
    // The port is released: a new zrelay can take it at once.
    relay.start_again();
    scenario("basic", Enc::Msgpack, &[&front]);
}
