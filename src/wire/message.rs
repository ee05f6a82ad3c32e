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
pub const HEARTBEAT_MSGID: i64 = -1;

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    /// Opaque: usually an int, but ClientStorage uses `(oid, tid)` for
    /// loadBefore, and -1 marks a heartbeat.
    pub msgid: Value,
    pub flag: Flag,
    pub method: String,
    pub args: Value,
}

impl Message {
    /// Decodes a payload that must be a 4-tuple `(msgid, flag, name, args)`.
    pub fn decode(enc: Encoding, payload: &Bytes) -> Result<Message, WireError> {
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
        Ok(Message {
            msgid,
            flag,
            method,
            args,
        })
    }

    /// The payload (without length prefix), byte-identical to ZEO's.
    pub fn encode(&self, enc: Encoding) -> Result<Bytes, WireError> {
        let flag = self.flag.to_value();
        let method = Value::Str(self.method.clone());
        let mut out = Vec::with_capacity(64);
        enc.encode_tuple(&[&self.msgid, &flag, &method, &self.args], &mut out)?;
        Ok(Bytes::from(out))
    }

    /// A sync call; `args` become a Tuple.
    pub fn call(msgid: Value, method: &str, args: Vec<Value>) -> Message {
        Message {
            msgid,
            flag: Flag::Sync,
            method: method.to_owned(),
            args: Value::Tuple(args),
        }
    }

    /// An async call: msgid 0, no reply.
    pub fn async_call(method: &str, args: Vec<Value>) -> Message {
        Message {
            msgid: Value::Int(0),
            flag: Flag::Async,
            method: method.to_owned(),
            args: Value::Tuple(args),
        }
    }

    /// `(msgid, 0, '.reply', result)`.
    pub fn reply(msgid: Value, result: Value) -> Message {
        Message {
            msgid,
            flag: Flag::Reply,
            method: REPLY_METHOD.to_owned(),
            args: result,
        }
    }

    /// `(msgid, 2, '.reply', (exc_class, exc_args))`.
    pub fn error_reply(msgid: Value, exc_class: &str, exc_args: Value) -> Message {
        Message {
            msgid,
            flag: Flag::Error,
            method: REPLY_METHOD.to_owned(),
            args: Value::Tuple(vec![Value::str(exc_class), exc_args]),
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
