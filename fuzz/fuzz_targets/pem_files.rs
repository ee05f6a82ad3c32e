#![no_main]
//! Certificate, key and CA files as an operator may get them wrong: any
//! bytes through the same parsing as the files named in the config, then
//! the names and expiry read from whatever certificates came out.

use std::path::Path;

use zrelay::tls::{cert_names, certs_from_pem, key_from_pem, peer_name, roots_from_pem};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.pem");
    let _ = key_from_pem(path, data);
    let _ = roots_from_pem(path, data);
    if let Ok(certs) = certs_from_pem(path, data) {
        for c in &certs {
            let _ = cert_names(c);
        }
        let _ = peer_name(&certs);
    }
});
