#![no_main]
//! Durations from admin query strings (`/replica?lag=500ms`) and the CLI.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(d) = zrelay::admin::cli::parse_duration(text) {
            let _ = d.as_secs_f64();
        }
    }
});
