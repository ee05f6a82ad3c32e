//! Encoder output against bytes produced once by Python (ZEO's
//! `marshal.encoder(b'Z')`, i.e. zodbpickle `Pickler(f, 3)` with fast=1,
//! and `msgpack.packb(v, use_bin_type=True)`), plus decode-only pickles.

use bytes::Bytes;

use super::hex::unhex;
use crate::wire::tid::{tid_to_unix, unix_to_tid};
use crate::wire::{msgpack, pickle, Value, WireError};

fn t(items: Vec<Value>) -> Value {
    Value::Tuple(items)
}

fn s(x: &str) -> Value {
    Value::str(x)
}

fn i(n: i64) -> Value {
    Value::Int(n)
}

fn b(x: &[u8]) -> Value {
    Value::from(x)
}

fn pickled(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    pickle::encode(v, &mut out).expect("pickle encode");
    out
}

fn packed(v: &Value) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    msgpack::encode(v, &mut out).map(|()| out)
}

/// msgpack cannot tell lists from tuples.
fn as_msgpack_sees_it(v: &Value) -> Value {
    match v {
        Value::List(xs) | Value::Tuple(xs) => {
            Value::Tuple(xs.iter().map(as_msgpack_sees_it).collect())
        }
        Value::Dict(kv) => Value::Dict(
            kv.iter()
                .map(|(k, v)| (as_msgpack_sees_it(k), as_msgpack_sees_it(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Encodes to the Python bytes and decodes back to the same value.
fn check(v: Value, pickle_hex: &str, msgpack_hex: Option<&str>) {
    let p = pickled(&v);
    assert_eq!(p, unhex(pickle_hex), "pickle of {v:?}");
    assert_eq!(pickle::decode(&Bytes::from(p)).expect("decode"), v);
    match msgpack_hex {
        Some(hex) => {
            let m = packed(&v).expect("msgpack encode");
            assert_eq!(m, unhex(hex), "msgpack of {v:?}");
            let back = msgpack::decode(&Bytes::from(m)).expect("decode");
            assert_eq!(back, as_msgpack_sees_it(&v));
        }
        None => assert!(
            matches!(packed(&v), Err(WireError::Unencodable(_))),
            "{v:?}"
        ),
    }
}

#[test]
fn scalars() {
    check(Value::None, "80034e2e", Some("c0"));
    check(Value::Bool(true), "8003882e", Some("c3"));
    check(Value::Bool(false), "8003892e", Some("c2"));
    check(
        Value::Float(1.5),
        "8003473ff80000000000002e",
        Some("cb3ff8000000000000"),
    );
    check(
        Value::Float(-0.0),
        "80034780000000000000002e",
        Some("cb8000000000000000"),
    );
    check(
        Value::Float(1e300),
        "8003477e37e43c8800759c2e",
        Some("cb7e37e43c8800759c"),
    );
    check(b(b""), "800343002e", Some("c400"));
    check(b(b"ab"), "8003430261622e", Some("c4026162"));
    check(s(""), "800358000000002e", Some("a0"));
    check(s("a"), "80035801000000612e", Some("a161"));
    check(s("é☃"), "80035805000000c3a9e298832e", Some("a5c3a9e29883"));
    let x31 = "78".repeat(31);
    check(
        s(&"x".repeat(31)),
        &format!("8003581f000000{x31}2e"),
        Some(&format!("bf{x31}")),
    );
    let x32 = "78".repeat(32);
    check(
        s(&"x".repeat(32)),
        &format!("80035820000000{x32}2e"),
        Some(&format!("d920{x32}")),
    );
}

#[test]
fn integers() {
    let cases: &[(i128, &str, Option<&str>)] = &[
        (0, "80034b002e", Some("00")),
        (127, "80034b7f2e", Some("7f")),
        (128, "80034b802e", Some("cc80")),
        (255, "80034bff2e", Some("ccff")),
        (256, "80034d00012e", Some("cd0100")),
        (65535, "80034dffff2e", Some("cdffff")),
        (65536, "80034a000001002e", Some("ce00010000")),
        (-1, "80034affffffff2e", Some("ff")),
        (-32, "80034ae0ffffff2e", Some("e0")),
        (-33, "80034adfffffff2e", Some("d0df")),
        (-128, "80034a80ffffff2e", Some("d080")),
        (-129, "80034a7fffffff2e", Some("d1ff7f")),
        (-256, "80034a00ffffff2e", Some("d1ff00")),
        ((1 << 31) - 1, "80034affffff7f2e", Some("ce7fffffff")),
        (-(1 << 31), "80034a000000802e", Some("d280000000")),
        (1 << 31, "80038a0500000080002e", Some("ce80000000")),
        (
            -(1 << 31) - 1,
            "80038a05ffffff7fff2e",
            Some("d3ffffffff7fffffff"),
        ),
        ((1 << 32) - 1, "80038a05ffffffff002e", Some("ceffffffff")),
        (1 << 32, "80038a0500000000012e", Some("cf0000000100000000")),
        (
            i64::MAX as i128,
            "80038a08ffffffffffffff7f2e",
            Some("cf7fffffffffffffff"),
        ),
        (
            i64::MIN as i128,
            "80038a0800000000000000802e",
            Some("d38000000000000000"),
        ),
        (
            1 << 63,
            "80038a090000000000000080002e",
            Some("cf8000000000000000"),
        ),
        (
            u64::MAX as i128,
            "80038a09ffffffffffffffff002e",
            Some("cfffffffffffffffff"),
        ),
        (1 << 64, "80038a090000000000000000012e", None),
        (
            i128::MAX,
            "80038a10ffffffffffffffffffffffffffffff7f2e",
            None,
        ),
        (
            i128::MIN,
            "80038a10000000000000000000000000000000802e",
            None,
        ),
        (i64::MIN as i128 - 1, "80038a09ffffffffffffff7fff2e", None),
    ];
    for &(n, p, m) in cases {
        check(Value::int(n), p, m);
    }
}

#[test]
fn containers() {
    check(t(vec![]), "8003292e", Some("90"));
    check(t(vec![i(1)]), "80034b01852e", Some("9101"));
    check(t(vec![i(1), i(2)]), "80034b014b02862e", Some("920102"));
    check(
        t(vec![i(1), i(2), i(3)]),
        "80034b014b024b03872e",
        Some("93010203"),
    );
    check(
        t(vec![i(1), i(2), i(3), i(4)]),
        "8003284b014b024b034b04742e",
        Some("9401020304"),
    );
    check(Value::List(vec![]), "80035d2e", Some("90"));
    check(Value::List(vec![i(1)]), "80035d4b01612e", Some("9101"));
    check(
        Value::List(vec![i(1), i(2)]),
        "80035d284b014b02652e",
        Some("920102"),
    );
    check(Value::Dict(vec![]), "80037d2e", Some("80"));
    check(
        Value::Dict(vec![(s("a"), i(1))]),
        "80037d5801000000614b01732e",
        Some("81a16101"),
    );
    check(
        Value::Dict(vec![(s("a"), i(1)), (s("b"), i(2))]),
        "80037d285801000000614b015801000000624b02752e",
        Some("82a16101a16202"),
    );
    // The extension dict of a real commit.
    let nested = Value::Dict(vec![(
        s("nested"),
        Value::Dict(vec![
            (
                s("a"),
                Value::List(vec![i(1), Value::Dict(vec![(s("b"), t(vec![i(2), i(3)]))])]),
            ),
            (s("big"), i(1 << 40)),
        ]),
    )]);
    check(
        nested,
        concat!(
            "80037d58060000006e65737465647d285801000000615d284b017d5801000000",
            "624b024b0386736558030000006269678a0600000000000175732e"
        ),
        Some("81a66e657374656482a161920181a162920203a3626967cf0000010000000000"),
    );
}

/// Long forms: only headers are pasted; the rest is the repeated filler.
#[test]
fn long_forms() {
    let nones = |n: usize| vec![Value::None; n];
    let x = |n: usize| vec![b'x'; n];
    let cases: Vec<(Value, String, String)> = vec![
        (
            b(&x(255)),
            format!("43ff{}", "78".repeat(255)),
            format!("c4ff{}", "78".repeat(255)),
        ),
        (
            b(&x(256)),
            format!("4200010000{}", "78".repeat(256)),
            format!("c50100{}", "78".repeat(256)),
        ),
        (
            b(&x(65536)),
            format!("4200000100{}", "78".repeat(65536)),
            format!("c600010000{}", "78".repeat(65536)),
        ),
        (
            s(&"x".repeat(255)),
            format!("58ff000000{}", "78".repeat(255)),
            format!("d9ff{}", "78".repeat(255)),
        ),
        (
            s(&"x".repeat(256)),
            format!("5800010000{}", "78".repeat(256)),
            format!("da0100{}", "78".repeat(256)),
        ),
        (
            s(&"x".repeat(65536)),
            format!("5800000100{}", "78".repeat(65536)),
            format!("db00010000{}", "78".repeat(65536)),
        ),
        (
            t(nones(15)),
            format!("28{}74", "4e".repeat(15)),
            format!("9f{}", "c0".repeat(15)),
        ),
        (
            t(nones(16)),
            format!("28{}74", "4e".repeat(16)),
            format!("dc0010{}", "c0".repeat(16)),
        ),
        (
            t(nones(65536)),
            format!("28{}74", "4e".repeat(65536)),
            format!("dd00010000{}", "c0".repeat(65536)),
        ),
        // CPython batches APPENDS by 1000, a lone trailing item included.
        (
            Value::List(nones(1000)),
            format!("5d28{}65", "4e".repeat(1000)),
            format!("dc03e8{}", "c0".repeat(1000)),
        ),
        (
            Value::List(nones(1001)),
            format!("5d28{}65284e65", "4e".repeat(1000)),
            format!("dc03e9{}", "c0".repeat(1001)),
        ),
        (
            Value::List(nones(2001)),
            format!("5d28{n}6528{n}65284e65", n = "4e".repeat(1000)),
            format!("dc07d1{}", "c0".repeat(2001)),
        ),
    ];
    for (v, p, m) in cases {
        check(v, &format!("8003{p}2e"), Some(&m));
    }
    let int_dict = |n: i64| Value::Dict((0..n).map(|k| (i(k), Value::None)).collect());
    let pairs = |n: u8| (0..n).map(|k| format!("4b{k:02x}4e")).collect::<String>();
    let pairs_mp = |n: u8| (0..n).map(|k| format!("{k:02x}c0")).collect::<String>();
    check(
        int_dict(15),
        &format!("80037d28{}752e", pairs(15)),
        Some(&format!("8f{}", pairs_mp(15))),
    );
    check(
        int_dict(16),
        &format!("80037d28{}752e", pairs(16)),
        Some(&format!("de0010{}", pairs_mp(16))),
    );
    // dict of 1001 items: a second SETITEMS batch holding one item.
    let p = pickled(&int_dict(1001));
    assert!(unhex("284de8034e752e").iter().eq(p[p.len() - 7..].iter()));
}

fn prefix_object() -> Value {
    Value::NewObj(Box::new((
        Value::Global {
            module: "ZopeUndo.Prefix".into(),
            name: "Prefix".into(),
        },
        t(vec![]),
    )))
}

#[test]
fn pickle_objects() {
    // An undoInfo filter {'user_name': ZopeUndo.Prefix('joe')}.
    let prefix = Value::Build(Box::new((
        prefix_object(),
        Value::Dict(vec![(s("value"), s("joe"))]),
    )));
    check(
        Value::Dict(vec![(s("user_name"), prefix)]),
        concat!(
            "80037d5809000000757365725f6e616d65635a6f7065556e646f2e5072656669",
            "780a5072656669780a29817d580500000076616c756558030000006a6f657362",
            "732e"
        ),
        None,
    );
    // {1, 2}: protocol 3 pickles a set as set([1, 2]) via REDUCE.
    let set = Value::Reduce(Box::new((
        Value::Global {
            module: "builtins".into(),
            name: "set".into(),
        },
        t(vec![Value::List(vec![i(1), i(2)])]),
    )));
    check(
        set,
        "8003636275696c74696e730a7365740a5d284b014b026585522e",
        None,
    );
    let class = Value::Global {
        module: "ZopeUndo.Prefix".into(),
        name: "Prefix".into(),
    };
    check(
        class,
        "8003635a6f7065556e646f2e5072656669780a5072656669780a2e",
        None,
    );
}

fn decoded(hex: &str) -> Result<Value, WireError> {
    pickle::decode(&Bytes::from(unhex(hex)))
}

/// Pickles ZEO never sends but Python's stdlib produces.
#[test]
fn pickle_decode_only() {
    // a = [1]; pickle.dumps((a, a), 3): memo BINPUT/BINGET.
    let one = Value::List(vec![i(1)]);
    assert_eq!(
        decoded("80035d71004b016168008671012e").expect("memo"),
        t(vec![one.clone(), one])
    );
    // [(a,), a]: the GET comes after `a` moved into the tuple (eager pass).
    let a = Value::List(vec![i(1)]);
    assert_eq!(
        decoded("80035d7100285d71014b01618571026801652e").expect("moved memo"),
        Value::List(vec![t(vec![a.clone()]), a.clone()])
    );
    // d = {'x': a}; {'k': d, 'j': d, 'a': a}: nested shared objects.
    let d = Value::Dict(vec![(s("x"), a.clone())]);
    assert_eq!(
        decoded(concat!(
            "80037d71002858010000006b71017d710258010000007871035d71044b016173",
            "58010000006a7105680258010000006171066804752e"
        ))
        .expect("shared dict"),
        Value::Dict(vec![(s("k"), d.clone()), (s("j"), d), (s("a"), a)])
    );
    // Protocol 4: FRAME, SHORT_BINUNICODE, MEMOIZE.
    assert_eq!(
        decoded("80049519000000000000007d94288c016b948c0176948c016e944b018c0178948694752e")
            .expect("proto 4"),
        Value::Dict(vec![(s("k"), s("v")), (s("n"), t(vec![i(1), s("x")]))])
    );
    // Protocol 4 Prefix('joe'): STACK_GLOBAL.
    let prefix = Value::Build(Box::new((
        prefix_object(),
        Value::Dict(vec![(s("value"), s("joe"))]),
    )));
    assert_eq!(
        decoded(concat!(
            "80049533000000000000008c0f5a6f7065556e646f2e507265666978948c0650",
            "72656669789493942981947d948c0576616c7565948c036a6f659473622e"
        ))
        .expect("proto 4 object"),
        prefix
    );
    // Protocol 2 bytes: _codecs.encode('ab', 'latin1').
    let codecs = Value::Reduce(Box::new((
        Value::Global {
            module: "_codecs".into(),
            name: "encode".into(),
        },
        t(vec![s("ab"), s("latin1")]),
    )));
    assert_eq!(
        decoded(concat!(
            "8002635f636f646563730a656e636f64650a710058020000006162710158060000",
            "006c6174696e3171028671035271042e"
        ))
        .expect("proto 2"),
        codecs
    );
    // Text and old opcodes, hand-made.
    assert_eq!(decoded("4934320a2e").expect("INT"), i(42));
    assert_eq!(decoded("4930310a2e").expect("INT true"), Value::Bool(true));
    assert_eq!(
        decoded("4930300a2e").expect("INT false"),
        Value::Bool(false)
    );
    assert_eq!(
        decoded("4c31323334353637383930313233343536373839304c0a2e").expect("LONG"),
        Value::BigInt(12_345_678_901_234_567_890)
    );
    assert!(matches!(decoded("5503616263"), Err(WireError::Truncated)));
    assert_eq!(decoded("55036162632e").expect("SHORT_BINSTRING"), b(b"abc"));
    assert!(matches!(
        decoded("5403000000616263"),
        Err(WireError::Truncated)
    ));
    assert_eq!(decoded("54030000006162632e").expect("BINSTRING"), b(b"abc"));
    assert_eq!(decoded("8b02000000ff7f2e").expect("LONG4"), i(32767));
    assert!(matches!(decoded("8a00"), Err(WireError::Truncated)));
    assert_eq!(decoded("8a002e").expect("LONG1 zero"), i(0));
    // Redundant sign bytes do not count against the 128-bit limit.
    let padded = format!("8a1401{}2e", "00".repeat(19));
    assert_eq!(decoded(&padded).expect("padded LONG1"), i(1));
    let huge = format!("8a11{}012e", "00".repeat(16));
    assert!(matches!(decoded(&huge), Err(WireError::IntegerTooLarge)));
    let long_text = format!("4c{}4c0a2e", "39".repeat(40));
    assert!(matches!(
        decoded(&long_text),
        Err(WireError::IntegerTooLarge)
    ));
    // PUT/GET text forms and LONG_BINPUT/LONG_BINGET.
    assert_eq!(
        decoded("284b0770350a67350a742e").expect("PUT/GET"),
        t(vec![i(7), i(7)])
    );
    assert_eq!(
        decoded("4b0772000100006a00010000862e").expect("LONG_BINPUT"),
        t(vec![i(7), i(7)])
    );
    // protocol 5 announcement with protocol-3 content.
    assert_eq!(decoded("80054e2e").expect("proto 5"), Value::None);
}

#[test]
fn tid_time_matches_zodb_timestamp() {
    // TimeStamp(tid).timeTime() from the C implementation, printed by repr().
    let cases: &[(&str, f64)] = &[
        ("040d2dddca11f5cc", 1795320827.3601928),
        ("040d2dddd8ace388", 1795320830.7832842),
        ("040d2ddcca02edbb", 1795320767.3464313),
        ("0000000000000000", -2208988800.0),
        ("03f58e00fddddddd", 1704067259.5),
        ("7fffffffffffffff", 124299454080.0),
        ("ffffffffffffffff", 250807810560.0),
        ("0123456789abcdef", -1084572987.7333333),
        ("0385a4d1dc0c3b8c", 1271964591.5736995),
    ];
    for &(hex, want) in cases {
        let got = tid_to_unix(&unhex(hex)).expect("8 bytes");
        assert_eq!(got.to_bits(), want.to_bits(), "{hex}: {got} != {want}");
    }
    assert_eq!(tid_to_unix(&[0; 7]), None);
}

#[test]
fn unix_to_tid_matches_new_tid() {
    // TimeStamp(*time.gmtime(t)[:5] + (t % 60,)).raw(), as ZODB.utils.newTid.
    let cases: &[(f64, &str)] = &[
        (0.0, "023c2b0000000000"),
        (1.5, "023c2b0006666666"),
        (86399.999, "023c309ffffee861"),
        (951782400.25, "0332ade001111111"),
        (1700000000.123456, "03f47f9555dc2e22"),
        (1795320827.3601928, "040d2dddca11f5bb"),
        (4102444800.0, "0662c40000000000"),
        (1234567890.9876542, "037be9e38436c822"),
    ];
    for &(secs, hex) in cases {
        assert_eq!(unix_to_tid(secs).to_vec(), unhex(hex), "{secs}");
    }
}
