//! Reading stream messages from a connection: the one read loop both ends
//! use. The buffer lives with the caller, so a cancelled read loses nothing.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::replication::protocol::{self, ProtocolError, StreamMsg};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("stream: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the stream")]
    Closed,
}

/// The next message; EOF between messages is `Closed`, inside one an error.
pub async fn read_msg<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<StreamMsg, ReadError> {
    loop {
        if let Some(m) = protocol::decode(buf, max)? {
            return Ok(m);
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(64 * 1024);
        }
        if r.read_buf(buf).await? == 0 {
            protocol::check_eof(buf)?;
            return Err(ReadError::Closed);
        }
    }
}

/// Whether `buf` already holds one complete message frame.
pub fn has_frame(buf: &BytesMut) -> bool {
    buf.len() >= 4 && buf.len() >= 4 + u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
}
