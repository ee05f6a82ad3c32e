//! The primary's side of `zrelay clone`: send the committed prefix of the
//! backend's `Data.fs` and the blob files of the copied transactions to a
//! client that opened the replication channel with a `CloneRequest`.
//!
//! The backend's files are only read (runzeo keeps running and committing):
//! the prefix ends at a committed transaction boundary found by
//! [`filestorage::committed_prefix`], and only blob files whose tid is at or
//! before that boundary's last tid are sent. Disk reads and hashing run on a
//! blocking thread that hands encoded frames to the connection's task over a
//! small bounded channel, so reading, hashing and TLS overlap and memory
//! stays bounded (a few chunks).

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{debug, info};

use crate::replication::filestorage::{self, FsError};
use crate::replication::protocol::{
    self, CloneFileKind, CloneRequest, RefuseReason, StreamMsg, PROTOCOL_VERSION,
};
use crate::replication::sender::SenderConfig;
use crate::replication::txn::{tid_hex, Tid};

/// Bytes per `CloneData` message.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Frames buffered between the reading thread and the connection.
const QUEUE_FRAMES: usize = 8;

/// Where the backend keeps its files (`[backend] data_fs` / `blob_dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSource {
    pub data_fs: PathBuf,
    pub blob_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum CloneServeError {
    #[error("refused clone: {0}")]
    Refused(String),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FsError },
    #[error("blob file {} vanished during the clone (a pack on the primary?); clone again", .0.display())]
    BlobVanished(PathBuf),
    #[error("stream: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("clone reader thread failed: {0}")]
    Thread(String),
}

/// What one served clone sent.
#[derive(Debug, Clone)]
pub struct CloneSummary {
    pub last_tid: Tid,
    pub files: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// Answers a `CloneRequest` on `wh` (the write half of the TLS stream),
/// then closes it.
pub async fn serve<W: AsyncWrite + Unpin>(
    wh: &mut W,
    req: &CloneRequest,
    source: Option<&CloneSource>,
    cfg: &SenderConfig,
) -> Result<CloneSummary, CloneServeError> {
    let refusal = if req.version != PROTOCOL_VERSION {
        Some((
            RefuseReason::VersionMismatch,
            format!(
                "clone client speaks protocol {}, this primary {PROTOCOL_VERSION}",
                req.version
            ),
        ))
    } else if req.cluster != cfg.cluster {
        Some((
            RefuseReason::WrongCluster,
            format!(
                "client is of cluster {:?}, this primary of {:?}",
                req.cluster, cfg.cluster
            ),
        ))
    } else if req.storage != cfg.storage {
        Some((
            RefuseReason::WrongStorage,
            format!(
                "client asks for storage {:?}, this primary serves {:?}",
                req.storage, cfg.storage
            ),
        ))
    } else if source.is_none() {
        Some((
            RefuseReason::CloneUnavailable,
            "this node has no [backend] data_fs to clone from".to_string(),
        ))
    } else {
        None
    };
    if let Some((reason, message)) = refusal {
        let mut buf = BytesMut::new();
        protocol::encode(
            &StreamMsg::Refuse {
                reason,
                message: message.clone(),
                primary_last_tid: None,
                rewind_to: None,
            },
            &mut buf,
        )?;
        wh.write_all(&buf).await?;
        let _ = wh.shutdown().await;
        return Err(CloneServeError::Refused(format!("{reason}: {message}")));
    }
    let source = source.expect("checked above").clone();
    let started = Instant::now();
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE_FRAMES);
    let node = cfg.primary_node.clone();
    let reader = tokio::task::spawn_blocking(move || produce(&source, &node, &tx));
    let mut wrote = Ok(());
    while let Some(frame) = rx.recv().await {
        if let Err(e) = wh.write_all(&frame).await {
            wrote = Err(e);
            break;
        }
    }
    // Dropping the receiver stops the reader at its next frame.
    drop(rx);
    let produced = reader
        .await
        .map_err(|e| CloneServeError::Thread(e.to_string()))?;
    wrote?;
    let (last_tid, files, bytes) = produced?;
    wh.flush().await?;
    let _ = wh.shutdown().await;
    Ok(CloneSummary {
        last_tid,
        files,
        bytes,
        elapsed: started.elapsed(),
    })
}

/// Runs on a blocking thread: finds the boundary, lists the blobs, and
/// sends every frame. Returns (last tid, files, bytes). A dropped receiver
/// (client gone) ends it early with `Ok` of what was sent so far; the
/// connection task reports its own write error.
fn produce(
    source: &CloneSource,
    node: &str,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(Tid, u64, u64), CloneServeError> {
    let path = &source.data_fs;
    let file_err = |source| CloneServeError::File {
        path: path.clone(),
        source,
    };
    let data_fs = File::open(path).map_err(file_err)?;
    let size = data_fs.metadata().map_err(file_err)?.len();
    let boundary = filestorage::committed_prefix(&data_fs, size).map_err(|source| {
        CloneServeError::Format {
            path: path.clone(),
            source,
        }
    })?;
    if let Some(stop) = boundary.stopped {
        debug!(
            ?stop,
            end = boundary.end,
            size,
            "Data.fs tail not committed; not copied"
        );
    }
    let blobs = match &source.blob_dir {
        Some(dir) => list_blobs(dir, &boundary.last_tid)?,
        None => Vec::new(),
    };
    let blob_bytes: u64 = blobs.iter().map(|b| b.size).sum();
    info!(
        last_tid = %tid_hex(&boundary.last_tid),
        data_fs_bytes = boundary.end,
        transactions = boundary.txns,
        blob_files = blobs.len(),
        blob_bytes,
        "serving a clone"
    );
    let mut out = Sender { tx, open: true };
    out.send(&StreamMsg::CloneBegin {
        version: PROTOCOL_VERSION,
        node: node.to_string(),
        last_tid: boundary.last_tid,
        data_fs_bytes: boundary.end,
        blob_files: blobs.len() as u64,
        blob_bytes,
    })?;
    let mut files = 1u64;
    let mut bytes = boundary.end;
    send_file(
        &mut out,
        &data_fs,
        CloneFileKind::DataFs,
        "Data.fs",
        boundary.end,
        path,
    )?;
    for b in &blobs {
        if !out.open {
            break;
        }
        let f = match File::open(&b.abs) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CloneServeError::BlobVanished(b.abs.clone()))
            }
            Err(source) => {
                return Err(CloneServeError::File {
                    path: b.abs.clone(),
                    source,
                })
            }
        };
        // Committed blob files never change; take the size of what is open.
        let len = f
            .metadata()
            .map_err(|source| CloneServeError::File {
                path: b.abs.clone(),
                source,
            })?
            .len();
        send_file(&mut out, &f, CloneFileKind::Blob, &b.rel, len, &b.abs)?;
        files += 1;
        bytes += len;
    }
    out.send(&StreamMsg::CloneEnd { files, bytes })?;
    Ok((boundary.last_tid, files, bytes))
}

struct Sender<'a> {
    tx: &'a mpsc::Sender<Bytes>,
    /// False once the connection task stopped listening.
    open: bool,
}

impl Sender<'_> {
    fn send(&mut self, msg: &StreamMsg) -> Result<(), CloneServeError> {
        if !self.open {
            return Ok(());
        }
        let mut buf = BytesMut::new();
        protocol::encode(msg, &mut buf)?;
        if self.tx.blocking_send(buf.freeze()).is_err() {
            self.open = false;
        }
        Ok(())
    }
}

/// `CloneFile`, the first `len` bytes of `f` in chunks, `CloneFileEnd`.
fn send_file(
    out: &mut Sender,
    f: &File,
    kind: CloneFileKind,
    rel: &str,
    len: u64,
    path: &Path,
) -> Result<(), CloneServeError> {
    out.send(&StreamMsg::CloneFile {
        kind,
        path: rel.to_string(),
        size: len,
    })?;
    let mut hash = Sha256::new();
    let mut pos = 0u64;
    while pos < len && out.open {
        let n = (len - pos).min(CHUNK_BYTES as u64) as usize;
        let mut chunk = vec![0u8; n];
        f.read_exact_at(&mut chunk, pos)
            .map_err(|source| CloneServeError::File {
                path: path.to_path_buf(),
                source,
            })?;
        hash.update(&chunk);
        out.send(&StreamMsg::CloneData {
            data: Bytes::from(chunk),
        })?;
        pos += n as u64;
    }
    out.send(&StreamMsg::CloneFileEnd {
        sha256: hash.finalize().into(),
    })
}

/// One file of the blob directory to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobEntry {
    /// Path relative to the blob directory, `/`-separated.
    pub rel: String,
    pub abs: PathBuf,
    pub size: u64,
}

/// The files of a blob directory that belong to a copy ending at
/// `last_tid`: the `.layout` marker and every `<tid>.blob` with tid ≤
/// `last_tid` (either layout: the tree is walked, not computed). The
/// top-level `tmp` directory (uncommitted uploads) and anything else is
/// skipped. Sorted by path.
pub fn list_blobs(dir: &Path, last_tid: &Tid) -> Result<Vec<BlobEntry>, CloneServeError> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CloneServeError::File { path, source }
    };
    while let Some((abs, rel)) = stack.pop() {
        let entries = match fs::read_dir(&abs) {
            Ok(e) => e,
            // A blob dir runzeo has not created yet holds no blobs.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel.is_empty() => return Ok(out),
            Err(e) => return Err(err(&abs)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(err(&abs))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let ft = entry.file_type().map_err(err(&entry.path()))?;
            if ft.is_dir() {
                if !(rel.is_empty() && name == "tmp") {
                    stack.push((entry.path(), child_rel));
                }
                continue;
            }
            if !ft.is_file() {
                continue;
            }
            let wanted = if rel.is_empty() && name == ".layout" {
                true
            } else {
                blob_file_tid(&name).is_some_and(|t| t <= *last_tid)
            };
            if wanted {
                let size = entry.metadata().map_err(err(&entry.path()))?.len();
                out.push(BlobEntry {
                    rel: child_rel,
                    abs: entry.path(),
                    size,
                });
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// The tid of a committed blob file name (`0x<hex>.blob`, leading zeros
/// stripped, as ZODB's `tid_repr` writes it).
pub fn blob_file_tid(name: &str) -> Option<Tid> {
    let hex = name.strip_suffix(".blob")?.strip_prefix("0x")?;
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(u64::to_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_names() {
        assert_eq!(
            blob_file_tid("0x3f6dd11b5555555.blob"),
            Some(0x03f6_dd11_b555_5555u64.to_be_bytes())
        );
        assert_eq!(blob_file_tid("0x00.blob"), Some([0; 8]));
        assert_eq!(blob_file_tid("0x1.tmp"), None);
        assert_eq!(blob_file_tid("0x.blob"), None);
        assert_eq!(blob_file_tid("0x11111111111111111.blob"), None);
        assert_eq!(blob_file_tid("zz.blob"), None);
    }

    #[test]
    fn blob_listing_filters_by_tid() {
        let d = tempfile::tempdir().unwrap();
        let oid = d.path().join("0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x01");
        fs::create_dir_all(&oid).unwrap();
        fs::create_dir_all(d.path().join("tmp")).unwrap();
        fs::write(d.path().join(".layout"), "bushy").unwrap();
        fs::write(oid.join("0x05.blob"), "old").unwrap();
        fs::write(oid.join("0x07.blob"), "at").unwrap();
        fs::write(oid.join("0x09.blob"), "newer, not committed in the copy").unwrap();
        fs::write(d.path().join("tmp/upload.tmp"), "x").unwrap();
        let got = list_blobs(d.path(), &7u64.to_be_bytes()).unwrap();
        let rels: Vec<&str> = got.iter().map(|b| b.rel.as_str()).collect();
        assert_eq!(
            rels,
            [
                ".layout",
                "0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x01/0x05.blob",
                "0x00/0x00/0x00/0x00/0x00/0x00/0x00/0x01/0x07.blob",
            ]
        );
        assert_eq!(got[1].size, 3);
        assert!(list_blobs(&d.path().join("absent"), &[0; 8])
            .unwrap()
            .is_empty());
    }
}
