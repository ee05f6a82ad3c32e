#![no_main]
//! A ZEO frame payload in the pickle encoding (`Z5`), from a client or a
//! server: value decoder, envelope, typed call views, round trip.

#[path = "../src/message.rs"]
mod message;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    message::exercise(zrelay::wire::Encoding::Pickle, data);
});
