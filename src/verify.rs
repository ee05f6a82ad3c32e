//! `zrelay verify`: compare a primary and a replica transaction by
//! transaction, up to the replica's last tid. Either side may be a backend
//! or a zrelay proxy address (the iterator calls are read-only).

use std::time::Duration;

use crate::config::parse_backend_addr;
use crate::replication::history::HistoryCursor;
use crate::replication::txn::{tid_hex, Tid, Txn, Z64};
use crate::zeoclient::{ZeoConn, ZeoError};

pub struct VerifyOptions {
    pub primary: String,
    pub replica: String,
    pub storage: String,
    pub blobs: bool,
    pub timeout: Duration,
    /// Stop after this many differences.
    pub max_differences: usize,
}

/// Exit codes: 0 identical, 1 differences found, 2 could not compare.
pub async fn run(opts: &VerifyOptions) -> i32 {
    match compare(opts).await {
        Ok((n, 0)) => {
            println!("OK: {n} transactions identical");
            0
        }
        Ok((n, d)) => {
            println!("DIFFERENT: {d} difference(s) in {n} transactions compared");
            1
        }
        Err(e) => {
            eprintln!("zrelay verify: {e}");
            2
        }
    }
}

async fn open(addr: &str, opts: &VerifyOptions) -> Result<(ZeoConn, Tid), ZeoError> {
    let (mut c, _) = ZeoConn::open(
        &parse_backend_addr(addr),
        &opts.storage,
        true,
        opts.timeout,
        opts.timeout.max(Duration::from_secs(60)),
        1 << 30,
    )
    .await?;
    let last = c.call("lastTransaction", vec![]).await?;
    let last: Tid = last
        .as_bytes()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ZeoError::Protocol("lastTransaction is not a tid".into()))?;
    Ok((c, last))
}

/// Describes how two versions of one transaction differ (None if equal).
pub fn diff(p: &Txn, r: &Txn) -> Option<String> {
    if p.tid != r.tid {
        return Some(format!("tid {} vs {}", tid_hex(&p.tid), tid_hex(&r.tid)));
    }
    let mut what = Vec::new();
    if p.status != r.status {
        what.push(format!("status {:?} vs {:?}", p.status, r.status));
    }
    if p.user != r.user {
        what.push("user".to_string());
    }
    if p.description != r.description {
        what.push("description".to_string());
    }
    if p.extension != r.extension {
        what.push("extension".to_string());
    }
    if p.records.len() != r.records.len() {
        what.push(format!(
            "{} records vs {}",
            p.records.len(),
            r.records.len()
        ));
    } else {
        for (a, b) in p.records.iter().zip(&r.records) {
            if a.oid != b.oid {
                what.push(format!(
                    "record oid {} vs {}",
                    tid_hex(&a.oid),
                    tid_hex(&b.oid)
                ));
            } else if a.data != b.data {
                what.push(format!("data of oid {}", tid_hex(&a.oid)));
            } else if a.data_txn != b.data_txn {
                what.push(format!("backpointer of oid {}", tid_hex(&a.oid)));
            } else if a.blob != b.blob {
                what.push(format!("blob of oid {}", tid_hex(&a.oid)));
            }
        }
    }
    (!what.is_empty()).then(|| what.join(", "))
}

async fn compare(opts: &VerifyOptions) -> Result<(u64, usize), ZeoError> {
    let (mut pc, p_last) = open(&opts.primary, opts).await?;
    let (mut rc, r_last) = open(&opts.replica, opts).await?;
    eprintln!(
        "primary last tid {}, replica last tid {}",
        tid_hex(&p_last),
        tid_hex(&r_last)
    );
    if r_last == Z64 {
        return Ok((0, 0));
    }
    let mut p = HistoryCursor::open(&mut pc, Z64, Some(r_last)).await?;
    let mut r = HistoryCursor::open(&mut rc, Z64, Some(r_last)).await?;
    p.with_blobs = opts.blobs;
    r.with_blobs = opts.blobs;
    let mut n = 0u64;
    let mut diffs = 0usize;
    loop {
        let (a, b) = (p.next(&mut pc).await?, r.next(&mut rc).await?);
        match (a, b) {
            (None, None) => break,
            (Some(a), None) => {
                println!("{}: on the primary only", tid_hex(&a.tid));
                diffs += 1;
                break;
            }
            (None, Some(b)) => {
                println!("{}: on the replica only", tid_hex(&b.tid));
                diffs += 1;
                break;
            }
            (Some(a), Some(b)) => {
                n += 1;
                if let Some(d) = diff(&a, &b) {
                    println!("{}: differs: {d}", tid_hex(&a.tid));
                    diffs += 1;
                    if a.tid != b.tid {
                        // Out of step: further pairs would all differ.
                        break;
                    }
                }
            }
        }
        if diffs >= opts.max_differences {
            break;
        }
        if n % 1000 == 0 {
            eprintln!("compared {n} transactions...");
        }
    }
    if p_last < r_last {
        println!(
            "replica is ahead of the primary ({} > {})",
            tid_hex(&r_last),
            tid_hex(&p_last)
        );
        diffs += 1;
    }
    Ok((n, diffs))
}
