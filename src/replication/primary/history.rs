//! Reading committed transactions back from a ZEO backend: the authoritative
//! source of what the primary committed (invariant 2), used for live
//! transactions, for catch-up, and by `zrelay verify`.
//!
//! Uses ZEO's iterator RPCs (`iterator_start`, `iterator_next`,
//! `iterator_record_start`, `iterator_record_next`) and `sendBlob` for blob
//! files. Iterator state lives in the server per connection, so a cursor is
//! bound to one `ZeoConn`.

use bytes::Bytes;

pub use crate::replication::txn::tid_after;
use crate::replication::txn::{tid_hex, Oid, Record, Tid, Txn};
use crate::wire::{pickle, Value};
use crate::zeoclient::{ZeoConn, ZeoError};

pub fn to_tid(b: &[u8]) -> Option<Tid> {
    b.try_into().ok()
}

fn protocol(what: &str, v: &Value) -> ZeoError {
    ZeoError::Protocol(format!("unexpected {what}: {v:?}"))
}

/// An open iterator over the backend's transactions with tid in
/// `[start, stop]`.
pub struct HistoryCursor {
    iid: i64,
    done: bool,
    /// Record reads pipelined with the record iterator's start. Two covers
    /// the common one-record transaction; more are read one by one, because
    /// a read past the end of a record iterator makes the server log a
    /// traceback (the count is unknown until the end is reached).
    guess: usize,
    /// Fetch blob files for blob records.
    pub with_blobs: bool,
}

fn bv(b: &[u8]) -> Value {
    Value::Bytes(Bytes::copy_from_slice(b))
}

/// Checks a reply that returns a new iterator id against the prediction.
fn check_iid(conn: &mut ZeoConn, got: &Value, want: i64) -> Result<(), ZeoError> {
    match got.as_i64() {
        Some(i) if i == want => Ok(()),
        Some(i) => {
            conn.next_iterator_id = i + 1;
            Err(ZeoError::Protocol(format!(
                "iterator id {i}, expected {want}"
            )))
        }
        None => Err(protocol("iterator id", got)),
    }
}

impl HistoryCursor {
    pub async fn open(
        conn: &mut ZeoConn,
        start: Tid,
        stop: Option<Tid>,
    ) -> Result<HistoryCursor, ZeoError> {
        let stop = match stop {
            Some(s) => bv(&s),
            None => Value::None,
        };
        let want = conn.next_iterator_id;
        conn.next_iterator_id += 1;
        let iid = conn.call("iterator_start", vec![bv(&start), stop]).await?;
        check_iid(conn, &iid, want)?;
        Ok(HistoryCursor {
            iid: want,
            done: false,
            guess: 2,
            with_blobs: true,
        })
    }

    /// Frees the server-side iterator of a cursor not read to its end (an
    /// async call: nothing to wait for).
    pub fn close(self, conn: &mut ZeoConn) -> Result<(), ZeoError> {
        if !self.done {
            conn.queue_async("iterator_gc", vec![Value::List(vec![Value::Int(self.iid)])])?;
        }
        Ok(())
    }

    /// The next transaction, or None at the end of the range (as the storage
    /// stood when it was read). Two round trips: the header, then the
    /// record iterator with a batch of record reads.
    pub async fn next(&mut self, conn: &mut ZeoConn) -> Result<Option<Txn>, ZeoError> {
        if self.done {
            return Ok(None);
        }
        let head = conn
            .call("iterator_next", vec![Value::Int(self.iid)])
            .await?;
        if head.is_none() {
            self.done = true;
            return Ok(None);
        }
        let (tid, status, user, description, ext) = parse_header(&head)?;
        let records = read_records(conn, self.iid, &tid, self.guess).await?;
        finish_txn(
            conn,
            tid,
            status,
            user,
            description,
            ext,
            records,
            self.with_blobs,
        )
        .await
        .map(Some)
    }
}

type Header = (Tid, String, Bytes, Bytes, Vec<u8>);

fn parse_header(head: &Value) -> Result<Header, ZeoError> {
    let h = head
        .as_seq()
        .ok_or_else(|| protocol("iterator_next", head))?;
    if h.len() != 5 {
        return Err(protocol("iterator_next", head));
    }
    let tid = h[0]
        .as_bytes()
        .and_then(to_tid)
        .ok_or_else(|| protocol("tid", &h[0]))?;
    let status = match &h[1] {
        Value::Str(s) => s.clone(),
        Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
        v => return Err(protocol("status", v)),
    };
    let user = text_bytes(&h[2]).ok_or_else(|| protocol("user", &h[2]))?;
    let description = text_bytes(&h[3]).ok_or_else(|| protocol("description", &h[3]))?;
    let mut ext = Vec::new();
    pickle::encode(&h[4], &mut ext)?;
    Ok((tid, status, user, description, ext))
}

fn parse_record(r: &Value) -> Result<Record, ZeoError> {
    let f = r.as_seq().ok_or_else(|| protocol("record", r))?;
    if f.len() != 4 {
        return Err(protocol("record", r));
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
    Ok(Record {
        oid,
        data,
        data_txn,
        blob: None,
    })
}

/// Opens the record iterator of the transaction `tid` just returned by the
/// transaction iterator `iid`, and reads all its records, the first `batch`
/// reads pipelined with the open.
async fn read_records(
    conn: &mut ZeoConn,
    iid: i64,
    tid: &Tid,
    batch: usize,
) -> Result<Vec<Record>, ZeoError> {
    let rid = conn.next_iterator_id;
    conn.next_iterator_id += 1;
    let start = conn.queue_call("iterator_record_start", vec![Value::Int(iid), bv(tid)])?;
    let mut reads = Vec::with_capacity(batch);
    for _ in 0..batch.max(1) {
        reads.push(conn.queue_call("iterator_record_next", vec![Value::Int(rid)])?);
    }
    conn.flush().await?;
    let got = conn.wait_reply(&start).await?;
    check_iid(conn, &got, rid)?;
    let mut records = Vec::new();
    let mut ended = false;
    for q in &reads {
        let r = match conn.wait_reply(q).await {
            Ok(r) => r,
            // A read past the end of an empty transaction's iterator.
            Err(ZeoError::Remote { .. }) if ended => continue,
            Err(e) => return Err(e),
        };
        if r.is_none() {
            ended = true;
            continue;
        }
        if ended {
            return Err(ZeoError::Protocol("record after end of iterator".into()));
        }
        records.push(parse_record(&r)?);
    }
    while !ended {
        let r = conn
            .call("iterator_record_next", vec![Value::Int(rid)])
            .await?;
        if r.is_none() {
            ended = true;
        } else {
            records.push(parse_record(&r)?);
        }
    }
    Ok(records)
}

#[allow(clippy::too_many_arguments)]
async fn finish_txn(
    conn: &mut ZeoConn,
    tid: Tid,
    status: String,
    user: Bytes,
    description: Bytes,
    ext: Vec<u8>,
    mut records: Vec<Record>,
    with_blobs: bool,
) -> Result<Txn, ZeoError> {
    if with_blobs {
        fetch_blobs(conn, &tid, &mut records).await?;
    }
    Ok(Txn {
        tid,
        status,
        user,
        description,
        extension: Bytes::from(ext),
        records,
    })
}

/// Reads the single transaction `tid`, known to change `n_oids` objects, in
/// one round trip when the guess holds: iterator start, header, record
/// iterator and `n_oids + 1` record reads are sent together (the iterator
/// ids are predicted and checked). Returns None if the backend has no such
/// transaction.
pub async fn fetch_txn(
    conn: &mut ZeoConn,
    tid: &Tid,
    n_oids: usize,
) -> Result<Option<Txn>, ZeoError> {
    let iid = conn.next_iterator_id;
    let rid = iid + 1;
    conn.next_iterator_id += 2;
    let q_start = conn.queue_call("iterator_start", vec![bv(tid), bv(tid)])?;
    let q_head = conn.queue_call("iterator_next", vec![Value::Int(iid)])?;
    let q_rstart = conn.queue_call("iterator_record_start", vec![Value::Int(iid), bv(tid)])?;
    let mut reads = Vec::new();
    for _ in 0..n_oids + 1 {
        reads.push(conn.queue_call("iterator_record_next", vec![Value::Int(rid)])?);
    }
    conn.flush().await?;
    let got = conn.wait_reply(&q_start).await?;
    check_iid(conn, &got, iid)?;
    let head = conn.wait_reply(&q_head).await?;
    if head.is_none() {
        // No such transaction: the record calls fail (nothing to start
        // from); drain their replies.
        let _ = conn.wait_reply(&q_rstart).await;
        for q in &reads {
            let _ = conn.wait_reply(q).await;
        }
        return Ok(None);
    }
    let (htid, status, user, description, ext) = parse_header(&head)?;
    let got = conn.wait_reply(&q_rstart).await?;
    check_iid(conn, &got, rid)?;
    if htid != *tid {
        return Err(ZeoError::Protocol(format!(
            "iterator_start({}) gave transaction {}",
            tid_hex(tid),
            tid_hex(&htid)
        )));
    }
    let mut records = Vec::new();
    let mut ended = false;
    let mut failed = None;
    for q in &reads {
        match conn.wait_reply(q).await {
            Ok(r) if r.is_none() => ended = true,
            Ok(r) if !ended => records.push(parse_record(&r)?),
            Ok(_) => return Err(ZeoError::Protocol("record after end of iterator".into())),
            // Fewer records than oids: reads past the end fail.
            Err(e @ ZeoError::Remote { .. }) => {
                ended = true;
                failed.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    if !ended {
        loop {
            let r = conn
                .call("iterator_record_next", vec![Value::Int(rid)])
                .await?;
            if r.is_none() {
                break;
            }
            records.push(parse_record(&r)?);
        }
    }
    // Free the transaction iterator (the record iterator freed itself at
    // its end). Async: no reply to wait for; it goes out with the next batch.
    conn.queue_async("iterator_gc", vec![Value::List(vec![Value::Int(iid)])])?;
    let _ = failed;
    finish_txn(conn, htid, status, user, description, ext, records, true)
        .await
        .map(Some)
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
        // Other async messages (the invalidations of the feed's observer,
        // which reads back on its own connection) are kept, in order; only
        // the blob's own messages are taken.
        let mut kept = std::mem::take(&mut conn.pending_async);
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
                kept.extend(
                    conn.pending_async
                        .drain(..)
                        .filter(|m| !m.method.starts_with("receiveBlob")),
                );
                conn.pending_async = kept;
                continue;
            }
            Err(e) => return Err(e),
        }
        let mut content = Vec::new();
        let mut stopped = false;
        while let Some(m) = conn.pending_async.pop_front() {
            match &*m.method {
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
                "receiveBlobStart" => {}
                _ => kept.push_back(m),
            }
        }
        conn.pending_async = kept;
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

/// Whether the transaction `tid`, absent from this storage, lies in a region
/// removed by a pack: the first transaction after it carries the packed
/// status "p" (a pack marks every transaction it keeps before the pack time),
/// so `tid` is older than the pack time and a pack dropped it with all its
/// records.
pub async fn packed_away(conn: &mut ZeoConn, tid: &Tid) -> Result<bool, ZeoError> {
    let mut c = HistoryCursor::open(conn, tid_after(tid), None).await?;
    c.with_blobs = false;
    let next = c.next(conn).await?;
    c.close(conn)?;
    conn.flush().await?;
    Ok(next.map(|t| t.status == "p").unwrap_or(false))
}
