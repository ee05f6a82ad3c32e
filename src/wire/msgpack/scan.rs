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
use crate::wire::Value;

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
    let msgid = header_item(payload, &mut rd)?;
    let flag = header_item(payload, &mut rd)?;
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

/// A header item: small ints and bools (what ZEO's msgids and flags are)
/// read straight, anything else by the decoder.
#[inline]
fn header_item(payload: &Bytes, rd: &mut Reader<'_>) -> Option<Value> {
    let v = match *payload.get(rd.pos)? {
        b @ 0x00..=0x7f => Value::Int(b.into()),
        b @ 0xe0..=0xff => Value::Int((b as i8).into()),
        0xcd => {
            let raw = payload.get(rd.pos + 1..rd.pos + 3)?;
            rd.pos += 2;
            Value::Int(u16::from_be_bytes([raw[0], raw[1]]).into())
        }
        0xcc => {
            let b = *payload.get(rd.pos + 1)?;
            rd.pos += 1;
            Value::Int(b.into())
        }
        0xc2 => Value::Bool(false),
        0xc3 => Value::Bool(true),
        _ => return decode_one(rd, 1).ok(),
    };
    rd.pos += 1;
    Some(v)
}

/// Steps over one value, checking it. A plain cursor over the payload
/// (`None` when it runs out), leaner than the decoder's reader.
fn skip_one(rd: &mut Reader<'_>) -> Option<()> {
    let src: &[u8] = rd.src();
    let mut pos = rd.pos;
    // Items still to read in each enclosing container.
    let mut outer = [0usize; SKIP_LEVELS];
    let mut open = 0usize;
    let mut pending = 1usize;
    let byte = |pos: &mut usize| -> Option<u8> {
        let b = *src.get(*pos)?;
        *pos += 1;
        Some(b)
    };
    let be = |pos: &mut usize, n: usize| -> Option<usize> {
        let raw = src.get(*pos..pos.checked_add(n)?)?;
        *pos += n;
        Some(
            raw.iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)),
        )
    };
    let skip = |pos: &mut usize, n: usize| -> Option<usize> {
        let end = pos.checked_add(n)?;
        if end > src.len() {
            return None;
        }
        *pos = end;
        Some(0)
    };
    let str = |pos: &mut usize, n: usize| -> Option<usize> {
        let end = pos.checked_add(n)?;
        std::str::from_utf8(src.get(*pos..end)?).ok()?;
        *pos = end;
        Some(0)
    };
    loop {
        let items = match Marker::from_u8(byte(&mut pos)?) {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                0
            }
            Marker::U8 | Marker::I8 => skip(&mut pos, 1)?,
            Marker::U16 | Marker::I16 => skip(&mut pos, 2)?,
            Marker::U32 | Marker::I32 | Marker::F32 => skip(&mut pos, 4)?,
            Marker::U64 | Marker::I64 | Marker::F64 => skip(&mut pos, 8)?,
            Marker::FixStr(n) => str(&mut pos, n.into())?,
            Marker::Str8 => {
                let n = be(&mut pos, 1)?;
                str(&mut pos, n)?
            }
            Marker::Str16 => {
                let n = be(&mut pos, 2)?;
                str(&mut pos, n)?
            }
            Marker::Str32 => {
                let n = be(&mut pos, 4)?;
                str(&mut pos, n)?
            }
            Marker::Bin8 => {
                let n = be(&mut pos, 1)?;
                skip(&mut pos, n)?
            }
            Marker::Bin16 => {
                let n = be(&mut pos, 2)?;
                skip(&mut pos, n)?
            }
            Marker::Bin32 => {
                let n = be(&mut pos, 4)?;
                skip(&mut pos, n)?
            }
            Marker::FixArray(n) => n.into(),
            Marker::Array16 => be(&mut pos, 2)?,
            Marker::Array32 => be(&mut pos, 4)?,
            Marker::FixMap(n) => usize::from(n) * 2,
            Marker::Map16 => be(&mut pos, 2)?.checked_mul(2)?,
            Marker::Map32 => be(&mut pos, 4)?.checked_mul(2)?,
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
                rd.pos = pos;
                return Some(());
            }
            open -= 1;
            pending = outer[open];
        }
    }
}
