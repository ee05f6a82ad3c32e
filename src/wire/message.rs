//! The ZEO 5 message envelope: `(msgid, flag, method, args)`.

use bytes::Bytes;

use super::{msgpack, pickle, Value, WireError};

/// The encoding chosen by the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    /// `Z5`: pickle protocol 3.
    Pickle,
    /// `M5`: msgpack.
    Msgpack,
}

impl Encoding {
    /// The protocol string of a handshake frame; `None` for anything but
    /// ZEO 5 (including the `ruok` status probe).
    pub fn from_handshake(proto: &[u8]) -> Option<Encoding> {
        match proto {
            b"Z5" => Some(Encoding::Pickle),
            b"M5" => Some(Encoding::Msgpack),
            _ => None,
        }
    }

    pub fn handshake(&self) -> &'static [u8] {
        match self {
            Encoding::Pickle => b"Z5",
            Encoding::Msgpack => b"M5",
        }
    }

    pub fn decode_value(&self, payload: &Bytes) -> Result<Value, WireError> {
        match self {
            Encoding::Pickle => pickle::decode(payload),
            Encoding::Msgpack => msgpack::decode(payload),
        }
    }

    pub fn encode_value(&self, value: &Value, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Encoding::Pickle => pickle::encode(value, out),
            Encoding::Msgpack => msgpack::encode(value, out),
        }
    }

    fn encode_tuple(&self, items: &[&Value], out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Encoding::Pickle => pickle::encode_tuple(items, out),
            Encoding::Msgpack => msgpack::encode_tuple(items, out),
        }
    }
}

/// The second element of the envelope. Calls carry a bool, replies an int.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// `False`: a call that expects a reply.
    Sync,
    /// `True`: a call without reply (msgid 0), in either direction.
    Async,
    /// Int `0`: a normal reply (also the heartbeat's flag).
    Reply,
    /// Int `2`: an error reply, args `(class_name, exc dict or args)`.
    Error,
    /// Any other int.
    Other(i64),
}

impl Flag {
    pub fn to_value(self) -> Value {
        match self {
            Flag::Sync => Value::Bool(false),
            Flag::Async => Value::Bool(true),
            Flag::Reply => Value::Int(0),
            Flag::Error => Value::Int(2),
            Flag::Other(n) => Value::Int(n),
        }
    }

    pub fn from_value(v: &Value) -> Option<Flag> {
        match *v {
            Value::Bool(false) => Some(Flag::Sync),
            Value::Bool(true) => Some(Flag::Async),
            Value::Int(0) => Some(Flag::Reply),
            Value::Int(2) => Some(Flag::Error),
            Value::Int(n) => Some(Flag::Other(n)),
            _ => None,
        }
    }
}

pub const REPLY_METHOD: &str = ".reply";

/// A method name: borrowed (no allocation) when it is one of the names ZEO
/// sends on every transaction or load (see [`method_name`]), else owned.
pub type Method = std::borrow::Cow<'static, str>;

/// The [`Method`] for `name`: a static string for the frequent names.
pub fn method_name(name: &str) -> Method {
    match frequent(name.as_bytes()) {
        Some(m) => Method::Borrowed(m),
        None => Method::Owned(name.to_owned()),
    }
}

/// The [`Method`] for raw bytes off the wire; `None` if not UTF-8. A known
/// name needs no UTF-8 check (it is ASCII).
pub(crate) fn method_name_utf8(raw: &[u8]) -> Option<Method> {
    match frequent(raw) {
        Some(m) => Some(Method::Borrowed(m)),
        None => Some(Method::Owned(std::str::from_utf8(raw).ok()?.to_owned())),
    }
}

fn frequent(name: &[u8]) -> Option<&'static str> {
    // Most frequent first: a relayed round trip checks one or two.
    const FREQUENT: &[&str] = &[
        REPLY_METHOD,
        "loadBefore",
        "ping",
        "storea",
        "invalidateTransaction",
        "tpc_begin",
        "vote",
        "tpc_finish",
        "tpc_abort",
        "lastTransaction",
        "new_oids",
        "getInvalidations",
        "register",
        "get_info",
        "checkCurrentSerialInTransaction",
        "storeBlob",
        "storeBlobShared",
        "sendBlob",
        "receiveBlobStart",
        "receiveBlobChunk",
        "receiveBlobStop",
        "info",
        "history",
        "record_iternext",
        "iterator_start",
        "iterator_next",
        "iterator_record_start",
        "iterator_record_next",
        "iterator_gc",
        "server_status",
        "undoa",
        "restorea",
    ];
    FREQUENT.iter().copied().find(|m| m.as_bytes() == name)
}

/// What an envelope scan read: the header items, built. `Message::decode`
/// checks the flag (the method is a str already).
pub(crate) struct Header {
    pub msgid: Value,
    pub flag: Value,
    pub method: Method,
}
pub const HEARTBEAT_MSGID: i64 = -1;

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Opaque: usually an int, but ClientStorage uses `(oid, tid)` for
    /// loadBefore, and -1 marks a heartbeat.
    pub msgid: Value,
    pub flag: Flag,
    pub method: Method,
    /// Built on first access for a decoded message (see [`Args`]).
    pub args: Args,
}

impl Message {
    /// Decodes a payload that must be a 4-tuple `(msgid, flag, name, args)`.
    ///
    /// The whole payload is checked here, as before: a malformed message is
    /// an error now, never later. Only the tree of `args` is built lazily,
    /// on first access: most relayed messages are routed by their header
    /// alone, and building and dropping the arguments (a `Vec` per tuple, a
    /// `String` per str) was a third of a relayed round trip's instructions.
    /// The fast path takes the envelope shapes ZEO itself writes (see
    /// `pickle::scan` and `msgpack::scan`); anything else is decoded at once
    /// by [`Message::decode_eager`], with the same result or error.
    pub fn decode(enc: Encoding, payload: &Bytes) -> Result<Message, WireError> {
        let header = match enc {
            Encoding::Pickle => pickle::scan_envelope(payload),
            Encoding::Msgpack => msgpack::scan_envelope(payload),
        };
        if let Some(h) = header {
            if let Some(flag) = Flag::from_value(&h.flag) {
                return Ok(Message {
                    msgid: h.msgid,
                    flag,
                    method: h.method,
                    args: Args::lazy(enc, payload.clone()),
                });
            }
        }
        Message::decode_eager(enc, payload)
    }

    /// Decodes the whole payload, `args` included, at once.
    pub fn decode_eager(enc: Encoding, payload: &Bytes) -> Result<Message, WireError> {
        let items = match enc.decode_value(payload)? {
            Value::Tuple(items) | Value::List(items) => items,
            other => {
                return Err(WireError::NotAnEnvelope(format!(
                    "expected a 4-tuple, got {}",
                    kind(&other)
                )))
            }
        };
        let Ok([msgid, flag, method, args]) = <[Value; 4]>::try_from(items) else {
            return Err(WireError::NotAnEnvelope("expected 4 items".into()));
        };
        let flag = Flag::from_value(&flag)
            .ok_or_else(|| WireError::NotAnEnvelope(format!("flag is {}", kind(&flag))))?;
        let Value::Str(method) = method else {
            return Err(WireError::NotAnEnvelope("method name is not a str".into()));
        };
        let method = method_name(&method);
        Ok(Message {
            msgid,
            flag,
            method,
            args: Args::from(args),
        })
    }

    /// The payload (without length prefix), byte-identical to ZEO's.
    pub fn encode(&self, enc: Encoding) -> Result<Bytes, WireError> {
        let flag = self.flag.to_value();
        let method = Value::Str(self.method.to_string());
        let mut out = Vec::with_capacity(64);
        enc.encode_tuple(&[&self.msgid, &flag, &method, self.args.value()], &mut out)?;
        Ok(Bytes::from(out))
    }

    /// A sync call; `args` become a Tuple.
    pub fn call(msgid: Value, method: &str, args: Vec<Value>) -> Message {
        Message {
            msgid,
            flag: Flag::Sync,
            method: method_name(method),
            args: Value::Tuple(args).into(),
        }
    }

    /// An async call: msgid 0, no reply.
    pub fn async_call(method: &str, args: Vec<Value>) -> Message {
        Message {
            msgid: Value::Int(0),
            flag: Flag::Async,
            method: method_name(method),
            args: Value::Tuple(args).into(),
        }
    }

    /// `(msgid, 0, '.reply', result)`.
    pub fn reply(msgid: Value, result: Value) -> Message {
        Message {
            msgid,
            flag: Flag::Reply,
            method: Method::Borrowed(REPLY_METHOD),
            args: result.into(),
        }
    }

    /// `(msgid, 2, '.reply', (exc_class, exc_args))`.
    pub fn error_reply(msgid: Value, exc_class: &str, exc_args: Value) -> Message {
        Message {
            msgid,
            flag: Flag::Error,
            method: Method::Borrowed(REPLY_METHOD),
            args: Value::Tuple(vec![Value::str(exc_class), exc_args]).into(),
        }
    }

    /// The client's keep-alive `(-1, 0, '.reply', None)`.
    pub fn heartbeat() -> Message {
        Message::reply(Value::Int(HEARTBEAT_MSGID), Value::None)
    }

    pub fn is_heartbeat(&self) -> bool {
        self.msgid == Value::Int(HEARTBEAT_MSGID)
    }

    pub fn is_reply(&self) -> bool {
        self.method == REPLY_METHOD
    }
}

/// The fourth element of the envelope: a [`Value`], either given or built
/// on first access from the payload it came in (already validated by
/// [`Message::decode`]). Reads as `&Value` (`Deref`); compares and prints
/// as its value.
pub struct Args {
    value: std::sync::OnceLock<Value>,
    /// Where a lazily decoded value comes from.
    source: Option<(Encoding, Bytes)>,
}

impl Args {
    fn lazy(enc: Encoding, payload: Bytes) -> Args {
        Args {
            value: std::sync::OnceLock::new(),
            source: Some((enc, payload)),
        }
    }

    /// The value, built now if it was not yet.
    pub fn value(&self) -> &Value {
        self.value.get_or_init(|| match &self.source {
            Some((enc, payload)) => decode_args(*enc, payload),
            None => Value::None,
        })
    }

    /// Takes the value out (built now if it was not yet).
    pub fn into_value(mut self) -> Value {
        match self.value.take() {
            Some(v) => v,
            None => match &self.source {
                Some((enc, payload)) => decode_args(*enc, payload),
                None => Value::None,
            },
        }
    }

    /// Whether the value has been built (for tests of the lazy path).
    pub fn is_built(&self) -> bool {
        self.value.get().is_some()
    }
}

/// The args of a payload [`Message::decode`] accepted through its fast
/// path. Its scan accepts only what the full decoder accepts (unit tests,
/// property tests and the fuzz targets check both agree), so this cannot
/// fail; if it ever did, that is a bug: loud in debug builds, `None` in
/// release builds.
fn decode_args(enc: Encoding, payload: &Bytes) -> Value {
    match Message::decode_eager(enc, payload) {
        Ok(m) => m.args.into_value(),
        Err(e) => {
            debug_assert!(false, "lazy args failed to decode: {e}");
            tracing::error!(error = %e, "lazily decoded args are malformed (bug)");
            Value::None
        }
    }
}

impl From<Value> for Args {
    fn from(v: Value) -> Args {
        Args {
            value: std::sync::OnceLock::from(v),
            source: None,
        }
    }
}

impl std::ops::Deref for Args {
    type Target = Value;
    fn deref(&self) -> &Value {
        self.value()
    }
}

impl Clone for Args {
    fn clone(&self) -> Args {
        match self.value.get() {
            Some(v) => Args::from(v.clone()),
            None => Args {
                value: std::sync::OnceLock::new(),
                source: self.source.clone(),
            },
        }
    }
}

impl PartialEq for Args {
    fn eq(&self, other: &Args) -> bool {
        self.value() == other.value()
    }
}

impl PartialEq<Value> for Args {
    fn eq(&self, other: &Value) -> bool {
        self.value() == other
    }
}

impl std::fmt::Debug for Args {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value().fmt(f)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::None => "None",
        Value::Bool(_) => "bool",
        Value::Int(_) | Value::BigInt(_) => "int",
        Value::Float(_) => "float",
        Value::Bytes(_) => "bytes",
        Value::Str(_) => "str",
        Value::Tuple(_) => "tuple",
        Value::List(_) => "list",
        Value::Dict(_) => "dict",
        Value::Global { .. } => "global",
        Value::Reduce(_) | Value::NewObj(_) | Value::Build(_) => "object",
    }
}
