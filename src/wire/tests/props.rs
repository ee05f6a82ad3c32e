//! Property tests (seeded, so every run checks the same cases and a
//! failure names its seed): every value the codecs support survives
//! encode → decode → encode byte-identically, in both encodings, bare and
//! inside the `(msgid, flag, method, args)` envelope, and decodes to the
//! value it came from. A hand-rolled generator rather than proptest: the
//! value model is small, the seeded [`Rng`] is already here, and a failing
//! case prints whole (no shrinking needed at these sizes).

use bytes::Bytes;

use super::fuzz::Rng;
use crate::wire::{Encoding, Flag, Message, Value, WireError, MAX_DEPTH};

/// Integers around every width boundary either encoding switches at.
const EDGE_INTS: &[i64] = &[
    0,
    1,
    -1,
    31,
    -32,
    -33,
    127,
    128,
    -128,
    -129,
    255,
    256,
    32767,
    -32768,
    65535,
    65536,
    i32::MAX as i64,
    i32::MIN as i64,
    u32::MAX as i64,
    1 << 32,
    i64::MAX,
    i64::MIN,
];

/// Byte and string lengths around the short/long opcode and marker limits.
const EDGE_LENS: &[usize] = &[0, 1, 15, 31, 32, 255, 256, 65535, 65536];

fn gen_len(rng: &mut Rng) -> usize {
    if rng.below(16) == 0 {
        EDGE_LENS[rng.below(EDGE_LENS.len())]
    } else {
        rng.below(40)
    }
}

fn gen_str(rng: &mut Rng, len: usize) -> String {
    const CHARS: &[char] = &[
        'a',
        'Z',
        '0',
        ' ',
        '\n',
        '\0',
        'é',
        'ß',
        '€',
        '\u{10348}',
        '"',
    ];
    (0..len).map(|_| CHARS[rng.below(CHARS.len())]).collect()
}

/// 1 to `max` characters.
fn gen_name(rng: &mut Rng, max: usize) -> String {
    let n = 1 + rng.below(max);
    gen_str(rng, n)
}

fn gen_int(rng: &mut Rng, enc: Encoding) -> Value {
    match rng.below(4) {
        0 => Value::Int(EDGE_INTS[rng.below(EDGE_INTS.len())]),
        1 => Value::Int(rng.next() as i64),
        2 => Value::Int((rng.next() as i64) >> rng.below(64)),
        // Beyond i64: pickle takes any i128, msgpack up to u64::MAX.
        _ => match enc {
            Encoding::Pickle => Value::int(((rng.next() as i128) << 64) | rng.next() as i128),
            Encoding::Msgpack => Value::int(i128::from(rng.next() | 1 << 63)),
        },
    }
}

fn gen_float(rng: &mut Rng) -> f64 {
    const EDGES: &[f64] = &[
        0.0,
        -0.0,
        1.5,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
        f64::MIN_POSITIVE,
        f64::MAX,
    ];
    if rng.below(3) == 0 {
        EDGES[rng.below(EDGES.len())]
    } else {
        f64::from_bits(rng.next())
    }
}

/// A value `enc` can encode, at most `depth` levels deep.
fn gen_value(rng: &mut Rng, enc: Encoding, depth: usize) -> Value {
    let containers = if depth > 1 { 4 } else { 0 };
    let pickle_only = if enc == Encoding::Pickle { 2 } else { 0 };
    let pick = rng.below(7 + containers + pickle_only);
    match pick {
        0 => Value::None,
        1 => Value::Bool(rng.below(2) == 0),
        2 | 3 => gen_int(rng, enc),
        4 => Value::Float(gen_float(rng)),
        5 => {
            let n = gen_len(rng);
            Value::bytes(rng.bytes(n))
        }
        6 => {
            let n = gen_len(rng);
            Value::Str(gen_str(rng, n))
        }
        7..=10 if pick < 7 + containers => {
            // Now and then (of leaves) more than one pickle APPENDS/SETITEMS batch.
            let n = if depth == 2 && rng.below(20) == 0 {
                1001 + rng.below(50)
            } else {
                rng.below(6)
            };
            let kind = rng.below(3);
            if kind == 2 {
                let pairs = (0..n)
                    .map(|_| {
                        (
                            gen_value(rng, enc, depth - 1),
                            gen_value(rng, enc, depth - 1),
                        )
                    })
                    .collect();
                return Value::Dict(pairs);
            }
            let items = (0..n).map(|_| gen_value(rng, enc, depth - 1)).collect();
            // msgpack has one sequence type; it decodes as a tuple.
            if kind == 1 && enc == Encoding::Pickle {
                Value::List(items)
            } else {
                Value::Tuple(items)
            }
        }
        _ => {
            let global = Value::Global {
                module: gen_name(rng, 12).replace('\n', "."),
                name: gen_name(rng, 12).replace('\n', "_"),
            };
            if rng.below(2) == 0 || depth < 3 {
                return global;
            }
            let args = Value::Tuple(
                (0..rng.below(3))
                    .map(|_| gen_value(rng, enc, depth - 2))
                    .collect(),
            );
            let pair = Box::new((global, args));
            match rng.below(3) {
                0 => Value::Reduce(pair),
                1 => Value::NewObj(pair),
                _ => Value::Build(pair),
            }
        }
    }
}

fn has_nan(v: &Value) -> bool {
    format!("{v:?}").contains("NaN")
}

fn encoded(enc: Encoding, v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    enc.encode_value(v, &mut out)
        .unwrap_or_else(|e| panic!("{enc:?} cannot encode {v:?}: {e}"));
    out
}

/// encode → decode → encode is byte-identical, and decodes to `v`.
fn round_trip(enc: Encoding, v: &Value) {
    let first = encoded(enc, v);
    let back = enc
        .decode_value(&Bytes::from(first.clone()))
        .unwrap_or_else(|e| panic!("{enc:?} rejects its own encoding of {v:?}: {e}"));
    if !has_nan(v) {
        assert_eq!(&back, v, "{enc:?}");
    }
    assert_eq!(encoded(enc, &back), first, "{enc:?}: {v:?}");
}

#[test]
fn generated_values_round_trip_byte_identical() {
    for enc in [Encoding::Pickle, Encoding::Msgpack] {
        for seed in 0..1_500u64 {
            let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15 ^ seed);
            let depth = 1 + rng.below(6);
            let v = gen_value(&mut rng, enc, depth);
            round_trip(enc, &v);
        }
    }
}

#[test]
fn generated_envelopes_round_trip_byte_identical() {
    const FLAGS: [Flag; 4] = [Flag::Sync, Flag::Async, Flag::Reply, Flag::Error];
    for enc in [Encoding::Pickle, Encoding::Msgpack] {
        for seed in 0..1_000u64 {
            let mut rng = Rng::new(0x51_7cc1_b727_220a ^ seed);
            let msg = Message {
                msgid: gen_value(&mut rng, enc, 2),
                flag: FLAGS[rng.below(FLAGS.len())],
                method: gen_name(&mut rng, 20).into(),
                args: gen_value(&mut rng, enc, 4).into(),
            };
            let first = msg.encode(enc).expect("encode");
            let back = Message::decode(enc, &first).expect("decode");
            if !has_nan(&msg.msgid) && !has_nan(&msg.args) {
                assert_eq!(back, msg, "{enc:?}");
            }
            assert_eq!(
                back.encode(enc).expect("re-encode"),
                first,
                "{enc:?}: {msg:?}"
            );
        }
    }
}

/// The deepest value the codecs support round-trips; one level more is
/// refused by the encoder (and so never produced).
#[test]
fn deepest_supported_value_round_trips() {
    for enc in [Encoding::Pickle, Encoding::Msgpack] {
        let mut v = Value::Int(7);
        for _ in 1..MAX_DEPTH {
            v = Value::Tuple(vec![v]);
        }
        round_trip(enc, &v);
        let mut out = Vec::new();
        let deeper = Value::Tuple(vec![v]);
        assert!(matches!(
            enc.encode_value(&deeper, &mut out),
            Err(WireError::TooDeep)
        ));
        assert!(out.is_empty());
    }
}
