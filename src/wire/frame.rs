//! ZEO framing: a 4-byte big-endian payload length, then the payload.

use bytes::{Buf, Bytes, BytesMut};

use super::error::WireError;

const PREFIX: usize = 4;

/// Takes one complete frame out of `buf`.
///
/// `Ok(None)` means more bytes are needed. The declared length is checked
/// against `max_len` before anything is reserved, and room for the rest of
/// the body grows with what arrived ([`reserve_toward`]), so a peer that
/// announces a large frame and trickles it makes us allocate in proportion
/// to what it sent, not to what it announced.
pub fn parse_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Bytes>, WireError> {
    let Some(header) = buf.first_chunk::<PREFIX>() else {
        return Ok(None);
    };
    let declared = u32::from_be_bytes(*header);
    let len = usize::try_from(declared).map_err(|_| WireError::FrameTooLarge {
        len: usize::MAX,
        max: max_len,
    })?;
    if len > max_len {
        return Err(WireError::FrameTooLarge { len, max: max_len });
    }
    let total = PREFIX + len;
    if buf.len() < total {
        reserve_toward(buf, total);
        return Ok(None);
    }
    buf.advance(PREFIX);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Smallest step [`reserve_toward`] grows a buffer by.
pub const MIN_GROWTH: usize = 64 * 1024;

/// Makes room toward a frame of `total` bytes in `buf`, never more than the
/// bytes already there (or [`MIN_GROWTH`]) at a time: a frame that arrives
/// is still read with amortised doubling (few copies), while the memory an
/// announced length can claim stays a fixed multiple of what the peer has
/// actually sent. Shared by every length-prefixed reader (ZEO frames,
/// replication stream messages).
pub fn reserve_toward(buf: &mut BytesMut, total: usize) {
    let missing = total.saturating_sub(buf.len());
    if buf.capacity() - buf.len() >= missing {
        return;
    }
    buf.reserve(missing.min(buf.len().max(MIN_GROWTH)));
}

/// Appends the length prefix and the payload.
///
/// # Panics
/// If `payload` is longer than `u32::MAX`, which ZEO cannot frame.
pub fn write_frame(out: &mut BytesMut, payload: &[u8]) {
    out.reserve(PREFIX + payload.len());
    out.extend_from_slice(&frame_len_prefix(payload.len()));
    out.extend_from_slice(payload);
}

/// The 4-byte prefix for a payload of `len` bytes.
///
/// # Panics
/// If `len > u32::MAX`.
pub fn frame_len_prefix(len: usize) -> [u8; 4] {
    let len = u32::try_from(len).expect("ZEO frames are limited to u32::MAX bytes");
    len.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_at_a_time() {
        let mut wire = BytesMut::new();
        write_frame(&mut wire, b"Z5");
        write_frame(&mut wire, b"");
        write_frame(&mut wire, &[7u8; 300]);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(frame) = parse_frame(&mut buf, 1000).expect("valid frames") {
                got.push(frame);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(&got[0][..], b"Z5");
        assert!(got[1].is_empty());
        assert_eq!(&got[2][..], &[7u8; 300][..]);
        assert!(buf.is_empty());
    }

    #[test]
    fn reserves_rest_of_body() {
        let mut buf = BytesMut::from(&[0u8, 0, 0x10, 0, 1, 2][..]);
        assert!(parse_frame(&mut buf, 1 << 20).expect("ok").is_none());
        assert!(buf.capacity() >= 4 + 0x1000);
        assert_eq!(buf.len(), 6, "nothing consumed");
    }

    /// A frame announcing 200 MB (under the limit) with 1 MiB arrived:
    /// the buffer grows with the bytes, not to the announced length.
    #[test]
    fn announced_length_is_not_reserved() {
        let announced = 200 << 20;
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&(announced as u32).to_be_bytes());
        assert!(parse_frame(&mut buf, 1 << 30).expect("ok").is_none());
        assert!(buf.capacity() <= 4 * MIN_GROWTH, "{}", buf.capacity());
        let chunk = vec![0x55u8; 16 * 1024];
        while buf.len() < (1 << 20) {
            buf.extend_from_slice(&chunk);
            assert!(parse_frame(&mut buf, 1 << 30).expect("ok").is_none());
            assert!(
                buf.capacity() <= 4 * buf.len() + 4 * MIN_GROWTH,
                "{} bytes held in {} reserved",
                buf.len(),
                buf.capacity()
            );
        }
        // The frame still completes, and whole.
        let len = buf.len();
        buf.resize(4 + announced, 7);
        let frame = parse_frame(&mut buf, 1 << 30).expect("ok").expect("frame");
        assert_eq!(frame.len(), announced);
        assert!(len > 1 << 20);
    }

    #[test]
    fn too_large_before_allocating() {
        let mut buf = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        let cap = buf.capacity();
        match parse_frame(&mut buf, 1 << 20) {
            Err(WireError::FrameTooLarge { len, max }) => {
                assert_eq!(len, 0xffff_ffff);
                assert_eq!(max, 1 << 20);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(buf.capacity(), cap);
    }

    #[test]
    fn exact_limit_is_accepted() {
        let mut buf = BytesMut::new();
        write_frame(&mut buf, &[1, 2, 3]);
        assert_eq!(
            parse_frame(&mut buf, 3).expect("ok").as_deref(),
            Some(&[1u8, 2, 3][..])
        );
    }

    #[test]
    fn prefix_matches_q4_handshake() {
        let mut out = BytesMut::new();
        write_frame(&mut out, b"M5");
        assert_eq!(&out[..], &[0, 0, 0, 2, 0x4d, 0x35]);
        assert_eq!(frame_len_prefix(0x1d), [0, 0, 0, 0x1d]);
    }
}
