//! Pickle encoder producing the same bytes as ZEO's
//! `zodbpickle.pickle.Pickler(f, 3)` with `fast = 1` (the C pickler).
//! Iterative: a work list of pending values and closing opcodes.

use super::op::*;
use crate::wire::{Value, WireError, MAX_DEPTH};

/// Appends `value` as a complete protocol-3 pickle. On error `out` is left
/// as it was.
pub fn encode(value: &Value, out: &mut Vec<u8>) -> Result<(), WireError> {
    guarded(out, |out| run(vec![Task::Value(value, 1)], out))
}

/// Appends the pickle of a tuple made of `items`, without building it (the
/// message envelope is a 4-tuple of borrowed parts).
pub fn encode_tuple(items: &[&Value], out: &mut Vec<u8>) -> Result<(), WireError> {
    guarded(out, |out| {
        let mut todo = Vec::new();
        if items.is_empty() {
            out.push(EMPTY_TUPLE);
            return Ok(());
        }
        if items.len() > 3 {
            out.push(MARK);
        }
        todo.push(Task::Op(tuple_close(items.len())));
        todo.extend(items.iter().rev().map(|&item| Task::Value(item, 2)));
        run(todo, out)
    })
}

fn guarded(
    out: &mut Vec<u8>,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), WireError>,
) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[PROTO, 3]);
    let res = body(out);
    match res {
        Ok(()) => out.push(STOP),
        Err(_) => out.truncate(start),
    }
    res
}

/// Pending work, popped from the end. Depth is the value's nesting level.
enum Task<'v> {
    Value(&'v Value, usize),
    /// Values written one after another (a tuple's items, one batch).
    Items(&'v [Value], usize),
    Pairs(&'v [(Value, Value)], usize),
    /// The rest of a list or dict, written in MARK ... APPENDS/SETITEMS
    /// batches of 1000 like CPython's `batch_list_exact`.
    ListBatches(&'v [Value], usize),
    DictBatches(&'v [(Value, Value)], usize),
    Op(u8),
}

fn run(mut todo: Vec<Task<'_>>, out: &mut Vec<u8>) -> Result<(), WireError> {
    while let Some(task) = todo.pop() {
        match task {
            Task::Op(op) => out.push(op),
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
            Task::ListBatches(items, depth) => {
                if !items.is_empty() {
                    let (batch, rest) = items.split_at(items.len().min(BATCHSIZE));
                    out.push(MARK);
                    todo.push(Task::ListBatches(rest, depth));
                    todo.push(Task::Op(APPENDS));
                    todo.push(Task::Items(batch, depth));
                }
            }
            Task::DictBatches(items, depth) => {
                if !items.is_empty() {
                    let (batch, rest) = items.split_at(items.len().min(BATCHSIZE));
                    out.push(MARK);
                    todo.push(Task::DictBatches(rest, depth));
                    todo.push(Task::Op(SETITEMS));
                    todo.push(Task::Pairs(batch, depth));
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

/// Writes a scalar, or a container's opening and queues its contents
/// (at nesting level `inner`).
fn write_value<'v>(
    v: &'v Value,
    inner: usize,
    out: &mut Vec<u8>,
    todo: &mut Vec<Task<'v>>,
) -> Result<(), WireError> {
    match v {
        Value::None => out.push(NONE),
        Value::Bool(true) => out.push(NEWTRUE),
        Value::Bool(false) => out.push(NEWFALSE),
        Value::Int(n) => write_int(i128::from(*n), out),
        Value::BigInt(n) => write_int(*n, out),
        Value::Float(f) => {
            out.push(BINFLOAT);
            out.extend_from_slice(&f.to_be_bytes());
        }
        Value::Bytes(b) => {
            if let Ok(n) = u8::try_from(b.len()) {
                out.extend_from_slice(&[SHORT_BINBYTES, n]);
            } else {
                // BINBYTES8 is protocol 4; CPython refuses too at protocol 3.
                let n = u32::try_from(b.len())
                    .map_err(|_| WireError::Unencodable("bytes over 4 GiB".into()))?;
                out.push(BINBYTES);
                out.extend_from_slice(&n.to_le_bytes());
            }
            out.extend_from_slice(b);
        }
        // Protocol 3 has no SHORT_BINUNICODE: every str is BINUNICODE.
        Value::Str(s) => {
            let n = u32::try_from(s.len())
                .map_err(|_| WireError::Unencodable("str over 4 GiB".into()))?;
            out.push(BINUNICODE);
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Value::Tuple(items) => {
            if items.is_empty() {
                out.push(EMPTY_TUPLE);
            } else {
                if items.len() > 3 {
                    out.push(MARK);
                }
                todo.push(Task::Op(tuple_close(items.len())));
                todo.push(Task::Items(items, inner));
            }
        }
        Value::List(items) => {
            out.push(EMPTY_LIST);
            if let [only] = items.as_slice() {
                todo.push(Task::Op(APPEND));
                todo.push(Task::Value(only, inner));
            } else {
                todo.push(Task::ListBatches(items, inner));
            }
        }
        Value::Dict(items) => {
            out.push(EMPTY_DICT);
            if let [(k, v)] = items.as_slice() {
                todo.push(Task::Op(SETITEM));
                todo.push(Task::Value(v, inner));
                todo.push(Task::Value(k, inner));
            } else {
                todo.push(Task::DictBatches(items, inner));
            }
        }
        Value::Global { module, name } => {
            if module.contains('\n') || name.contains('\n') {
                return Err(WireError::Unencodable("newline in a global name".into()));
            }
            out.push(GLOBAL);
            for part in [module, name] {
                out.extend_from_slice(part.as_bytes());
                out.push(b'\n');
            }
        }
        Value::Reduce(pair) => queue_pair(pair, REDUCE, inner, todo),
        Value::NewObj(pair) => queue_pair(pair, NEWOBJ, inner, todo),
        Value::Build(pair) => queue_pair(pair, BUILD, inner, todo),
    }
    Ok(())
}

fn queue_pair<'v>(pair: &'v (Value, Value), op: u8, inner: usize, todo: &mut Vec<Task<'v>>) {
    todo.push(Task::Op(op));
    todo.push(Task::Value(&pair.1, inner));
    todo.push(Task::Value(&pair.0, inner));
}

fn tuple_close(len: usize) -> u8 {
    match len {
        1 => TUPLE1,
        2 => TUPLE2,
        3 => TUPLE3,
        _ => TUPLE,
    }
}

/// BININT1/BININT2 for small non-negatives, BININT for the i32 range,
/// else LONG1 with minimal two's complement (CPython's `save_long`).
fn write_int(n: i128, out: &mut Vec<u8>) {
    if let Ok(small) = u8::try_from(n) {
        out.extend_from_slice(&[BININT1, small]);
    } else if let Ok(small) = u16::try_from(n) {
        out.push(BININT2);
        out.extend_from_slice(&small.to_le_bytes());
    } else if let Ok(small) = i32::try_from(n) {
        out.push(BININT);
        out.extend_from_slice(&small.to_le_bytes());
    } else {
        let bytes = n.to_le_bytes();
        let mut len = bytes.len();
        // Shortest length whose top bit still carries n's sign.
        while len > 1 {
            let (last, prev) = (bytes[len - 1], bytes[len - 2]);
            let redundant = (last == 0x00 && prev < 0x80) || (last == 0xff && prev >= 0x80);
            if !redundant {
                break;
            }
            len -= 1;
        }
        // len <= 16, so it fits the LONG1 length byte.
        out.extend_from_slice(&[LONG1, len as u8]);
        out.extend_from_slice(&bytes[..len]);
    }
}
