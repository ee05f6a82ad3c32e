//! Reading opcode arguments out of a pickle frame.

use std::num::IntErrorKind;

use bytes::Bytes;

use crate::wire::{Value, WireError};

pub(super) struct Reader<'a> {
    src: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(src: &'a Bytes) -> Reader<'a> {
        Reader { src, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.src.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes as a zero-copy slice of the frame.
    pub fn take_shared(&mut self, n: usize) -> Result<Bytes, WireError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.src.slice(start..self.pos))
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
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

    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        self.take(N)?.try_into().map_err(|_| WireError::Truncated)
    }

    pub fn byte(&mut self) -> Result<u8, WireError> {
        let [b] = self.array::<1>()?;
        Ok(b)
    }

    /// Bytes up to the next newline, which is consumed too.
    pub fn line(&mut self) -> Result<&'a [u8], WireError> {
        let src: &'a Bytes = self.src;
        let rest = src.get(self.pos..).ok_or(WireError::Truncated)?;
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(WireError::Truncated)?;
        let line = self.take(n)?;
        self.take(1)?;
        Ok(line)
    }

    pub fn len_u32(&mut self) -> Result<usize, WireError> {
        let n = u32::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| WireError::Truncated)
    }

    pub fn len_i32(&mut self) -> Result<usize, WireError> {
        let n = i32::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| WireError::malformed("negative length"))
    }

    pub fn len_u64(&mut self) -> Result<usize, WireError> {
        let n = u64::from_le_bytes(self.array()?);
        usize::try_from(n).map_err(|_| WireError::Truncated)
    }
}

/// Little-endian two's complement, as LONG1/LONG4 carry it.
pub(super) fn decode_long(bytes: &[u8]) -> Result<Value, WireError> {
    let mut bytes = bytes;
    // Drop redundant sign-extension bytes so only real magnitude counts.
    while let [.., prev, last] = bytes {
        let redundant = (*last == 0x00 && *prev < 0x80) || (*last == 0xff && *prev >= 0x80);
        if !redundant {
            break;
        }
        bytes = &bytes[..bytes.len() - 1];
    }
    let Some(&last) = bytes.last() else {
        return Ok(Value::Int(0));
    };
    if bytes.len() > 16 {
        return Err(WireError::IntegerTooLarge);
    }
    let mut buf = if last >= 0x80 { [0xff; 16] } else { [0; 16] };
    buf[..bytes.len()].copy_from_slice(bytes);
    Ok(Value::int(i128::from_le_bytes(buf)))
}

pub(super) fn parse_decimal(text: &[u8]) -> Result<i128, WireError> {
    utf8(text)?.parse::<i128>().map_err(|e| match e.kind() {
        IntErrorKind::PosOverflow | IntErrorKind::NegOverflow => WireError::IntegerTooLarge,
        _ => WireError::malformed("bad decimal integer"),
    })
}

pub(super) fn parse_memo_index(text: &[u8]) -> Result<u32, WireError> {
    utf8(text)?
        .parse::<u32>()
        .map_err(|_| WireError::malformed("bad memo index"))
}

pub(super) fn utf8(b: &[u8]) -> Result<&str, WireError> {
    std::str::from_utf8(b).map_err(|_| WireError::malformed("invalid UTF-8"))
}
