//! Reading committed transactions back from a ZEO backend: the authoritative
//! source of what the primary committed (invariant 2), used for live
//! transactions, for catch-up, and by `zrelay verify`.
//!
//! Uses ZEO's iterator RPCs (`iterator_start`, `iterator_next`,
//! `iterator_record_start`, `iterator_record_next`) and `sendBlob` for blob
//! files. Iterator state lives in the server per connection, so a cursor is
//! bound to one `ZeoConn`.

use bytes::Bytes;

use super::txn::{Oid, Record, Tid, Txn};
use crate::wire::{pickle, Value};
use crate::zeoclient::{ZeoConn, ZeoError};

/// Adds one to a tid (8-byte big-endian): the first tid after `t`.
pub fn tid_after(t: &Tid) -> Tid {
    let v = u64::from_be_bytes(*t).saturating_add(1);
    v.to_be_bytes()
}

pub fn to_tid(b: &[u8]) -> Option<Tid> {
    b.try_into().ok()
}

fn protocol(what: &str, v: &Value) -> ZeoError {
    ZeoError::Protocol(format!("unexpected {what}: {v:?}"))
}

/// An open iterator over the backend's transactions with tid in
/// `[start, stop]`.
pub struct HistoryCursor {
    iid: Value,
    done: bool,
    /// Fetch blob files for blob records.
    pub with_blobs: bool,
}

impl HistoryCursor {
    pub async fn open(
        conn: &mut ZeoConn,
        start: Tid,
        stop: Option<Tid>,
    ) -> Result<HistoryCursor, ZeoError> {
        let stop = match stop {
            Some(s) => Value::Bytes(Bytes::copy_from_slice(&s)),
            None => Value::None,
        };
        let iid = conn
            .call(
                "iterator_start",
                vec![Value::Bytes(Bytes::copy_from_slice(&start)), stop],
            )
            .await?;
        Ok(HistoryCursor {
            iid,
            done: false,
            with_blobs: true,
        })
    }

    /// The next transaction, or None at the end of the range (as the storage
    /// stood when it was read).
    pub async fn next(&mut self, conn: &mut ZeoConn) -> Result<Option<Txn>, ZeoError> {
        if self.done {
            return Ok(None);
        }
        let head = conn.call("iterator_next", vec![self.iid.clone()]).await?;
        if head.is_none() {
            self.done = true;
            return Ok(None);
        }
        let h = head
            .as_seq()
            .ok_or_else(|| protocol("iterator_next", &head))?;
        if h.len() != 5 {
            return Err(protocol("iterator_next", &head));
        }
        let tid_b = h[0].as_bytes().ok_or_else(|| protocol("tid", &h[0]))?;
        let tid = to_tid(tid_b).ok_or_else(|| protocol("tid", &h[0]))?;
        let status = match &h[1] {
            Value::Str(s) => s.clone(),
            Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            v => return Err(protocol("status", v)),
        };
        let user = text_bytes(&h[2]).ok_or_else(|| protocol("user", &h[2]))?;
        let description = text_bytes(&h[3]).ok_or_else(|| protocol("description", &h[3]))?;
        let mut ext = Vec::new();
        pickle::encode(&h[4], &mut ext)?;

        let rid = conn
            .call(
                "iterator_record_start",
                vec![self.iid.clone(), Value::Bytes(Bytes::copy_from_slice(&tid))],
            )
            .await?;
        let mut records = Vec::new();
        loop {
            let r = conn.call("iterator_record_next", vec![rid.clone()]).await?;
            if r.is_none() {
                break;
            }
            let f = r.as_seq().ok_or_else(|| protocol("record", &r))?;
            if f.len() != 4 {
                return Err(protocol("record", &r));
            }
            let oid: Oid = f[0]
                .as_bytes()
                .and_then(to_tid)
                .ok_or_else(|| protocol("oid", &f[0]))?;
            let data = match &f[2] {
                Value::None => None,
                Value::Bytes(b) => Some(b.clone()),
                v => return Err(protocol("record data", v)),
            };
            let data_txn = match &f[3] {
                Value::None => None,
                Value::Bytes(b) => Some(to_tid(b).ok_or_else(|| protocol("data_txn", &f[3]))?),
                v => return Err(protocol("data_txn", v)),
            };
            records.push(Record {
                oid,
                data,
                data_txn,
                blob: None,
            });
        }
        if self.with_blobs {
            fetch_blobs(conn, &tid, &mut records).await?;
        }
        Ok(Some(Txn {
            tid,
            status,
            user,
            description,
            extension: Bytes::from(ext),
            records,
        }))
    }
}

fn text_bytes(v: &Value) -> Option<Bytes> {
    match v {
        Value::Bytes(b) => Some(b.clone()),
        Value::Str(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        _ => None,
    }
}

/// ZODB's own test (`ZODB.utils.is_blob_record`) starts from this substring.
pub fn looks_like_blob(data: &[u8]) -> bool {
    data.windows(9).any(|w| w == b"ZODB.blob")
}

/// For each blob record (the last record of its oid in the transaction, as
/// ClientStorage writes a blob oid twice), fetch the blob file with
/// `sendBlob`, which streams it as async `receiveBlob*` messages before its
/// reply.
async fn fetch_blobs(
    conn: &mut ZeoConn,
    tid: &Tid,
    records: &mut [Record],
) -> Result<(), ZeoError> {
    let n = records.len();
    for i in 0..n {
        let is_last_of_oid = !records[i + 1..].iter().any(|r| r.oid == records[i].oid);
        let is_blob = records[i]
            .data
            .as_ref()
            .map(|d| looks_like_blob(d))
            .unwrap_or(false);
        if !(is_blob && is_last_of_oid && records[i].data_txn.is_none()) {
            continue;
        }
        let oid = records[i].oid;
        conn.pending_async.clear();
        let res = conn
            .call(
                "sendBlob",
                vec![
                    Value::Bytes(Bytes::copy_from_slice(&oid)),
                    Value::Bytes(Bytes::copy_from_slice(tid)),
                ],
            )
            .await;
        match res {
            Ok(_) => {}
            // Not a blob after all (or its file is gone): keep the record.
            Err(ZeoError::Remote { class, .. }) if class.ends_with("POSKeyError") => {
                conn.pending_async.clear();
                continue;
            }
            Err(e) => return Err(e),
        }
        let mut content = Vec::new();
        let mut stopped = false;
        while let Some(m) = conn.pending_async.pop_front() {
            match m.method.as_str() {
                "receiveBlobChunk" => {
                    let chunk = m
                        .args
                        .as_seq()
                        .and_then(|a| a.get(2))
                        .and_then(|c| c.as_bytes())
                        .ok_or_else(|| protocol("receiveBlobChunk", &m.args))?;
                    content.extend_from_slice(chunk);
                }
                "receiveBlobStop" => stopped = true,
                _ => {}
            }
        }
        if !stopped {
            return Err(ZeoError::Protocol(
                "sendBlob replied before receiveBlobStop".into(),
            ));
        }
        records[i].blob = Some(Bytes::from(content));
    }
    Ok(())
}

/// Reads one transaction by tid (None if the backend does not have it).
pub async fn read_txn(conn: &mut ZeoConn, tid: &Tid) -> Result<Option<Txn>, ZeoError> {
    let mut c = HistoryCursor::open(conn, *tid, Some(*tid)).await?;
    let t = c.next(conn).await?;
    // Drain so the server frees the iterator.
    if t.is_some() {
        let _ = c.next(conn).await?;
    }
    Ok(t.filter(|t| &t.tid == tid))
}
