//! msgpack encoder with packb's choice of the smallest forms. Iterative.

use rmp::Marker;

use crate::wire::{Value, WireError, MAX_DEPTH};

/// Appends `value` as Python's `packb(value, use_bin_type=True)` would.
/// On error `out` is left as it was.
pub fn encode(value: &Value, out: &mut Vec<u8>) -> Result<(), WireError> {
    guarded(out, |out| run(vec![Task::Value(value, 1)], out))
}

/// Appends an array of `items` (the envelope of a message) without
/// building a `Tuple` first.
pub fn encode_tuple(items: &[&Value], out: &mut Vec<u8>) -> Result<(), WireError> {
    guarded(out, |out| {
        write_len(out, items.len(), Kind::Array)?;
        run(
            items
                .iter()
                .rev()
                .map(|&item| Task::Value(item, 2))
                .collect(),
            out,
        )
    })
}

fn guarded(
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let start = out.len();
    let res = body(out);
    if res.is_err() {
        out.truncate(start);
    }
    res
}

/// Pending work for the encoder, popped from the end; the number is the
/// nesting level (the root is 1).
enum Task<'v> {
    Value(&'v Value, usize),
    Items(&'v [Value], usize),
    Pairs(&'v [(Value, Value)], usize),
}

fn run(mut todo: Vec<Task<'_>>, out: &mut Vec<u8>) -> Result<(), WireError> {
    while let Some(task) = todo.pop() {
        match task {
            Task::Items(items, depth) => {
                if let [first, rest @ ..] = items {
                    todo.push(Task::Items(rest, depth));
                    todo.push(Task::Value(first, depth));
                }
            }
            Task::Pairs(items, depth) => {
                if let [(k, v), rest @ ..] = items {
                    todo.push(Task::Pairs(rest, depth));
                    todo.push(Task::Value(v, depth));
                    todo.push(Task::Value(k, depth));
                }
            }
            Task::Value(v, depth) => {
                if depth > MAX_DEPTH {
                    return Err(WireError::TooDeep);
                }
                write_value(v, depth + 1, out, &mut todo)?;
            }
        }
    }
    Ok(())
}

/// Writes a scalar, or a container's header and queues its contents.
fn write_value<'v>(
    v: &'v Value,
    inner: usize,
    out: &mut Vec<u8>,
    todo: &mut Vec<Task<'v>>,
) -> Result<(), WireError> {
    match v {
        Value::None => out.push(Marker::Null.to_u8()),
        Value::Bool(true) => out.push(Marker::True.to_u8()),
        Value::Bool(false) => out.push(Marker::False.to_u8()),
        Value::Int(n) => write_int(i128::from(*n), out)?,
        Value::BigInt(n) => write_int(*n, out)?,
        // Python floats are doubles and packb never narrows them.
        Value::Float(f) => {
            out.push(Marker::F64.to_u8());
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Bytes(b) => {
            write_len(out, b.len(), Kind::Bin)?;
            out.extend_from_slice(b);
        }
        Value::Str(s) => {
            write_len(out, s.len(), Kind::Str)?;
            out.extend_from_slice(s.as_bytes());
        }
        Value::Tuple(items) | Value::List(items) => {
            write_len(out, items.len(), Kind::Array)?;
            todo.push(Task::Items(items, inner));
        }
        Value::Dict(items) => {
            write_len(out, items.len(), Kind::Map)?;
            todo.push(Task::Pairs(items, inner));
        }
        Value::Global { .. } | Value::Reduce(_) | Value::NewObj(_) | Value::Build(_) => {
            return Err(WireError::Unencodable(
                "pickle object constructs have no msgpack form".into(),
            ))
        }
    }
    Ok(())
}

/// Smallest form, unsigned markers for non-negative values (as packb does).
fn write_int(n: i128, out: &mut Vec<u8>) -> Result<(), WireError> {
    let too_big = || WireError::Unencodable("integer outside msgpack's 64-bit range".into());
    if n >= 0 {
        if n < 0x80 {
            out.push(Marker::FixPos(n as u8).to_u8());
        } else if let Ok(v) = u8::try_from(n) {
            out.extend_from_slice(&[Marker::U8.to_u8(), v]);
        } else if let Ok(v) = u16::try_from(n) {
            out.push(Marker::U16.to_u8());
            out.extend_from_slice(&v.to_be_bytes());
        } else if let Ok(v) = u32::try_from(n) {
            out.push(Marker::U32.to_u8());
            out.extend_from_slice(&v.to_be_bytes());
        } else {
            let v = u64::try_from(n).map_err(|_| too_big())?;
            out.push(Marker::U64.to_u8());
            out.extend_from_slice(&v.to_be_bytes());
        }
    } else if n >= -32 {
        out.push(Marker::FixNeg(n as i8).to_u8());
    } else if let Ok(v) = i8::try_from(n) {
        out.extend_from_slice(&[Marker::I8.to_u8(), v as u8]);
    } else if let Ok(v) = i16::try_from(n) {
        out.push(Marker::I16.to_u8());
        out.extend_from_slice(&v.to_be_bytes());
    } else if let Ok(v) = i32::try_from(n) {
        out.push(Marker::I32.to_u8());
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        let v = i64::try_from(n).map_err(|_| too_big())?;
        out.push(Marker::I64.to_u8());
        out.extend_from_slice(&v.to_be_bytes());
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Kind {
    Str,
    Bin,
    Array,
    Map,
}

/// A length header in the smallest form packb uses: fix (str < 32,
/// array/map < 16), then 8 (str/bin only), 16 and 32 bits.
fn write_len(out: &mut Vec<u8>, len: usize, kind: Kind) -> Result<(), WireError> {
    type Fix = Option<(fn(u8) -> Marker, usize)>;
    let (fix, m8, m16, m32): (Fix, _, _, _) = match kind {
        Kind::Str => (
            Some((Marker::FixStr, 32)),
            Some(Marker::Str8),
            Marker::Str16,
            Marker::Str32,
        ),
        Kind::Bin => (None, Some(Marker::Bin8), Marker::Bin16, Marker::Bin32),
        Kind::Array => (
            Some((Marker::FixArray, 16)),
            None,
            Marker::Array16,
            Marker::Array32,
        ),
        Kind::Map => (
            Some((Marker::FixMap, 16)),
            None,
            Marker::Map16,
            Marker::Map32,
        ),
    };
    if let Some((fix, limit)) = fix {
        if let Ok(n) = u8::try_from(len) {
            if len < limit {
                out.push(fix(n).to_u8());
                return Ok(());
            }
        }
    }
    if let (Some(m8), Ok(n)) = (m8, u8::try_from(len)) {
        out.extend_from_slice(&[m8.to_u8(), n]);
    } else if let Ok(n) = u16::try_from(len) {
        out.push(m16.to_u8());
        out.extend_from_slice(&n.to_be_bytes());
    } else {
        let n = u32::try_from(len)
            .map_err(|_| WireError::Unencodable("msgpack length over 4 GiB".into()))?;
        out.push(m32.to_u8());
        out.extend_from_slice(&n.to_be_bytes());
    }
    Ok(())
}
