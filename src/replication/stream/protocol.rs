//! The replication stream between two zrelay proxies (inside mutual TLS).
//!
//! Framing: a 4-byte big-endian payload length, then one [`StreamMsg`]
//! encoded as msgpack (rmp-serde, structs as maps so later versions may add
//! fields). Byte strings travel as msgpack `bin`.
//!
//! Conversation: the replica sends [`StreamMsg::Hello`]; the primary answers
//! [`StreamMsg::Welcome`] or [`StreamMsg::Refuse`] (and closes). Then the
//! primary sends `Txn`s in strictly increasing tid order (each naming the tid
//! sent before it on this stream, so a gap is detectable), a `Live` marker
//! once caught up, and `Heartbeat`s when idle; the replica sends `Ack`s.
//!
//! Clone (`zrelay clone`): the same listener, TLS and allow-list serve a
//! second kind of conversation, chosen by the client's first message: a
//! [`StreamMsg::CloneRequest`] instead of a Hello. The primary answers
//! `CloneBegin` (or `Refuse`), then for each file a `CloneFile`, its bytes in
//! `CloneData` chunks and a `CloneFileEnd` with its sha256 — the committed
//! prefix of the backend's `Data.fs` first, then the blob files of the
//! copied transactions — and finally `CloneEnd`, and closes. A new first
//! message rather than a flag in Hello: a clone has none of a stream's state
//! (position, digest, acks), and an older primary refuses it as a protocol
//! error instead of streaming to a client that cannot apply.
//! Optional messages are negotiated by `Hello.features` rather than by a
//! version bump: `Pack` (a pack of the primary, see
//! [`crate::replication::pack`]) is sent only to a replica that announced `"pack"`. An
//! older replica announces nothing and never sees one; an older primary
//! ignores the field and never sends one.

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::replication::txn::{serde_bin, tid_hex, Tid, Txn};

/// Version of this stream protocol, exchanged in Hello/Welcome.
pub const PROTOCOL_VERSION: u32 = 1;

/// A sensible default for the `max_len` of [`decode`]: a transaction with
/// its blobs travels in one frame.
pub const DEFAULT_MAX_FRAME_LEN: usize = 512 * 1024 * 1024;

/// The replica's opening message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub cluster: String,
    pub storage: String,
    /// The replica's node name.
    pub node: String,
    /// The last tid the replica has applied ([`crate::replication::txn::Z64`] if none).
    #[serde(with = "serde_bin::array")]
    pub last_tid: Tid,
    /// Digest ([`Txn::digest`]) of the transaction `last_tid`, if known.
    #[serde(with = "serde_bin::opt_array")]
    pub last_digest: Option<[u8; 32]>,
    /// Where the replica serves ZEO clients, as it advertises it (for the
    /// cluster view of other nodes). Absent from older replicas.
    #[serde(default)]
    pub client_addr: Option<String>,
    /// Where the replica accepts replicas and door sessions (if it does).
    #[serde(default)]
    pub replication_addr: Option<String>,
    /// Optional stream messages this replica understands (e.g.
    /// [`FEATURE_PACK`]). Added after version 1 without a version bump: an
    /// older primary ignores the field, an older replica sends none and
    /// is sent none of them.
    #[serde(default)]
    pub features: Vec<String>,
    /// The newest cluster epoch the replica knows (see `crate::role`); a
    /// feeder that knows only an older one is stale and refuses. None from
    /// older builds.
    #[serde(default)]
    pub epoch: Option<u64>,
    /// The replica's promotion eligibility (`promotion` in its config):
    /// None from older builds, which are never switched over to.
    #[serde(default)]
    pub promotion: Option<crate::role::Promotion>,
}

/// Feature: the replica executes [`StreamMsg::Pack`].
pub const FEATURE_PACK: &str = "pack";
/// Feature: the replica understands [`StreamMsg::Handover`].
pub const FEATURE_ROLES: &str = "roles";

/// Feature (in a Welcome): the primary counts [`StreamMsg::Received`] acks
/// (semi-sync `ack_level = "received"`; the feed drops it from the Welcome
/// otherwise), so the replica spools what it receives.
pub const FEATURE_RECEIVED_ACK: &str = "received_ack";

/// The features this build's primary lists in its Welcome.
pub fn primary_features() -> Vec<String> {
    vec![FEATURE_RECEIVED_ACK.to_string()]
}

/// The features this build's replica announces.
pub fn replica_features() -> Vec<String> {
    vec![FEATURE_PACK.to_string(), FEATURE_ROLES.to_string()]
}

/// A door's opening message: instead of a replication stream, relay one ZEO
/// client session to this node (see `crate::door`). Answered by
/// [`StreamMsg::DoorWelcome`] or [`StreamMsg::Refuse`]; after the welcome the
/// connection carries plain ZEO frames in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DoorHello {
    pub version: u32,
    pub cluster: String,
    pub storage: String,
    /// The door's node name.
    pub node: String,
    /// The client registered read-only (a routed reader) or read-write (a
    /// forwarded writer).
    pub read_only: bool,
    /// The door's cluster epoch; a node at a newer one refuses (None: an
    /// older build, accepted).
    #[serde(default)]
    pub epoch: Option<u64>,
}

/// One node as the cluster view reports it (see `crate::cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterEntry {
    pub node: String,
    /// "primary" or "replica", in the word of the node that reported it.
    pub role: String,
    /// Stream state as its feeder sees it ("live", "catching_up", ...).
    pub state: String,
    /// Newest tid the node holds (primary) or acknowledged (replica).
    #[serde(with = "serde_bin::opt_array")]
    pub last_tid: Option<Tid>,
    /// Replication lag in milliseconds, as its feeder measures it.
    pub lag_ms: Option<u64>,
    /// Advertised addresses: ZEO clients, replication (TLS).
    pub client_addr: Option<String>,
    pub replication_addr: Option<String>,
    /// Who reported this entry (a node name).
    pub reported_by: String,
}

/// The clone client's opening message (instead of a Hello).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRequest {
    pub version: u32,
    pub cluster: String,
    pub storage: String,
    /// The cloning node's name.
    pub node: String,
}

/// What a cloned file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloneFileKind {
    /// The committed prefix of the backend's `Data.fs`.
    DataFs,
    /// A file of the blob directory (`path` relative to it: a blob file or
    /// the `.layout` marker).
    Blob,
}

/// Why a primary refuses a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    VersionMismatch,
    WrongCluster,
    WrongStorage,
    /// The replica has a transaction the primary does not have (or a
    /// different one under the same tid): it must not be fed.
    Diverged,
    NotPrimary,
    Busy,
    /// The peer broke the conversation (e.g. a second Hello).
    Protocol,
    /// A clone was asked of a node that has no `[backend] data_fs`.
    CloneUnavailable,
    /// The peer's cluster epoch is older than this node's (or the feeder's
    /// is older than the replica's): a fenced-out node.
    StaleEpoch,
}

impl RefuseReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            RefuseReason::VersionMismatch => "version_mismatch",
            RefuseReason::WrongCluster => "wrong_cluster",
            RefuseReason::WrongStorage => "wrong_storage",
            RefuseReason::Diverged => "diverged",
            RefuseReason::NotPrimary => "not_primary",
            RefuseReason::Busy => "busy",
            RefuseReason::Protocol => "protocol",
            RefuseReason::CloneUnavailable => "clone_unavailable",
            RefuseReason::StaleEpoch => "stale_epoch",
        }
    }
}

impl std::fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamMsg {
    /// replica -> primary, first message.
    Hello(Hello),
    /// primary -> replica, accepts the Hello.
    Welcome {
        version: u32,
        node: String,
        #[serde(with = "serde_bin::array")]
        primary_last_tid: Tid,
        /// Optional replica -> primary messages this primary accepts (e.g.
        /// [`FEATURE_RECEIVED_ACK`]); absent from older primaries.
        #[serde(default)]
        features: Vec<String>,
        /// The feeder's cluster epoch; a replica at a newer one refuses
        /// it. None from older builds.
        #[serde(default)]
        epoch: Option<u64>,
    },
    /// primary -> replica, then the primary closes.
    Refuse {
        reason: RefuseReason,
        message: String,
        /// The refusing node's newest tid, when it knows it: a refused
        /// (e.g. diverged) replica still reports the primary's real
        /// position and lag.
        #[serde(default, with = "serde_bin::opt_array")]
        primary_last_tid: Option<Tid>,
        /// For a diverged replica: the last tid it shares with this primary
        /// when known (this primary's history began there, at its
        /// promotion); what it holds after it is what the primary lacks.
        #[serde(default, with = "serde_bin::opt_array")]
        rewind_to: Option<Tid>,
    },
    /// primary -> replica: one committed transaction. `prev` is the tid sent
    /// just before it on this stream (the Hello's `last_tid` for the first);
    /// tids strictly increase, and `prev` lets the replica detect a gap.
    Txn {
        #[serde(with = "serde_bin::array")]
        prev: Tid,
        txn: Txn,
    },
    /// primary -> replica: catch-up done; from now on transactions arrive as
    /// they commit.
    Live {
        #[serde(with = "serde_bin::array")]
        primary_last_tid: Tid,
    },
    /// primary -> replica when idle (ZEO servers never send heartbeats; an
    /// idle stream must still prove freshness).
    Heartbeat {
        #[serde(with = "serde_bin::array")]
        primary_last_tid: Tid,
        primary_time_unix_ms: u64,
    },
    /// replica -> primary: applied up to `tid`.
    Ack {
        #[serde(with = "serde_bin::array")]
        tid: Tid,
    },
    /// replica -> primary (only when the Welcome listed
    /// [`FEATURE_RECEIVED_ACK`]): everything up to `tid` is durably in the
    /// replica's spool (see `crate::replication::spool`), not necessarily applied.
    Received {
        #[serde(with = "serde_bin::array")]
        tid: Tid,
    },
    /// door -> primary, first message instead of a Hello.
    Door(DoorHello),
    /// primary -> door: accepted; ZEO frames follow.
    DoorWelcome { node: String },
    /// feeder -> replica, now and then: the nodes the feeder knows of (itself,
    /// its replicas, and what its own upstream told it). Roles and positions
    /// reach other nodes only this way, over the authenticated stream.
    Roster { nodes: Vec<RosterEntry> },
    /// clone client -> primary, first message.
    CloneRequest(CloneRequest),
    /// primary -> clone client: accepted; what will follow.
    CloneBegin {
        version: u32,
        node: String,
        /// The last tid of the copied `Data.fs` prefix.
        #[serde(with = "serde_bin::array")]
        last_tid: Tid,
        data_fs_bytes: u64,
        blob_files: u64,
        blob_bytes: u64,
    },
    /// primary -> clone client: a file starts; `size` bytes follow.
    CloneFile {
        kind: CloneFileKind,
        path: String,
        size: u64,
    },
    /// primary -> clone client: the next bytes of the current file.
    CloneData {
        #[serde(with = "serde_bin::bytes")]
        data: Bytes,
    },
    /// primary -> clone client: the current file is complete.
    CloneFileEnd {
        #[serde(with = "serde_bin::array")]
        sha256: [u8; 32],
    },
    /// primary -> clone client: every file was sent.
    CloneEnd { files: u64, bytes: u64 },
    /// primary -> replica (only to replicas announcing [`FEATURE_PACK`]): a
    /// client packed the primary's storage with `pack(pack_time_unix)`. Sent
    /// after the `Txn` `upto` (the primary's last tid when the pack was
    /// done), so the replica packs its own backend with the same time once
    /// everything up to it is applied. Creates no transaction.
    Pack {
        pack_time_unix: f64,
        #[serde(with = "serde_bin::array")]
        upto: Tid,
    },
    /// primary -> replica (only to replicas announcing [`FEATURE_ROLES`]),
    /// last message of a switchover: the primary has stopped committing and
    /// everything it committed was sent; `primary` is the new primary at
    /// `epoch`. The replica named `primary` promotes itself; the others
    /// follow it at `replication_addr`.
    Handover {
        epoch: u64,
        primary: String,
        replication_addr: Option<String>,
    },
}

impl StreamMsg {
    /// A short name, fit for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            StreamMsg::Hello(_) => "hello",
            StreamMsg::Welcome { .. } => "welcome",
            StreamMsg::Refuse { .. } => "refuse",
            StreamMsg::Txn { .. } => "txn",
            StreamMsg::Live { .. } => "live",
            StreamMsg::Heartbeat { .. } => "heartbeat",
            StreamMsg::Ack { .. } => "ack",
            StreamMsg::Received { .. } => "received",
            StreamMsg::Door(_) => "door",
            StreamMsg::DoorWelcome { .. } => "door_welcome",
            StreamMsg::Roster { .. } => "roster",
            StreamMsg::CloneRequest(_) => "clone_request",
            StreamMsg::CloneBegin { .. } => "clone_begin",
            StreamMsg::CloneFile { .. } => "clone_file",
            StreamMsg::CloneData { .. } => "clone_data",
            StreamMsg::CloneFileEnd { .. } => "clone_file_end",
            StreamMsg::CloneEnd { .. } => "clone_end",
            StreamMsg::Pack { .. } => "pack",
            StreamMsg::Handover { .. } => "handover",
        }
    }
}

/// Errors of the stream layer (framing, decoding, and conversation rules
/// enforced by the state machines).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: usize, max: usize },
    #[error("empty frame")]
    EmptyFrame,
    #[error("connection closed inside a frame ({0} bytes pending)")]
    Truncated(usize),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("peer speaks protocol version {theirs}, this node {ours}")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("unexpected {got} message while {state}")]
    Unexpected {
        got: &'static str,
        state: &'static str,
    },
    #[error("ack {} beyond the last tid sent {}", tid_hex(.ack), tid_hex(.last_sent))]
    AckBeyondSent { ack: Tid, last_sent: Tid },
    #[error("ack {} older than the previous ack {}", tid_hex(.ack), tid_hex(.acked))]
    AckRegressed { ack: Tid, acked: Tid },
}

/// Appends one frame (length + msgpack payload) to `out`. On error `out` is
/// left as it was.
pub fn encode(msg: &StreamMsg, out: &mut BytesMut) -> Result<(), ProtocolError> {
    let start = out.len();
    out.put_u32(0);
    let res = rmp_serde::encode::write_named(&mut (&mut *out).writer(), msg);
    let len = out.len() - start - 4;
    let res = res
        .map_err(|e| ProtocolError::Encode(e.to_string()))
        .and_then(|()| {
            u32::try_from(len).map_err(|_| ProtocolError::FrameTooLarge {
                len,
                max: u32::MAX as usize,
            })
        });
    match res {
        Ok(len32) => {
            out[start..start + 4].copy_from_slice(&len32.to_be_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Takes one frame off the front of `buf`. `Ok(None)`: incomplete, read more.
/// The declared length is checked against `max_len` before any allocation,
/// and the buffer grows with the bytes that arrived, never to the declared
/// length at once ([`crate::wire::frame::reserve_toward`]).
/// After an error the stream is unusable (close it).
pub fn decode(buf: &mut BytesMut, max_len: usize) -> Result<Option<StreamMsg>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_len {
        return Err(ProtocolError::FrameTooLarge { len, max: max_len });
    }
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    if buf.len() < 4 + len {
        crate::wire::frame::reserve_toward(buf, 4 + len);
        return Ok(None);
    }
    buf.advance(4);
    let frame = buf.split_to(len).freeze();
    parse_payload(&frame).map(Some)
}

/// For a reader at EOF: clean between frames, an error inside one.
pub fn check_eof(buf: &BytesMut) -> Result<(), ProtocolError> {
    if buf.is_empty() {
        Ok(())
    } else {
        Err(ProtocolError::Truncated(buf.len()))
    }
}

/// Deepest msgpack nesting a stream message may have. Our messages nest
/// about six levels (message, struct, records, record, field); fields
/// added later and skipped by older builds get the rest. rmp-serde's
/// default (1024) lets an unknown field's nested arrays recurse through
/// serde's `IgnoredAny` deep enough to need more than 256 KiB of stack in a
/// debug build.
pub const MAX_MESSAGE_DEPTH: usize = 32;

fn parse_payload(frame: &[u8]) -> Result<StreamMsg, ProtocolError> {
    // A Read-based deserializer: byte strings are read as they come (never
    // pre-allocated from a declared length) and the position is known, so
    // trailing garbage is caught.
    let mut de = rmp_serde::Deserializer::new(Cursor::new(frame));
    de.set_max_depth(MAX_MESSAGE_DEPTH);
    let msg =
        StreamMsg::deserialize(&mut de).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let used = de.position() as usize;
    if used != frame.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes after the message",
            frame.len() - used
        )));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::replication::txn::{Record, Z64};

    fn sample_txn() -> Txn {
        Txn {
            tid: [3, 0xf6, 0xdd, 0x11, 0xb5, 0x55, 0x55, 0x55],
            status: "u".into(),
            user: Bytes::from_static(b"u"),
            description: Bytes::from_static(b"d\x00\xff"),
            extension: Bytes::from_static(b"\x80\x03}q\x00."),
            records: vec![
                Record {
                    oid: [0, 0, 0, 0, 0, 0, 0, 7],
                    data: Some(Bytes::from(vec![0xab; 300])),
                    data_txn: None,
                    blob: None,
                },
                Record {
                    oid: [0, 0, 0, 0, 0, 0, 0, 8],
                    data: None,
                    data_txn: Some([1; 8]),
                    blob: Some(Bytes::from_static(b"blob")),
                },
            ],
        }
    }

    fn all_variants() -> Vec<StreamMsg> {
        let reasons = [
            RefuseReason::VersionMismatch,
            RefuseReason::WrongCluster,
            RefuseReason::WrongStorage,
            RefuseReason::Diverged,
            RefuseReason::NotPrimary,
            RefuseReason::Busy,
            RefuseReason::Protocol,
            RefuseReason::CloneUnavailable,
            RefuseReason::StaleEpoch,
        ];
        let mut v = vec![
            StreamMsg::Hello(Hello {
                version: PROTOCOL_VERSION,
                cluster: "c1".into(),
                storage: "1".into(),
                node: "replica-a".into(),
                last_tid: [1, 2, 3, 4, 5, 6, 7, 8],
                last_digest: Some([9; 32]),
                client_addr: None,
                replication_addr: None,
                features: replica_features(),
                epoch: Some(3),
                promotion: Some(crate::role::Promotion::Never(crate::role::NeverWord::Never)),
            }),
            StreamMsg::Hello(Hello {
                version: 7,
                cluster: String::new(),
                storage: "ß".into(),
                node: "n".into(),
                last_tid: Z64,
                last_digest: None,
                client_addr: None,
                replication_addr: None,
                features: vec![],
                epoch: None,
                promotion: Some(crate::role::Promotion::Priority(5)),
            }),
            StreamMsg::Welcome {
                version: PROTOCOL_VERSION,
                node: "p".into(),
                primary_last_tid: [0xff; 8],
                features: vec![],
                epoch: Some(2),
            },
            StreamMsg::Handover {
                epoch: 4,
                primary: "b".into(),
                replication_addr: Some("127.0.0.1:1".into()),
            },
            StreamMsg::Txn {
                prev: [2; 8],
                txn: sample_txn(),
            },
            StreamMsg::Txn {
                prev: Z64,
                txn: Txn {
                    tid: [0, 0, 0, 0, 0, 0, 0, 1],
                    status: " ".into(),
                    user: Bytes::new(),
                    description: Bytes::new(),
                    extension: Bytes::new(),
                    records: vec![],
                },
            },
            StreamMsg::Live {
                primary_last_tid: [4; 8],
            },
            StreamMsg::Heartbeat {
                primary_last_tid: [5; 8],
                primary_time_unix_ms: 1_700_000_000_123,
            },
            StreamMsg::Ack { tid: [6; 8] },
            StreamMsg::CloneRequest(CloneRequest {
                version: PROTOCOL_VERSION,
                cluster: "c1".into(),
                storage: "1".into(),
                node: "new-replica".into(),
            }),
            StreamMsg::CloneBegin {
                version: PROTOCOL_VERSION,
                node: "p".into(),
                last_tid: [7; 8],
                data_fs_bytes: 1 << 40,
                blob_files: 3,
                blob_bytes: 12345,
            },
            StreamMsg::CloneFile {
                kind: CloneFileKind::DataFs,
                path: "Data.fs".into(),
                size: 99,
            },
            StreamMsg::CloneFile {
                kind: CloneFileKind::Blob,
                path: "0x00/0x01/0x03f6.blob".into(),
                size: 0,
            },
            StreamMsg::CloneData {
                data: Bytes::from(vec![0x5a; 1000]),
            },
            StreamMsg::CloneFileEnd { sha256: [8; 32] },
            StreamMsg::CloneEnd {
                files: 4,
                bytes: 1 << 33,
            },
        ];
        for r in reasons {
            v.push(StreamMsg::Refuse {
                reason: r,
                message: format!("because {r}"),
                primary_last_tid: None,
                rewind_to: Some([7; 8]),
            });
        }
        v
    }

    #[test]
    fn round_trip_every_variant() {
        let mut buf = BytesMut::new();
        let msgs = all_variants();
        for m in &msgs {
            encode(m, &mut buf).unwrap();
        }
        for m in &msgs {
            assert_eq!(decode(&mut buf, 1 << 20).unwrap().as_ref(), Some(m));
        }
        assert_eq!(decode(&mut buf, 1 << 20).unwrap(), None);
        assert!(buf.is_empty());
        check_eof(&buf).unwrap();
    }

    #[test]
    fn split_reads_one_byte_at_a_time() {
        let msgs = all_variants();
        let mut wire = BytesMut::new();
        for m in &msgs {
            encode(m, &mut wire).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.put_u8(*b);
            while let Some(m) = decode(&mut buf, 1 << 20).unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
        check_eof(&buf).unwrap();
    }

    #[test]
    fn eof_inside_a_frame_is_an_error() {
        let mut wire = BytesMut::new();
        encode(&StreamMsg::Ack { tid: [1; 8] }, &mut wire).unwrap();
        wire.truncate(wire.len() - 1);
        assert_eq!(decode(&mut wire, 1 << 20).unwrap(), None);
        assert!(matches!(check_eof(&wire), Err(ProtocolError::Truncated(_))));
    }

    #[test]
    fn oversized_length_rejected_before_allocating() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0][..]);
        let cap = buf.capacity();
        assert_eq!(
            decode(&mut buf, 1024),
            Err(ProtocolError::FrameTooLarge {
                len: 0xffff_fff0,
                max: 1024
            })
        );
        assert_eq!(buf.capacity(), cap, "no allocation for a refused frame");
        // A real message just over the limit is refused too.
        let mut buf = BytesMut::new();
        encode(
            &StreamMsg::Txn {
                prev: Z64,
                txn: sample_txn(),
            },
            &mut buf,
        )
        .unwrap();
        let len = buf.len() - 4;
        assert!(matches!(
            decode(&mut buf.clone(), len - 1),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
        assert!(decode(&mut buf, len).unwrap().is_some());
    }

    #[test]
    fn empty_frame_and_trailing_bytes_rejected() {
        let mut buf = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(decode(&mut buf, 1024), Err(ProtocolError::EmptyFrame));
        let mut one = BytesMut::new();
        encode(&StreamMsg::Ack { tid: [1; 8] }, &mut one).unwrap();
        let mut payload = one.split_off(4).to_vec();
        payload.push(0xc0); // a trailing nil
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32);
        buf.put_slice(&payload);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(ProtocolError::Malformed(_))
        ));
    }

    #[test]
    fn wrong_field_sizes_rejected() {
        // An Ack whose tid is 7 bytes.
        #[derive(Serialize)]
        enum Fake {
            Ack {
                #[serde(with = "serde_bytes_7")]
                tid: [u8; 7],
            },
        }
        mod serde_bytes_7 {
            pub fn serialize<S: serde::Serializer>(v: &[u8; 7], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(v)
            }
        }
        let payload = rmp_serde::to_vec_named(&Fake::Ack { tid: [1; 7] }).unwrap();
        let mut buf = BytesMut::new();
        buf.put_u32(payload.len() as u32);
        buf.put_slice(&payload);
        assert!(matches!(
            decode(&mut buf, 1024),
            Err(ProtocolError::Malformed(_))
        ));
    }

    use crate::testing::Rng;

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng::new(0x5eed);
        let valid: Vec<Vec<u8>> = all_variants()
            .iter()
            .map(|m| {
                let mut b = BytesMut::new();
                encode(m, &mut b).unwrap();
                b.to_vec()
            })
            .collect();
        for round in 0..3000 {
            let mut bytes: Vec<u8> = if round % 2 == 0 {
                // Pure noise behind a plausible length.
                let n = (rng.next() % 200) as usize;
                let mut v = (n as u32).to_be_bytes().to_vec();
                v.extend((0..n).map(|_| rng.next() as u8));
                v
            } else {
                // A valid frame with a few bytes of its payload mutated.
                let mut v = valid[(rng.next() % valid.len() as u64) as usize].clone();
                for _ in 0..1 + rng.next() % 4 {
                    let i = 4 + (rng.next() % (v.len() as u64 - 4)) as usize;
                    v[i] = rng.next() as u8;
                }
                v
            };
            if round % 7 == 0 {
                bytes.extend((0..rng.next() % 16).map(|_| rng.next() as u8));
            }
            let mut buf = BytesMut::from(&bytes[..]);
            // Whatever comes out, it must be a value or an error, not a panic.
            for _ in 0..8 {
                match decode(&mut buf, 4096) {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    impl Rng {
        /// Up to `max` random bytes.
        fn bytes_upto(&mut self, max: usize) -> Bytes {
            let n = self.below(max + 1);
            self.bytes(n).into()
        }
        fn tid(&mut self) -> Tid {
            self.next().to_be_bytes()
        }
        fn opt_tid(&mut self) -> Option<Tid> {
            (self.below(2) == 0).then(|| self.tid())
        }
        fn text(&mut self, max: u64) -> String {
            const CHARS: &[char] = &['a', 'Z', '0', '-', '.', ' ', 'é', '€', '\u{10348}', '\0'];
            (0..self.below(max + 1))
                .map(|_| CHARS[self.below(CHARS.len() as u64) as usize])
                .collect()
        }
        fn opt_text(&mut self) -> Option<String> {
            (self.below(2) == 0).then(|| self.text(30))
        }
        fn opt_u64(&mut self) -> Option<u64> {
            (self.below(2) == 0).then(|| self.next())
        }
        fn texts(&mut self) -> Vec<String> {
            (0..self.below(4)).map(|_| self.text(12)).collect()
        }
    }

    /// A message of a random kind with random field values.
    fn gen_msg(rng: &mut Rng) -> StreamMsg {
        let reasons = [
            RefuseReason::VersionMismatch,
            RefuseReason::Diverged,
            RefuseReason::StaleEpoch,
            RefuseReason::CloneUnavailable,
        ];
        match rng.below(19) {
            0 => StreamMsg::Hello(Hello {
                version: rng.next() as u32,
                cluster: rng.text(20),
                storage: rng.text(5),
                node: rng.text(20),
                last_tid: rng.tid(),
                last_digest: (rng.below(2) == 0).then(|| [rng.next() as u8; 32]),
                client_addr: rng.opt_text(),
                replication_addr: rng.opt_text(),
                features: rng.texts(),
                epoch: rng.opt_u64(),
                promotion: None,
            }),
            1 => StreamMsg::Welcome {
                version: rng.next() as u32,
                node: rng.text(20),
                primary_last_tid: rng.tid(),
                features: rng.texts(),
                epoch: rng.opt_u64(),
            },
            2 => StreamMsg::Refuse {
                reason: reasons[rng.below(reasons.len() as u64) as usize],
                message: rng.text(200),
                primary_last_tid: rng.opt_tid(),
                rewind_to: rng.opt_tid(),
            },
            3..=6 => StreamMsg::Txn {
                prev: rng.tid(),
                txn: Txn {
                    tid: rng.tid(),
                    status: rng.text(1),
                    user: rng.bytes_upto(20),
                    description: rng.bytes_upto(300),
                    extension: rng.bytes_upto(100),
                    records: (0..rng.below(40))
                        .map(|_| Record {
                            oid: rng.tid(),
                            data: (rng.below(4) != 0).then(|| rng.bytes_upto(2000)),
                            data_txn: rng.opt_tid(),
                            blob: (rng.below(4) == 0).then(|| rng.bytes_upto(70_000)),
                        })
                        .collect(),
                },
            },
            7 => StreamMsg::Live {
                primary_last_tid: rng.tid(),
            },
            8 => StreamMsg::Heartbeat {
                primary_last_tid: rng.tid(),
                primary_time_unix_ms: rng.next(),
            },
            9 => StreamMsg::Ack { tid: rng.tid() },
            10 => StreamMsg::Received { tid: rng.tid() },
            11 => StreamMsg::Door(DoorHello {
                version: rng.next() as u32,
                cluster: rng.text(10),
                storage: rng.text(3),
                node: rng.text(10),
                read_only: rng.below(2) == 0,
                epoch: rng.opt_u64(),
            }),
            12 => StreamMsg::Roster {
                nodes: (0..rng.below(5))
                    .map(|_| RosterEntry {
                        node: rng.text(10),
                        role: rng.text(8),
                        state: rng.text(8),
                        last_tid: rng.opt_tid(),
                        lag_ms: rng.opt_u64(),
                        client_addr: rng.opt_text(),
                        replication_addr: rng.opt_text(),
                        reported_by: rng.text(10),
                    })
                    .collect(),
            },
            13 => StreamMsg::CloneBegin {
                version: rng.next() as u32,
                node: rng.text(10),
                last_tid: rng.tid(),
                data_fs_bytes: rng.next(),
                blob_files: rng.next(),
                blob_bytes: rng.next(),
            },
            14 => StreamMsg::CloneFile {
                kind: if rng.below(2) == 0 {
                    CloneFileKind::DataFs
                } else {
                    CloneFileKind::Blob
                },
                path: rng.text(60),
                size: rng.next(),
            },
            15 => StreamMsg::CloneData {
                data: rng.bytes_upto(100_000),
            },
            16 => StreamMsg::CloneEnd {
                files: rng.next(),
                bytes: rng.next(),
            },
            17 => StreamMsg::Pack {
                pack_time_unix: f64::from_bits(rng.next() >> 2),
                upto: rng.tid(),
            },
            _ => StreamMsg::Handover {
                epoch: rng.next(),
                primary: rng.text(10),
                replication_addr: rng.opt_text(),
            },
        }
    }

    /// An unknown field (from a later version) is skipped when it nests
    /// moderately, refused past [`MAX_MESSAGE_DEPTH`].
    #[test]
    fn unknown_fields_skipped_up_to_the_depth_limit() {
        let nested = |levels: usize| {
            let mut p = b"\x81\xabDoorWelcome\x82\xa4node\xa1n\xa1x".to_vec();
            p.extend(std::iter::repeat(0x91u8).take(levels));
            p.push(0xc0);
            let mut buf = BytesMut::new();
            buf.put_u32(p.len() as u32);
            buf.put_slice(&p);
            decode(&mut buf, 1 << 20)
        };
        assert_eq!(
            nested(10).unwrap(),
            Some(StreamMsg::DoorWelcome { node: "n".into() })
        );
        assert!(matches!(
            nested(MAX_MESSAGE_DEPTH),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(nested(100_000), Err(ProtocolError::Malformed(_))));
    }

    /// For any message: encode → decode gives it back, and re-encoding
    /// gives the same bytes.
    #[test]
    fn generated_messages_round_trip_byte_identical() {
        let mut rng = Rng::new(0x0005_7ea3);
        for _ in 0..1500 {
            let msg = gen_msg(&mut rng);
            let mut first = BytesMut::new();
            encode(&msg, &mut first).unwrap();
            let wire = first.clone().freeze();
            let back = decode(&mut first, DEFAULT_MAX_FRAME_LEN)
                .unwrap()
                .expect("a whole frame");
            assert!(first.is_empty());
            if !matches!(msg, StreamMsg::Pack { pack_time_unix, .. } if pack_time_unix.is_nan()) {
                assert_eq!(back, msg);
            }
            let mut again = BytesMut::new();
            encode(&back, &mut again).unwrap();
            assert_eq!(again.freeze(), wire, "{}", msg.kind());
        }
    }
}
