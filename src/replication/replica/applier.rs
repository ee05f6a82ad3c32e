//! Applying replicated transactions to the replica's backend with their
//! original tids: `tpc_begin(tid, status)`, `restorea` per record (blob
//! records with `storeBlobStart/Chunk/End`), `vote`, `tpc_finish`.
//!
//! The backend checks nothing about tids on restore (a duplicate or older tid
//! commits silently), so order is kept here: a transaction is applied only if
//! its tid is newer than the backend's last, and after a lost connection the
//! backend's `lastTransaction` is asked before anything is re-sent (a
//! `tpc_finish` whose reply was lost may have committed).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::BackendAddr;
use crate::replication::applied::AppliedLog;
use crate::replication::stages::{self, Stage};
use crate::replication::txn::{Tid, Txn};
use crate::wire::{pickle, Value};
use crate::zeoclient::{ZeoConn, ZeoError};

/// Blob content is sent in chunks of this size (ZEO's own is 59,000 bytes;
/// larger chunks mean fewer messages, bounded well under the frame limit).
const BLOB_CHUNK: usize = 1 << 20;
const MAXTID: [u8; 8] = [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("replica backend: {0}")]
    Backend(#[from] ZeoError),
    #[error("refusing to apply tid {tid} over newer-or-equal backend tid {last}")]
    OutOfOrder { tid: String, last: String },
    #[error("tpc_finish returned tid {got}, expected {want}")]
    WrongTid { got: String, want: String },
    #[error("bad extension in stream: {0}")]
    Extension(String),
    /// Someone else committed to the replica's backend: its history is no
    /// longer the primary's.
    #[error("replica backend has a commit the applier did not make: {0}")]
    Foreign(String),
}

pub struct Applier {
    addr: BackendAddr,
    storage: String,
    connect_timeout: Duration,
    call_timeout: Duration,
    max_message_bytes: usize,
    conn: Option<ZeoConn>,
    last_tid: Tid,
    applied: Arc<AppliedLog>,
    next_txn_id: i64,
    /// What the backend's `lastTransaction` is expected to answer. Normally
    /// `last_tid`; after a crash mid-commit FileStorage may report the tid of
    /// the transaction it truncated away (see `set_real_last`).
    reported_last: Tid,
    /// The transaction whose tpc_finish was sent but not confirmed.
    in_doubt: Option<Tid>,
    /// msgid of that tpc_finish, when its reply is left for later so the
    /// next transaction can be sent meanwhile (pipelining).
    pending_finish: Option<Value>,
    /// Transactions confirmed committed, not yet taken by the caller.
    confirmed: Vec<Tid>,
}

fn hex(t: &[u8]) -> String {
    t.iter().map(|b| format!("{b:02x}")).collect()
}

fn bv(b: &[u8]) -> Value {
    Value::Bytes(Bytes::copy_from_slice(b))
}

impl Applier {
    pub fn new(
        addr: BackendAddr,
        storage: String,
        connect_timeout: Duration,
        call_timeout: Duration,
        max_message_bytes: usize,
        applied: Arc<AppliedLog>,
    ) -> Self {
        Applier {
            addr,
            storage,
            connect_timeout,
            call_timeout,
            max_message_bytes,
            conn: None,
            last_tid: [0; 8],
            applied,
            next_txn_id: 1,
            reported_last: [0; 8],
            in_doubt: None,
            pending_finish: None,
            confirmed: Vec::new(),
        }
    }

    /// The backend's last tid as of the last successful exchange.
    pub fn last_tid(&self) -> Tid {
        self.last_tid
    }

    /// A transaction whose `tpc_finish` was sent but whose reply never came:
    /// after reconnecting, the backend's last tid tells whether it committed.
    pub fn in_doubt(&self) -> Option<Tid> {
        self.in_doubt
    }

    /// (Re)connects and learns the backend's last tid. Always asks the
    /// backend: after a lost connection, a `tpc_finish` may have committed.
    pub async fn connect(&mut self) -> Result<Tid, ApplyError> {
        self.conn = None;
        self.pending_finish = None;
        // Whatever was in doubt is settled by the position read below (the
        // caller looks at `in_doubt()` before reconnecting).
        self.in_doubt = None;
        let (mut conn, _) = ZeoConn::open(
            &self.addr,
            &self.storage,
            false,
            self.connect_timeout,
            self.call_timeout,
            self.max_message_bytes,
        )
        .await?;
        let last = conn.call("lastTransaction", vec![]).await?;
        let last: Tid = last
            .as_bytes()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ZeoError::Protocol("lastTransaction is not a tid".into()))?;
        self.last_tid = last;
        self.reported_last = last;
        self.applied.start_at(last);
        self.conn = Some(conn);
        Ok(last)
    }

    /// The newest transaction the backend really holds is `real`, older than
    /// what `lastTransaction` reported (a commit cut by a crash between vote
    /// and finish leaves its tid behind in FileStorage's memory). Order is
    /// kept against `real`; the stale report is tolerated until the next
    /// commit replaces it.
    pub fn set_real_last(&mut self, real: Tid) {
        self.last_tid = real;
    }

    /// Transactions confirmed committed since the last call, in order.
    pub fn take_confirmed(&mut self) -> Vec<Tid> {
        std::mem::take(&mut self.confirmed)
    }

    /// Whether a `tpc_finish` reply is still to be read.
    pub fn has_pending(&self) -> bool {
        self.pending_finish.is_some()
    }

    /// Reads the reply of a pipelined `tpc_finish`, if any.
    pub async fn complete(&mut self) -> Result<(), ApplyError> {
        let r = self.complete_inner().await;
        if r.is_err() {
            self.conn = None;
            self.pending_finish = None;
        }
        r
    }

    async fn complete_inner(&mut self) -> Result<(), ApplyError> {
        let Some(fin) = self.pending_finish.take() else {
            return Ok(());
        };
        let want = self.in_doubt.unwrap_or(self.last_tid);
        let conn = self.conn.as_mut().ok_or(ZeoError::Closed)?;
        conn.flush().await?;
        let got = conn.wait_reply(&fin).await?;
        let got = got.as_bytes().unwrap_or_default();
        if got != want {
            return Err(ApplyError::WrongTid {
                got: hex(got),
                want: hex(&want),
            });
        }
        stages::record(Stage::Finished, &want);
        self.last_tid = want;
        self.reported_last = want;
        self.in_doubt = None;
        self.confirmed.push(want);
        Ok(())
    }

    /// Opens a connection for reading the replica's own history.
    pub async fn reader(&self) -> Result<ZeoConn, ApplyError> {
        let (conn, _) = ZeoConn::open(
            &self.addr,
            &self.storage,
            true,
            self.connect_timeout,
            self.call_timeout,
            self.max_message_bytes,
        )
        .await?;
        Ok(conn)
    }

    /// Applies one transaction. With `more_coming`, the reply of its
    /// `tpc_finish` is read later (by the next `apply` or by `complete`), so
    /// the next transaction travels while this one finishes; see
    /// `take_confirmed` for what is known committed. On error the connection
    /// is dropped (the backend aborts anything unfinished) and must be
    /// re-established with `connect`, which re-reads the backend's last tid.
    pub async fn apply(&mut self, txn: &Txn, more_coming: bool) -> Result<(), ApplyError> {
        if self.conn.is_none() {
            self.connect().await?;
        }
        let expected_last = self.in_doubt.unwrap_or(self.last_tid);
        if txn.tid <= expected_last {
            return Err(ApplyError::OutOfOrder {
                tid: hex(&txn.tid),
                last: hex(&expected_last),
            });
        }
        let r = self.apply_inner(txn, more_coming).await;
        if r.is_err() {
            self.conn = None;
            self.pending_finish = None;
        }
        r
    }

    async fn apply_inner(&mut self, txn: &Txn, more_coming: bool) -> Result<(), ApplyError> {
        let ext =
            pickle::decode(&txn.extension).map_err(|e| ApplyError::Extension(e.to_string()))?;
        let txn_id = Value::Int(self.next_txn_id);
        self.next_txn_id += 1;
        let conn = self.conn.as_mut().ok_or(ZeoError::Closed)?;
        // Pipelined with the transaction: where the backend stands now. Any
        // commit that did not come from this applier shows up here or as an
        // invalidation on this connection.
        conn.pending_async
            .retain(|m| m.method != "invalidateTransaction");
        let last_q = conn.queue_call("lastTransaction", vec![])?;
        conn.queue_async(
            "tpc_begin",
            vec![
                txn_id.clone(),
                bv(&txn.user),
                bv(&txn.description),
                ext,
                bv(&txn.tid),
                Value::Str(txn.status.clone()),
            ],
        )?;
        // The server applies restores in order, then blob stores popped from
        // the end of its blob log (ZEOStorage._vote). Restores first and blob
        // stores in reverse reproduce the primary's record order, where
        // ClientStorage's blob records likewise come last.
        for rec in txn.records.iter().filter(|r| r.blob.is_none()) {
            conn.queue_async(
                "restorea",
                vec![
                    bv(&rec.oid),
                    bv(&txn.tid),
                    rec.data.as_ref().map(|d| bv(d)).unwrap_or(Value::None),
                    rec.data_txn.as_ref().map(|d| bv(d)).unwrap_or(Value::None),
                    txn_id.clone(),
                ],
            )?;
        }
        for rec in txn.records.iter().rev() {
            let Some(blob) = &rec.blob else { continue };
            // A blob needs a store (restorea carries no file), which checks
            // the oid's current serial on the replica.
            conn.flush().await?;
            let serial = match conn
                .call("loadBefore", vec![bv(&rec.oid), bv(&MAXTID)])
                .await
            {
                Ok(Value::Tuple(v)) if v.len() == 3 => v[1]
                    .as_bytes()
                    .map(Bytes::copy_from_slice)
                    .unwrap_or_else(|| Bytes::from_static(&[0; 8])),
                Ok(_) => Bytes::from_static(&[0; 8]),
                Err(ZeoError::Remote { class, .. }) if class.ends_with("POSKeyError") => {
                    Bytes::from_static(&[0; 8])
                }
                Err(e) => return Err(e.into()),
            };
            conn.queue_async("storeBlobStart", vec![])?;
            for chunk in blob.chunks(BLOB_CHUNK) {
                conn.queue_async("storeBlobChunk", vec![bv(chunk)])?;
            }
            let data = rec.data.as_ref().map(|d| bv(d)).unwrap_or(Value::None);
            conn.queue_async(
                "storeBlobEnd",
                vec![bv(&rec.oid), Value::Bytes(serial), data, txn_id.clone()],
            )?;
        }
        let vote = conn.queue_call("vote", vec![txn_id.clone()])?;
        conn.flush().await?;
        stages::record(Stage::BeginSent, &txn.tid);
        // The previous transaction's finish was sent before this batch.
        self.complete_inner().await?;
        let conn = self.conn.as_mut().ok_or(ZeoError::Closed)?;
        let backend_last = conn.wait_reply(&last_q).await?;
        conn.wait_reply(&vote).await?;
        stages::record(Stage::Voted, &txn.tid);
        let foreign = conn
            .pending_async
            .iter()
            .any(|m| m.method == "invalidateTransaction");
        if backend_last.as_bytes() != Some(&self.reported_last[..]) || foreign {
            let _ = conn.call("tpc_abort", vec![txn_id]).await;
            return Err(ApplyError::Foreign(format!(
                "expected last tid {}, backend has {}",
                hex(&self.reported_last),
                match backend_last.as_bytes() {
                    Some(b) => hex(b),
                    None => format!("{backend_last:?}"),
                }
            )));
        }
        // Recorded before tpc_finish: the backend broadcasts the (empty)
        // invalidation right after committing, and client sessions look the
        // oids up here.
        self.applied.record(txn.tid, txn.oids());
        let fin = conn.queue_call("tpc_finish", vec![txn_id])?;
        self.in_doubt = Some(txn.tid);
        conn.flush().await?;
        self.pending_finish = Some(fin);
        if !more_coming {
            self.complete_inner().await?;
        }
        Ok(())
    }
}
