//! Inputs both decoders must reject, and the resource limits.

use bytes::Bytes;

use super::hex::unhex;
use crate::wire::testdata as td;
use crate::wire::{msgpack, pickle, Encoding, Message, Value, WireError, MAX_DEPTH};

fn pk(raw: &[u8]) -> Result<Value, WireError> {
    pickle::decode(&Bytes::copy_from_slice(raw))
}

fn mp(raw: &[u8]) -> Result<Value, WireError> {
    msgpack::decode(&Bytes::copy_from_slice(raw))
}

#[test]
fn every_truncation_of_a_capture_is_an_error() {
    for v in td::ALL {
        for (enc, hex) in [(Encoding::Pickle, v.pickle), (Encoding::Msgpack, v.msgpack)] {
            let full = unhex(hex);
            for cut in 0..full.len() {
                let part = Bytes::copy_from_slice(&full[..cut]);
                assert!(
                    matches!(enc.decode_value(&part), Err(WireError::Truncated)),
                    "{} {enc:?} cut at {cut}",
                    v.name
                );
            }
        }
    }
}

#[test]
fn trailing_bytes() {
    assert!(matches!(pk(b"N.N."), Err(WireError::TrailingBytes(2))));
    assert!(matches!(
        mp(&[0xc0, 0xc0]),
        Err(WireError::TrailingBytes(1))
    ));
    let mut raw = unhex(td::HEARTBEAT.msgpack);
    raw.push(0);
    assert!(matches!(
        Message::decode(Encoding::Msgpack, &Bytes::from(raw)),
        Err(WireError::TrailingBytes(1))
    ));
}

#[test]
fn bad_pickle_opcodes_and_stack() {
    assert!(matches!(
        pk(b"\xff"),
        Err(WireError::UnsupportedOpcode(0xff))
    ));
    // FLOAT (text) and PERSID are outside the subset.
    assert!(matches!(
        pk(b"F1.5\n."),
        Err(WireError::UnsupportedOpcode(b'F'))
    ));
    assert!(matches!(
        pk(b"P1\n."),
        Err(WireError::UnsupportedOpcode(b'P'))
    ));
    assert!(matches!(pk(b"\x80\x06N."), Err(WireError::Malformed(_))));
    for bad in [
        &b"."[..],                     // empty stack
        b"NN.",                        // two values left
        b"(N.",                        // unclosed MARK
        b"t.",                         // TUPLE without MARK
        b"N\x86.",                     // TUPLE2 with one item
        b"(N\x85.",                    // TUPLE1 reaching below the MARK
        b"Na.",                        // APPEND to a non-list
        b"]N(a.",                      // APPEND reaching below the MARK
        b"}Ks.",                       // SETITEM with one item
        b"}(Ku.",                      // odd SETITEMS
        b"(Kd.",                       // odd DICT
        b"h\x00.",                     // GET of a missing memo entry
        b"q\x00.",                     // PUT on an empty stack
        b"K\x01K\x02\x93.",            // STACK_GLOBAL of ints
        b"X\x02\x00\x00\x00\xff\xfe.", // invalid UTF-8
        b"T\xff\xff\xff\xff.",         // negative BINSTRING length
        b"gx\n.",                      // non-numeric GET
    ] {
        assert!(matches!(pk(bad), Err(WireError::Malformed(_))), "{bad:?}");
    }
}

#[test]
fn bad_msgpack() {
    // ext types, fixext and the reserved byte
    assert!(matches!(
        mp(&[0xd4, 0x01, 0x00]),
        Err(WireError::Malformed(_))
    ));
    assert!(matches!(
        mp(&[0xc7, 0x01, 0x05, 0x00]),
        Err(WireError::Malformed(_))
    ));
    assert!(matches!(
        mp(&[0xd6, 0xff, 0, 0, 0, 0]),
        Err(WireError::Malformed(_))
    ));
    assert!(matches!(mp(&[0xc1]), Err(WireError::Malformed(_))));
    assert!(matches!(
        mp(&[0xa2, 0xff, 0xfe]),
        Err(WireError::Malformed(_))
    ));
    // an array claiming 4 billion items, then nothing
    assert!(matches!(
        mp(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
        Err(WireError::Truncated)
    ));
    assert!(matches!(
        mp(&[0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0]),
        Err(WireError::Truncated)
    ));
    assert!(matches!(mp(&[]), Err(WireError::Truncated)));
    // float32 is accepted and widened
    assert_eq!(
        mp(&[0xca, 0x3f, 0xc0, 0, 0]).expect("f32"),
        Value::Float(1.5)
    );
}

#[test]
fn not_an_envelope() {
    for enc in [Encoding::Pickle, Encoding::Msgpack] {
        for v in [
            Value::Int(1),
            Value::Tuple(vec![Value::Int(1), Value::Bool(false), Value::from("x")]),
            Value::Tuple(vec![
                Value::Int(1),
                Value::None,
                Value::from("x"),
                Value::None,
            ]),
            Value::Tuple(vec![
                Value::Int(1),
                Value::Bool(false),
                Value::Int(3),
                Value::None,
            ]),
            Value::Dict(vec![]),
        ] {
            let mut out = Vec::new();
            enc.encode_value(&v, &mut out).expect("encode");
            assert!(
                matches!(
                    Message::decode(enc, &Bytes::from(out)),
                    Err(WireError::NotAnEnvelope(_))
                ),
                "{enc:?} {v:?}"
            );
        }
    }
}

#[test]
fn typed_views_reject_wrong_arguments() {
    use crate::wire::calls::{ClientCall, ServerMsg};
    let bad = [
        Message::call(Value::Int(1), "register", vec![Value::from("1")]),
        Message::call(
            Value::Int(1),
            "register",
            vec![Value::Int(1), Value::Bool(false)],
        ),
        Message::call(Value::Int(1), "loadBefore", vec![Value::None, Value::None]),
        Message::async_call("tpc_begin", vec![Value::Int(1)]),
        Message::async_call("storea", vec![Value::None; 5]),
        Message::call(Value::Int(1), "new_oids", vec![Value::from("many")]),
        Message {
            args: Value::Int(3).into(),
            ..Message::call(Value::Int(1), "vote", vec![])
        },
    ];
    for m in &bad {
        match ClientCall::parse(m) {
            Err(WireError::Malformed(text)) => assert!(text.contains(&*m.method), "{text}"),
            other => panic!("{}: {other:?}", m.method),
        }
    }
    let inval = Message::async_call(
        "invalidateTransaction",
        vec![
            Value::from(&[0u8; 8][..]),
            Value::Tuple(vec![Value::Int(1)]),
        ],
    );
    assert!(matches!(
        ServerMsg::parse(&inval),
        Err(WireError::Malformed(_))
    ));
    let error = Message::error_reply(Value::Int(1), "x", Value::None);
    let no_class = Message {
        args: Value::Tuple(vec![]).into(),
        ..error
    };
    assert!(matches!(
        ServerMsg::parse(&no_class),
        Err(WireError::Malformed(_))
    ));
}

/// Wraps a leaf in `levels` containers, in both encodings.
fn nested_pickle(levels: usize) -> Vec<u8> {
    let mut raw = b"\x80\x03N".to_vec();
    raw.extend(std::iter::repeat(0x85u8).take(levels));
    raw.push(b'.');
    raw
}

fn nested_msgpack(levels: usize) -> Vec<u8> {
    let mut raw = vec![0x91u8; levels];
    raw.push(0xc0);
    raw
}

#[test]
fn nesting_limit() {
    // A leaf inside MAX_DEPTH - 1 containers is the deepest accepted value.
    let ok = pk(&nested_pickle(MAX_DEPTH - 1)).expect("pickle at the limit");
    assert!(matches!(
        pk(&nested_pickle(MAX_DEPTH)),
        Err(WireError::TooDeep)
    ));
    let ok_mp = mp(&nested_msgpack(MAX_DEPTH - 1)).expect("msgpack at the limit");
    assert!(matches!(
        mp(&nested_msgpack(MAX_DEPTH)),
        Err(WireError::TooDeep)
    ));
    assert_eq!(ok, ok_mp);
    // The deepest value survives the recursive derives and both encoders
    // on the test thread's stack, and re-encodes to the same bytes.
    let copy = ok.clone();
    assert_eq!(copy, ok);
    assert!(format!("{copy:?}").len() > MAX_DEPTH);
    let mut out = Vec::new();
    pickle::encode(&ok, &mut out).expect("pickle encode");
    assert_eq!(out, nested_pickle(MAX_DEPTH - 1));
    out.clear();
    msgpack::encode(&ok, &mut out).expect("msgpack encode");
    assert_eq!(out, nested_msgpack(MAX_DEPTH - 1));
    // Deeper values built in code are refused by the encoders.
    let deeper = Value::Tuple(vec![ok]);
    assert!(matches!(
        pickle::encode(&deeper, &mut out),
        Err(WireError::TooDeep)
    ));
    assert!(matches!(
        msgpack::encode(&deeper, &mut out),
        Err(WireError::TooDeep)
    ));
    // APPEND-built nesting is tracked too: ]]]...a a a
    let mut raw = b"\x80\x03".to_vec();
    raw.extend(std::iter::repeat(b']').take(MAX_DEPTH + 1));
    raw.extend(std::iter::repeat(b'a').take(MAX_DEPTH));
    raw.push(b'.');
    assert!(matches!(pk(&raw), Err(WireError::TooDeep)));
}

#[test]
fn memo_copy_bomb_is_bounded() {
    // N, then repeatedly: PUT 0, GET 0, TUPLE2 -> doubles the value.
    let mut raw = b"\x80\x03N".to_vec();
    for _ in 0..64 {
        raw.extend_from_slice(b"q\x00h\x00\x86");
    }
    raw.push(b'.');
    assert!(matches!(
        pk(&raw),
        Err(WireError::LimitExceeded(_)) | Err(WireError::TooDeep)
    ));
    // Flat variant that stays shallow: a list doubled through the memo.
    let mut raw = b"\x80\x03](NNNNNNNNNNNNNNNNe".to_vec();
    for _ in 0..40 {
        raw.extend_from_slice(b"q\x00(h\x00h\x00l");
    }
    raw.push(b'.');
    assert!(matches!(pk(&raw), Err(WireError::LimitExceeded(_))));
}

#[test]
fn encoding_errors_leave_output_untouched() {
    let mut out = b"keep".to_vec();
    let v = Value::Tuple(vec![Value::Int(1), Value::BigInt(1 << 70)]);
    assert!(msgpack::encode(&v, &mut out).is_err());
    let global = Value::List(vec![Value::Global {
        module: "a\nb".into(),
        name: "c".into(),
    }]);
    assert!(pickle::encode(&global, &mut out).is_err());
    assert_eq!(out, b"keep");
}
