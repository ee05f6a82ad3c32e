//! Resource bounds of every decoder that takes bytes from outside, measured
//! in a test binary of its own (its global allocator counts bytes):
//!
//! - no input of up to a few KiB (seeded random bytes, damaged valid
//!   messages) and no hand-made hostile input (huge announced lengths, memo
//!   copies, many marks, deep nesting) makes a decoder allocate more than
//!   a fixed multiple of its input plus a constant, at its peak;
//! - deeply nested input (64 KiB of openers) is refused within a small
//!   thread stack: no decoder recurses past its depth limit;
//! - and none panics (a panic fails the test).
//!
//! Decoders: ZEO framing, the pickle and msgpack value decoders, the
//! `(msgid, flag, method, args)` envelope with the typed call views, the
//! replication stream's frames, the TOML config, peer certificate names.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use bytes::{Bytes, BytesMut};
use rand::{Rng as _, SeedableRng};
use zrelay::replication::protocol::{self, DEFAULT_MAX_FRAME_LEN};
use zrelay::wire::calls::{ClientCall, ServerMsg};
use zrelay::wire::frame::parse_frame;
use zrelay::wire::{Encoding, Message};

/// Counts the bytes each thread has live (allocated here and not freed
/// yet) and its peak since [`measure`] reset it. Thread-local, so tests
/// running in parallel do not see each other's allocations; the decoders
/// are synchronous, so everything they allocate is on the calling thread.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// bookkeeping touches only const-initialised thread-locals (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            account(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        account(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            account(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes `f` had live at once, above what was live before it.
fn measure(f: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    f();
    (PEAK.with(Cell::get) - base).max(0) as usize
}

/// Bytes a decoder may hold per input byte, at its peak. Measured worst
/// cases (printed by the test): the pickle memo at ~250 bytes per 1-byte
/// MEMOIZE opcode (a hash-map entry each, counted while the map grows),
/// the TOML parser ~70, the stream's msgpack ~90, ZEO msgpack ~15.
const PER_BYTE: usize = 384;
/// Bytes a decoder may hold whatever its input: fixed tables, and the
/// cautious pre-allocation of a sequence with an announced length (serde
/// caps it at 1 MiB; our msgpack decoder at 16 values).
const FIXED: usize = (1 << 20) + (64 << 10);

struct Decoder {
    name: &'static str,
    run: fn(&[u8]),
}

fn zeo_value(enc: Encoding, raw: &[u8]) {
    let payload = Bytes::copy_from_slice(raw);
    let _ = enc.decode_value(&payload);
    if let Ok(msg) = Message::decode(enc, &payload) {
        let _ = ClientCall::parse(&msg);
        let _ = ServerMsg::parse(&msg);
    }
}

fn frames(raw: &[u8]) {
    let mut buf = BytesMut::from(raw);
    while let Ok(Some(_)) = parse_frame(&mut buf, 1 << 30) {}
}

fn stream(raw: &[u8]) {
    let mut buf = BytesMut::from(raw);
    while let Ok(Some(_)) = protocol::decode(&mut buf, DEFAULT_MAX_FRAME_LEN) {}
}

/// The same bytes behind a length prefix, so they reach the payload parser.
fn stream_payload(raw: &[u8]) {
    let mut buf = BytesMut::with_capacity(raw.len() + 4);
    buf.extend_from_slice(&(raw.len() as u32).to_be_bytes());
    buf.extend_from_slice(raw);
    let _ = protocol::decode(&mut buf, DEFAULT_MAX_FRAME_LEN);
}

fn config(raw: &[u8]) {
    if let Ok(text) = std::str::from_utf8(raw) {
        let _ = zrelay::config::Config::parse(text, Path::new("bounds.toml"));
    }
}

fn cert(raw: &[u8]) {
    let der = zrelay::tls::CertificateDer::from(raw.to_vec());
    let _ = zrelay::tls::cert_names(&der);
    let _ = zrelay::tls::peer_name(std::slice::from_ref(&der));
}

const DECODERS: &[Decoder] = &[
    Decoder {
        name: "zeo pickle",
        run: |r| zeo_value(Encoding::Pickle, r),
    },
    Decoder {
        name: "zeo msgpack",
        run: |r| zeo_value(Encoding::Msgpack, r),
    },
    Decoder {
        name: "zeo frames",
        run: frames,
    },
    Decoder {
        name: "stream frames",
        run: stream,
    },
    Decoder {
        name: "stream payload",
        run: stream_payload,
    },
    Decoder {
        name: "config toml",
        run: config,
    },
    Decoder {
        name: "certificate names",
        run: cert,
    },
];

/// Deterministic inputs: the seed names a failing case.
type Rng = rand::rngs::StdRng;

fn repeat(prefix: &[u8], unit: &[u8], times: usize, suffix: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    for _ in 0..times {
        v.extend_from_slice(unit);
    }
    v.extend_from_slice(suffix);
    v
}

/// Inputs built to make a decoder allocate: sizes announced and not sent,
/// one-byte opcodes that each create something, memo copies, nesting.
fn hostile_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let k = 16 * 1024;
    let mut v = vec![
        ("pickle: None per byte", repeat(b"\x80\x03(", b"N", k, b"t.")),
        ("pickle: marks", repeat(b"\x80\x03", b"(", k, b"")),
        ("pickle: MEMOIZE per byte", repeat(b"\x80\x03N", b"\x94", k, b".")),
        (
            "pickle: memo GETs of a list",
            repeat(b"\x80\x03](NNNNNNNNe\x94(", b"h\x00", k, b"l."),
        ),
        (
            "pickle: memo doubling",
            repeat(b"\x80\x03](NNNNNNNNNNNNNNNNe", b"q\x00(h\x00h\x00l", 40, b"."),
        ),
        (
            "pickle: BINBYTES announcing 4 GiB",
            b"\x80\x03B\xff\xff\xff\xffabc".to_vec(),
        ),
        ("pickle: empty lists", repeat(b"\x80\x03(", b"]", k, b"l.")),
        ("pickle: empty dicts", repeat(b"\x80\x03(", b"}", k, b"l.")),
        ("msgpack: array32 of 4 G nils", repeat(b"\xdd\xff\xff\xff\xff", b"\xc0", k, b"")),
        ("msgpack: map32 of 4 G", repeat(b"\xdf\xff\xff\xff\xff", b"\xc0", k, b"")),
        ("msgpack: bin32 of 4 GiB", b"\xc6\xff\xff\xff\xffabc".to_vec()),
        ("msgpack: empty arrays", repeat(b"\xdc\xff\xff", b"\x90", k, b"")),
        ("msgpack: nested", repeat(b"", b"\x91", k, b"\xc0")),
        ("zeo frame announcing 4 GiB", b"\xff\xff\xff\xffabc".to_vec()),
        ("zeo frame announcing 1 GiB", repeat(b"\x40\x00\x00\x00", b"x", k, b"")),
        (
            "stream frame announcing 512 MiB",
            repeat(b"\x20\x00\x00\x00", b"x", k, b""),
        ),
        (
            "stream: roster announcing 4 G nodes",
            repeat(b"\x81\xa6Roster\x81\xa5nodes\xdd\xff\xff\xff\xff", b"\xc0", k, b""),
        ),
        (
            "stream: txn announcing 4 G records",
            repeat(
                b"\x81\xa3Txn\x82\xa4prev\xc4\x08\0\0\0\0\0\0\0\x01\xa3txn\x86\xa3tid\xc4\x08\0\0\0\0\0\0\0\x02\xa6status\xa1 \xa4user\xc4\0\xabdescription\xc4\0\xa9extension\xc4\0\xa7records\xdd\xff\xff\xff\xff",
                b"\x84\xa3oid\xc4\x08\0\0\0\0\0\0\0\x03\xa4data\xc0\xa8data_txn\xc0\xa4blob\xc0",
                k / 32,
                b"",
            ),
        ),
        (
            "stream: bin32 announcing 4 GiB",
            b"\x81\xa9CloneData\x81\xa4data\xc6\xff\xff\xff\xffabc".to_vec(),
        ),
        (
            "stream: unknown field nested",
            repeat(b"\x81\xa4Door\x81\xa1x", b"\x91", k, b"\xc0"),
        ),
        ("toml: nested arrays", repeat(b"a = ", b"[", k, b"")),
        ("toml: nested inline tables", repeat(b"a = ", b"{b=", k, b"")),
        ("toml: many keys", repeat(b"", b"a.", k / 2, b"b = 1\n")),
        ("der: nested sequences", repeat(b"", b"\x30\x80", k, b"")),
    ];
    v.push(("nothing", Vec::new()));
    v
}

/// Random bytes and damaged valid messages.
fn random_inputs(rng: &mut Rng) -> Vec<Vec<u8>> {
    let valid: Vec<Vec<u8>> = vec![
        b"\x80\x03(K\x01\x89X\x08\x00\x00\x00registerq\x00X\x01\x00\x00\x001\x89\x86t.".to_vec(),
        b"\x94\x01\xc2\xa8register\x92\xa11\xc2".to_vec(),
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/config/primary.toml"))
            .unwrap_or_default(),
    ];
    let mut out = Vec::new();
    for _ in 0..600 {
        let len = rng.random_range(0..4096);
        let mut raw: Vec<u8> = if rng.random_bool(0.5) {
            (0..len).map(|_| rng.random()).collect()
        } else {
            let mut v = valid[rng.random_range(0..valid.len())].clone();
            for _ in 0..=rng.random_range(0..8) {
                if v.is_empty() {
                    break;
                }
                let at = rng.random_range(0..v.len());
                v[at] = rng.random();
            }
            v
        };
        raw.truncate(4096);
        out.push(raw);
    }
    out
}

fn check_bounds(label: &str, d: &Decoder, raw: &[u8], worst: &mut (f64, String)) {
    let peak = measure(|| (d.run)(raw));
    let limit = PER_BYTE * raw.len() + FIXED;
    assert!(
        peak <= limit,
        "{}: {label} ({} bytes) made it hold {peak} bytes (limit {limit})",
        d.name,
        raw.len()
    );
    let ratio = peak.saturating_sub(FIXED / 2) as f64 / raw.len().max(1) as f64;
    if ratio > worst.0 {
        *worst = (ratio, format!("{label}, {} bytes, peak {peak}", raw.len()));
    }
}

#[test]
fn decoders_allocate_a_fixed_multiple_of_their_input() {
    let hostile = hostile_inputs();
    let mut rng = Rng::seed_from_u64(0xa110_c8ed);
    let random = random_inputs(&mut rng);
    for d in DECODERS {
        let mut worst = (0.0, String::new());
        let mut biggest = (0usize, String::new());
        for (label, raw) in &hostile {
            check_bounds(label, d, raw, &mut worst);
            // Every hostile input cut short, too (a decoder that waits for
            // more bytes must not have reserved them).
            for cut in [raw.len() / 3, raw.len() / 2] {
                check_bounds(label, d, &raw[..cut], &mut worst);
            }
            let peak = measure(|| (d.run)(raw));
            if peak > biggest.0 {
                biggest = (peak, label.to_string());
            }
        }
        for (i, raw) in random.iter().enumerate() {
            check_bounds(&format!("random input {i}"), d, raw, &mut worst);
        }
        eprintln!(
            "{}: largest peak {} bytes ({}); worst (peak - FIXED/2) per input byte {:.1} ({})",
            d.name, biggest.0, biggest.1, worst.0, worst.1
        );
    }
}

/// A stack far smaller than the 2 MiB of Rust and tokio threads.
const SMALL_STACK: usize = 256 * 1024;
/// The stack of a Rust (and tokio worker) thread: the config is parsed on
/// the main thread at start-up and on a worker at reload. The toml crate
/// stops at 80 levels, each of which takes a few KiB in a debug build.
const THREAD_STACK: usize = 2 * 1024 * 1024;

/// 64 KiB of nesting openers for every decoder, each on a thread with a
/// small stack: refused (or accepted) without recursing that deep. A
/// decoder that recursed per level would overflow the stack, which aborts
/// this test binary.
#[test]
fn deep_nesting_is_refused_within_a_small_stack() {
    let n = 64 * 1024;
    // (decoder, prefix, opener repeated n times, suffix)
    type Case = (&'static str, &'static [u8], &'static [u8], &'static [u8]);
    let cases: &[Case] = &[
        ("zeo pickle", b"\x80\x03N", b"\x85", b"."),
        ("zeo pickle", b"\x80\x03", b"]", &[b'a'; 1024]),
        ("zeo pickle", b"\x80\x03", b"(", b"N"),
        ("zeo msgpack", b"", b"\x91", b"\xc0"),
        ("zeo msgpack", b"", b"\x81\xc0", b"\xc0"),
        ("stream payload", b"\x81\xa4Door\x81\xa1x", b"\x91", b"\xc0"),
        (
            "stream payload",
            b"\x81\xa5Hello\x81\xa1x",
            b"\x81\xc0",
            b"\xc0",
        ),
        ("config toml", b"a = ", b"[", b""),
        ("config toml", b"a = ", b"{b=", b""),
        ("certificate names", b"", b"\x30\x80", b""),
    ];
    for &(name, prefix, unit, suffix) in cases {
        let run = DECODERS
            .iter()
            .find(|d| d.name == name)
            .expect("decoder")
            .run;
        let raw = repeat(prefix, unit, n, suffix);
        let stack = if name == "config toml" {
            THREAD_STACK
        } else {
            SMALL_STACK
        };
        let done = std::thread::Builder::new()
            .name(name.into())
            .stack_size(stack)
            .spawn(move || run(&raw))
            .expect("spawn")
            .join();
        assert!(done.is_ok(), "{name} {unit:?}: panicked");
    }
}
