#![no_main]
//! A ZEO frame payload in the msgpack encoding (`M5`): value decoder,
//! envelope, typed call views, round trip.

#[path = "../src/message.rs"]
mod message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    message::exercise(zrelay::wire::Encoding::Msgpack, data);
});
