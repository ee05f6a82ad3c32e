//! Writes the seed corpora of every target under `fuzz/corpus/<target>/`:
//! the ZEO frames captured from real ZEO 6.2 traffic (`src/wire/testdata.rs`),
//! replication stream messages, the example config files, durations and a
//! certificate from `zrelay::certgen`. Usage: `seed CORPUS_DIR`.

#[allow(dead_code)]
#[path = "../../src/wire/testdata.rs"]
mod testdata;

use std::fs;
use std::path::Path;

use bytes::BytesMut;
use zrelay::replication::protocol::{encode, RefuseReason, StreamMsg};

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn put(dir: &Path, target: &str, name: &str, data: &[u8]) {
    let d = dir.join(target);
    fs::create_dir_all(&d).expect("create corpus dir");
    fs::write(d.join(format!("seed-{name}")), data).expect("write seed");
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: seed CORPUS_DIR");
    let dir = Path::new(&dir);
    let mut all_frames = Vec::new();
    for v in testdata::ALL {
        let (p, m) = (unhex(v.pickle), unhex(v.msgpack));
        put(dir, "zeo_message_pickle", v.name, &p);
        put(dir, "zeo_message_msgpack", v.name, &m);
        for payload in [&p, &m] {
            let mut framed = (payload.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(payload);
            all_frames.extend_from_slice(&framed);
            put(
                dir,
                "zeo_frame",
                &format!("{}-{}", v.name, payload.len()),
                &framed,
            );
        }
    }
    put(dir, "zeo_frame", "all", &all_frames);

    let tid = [0, 0, 0, 0, 0, 0, 0, 7];
    let msgs = [
        StreamMsg::Heartbeat {
            primary_last_tid: tid,
            primary_time_unix_ms: 1_700_000_000_000,
        },
        StreamMsg::Ack { tid },
        StreamMsg::Live {
            primary_last_tid: tid,
        },
        StreamMsg::Refuse {
            reason: RefuseReason::WrongCluster,
            message: "cluster a is not b".into(),
            primary_last_tid: Some(tid),
            rewind_to: None,
        },
        StreamMsg::Welcome {
            version: 1,
            node: "primary".into(),
            primary_last_tid: tid,
            features: vec!["received_ack".into()],
            epoch: Some(2),
        },
    ];
    let mut stream = BytesMut::new();
    for m in &msgs {
        let mut one = BytesMut::new();
        encode(m, &mut one).expect("encode");
        encode(m, &mut stream).expect("encode");
        put(dir, "stream_message", m.kind(), &one);
    }
    put(dir, "stream_message", "all", &stream);

    // The example configs, including those in subdirectories.
    let mut dirs = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")];
    while let Some(config) = dirs.pop() {
        for entry in fs::read_dir(&config).expect("config dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_some_and(|e| e == "toml") {
                let name = path.file_name().unwrap().to_string_lossy().to_string();
                let data = fs::read(&path).expect("read config");
                put(dir, "config_toml", &name, &data);
            }
        }
    }

    for d in ["5", "0.5", "500ms", "5s", "1m", "2h", " 10 ", "1.5s"] {
        put(dir, "admin_duration", d.trim(), d.as_bytes());
    }

    // Admin HTTP: a certificate selector byte (0: none, 1: allowed, 2:
    // another name), then what the client sends on its connection.
    let token = zrelay::admin::http::fuzzing::TOKEN;
    let requests = [
        (0u8, "GET /replica?lag=500ms HTTP/1.1\r\nHost: x\r\n\r\n".to_string()),
        (0, "HEAD /read-only?x=1&lag=0.5 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()),
        (0, "GET /metrics HTTP/1.1\r\n\r\nGET /status HTTP/1.1\r\n\r\n".into()),
        (0, "GET /health HTTP/1.0\r\n\r\n".into()),
        (0, format!("POST /switchover?to=node2 HTTP/1.1\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\n\r\n")),
        (1, "POST /demote?follow=node1 HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        (2, "POST /drain HTTP/1.1\r\nAuthorization: Bearer wrong\r\n\r\n".into()),
        (0, "POST /reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".into()),
        (0, "DELETE /promote HTTP/1.1\r\n\r\n".into()),
    ];
    for (i, (cert, req)) in requests.iter().enumerate() {
        let mut data = vec![*cert];
        data.extend_from_slice(req.as_bytes());
        put(dir, "admin_http", &i.to_string(), &data);
    }

    let tmp = std::env::temp_dir().join(format!("zrelay-fuzz-seed-{}", std::process::id()));
    zrelay::certgen::ensure_ca(&tmp).expect("CA");
    let (cert, _) = zrelay::certgen::issue_node(&tmp, "node-a", 1).expect("cert");
    for (i, der) in zrelay::tls::load_certs(&cert)
        .expect("load")
        .into_iter()
        .chain(zrelay::tls::load_certs(&tmp.join("ca.pem")).expect("load ca"))
        .enumerate()
    {
        put(dir, "cert_names", &i.to_string(), &der);
    }
    // The PEM files themselves: certificate, key, CA, and a chain (both in
    // one file, as some operators concatenate them).
    let (cert, key) = zrelay::certgen::issue_node(&tmp, "node-b", 1).expect("cert");
    let read = |p: &std::path::Path| fs::read(p).expect("read PEM");
    let chain = [read(&cert), read(&key)].concat();
    for (i, pem) in [read(&cert), read(&key), read(&tmp.join("ca.pem")), chain]
        .iter()
        .enumerate()
    {
        put(dir, "pem_files", &i.to_string(), pem);
    }
    let _ = fs::remove_dir_all(&tmp);
}
