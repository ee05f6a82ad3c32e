//! Shared body of the two ZEO message targets: every decoder of a frame
//! payload, and re-encoding what was accepted must decode to the same value;
//! `Message::decode` (lazy args) must agree with `Message::decode_eager`.

use bytes::Bytes;
use zrelay::wire::calls::{ClientCall, ServerMsg};
use zrelay::wire::{Encoding, Message};

pub fn exercise(enc: Encoding, data: &[u8]) {
    let payload = Bytes::copy_from_slice(data);
    if let Ok(value) = enc.decode_value(&payload) {
        let mut out = Vec::new();
        if enc.encode_value(&value, &mut out).is_ok() {
            let again = enc
                .decode_value(&Bytes::from(out))
                .expect("a re-encoded value decodes");
            // NaN is the one value not equal to itself.
            if !format!("{value:?}").contains("NaN") {
                assert_eq!(again, value, "round trip changed the value");
            }
        }
    }
    // Header now, args on first access: the same answer as decoding all.
    match (
        Message::decode(enc, &payload),
        Message::decode_eager(enc, &payload),
    ) {
        (Ok(lazy), Ok(eager)) => {
            if !format!("{eager:?}").contains("NaN") {
                assert_eq!(lazy, eager, "lazy and full decoding differ");
            }
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        (a, b) => panic!("lazy {a:?}, full {b:?}"),
    }
    if let Ok(msg) = Message::decode(enc, &payload) {
        let _ = ClientCall::parse(&msg);
        let _ = ServerMsg::parse(&msg);
        if let Ok(bytes) = msg.encode(enc) {
            let again = Message::decode(enc, &bytes).expect("a re-encoded message decodes");
            if !format!("{msg:?}").contains("NaN") {
                assert_eq!(again, msg, "message round trip changed it");
            }
        }
    }
}
