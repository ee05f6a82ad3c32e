//! The replica backend's own restore capacity, for `make bench`: read a
//! history into memory, then replay it into an empty backend with the same
//! pipelined [`Applier`] the replica uses, but without the stream. This is the
//! ceiling catch-up through the stream is measured against.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::applied::AppliedLog;
use super::applier::Applier;
use super::history::HistoryCursor;
use super::txn::{Txn, Z64};
use crate::config::parse_backend_addr;
use crate::zeoclient::ZeoConn;

pub async fn run(source: &str, target: &str, storage: &str) -> anyhow::Result<()> {
    let t = Duration::from_secs(120);
    let (mut src, _) =
        ZeoConn::open(&parse_backend_addr(source), storage, true, t, t, 1 << 30).await?;
    let mut txns: Vec<Txn> = Vec::new();
    let started = Instant::now();
    let mut cursor = HistoryCursor::open(&mut src, Z64, None).await?;
    while let Some(txn) = cursor.next(&mut src).await? {
        txns.push(txn);
    }
    let read_secs = started.elapsed().as_secs_f64();
    let bytes: u64 = txns.iter().map(|t| t.size_bytes()).sum();
    let mut applier = Applier::new(
        parse_backend_addr(target),
        storage.to_string(),
        t,
        t,
        1 << 30,
        Arc::new(AppliedLog::new(16)),
    );
    applier.connect().await?;
    let started = Instant::now();
    let n = txns.len();
    for (i, txn) in txns.iter().enumerate() {
        applier.apply(txn, i + 1 < n).await?;
    }
    applier.complete().await?;
    let apply_secs = started.elapsed().as_secs_f64();
    println!(
        "{{\"transactions\": {n}, \"bytes\": {bytes}, \"read_seconds\": {read_secs:.4}, \"apply_seconds\": {apply_secs:.4}, \"read_txn_per_sec\": {:.1}, \"apply_txn_per_sec\": {:.1}}}",
        n as f64 / read_secs.max(1e-9),
        n as f64 / apply_secs.max(1e-9)
    );
    Ok(())
}
