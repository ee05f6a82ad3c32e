#![no_main]
//! Names and expiry read from a peer's certificate (DER).

use zrelay::tls::{cert_names, peer_name};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let der = rustls_pki_der(data);
    let _ = cert_names(&der);
    let _ = peer_name(std::slice::from_ref(&der));
});

fn rustls_pki_der(data: &[u8]) -> zrelay::tls::CertificateDer<'static> {
    zrelay::tls::CertificateDer::from(data.to_vec())
}
