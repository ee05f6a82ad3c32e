//! Envelope scan: the header of a pickled `(msgid, flag, method, args)`
//! without building `args`.
//!
//! [`scan_envelope`] accepts a subset of what [`super::decode`] accepts —
//! the shapes ZEO's own pickler writes (protocol 3, `fast` mode: no memo):
//! leaves, tuples, lists and dicts, with at most [`ARGS_STACK`] items and
//! [`ARGS_MARKS`] open MARKs inside `args`. For those it checks everything
//! the full decoder checks (stack discipline, UTF-8, integer sizes, nesting
//! depth) but keeps only a depth and a kind per stack item of `args`. It
//! answers `None` for anything else — memo opcodes, objects, a malformed or
//! merely unusual pickle — and the caller then runs the full decoder, whose
//! answer (a value or an error) is the same as ever. So every payload the
//! scan accepts decodes, and to the header the scan returned.
//!
//! Hand-written: no crate validates a pickle without building it.

use bytes::Bytes;

use super::op::*;
use super::reader::decode_long;
use crate::wire::message::{method_name_utf8, Header};
use crate::wire::{Value, MAX_DEPTH};

/// Items on the stack inside `args` (a longer list goes the full way).
const ARGS_STACK: usize = 64;
/// Open MARKs inside `args`.
const ARGS_MARKS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    List,
    Dict,
    Other,
}

/// A leaf opcode's value, not built.
enum Leaf<'a> {
    Plain(Value),
    Bytes(usize, usize),
    Str(&'a [u8]),
    Empty(Kind),
}

/// A cursor over the payload: `None` when it runs out (the full decoder
/// then says how). Leaner than the decoder's reader, whose errors carry
/// text; the scan only needs yes or no.
struct Cur<'a> {
    src: &'a [u8],
    pos: usize,
}

impl<'a> Cur<'a> {
    #[inline]
    fn byte(&mut self) -> Option<u8> {
        let b = *self.src.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    #[inline]
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let out = self.src.get(self.pos..end)?;
        self.pos = end;
        Some(out)
    }

    #[inline]
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn len_u32(&mut self) -> Option<usize> {
        usize::try_from(u32::from_le_bytes(self.array()?)).ok()
    }
}

/// Reads the argument of a leaf opcode; `None` for any other opcode or a
/// malformed argument. Strs are checked for UTF-8 by the caller (a method
/// name ZEO uses needs no check: it is compared with known ASCII names).
#[inline]
fn leaf<'a>(op: u8, rd: &mut Cur<'a>) -> Option<Leaf<'a>> {
    let v = match op {
        BININT1 => Value::Int(rd.byte()?.into()),
        SHORT_BINBYTES | SHORT_BINSTRING => {
            let n = usize::from(rd.byte()?);
            return bytes(rd, n);
        }
        SHORT_BINUNICODE => {
            let n = usize::from(rd.byte()?);
            return Some(Leaf::Str(rd.take(n)?));
        }
        BINUNICODE => {
            let n = rd.len_u32()?;
            return Some(Leaf::Str(rd.take(n)?));
        }
        NONE => Value::None,
        NEWTRUE => Value::Bool(true),
        NEWFALSE => Value::Bool(false),
        BININT => Value::Int(i32::from_le_bytes(rd.array()?).into()),
        BININT2 => Value::Int(u16::from_le_bytes(rd.array()?).into()),
        LONG1 => {
            let n = usize::from(rd.byte()?);
            decode_long(rd.take(n)?).ok()?
        }
        BINFLOAT => Value::Float(f64::from_be_bytes(rd.array()?)),
        BINBYTES => {
            let n = rd.len_u32()?;
            return bytes(rd, n);
        }
        EMPTY_TUPLE => return Some(Leaf::Empty(Kind::Other)),
        EMPTY_LIST => return Some(Leaf::Empty(Kind::List)),
        EMPTY_DICT => return Some(Leaf::Empty(Kind::Dict)),
        _ => return None,
    };
    Some(Leaf::Plain(v))
}

/// Steps over a leaf opcode inside args, checking it as [`leaf`] does
/// but building nothing; its kind, or `None` as [`leaf`].
#[inline]
fn skip_leaf(op: u8, rd: &mut Cur<'_>) -> Option<Kind> {
    let n = match op {
        NONE | NEWTRUE | NEWFALSE => 0,
        BININT1 => 1,
        BININT2 => 2,
        BININT => 4,
        BINFLOAT => 8,
        SHORT_BINBYTES | SHORT_BINSTRING => usize::from(rd.byte()?),
        BINBYTES => rd.len_u32()?,
        SHORT_BINUNICODE | BINUNICODE => {
            let n = if op == SHORT_BINUNICODE {
                usize::from(rd.byte()?)
            } else {
                rd.len_u32()?
            };
            std::str::from_utf8(rd.take(n)?).ok()?;
            return Some(Kind::Other);
        }
        LONG1 => {
            let n = usize::from(rd.byte()?);
            decode_long(rd.take(n)?).ok()?;
            return Some(Kind::Other);
        }
        EMPTY_TUPLE => return Some(Kind::Other),
        EMPTY_LIST => return Some(Kind::List),
        EMPTY_DICT => return Some(Kind::Dict),
        _ => return None,
    };
    rd.take(n)?;
    Some(Kind::Other)
}

#[inline]
fn bytes<'a>(rd: &mut Cur<'a>, n: usize) -> Option<Leaf<'a>> {
    let start = rd.pos;
    rd.take(n)?;
    Some(Leaf::Bytes(start, rd.pos))
}

/// The header of a pickled envelope whose args are valid, or `None` (see
/// the module comment).
pub(crate) fn scan_envelope(payload: &Bytes) -> Option<Header> {
    let mut rd = Cur {
        src: payload,
        pos: 0,
    };
    if rd.byte()? != PROTO || rd.byte()? > HIGHEST_PROTOCOL || rd.byte()? != MARK {
        return None;
    }
    let header = scan_header(payload, &mut rd)?;
    scan_args(&mut rd)?;
    if rd.byte()? != STOP || rd.pos != payload.len() {
        return None;
    }
    Some(header)
}

/// A header item on the scan's stack: strs stay borrowed until known to be
/// the method name (interned, not allocated).
enum Item<'a> {
    Value(Value),
    Str(&'a [u8]),
}

impl Item<'_> {
    fn into_value(self) -> Option<Value> {
        match self {
            Item::Value(v) => Some(v),
            Item::Str(s) => Some(Value::Str(std::str::from_utf8(s).ok()?.to_owned())),
        }
    }
}

/// Header items at most on the stack at once (three, and a msgid tuple's).
const HEADER_STACK: usize = 5;

/// The three header items: leaves, or a tuple of leaves (a ClientStorage
/// `loadBefore` msgid is `(oid, tid)`). A fixed stack: no allocation but
/// the items' own.
fn scan_header<'a>(payload: &Bytes, rd: &mut Cur<'a>) -> Option<Header> {
    let start = rd.pos;
    if let Some(h) = quick_header(payload, rd) {
        return Some(h);
    }
    rd.pos = start;
    let mut items: [Option<Item<'a>>; HEADER_STACK] = Default::default();
    let mut n = 0usize;
    // One nested MARK at most (a msgid tuple of more than three items).
    let mut mark: Option<usize> = None;
    while n < 3 || mark.is_some() {
        let op = rd.byte()?;
        let at = match op {
            MARK if mark.is_none() => {
                mark = Some(n);
                continue;
            }
            TUPLE => mark.take()?,
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let k = usize::from(op - TUPLE1) + 1;
                let floor = mark.unwrap_or(0);
                n.checked_sub(k).filter(|&at| at >= floor)?
            }
            _ => {
                if n == HEADER_STACK {
                    return None;
                }
                items[n] = Some(match leaf(op, rd)? {
                    Leaf::Plain(v) => Item::Value(v),
                    Leaf::Bytes(s, e) => Item::Value(Value::Bytes(payload.slice(s..e))),
                    Leaf::Str(s) => Item::Str(s),
                    Leaf::Empty(Kind::Other) => Item::Value(Value::Tuple(Vec::new())),
                    Leaf::Empty(_) => return None,
                });
                n += 1;
                continue;
            }
        };
        // Tuples of leaves only: the header stays two levels deep.
        let mut tuple = Vec::with_capacity(n - at);
        for slot in &mut items[at..n] {
            match slot.take()? {
                Item::Value(Value::Tuple(_)) => return None,
                item => tuple.push(item.into_value()?),
            }
        }
        items[at] = Some(Item::Value(Value::Tuple(tuple)));
        n = at + 1;
    }
    let [msgid, flag, method, ..] = items;
    let Item::Str(method) = method? else {
        return None;
    };
    Some(Header {
        msgid: msgid?.into_value()?,
        flag: flag?.into_value()?,
        method: method_name_utf8(method)?,
    })
}

/// The header as ZEO's pickler writes it, read straight: an int msgid (or
/// a ClientStorage `(oid, tid)`), a bool or small-int flag, a str method.
/// `None`: not this shape (the general loop above decides).
#[inline]
fn quick_header(payload: &Bytes, rd: &mut Cur<'_>) -> Option<Header> {
    let msgid = match rd.byte()? {
        BININT1 => Value::Int(rd.byte()?.into()),
        BININT2 => Value::Int(u16::from_le_bytes(rd.array()?).into()),
        BININT => Value::Int(i32::from_le_bytes(rd.array()?).into()),
        SHORT_BINBYTES => {
            let oid = short_bytes(payload, rd)?;
            if rd.byte()? != SHORT_BINBYTES {
                return None;
            }
            let tid = short_bytes(payload, rd)?;
            if rd.byte()? != TUPLE2 {
                return None;
            }
            Value::Tuple(vec![oid, tid])
        }
        _ => return None,
    };
    let flag = match rd.byte()? {
        NEWFALSE => Value::Bool(false),
        NEWTRUE => Value::Bool(true),
        BININT1 => Value::Int(rd.byte()?.into()),
        _ => return None,
    };
    let n = match rd.byte()? {
        SHORT_BINUNICODE => usize::from(rd.byte()?),
        BINUNICODE => rd.len_u32()?,
        _ => return None,
    };
    let method = method_name_utf8(rd.take(n)?)?;
    Some(Header {
        msgid,
        flag,
        method,
    })
}

/// The rest of a SHORT_BINBYTES, as a slice of the frame.
#[inline]
fn short_bytes(payload: &Bytes, rd: &mut Cur<'_>) -> Option<Value> {
    let n = usize::from(rd.byte()?);
    let start = rd.pos;
    rd.take(n)?;
    Some(Value::Bytes(payload.slice(start..rd.pos)))
}

/// Checks the args' opcodes up to and including the envelope's closing
/// TUPLE, keeping a depth and kind per stack item.
fn scan_args(rd: &mut Cur<'_>) -> Option<()> {
    let mut depth = [0u16; ARGS_STACK];
    let mut kind = [Kind::Other; ARGS_STACK];
    let mut n = 0usize;
    let mut marks = [0usize; ARGS_MARKS];
    let mut nm = 0usize;
    // The envelope (one level) holds the args: they may nest one less.
    let max = u16::try_from(MAX_DEPTH - 1).ok()?;

    // Replaces the items from `at` up by one container of `k`.
    let collapse = |depth: &mut [u16; ARGS_STACK],
                    kind: &mut [Kind; ARGS_STACK],
                    n: &mut usize,
                    at: usize,
                    k: Kind|
     -> Option<()> {
        let d = 1 + depth[at..*n].iter().copied().max().unwrap_or(0);
        if d > max || at >= ARGS_STACK {
            return None;
        }
        depth[at] = d;
        kind[at] = k;
        *n = at + 1;
        Some(())
    };
    loop {
        let op = rd.byte()?;
        let floor = if nm > 0 { marks[nm - 1] } else { 0 };
        match op {
            MARK => {
                if nm == ARGS_MARKS {
                    return None;
                }
                marks[nm] = n;
                nm += 1;
            }
            // The envelope's own: exactly the args above its MARK.
            TUPLE if nm == 0 => return (n == 1).then_some(()),
            TUPLE | LIST | DICT => {
                nm = nm.checked_sub(1)?;
                let at = marks[nm];
                let k = match op {
                    TUPLE => Kind::Other,
                    LIST => Kind::List,
                    _ if (n - at) % 2 != 0 => return None,
                    _ => Kind::Dict,
                };
                collapse(&mut depth, &mut kind, &mut n, at, k)?;
            }
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let k = usize::from(op - TUPLE1) + 1;
                let at = n.checked_sub(k).filter(|&at| at >= floor)?;
                collapse(&mut depth, &mut kind, &mut n, at, Kind::Other)?;
            }
            APPEND | SETITEM => {
                let (items, want) = if op == APPEND {
                    (1, Kind::List)
                } else {
                    (2, Kind::Dict)
                };
                let top = n.checked_sub(items + 1).filter(|&t| t >= floor)?;
                if kind[top] != want {
                    return None;
                }
                let d = 1 + depth[top + 1..n].iter().copied().max().unwrap_or(0);
                depth[top] = depth[top].max(d);
                if depth[top] > max {
                    return None;
                }
                n = top + 1;
            }
            APPENDS | SETITEMS => {
                nm = nm.checked_sub(1)?;
                let at = marks[nm];
                let floor = if nm > 0 { marks[nm - 1] } else { 0 };
                let top = at.checked_sub(1).filter(|&t| t >= floor)?;
                let want = if op == APPENDS {
                    Kind::List
                } else if (n - at) % 2 == 0 {
                    Kind::Dict
                } else {
                    return None;
                };
                if kind[top] != want {
                    return None;
                }
                let d = 1 + depth[at..n].iter().copied().max().unwrap_or(0);
                depth[top] = depth[top].max(d);
                if depth[top] > max {
                    return None;
                }
                n = at;
            }
            _ => {
                let k = skip_leaf(op, rd)?;
                if n == ARGS_STACK {
                    return None;
                }
                depth[n] = 1;
                kind[n] = k;
                n += 1;
            }
        }
    }
}
