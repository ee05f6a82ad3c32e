//! The capture's proof obligations, one test per fallback reason, and the
//! hub's matching of session reports with observed tids.

use std::time::{Duration, Instant};

use super::*;

const TID: Tid = [0, 0, 0, 0, 0, 0, 1, 0];
const MAX: usize = 1 << 20;

fn oid(n: u8) -> Value {
    Value::bytes(vec![0, 0, 0, 0, 0, 0, 0, n])
}

fn blob_pickle() -> Value {
    Value::bytes(&b"\x80\x03cZODB.blob\nBlob\nq\x01.N."[..])
}

fn ext() -> Value {
    Value::Dict(vec![
        (Value::str("note"), Value::str("x")),
        (
            Value::str("nested"),
            Value::Dict(vec![(Value::str("n"), Value::Int(3))]),
        ),
    ])
}

fn begin_with(ext: Value, tid: Value, status: &str) -> Message {
    Message::async_call(
        "tpc_begin",
        vec![
            Value::Int(77),
            Value::bytes(&b"user"[..]),
            Value::bytes(&b"desc"[..]),
            ext,
            tid,
            Value::str(status),
        ],
    )
}

fn begin() -> Message {
    begin_with(ext(), Value::None, " ")
}

fn storea(n: u8, data: Value) -> Message {
    Message::async_call(
        "storea",
        vec![oid(n), Value::bytes(vec![0; 8]), data, Value::Int(77)],
    )
}

fn call(method: &str) -> PendingCall {
    PendingCall {
        msgid: Value::Int(5),
        method: crate::wire::method_name(method),
        sent: Some(Instant::now()),
    }
}

/// Drives one commit: begin, `body`, vote answered with `vote`, finish
/// answered with TID. Returns the finish outcome.
fn commit(
    enc: Encoding,
    begin: Message,
    body: Vec<Message>,
    vote: Value,
) -> Option<(Tid, Result<Txn, Reason>)> {
    let mut c = Capture::new(MAX);
    assert!(c.on_client(&begin, enc).is_none());
    for m in &body {
        assert!(c.on_client(m, enc).is_none());
    }
    c.on_client(&Message::call(Value::Int(5), "vote", vec![]), enc);
    assert!(c
        .on_reply(&call("vote"), &Message::reply(Value::Int(5), vote))
        .is_none());
    let sent = c.on_client(
        &Message::call(Value::Int(6), "tpc_finish", vec![Value::Int(77)]),
        enc,
    );
    assert!(matches!(sent, Some(Event::FinishSent)));
    match c.on_reply(
        &call("tpc_finish"),
        &Message::reply(Value::Int(6), Value::bytes(TID.to_vec())),
    ) {
        Some(Event::FinishDone(o)) => o,
        other => panic!("{other:?}"),
    }
}

fn outcome(enc: Encoding, begin: Message, body: Vec<Message>, vote: Value) -> Result<Txn, Reason> {
    let (tid, r) = commit(enc, begin, body, vote).expect("committed");
    assert_eq!(tid, TID);
    r
}

fn empty() -> Value {
    Value::List(vec![])
}

#[test]
fn plain_commit_is_captured_in_store_order() {
    let txn = outcome(
        Encoding::Pickle,
        begin(),
        vec![
            storea(2, Value::bytes(&b"two"[..])),
            Message::async_call(
                "checkCurrentSerialInTransaction",
                vec![oid(9), Value::bytes(vec![0; 8]), Value::Int(77)],
            ),
            storea(1, Value::bytes(&b"one"[..])),
        ],
        empty(),
    )
    .unwrap();
    assert_eq!(txn.tid, TID);
    assert_eq!(txn.status, " ");
    assert_eq!(&txn.user[..], b"user");
    assert_eq!(&txn.description[..], b"desc");
    let mut want_ext = Vec::new();
    pickle::encode(&ext(), &mut want_ext).unwrap();
    assert_eq!(&txn.extension[..], &want_ext[..]);
    let got: Vec<(u8, &[u8])> = txn
        .records
        .iter()
        .map(|r| (r.oid[7], r.data.as_deref().unwrap()))
        .collect();
    assert_eq!(got, vec![(2, &b"two"[..]), (1, &b"one"[..])]);
    assert!(txn
        .records
        .iter()
        .all(|r| r.data_txn.is_none() && r.blob.is_none()));
    // Empty and None vote answers both mean "nothing resolved".
    assert!(outcome(Encoding::Msgpack, begin(), vec![], Value::None).is_ok());
}

#[test]
fn blobs_follow_the_stores_last_first_with_their_bytes() {
    let blob_end = |n: u8| {
        Message::async_call(
            "storeBlobEnd",
            vec![
                oid(n),
                Value::bytes(vec![0; 8]),
                blob_pickle(),
                Value::Int(77),
            ],
        )
    };
    let chunk = |b: &'static [u8]| Message::async_call("storeBlobChunk", vec![Value::bytes(b)]);
    let start = || Message::async_call("storeBlobStart", vec![]);
    let txn = outcome(
        Encoding::Pickle,
        begin(),
        vec![
            start(),
            chunk(b"b1"),
            chunk(b"b2"),
            blob_end(2),
            storea(1, Value::bytes(&b"plain"[..])),
            // ClientStorage stores a new blob's oid twice: the earlier
            // record carries no file in the read-back.
            storea(3, blob_pickle()),
            start(),
            chunk(b"c"),
            blob_end(3),
        ],
        empty(),
    )
    .unwrap();
    let got: Vec<(u8, Option<&[u8]>)> = txn
        .records
        .iter()
        .map(|r| (r.oid[7], r.blob.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            (1, None),
            (3, None),
            (3, Some(&b"c"[..])),
            (2, Some(&b"b1b2"[..]))
        ]
    );
}

#[test]
fn a_blob_without_its_bytes_is_read_back() {
    // A plain store whose pickle mentions ZODB.blob (e.g. a container
    // referring to a blob) has no file on the backend: no blob, as in the
    // read-back (its sendBlob gets POSKeyError).
    let txn = outcome(
        Encoding::Pickle,
        begin(),
        vec![storea(1, blob_pickle())],
        empty(),
    )
    .unwrap();
    assert_eq!(txn.records[0].blob, None);
    let shared = Message::async_call(
        "storeBlobShared",
        vec![
            oid(1),
            Value::bytes(vec![0; 8]),
            blob_pickle(),
            Value::str("x.tmp"),
            Value::Int(77),
        ],
    );
    let r = outcome(Encoding::Pickle, begin(), vec![shared], empty());
    assert_eq!(r.unwrap_err(), Reason::BlobNotAtHand);
}

#[test]
fn a_conflict_resolved_at_vote_is_read_back() {
    let r = outcome(
        Encoding::Pickle,
        begin(),
        vec![storea(1, Value::bytes(&b"x"[..]))],
        Value::List(vec![oid(1)]),
    );
    assert_eq!(r.unwrap_err(), Reason::ResolvedConflict);
    // Client-side resolution: vote answers the conflicts as dicts.
    let r = outcome(
        Encoding::Pickle,
        begin(),
        vec![],
        Value::List(vec![Value::Dict(vec![(Value::str("oid"), oid(1))])]),
    );
    assert_eq!(r.unwrap_err(), Reason::ResolvedConflict);
}

#[test]
fn undo_restore_and_delete_are_read_back() {
    let undo = Message::async_call(
        "undoa",
        vec![Value::bytes(&b"AAAAAAAAAAE="[..]), Value::Int(77)],
    );
    assert_eq!(
        outcome(Encoding::Pickle, begin(), vec![undo], empty()).unwrap_err(),
        Reason::Undo
    );
    let restore = Message::async_call(
        "restorea",
        vec![
            oid(1),
            Value::bytes(vec![0; 8]),
            Value::bytes(&b"x"[..]),
            Value::None,
            Value::Int(77),
        ],
    );
    assert_eq!(
        outcome(Encoding::Pickle, begin(), vec![restore], empty()).unwrap_err(),
        Reason::Restore
    );
    let with_tid = begin_with(ext(), Value::bytes(TID.to_vec()), " ");
    assert_eq!(
        outcome(Encoding::Pickle, with_tid, vec![], empty()).unwrap_err(),
        Reason::Restore
    );
    let packed = begin_with(ext(), Value::None, "p");
    assert_eq!(
        outcome(Encoding::Pickle, packed, vec![], empty()).unwrap_err(),
        Reason::Restore
    );
    let delete = Message::async_call(
        "deleteObject",
        vec![oid(1), Value::bytes(vec![0; 8]), Value::Int(77)],
    );
    assert_eq!(
        outcome(Encoding::Pickle, begin(), vec![delete], empty()).unwrap_err(),
        Reason::Delete
    );
}

#[test]
fn extensions_that_may_not_come_back_unchanged_are_read_back() {
    // Raw pickle bytes are stored verbatim; the read-back re-pickles them.
    let raw = begin_with(Value::bytes(&b"}q\x00."[..]), Value::None, " ");
    assert_eq!(
        outcome(Encoding::Pickle, raw, vec![], empty()).unwrap_err(),
        Reason::Extension
    );
    let seq = || Value::Dict(vec![(Value::str("l"), Value::Tuple(vec![Value::Int(1)]))]);
    // msgpack cannot tell a tuple from a list: the server stores a list.
    assert_eq!(
        outcome(
            Encoding::Msgpack,
            begin_with(seq(), Value::None, " "),
            vec![],
            empty()
        )
        .unwrap_err(),
        Reason::Extension
    );
    assert!(outcome(
        Encoding::Pickle,
        begin_with(seq(), Value::None, " "),
        vec![],
        empty()
    )
    .is_ok());
    let object = Value::Dict(vec![(
        Value::str("o"),
        Value::Global {
            module: "m".into(),
            name: "n".into(),
        },
    )]);
    assert_eq!(
        outcome(
            Encoding::Pickle,
            begin_with(object, Value::None, " "),
            vec![],
            empty()
        )
        .unwrap_err(),
        Reason::Extension
    );
}

#[test]
fn a_commit_over_the_size_limit_is_read_back() {
    let mut c = Capture::new(100);
    c.on_client(&begin(), Encoding::Pickle);
    c.on_client(&storea(1, Value::bytes(vec![7; 200])), Encoding::Pickle);
    c.on_client(
        &Message::call(Value::Int(6), "tpc_finish", vec![]),
        Encoding::Pickle,
    );
    let Some(Event::FinishDone(Some((_, r)))) = c.on_reply(
        &call("tpc_finish"),
        &Message::reply(Value::Int(6), Value::bytes(TID.to_vec())),
    ) else {
        panic!("no outcome")
    };
    assert_eq!(r.unwrap_err(), Reason::TooBig);
}

#[test]
fn malformed_calls_and_failed_votes_are_read_back() {
    let bad = Message::async_call("storea", vec![Value::Int(1)]);
    assert_eq!(
        outcome(Encoding::Pickle, begin(), vec![bad], empty()).unwrap_err(),
        Reason::Unexpected
    );
    let mut c = Capture::new(MAX);
    c.on_client(&begin(), Encoding::Pickle);
    c.on_reply(
        &call("vote"),
        &Message::error_reply(Value::Int(5), "ConflictError", Value::None),
    );
    c.on_client(
        &Message::call(Value::Int(6), "tpc_finish", vec![]),
        Encoding::Pickle,
    );
    let Some(Event::FinishDone(Some((_, r)))) = c.on_reply(
        &call("tpc_finish"),
        &Message::reply(Value::Int(6), Value::bytes(TID.to_vec())),
    ) else {
        panic!("no outcome")
    };
    assert_eq!(r.unwrap_err(), Reason::Unexpected);
}

#[test]
fn a_failed_finish_or_a_closed_session_reports_no_commit() {
    let mut c = Capture::new(MAX);
    c.on_client(&begin(), Encoding::Pickle);
    c.on_client(
        &Message::call(Value::Int(6), "tpc_finish", vec![]),
        Encoding::Pickle,
    );
    let ev = c.on_reply(
        &call("tpc_finish"),
        &Message::error_reply(Value::Int(6), "StorageTransactionError", Value::None),
    );
    assert!(matches!(ev, Some(Event::FinishDone(None))), "{ev:?}");
    c.on_client(&begin(), Encoding::Pickle);
    c.on_client(
        &Message::call(Value::Int(7), "tpc_finish", vec![]),
        Encoding::Pickle,
    );
    assert!(matches!(c.on_close(), Some(Event::FinishDone(None))));
    assert!(c.on_close().is_none());
    // An aborted transaction reports nothing.
    c.on_client(&begin(), Encoding::Pickle);
    c.on_client(
        &Message::async_call("tpc_abort", vec![Value::Int(77)]),
        Encoding::Pickle,
    );
    let sent = c.on_client(
        &Message::call(Value::Int(8), "tpc_finish", vec![]),
        Encoding::Pickle,
    );
    assert!(sent.is_none());
}

#[test]
fn observer_oids_must_equal_the_stored_ones() {
    let txn = outcome(
        Encoding::Pickle,
        begin(),
        vec![
            storea(1, Value::bytes(&b"a"[..])),
            storea(2, Value::bytes(&b"b"[..])),
        ],
        empty(),
    )
    .unwrap();
    let (o1, o2, o3) = (
        [0u8, 0, 0, 0, 0, 0, 0, 1],
        [0u8, 0, 0, 0, 0, 0, 0, 2],
        [0u8; 8],
    );
    assert_eq!(check_oids(&txn, &[&o2, &o1]), Ok(()));
    assert_eq!(check_oids(&txn, &[&o1]), Err(Reason::OidMismatch));
    assert_eq!(check_oids(&txn, &[&o1, &o2, &o3]), Err(Reason::OidMismatch));
}

fn captured_txn(tid: Tid) -> Txn {
    Txn {
        tid,
        status: " ".into(),
        user: Bytes::new(),
        description: Bytes::new(),
        extension: Bytes::new(),
        records: vec![],
    }
}

#[tokio::test]
async fn hub_matches_reports_with_observed_tids() {
    let hub = CaptureHub::new();
    let wait = Duration::from_secs(5);
    // Nothing in flight: a bypass, at once.
    assert!(matches!(
        hub.take(&TID, wait).await,
        Taken::ReadBack(Reason::Bypass)
    ));
    // Reported before the observer asks.
    hub.report(Event::FinishSent);
    hub.report(Event::FinishDone(Some((TID, Ok(captured_txn(TID))))));
    assert!(matches!(hub.take(&TID, wait).await, Taken::Captured(t) if t.tid == TID));
    // Reported while the feed waits.
    hub.report(Event::FinishSent);
    let h = hub.clone();
    let later = tokio::spawn(async move {
        tokio::task::yield_now().await;
        h.report(Event::FinishDone(Some((TID, Err(Reason::Undo)))));
    });
    assert!(matches!(
        hub.take(&TID, wait).await,
        Taken::ReadBack(Reason::Undo)
    ));
    later.await.unwrap();
    // Two sessions claiming one tid.
    for _ in 0..2 {
        hub.report(Event::FinishSent);
        hub.report(Event::FinishDone(Some((TID, Ok(captured_txn(TID))))));
    }
    assert!(matches!(
        hub.take(&TID, wait).await,
        Taken::ReadBack(Reason::Ambiguous)
    ));
    // A finish that never reports in time.
    hub.report(Event::FinishSent);
    assert!(matches!(
        hub.take(&TID, Duration::from_millis(20)).await,
        Taken::ReadBack(Reason::Late)
    ));
    // Its report comes after the feed moved on: older tids are dropped.
    hub.report(Event::FinishDone(Some((TID, Ok(captured_txn(TID))))));
    let next: Tid = [0, 0, 0, 0, 0, 0, 2, 0];
    assert!(matches!(
        hub.take(&next, wait).await,
        Taken::ReadBack(Reason::Bypass)
    ));
    assert!(hub.lock().done.is_empty());
    // Outcomes nobody takes (no replica streaming) are discarded.
    hub.report(Event::FinishSent);
    hub.report(Event::FinishDone(Some((next, Ok(captured_txn(next))))));
    hub.discard_upto(&next);
    assert!(hub.lock().done.is_empty());
}

#[test]
fn hooks_capture_only_the_replicated_storage() {
    let hub = CaptureHub::new();
    let mut info = SessionInfo {
        conn_id: 1,
        peer: "test".into(),
        encoding: Encoding::Pickle,
        registered: Some(("2".into(), false)),
        in_transaction: false,
        route: String::new(),
        access: crate::relay::Access::ReadWrite,
        identity: None,
    };
    let finish = Message::call(Value::Int(6), "tpc_finish", vec![Value::Int(77)]);
    let mut other = CaptureHooks::new(hub.clone(), MAX, "1".into());
    other.on_client_message(&info, &begin());
    other.on_client_message(&info, &finish);
    assert_eq!(hub.lock().finishing, 0, "a commit to storage 2 was tracked");
    info.registered = Some(("1".into(), false));
    let mut mine = CaptureHooks::new(hub.clone(), MAX, "1".into());
    mine.on_client_message(&info, &begin());
    mine.on_client_message(&info, &finish);
    assert_eq!(hub.lock().finishing, 1);
    // The session ends before the reply: nothing left in flight.
    mine.on_close(&info);
    assert_eq!(hub.lock().finishing, 0);
}
