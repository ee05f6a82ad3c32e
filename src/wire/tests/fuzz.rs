//! Property-style checks: the decoders never panic on arbitrary bytes, and
//! whatever they accept re-encodes and decodes to the same value.

use bytes::{Bytes, BytesMut};

use super::hex::unhex;
use crate::wire::calls::{ClientCall, ServerMsg};
use crate::wire::frame::parse_frame;
use crate::wire::testdata as td;
use crate::wire::{Encoding, Message};

pub(super) use crate::testing::Rng;

const ENCODINGS: [Encoding; 2] = [Encoding::Pickle, Encoding::Msgpack];

/// Runs every decoder on `raw`; accepted values must round-trip.
fn exercise(raw: &[u8]) {
    let payload = Bytes::copy_from_slice(raw);
    for enc in ENCODINGS {
        if let Ok(value) = enc.decode_value(&payload) {
            let mut out = Vec::new();
            if enc.encode_value(&value, &mut out).is_ok() {
                let again = enc.decode_value(&Bytes::from(out)).expect("re-decode");
                // NaN floats are the one thing that is not equal to itself.
                if !format!("{value:?}").contains("NaN") {
                    assert_eq!(again, value);
                }
            }
        }
        same_as_eager(enc, &payload);
        if let Ok(msg) = Message::decode(enc, &payload) {
            let _ = ClientCall::parse(&msg);
            let _ = ServerMsg::parse(&msg);
            let _ = msg.encode(enc);
        }
    }
    let mut buf = BytesMut::from(raw);
    while let Ok(Some(_)) = parse_frame(&mut buf, 1 << 16) {}
}

/// `Message::decode` (header now, args on first access) answers exactly
/// what the full decoder answers: the same message or the same error.
pub(super) fn same_as_eager(enc: Encoding, payload: &Bytes) {
    match (
        Message::decode(enc, payload),
        Message::decode_eager(enc, payload),
    ) {
        (Ok(lazy), Ok(eager)) => {
            if !format!("{eager:?}").contains("NaN") {
                assert_eq!(lazy, eager, "{enc:?} {payload:?}");
            }
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{enc:?} {payload:?}"),
        (a, b) => panic!("{enc:?} {payload:?}: lazy {a:?}, eager {b:?}"),
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng::new(0x5eed_0001);
    for _ in 0..20_000 {
        let len = rng.below(64);
        let raw = rng.bytes(len);
        exercise(&raw);
    }
}

/// Random bytes rarely get past the first opcode; these start from real
/// messages and damage them.
#[test]
fn mutated_captures_never_panic() {
    let mut rng = Rng::new(0x5eed_0002);
    let seeds: Vec<Vec<u8>> = td::ALL
        .iter()
        .flat_map(|v| [unhex(v.pickle), unhex(v.msgpack)])
        .collect();
    for _ in 0..20_000 {
        let mut raw = seeds[rng.below(seeds.len())].clone();
        for _ in 0..=rng.below(4) {
            if raw.is_empty() {
                break;
            }
            let at = rng.below(raw.len());
            match rng.below(4) {
                0 => raw[at] = rng.next() as u8,
                1 => raw[at] ^= 1 << rng.below(8),
                2 => raw.truncate(at),
                _ => {
                    let n = 1 + rng.below(8);
                    let extra = rng.bytes(n);
                    raw.splice(at..at, extra);
                }
            }
        }
        exercise(&raw);
    }
}

/// Pickle opcodes strung together at random, so stack and memo handling
/// get exercised rather than the first-byte rejection.
#[test]
fn random_opcode_soup_never_panics() {
    const OPS: &[u8] = b"(.NKJMCBXtl]}ae)su\x85\x86\x87\x88\x89\x8aqhprgj\x94RbcG\x93\x81d";
    let mut rng = Rng::new(0x5eed_0003);
    for _ in 0..20_000 {
        let mut raw = b"\x80\x03".to_vec();
        for _ in 0..rng.below(40) {
            let op = OPS[rng.below(OPS.len())];
            raw.push(op);
            // Give argument-taking opcodes a short random argument.
            if b"KJMCBXqhprgjG\x8ac".contains(&op) {
                let n = rng.below(6);
                raw.extend(rng.bytes(n));
            }
        }
        raw.push(b'.');
        exercise(&raw);
    }
}

/// The same soup inside a valid envelope header, so the args scan of
/// `Message::decode` gets exercised (and compared with the full decoder).
#[test]
fn random_args_soup_decodes_as_eagerly() {
    const OPS: &[u8] = b"(NKJMCBXtl]}ae)su\x85\x86\x87\x88\x89\x8aqhG\x8c0d";
    let mut rng = Rng::new(0x5eed_0004);
    for _ in 0..20_000 {
        let mut raw = b"\x80\x03(K\x07\x89X\x03\x00\x00\x00abc".to_vec();
        for _ in 0..rng.below(12) {
            let op = OPS[rng.below(OPS.len())];
            raw.push(op);
            if b"KJMCBXqhG\x8a\x8c".contains(&op) {
                let n = rng.below(6);
                raw.extend(rng.bytes(n));
            }
        }
        if rng.below(4) != 0 {
            raw.extend_from_slice(b"t.");
        }
        same_as_eager(Encoding::Pickle, &Bytes::from(raw));
    }
}

/// msgpack: a valid envelope header, then random markers and bytes.
#[test]
fn random_msgpack_args_decode_as_eagerly() {
    const MARKERS: &[u8] = &[
        0x00, 0x7f, 0xe0, 0xc0, 0xc2, 0xc3, 0xcc, 0xcd, 0xd0, 0xca, 0xcb, 0xa3, 0xd9, 0xc4, 0x90,
        0x92, 0x93, 0xdc, 0x80, 0x81, 0xde, 0xc1, 0xd4, 0xc7,
    ];
    let mut rng = Rng::new(0x5eed_0005);
    for _ in 0..20_000 {
        let mut raw = b"\x94\x07\xc2\xa3abc".to_vec();
        for _ in 0..1 + rng.below(10) {
            raw.push(MARKERS[rng.below(MARKERS.len())]);
            if rng.below(3) == 0 {
                let n = rng.below(4);
                raw.extend(rng.bytes(n));
            }
        }
        same_as_eager(Encoding::Msgpack, &Bytes::from(raw));
    }
}
