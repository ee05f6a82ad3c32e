//! Raw TCP connections for handcrafted (and malformed) ZEO traffic,
//! and a minimal encoder of ZEO messages in both encodings.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use super::{Addr, Enc};

/// Largest frame the harness accepts from a server (zrelay's default limit).
const MAX_FRAME: usize = 256 << 20;

pub(crate) fn read_frame_from(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer announced a frame of {len} bytes"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some(payload))
}

pub fn framed(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame under 4 GiB");
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn is_closed_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// A raw TCP connection for handcrafted (and malformed) ZEO traffic.
pub struct Raw {
    stream: TcpStream,
    /// Every byte received so far.
    pub received: Vec<u8>,
}

impl Raw {
    pub fn connect(addr: &Addr) -> Raw {
        let Addr::Tcp(sa) = addr else {
            panic!("Raw needs a TCP address, got {addr}")
        };
        let stream = TcpStream::connect_timeout(sa, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_nodelay(true).expect("nodelay");
        Raw {
            stream,
            received: Vec::new(),
        }
    }

    /// Write bytes; an error here (the peer already closed) is returned,
    /// not a panic, since garbage tests expect the peer to hang up.
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    pub fn send_frame(&mut self, payload: &[u8]) -> io::Result<()> {
        self.send(&framed(payload))
    }

    /// Read one frame; `Ok(None)` on EOF (or reset) before its first byte.
    pub fn read_frame(&mut self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        self.stream.set_read_timeout(Some(timeout))?;
        let mut tee = Tee {
            inner: &mut self.stream,
            copy: &mut self.received,
        };
        match read_frame_from(&mut tee) {
            Err(e) if is_closed_error(&e) => Ok(None),
            other => other,
        }
    }

    /// Read a frame that must be there.
    pub fn expect_frame(&mut self, timeout: Duration) -> Vec<u8> {
        match self.read_frame(timeout) {
            Ok(Some(f)) => f,
            Ok(None) => panic!("connection closed while a frame was expected"),
            Err(e) => panic!("no frame within {timeout:?}: {e}"),
        }
    }

    /// Read the server's protocol offer and answer with `answer`.
    pub fn handshake(&mut self, answer: &[u8]) -> Vec<u8> {
        let offer = self.expect_frame(Duration::from_secs(10));
        self.send_frame(answer).expect("send handshake answer");
        offer
    }

    /// Send a sync call and return the first reply frame after it (async
    /// frames such as `info` are skipped). Panics on an error reply.
    pub fn call(&mut self, enc: Enc, msgid: i64, name: &str, args: &[Val]) -> Vec<u8> {
        self.send_frame(&encode_call(enc, msgid, false, name, args))
            .expect("send call");
        loop {
            let frame = self.expect_frame(Duration::from_secs(10));
            // Without a decoder: a reply names '.reply'; an error reply
            // names its exception class (…Error).
            if contains(&frame, b".reply") {
                assert!(
                    !contains(&frame, b"Error"),
                    "{name} got an error reply: {}",
                    String::from_utf8_lossy(&frame)
                );
                return frame;
            }
        }
    }

    /// Handshake with `enc` and `register('1', False)`; returns the reply.
    pub fn register(&mut self, enc: Enc) -> Vec<u8> {
        self.handshake(enc.protocol());
        self.call(enc, 1, "register", &[Val::Str("1"), Val::Bool(false)])
    }

    /// The peer must close the connection within `timeout` (EOF or reset).
    /// Returns what it sent before closing (any bytes since connect).
    pub fn assert_closed(&mut self, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "connection still open after {timeout:?}; received {} bytes: {:02x?}",
                self.received.len(),
                &self.received[..self.received.len().min(64)]
            );
            self.stream
                .set_read_timeout(Some(left))
                .expect("set timeout");
            match self.stream.read(&mut buf) {
                Ok(0) => return self.received.clone(),
                Ok(n) => self.received.extend_from_slice(&buf[..n]),
                Err(e) if is_closed_error(&e) => return self.received.clone(),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read failed: {e}"),
            }
        }
    }

    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

struct Tee<'a> {
    inner: &'a mut TcpStream,
    copy: &'a mut Vec<u8>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Send `bytes` to `addr` and collect what comes back until the peer
/// closes or `timeout` passes. Returns (bytes received, peer closed).
pub fn send_raw(addr: &Addr, bytes: &[u8], timeout: Duration) -> (Vec<u8>, bool) {
    let mut raw = Raw::connect(addr);
    let _ = raw.send(bytes);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (raw.received, false);
        }
        raw.stream
            .set_read_timeout(Some(left))
            .expect("set timeout");
        match raw.stream.read(&mut buf) {
            Ok(0) => return (raw.received, true),
            Ok(n) => raw.received.extend_from_slice(&buf[..n]),
            Err(e) if is_closed_error(&e) => return (raw.received, true),
            Err(_) => return (raw.received, false),
        }
    }
}

/// A value in a handcrafted ZEO message.
#[derive(Clone, Debug)]
pub enum Val<'a> {
    None,
    Bool(bool),
    Int(i64),
    Str(&'a str),
    Bytes(&'a [u8]),
    Tuple(Vec<Val<'a>>),
}

/// Encode `(msgid, async, name, args)` the way a ZEO client would.
pub fn encode_call(enc: Enc, msgid: i64, is_async: bool, name: &str, args: &[Val]) -> Vec<u8> {
    let msg = Val::Tuple(vec![
        Val::Int(msgid),
        Val::Bool(is_async),
        Val::Str(name),
        Val::Tuple(args.to_vec()),
    ]);
    match enc {
        Enc::Pickle => {
            let mut out = vec![0x80, 3];
            pickle(&msg, &mut out);
            out.push(b'.');
            out
        }
        Enc::Msgpack => {
            let mut out = Vec::new();
            msgpack(&msg, &mut out);
            out
        }
    }
}

/// Pickle protocol 3 without memo, as ZEO writes it.
fn pickle(v: &Val, out: &mut Vec<u8>) {
    match v {
        Val::None => out.push(b'N'),
        Val::Bool(b) => out.push(if *b { 0x88 } else { 0x89 }),
        Val::Int(i) if (0..256).contains(i) => out.extend([b'K', *i as u8]),
        Val::Int(i) => {
            let i = i32::try_from(*i).expect("int fits in BININT");
            out.push(b'J');
            out.extend(i.to_le_bytes());
        }
        Val::Str(s) => {
            out.push(b'X');
            out.extend(u32::try_from(s.len()).expect("short").to_le_bytes());
            out.extend(s.as_bytes());
        }
        Val::Bytes(b) => {
            out.push(b'B');
            out.extend(u32::try_from(b.len()).expect("short").to_le_bytes());
            out.extend(*b);
        }
        Val::Tuple(items) if items.is_empty() => out.push(b')'),
        Val::Tuple(items) => {
            out.push(b'(');
            for item in items {
                pickle(item, out);
            }
            out.push(b't');
        }
    }
}

fn msgpack(v: &Val, out: &mut Vec<u8>) {
    match v {
        Val::None => out.push(0xc0),
        Val::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        Val::Int(i) if (0..128).contains(i) => out.push(*i as u8),
        Val::Int(i) if (-32..0).contains(i) => out.push(*i as i8 as u8),
        Val::Int(i) => {
            out.push(0xd3);
            out.extend(i.to_be_bytes());
        }
        Val::Str(s) => {
            let n = s.len();
            if n < 32 {
                out.push(0xa0 | n as u8);
            } else {
                out.push(0xdb);
                out.extend(u32::try_from(n).expect("short").to_be_bytes());
            }
            out.extend(s.as_bytes());
        }
        Val::Bytes(b) => {
            out.push(0xc6);
            out.extend(u32::try_from(b.len()).expect("short").to_be_bytes());
            out.extend(*b);
        }
        Val::Tuple(items) => {
            let n = items.len();
            assert!(n < 16, "fixarray only");
            out.push(0x90 | n as u8);
            for item in items {
                msgpack(item, out);
            }
        }
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
