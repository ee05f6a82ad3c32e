#![no_main]
//! Admin HTTP requests and query strings: the bytes of one connection
//! through hyper's parser, the router, the probes' and role routes' query
//! handling and the authorization check, over an in-memory pipe
//! (`zrelay::admin::http::fuzzing`). The first byte picks the client
//! certificate the connection presents: none, the allowed one, another.

use std::sync::OnceLock;

use zrelay::admin::http::fuzzing::{query_param, Harness, ALLOWED_CERT};

static HARNESS: OnceLock<Harness> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&first, raw)) = data.split_first() else {
        return;
    };
    let cert = match first % 3 {
        0 => None,
        1 => Some(ALLOWED_CERT),
        _ => Some("intruder"),
    };
    HARNESS.get_or_init(Harness::new).serve(raw, cert);
    if let Ok(text) = std::str::from_utf8(raw) {
        for key in ["lag", "to", "follow"] {
            if let Some(v) = query_param(text, key) {
                assert!(text.contains(v));
            }
        }
    }
});
