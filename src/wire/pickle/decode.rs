//! Pickle decoder: an explicit stack machine, no recursion.
//!
//! Hostile input is bounded by the nesting depth ([`MAX_DEPTH`]) and the
//! memo's limits (see [`super::memo`]). Otherwise memory stays linear in
//! the payload: at most one value per opcode byte.

use bytes::Bytes;

use super::memo::Memo;
use super::op::*;
use super::reader::{decode_long, parse_decimal, parse_memo_index, utf8, Reader};
use crate::wire::{Value, WireError, MAX_DEPTH};

/// Decodes one pickle that must fill `payload` exactly (up to its STOP).
pub fn decode(payload: &Bytes) -> Result<Value, WireError> {
    let mut lazy = Decoder::new(payload, false);
    match lazy.run() {
        Err(_) if lazy.memo.needs_eager => Decoder::new(payload, true).run(),
        done => done,
    }
}

/// A stack entry: its value, the height of the value tree (a leaf is 1),
/// and an id the memo uses to recognise it.
pub(super) struct Item {
    pub value: Value,
    pub depth: usize,
    pub id: u64,
}

struct Decoder<'a> {
    rd: Reader<'a>,
    stack: Vec<Item>,
    /// Stack heights at each open MARK.
    marks: Vec<usize>,
    memo: Memo,
    next_id: u64,
}

fn malformed(msg: &str) -> WireError {
    WireError::malformed(msg)
}

impl<'a> Decoder<'a> {
    fn new(src: &'a Bytes, eager_memo: bool) -> Decoder<'a> {
        Decoder {
            rd: Reader::new(src),
            // A ZEO envelope holds a handful of items at most: no regrowth
            // (a reallocation per push was a tenth of a relayed round trip).
            stack: Vec::with_capacity(16),
            marks: Vec::with_capacity(4),
            memo: Memo::new(src.len(), eager_memo),
            next_id: 0,
        }
    }

    fn run(&mut self) -> Result<Value, WireError> {
        loop {
            let op = self.rd.byte()?;
            if op == STOP {
                return self.stop();
            }
            self.step(op)?;
        }
    }

    fn step(&mut self, op: u8) -> Result<(), WireError> {
        match op {
            PROTO => {
                if self.rd.byte()? > HIGHEST_PROTOCOL {
                    return Err(malformed("unsupported pickle protocol"));
                }
            }
            // Only a read-ahead hint for file readers; we have the whole frame.
            FRAME => {
                self.rd.take(8)?;
            }
            MARK => self.marks.push(self.stack.len()),
            NONE => self.push_leaf(Value::None)?,
            NEWTRUE => self.push_leaf(Value::Bool(true))?,
            NEWFALSE => self.push_leaf(Value::Bool(false))?,
            BININT => {
                let n = i32::from_le_bytes(self.rd.array()?);
                self.push_leaf(Value::Int(n.into()))?;
            }
            BININT1 => {
                let n = self.rd.byte()?;
                self.push_leaf(Value::Int(n.into()))?;
            }
            BININT2 => {
                let n = u16::from_le_bytes(self.rd.array()?);
                self.push_leaf(Value::Int(n.into()))?;
            }
            LONG1 => {
                let n = usize::from(self.rd.byte()?);
                let v = decode_long(self.rd.take(n)?)?;
                self.push_leaf(v)?;
            }
            LONG4 => {
                let n = self.rd.len_i32()?;
                let v = decode_long(self.rd.take(n)?)?;
                self.push_leaf(v)?;
            }
            INT => {
                let v = match self.rd.line()? {
                    b"00" => Value::Bool(false),
                    b"01" => Value::Bool(true),
                    text => Value::int(parse_decimal(text)?),
                };
                self.push_leaf(v)?;
            }
            LONG => {
                let text = self.rd.line()?;
                let text = text.strip_suffix(b"L").unwrap_or(text);
                self.push_leaf(Value::int(parse_decimal(text)?))?;
            }
            BINFLOAT => {
                let f = f64::from_be_bytes(self.rd.array()?);
                self.push_leaf(Value::Float(f))?;
            }
            SHORT_BINBYTES | SHORT_BINSTRING => {
                let n = usize::from(self.rd.byte()?);
                self.push_bytes(n)?;
            }
            BINBYTES => {
                let n = self.rd.len_u32()?;
                self.push_bytes(n)?;
            }
            BINSTRING => {
                let n = self.rd.len_i32()?;
                self.push_bytes(n)?;
            }
            BINBYTES8 => {
                let n = self.rd.len_u64()?;
                self.push_bytes(n)?;
            }
            SHORT_BINUNICODE => {
                let n = usize::from(self.rd.byte()?);
                self.push_str(n)?;
            }
            BINUNICODE => {
                let n = self.rd.len_u32()?;
                self.push_str(n)?;
            }
            BINUNICODE8 => {
                let n = self.rd.len_u64()?;
                self.push_str(n)?;
            }
            EMPTY_TUPLE => self.push_leaf(Value::Tuple(Vec::new()))?,
            TUPLE1 | TUPLE2 | TUPLE3 => {
                let n = usize::from(op - TUPLE1) + 1;
                let at = match self.stack.len().checked_sub(n) {
                    Some(at) if at >= self.floor() => at,
                    _ => return Err(malformed("stack underflow")),
                };
                self.push_values_from(at, Value::Tuple)?;
            }
            TUPLE => {
                let at = self.marks.pop().ok_or_else(|| malformed("no MARK"))?;
                self.push_values_from(at, Value::Tuple)?;
            }
            EMPTY_LIST => self.push_leaf(Value::List(Vec::new()))?,
            LIST => {
                let at = self.marks.pop().ok_or_else(|| malformed("no MARK"))?;
                self.push_values_from(at, Value::List)?;
            }
            APPEND => {
                let item = self.pop()?;
                self.extend_list(vec![item])?;
            }
            APPENDS => {
                let items = self.pop_mark()?;
                self.extend_list(items)?;
            }
            EMPTY_DICT => self.push_leaf(Value::Dict(Vec::new()))?,
            DICT => {
                let items = self.pop_mark()?;
                let depth = container_depth(&items);
                self.push(Value::Dict(pairs(items)?), depth)?;
            }
            SETITEM => {
                let value = self.pop()?;
                let key = self.pop()?;
                self.extend_dict(vec![key, value])?;
            }
            SETITEMS => {
                let items = self.pop_mark()?;
                self.extend_dict(items)?;
            }
            PUT => {
                let idx = parse_memo_index(self.rd.line()?)?;
                self.memo_put(idx)?;
            }
            BINPUT => {
                let idx = self.rd.byte()?;
                self.memo_put(idx.into())?;
            }
            LONG_BINPUT => {
                let idx = u32::from_le_bytes(self.rd.array()?);
                self.memo_put(idx)?;
            }
            MEMOIZE => {
                let idx = self.memo.next_index()?;
                self.memo_put(idx)?;
            }
            GET => {
                let idx = parse_memo_index(self.rd.line()?)?;
                self.memo_get(idx)?;
            }
            BINGET => {
                let idx = self.rd.byte()?;
                self.memo_get(idx.into())?;
            }
            LONG_BINGET => {
                let idx = u32::from_le_bytes(self.rd.array()?);
                self.memo_get(idx)?;
            }
            GLOBAL => {
                let module = utf8(self.rd.line()?)?.to_owned();
                let name = utf8(self.rd.line()?)?.to_owned();
                self.push_leaf(Value::Global { module, name })?;
            }
            STACK_GLOBAL => {
                let name = self.pop()?.value;
                let module = self.pop()?.value;
                match (module, name) {
                    (Value::Str(module), Value::Str(name)) => {
                        self.push_leaf(Value::Global { module, name })?
                    }
                    _ => return Err(malformed("STACK_GLOBAL needs two str")),
                }
            }
            REDUCE => self.pop_pair(Value::Reduce)?,
            NEWOBJ => self.pop_pair(Value::NewObj)?,
            BUILD => self.pop_pair(Value::Build)?,
            other => return Err(WireError::UnsupportedOpcode(other)),
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<Value, WireError> {
        if !self.marks.is_empty() {
            return Err(malformed("unclosed MARK at STOP"));
        }
        let item = self.pop()?;
        if !self.stack.is_empty() {
            return Err(malformed("values left on the stack at STOP"));
        }
        match self.rd.remaining() {
            0 => {}
            n => return Err(WireError::TrailingBytes(n)),
        }
        Ok(item.value)
    }

    // ---- stack

    /// Items below the innermost MARK are out of reach, as in CPython.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, value: Value, depth: usize) -> Result<(), WireError> {
        if depth > MAX_DEPTH {
            return Err(WireError::TooDeep);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.stack.push(Item { value, depth, id });
        Ok(())
    }

    fn push_leaf(&mut self, value: Value) -> Result<(), WireError> {
        self.push(value, 1)
    }

    fn push_bytes(&mut self, n: usize) -> Result<(), WireError> {
        let b = self.rd.take_shared(n)?;
        self.push_leaf(Value::Bytes(b))
    }

    fn push_str(&mut self, n: usize) -> Result<(), WireError> {
        let s = utf8(self.rd.take(n)?)?.to_owned();
        self.push_leaf(Value::Str(s))
    }

    /// Replaces the items from stack position `at` up by one container of
    /// their values (one allocation of the exact size: no intermediate
    /// vector of items).
    fn push_values_from(
        &mut self,
        at: usize,
        make: fn(Vec<Value>) -> Value,
    ) -> Result<(), WireError> {
        if at > self.stack.len() {
            return Err(malformed("stack underflow"));
        }
        let items = &self.stack[at..];
        let depth = container_depth(items);
        for item in items {
            self.memo.leaving(item)?;
        }
        let values: Vec<Value> = self.stack.drain(at..).map(|i| i.value).collect();
        self.push(make(values), depth)
    }

    fn pop(&mut self) -> Result<Item, WireError> {
        if self.stack.len() <= self.floor() {
            return Err(malformed("stack underflow"));
        }
        let item = self
            .stack
            .pop()
            .ok_or_else(|| malformed("stack underflow"))?;
        self.memo.leaving(&item)?;
        Ok(item)
    }

    /// Removes the items from stack position `at` up, telling the memo.
    fn take_from(&mut self, at: usize) -> Result<Vec<Item>, WireError> {
        if at > self.stack.len() {
            return Err(malformed("stack underflow"));
        }
        let items = self.stack.split_off(at);
        for item in &items {
            self.memo.leaving(item)?;
        }
        Ok(items)
    }

    fn pop_pair(&mut self, make: fn(Box<(Value, Value)>) -> Value) -> Result<(), WireError> {
        let second = self.pop()?;
        let first = self.pop()?;
        let depth = 1 + first.depth.max(second.depth);
        self.push(make(Box::new((first.value, second.value))), depth)
    }

    fn pop_mark(&mut self) -> Result<Vec<Item>, WireError> {
        let at = self.marks.pop().ok_or_else(|| malformed("no MARK"))?;
        self.take_from(at)
    }

    fn top_mut(&mut self) -> Result<&mut Item, WireError> {
        if self.stack.len() <= self.floor() {
            return Err(malformed("stack underflow"));
        }
        self.stack
            .last_mut()
            .ok_or_else(|| malformed("stack underflow"))
    }

    fn extend_list(&mut self, items: Vec<Item>) -> Result<(), WireError> {
        let depth = container_depth(&items);
        let top = self.top_mut()?;
        let Value::List(list) = &mut top.value else {
            return Err(malformed("APPEND to a non-list"));
        };
        list.extend(items.into_iter().map(|i| i.value));
        top.depth = top.depth.max(depth);
        if top.depth > MAX_DEPTH {
            return Err(WireError::TooDeep);
        }
        Ok(())
    }

    fn extend_dict(&mut self, items: Vec<Item>) -> Result<(), WireError> {
        let depth = container_depth(&items);
        let new = pairs(items)?;
        let top = self.top_mut()?;
        let Value::Dict(dict) = &mut top.value else {
            return Err(malformed("SETITEM on a non-dict"));
        };
        dict.extend(new);
        top.depth = top.depth.max(depth);
        if top.depth > MAX_DEPTH {
            return Err(WireError::TooDeep);
        }
        Ok(())
    }

    // ---- memo

    fn memo_put(&mut self, idx: u32) -> Result<(), WireError> {
        let pos = match self.stack.len().checked_sub(1) {
            Some(pos) if pos >= self.floor() => pos,
            _ => return Err(malformed("PUT on an empty stack")),
        };
        let item = self
            .stack
            .get(pos)
            .ok_or_else(|| malformed("PUT on an empty stack"))?;
        self.memo.put(idx, pos, item)
    }

    fn memo_get(&mut self, idx: u32) -> Result<(), WireError> {
        let (value, depth) = self.memo.get(idx, &self.stack)?;
        self.push(value, depth)
    }
}

fn container_depth(items: &[Item]) -> usize {
    1 + items.iter().map(|i| i.depth).max().unwrap_or(0)
}

fn pairs(items: Vec<Item>) -> Result<Vec<(Value, Value)>, WireError> {
    if items.len() % 2 != 0 {
        return Err(malformed("odd number of dict items"));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k.value, v.value));
    }
    Ok(out)
}
