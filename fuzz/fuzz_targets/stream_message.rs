#![no_main]
//! Replication stream frames (length + msgpack), as a replica or a primary
//! reads them; accepted messages re-encode to a frame that decodes and
//! re-encodes to the same bytes.

use bytes::BytesMut;
use zrelay::replication::protocol::{decode, encode};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = decode(&mut buf, 1 << 20) {
        let mut out = BytesMut::new();
        encode(&msg, &mut out).expect("a decoded message encodes");
        let first = out.clone();
        let again = decode(&mut out, 1 << 21)
            .expect("re-encoded frame decodes")
            .expect("complete frame");
        // Byte-identical re-encoding (a NaN pack time is not equal to
        // itself, its bytes are).
        let mut second = BytesMut::new();
        encode(&again, &mut second).expect("encodes again");
        assert_eq!(first, second);
    }
});
