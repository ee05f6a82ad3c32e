//! Envelope scan: the header of a msgpack `[msgid, flag, method, args]`
//! without building `args`.
//!
//! [`scan_envelope`] decodes the three header items and walks `args`
//! marker by marker, checking what the full decoder checks (lengths within
//! the payload, UTF-8 strs, no ext types, no reserved byte, nothing after
//! the envelope) without building anything. It answers `None` for anything
//! it does not take — args nested deeper than [`SKIP_LEVELS`], a malformed
//! or unusual payload — and the caller then runs the full decoder, whose
//! answer (a value or an error) is the same as ever.
//!
//! Hand-written: rmp reads values, it does not validate them in place.

use bytes::Bytes;
use rmp::Marker;

use super::decode::{decode_one, Reader};
use crate::wire::message::{method_name_utf8, Header};

/// Containers open at once inside `args` (deeper goes the full way).
const SKIP_LEVELS: usize = 16;

/// The header of an envelope whose args are valid, or `None`.
pub(crate) fn scan_envelope(payload: &Bytes) -> Option<Header> {
    let mut rd = Reader::new(payload);
    let n = match Marker::from_u8(rd.u8().ok()?) {
        Marker::FixArray(n) => usize::from(n),
        Marker::Array16 => rd.len16().ok()?,
        Marker::Array32 => rd.len32().ok()?,
        _ => return None,
    };
    if n != 4 {
        return None;
    }
    // Inside the envelope: one level is open around each item.
    let msgid = decode_one(&mut rd, 1).ok()?;
    let flag = decode_one(&mut rd, 1).ok()?;
    // A str, interned rather than allocated.
    let n = match Marker::from_u8(rd.u8().ok()?) {
        Marker::FixStr(n) => usize::from(n),
        Marker::Str8 => rd.u8().ok()?.into(),
        Marker::Str16 => rd.len16().ok()?,
        Marker::Str32 => rd.len32().ok()?,
        _ => return None,
    };
    let method = method_name_utf8(rd.take(n).ok()?)?;
    skip_one(&mut rd)?;
    (rd.pos == payload.len()).then_some(Header {
        msgid,
        flag,
        method,
    })
}

/// Steps over one value, checking it.
fn skip_one(rd: &mut Reader<'_>) -> Option<()> {
    // Items still to read in each enclosing container.
    let mut outer = [0usize; SKIP_LEVELS];
    let mut open = 0usize;
    let mut pending = 1usize;
    loop {
        let items = match Marker::from_u8(rd.u8().ok()?) {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                0
            }
            Marker::U8 | Marker::I8 => skip(rd, 1)?,
            Marker::U16 | Marker::I16 => skip(rd, 2)?,
            Marker::U32 | Marker::I32 | Marker::F32 => skip(rd, 4)?,
            Marker::U64 | Marker::I64 | Marker::F64 => skip(rd, 8)?,
            Marker::FixStr(n) => str(rd, n.into())?,
            Marker::Str8 => {
                let n = rd.u8().ok()?.into();
                str(rd, n)?
            }
            Marker::Str16 => {
                let n = rd.len16().ok()?;
                str(rd, n)?
            }
            Marker::Str32 => {
                let n = rd.len32().ok()?;
                str(rd, n)?
            }
            Marker::Bin8 => {
                let n = rd.u8().ok()?.into();
                skip(rd, n)?
            }
            Marker::Bin16 => {
                let n = rd.len16().ok()?;
                skip(rd, n)?
            }
            Marker::Bin32 => {
                let n = rd.len32().ok()?;
                skip(rd, n)?
            }
            Marker::FixArray(n) => n.into(),
            Marker::Array16 => rd.len16().ok()?,
            Marker::Array32 => rd.len32().ok()?,
            Marker::FixMap(n) => usize::from(n) * 2,
            Marker::Map16 => rd.len16().ok()?.checked_mul(2)?,
            Marker::Map32 => rd.len32().ok()?.checked_mul(2)?,
            _ => return None,
        };
        pending -= 1;
        if items > 0 {
            if open == SKIP_LEVELS {
                return None;
            }
            outer[open] = pending;
            open += 1;
            pending = items;
        }
        while pending == 0 {
            if open == 0 {
                return Some(());
            }
            open -= 1;
            pending = outer[open];
        }
    }
}

/// Steps over `n` bytes; a leaf: no items follow.
fn skip(rd: &mut Reader<'_>, n: usize) -> Option<usize> {
    rd.take(n).ok()?;
    Some(0)
}

fn str(rd: &mut Reader<'_>, n: usize) -> Option<usize> {
    std::str::from_utf8(rd.take(n).ok()?).ok()?;
    Some(0)
}
