//! `zrelay rewind --data-fs PATH --to TID`: the way back for a demoted old
//! primary that diverged (it committed transactions, in async mode, that
//! the new primary never received).
//!
//! FileStorage only appends, so the database as of TID is a prefix of
//! `Data.fs`: everything up to the end of the transaction TID. Rewind
//! (offline: it takes runzeo's `Data.fs.lock` and refuses while runzeo
//! holds it) copies the bytes after that boundary to
//! `Data.fs.rewound-<TID>` (fsynced), truncates `Data.fs` there (fsynced),
//! and moves the now stale `Data.fs.index` aside (runzeo rebuilds it).
//! The transactions cut are reported by tid. Started again, the node's
//! replica stream resumes after TID like any replica's.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::filestorage::{self, FsError};
use super::txn::{tid_hex, Tid};

#[derive(Debug, thiserror::Error)]
pub enum RewindError {
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("{path}: {err}")]
    Format { path: PathBuf, err: FsError },
}

/// What a rewind did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewound {
    /// The transactions cut, oldest first.
    pub cut: Vec<Tid>,
    /// Where the cut bytes were kept (None: nothing was cut).
    pub saved: Option<PathBuf>,
    pub new_size: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RewindError + '_ {
    move |err| RewindError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Parses a tid given as 16 hex digits.
pub fn parse_tid(s: &str) -> Result<Tid, String> {
    let s = s.trim();
    if s.len() != 16 {
        return Err(format!("{s:?}: a tid is 16 hex digits"));
    }
    u64::from_str_radix(s, 16)
        .map(u64::to_be_bytes)
        .map_err(|e| format!("{s:?}: {e}"))
}

/// Truncates `data_fs` after the transaction `to` (see the module doc).
pub fn rewind(data_fs: &Path, to: &Tid) -> Result<Rewound, RewindError> {
    let lock_path = filestorage::with_suffix(data_fs, ".lock");
    let Some(lock) = filestorage::try_lock(&lock_path).map_err(io(&lock_path))? else {
        return Err(RewindError::Refused(format!(
            "{} is locked: runzeo is using {}; stop it first",
            lock_path.display(),
            data_fs.display()
        )));
    };
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(data_fs)
        .map_err(io(data_fs))?;
    let size = f.metadata().map_err(io(data_fs))?.len();
    let format = |err| RewindError::Format {
        path: data_fs.to_path_buf(),
        err,
    };
    let b = filestorage::committed_prefix_upto(&f, size, to).map_err(format)?;
    if b.last_tid != *to {
        return Err(RewindError::Refused(format!(
            "{} has no transaction {} (the last one at or before it is {})",
            data_fs.display(),
            tid_hex(to),
            tid_hex(&b.last_tid)
        )));
    }
    let cut: Vec<Tid> = filestorage::txns_from(&f, b.end, size)
        .map_err(format)?
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    if b.end == size {
        return Ok(Rewound {
            cut,
            saved: None,
            new_size: size,
        });
    }
    let saved = filestorage::with_suffix(data_fs, &format!(".rewound-{}", tid_hex(to)));
    {
        let mut out = File::create(&saved).map_err(io(&saved))?;
        f.seek(SeekFrom::Start(b.end)).map_err(io(data_fs))?;
        let mut rest = (&mut f).take(size - b.end);
        std::io::copy(&mut rest, &mut out).map_err(io(&saved))?;
        out.flush().map_err(io(&saved))?;
        out.sync_all().map_err(io(&saved))?;
    }
    f.set_len(b.end).map_err(io(data_fs))?;
    f.sync_all().map_err(io(data_fs))?;
    let index = filestorage::with_suffix(data_fs, ".index");
    if index.exists() {
        let aside = filestorage::with_suffix(&saved, ".index");
        fs::rename(&index, &aside).map_err(io(&index))?;
    }
    if let Some(dir) = data_fs.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    drop(lock);
    Ok(Rewound {
        cut,
        saved: Some(saved),
        new_size: b.end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn txn(tid: u64, n: usize) -> Vec<u8> {
        let tlen = filestorage::TXN_HEADER_LEN + n as u64;
        let mut v = Vec::new();
        v.extend(tid.to_be_bytes());
        v.extend(tlen.to_be_bytes());
        v.push(b' ');
        v.extend([0u8; 6]);
        v.extend(vec![0xab; n]);
        v.extend(tlen.to_be_bytes());
        v
    }

    #[test]
    fn cuts_after_the_tid_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Data.fs");
        let mut body = b"FS30".to_vec();
        body.extend(txn(10, 5));
        let keep = body.len() as u64;
        let tail: Vec<u8> = [txn(20, 7), txn(30, 1)].concat();
        body.extend(&tail);
        fs::write(&path, &body).unwrap();
        fs::write(filestorage::with_suffix(&path, ".index"), b"stale").unwrap();
        let r = rewind(&path, &10u64.to_be_bytes()).unwrap();
        assert_eq!(r.cut, vec![20u64.to_be_bytes(), 30u64.to_be_bytes()]);
        assert_eq!(r.new_size, keep);
        assert_eq!(fs::metadata(&path).unwrap().len(), keep);
        assert_eq!(fs::read(r.saved.as_ref().unwrap()).unwrap(), tail);
        assert!(!filestorage::with_suffix(&path, ".index").exists());
        // Again: nothing more to cut.
        let r = rewind(&path, &10u64.to_be_bytes()).unwrap();
        assert!(r.cut.is_empty() && r.saved.is_none());
        // A tid the file does not hold is refused.
        let e = rewind(&path, &15u64.to_be_bytes()).unwrap_err();
        assert!(e.to_string().contains("no transaction"), "{e}");
    }

    #[test]
    fn refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Data.fs");
        let mut body = b"FS30".to_vec();
        body.extend(txn(10, 5));
        fs::write(&path, &body).unwrap();
        let _held = filestorage::try_lock(&filestorage::with_suffix(&path, ".lock"))
            .unwrap()
            .expect("nobody else holds it");
        let e = rewind(&path, &10u64.to_be_bytes()).unwrap_err();
        assert!(e.to_string().contains("locked"), "{e}");
    }

    #[test]
    fn tids_parse() {
        assert_eq!(parse_tid("000000000000000a"), Ok(10u64.to_be_bytes()));
        assert!(parse_tid("xyz").is_err());
    }
}
