//! `Message::decode` builds the header and leaves `args` for later: it
//! must take that path for what ZEO sends, and agree with the full decoder.

use bytes::Bytes;

use super::fuzz::same_as_eager;
use super::hex::unhex;
use crate::wire::testdata as td;
use crate::wire::{Encoding, Message, Value};

/// Captures whose args hold more items than the scan keeps (a list of 100
/// oids): decoded at once, as before.
const LONG: &[&str] = &["new_oids_reply"];

#[test]
fn captured_messages_leave_args_unbuilt_and_agree() {
    let mut full = Vec::new();
    for v in td::ALL {
        for (enc, hex) in [(Encoding::Pickle, v.pickle), (Encoding::Msgpack, v.msgpack)] {
            let raw = Bytes::from(unhex(hex));
            let m = Message::decode(enc, &raw).expect("decode");
            if m.args.is_built() {
                full.push(format!("{} {enc:?}", v.name));
                continue;
            }
            same_as_eager(enc, &raw);
            // Built on first access, then kept.
            let _ = m.args.as_seq();
            assert!(m.args.is_built(), "{} {enc:?}", v.name);
        }
    }
    let expected: Vec<String> = LONG.iter().map(|n| format!("{n} Pickle")).collect();
    assert_eq!(full, expected, "captures that took the full path");
}

/// Shapes outside the scan's subset (a memo opcode, an object) still
/// decode, through the full decoder, and the same as ever.
#[test]
fn unusual_pickles_take_the_full_path() {
    // (1, False, 'abc', [])  with the list memoized: q\x00 after ']'.
    let memo = Bytes::from_static(b"\x80\x03(K\x01\x89X\x03\x00\x00\x00abc]q\x00t.");
    let m = Message::decode(Encoding::Pickle, &memo).expect("decode");
    assert!(m.args.is_built());
    assert_eq!(*m.args, Value::List(vec![]));
    same_as_eager(Encoding::Pickle, &memo);
    // A header item that consumes another (TUPLE2 over flag and method).
    let odd = Bytes::from_static(b"\x80\x03(K\x01\x89X\x03\x00\x00\x00abc\x86Nt.");
    same_as_eager(Encoding::Pickle, &odd);
    assert!(Message::decode(Encoding::Pickle, &odd).is_err());
    // Args that reach below their own start into the header.
    let grab = Bytes::from_static(b"\x80\x03(K\x01\x89X\x03\x00\x00\x00abcN\x87t.");
    same_as_eager(Encoding::Pickle, &grab);
    assert!(Message::decode(Encoding::Pickle, &grab).is_err());
}

/// Malformed args are an error at decode time, as before, not later.
#[test]
fn malformed_args_fail_at_decode() {
    let cases: [(Encoding, &[u8]); 4] = [
        // invalid UTF-8 in a str inside args
        (
            Encoding::Pickle,
            b"\x80\x03(K\x01\x89X\x03\x00\x00\x00abcX\x01\x00\x00\x00\xff\x85t.",
        ),
        // APPEND onto a tuple
        (
            Encoding::Pickle,
            b"\x80\x03(K\x01\x89X\x03\x00\x00\x00abc)Nat.",
        ),
        // msgpack: str with invalid UTF-8 in args
        (Encoding::Msgpack, b"\x94\x01\xc2\xa3abc\x91\xa1\xff"),
        // msgpack: ext type in args
        (Encoding::Msgpack, b"\x94\x01\xc2\xa3abc\xd4\x01\x00"),
    ];
    for (enc, raw) in cases {
        let raw = Bytes::copy_from_slice(raw);
        assert!(Message::decode(enc, &raw).is_err(), "{enc:?} {raw:?}");
        same_as_eager(enc, &raw);
    }
}
