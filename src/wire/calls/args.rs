//! Argument access with errors that name the method.

use crate::wire::{Message, Value, WireError};

pub(super) struct Args<'a> {
    method: &'a str,
    items: &'a [Value],
}

impl<'a> Args<'a> {
    /// The message's args, which must be a sequence of `min..=max` items.
    pub fn new(msg: &'a Message, min: usize, max: usize) -> Result<Args<'a>, WireError> {
        let method = &*msg.method;
        let items = msg
            .args
            .as_seq()
            .ok_or_else(|| WireError::Malformed(format!("{method}: args are not a sequence")))?;
        if items.len() < min || items.len() > max {
            let want = if min == max {
                min.to_string()
            } else {
                format!("{min} to {max}")
            };
            return Err(WireError::Malformed(format!(
                "{method}: expected {want} arguments, got {}",
                items.len()
            )));
        }
        Ok(Args { method, items })
    }

    fn bad(&self, i: usize, what: &str) -> WireError {
        WireError::Malformed(format!("{}: argument {i} must be {what}", self.method))
    }

    /// A present argument, or None for an omitted optional one.
    pub fn opt(&self, i: usize) -> Option<&'a Value> {
        self.items.get(i)
    }

    pub fn value(&self, i: usize) -> Result<&'a Value, WireError> {
        self.opt(i).ok_or_else(|| self.bad(i, "present"))
    }

    pub fn bytes(&self, i: usize) -> Result<&'a [u8], WireError> {
        self.value(i)?
            .as_bytes()
            .ok_or_else(|| self.bad(i, "bytes"))
    }

    /// Bytes or None (an omitted argument counts as None).
    pub fn opt_bytes(&self, i: usize) -> Result<Option<&'a [u8]>, WireError> {
        match self.opt(i) {
            None | Some(Value::None) => Ok(None),
            Some(Value::Bytes(b)) => Ok(Some(b)),
            Some(_) => Err(self.bad(i, "bytes or None")),
        }
    }

    pub fn str(&self, i: usize) -> Result<&'a str, WireError> {
        self.value(i)?.as_str().ok_or_else(|| self.bad(i, "str"))
    }

    pub fn int(&self, i: usize) -> Result<i64, WireError> {
        self.value(i)?.as_i64().ok_or_else(|| self.bad(i, "an int"))
    }

    /// A Python flag: bool, int or None, read by truthiness.
    pub fn flag(&self, i: usize) -> Result<bool, WireError> {
        match self.value(i)? {
            v @ (Value::Bool(_) | Value::Int(_) | Value::BigInt(_) | Value::None) => Ok(v.truthy()),
            _ => Err(self.bad(i, "a bool or int")),
        }
    }

    pub fn seq(&self, i: usize) -> Result<&'a [Value], WireError> {
        self.value(i)?
            .as_seq()
            .ok_or_else(|| self.bad(i, "a sequence"))
    }
}
