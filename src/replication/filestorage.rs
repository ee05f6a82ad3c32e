//! Just enough of ZODB's FileStorage layout (`Data.fs`) to find the end of
//! its committed prefix, the part `zrelay clone` may copy while runzeo keeps
//! appending.
//!
//! Layout (ZODB `FileStorage/format.py`): a 4-byte magic (`FS30` as written
//! by ZODB on Python 3, `FS21` by Python 2; same layout), then transaction
//! records back to back. Each starts with a 23-byte header — tid (8),
//! `tlen` (8, big-endian: the record's length minus the trailing 8 bytes),
//! status (1), then the lengths of user, description and extension (2 each)
//! — and ends with `tlen` repeated in 8 bytes. Status `' '`, `'p'` (packed)
//! and `'u'` are committed; `'c'` is a checkpoint: written by `tpc_vote`,
//! flipped to `' '` by `tpc_finish` only after the whole record (and its
//! trailer) is in the file, or truncated away by an abort.
//!
//! FileStorage only appends (a pack writes a new file and renames it over
//! the old one, so an open descriptor keeps a stable old file), so the
//! bytes of a committed record never change. The scan stops at the first
//! record that is not provably committed: one cut by the end of the file, a
//! checkpoint, or one whose trailer does not repeat its length (a tail that
//! a concurrent commit is still writing). Everything before that point is a
//! consistent copy of the database as of its last tid.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::txn::{tid_hex, Tid, Z64};

/// The file's first 4 bytes (ZODB `_compat.FILESTORAGE_MAGIC`): Python 3
/// ZODB writes `FS30`, Python 2 wrote `FS21`.
pub const MAGICS: [&[u8; 4]; 2] = [b"FS30", b"FS21"];
/// Length of a transaction header (`TRANS_HDR = ">8sQcHHH"`).
pub const TXN_HEADER_LEN: u64 = 23;

/// The committed prefix of a `Data.fs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Boundary {
    /// Length of the prefix: the offset just after the last committed
    /// transaction (4 for a storage without transactions).
    pub end: u64,
    /// Tid of the last committed transaction ([`Z64`] if none).
    pub last_tid: Tid,
    /// Number of committed transactions in the prefix.
    pub txns: u64,
    /// Why the scan stopped before `size` (None: the prefix is the whole
    /// file).
    pub stopped: Option<Stop>,
}

/// Why the committed prefix ends before the end of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Fewer than a header's bytes, or a record running past the end.
    Truncated,
    /// Status `'c'`: voted, not finished (or being aborted).
    Checkpoint,
    /// The trailing length does not repeat the header's.
    TrailerMismatch,
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("not a FileStorage file (no FS30/FS21 magic)")]
    BadMagic,
    #[error("corrupt transaction header at offset {pos}: {problem}")]
    Corrupt { pos: u64, problem: String },
    #[error("read Data.fs: {0}")]
    Io(#[from] io::Error),
}

/// Something that can read at an offset (a file; a byte slice in tests).
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = self
            .get(start..start + buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// `Data.fs` with a suffix: `Data.fs.lock`, `Data.fs.index`, ...
pub fn with_suffix(data_fs: &Path, suffix: &str) -> PathBuf {
    let mut s = data_fs.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

/// Takes runzeo's lock on a FileStorage (`Data.fs.lock`, an exclusive
/// `flock` as ZODB's own lock file takes) without waiting: `Some(file)`
/// holds it until the file is dropped, `None` means another process (a
/// running runzeo) holds it.
pub fn try_lock(lock_path: &Path) -> io::Result<Option<File>> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(lock_path)?;
    // libc, not `File::try_lock`: that is newer than the crate's MSRV.
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(e)
}

/// Scans the transaction headers of the first `size` bytes of `f` and
/// returns the committed prefix. Only headers and trailers are read (two
/// small reads per transaction), never the records.
pub fn committed_prefix<R: ReadAt + ?Sized>(f: &R, size: u64) -> Result<Boundary, FsError> {
    scan(f, size, None)
}

/// [`committed_prefix`], ending after the transaction `upto` at the latest
/// (the prefix `zrelay rewind` keeps): the scan stops before the first
/// transaction whose tid is greater.
pub fn committed_prefix_upto<R: ReadAt + ?Sized>(
    f: &R,
    size: u64,
    upto: &Tid,
) -> Result<Boundary, FsError> {
    scan(f, size, Some(upto))
}

/// Each committed transaction after offset `from` (a transaction boundary),
/// as (tid, offset), up to `size`; for reports of what a rewind cuts.
pub fn txns_from<R: ReadAt + ?Sized>(
    f: &R,
    from: u64,
    size: u64,
) -> Result<Vec<(Tid, u64)>, FsError> {
    let mut out = Vec::new();
    let mut pos = from;
    let mut h = [0u8; TXN_HEADER_LEN as usize];
    while size.saturating_sub(pos) >= TXN_HEADER_LEN {
        f.read_exact_at(&mut h, pos)?;
        let tid: Tid = h[0..8].try_into().expect("8 bytes");
        let tlen = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        if h[16] == b'c' {
            break;
        }
        out.push((tid, pos));
        match tlen.checked_add(8).and_then(|l| pos.checked_add(l)) {
            Some(next) if next <= size => pos = next,
            _ => break,
        }
    }
    Ok(out)
}

fn scan<R: ReadAt + ?Sized>(f: &R, size: u64, upto: Option<&Tid>) -> Result<Boundary, FsError> {
    let mut magic = [0u8; 4];
    if size < 4 {
        return Err(FsError::BadMagic);
    }
    f.read_exact_at(&mut magic, 0)?;
    if !MAGICS.contains(&&magic) {
        return Err(FsError::BadMagic);
    }
    let mut b = Boundary {
        end: 4,
        last_tid: Z64,
        txns: 0,
        stopped: None,
    };
    let mut pos = 4u64;
    let mut h = [0u8; TXN_HEADER_LEN as usize];
    while pos < size {
        if size - pos < TXN_HEADER_LEN {
            b.stopped = Some(Stop::Truncated);
            break;
        }
        f.read_exact_at(&mut h, pos)?;
        let tid: Tid = h[0..8].try_into().expect("8 bytes");
        if upto.is_some_and(|u| tid > *u) {
            break;
        }
        let tlen = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        let status = h[16];
        let lens: u64 = [17, 19, 21]
            .iter()
            .map(|&i| u64::from(u16::from_be_bytes([h[i], h[i + 1]])))
            .sum();
        if status == b'c' {
            b.stopped = Some(Stop::Checkpoint);
            break;
        }
        let Some(next) = tlen.checked_add(8).and_then(|l| pos.checked_add(l)) else {
            return Err(corrupt(pos, format!("length {tlen} overflows")));
        };
        if next > size {
            b.stopped = Some(Stop::Truncated);
            break;
        }
        let mut trailer = [0u8; 8];
        f.read_exact_at(&mut trailer, pos + tlen)?;
        if u64::from_be_bytes(trailer) != tlen {
            b.stopped = Some(Stop::TrailerMismatch);
            break;
        }
        // From here the record is complete: anything odd is corruption, not
        // a tail in progress.
        if tlen < TXN_HEADER_LEN + lens {
            return Err(corrupt(
                pos,
                format!("length {tlen} shorter than its header and metadata"),
            ));
        }
        if !matches!(status, b' ' | b'p' | b'u') {
            return Err(corrupt(pos, format!("status byte {status:#04x}")));
        }
        if tid <= b.last_tid {
            return Err(corrupt(
                pos,
                format!(
                    "tid {} not after the previous {}",
                    tid_hex(&tid),
                    tid_hex(&b.last_tid)
                ),
            ));
        }
        b.last_tid = tid;
        b.txns += 1;
        pos = next;
        b.end = pos;
    }
    Ok(b)
}

fn corrupt(pos: u64, problem: String) -> FsError {
    FsError::Corrupt { pos, problem }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One transaction record with `n` bytes standing in for data records.
    fn txn(tid: u64, status: u8, n: usize) -> Vec<u8> {
        let (user, desc, ext) = (b"u".as_slice(), b"desc".as_slice(), b"".as_slice());
        let tlen = TXN_HEADER_LEN + (user.len() + desc.len() + ext.len() + n) as u64;
        let mut v = Vec::new();
        v.extend(tid.to_be_bytes());
        v.extend(tlen.to_be_bytes());
        v.push(status);
        for l in [user.len(), desc.len(), ext.len()] {
            v.extend((l as u16).to_be_bytes());
        }
        v.extend(user);
        v.extend(desc);
        v.extend(ext);
        v.extend(vec![0xab; n]);
        v.extend(tlen.to_be_bytes());
        v
    }

    fn file(txns: &[Vec<u8>]) -> Vec<u8> {
        let mut f = b"FS30".to_vec();
        for t in txns {
            f.extend(t);
        }
        f
    }

    fn scan(f: &[u8]) -> Result<Boundary, FsError> {
        committed_prefix(f, f.len() as u64)
    }

    #[test]
    fn whole_file_committed() {
        let f = file(&[txn(5, b' ', 10), txn(6, b'p', 0), txn(9, b'u', 300)]);
        let b = scan(&f).unwrap();
        assert_eq!(b.end, f.len() as u64);
        assert_eq!(b.last_tid, 9u64.to_be_bytes());
        assert_eq!(b.txns, 3);
        assert_eq!(b.stopped, None);
    }

    #[test]
    fn empty_storage() {
        for magic in MAGICS {
            let b = scan(magic).unwrap();
            assert_eq!((b.end, b.last_tid, b.txns), (4, Z64, 0));
        }
        assert!(matches!(scan(b"FS2"), Err(FsError::BadMagic)));
        assert!(matches!(scan(b"FS40xxxx"), Err(FsError::BadMagic)));
    }

    #[test]
    fn checkpoint_tail_is_not_copied() {
        let done = file(&[txn(5, b' ', 10)]);
        let f = file(&[txn(5, b' ', 10), txn(6, b'c', 10)]);
        let b = scan(&f).unwrap();
        assert_eq!(b.end, done.len() as u64);
        assert_eq!(b.last_tid, 5u64.to_be_bytes());
        assert_eq!(b.stopped, Some(Stop::Checkpoint));
    }

    #[test]
    fn every_cut_of_the_tail_stops_at_the_last_whole_record() {
        let f = file(&[txn(5, b' ', 10), txn(7, b' ', 40)]);
        let first = file(&[txn(5, b' ', 10)]).len();
        for cut in first..f.len() {
            let b = committed_prefix(&f[..], cut as u64).unwrap();
            assert_eq!(b.end, first as u64, "cut at {cut}");
            assert_eq!(b.last_tid, 5u64.to_be_bytes());
            assert_eq!(
                b.stopped,
                (cut > first).then_some(Stop::Truncated),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn trailer_still_being_written_is_not_trusted() {
        let mut f = file(&[txn(5, b' ', 10), txn(7, b' ', 40)]);
        let n = f.len();
        f[n - 1] ^= 0xff;
        let b = scan(&f).unwrap();
        assert_eq!(b.last_tid, 5u64.to_be_bytes());
        assert_eq!(b.stopped, Some(Stop::TrailerMismatch));
    }

    #[test]
    fn corruption_in_a_complete_record_is_an_error() {
        // Tids going backwards.
        let f = file(&[txn(7, b' ', 1), txn(5, b' ', 1)]);
        assert!(matches!(scan(&f), Err(FsError::Corrupt { .. })));
        // An unknown status byte.
        let f = file(&[txn(7, b'x', 1)]);
        assert!(matches!(scan(&f), Err(FsError::Corrupt { pos: 4, .. })));
        // A length that overflows.
        let mut f = file(&[txn(7, b' ', 1)]);
        f[12..20].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(scan(&f), Err(FsError::Corrupt { .. })));
    }
}
