#![no_main]
//! The sized-message framing of a ZEO connection, fed in two pieces (a
//! split read), then every frame through both message decoders.

use bytes::BytesMut;
use zrelay::wire::frame::parse_frame;
use zrelay::wire::{Encoding, Message};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    let mut buf = BytesMut::new();
    let mut frames = 0usize;
    for part in [&data[..split], &data[split..]] {
        buf.extend_from_slice(part);
        while let Ok(Some(payload)) = parse_frame(&mut buf, 1 << 16) {
            assert!(payload.len() <= 1 << 16);
            frames += 1;
            for enc in [Encoding::Pickle, Encoding::Msgpack] {
                let _ = Message::decode(enc, &payload);
            }
        }
    }
    assert!(frames * 4 <= data.len());
});
