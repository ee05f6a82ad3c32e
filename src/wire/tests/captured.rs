//! Real ZEO frames: decode, re-encode byte for byte, typed views.

use bytes::Bytes;

use super::hex::unhex;
use crate::wire::calls::{undo_id_to_tid, ClientCall, ServerMsg, Z64};
use crate::wire::error::{pos_error, read_only_error};
use crate::wire::testdata::{self as td, Dir, Vector};
use crate::wire::tid::tid_to_unix;
use crate::wire::{Encoding, Flag, Message, Value};

const BOTH: [Encoding; 2] = [Encoding::Pickle, Encoding::Msgpack];

fn payload(v: &Vector, enc: Encoding) -> Bytes {
    Bytes::from(unhex(match enc {
        Encoding::Pickle => v.pickle,
        Encoding::Msgpack => v.msgpack,
    }))
}

fn msg(v: &Vector, enc: Encoding) -> Message {
    Message::decode(enc, &payload(v, enc)).unwrap_or_else(|e| panic!("{} {enc:?}: {e}", v.name))
}

fn client(m: &Message) -> ClientCall<'_> {
    ClientCall::parse(m).unwrap_or_else(|e| panic!("{}: {e}", m.method))
}

fn server(m: &Message) -> ServerMsg<'_> {
    ServerMsg::parse(m).unwrap_or_else(|e| panic!("{}: {e}", m.method))
}

fn p64(n: u64) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

#[test]
fn every_capture_reencodes_byte_identically() {
    for v in td::ALL {
        for enc in BOTH {
            let raw = payload(v, enc);
            let m = msg(v, enc);
            let again = m.encode(enc).expect("encode");
            assert_eq!(again, raw, "{} {enc:?}", v.name);
            // The generic value path agrees with the envelope path.
            let value = enc.decode_value(&raw).expect("value");
            let mut out = Vec::new();
            enc.encode_value(&value, &mut out).expect("encode value");
            assert_eq!(out, raw, "{} {enc:?} via Value", v.name);
            let parsed_ok = match v.dir {
                Dir::ClientToServer => ClientCall::parse(&m).is_ok(),
                Dir::ServerToClient => ServerMsg::parse(&m).is_ok(),
            };
            assert!(parsed_ok, "{} {enc:?} typed view", v.name);
        }
    }
}

#[test]
fn bytes_are_zero_copy_slices_of_the_frame() {
    for enc in BOTH {
        let raw = payload(&td::STOREA, enc);
        let m = Message::decode(enc, &raw).expect("decode");
        let ClientCall::Storea {
            data: Some(data), ..
        } = client(&m)
        else {
            panic!("not storea");
        };
        let range = raw.as_ptr_range();
        assert!(range.contains(&data.as_ptr()), "{enc:?} data was copied");
    }
}

#[test]
fn register() {
    for enc in BOTH {
        for (v, read_only) in [
            (&td::REGISTER_REQ_INT0, false),
            (&td::REGISTER_REQ_FALSE, false),
            (&td::REGISTER_REQ_TRUE, true),
        ] {
            let m = msg(v, enc);
            assert_eq!((m.msgid.clone(), m.flag), (Value::Int(1), Flag::Sync));
            assert_eq!(
                client(&m),
                ClientCall::Register {
                    storage: "1",
                    read_only
                }
            );
            assert!(!client(&m).is_write());
        }
        let m = msg(&td::REGISTER_REPLY_Z64, enc);
        assert_eq!(
            server(&m),
            ServerMsg::Reply {
                msgid: &Value::Int(1),
                result: &Value::from(&Z64[..])
            }
        );
        // Built from scratch, the raw client's register is reproduced.
        let built = Message::call(
            Value::Int(1),
            "register",
            vec![Value::from("1"), Value::Bool(false)],
        );
        assert_eq!(
            built.encode(enc).expect("encode"),
            payload(&td::REGISTER_REQ_FALSE, enc)
        );
    }
}

#[test]
fn get_info() {
    for enc in BOTH {
        assert_eq!(
            client(&msg(&td::GET_INFO_REQ, enc)),
            ClientCall::Other { method: "get_info" }
        );
        let m = msg(&td::GET_INFO_REPLY, enc);
        let ServerMsg::Reply { result, .. } = server(&m) else {
            panic!("not a reply");
        };
        assert_eq!(result.get("supportsUndo"), Some(&Value::Bool(true)));
        assert_eq!(result.get("length"), Some(&Value::Int(0)));
        let interfaces = result
            .get("interfaces")
            .and_then(Value::as_seq)
            .expect("interfaces");
        assert_eq!(interfaces.len(), 7);
        assert_eq!(
            interfaces[0],
            Value::Tuple(vec![
                Value::from("ZODB.interfaces"),
                Value::from("IStorageRestoreable")
            ])
        );
    }
}

#[test]
fn load_before_with_tuple_msgid() {
    for enc in BOTH {
        let m = msg(&td::LOAD_BEFORE_TUPLE_MSGID_REQ, enc);
        let id = m.msgid.as_seq().expect("tuple msgid");
        assert_eq!(id[0].as_bytes(), Some(&Z64[..]));
        let ClientCall::LoadBefore { oid, before } = client(&m) else {
            panic!("not loadBefore");
        };
        assert_eq!((oid, Some(before)), (&Z64[..], id[1].as_bytes()));
        let reply = msg(&td::LOAD_BEFORE_TUPLE_MSGID_REPLY, enc);
        assert_eq!(reply.msgid, m.msgid, "the reply echoes the tuple");
        let ServerMsg::Reply { result, .. } = server(&reply) else {
            panic!("not a reply");
        };
        let r = result.as_seq().expect("(data, start, end)");
        assert!(r[0]
            .as_bytes()
            .expect("data")
            .starts_with(b"\x80\x03cpersistent.mapping"));
        assert_eq!(r[1].as_bytes().map(<[u8]>::len), Some(8));
        assert!(r[2].is_none());

        let err = msg(&td::POS_KEY_ERROR_TUPLE_MSGID, enc);
        assert_eq!(err.flag, Flag::Error);
        assert!(matches!(
            server(&err),
            ServerMsg::ErrorReply {
                class_name: "ZODB.POSException.POSKeyError",
                ..
            }
        ));
    }
}

#[test]
fn commit_sequence() {
    for enc in BOTH {
        let begin = msg(&td::TPC_BEGIN_UNICODE_EXT, enc);
        assert_eq!(
            (begin.msgid.clone(), begin.flag),
            (Value::Int(0), Flag::Async)
        );
        let call = client(&begin);
        assert!(call.is_write());
        let ClientCall::TpcBegin {
            txn_id,
            user,
            description,
            ext,
            tid,
            status,
        } = call
        else {
            panic!("not tpc_begin");
        };
        // id(txn): above 32 bits, so LONG1 in pickle and uint64 in msgpack.
        assert!(txn_id.as_int().expect("int") > i128::from(u32::MAX));
        assert_eq!(user.as_bytes(), Some("jürgen ☃".as_bytes()));
        assert_eq!(description.as_bytes(), Some("désc – unicode".as_bytes()));
        let nested = ext.get("nested").expect("nested");
        assert_eq!(nested.get("big"), Some(&Value::Int(1 << 40)));
        let a = nested.get("a").and_then(Value::as_seq).expect("a");
        assert_eq!(a[0], Value::Int(1));
        assert_eq!(
            a[1].get("b"),
            Some(&Value::Tuple(vec![Value::Int(2), Value::Int(3)]))
        );
        assert_eq!((tid, status), (None, &Value::from(" ")));

        let new_oids = msg(&td::NEW_OIDS_REQ, enc);
        assert_eq!(client(&new_oids), ClientCall::NewOids { n: None });
        assert!(client(&new_oids).is_write());
        let oids = msg(&td::NEW_OIDS_REPLY, enc);
        let ServerMsg::Reply { result, .. } = server(&oids) else {
            panic!("not a reply");
        };
        let oids = result.as_seq().expect("oids");
        assert_eq!(oids.len(), 100);
        assert_eq!(oids[0].as_bytes(), Some(&p64(1)[..]));

        let store = msg(&td::STOREA, enc);
        let ClientCall::Storea {
            oid,
            serial,
            data,
            txn_id: store_txn,
        } = client(&store)
        else {
            panic!("not storea");
        };
        assert_eq!((oid, serial.len(), store_txn), (&Z64[..], 8, txn_id));
        assert!(data.expect("data").starts_with(b"\x80\x03"));

        let vote = msg(&td::VOTE_REQ, enc);
        assert_eq!(vote.flag, Flag::Sync);
        assert_eq!(client(&vote), ClientCall::Vote { txn_id });
        let voted = msg(&td::VOTE_REPLY_EMPTY, enc);
        let ServerMsg::Reply { result, .. } = server(&voted) else {
            panic!("not a reply");
        };
        assert_eq!(result.as_seq(), Some(&[][..]));

        let finish = msg(&td::TPC_FINISH_REQ, enc);
        assert_eq!(client(&finish), ClientCall::TpcFinish { txn_id });
        assert!(client(&finish).is_write());
        let info = msg(&td::INFO, enc);
        let ServerMsg::Info { info } = server(&info) else {
            panic!("not info");
        };
        assert_eq!(info.get("length"), Some(&Value::Int(2)));
        let finished = msg(&td::TPC_FINISH_REPLY, enc);
        let ServerMsg::Reply { result, .. } = server(&finished) else {
            panic!("not a reply");
        };
        let committed = result.as_bytes().expect("tid");

        let inval = msg(&td::INVALIDATE_TRANSACTION, enc);
        assert_eq!(
            server(&inval),
            ServerMsg::InvalidateTransaction {
                tid: committed,
                oids: vec![&Z64[..], &p64(1)[..]],
            }
        );

        // undoLog reports that transaction: its id is base64(tid) and its
        // time is TimeStamp(tid).timeTime(), bit for bit.
        let log = msg(&td::UNDO_LOG_REPLY, enc);
        let ServerMsg::Reply { result, .. } = server(&log) else {
            panic!("not a reply");
        };
        let entry = &result.as_seq().expect("entries")[0];
        let id = entry.get("id").and_then(Value::as_bytes).expect("id");
        assert_eq!(
            undo_id_to_tid(id).map(|t| t.to_vec()),
            Some(committed.to_vec())
        );
        let time = entry.get("time").and_then(Value::as_f64).expect("time");
        assert_eq!(
            tid_to_unix(committed).map(f64::to_bits),
            Some(time.to_bits())
        );
        assert_eq!(
            entry.get("user_name").and_then(Value::as_bytes),
            Some("jürgen ☃".as_bytes())
        );

        let undo = msg(&td::UNDOA, enc);
        let ClientCall::Undoa { undone_tid, .. } = client(&undo) else {
            panic!("not undoa");
        };
        assert_eq!(undone_tid, id);
        let undone = msg(&td::VOTE_REPLY_OIDS, enc);
        let ServerMsg::Reply { result, .. } = server(&undone) else {
            panic!("not a reply");
        };
        assert_eq!(result.as_seq().map(<[Value]>::len), Some(2));
    }
}

#[test]
fn raw_client_transaction_and_iterator() {
    for enc in BOTH {
        let begin = msg(&td::TPC_BEGIN_SMALL_ID, enc);
        let built = Message::async_call(
            "tpc_begin",
            vec![
                Value::Int(7),
                Value::from(&b""[..]),
                Value::from(&b""[..]),
                Value::Dict(vec![]),
                Value::None,
                Value::from(" "),
            ],
        );
        assert_eq!(begin, built);
        assert_eq!(
            built.encode(enc).expect("encode"),
            payload(&td::TPC_BEGIN_SMALL_ID, enc)
        );

        let abort = msg(&td::TPC_ABORT_REQ, enc);
        assert_eq!(
            client(&abort),
            ClientCall::TpcAbort {
                txn_id: &Value::Int(7)
            }
        );
        assert!(!client(&abort).is_write());
        let none = msg(&td::REPLY_NONE, enc);
        assert_eq!(none, Message::reply(Value::Int(5), Value::None));

        let lb = msg(&td::LOAD_BEFORE_REQ, enc);
        assert_eq!(
            client(&lb),
            ClientCall::LoadBefore {
                oid: &Z64,
                before: &[0xff; 8]
            }
        );

        let start = msg(&td::ITERATOR_START_REQ, enc);
        assert_eq!(
            client(&start),
            ClientCall::IteratorStart {
                start: None,
                stop: None
            }
        );
        assert_eq!(
            client(&msg(&td::ITERATOR_NEXT_REQ, enc)),
            ClientCall::IteratorNext { iid: 0 }
        );
        let next = msg(&td::ITERATOR_NEXT_REPLY, enc);
        let ServerMsg::Reply { result, .. } = server(&next) else {
            panic!("not a reply");
        };
        let t = result.as_seq().expect("txn");
        assert_eq!(t.len(), 5);
        assert_eq!(t[1], Value::from(" "));
        assert_eq!(t[3].as_bytes(), Some(&b"initial database creation"[..]));
    }
}

#[test]
fn error_replies() {
    for enc in BOTH {
        let ro = msg(&td::READ_ONLY_ERROR, enc);
        assert_eq!(
            server(&ro),
            ServerMsg::ErrorReply {
                msgid: &Value::Int(2),
                class_name: "ZODB.POSException.ReadOnlyError",
                args: &Value::Tuple(vec![]),
            }
        );
        assert_eq!(read_only_error(Value::Int(2)), ro);
        assert_eq!(
            read_only_error(Value::Int(2)).encode(enc).expect("encode"),
            payload(&td::READ_ONLY_ERROR, enc)
        );

        let key = msg(&td::POS_KEY_ERROR, enc);
        let built = pos_error(
            Value::Int(3),
            "POSKeyError",
            Value::Tuple(vec![Value::from(&p64(999)[..])]),
        );
        assert_eq!(
            built.encode(enc).expect("encode"),
            payload(&td::POS_KEY_ERROR, enc)
        );
        assert_eq!(key, built);

        let conflict = msg(&td::CONFLICT_ERROR, enc);
        let ServerMsg::ErrorReply {
            msgid,
            class_name,
            args,
        } = server(&conflict)
        else {
            panic!("not an error");
        };
        assert_eq!(
            (msgid, class_name),
            (&Value::Int(4), "ZODB.POSException.ConflictError")
        );
        assert_eq!(
            args.get("message"),
            Some(&Value::from("database conflict error"))
        );
        assert_eq!(args.get("oid"), Some(&Value::from(&Z64[..])));
        assert_eq!(
            args.get("class_name"),
            Some(&Value::from("persistent.mapping.PersistentMapping"))
        );
        let serials = args
            .get("serials")
            .and_then(Value::as_seq)
            .expect("serials");
        assert_eq!(serials[1].as_bytes(), Some(&p64(1)[..]));
    }
}

#[test]
fn heartbeat() {
    // The q4 facts table, with its length prefix removed.
    assert_eq!(
        td::HEARTBEAT.pickle,
        "8003284affffffff4b0058060000002e7265706c794e742e"
    );
    assert_eq!(td::HEARTBEAT.msgpack, "94ff00a62e7265706c79c0");
    for enc in BOTH {
        let m = msg(&td::HEARTBEAT, enc);
        assert!(m.is_heartbeat() && m.is_reply());
        assert_eq!(m, Message::heartbeat());
        assert_eq!(
            server(&m),
            ServerMsg::Reply {
                msgid: &Value::Int(-1),
                result: &Value::None
            }
        );
        assert_eq!(client(&m), ClientCall::Other { method: ".reply" });
    }
}

#[test]
fn blobs() {
    for enc in BOTH {
        assert_eq!(
            client(&msg(&td::STORE_BLOB_START, enc)),
            ClientCall::StoreBlobStart
        );
        let chunk = msg(&td::STORE_BLOB_CHUNK, enc);
        let expected = b"hello blob ".repeat(3);
        assert_eq!(
            client(&chunk),
            ClientCall::StoreBlobChunk { chunk: &expected }
        );
        let end = msg(&td::STORE_BLOB_END, enc);
        let call = client(&end);
        assert!(call.is_write());
        let ClientCall::StoreBlobEnd {
            oid, serial, data, ..
        } = call
        else {
            panic!("not storeBlobEnd");
        };
        assert_eq!((oid, serial), (&p64(1)[..], &Z64[..]));
        assert!(data.starts_with(b"\x80\x03cZODB.blob\nBlob"));

        let send = msg(&td::SEND_BLOB_REQ, enc);
        let ClientCall::SendBlob { oid, serial } = client(&send) else {
            panic!("not sendBlob");
        };
        assert_eq!(oid, &p64(1)[..]);
        assert_eq!(
            server(&msg(&td::RECEIVE_BLOB_START, enc)),
            ServerMsg::ReceiveBlobStart { oid, serial }
        );
        assert_eq!(
            server(&msg(&td::RECEIVE_BLOB_CHUNK, enc)),
            ServerMsg::ReceiveBlobChunk {
                oid,
                serial,
                chunk: &expected
            }
        );
        assert_eq!(
            server(&msg(&td::RECEIVE_BLOB_STOP, enc)),
            ServerMsg::ReceiveBlobStop { oid, serial }
        );
    }
}

#[test]
fn handshake() {
    assert_eq!(Encoding::from_handshake(b"Z5"), Some(Encoding::Pickle));
    assert_eq!(Encoding::from_handshake(b"M5"), Some(Encoding::Msgpack));
    assert_eq!(Encoding::from_handshake(b"Z4"), None);
    assert_eq!(Encoding::from_handshake(b"ruok"), None);
    for enc in BOTH {
        assert_eq!(Encoding::from_handshake(enc.handshake()), Some(enc));
    }
}

#[test]
fn captured_stream_split_into_single_bytes() {
    use crate::wire::frame::{parse_frame, write_frame};
    use bytes::BytesMut;
    for enc in BOTH {
        let mut wire = BytesMut::new();
        write_frame(&mut wire, enc.handshake());
        for v in td::ALL {
            write_frame(&mut wire, &payload(v, enc));
        }
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for byte in wire.iter() {
            buf.extend_from_slice(&[*byte]);
            while let Some(frame) = parse_frame(&mut buf, 1 << 20).expect("frame") {
                frames.push(frame);
            }
        }
        assert_eq!(frames.len(), td::ALL.len() + 1);
        assert_eq!(Encoding::from_handshake(&frames[0]), Some(enc));
        for (frame, v) in frames[1..].iter().zip(td::ALL) {
            assert_eq!(Message::decode(enc, frame).expect("decode"), msg(v, enc));
        }
    }
}
