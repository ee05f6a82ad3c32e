//! `zrelay clone`: make a new replica's `Data.fs` and blob directory at disk
//! speed, from the primary (over the replication channel, see
//! [`crate::replication::clone_serve`]) or from a backup file (`--from-file`), while the
//! local runzeo is stopped. Then runzeo and the replica zrelay start on the
//! copy and stream from its last tid.
//!
//! Crash safety: everything is written under temporary names next to the
//! targets (`Data.fs.clone-partial`, `<blob_dir>.clone-partial`), verified
//! (size, the sender's sha256 per file, and the copy's own transaction
//! headers: the whole file is committed and ends at the announced last
//! tid), synced, and only then renamed into place — the blob directory
//! first, `Data.fs` last. An interrupted clone leaves no `Data.fs` behind
//! (a runzeo started there would begin an empty storage, which the replica
//! would fill from the stream, never a truncated copy taken for complete);
//! the next clone removes the leftovers. While it runs, the clone holds the
//! lock runzeo takes on `Data.fs.lock`, so neither can start on the other's
//! files.

use std::fs::{self, File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::replication::clone_serve::{list_blobs, CloneServeError, CHUNK_BYTES};
use crate::replication::filestorage::{self, FsError};
use crate::replication::protocol::{
    self, CloneFileKind, CloneRequest, StreamMsg, PROTOCOL_VERSION,
};
use crate::replication::stream_io::{read_msg, ReadError};
use crate::replication::tls::{self, TlsError, TlsFiles};
use crate::replication::txn::{tid_hex, Tid};

/// Where the copy goes (the local runzeo's `<filestorage>` paths).
#[derive(Debug, Clone)]
pub struct CloneTarget {
    pub data_fs: PathBuf,
    pub blob_dir: Option<PathBuf>,
    /// Replace an existing `Data.fs` / blob directory.
    pub force: bool,
    /// Draw a progress bar (only if stderr is a terminal).
    pub progress: bool,
}

/// How to reach the primary.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub address: String,
    /// Node name the primary's certificate must carry.
    pub server_name: String,
    pub tls: TlsFiles,
    pub cluster: String,
    pub storage: String,
    /// This node's name (sent in the request, for the primary's logs).
    pub node: String,
    pub connect_timeout: Duration,
    pub max_message_bytes: usize,
}

/// What a clone copied.
#[derive(Debug, Clone)]
pub struct CloneReport {
    pub last_tid: Tid,
    pub data_fs_bytes: u64,
    pub transactions: u64,
    pub blob_files: u64,
    pub blob_bytes: u64,
    pub elapsed: Duration,
}

impl CloneReport {
    pub fn bytes(&self) -> u64 {
        self.data_fs_bytes + self.blob_bytes
    }

    /// One line of `key=value` words (for people and scripts).
    pub fn summary(&self) -> String {
        let secs = self.elapsed.as_secs_f64().max(1e-6);
        format!(
            "cloned last_tid={} transactions={} data_fs_bytes={} blob_files={} blob_bytes={} seconds={:.3} mb_per_second={:.1}",
            tid_hex(&self.last_tid),
            self.transactions,
            self.data_fs_bytes,
            self.blob_files,
            self.blob_bytes,
            secs,
            self.bytes() as f64 / secs / 1e6
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("{0}")]
    Target(String),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Format { path: PathBuf, source: FsError },
    #[error("connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("replication TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("the primary refused the clone: {0}")]
    Refused(String),
    #[error("stream: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error("the primary broke the clone conversation: {0}")]
    Conversation(String),
    #[error("stream i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the primary closed the connection before the clone was complete")]
    Incomplete,
    #[error("verification failed: {0}")]
    Verify(String),
    #[error("{0}")]
    Source(#[from] CloneServeError),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> CloneError + '_ {
    move |source| CloneError::File {
        path: path.to_path_buf(),
        source,
    }
}

fn partial_name(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_os_string();
    s.push(".clone-partial");
    PathBuf::from(s)
}

/// The temporary files of one clone, and the lock on the target.
struct Staging {
    target: CloneTarget,
    tmp_data_fs: PathBuf,
    tmp_blob_dir: Option<PathBuf>,
    /// Held until the copy is installed (runzeo takes the same flock).
    _lock: File,
    data_fs: Option<StagedFile>,
    data_fs_done: bool,
}

impl Staging {
    fn prepare(target: &CloneTarget) -> Result<Staging, CloneError> {
        let data_fs = &target.data_fs;
        if let Some(dir) = data_fs.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(file_err(dir))?;
        }
        let lock_path = filestorage::with_suffix(data_fs, ".lock");
        let Some(lock) = filestorage::try_lock(&lock_path).map_err(file_err(&lock_path))? else {
            return Err(CloneError::Target(format!(
                "{} is locked: a runzeo (or another clone) is using {}; stop it first",
                lock_path.display(),
                data_fs.display()
            )));
        };
        if data_fs.exists() && !target.force {
            return Err(CloneError::Target(format!(
                "{} exists; pass --force to replace it",
                data_fs.display()
            )));
        }
        if let Some(b) = &target.blob_dir {
            let used = fs::read_dir(b).is_ok_and(|mut d| d.next().is_some());
            if used && !target.force {
                return Err(CloneError::Target(format!(
                    "blob directory {} is not empty; pass --force to replace it",
                    b.display()
                )));
            }
        }
        let tmp_data_fs = partial_name(data_fs);
        let tmp_blob_dir = target.blob_dir.as_deref().map(partial_name);
        // Leftovers of an interrupted clone.
        remove_if_present(&tmp_data_fs)?;
        if let Some(t) = &tmp_blob_dir {
            remove_if_present(t)?;
            fs::create_dir_all(t).map_err(file_err(t))?;
        }
        Ok(Staging {
            target: target.clone(),
            tmp_data_fs,
            tmp_blob_dir,
            _lock: lock,
            data_fs: None,
            data_fs_done: false,
        })
    }

    fn open_data_fs(&mut self, size: u64) -> Result<StagedFile, CloneError> {
        if self.data_fs_done || self.data_fs.is_some() {
            return Err(CloneError::Conversation("Data.fs sent twice".into()));
        }
        StagedFile::create(&self.tmp_data_fs, size)
    }

    fn open_blob(&mut self, rel: &str, size: u64) -> Result<StagedFile, CloneError> {
        let Some(dir) = &self.tmp_blob_dir else {
            return Err(CloneError::Target(
                "the primary sends blob files: give this node a blob directory (--blob-dir or [backend] blob_dir)".into(),
            ));
        };
        let relp = Path::new(rel);
        let clean = !rel.is_empty() && relp.components().all(|c| matches!(c, Component::Normal(_)));
        if !clean {
            return Err(CloneError::Conversation(format!(
                "blob path {rel:?} is not a plain relative path"
            )));
        }
        let path = dir.join(relp);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(file_err(parent))?;
        }
        StagedFile::create(&path, size)
    }

    /// Verifies the staged `Data.fs` and renames everything into place.
    fn install(self, last_tid: &Tid, size: u64) -> Result<u64, CloneError> {
        let path = &self.tmp_data_fs;
        let f = File::open(path).map_err(file_err(path))?;
        let len = f.metadata().map_err(file_err(path))?.len();
        if len != size {
            return Err(CloneError::Verify(format!(
                "Data.fs copy has {len} bytes, expected {size}"
            )));
        }
        let b = filestorage::committed_prefix(&f, len).map_err(|source| CloneError::Format {
            path: path.clone(),
            source,
        })?;
        if b.end != len || b.stopped.is_some() {
            return Err(CloneError::Verify(format!(
                "Data.fs copy is committed only up to byte {} of {len} ({:?})",
                b.end, b.stopped
            )));
        }
        if b.last_tid != *last_tid {
            return Err(CloneError::Verify(format!(
                "Data.fs copy ends at tid {}, expected {}",
                tid_hex(&b.last_tid),
                tid_hex(last_tid)
            )));
        }
        let data_fs = &self.target.data_fs;
        if self.target.force {
            // An index of the replaced file would describe the wrong file.
            for suffix in [".index", ".tmp"] {
                remove_if_present(&filestorage::with_suffix(data_fs, suffix))?;
            }
        }
        if let (Some(tmp), Some(dir)) = (&self.tmp_blob_dir, &self.target.blob_dir) {
            sync_dir(tmp)?;
            remove_if_present(dir)?;
            fs::rename(tmp, dir).map_err(file_err(dir))?;
        }
        // Last: from here runzeo finds a complete Data.fs.
        fs::rename(path, data_fs).map_err(file_err(data_fs))?;
        if let Some(dir) = data_fs.parent().filter(|d| !d.as_os_str().is_empty()) {
            sync_dir(dir)?;
        }
        Ok(b.txns)
    }

    /// After a failure: remove what this clone wrote.
    fn discard(&self) {
        let _ = fs::remove_file(&self.tmp_data_fs);
        if let Some(t) = &self.tmp_blob_dir {
            let _ = fs::remove_dir_all(t);
        }
    }
}

fn remove_if_present(p: &Path) -> Result<(), CloneError> {
    let r = match fs::symlink_metadata(p) {
        Err(_) => return Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
    };
    r.map_err(file_err(p))
}

fn sync_dir(dir: &Path) -> Result<(), CloneError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(file_err(dir))
}

/// A file being written: size and sha256 checked at the end.
struct StagedFile {
    path: PathBuf,
    file: File,
    hash: Sha256,
    written: u64,
    size: u64,
}

impl StagedFile {
    fn create(path: &Path, size: u64) -> Result<StagedFile, CloneError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(file_err(path))?;
        Ok(StagedFile {
            path: path.to_path_buf(),
            file,
            hash: Sha256::new(),
            written: 0,
            size,
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), CloneError> {
        if self.written + data.len() as u64 > self.size {
            return Err(CloneError::Conversation(format!(
                "more than the announced {} bytes for {}",
                self.size,
                self.path.display()
            )));
        }
        self.hash.update(data);
        self.file.write_all(data).map_err(file_err(&self.path))?;
        self.written += data.len() as u64;
        Ok(())
    }

    /// Checks size and digest (if given) and syncs the file to disk.
    fn finish(self, sha256: Option<&[u8; 32]>) -> Result<(), CloneError> {
        if self.written != self.size {
            return Err(CloneError::Verify(format!(
                "{}: {} bytes received, {} announced",
                self.path.display(),
                self.written,
                self.size
            )));
        }
        let got: [u8; 32] = self.hash.finalize().into();
        if let Some(want) = sha256 {
            if &got != want {
                return Err(CloneError::Verify(format!(
                    "{}: sha256 differs from the primary's",
                    self.path.display()
                )));
            }
        }
        self.file.sync_all().map_err(file_err(&self.path))
    }
}

fn progress_bar(enabled: bool, total: u64) -> ProgressBar {
    if !enabled || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
    ) {
        pb.set_style(style);
    }
    pb
}

/// What the network task hands to the writing thread.
enum WriteCmd {
    File {
        kind: CloneFileKind,
        path: String,
        size: u64,
    },
    Data(Bytes),
    End([u8; 32]),
    /// CloneEnd: everything was sent; verify and install.
    Finish,
}

/// Copies the primary's committed `Data.fs` prefix and blobs over the
/// replication channel into `target`, verifies and installs them.
pub async fn clone_from_upstream(
    up: &Upstream,
    target: &CloneTarget,
) -> Result<CloneReport, CloneError> {
    let started = Instant::now();
    let staging = {
        let t = target.clone();
        tokio::task::spawn_blocking(move || Staging::prepare(&t))
            .await
            .map_err(|e| CloneError::Target(e.to_string()))??
    };
    let opened = open_clone(up).await;
    let (mut rh, mut rbuf, _wh, (last_tid, data_fs_bytes, blob_files, blob_bytes)) = match opened {
        Ok(x) => x,
        Err(e) => {
            staging.discard();
            return Err(e);
        }
    };
    let max = up.max_message_bytes;
    let pb = progress_bar(target.progress, data_fs_bytes + blob_bytes);
    let (tx, rx) = mpsc::channel::<WriteCmd>(8);
    let writer = {
        let pb = pb.clone();
        tokio::task::spawn_blocking(move || {
            write_all(staging, rx, pb, last_tid, data_fs_bytes, blob_files + 1)
        })
    };
    let received = async {
        loop {
            let msg = read_msg(&mut rh, &mut rbuf, max)
                .await
                .map_err(read_error)?;
            let cmd = match msg {
                StreamMsg::CloneFile { kind, path, size } => WriteCmd::File { kind, path, size },
                StreamMsg::CloneData { data } => WriteCmd::Data(data),
                StreamMsg::CloneFileEnd { sha256 } => WriteCmd::End(sha256),
                StreamMsg::CloneEnd { .. } => WriteCmd::Finish,
                other => {
                    return Err(CloneError::Conversation(format!(
                        "unexpected {} message during the copy",
                        other.kind()
                    )))
                }
            };
            let last = matches!(cmd, WriteCmd::Finish);
            if tx.send(cmd).await.is_err() || last {
                // Done, or the writer stopped (its error is the one to
                // report).
                return Ok(());
            }
        }
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| CloneError::Target(format!("clone writer: {e}")))?;
    pb.finish_and_clear();
    // A writer error explains a cut-off conversation better than the cut.
    let transactions = match (written, received) {
        (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
        (Ok(t), Ok(())) => t,
    };
    Ok(CloneReport {
        last_tid,
        data_fs_bytes,
        transactions,
        blob_files,
        blob_bytes,
        elapsed: started.elapsed(),
    })
}

type ReadHalf = tokio::io::ReadHalf<tokio_rustls::client::TlsStream<TcpStream>>;
type WriteHalf = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<TcpStream>>;
/// What the primary's CloneBegin announced: (last tid, Data.fs bytes, blob
/// files, blob bytes).
type Announced = (Tid, u64, u64, u64);

fn read_error(e: ReadError) -> CloneError {
    match e {
        ReadError::Protocol(p) => CloneError::Protocol(p),
        // A refused client certificate surfaces on the first read.
        ReadError::Io(e) => match TlsError::from(e) {
            TlsError::Io(e) => CloneError::Io(e),
            t => CloneError::Tls(t),
        },
        ReadError::Closed => CloneError::Incomplete,
    }
}

/// Connects, sends the CloneRequest and reads the answer: the read half,
/// its buffer, the write half (kept so the connection stays open) and what
/// the primary announced.
async fn open_clone(
    up: &Upstream,
) -> Result<(ReadHalf, BytesMut, WriteHalf, Announced), CloneError> {
    let connector = tokio_rustls::TlsConnector::from(tls::client_config(&up.tls)?);
    let tcp = tokio::time::timeout(up.connect_timeout, TcpStream::connect(&up.address))
        .await
        .map_err(|_| {
            CloneError::Connect(
                up.address.clone(),
                std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"),
            )
        })?
        .map_err(|e| CloneError::Connect(up.address.clone(), e))?;
    let _ = tcp.set_nodelay(true);
    crate::liveness::arm_between_nodes(&tcp)
        .map_err(|e| CloneError::Connect(up.address.clone(), e))?;
    let (stream, _) = tls::connect(&connector, tcp, &up.server_name, up.connect_timeout).await?;
    let (mut rh, mut wh) = tokio::io::split(stream);
    let mut buf = BytesMut::new();
    protocol::encode(
        &StreamMsg::CloneRequest(CloneRequest {
            version: PROTOCOL_VERSION,
            cluster: up.cluster.clone(),
            storage: up.storage.clone(),
            node: up.node.clone(),
        }),
        &mut buf,
    )?;
    let not_allowed = || {
        CloneError::Refused(
            "the primary closed the connection without answering (is this node's certificate name in its allowed_peers?)".into(),
        )
    };
    // The primary checks the allow-list after the handshake and just closes.
    let cut = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
        )
    };
    if let Err(e) = async {
        wh.write_all(&buf).await?;
        wh.flush().await
    }
    .await
    {
        return Err(if cut(&e) { not_allowed() } else { e.into() });
    }
    let mut rbuf = BytesMut::with_capacity(CHUNK_BYTES + 4096);
    let first = tokio::time::timeout(
        Duration::from_secs(60),
        read_msg(&mut rh, &mut rbuf, up.max_message_bytes),
    )
    .await
    .map_err(|_| CloneError::Conversation("no answer to the clone request within 60s".into()))?;
    let first = match first {
        Ok(m) => m,
        Err(ReadError::Closed) => return Err(not_allowed()),
        Err(ReadError::Io(e)) if cut(&e) => return Err(not_allowed()),
        Err(e) => return Err(read_error(e)),
    };
    match first {
        StreamMsg::CloneBegin {
            last_tid,
            data_fs_bytes,
            blob_files,
            blob_bytes,
            ..
        } => Ok((
            rh,
            rbuf,
            wh,
            (last_tid, data_fs_bytes, blob_files, blob_bytes),
        )),
        StreamMsg::Refuse {
            reason, message, ..
        } => Err(CloneError::Refused(format!("{reason}: {message}"))),
        other => Err(CloneError::Conversation(format!(
            "unexpected {} message",
            other.kind()
        ))),
    }
}

/// The writing thread: applies the commands; on `Finish` (and only then)
/// checks that every announced file arrived, verifies and installs.
/// Returns the number of transactions in the copy. On any error, or if the
/// commands end without `Finish` (connection lost), the staged files are
/// removed and nothing is installed.
fn write_all(
    mut staging: Staging,
    mut rx: mpsc::Receiver<WriteCmd>,
    pb: ProgressBar,
    last_tid: Tid,
    data_fs_bytes: u64,
    announced_files: u64,
) -> Result<u64, CloneError> {
    let r = (|| {
        let mut current: Option<(CloneFileKind, StagedFile)> = None;
        let mut files = 0u64;
        let mut finished = false;
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                WriteCmd::Finish => {
                    finished = true;
                    break;
                }
                WriteCmd::File { kind, path, size } => {
                    if current.is_some() {
                        return Err(CloneError::Conversation(
                            "a file started before the previous one ended".into(),
                        ));
                    }
                    let f = match kind {
                        CloneFileKind::DataFs => {
                            if size != data_fs_bytes {
                                return Err(CloneError::Conversation(format!(
                                    "Data.fs of {size} bytes, {data_fs_bytes} announced"
                                )));
                            }
                            staging.open_data_fs(size)?
                        }
                        CloneFileKind::Blob => {
                            if !staging.data_fs_done {
                                return Err(CloneError::Conversation(
                                    "blob files before Data.fs".into(),
                                ));
                            }
                            staging.open_blob(&path, size)?
                        }
                    };
                    current = Some((kind, f));
                }
                WriteCmd::Data(data) => {
                    let Some((_, f)) = current.as_mut() else {
                        return Err(CloneError::Conversation("data outside a file".into()));
                    };
                    f.write(&data)?;
                    pb.inc(data.len() as u64);
                }
                WriteCmd::End(sha) => {
                    let Some((kind, f)) = current.take() else {
                        return Err(CloneError::Conversation("file end outside a file".into()));
                    };
                    f.finish(Some(&sha))?;
                    if kind == CloneFileKind::DataFs {
                        staging.data_fs_done = true;
                    }
                    files += 1;
                }
            }
        }
        if !finished {
            return Err(CloneError::Incomplete);
        }
        if current.is_some() || !staging.data_fs_done || files != announced_files {
            return Err(CloneError::Verify(format!(
                "{files} complete files received, {announced_files} announced"
            )));
        }
        Ok(())
    })();
    match r {
        Ok(()) => {
            let tmp = staging.tmp_data_fs.clone();
            let blob_tmp = staging.tmp_blob_dir.clone();
            match staging.install(&last_tid, data_fs_bytes) {
                Ok(txns) => Ok(txns),
                Err(e) => {
                    let _ = fs::remove_file(tmp);
                    if let Some(b) = blob_tmp {
                        let _ = fs::remove_dir_all(b);
                    }
                    Err(e)
                }
            }
        }
        Err(e) => {
            staging.discard();
            Err(e)
        }
    }
}

/// `--from-file`: the same copy from a local `Data.fs` (a backup, a
/// repozo-restored or copied file) and optionally its blob directory. Only
/// its committed prefix is copied, checked the same way.
pub fn clone_from_file(
    source: &Path,
    source_blobs: Option<&Path>,
    target: &CloneTarget,
) -> Result<CloneReport, CloneError> {
    let started = Instant::now();
    let src = File::open(source).map_err(file_err(source))?;
    let size = src.metadata().map_err(file_err(source))?.len();
    let b = filestorage::committed_prefix(&src, size).map_err(|e| CloneError::Format {
        path: source.to_path_buf(),
        source: e,
    })?;
    if let Some(stop) = b.stopped {
        eprintln!(
            "zrelay clone: {} is committed up to byte {} of {size} ({stop:?}); copying that prefix",
            source.display(),
            b.end
        );
    }
    let blobs = match source_blobs {
        Some(d) => list_blobs(d, &b.last_tid)?,
        None => Vec::new(),
    };
    let blob_bytes: u64 = blobs.iter().map(|e| e.size).sum();
    let mut staging = Staging::prepare(target)?;
    let pb = progress_bar(target.progress, b.end + blob_bytes);
    let r = (|| {
        let mut f = staging.open_data_fs(b.end)?;
        copy_prefix(&src, source, b.end, &mut f, &pb)?;
        f.finish(None)?;
        staging.data_fs_done = true;
        for e in &blobs {
            let bf = File::open(&e.abs).map_err(file_err(&e.abs))?;
            let len = bf.metadata().map_err(file_err(&e.abs))?.len();
            let mut f = staging.open_blob(&e.rel, len)?;
            copy_prefix(&bf, &e.abs, len, &mut f, &pb)?;
            f.finish(None)?;
        }
        Ok(())
    })();
    pb.finish_and_clear();
    if let Err(e) = r {
        staging.discard();
        return Err(e);
    }
    let tmp = staging.tmp_data_fs.clone();
    let transactions = staging.install(&b.last_tid, b.end).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })?;
    Ok(CloneReport {
        last_tid: b.last_tid,
        data_fs_bytes: b.end,
        transactions,
        blob_files: blobs.len() as u64,
        blob_bytes,
        elapsed: started.elapsed(),
    })
}

fn copy_prefix(
    src: &File,
    path: &Path,
    len: u64,
    out: &mut StagedFile,
    pb: &ProgressBar,
) -> Result<(), CloneError> {
    let mut r = src.take(len);
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = r.read(&mut buf).map_err(file_err(path))?;
        if n == 0 {
            break;
        }
        out.write(&buf[..n])?;
        pb.inc(n as u64);
    }
    Ok(())
}

/// The `zrelay clone` command line.
#[derive(Debug, Clone)]
pub struct CloneArgs {
    pub config: Option<PathBuf>,
    pub upstream: Option<String>,
    pub upstream_name: Option<String>,
    pub data_fs: Option<PathBuf>,
    pub blob_dir: Option<PathBuf>,
    pub from_file: Option<PathBuf>,
    pub from_blob_dir: Option<PathBuf>,
    pub force: bool,
    pub progress: bool,
}

/// Runs `zrelay clone`; the process exit code (0 done, 1 failed, 2 bad
/// arguments or config).
pub async fn run_command(a: CloneArgs) -> i32 {
    let cfg = match a.config.as_deref().map(crate::config::Config::load) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(e)) => {
            eprintln!("zrelay clone: {e}");
            return 2;
        }
    };
    let Some(data_fs) = a
        .data_fs
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.backend.data_fs.clone()))
    else {
        eprintln!("zrelay clone: where to write Data.fs? Pass --data-fs or set [backend] data_fs in --config");
        return 2;
    };
    let target = CloneTarget {
        data_fs,
        blob_dir: a
            .blob_dir
            .clone()
            .or_else(|| cfg.as_ref().and_then(|c| c.backend.blob_dir.clone())),
        force: a.force,
        progress: a.progress,
    };
    let result = if let Some(src) = &a.from_file {
        let (src, blobs, target) = (src.clone(), a.from_blob_dir.clone(), target.clone());
        tokio::task::spawn_blocking(move || clone_from_file(&src, blobs.as_deref(), &target))
            .await
            .unwrap_or_else(|e| Err(CloneError::Target(format!("clone thread: {e}"))))
    } else {
        let Some(r) = cfg.as_ref().and_then(|c| c.replication.as_ref()) else {
            eprintln!("zrelay clone: cloning from a primary needs --config with a [replication] section (TLS files, cluster)");
            return 2;
        };
        let cfg = cfg.as_ref().expect("checked above");
        let Some(address) = a.upstream.clone().or_else(|| r.upstream.clone()) else {
            eprintln!("zrelay clone: pass --upstream HOST:PORT or set replication.upstream");
            return 2;
        };
        let server_name = match &a.upstream_name {
            Some(n) => n.clone(),
            None if a.upstream.is_none() || r.upstream_name.is_some() => r.upstream_server_name(),
            None => crate::config::ReplicationConfig {
                upstream: Some(address.clone()),
                upstream_name: None,
                ..r.clone()
            }
            .upstream_server_name(),
        };
        let up = Upstream {
            address,
            server_name,
            tls: r.tls.clone(),
            cluster: r.cluster.clone(),
            storage: cfg.backend.storages[0].clone(),
            node: cfg.node_name.clone(),
            connect_timeout: cfg.backend.connect_timeout().max(Duration::from_secs(5)),
            max_message_bytes: r.max_message_bytes,
        };
        clone_from_upstream(&up, &target).await
    };
    match result {
        Ok(report) => {
            println!("{}", report.summary());
            0
        }
        Err(e) => {
            eprintln!("zrelay clone: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-transaction Data.fs (tid 5, no records).
    fn data_fs() -> Vec<u8> {
        let tlen = filestorage::TXN_HEADER_LEN;
        let mut v = b"FS30".to_vec();
        v.extend(5u64.to_be_bytes());
        v.extend(tlen.to_be_bytes());
        v.push(b' ');
        v.extend([0u8; 6]);
        v.extend(tlen.to_be_bytes());
        v
    }

    fn target(dir: &Path) -> CloneTarget {
        CloneTarget {
            data_fs: dir.join("Data.fs"),
            blob_dir: Some(dir.join("blobs")),
            force: false,
            progress: false,
        }
    }

    /// Feeds `cmds` to the writer as the network task would; the writer
    /// expects Data.fs and one blob file.
    fn write(dir: &Path, cmds: Vec<WriteCmd>) -> Result<u64, CloneError> {
        let staging = Staging::prepare(&target(dir)).unwrap();
        let (tx, rx) = mpsc::channel(cmds.len() + 1);
        for c in cmds {
            tx.try_send(c).ok().unwrap();
        }
        drop(tx);
        let len = data_fs().len() as u64;
        write_all(
            staging,
            rx,
            ProgressBar::hidden(),
            5u64.to_be_bytes(),
            len,
            2,
        )
    }

    fn file_cmds(path: &str, kind: CloneFileKind, bytes: &[u8]) -> Vec<WriteCmd> {
        vec![
            WriteCmd::File {
                kind,
                path: path.into(),
                size: bytes.len() as u64,
            },
            WriteCmd::Data(Bytes::copy_from_slice(bytes)),
            WriteCmd::End(Sha256::digest(bytes).into()),
        ]
    }

    fn whole() -> Vec<WriteCmd> {
        let mut c = file_cmds("Data.fs", CloneFileKind::DataFs, &data_fs());
        c.extend(file_cmds("0x00/0x05.blob", CloneFileKind::Blob, b"blob"));
        c
    }

    #[test]
    fn installs_only_after_finish() {
        let d = tempfile::tempdir().unwrap();
        // Every file complete, but the connection ended before CloneEnd.
        assert!(matches!(
            write(d.path(), whole()),
            Err(CloneError::Incomplete)
        ));
        assert!(!d.path().join("Data.fs").exists());
        assert!(!d.path().join("blobs").exists());
        assert!(!d.path().join("Data.fs.clone-partial").exists());
        // CloneEnd with a file missing.
        let mut cmds = file_cmds("Data.fs", CloneFileKind::DataFs, &data_fs());
        cmds.push(WriteCmd::Finish);
        assert!(matches!(write(d.path(), cmds), Err(CloneError::Verify(_))));
        assert!(!d.path().join("Data.fs").exists());
        // The whole conversation.
        let mut cmds = whole();
        cmds.push(WriteCmd::Finish);
        assert_eq!(write(d.path(), cmds).unwrap(), 1);
        assert_eq!(fs::read(d.path().join("Data.fs")).unwrap(), data_fs());
        assert_eq!(
            fs::read(d.path().join("blobs/0x00/0x05.blob")).unwrap(),
            b"blob"
        );
        assert!(!d.path().join("blobs.clone-partial").exists());
    }

    #[test]
    fn bad_digest_path_or_size_installs_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut cmds = whole();
        cmds[2] = WriteCmd::End([0; 32]);
        cmds.push(WriteCmd::Finish);
        assert!(matches!(write(d.path(), cmds), Err(CloneError::Verify(_))));
        let mut cmds = file_cmds("Data.fs", CloneFileKind::DataFs, &data_fs());
        cmds.extend(file_cmds("../evil.blob", CloneFileKind::Blob, b"x"));
        cmds.push(WriteCmd::Finish);
        assert!(matches!(
            write(d.path(), cmds),
            Err(CloneError::Conversation(_))
        ));
        assert!(!d.path().join("evil.blob").exists());
        // A Data.fs whose content is not committed up to its end.
        let mut short = data_fs();
        let n = short.len();
        short[n - 1] ^= 1;
        let mut cmds = file_cmds("Data.fs", CloneFileKind::DataFs, &short);
        cmds.extend(file_cmds("0x00/0x05.blob", CloneFileKind::Blob, b"blob"));
        cmds.push(WriteCmd::Finish);
        assert!(matches!(write(d.path(), cmds), Err(CloneError::Verify(_))));
        assert!(!d.path().join("Data.fs").exists());
        assert!(!d.path().join("blobs").exists());
    }

    #[test]
    fn existing_target_needs_force() {
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("Data.fs"), b"FS30").unwrap();
        let e = Staging::prepare(&target(d.path())).err().unwrap();
        assert!(e.to_string().contains("--force"), "{e}");
        let t = CloneTarget {
            force: true,
            ..target(d.path())
        };
        // A previous clone's leftovers are removed.
        fs::write(d.path().join("Data.fs.clone-partial"), b"old").unwrap();
        let s = Staging::prepare(&t).unwrap();
        assert!(!d.path().join("Data.fs.clone-partial").exists());
        // While held, a second clone (or runzeo) cannot take the lock.
        let e = Staging::prepare(&t).err().unwrap();
        assert!(e.to_string().contains("locked"), "{e}");
        drop(s);
        Staging::prepare(&t).unwrap();
    }
}
