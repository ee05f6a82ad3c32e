//! The replica's relay log (spool): what makes a `Received` acknowledgement
//! durable (`ack_level = "received"` on a semi-sync primary).
//!
//! One append-only file, `<data_dir>/relay.log`. Each record is one stream
//! transaction: a 4-byte big-endian payload length, the SHA-256 of the
//! payload, then the payload (msgpack of the tid sent before it on the
//! stream and the [`Txn`]). A record is fsynced before its `Received` ack
//! is sent. After a restart the replica applies what the spool holds beyond
//! its backend's position before it asks the primary for more. A torn or
//! corrupt tail (a crash mid-append) is detected by its length or digest and
//! dropped: its transaction was never acknowledged. Bounded: the file is
//! emptied once everything in it is applied.
//!
//! Hand-written framing (length + digest): a few lines, and the reading side
//! must stop at the first bad record rather than fail, which general-purpose
//! log crates do not offer for this shape.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::replication::txn::{serde_bin, Tid, Txn};

const HEADER: usize = 4 + 32;
const SPOOL_BYTES: &str = "zrelay_replication_spool_bytes";

pub fn describe() {
    metrics::describe_gauge!(
        SPOOL_BYTES,
        metrics::Unit::Bytes,
        "Size of this replica's spool (relay log under data_dir)."
    );
}

fn report(len: u64) {
    metrics::gauge!(SPOOL_BYTES).set(len as f64);
}
const FILE_NAME: &str = "relay.log";

/// One spooled transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spooled {
    /// The tid sent just before it on the stream (a gap is detectable).
    #[serde(with = "serde_bin::array")]
    pub prev: Tid,
    pub txn: Txn,
}

/// Encodes one record (I/O-free).
pub fn encode_record(rec: &Spooled, out: &mut Vec<u8>) -> Result<(), String> {
    let payload = rmp_serde::to_vec_named(rec).map_err(|e| e.to_string())?;
    let len = u32::try_from(payload.len()).map_err(|_| "record too large".to_string())?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(())
}

/// What [`decode_records`] found.
#[derive(Debug, PartialEq)]
pub struct Decoded {
    pub records: Vec<Spooled>,
    /// Bytes of whole, valid records from the start.
    pub valid_len: usize,
    /// Bytes after them (a torn or corrupt tail), dropped.
    pub dropped: usize,
}

/// Reads records from the start until the end or the first torn/corrupt
/// one (I/O-free).
pub fn decode_records(buf: &[u8]) -> Decoded {
    let mut records = Vec::new();
    let mut at = 0;
    while buf.len() - at >= HEADER {
        let len = u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes")) as usize;
        let Some(end) = (at + HEADER).checked_add(len) else {
            break;
        };
        if end > buf.len() {
            break;
        }
        let payload = &buf[at + HEADER..end];
        if Sha256::digest(payload)[..] != buf[at + 4..at + HEADER] {
            break;
        }
        match rmp_serde::from_slice::<Spooled>(payload) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        at = end;
    }
    Decoded {
        records,
        valid_len: at,
        dropped: buf.len() - at,
    }
}

/// The spool file.
pub struct Spool {
    path: PathBuf,
    /// Shared with the blocking thread that fsyncs it.
    file: std::sync::Arc<File>,
    len: u64,
    /// The newest tid appended since the last clear.
    last: Option<Tid>,
    buf: Vec<u8>,
}

impl Spool {
    /// Opens (creating) the spool under `dir`, drops a torn tail, and
    /// returns what it holds, oldest first.
    pub fn open(dir: &Path) -> std::io::Result<(Spool, Decoded)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let decoded = decode_records(&bytes);
        if decoded.dropped > 0 {
            file.set_len(decoded.valid_len as u64)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        report(decoded.valid_len as u64);
        let last = decoded.records.last().map(|r| r.txn.tid);
        Ok((
            Spool {
                path,
                file: std::sync::Arc::new(file),
                len: decoded.valid_len as u64,
                last,
                buf: Vec::new(),
            },
            decoded,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The newest tid in the spool.
    pub fn last(&self) -> Option<Tid> {
        self.last
    }

    /// Everything in the spool is at or below `applied`.
    pub fn all_applied(&self, applied: Tid) -> bool {
        self.last.map_or(true, |l| l <= applied)
    }

    /// Appends one transaction (not yet durable: see [`Self::sync`]).
    pub fn append(&mut self, prev: Tid, txn: &Txn) -> std::io::Result<()> {
        self.buf.clear();
        let rec = Spooled {
            prev,
            txn: txn.clone(),
        };
        encode_record(&rec, &mut self.buf).map_err(std::io::Error::other)?;
        (&*self.file).write_all(&self.buf)?;
        self.len += self.buf.len() as u64;
        self.last = Some(txn.tid);
        report(self.len);
        Ok(())
    }

    /// Makes everything appended durable.
    pub fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// [`Self::sync`] on a blocking thread: the replica's runtime (often a
    /// single thread) keeps serving its client sessions meanwhile.
    pub async fn sync_off_thread(&mut self) -> std::io::Result<()> {
        let f = self.file.clone();
        tokio::task::spawn_blocking(move || f.sync_data())
            .await
            .map_err(std::io::Error::other)?
    }

    /// Empties the spool (everything in it is applied).
    pub fn clear(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        (&*self.file).seek(SeekFrom::Start(0))?;
        self.file.sync_all()?;
        self.len = 0;
        self.last = None;
        report(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn txn(n: u8) -> Txn {
        Txn {
            tid: [0, 0, 0, 0, 0, 0, 1, n],
            status: " ".into(),
            user: Bytes::from_static(b"u"),
            description: Bytes::from(vec![b'd'; n as usize]),
            extension: Bytes::new(),
            records: vec![],
        }
    }

    fn rec(n: u8) -> Spooled {
        Spooled {
            prev: if n == 1 { [0; 8] } else { txn(n - 1).tid },
            txn: txn(n),
        }
    }

    fn three() -> Vec<u8> {
        let mut out = Vec::new();
        for n in 1..=3 {
            encode_record(&rec(n), &mut out).unwrap();
        }
        out
    }

    #[test]
    fn round_trip() {
        let buf = three();
        let d = decode_records(&buf);
        assert_eq!(d.records, vec![rec(1), rec(2), rec(3)]);
        assert_eq!((d.valid_len, d.dropped), (buf.len(), 0));
        assert_eq!(decode_records(&[]).records, vec![]);
    }

    #[test]
    fn torn_tail_is_dropped_at_every_cut() {
        let buf = three();
        let mut two = Vec::new();
        encode_record(&rec(1), &mut two).unwrap();
        encode_record(&rec(2), &mut two).unwrap();
        for cut in two.len()..buf.len() {
            let d = decode_records(&buf[..cut]);
            assert_eq!(d.records, vec![rec(1), rec(2)], "cut at {cut}");
            assert_eq!(d.valid_len, two.len());
            assert_eq!(d.dropped, cut - two.len());
        }
    }

    #[test]
    fn corrupt_record_ends_the_log() {
        let mut buf = three();
        let mut one = Vec::new();
        encode_record(&rec(1), &mut one).unwrap();
        // A flipped byte in the second payload.
        let i = one.len() + HEADER + 3;
        buf[i] ^= 0xff;
        let d = decode_records(&buf);
        assert_eq!(d.records, vec![rec(1)]);
        assert_eq!(d.valid_len, one.len());
        // An absurd length.
        let mut buf = three();
        buf[one.len()..one.len() + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_records(&buf).records, vec![rec(1)]);
    }

    #[test]
    fn file_survives_reopen_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut s, d) = Spool::open(dir.path()).unwrap();
            assert!(d.records.is_empty() && s.is_empty());
            for n in 1..=3 {
                s.append(rec(n).prev, &txn(n)).unwrap();
            }
            s.sync().unwrap();
            assert_eq!(s.last(), Some(txn(3).tid));
        }
        // A crash mid-append: half a record at the end.
        let path = dir.path().join(FILE_NAME);
        let mut extra = Vec::new();
        encode_record(&rec(4), &mut extra).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&extra[..extra.len() / 2]).unwrap();
        drop(f);
        let (mut s, d) = Spool::open(dir.path()).unwrap();
        assert_eq!(d.records, vec![rec(1), rec(2), rec(3)]);
        assert!(d.dropped > 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), s.len());
        // Appends continue after the valid prefix.
        s.append(rec(4).prev, &txn(4)).unwrap();
        s.sync().unwrap();
        drop(s);
        let (mut s, d) = Spool::open(dir.path()).unwrap();
        assert_eq!(d.records.len(), 4);
        assert_eq!(d.dropped, 0);
        s.clear().unwrap();
        drop(s);
        let (_, d) = Spool::open(dir.path()).unwrap();
        assert!(d.records.is_empty());
    }
}
