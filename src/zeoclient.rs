//! A minimal ZEO client for the proxy's own backend connections (the commit
//! observer, history readers, the replica applier, `zrelay verify`).
//!
//! One owner, no background task: calls are queued into a write buffer,
//! flushed together (pipelining), and replies are read in order. Async
//! messages from the server that arrive while waiting (invalidations, blob
//! chunks) are queued in `pending_async` for the caller to take.
//!
//! These connections always answer the handshake with pickle (`Z5`): the
//! server adopts the client's choice, and pickle keeps tuple/list and
//! bytes/str distinctions that the extension dicts of transactions need.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::BackendAddr;
use crate::relay::backend::{self, BoxRead, BoxWrite};
use crate::wire::{frame, Encoding, Flag, Message, Value, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ZeoError {
    #[error(transparent)]
    Connect(#[from] backend::ConnectError),
    #[error("backend i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("backend closed the connection")]
    Closed,
    #[error("backend protocol: {0}")]
    Wire(#[from] WireError),
    #[error("backend protocol: {0}")]
    Protocol(String),
    #[error("backend raised {class}: {args:?}")]
    Remote { class: String, args: Value },
    #[error("backend did not answer within {0:?}")]
    Timeout(Duration),
}

impl ZeoError {
    /// The exception class name of a remote error, if this is one.
    pub fn remote_class(&self) -> Option<&str> {
        match self {
            ZeoError::Remote { class, .. } => Some(class),
            _ => None,
        }
    }
}

pub struct ZeoConn {
    r: BoxRead,
    w: BoxWrite,
    rbuf: BytesMut,
    wbuf: BytesMut,
    enc: Encoding,
    next_id: i64,
    max: usize,
    call_timeout: Duration,
    /// Server async messages received while waiting for a reply.
    pub pending_async: VecDeque<Message>,
    /// Replies that arrived for a msgid other than the one awaited.
    early_replies: VecDeque<Message>,
    /// The server numbers iterators per connection from 0, one number per
    /// `iterator_start` and `iterator_record_start`. Knowing the next one
    /// lets history reads be pipelined; every reply is checked against it.
    pub next_iterator_id: i64,
    /// Counted among zrelay's own registered connections while held.
    _registration: Option<crate::own_conns::Registration>,
}

impl ZeoConn {
    /// Connects, answers the handshake with `Z5`, and registers `storage`.
    /// Returns the connection and the storage's last tid.
    pub async fn open(
        addr: &BackendAddr,
        storage: &str,
        read_only: bool,
        connect_timeout: Duration,
        call_timeout: Duration,
        max_message_bytes: usize,
    ) -> Result<(ZeoConn, Bytes), ZeoError> {
        let (r, w) = backend::connect(addr, connect_timeout).await?;
        let mut c = ZeoConn {
            r,
            w,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            enc: Encoding::Pickle,
            next_id: 1,
            max: max_message_bytes,
            call_timeout,
            pending_async: VecDeque::new(),
            early_replies: VecDeque::new(),
            next_iterator_id: 0,
            _registration: None,
        };
        let offer = tokio::time::timeout(connect_timeout, c.read_frame())
            .await
            .map_err(|_| ZeoError::Timeout(connect_timeout))??;
        if Encoding::from_handshake(&offer).is_none() {
            return Err(ZeoError::Protocol(format!(
                "unexpected handshake {:?}",
                String::from_utf8_lossy(&offer[..offer.len().min(16)])
            )));
        }
        frame::write_frame(&mut c.wbuf, c.enc.handshake());
        let last = c
            .call(
                "register",
                vec![Value::Str(storage.to_string()), Value::Bool(read_only)],
            )
            .await?;
        let last = last
            .as_bytes()
            .map(Bytes::copy_from_slice)
            .ok_or_else(|| ZeoError::Protocol("register reply is not a tid".into()))?;
        c._registration = Some(crate::own_conns::Registration::new(storage));
        Ok((c, last))
    }

    /// Queues a sync call; returns its msgid.
    pub fn queue_call(&mut self, method: &str, args: Vec<Value>) -> Result<Value, ZeoError> {
        let msgid = Value::Int(self.next_id);
        self.next_id += 1;
        let msg = Message::call(msgid.clone(), method, args);
        let payload = msg.encode(self.enc)?;
        frame::write_frame(&mut self.wbuf, &payload);
        Ok(msgid)
    }

    /// Queues an async call (no reply; errors close the connection server-side).
    pub fn queue_async(&mut self, method: &str, args: Vec<Value>) -> Result<(), ZeoError> {
        let payload = Message::async_call(method, args).encode(self.enc)?;
        frame::write_frame(&mut self.wbuf, &payload);
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ZeoError> {
        if !self.wbuf.is_empty() {
            self.w.write_all(&self.wbuf).await?;
            // Over TLS ([backend.tls]) the last records may still sit in
            // the TLS session after write_all; flush sends them.
            self.w.flush().await?;
            self.wbuf.clear();
        }
        Ok(())
    }

    /// One sync call: queue, flush everything queued, wait for its reply.
    pub async fn call(&mut self, method: &str, args: Vec<Value>) -> Result<Value, ZeoError> {
        let id = self.queue_call(method, args)?;
        self.flush().await?;
        self.wait_reply(&id).await
    }

    /// Waits for the reply to `msgid`, queueing async messages and replies
    /// to other msgids that arrive first.
    pub async fn wait_reply(&mut self, msgid: &Value) -> Result<Value, ZeoError> {
        if let Some(i) = self.early_replies.iter().position(|m| &m.msgid == msgid) {
            let m = self.early_replies.remove(i).expect("index from position");
            return reply_value(m);
        }
        let timeout = self.call_timeout;
        let fut = async {
            loop {
                let msg = self.read_message().await?;
                if msg.is_reply() {
                    if &msg.msgid == msgid {
                        return reply_value(msg);
                    }
                    self.early_replies.push_back(msg);
                } else {
                    self.pending_async.push_back(msg);
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ZeoError::Timeout(timeout))?
    }

    /// Reads the next message of any kind (for observers). Cancel-safe: the
    /// read buffer lives in the struct.
    pub async fn read_message(&mut self) -> Result<Message, ZeoError> {
        let payload = self.read_frame().await?;
        Ok(Message::decode(self.enc, &payload)?)
    }

    async fn read_frame(&mut self) -> Result<Bytes, ZeoError> {
        loop {
            if let Some(f) = frame::parse_frame(&mut self.rbuf, self.max)? {
                return Ok(f);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 16 * 1024 {
                self.rbuf.reserve(64 * 1024);
            }
            if self.r.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ZeoError::Closed);
            }
        }
    }
}

fn reply_value(msg: Message) -> Result<Value, ZeoError> {
    if msg.flag == Flag::Error {
        let (class, args) = match &*msg.args {
            Value::Tuple(v) | Value::List(v) if v.len() == 2 => {
                (v[0].as_str().unwrap_or("?").to_string(), v[1].clone())
            }
            other => ("?".to_string(), other.clone()),
        };
        return Err(ZeoError::Remote { class, args });
    }
    Ok(msg.args.into_value())
}
