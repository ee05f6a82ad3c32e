#![no_main]
//! The configuration file: parsing and validation never panic.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = zrelay::config::Config::parse(text, std::path::Path::new("fuzz.toml"));
    }
});
