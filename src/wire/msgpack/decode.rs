//! Iterative msgpack decoder over `rmp::Marker`.

use bytes::Bytes;
use rmp::Marker;

use crate::wire::{Value, WireError, MAX_DEPTH};

/// Containers are preallocated at most this far, whatever length they
/// claim: every nested level could claim the whole frame.
const PREALLOC_MAX: usize = 16;

/// Decodes one msgpack value that must fill `payload` exactly. Arrays
/// become `Tuple`, bin becomes a zero-copy `Bytes`, str must be UTF-8.
pub fn decode(payload: &Bytes) -> Result<Value, WireError> {
    let mut rd = Reader::new(payload);
    let value = decode_one(&mut rd, 0)?;
    if rd.pos != payload.len() {
        return Err(WireError::TrailingBytes(payload.len() - rd.pos));
    }
    Ok(value)
}

/// Decodes the value at the reader's position (its end may be followed by
/// more bytes).
/// `base`: levels already open around it (they count against `MAX_DEPTH`).
pub(super) fn decode_one(rd: &mut Reader<'_>, base: usize) -> Result<Value, WireError> {
    // An envelope nests two or three levels: no regrowth on the way.
    let mut open: Vec<Open> = Vec::new();
    'next: loop {
        let mut value = match rd.token()? {
            Token::Value(v) => v,
            Token::Array(0) => Value::Tuple(Vec::new()),
            Token::Map(0) => Value::Dict(Vec::new()),
            Token::Array(n) => {
                let items = Vec::with_capacity(n.min(PREALLOC_MAX));
                push_open(&mut open, base, Open::Array { items, left: n })?;
                continue;
            }
            Token::Map(n) => {
                let items = Vec::with_capacity(n.min(PREALLOC_MAX));
                push_open(
                    &mut open,
                    base,
                    Open::Map {
                        items,
                        key: None,
                        left: n,
                    },
                )?;
                continue;
            }
        };
        // Hand the value up, closing every container it completes.
        while let Some(top) = open.last_mut() {
            if !top.accept(value) {
                continue 'next;
            }
            let Some(done) = open.pop() else {
                return Err(WireError::malformed("container stack"));
            };
            value = done.into_value();
        }
        return Ok(value);
    }
}

/// Opens a container; the leaves inside count as one more level.
fn push_open(open: &mut Vec<Open>, base: usize, container: Open) -> Result<(), WireError> {
    if base + open.len() + 2 > MAX_DEPTH {
        return Err(WireError::TooDeep);
    }
    open.push(container);
    Ok(())
}

enum Open {
    Array {
        items: Vec<Value>,
        left: usize,
    },
    Map {
        items: Vec<(Value, Value)>,
        key: Option<Value>,
        left: usize,
    },
}

impl Open {
    /// Adds one decoded value; true once the container is complete.
    fn accept(&mut self, value: Value) -> bool {
        match self {
            Open::Array { items, left } => {
                items.push(value);
                *left = left.saturating_sub(1);
                *left == 0
            }
            Open::Map { items, key, left } => match key.take() {
                None => {
                    *key = Some(value);
                    false
                }
                Some(k) => {
                    items.push((k, value));
                    *left = left.saturating_sub(1);
                    *left == 0
                }
            },
        }
    }

    fn into_value(self) -> Value {
        match self {
            Open::Array { items, .. } => Value::Tuple(items),
            Open::Map { items, .. } => Value::Dict(items),
        }
    }
}

pub(super) enum Token {
    Value(Value),
    Array(usize),
    Map(usize),
}

pub(super) struct Reader<'a> {
    src: &'a Bytes,
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(src: &'a Bytes) -> Reader<'a> {
        Reader { src, pos: 0 }
    }

    pub(super) fn src(&self) -> &'a [u8] {
        self.src
    }

    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let src: &'a Bytes = self.src;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= src.len())
            .ok_or(WireError::Truncated)?;
        let out = &src[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.take(N)?.try_into().map_err(|_| WireError::Truncated)
    }

    pub(super) fn u8(&mut self) -> Result<u8, WireError> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    pub(super) fn len16(&mut self) -> Result<usize, WireError> {
        Ok(usize::from(u16::from_be_bytes(self.array()?)))
    }

    pub(super) fn len32(&mut self) -> Result<usize, WireError> {
        let n = u32::from_be_bytes(self.array()?);
        usize::try_from(n).map_err(|_| WireError::Truncated)
    }

    fn bin(&mut self, n: usize) -> Result<Value, WireError> {
        let start = self.pos;
        self.take(n)?;
        Ok(Value::Bytes(self.src.slice(start..self.pos)))
    }

    fn str(&mut self, n: usize) -> Result<Value, WireError> {
        let s = std::str::from_utf8(self.take(n)?)
            .map_err(|_| WireError::malformed("invalid UTF-8 in msgpack str"))?;
        Ok(Value::Str(s.to_owned()))
    }

    fn token(&mut self) -> Result<Token, WireError> {
        let int = |n: i64| Ok(Token::Value(Value::Int(n)));
        match Marker::from_u8(self.u8()?) {
            Marker::FixPos(n) => int(n.into()),
            Marker::FixNeg(n) => int(n.into()),
            Marker::Null => Ok(Token::Value(Value::None)),
            Marker::True => Ok(Token::Value(Value::Bool(true))),
            Marker::False => Ok(Token::Value(Value::Bool(false))),
            Marker::U8 => int(self.u8()?.into()),
            Marker::U16 => int(u16::from_be_bytes(self.array()?).into()),
            Marker::U32 => int(u32::from_be_bytes(self.array()?).into()),
            Marker::U64 => {
                let n = u64::from_be_bytes(self.array()?);
                Ok(Token::Value(Value::int(n.into())))
            }
            Marker::I8 => int(i8::from_be_bytes(self.array()?).into()),
            Marker::I16 => int(i16::from_be_bytes(self.array()?).into()),
            Marker::I32 => int(i32::from_be_bytes(self.array()?).into()),
            Marker::I64 => int(i64::from_be_bytes(self.array()?)),
            Marker::F32 => {
                let f = f32::from_be_bytes(self.array()?);
                Ok(Token::Value(Value::Float(f.into())))
            }
            Marker::F64 => Ok(Token::Value(Value::Float(f64::from_be_bytes(
                self.array()?,
            )))),
            Marker::FixStr(n) => self.str(n.into()).map(Token::Value),
            Marker::Str8 => {
                let n = self.u8()?.into();
                self.str(n).map(Token::Value)
            }
            Marker::Str16 => {
                let n = self.len16()?;
                self.str(n).map(Token::Value)
            }
            Marker::Str32 => {
                let n = self.len32()?;
                self.str(n).map(Token::Value)
            }
            Marker::Bin8 => {
                let n = self.u8()?.into();
                self.bin(n).map(Token::Value)
            }
            Marker::Bin16 => {
                let n = self.len16()?;
                self.bin(n).map(Token::Value)
            }
            Marker::Bin32 => {
                let n = self.len32()?;
                self.bin(n).map(Token::Value)
            }
            Marker::FixArray(n) => Ok(Token::Array(n.into())),
            Marker::Array16 => Ok(Token::Array(self.len16()?)),
            Marker::Array32 => Ok(Token::Array(self.len32()?)),
            Marker::FixMap(n) => Ok(Token::Map(n.into())),
            Marker::Map16 => Ok(Token::Map(self.len16()?)),
            Marker::Map32 => Ok(Token::Map(self.len32()?)),
            Marker::FixExt1
            | Marker::FixExt2
            | Marker::FixExt4
            | Marker::FixExt8
            | Marker::FixExt16
            | Marker::Ext8
            | Marker::Ext16
            | Marker::Ext32 => Err(WireError::malformed(
                "msgpack ext types are not used by ZEO",
            )),
            Marker::Reserved => Err(WireError::malformed("reserved msgpack byte 0xc1")),
        }
    }
}
