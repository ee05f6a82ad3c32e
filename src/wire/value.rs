//! One value model for both encodings.

use bytes::Bytes;

/// A decoded pickle or msgpack value.
///
/// Integers that fit in `i64` are always `Int`; `BigInt` only holds values
/// outside that range (use [`Value::int`] to build either). msgpack arrays
/// decode as `Tuple`, since that format cannot tell tuples from lists.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    BigInt(i128),
    Float(f64),
    /// A slice of the received frame where possible (no copy).
    Bytes(Bytes),
    Str(String),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion order is kept, so re-encoding reproduces the input.
    Dict(Vec<(Value, Value)>),
    // Pickle-only object constructs, e.g. a ZopeUndo.Prefix undo filter.
    Global {
        module: String,
        name: String,
    },
    /// `callable(*args)`: (callable, args).
    Reduce(Box<(Value, Value)>),
    /// `cls.__new__(cls, *args)`: (cls, args).
    NewObj(Box<(Value, Value)>),
    /// `obj.__setstate__(state)`: (obj, state).
    Build(Box<(Value, Value)>),
}

impl Value {
    /// `Int` when `n` fits in `i64`, `BigInt` otherwise.
    pub fn int(n: i128) -> Value {
        match i64::try_from(n) {
            Ok(small) => Value::Int(small),
            Err(_) => Value::BigInt(n),
        }
    }

    pub fn bytes(b: impl Into<Bytes>) -> Value {
        Value::Bytes(b.into())
    }

    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    /// The shared buffer itself, for cheap clones.
    pub fn as_bytes_buf(&self) -> Option<&Bytes> {
        match self {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Integers only; `Bool` is not treated as an int here.
    pub fn as_int(&self) -> Option<i128> {
        match *self {
            Value::Int(n) => Some(i128::from(n)),
            Value::BigInt(n) => Some(n),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(n) => Some(n),
            _ => None,
        }
    }

    /// Floats and integers, as Python's `float()` would see them.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(f) => Some(f),
            Value::Int(n) => Some(n as f64),
            Value::BigInt(n) => Some(n as f64),
            _ => None,
        }
    }

    /// The items of a `Tuple` or a `List`.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(items) => Some(items),
            _ => None,
        }
    }

    /// Looks up a string key in a `Dict` (the last one wins, as in Python).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_dict()?
            .iter()
            .rev()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Value::None)
    }

    /// Python truthiness.
    pub fn truthy(&self) -> bool {
        match self {
            Value::None => false,
            Value::Bool(b) => *b,
            Value::Int(n) => *n != 0,
            Value::BigInt(n) => *n != 0,
            Value::Float(f) => *f != 0.0,
            Value::Bytes(b) => !b.is_empty(),
            Value::Str(s) => !s.is_empty(),
            Value::Tuple(v) | Value::List(v) => !v.is_empty(),
            Value::Dict(d) => !d.is_empty(),
            Value::Global { .. } | Value::Reduce(_) | Value::NewObj(_) | Value::Build(_) => true,
        }
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Value {
        Value::Int(n)
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<Bytes> for Value {
    fn from(b: Bytes) -> Value {
        Value::Bytes(b)
    }
}

impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Value {
        Value::Bytes(Bytes::copy_from_slice(b))
    }
}

impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Value {
        Value::Bytes(Bytes::from(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int_normalises() {
        assert_eq!(Value::int(5), Value::Int(5));
        assert_eq!(
            Value::int(i128::from(u64::MAX)),
            Value::BigInt(i128::from(u64::MAX))
        );
        assert_eq!(Value::int(i128::from(i64::MIN)), Value::Int(i64::MIN));
    }

    #[test]
    fn truthiness_and_accessors() {
        assert!(!Value::Int(0).truthy());
        assert!(Value::Int(1).truthy());
        assert!(!Value::Bool(false).truthy());
        assert!(!Value::None.truthy());
        assert!(Value::None.is_none());
        assert!(!Value::Tuple(vec![]).truthy());
        let d = Value::Dict(vec![
            (Value::from("a"), Value::Int(1)),
            (Value::from("a"), Value::Int(2)),
        ]);
        assert_eq!(d.get("a"), Some(&Value::Int(2)));
        assert_eq!(d.get("b"), None);
        assert_eq!(
            Value::List(vec![Value::None]).as_seq().map(<[Value]>::len),
            Some(1)
        );
        assert_eq!(Value::BigInt(1 << 70).as_int(), Some(1 << 70));
        assert_eq!(Value::Bool(true).as_int(), None);
    }
}
