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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::frame::MIN_GROWTH;
    use tokio::io::AsyncWriteExt;

    /// A peer announces a 200 MB message under a 1 GiB limit, sends 2 MiB
    /// in small pieces and goes away: the reader's buffer holds what came,
    /// in a fixed multiple of it, never the announced length.
    #[tokio::test]
    async fn announced_length_trickled_is_not_reserved() {
        let (mut peer, mut ours) = tokio::io::duplex(64 * 1024);
        let sender = tokio::spawn(async move {
            peer.write_all(&(200u32 << 20).to_be_bytes()).await.unwrap();
            let chunk = [0x91u8; 4096];
            for _ in 0..512 {
                peer.write_all(&chunk).await.unwrap();
            }
        });
        let mut buf = BytesMut::new();
        let r = read_msg(&mut ours, &mut buf, 1 << 30).await;
        sender.await.unwrap();
        assert!(
            matches!(r, Err(ReadError::Protocol(ProtocolError::Truncated(_)))),
            "{r:?}"
        );
        assert_eq!(buf.len(), 4 + (2 << 20));
        assert!(
            buf.capacity() <= 4 * buf.len() + 4 * MIN_GROWTH,
            "{} bytes held in {} reserved",
            buf.len(),
            buf.capacity()
        );
    }
}
