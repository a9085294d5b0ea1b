//! Where the lake lives: a local directory, S3 (or an S3-compatible server), or memory, all
//! through `object_store`.
//!
//! Writes are atomic: local files are written under a temporary name (`.<name>.tmp`), fsynced,
//! renamed into place and the directory fsynced; S3 objects appear atomically with a single PUT.
//! S3 settings come from the standard `AWS_*` environment (`AWS_ENDPOINT`/`AWS_ENDPOINT_URL`,
//! `AWS_REGION`/`AWS_DEFAULT_REGION`, credentials); path-style addressing is the default and an
//! `http://` endpoint is allowed, for S3-compatible servers.

use super::lease::Fence;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why the lake could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL is not one atlake understands.
    #[error("invalid lake location {url:?}: {message}")]
    Url {
        /// the URL
        url: String,
        /// why
        message: String,
    },
    /// A local filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// the path
        path: String,
        /// the OS error
        source: std::io::Error,
    },
    /// An object store error.
    #[error("object store: {0}")]
    Object(#[from] object_store::Error),
    /// This process may not write now (its writer lease lapsed or was lost).
    #[error(transparent)]
    Fenced(#[from] super::lease::FenceError),
}

impl StoreError {
    /// Whether the error says the disk is full.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => {
                source.raw_os_error() == Some(28) || source.to_string().contains("No space")
            }
            StoreError::Object(e) => e.to_string().contains("No space"),
            _ => false,
        }
    }
}

/// Where a lake URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LakeLocation {
    /// A local directory.
    Local(PathBuf),
    /// `s3://bucket/prefix`.
    S3 {
        /// bucket
        bucket: String,
        /// key prefix (may be empty)
        prefix: String,
    },
    /// `memory://` (tests).
    Memory,
}

impl LakeLocation {
    /// Parses `./lake`, `/abs`, `file:///abs`, `s3://bucket/prefix`, `memory://`.
    pub fn parse(url: &str) -> Result<LakeLocation, StoreError> {
        let bad = |m: &str| StoreError::Url {
            url: url.to_string(),
            message: m.to_string(),
        };
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("missing bucket name (s3://bucket/prefix)"));
            }
            return Ok(LakeLocation::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.trim_matches('/').to_string(),
            });
        }
        if url == "memory://" || url == "memory:///" {
            return Ok(LakeLocation::Memory);
        }
        let path = if let Some(p) = url.strip_prefix("file://") {
            PathBuf::from(p)
        } else if url.contains("://") {
            return Err(bad(
                "unsupported scheme (use a path, file://, s3:// or memory://)",
            ));
        } else {
            PathBuf::from(url)
        };
        if path.as_os_str().is_empty() {
            return Err(bad("empty path"));
        }
        Ok(LakeLocation::Local(path))
    }
}

/// A multipart upload under way: aborted if it is dropped before it was finished or aborted
/// (the future that drives it was cancelled), so that the store does not keep its parts.
struct Unfinished {
    upload: Option<object_store::WriteMultipart>,
    rel: String,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let Some(u) = self.upload.take() else {
            return;
        };
        let rel = std::mem::take(&mut self.rel);
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    match u.abort().await {
                        Ok(()) => tracing::info!(path = rel, "aborted an upload cut off"),
                        Err(e) => {
                            tracing::warn!(path = rel, error = %e, "could not abort an upload cut off");
                            metrics::counter!("atlake_upload_abort_failures_total").increment(1);
                        }
                    }
                });
            }
            Err(_) => {
                tracing::warn!(
                    path = rel,
                    "an upload cut off outside a runtime was not aborted"
                );
                metrics::counter!("atlake_upload_abort_failures_total").increment(1);
            }
        }
    }
}

/// The writer a streamed upload's producer writes into: full parts go to the uploader.
struct PartWriter {
    buf: Vec<u8>,
    part: usize,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    /// Whether a part went already.
    sent: bool,
}

impl PartWriter {
    fn send(&mut self) -> std::io::Result<()> {
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part));
        self.sent = true;
        self.tx
            .blocking_send(Bytes::from(full))
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }

    /// Sends the last part (possibly short, or empty when nothing was written).
    fn close(mut self) -> std::io::Result<()> {
        if self.buf.is_empty() && self.sent {
            return Ok(());
        }
        self.send()
    }
}

impl std::io::Write for PartWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(self.part - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.part {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An opened lake.
#[derive(Debug, Clone)]
pub struct Lake {
    store: Arc<dyn ObjectStore>,
    prefix: ObjPath,
    local_root: Option<PathBuf>,
    url: String,
    location: LakeLocation,
    /// Writes check this first (set once the writer lease is held).
    fence: Option<Fence>,
    /// Paths this process writes while a sweep of leftovers runs (shared by every clone).
    writes: Arc<Writes>,
    /// Part size of a streamed upload to an object store ([`Lake::put_with`]).
    upload_part: usize,
}

/// Part size of streamed uploads: an object store write of [`Lake::put_with`] holds at most
/// about `2 + UPLOAD_CONCURRENCY` parts in memory, whatever the object's size.
pub const UPLOAD_PART: usize = 8 << 20;
/// Parts of one upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 2;

/// The paths written while a sweep runs: the sweep never deletes one of them, and a write of a
/// path waits for a deletion of it under way, so a leftover of a dead writer that this process
/// writes again (a file's name is its content's) is never deleted after it was written.
#[derive(Debug, Default)]
struct Writes {
    on: std::sync::atomic::AtomicBool,
    paths: tokio::sync::Mutex<std::collections::HashSet<String>>,
}

fn s3_store(bucket: &str, env: &[(String, String)]) -> Result<Arc<dyn ObjectStore>, StoreError> {
    use std::str::FromStr;
    let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let mut b = object_store::aws::AmazonS3Builder::new().with_bucket_name(bucket);
    for (k, v) in env {
        if k.starts_with("AWS_")
            && let Ok(key) = object_store::aws::AmazonS3ConfigKey::from_str(&k.to_ascii_lowercase())
        {
            b = b.with_config(key, v.clone());
        }
    }
    let endpoint = get("AWS_ENDPOINT")
        .or_else(|| get("AWS_ENDPOINT_URL_S3"))
        .or_else(|| get("AWS_ENDPOINT_URL"));
    if let Some(ep) = &endpoint {
        b = b.with_endpoint(ep);
        if ep.starts_with("http://") {
            b = b.with_allow_http(true);
        }
    }
    if let Some(r) = get("AWS_REGION").or_else(|| get("AWS_DEFAULT_REGION")) {
        b = b.with_region(r);
    }
    // retry briefly inside object_store (three retries end within a few seconds, before its
    // retry timeout could); the writer retries a failed flush itself, forever
    let retry = object_store::RetryConfig {
        max_retries: 3,
        ..Default::default()
    };
    b = b.with_retry(retry);
    Ok(Arc::new(b.build()?))
}

impl Lake {
    /// Opens (and for a local path, creates) the lake at `url`; S3 settings from the process
    /// environment.
    pub fn open(url: &str) -> Result<Lake, StoreError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Lake::open_with_env(url, &env)
    }

    /// Like [`Lake::open`], with S3 settings (`AWS_*`) from `env`.
    pub fn open_with_env(url: &str, env: &[(String, String)]) -> Result<Lake, StoreError> {
        let location = LakeLocation::parse(url)?;
        match &location {
            LakeLocation::Local(p) => {
                std::fs::create_dir_all(p).map_err(|source| StoreError::Io {
                    path: p.display().to_string(),
                    source,
                })?;
                let root = std::fs::canonicalize(p).map_err(|source| StoreError::Io {
                    path: p.display().to_string(),
                    source,
                })?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&root)?;
                Ok(Lake {
                    store: Arc::new(store),
                    prefix: ObjPath::default(),
                    local_root: Some(root),
                    url: url.to_string(),
                    location,
                    fence: None,
                    writes: Arc::default(),
                    upload_part: UPLOAD_PART,
                })
            }
            LakeLocation::S3 { bucket, prefix } => Ok(Lake {
                store: s3_store(bucket, env)?,
                prefix: ObjPath::from(prefix.as_str()),
                local_root: None,
                url: url.to_string(),
                location,
                fence: None,
                writes: Arc::default(),
                upload_part: UPLOAD_PART,
            }),
            LakeLocation::Memory => Ok(Lake {
                store: Arc::new(object_store::memory::InMemory::new()),
                prefix: ObjPath::default(),
                local_root: None,
                url: url.to_string(),
                location,
                fence: None,
                writes: Arc::default(),
                upload_part: UPLOAD_PART,
            }),
        }
    }

    /// The same lake, with every write checking `fence` first: a write starts only while the
    /// writer lease is valid and is cancelled when the validity ends.
    pub fn fenced(&self, fence: Fence) -> Lake {
        Lake {
            fence: Some(fence),
            ..self.clone()
        }
    }

    /// The same lake, with streamed uploads to an object store cut into parts of `bytes`
    /// (default [`UPLOAD_PART`]; S3 wants at least 5 MiB for every part but the last, and
    /// `moto` lets a test lower that). At least 1 byte.
    pub fn with_upload_part(&self, bytes: usize) -> Lake {
        Lake {
            upload_part: bytes.max(1),
            ..self.clone()
        }
    }

    /// The same lake over another object store (the same prefix and location): to observe
    /// or throttle what the lake asks of its store.
    pub fn with_object_store(&self, store: Arc<dyn ObjectStore>) -> Lake {
        Lake {
            store,
            ..self.clone()
        }
    }

    /// The root directory of a local lake.
    pub fn local_root(&self) -> Option<&Path> {
        self.local_root.as_deref()
    }

    /// Runs a write under the fence (if any): refused when the lease is not valid, cancelled
    /// when its validity ends or the lease is lost. A write that outlasts one renewal period
    /// (a compaction output of hundreds of MB) goes on as long as renewals extend the validity.
    async fn guarded<T>(
        &self,
        write: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Some(f) = &self.fence else {
            return write.await;
        };
        f.deadline()?;
        tokio::select! {
            r = write => r,
            e = f.closed() => Err(StoreError::Fenced(e)),
        }
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Where it is.
    pub fn location(&self) -> &LakeLocation {
        &self.location
    }

    /// The object store (root of the store, not of the lake).
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The object path of a lake-relative path.
    pub fn object_path(&self, rel: &str) -> ObjPath {
        if self.prefix.as_ref().is_empty() {
            ObjPath::from(rel)
        } else {
            ObjPath::from(format!("{}/{rel}", self.prefix.as_ref()))
        }
    }

    /// The lake-relative path of an object path.
    pub fn relative(&self, p: &ObjPath) -> String {
        let s = p.as_ref();
        let pre = self.prefix.as_ref();
        if pre.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(pre)
                .map(|r| r.trim_start_matches('/').to_string())
                .unwrap_or_else(|| s.to_string())
        }
    }

    /// Writes `data` at `rel` atomically and durably.
    pub async fn put_atomic(&self, rel: &str, data: Bytes) -> Result<(), StoreError> {
        self.record(rel).await;
        self.guarded(self.put_atomic_unfenced(rel, data)).await
    }

    /// Notes a path about to be written while a sweep runs (waiting for a deletion of it under
    /// way).
    async fn record(&self, rel: &str) {
        use std::sync::atomic::Ordering;
        if self.writes.on.load(Ordering::Acquire) {
            self.writes.paths.lock().await.insert(rel.to_string());
        }
    }

    /// From now until [`Lake::stop_tracking`], every path written through this lake (or a
    /// clone) is noted, for [`Lake::delete_unless_written`]. Set before anything is written.
    pub fn track_writes(&self) {
        self.writes
            .on
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Ends [`Lake::track_writes`] and forgets the paths noted.
    pub async fn stop_tracking(&self) {
        self.writes
            .on
            .store(false, std::sync::atomic::Ordering::Release);
        self.writes.paths.lock().await.clear();
    }

    /// Deletes `rel` unless this process wrote it since [`Lake::track_writes`]; a write of it
    /// that starts meanwhile waits until the deletion is done. `true` if it was deleted.
    pub async fn delete_unless_written(&self, rel: &str) -> Result<bool, StoreError> {
        let written = self.writes.paths.lock().await;
        if written.contains(rel) {
            return Ok(false);
        }
        self.delete(rel).await?;
        drop(written);
        Ok(true)
    }

    async fn put_atomic_unfenced(&self, rel: &str, data: Bytes) -> Result<(), StoreError> {
        match &self.local_root {
            Some(root) => {
                let (root, rel) = (root.clone(), rel.to_string());
                blocking(move || write_local_atomic(&root, &rel, &data)).await
            }
            None => {
                self.store
                    .put(&self.object_path(rel), PutPayload::from_bytes(data))
                    .await?;
                Ok(())
            }
        }
    }

    /// Writes the bytes produced by `produce` at `rel`, atomically and durably. A local lake
    /// streams them straight into the temporary file (no copy in memory); an object store gets
    /// them as a multipart upload, part by part (one PUT when they fit one part). A producer
    /// that fails leaves nothing at `rel`. Returns the size written.
    pub async fn put_with<F>(&self, rel: &str, produce: F) -> Result<u64, StoreError>
    where
        F: FnOnce(&mut (dyn std::io::Write + Send)) -> std::io::Result<()> + Send + 'static,
    {
        self.record(rel).await;
        self.guarded(self.put_with_unfenced(rel, produce)).await
    }

    async fn put_with_unfenced<F>(&self, rel: &str, produce: F) -> Result<u64, StoreError>
    where
        F: FnOnce(&mut (dyn std::io::Write + Send)) -> std::io::Result<()> + Send + 'static,
    {
        let task_err = |e: tokio::task::JoinError| StoreError::Io {
            path: "(write task)".into(),
            source: std::io::Error::other(e.to_string()),
        };
        match &self.local_root {
            Some(root) => {
                let root = root.clone();
                let rel = rel.to_string();
                tokio::task::spawn_blocking(move || write_local_streaming(&root, &rel, produce))
                    .await
                    .map_err(task_err)?
            }
            None => self.upload_streaming(rel, produce).await,
        }
    }

    /// [`Lake::put_with`] to an object store: the produced bytes go up in parts of
    /// `upload_part` as they come (a multipart upload, completed only once every byte was
    /// produced and every part stored, so the object appears whole or not at all); an object
    /// of one part is a single PUT. Memory is a few parts, not the object.
    async fn upload_streaming<F>(&self, rel: &str, produce: F) -> Result<u64, StoreError>
    where
        F: FnOnce(&mut (dyn std::io::Write + Send)) -> std::io::Result<()> + Send + 'static,
    {
        use object_store::WriteMultipart;
        let part = self.upload_part;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let producer = tokio::task::spawn_blocking(move || {
            let mut w = PartWriter {
                buf: Vec::with_capacity(part),
                part,
                tx,
                sent: false,
            };
            produce(&mut w)?;
            w.close()
        });
        let path = self.object_path(rel);
        // aborted if dropped unfinished: a write cut off by the fence (`guarded`) drops this
        // future mid-upload, and S3 would keep the parts sent so far
        let mut upload = Unfinished {
            upload: None,
            rel: rel.to_string(),
        };
        let (mut held, mut n) = (None::<Bytes>, 0u64);
        let mut failed: Option<object_store::Error> = None;
        while let Some(chunk) = rx.recv().await {
            n += chunk.len() as u64;
            let step = match (upload.upload.as_mut(), held.take()) {
                (None, None) => {
                    // the first part waits: an object of one part is one PUT
                    held = Some(chunk);
                    Ok(())
                }
                (None, Some(first)) => match self.store.put_multipart(&path).await {
                    Ok(u) => {
                        let mut u = WriteMultipart::new_with_chunk_size(u, part);
                        u.put(first);
                        let r = u.wait_for_capacity(UPLOAD_CONCURRENCY).await;
                        u.put(chunk);
                        upload.upload = Some(u);
                        r
                    }
                    Err(e) => Err(e),
                },
                (Some(u), _) => {
                    let r = u.wait_for_capacity(UPLOAD_CONCURRENCY).await;
                    u.put(chunk);
                    r
                }
            };
            if let Err(e) = step {
                failed = Some(e);
                break;
            }
        }
        // a failed upload stops the producer at its next part
        drop(rx);
        let produced = producer.await.map_err(|e| StoreError::Io {
            path: "(write task)".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let outcome = match (failed, produced) {
            (Some(e), _) => Err(StoreError::from(e)),
            (None, Err(source)) => Err(StoreError::Io {
                path: rel.to_string(),
                source,
            }),
            (None, Ok(())) => Ok(()),
        };
        match (outcome, upload.upload.take()) {
            (Ok(()), Some(u)) => {
                u.finish().await?;
            }
            (Ok(()), None) => {
                // the producer's close always sends a part, empty when nothing was written
                let body = held.ok_or_else(|| StoreError::Io {
                    path: rel.to_string(),
                    source: std::io::Error::other("the upload got no part at all"),
                })?;
                self.store.put(&path, PutPayload::from_bytes(body)).await?;
            }
            (Err(e), Some(u)) => {
                if let Err(a) = u.abort().await {
                    tracing::warn!(path = rel, error = %a, "could not abort a failed upload");
                    metrics::counter!("atlake_upload_abort_failures_total").increment(1);
                }
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        }
        Ok(n)
    }

    /// Writes `data` at `rel` only if nothing is there yet, atomically and durably: `true` if
    /// this call created it, `false` if the path was already taken (by an earlier attempt of
    /// the same write, or another writer). Local lakes link the fsynced temporary file into
    /// place (a link never replaces a file); object stores use a conditional put
    /// (`If-None-Match: *`). Commits of the Delta log are made this way.
    pub async fn put_new(&self, rel: &str, data: Bytes) -> Result<bool, StoreError> {
        self.record(rel).await;
        self.guarded(async {
            match &self.local_root {
                Some(root) => {
                    let (root, rel) = (root.clone(), rel.to_string());
                    blocking(move || write_local_new(&root, &rel, &data)).await
                }
                None => {
                    let opts = object_store::PutOptions {
                        mode: object_store::PutMode::Create,
                        ..Default::default()
                    };
                    match self
                        .store
                        .put_opts(&self.object_path(rel), PutPayload::from_bytes(data), opts)
                        .await
                    {
                        Ok(_) => Ok(true),
                        Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                        Err(e) => Err(e.into()),
                    }
                }
            }
        })
        .await
    }

    /// Lists the objects directly or indirectly under `rel_prefix` whose paths sort after
    /// `rel_offset` (both lake-relative): lake-relative paths and sizes, in no set order.
    pub async fn list_after(
        &self,
        rel_prefix: &str,
        rel_offset: &str,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let p = self.object_path(rel_prefix);
        let o = self.object_path(rel_offset);
        let items: Vec<object_store::ObjectMeta> = self
            .store
            .list_with_offset(Some(&p), &o)
            .try_collect()
            .await?;
        Ok(items
            .into_iter()
            .map(|m| (self.relative(&m.location), m.size))
            .collect())
    }

    /// Reads a whole object; `None` if it does not exist.
    pub async fn get(&self, rel: &str) -> Result<Option<Bytes>, StoreError> {
        match self.store.get(&self.object_path(rel)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Reads at most the first `max` bytes of an object (all of it when shorter); `None` if it
    /// does not exist. An empty object is an error (there is no first byte to read).
    pub async fn get_head(&self, rel: &str, max: u64) -> Result<Option<Bytes>, StoreError> {
        let opts = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(0..max.max(1))),
            ..Default::default()
        };
        match self.store.get_opts(&self.object_path(rel), opts).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists every object under `rel_prefix` (recursively): lake-relative paths and sizes.
    pub async fn list(&self, rel_prefix: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let p = self.object_path(rel_prefix);
        let items: Vec<object_store::ObjectMeta> = self.store.list(Some(&p)).try_collect().await?;
        Ok(items
            .into_iter()
            .map(|m| (self.relative(&m.location), m.size))
            .collect())
    }

    /// Deletes an object (missing is fine).
    pub async fn delete(&self, rel: &str) -> Result<(), StoreError> {
        self.guarded(async {
            match self.store.delete(&self.object_path(rel)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await
    }

    /// Removes leftover temporary files of interrupted local writes; returns how many. Only a
    /// writer that holds the lake's lease may call this (the lease guarantees no other live
    /// process is writing them); this process's own (named with its pid) are left alone.
    pub async fn remove_temp_files(&self) -> Result<usize, StoreError> {
        let Some(root) = self.local_root.clone() else {
            return Ok(0);
        };
        if let Some(f) = &self.fence {
            f.deadline()?;
        }
        tokio::task::spawn_blocking(move || remove_temps(&root))
            .await
            .map_err(|e| StoreError::Io {
                path: "(cleanup task)".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

/// Runs a local write on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io {
            path: "(write task)".into(),
            source: std::io::Error::other(e.to_string()),
        })?
}

fn io_err(path: &Path, source: std::io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Test-only fault injection: `ATLAKE_FAULT_SLOW_WRITE_MS` holds each local write between the
/// fsync of its temporary file and the rename, so crash tests can kill the process mid-write.
fn slow_write_delay() -> Option<std::time::Duration> {
    static D: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        std::env::var("ATLAKE_FAULT_SLOW_WRITE_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(std::time::Duration::from_millis)
    })
}

fn write_local_atomic(root: &Path, rel: &str, data: &[u8]) -> Result<(), StoreError> {
    write_local_streaming(root, rel, |w: &mut (dyn std::io::Write + Send)| {
        w.write_all(data)
    })
    .map(|_| ())
}

/// The target of a local write, its directory (created), and the temporary file it is
/// written to first (`.<name>.<pid>.tmp`, which recovery removes if it is left behind).
fn temp_path(root: &Path, rel: &str) -> Result<(PathBuf, PathBuf, PathBuf), StoreError> {
    let target = root.join(rel);
    let dir = target
        .parent()
        .ok_or_else(|| io_err(&target, std::io::Error::other("no parent directory")))?
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let file_name = target
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io_err(&target, std::io::Error::other("bad file name")))?;
    let tmp = dir.join(format!(".{file_name}.{}.tmp", std::process::id()));
    Ok((target, dir, tmp))
}

fn write_local_streaming(
    root: &Path,
    rel: &str,
    produce: impl FnOnce(&mut (dyn std::io::Write + Send)) -> std::io::Result<()>,
) -> Result<u64, StoreError> {
    use std::io::Write;
    let (target, dir, tmp) = temp_path(root, rel)?;
    let dir = dir.as_path();
    let res = (|| {
        let f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        produce(&mut w).map_err(|e| io_err(&tmp, e))?;
        w.flush().map_err(|e| io_err(&tmp, e))?;
        let f = w.into_inner().map_err(|e| io_err(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        let size = f.metadata().map_err(|e| io_err(&tmp, e))?.len();
        drop(f);
        if let Some(d) = slow_write_delay() {
            std::thread::sleep(d);
        }
        std::fs::rename(&tmp, &target).map_err(|e| io_err(&target, e))?;
        let d = std::fs::File::open(dir).map_err(|e| io_err(dir, e))?;
        d.sync_all().map_err(|e| io_err(dir, e))?;
        Ok(size)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Creates `rel` with `data` unless it exists: the fsynced temporary file is hard-linked to
/// the final name (which fails if that name is taken), then removed; the directory is fsynced.
fn write_local_new(root: &Path, rel: &str, data: &[u8]) -> Result<bool, StoreError> {
    use std::io::Write;
    let (target, dir, tmp) = temp_path(root, rel)?;
    let dir = dir.as_path();
    let res = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(data).map_err(|e| io_err(&tmp, e))?;
        f.sync_all().map_err(|e| io_err(&tmp, e))?;
        drop(f);
        if let Some(d) = slow_write_delay() {
            std::thread::sleep(d);
        }
        let created = match std::fs::hard_link(&tmp, &target) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_err(&target, e)),
        };
        std::fs::remove_file(&tmp).map_err(|e| io_err(&tmp, e))?;
        let d = std::fs::File::open(dir).map_err(|e| io_err(dir, e))?;
        d.sync_all().map_err(|e| io_err(dir, e))?;
        Ok(created)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn remove_temps(root: &Path) -> Result<usize, StoreError> {
    let own = format!(".{}.tmp", std::process::id());
    let mut removed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err(&dir, e))?;
            let path = entry.path();
            let ft = entry.file_type().map_err(|e| io_err(&path, e))?;
            if ft.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && name.starts_with('.')
                && name.ends_with(".tmp")
                && !name.ends_with(&own)
            {
                std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
                removed += 1;
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::lease::FenceError;

    /// A streamed write to an object store: an object of many parts reads back byte for byte
    /// (parts of every size the producer's writes make, the last one short), one of a single
    /// part too, an empty one too; a producer that fails after some parts went up leaves no
    /// object, and neither does one that fails before the first part is full.
    #[tokio::test]
    async fn streamed_uploads_are_whole_or_absent() {
        let lake = Lake::open("memory://").unwrap().with_upload_part(1000);
        let data: Vec<u8> = (0..10_537u32).map(|i| (i * 7 % 251) as u8).collect();
        for (name, len) in [
            ("many", data.len()),
            ("one", 999),
            ("exact", 1000),
            ("empty", 0),
        ] {
            let d = data[..len].to_vec();
            let n = lake
                .put_with(name, move |w| {
                    // uneven writes, across part boundaries
                    for c in d.chunks(333) {
                        w.write_all(c)?;
                    }
                    Ok(())
                })
                .await
                .unwrap();
            assert_eq!(n, len as u64, "{name}");
            assert_eq!(
                lake.get(name).await.unwrap().unwrap(),
                &data[..len],
                "{name}"
            );
        }
        for (name, before_failing) in [("failed-late", 5_000usize), ("failed-early", 10)] {
            let d = data[..before_failing].to_vec();
            let r = lake
                .put_with(name, move |w| {
                    w.write_all(&d)?;
                    Err(std::io::Error::other("the producer broke"))
                })
                .await;
            assert!(
                matches!(&r, Err(StoreError::Io { source, .. }) if source.to_string() == "the producer broke"),
                "{r:?}"
            );
            assert_eq!(lake.get(name).await.unwrap(), None, "{name}");
        }
    }

    /// A directory that is gone by the time it is read (removed by hand, or never made) is
    /// nothing to clean, not an error; other failures are errors.
    #[test]
    fn temp_file_cleanup_skips_missing_directories() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("not-there");
        assert_eq!(remove_temps(&gone).unwrap(), 0);
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/.x.1.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join("a/b/kept.parquet"), b"x").unwrap();
        assert_eq!(remove_temps(dir.path()).unwrap(), 1);
        assert!(dir.path().join("a/b/kept.parquet").exists());
        let file = dir.path().join("a/b/kept.parquet");
        assert!(remove_temps(&file).is_err(), "a file is not a directory");
    }

    #[test]
    fn lake_locations_parse() {
        assert_eq!(
            LakeLocation::parse("s3://bucket/some/prefix/").unwrap(),
            LakeLocation::S3 {
                bucket: "bucket".into(),
                prefix: "some/prefix".into()
            }
        );
        assert_eq!(
            LakeLocation::parse("s3://bucket").unwrap(),
            LakeLocation::S3 {
                bucket: "bucket".into(),
                prefix: String::new()
            }
        );
        assert!(LakeLocation::parse("s3:///x").is_err());
        assert_eq!(
            LakeLocation::parse("memory://").unwrap(),
            LakeLocation::Memory
        );
        assert_eq!(
            LakeLocation::parse("file:///tmp/l").unwrap(),
            LakeLocation::Local("/tmp/l".into())
        );
        assert_eq!(
            LakeLocation::parse("./lake").unwrap(),
            LakeLocation::Local("./lake".into())
        );
        assert!(LakeLocation::parse("ftp://x/y").is_err());
        assert!(LakeLocation::parse("").is_err());
        assert!(LakeLocation::parse("file://").is_err());
    }

    #[test]
    fn s3_paths_carry_the_prefix_both_ways() {
        let env = vec![("AWS_REGION".to_string(), "us-east-1".to_string())];
        let lake = Lake::open_with_env("s3://b/pre/fix", &env).unwrap();
        let p = lake.object_path("events/x.parquet");
        assert_eq!(p.as_ref(), "pre/fix/events/x.parquet");
        assert_eq!(lake.relative(&p), "events/x.parquet");
        let plain = Lake::open("memory://").unwrap();
        assert_eq!(plain.object_path("a/b").as_ref(), "a/b");
        assert_eq!(plain.relative(&plain.object_path("a/b")), "a/b");
    }

    #[tokio::test]
    async fn local_writes_are_whole_listed_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::open(dir.path().join("l").to_str().unwrap()).unwrap();
        assert!(lake.local_root().is_some());
        lake.put_atomic("_atlake/a.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let n = lake
            .put_with("events/p/f.parquet", |w| w.write_all(b"0123456789"))
            .await
            .unwrap();
        assert_eq!(n, 10);
        assert_eq!(
            lake.get("events/p/f.parquet").await.unwrap().unwrap(),
            Bytes::from_static(b"0123456789")
        );
        assert_eq!(lake.get("events/p/none").await.unwrap(), None);
        assert_eq!(
            lake.list("events").await.unwrap(),
            vec![("events/p/f.parquet".to_string(), 10)]
        );
        // a write that fails half way leaves neither the file nor its temporary file
        let e = lake
            .put_with("events/p/g.parquet", |w| {
                w.write_all(b"half")?;
                Err(std::io::Error::other("encoder failed"))
            })
            .await;
        assert!(e.is_err());
        assert_eq!(lake.list("events").await.unwrap().len(), 1);
        assert_eq!(lake.remove_temp_files().await.unwrap(), 0);
        lake.delete("events/p/f.parquet").await.unwrap();
        lake.delete("events/p/f.parquet").await.unwrap();
        assert!(lake.list("events").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_fenced_lake_writes_only_while_the_lease_is_valid() {
        use tokio::time::{Duration, Instant};
        let fence = Fence::new(Some(Instant::now() + Duration::from_secs(60)));
        let lake = Lake::open("memory://").unwrap().fenced(fence.clone());
        lake.put_atomic("a", Bytes::from_static(b"1"))
            .await
            .unwrap();
        let expired = Lake::open("memory://")
            .unwrap()
            .fenced(Fence::new(Some(Instant::now())));
        let refused =
            |r: Result<_, StoreError>| matches!(r, Err(StoreError::Fenced(FenceError::Expired)));
        assert!(refused(
            expired.put_atomic("a", Bytes::from_static(b"1")).await
        ));
        assert!(refused(
            expired
                .put_with("b", |w| w.write_all(b"1"))
                .await
                .map(|_| ())
        ));
        assert!(refused(expired.delete("a").await));
        // reading needs no lease
        assert_eq!(expired.get("a").await.unwrap(), None);
        fence.lose("taken over".into());
        assert!(matches!(
            lake.put_atomic("a", Bytes::from_static(b"2")).await,
            Err(StoreError::Fenced(FenceError::Lost(_)))
        ));
        assert_eq!(
            lake.get("a").await.unwrap().unwrap(),
            Bytes::from_static(b"1")
        );
    }

    /// A write that lasts longer than the validity it started with goes on while renewals
    /// extend it, and is cancelled (nothing written) once they stop or the lease is lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_write_lasts_as_long_as_the_renewals() {
        let slow = |ms: u64| {
            move |w: &mut (dyn std::io::Write + Send)| {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                w.write_all(b"x")
            }
        };
        let ms = std::time::Duration::from_millis;
        let fence = Fence::new(Some(tokio::time::Instant::now() + ms(150)));
        let lake = Lake::open("memory://").unwrap().fenced(fence.clone());
        let renewing = {
            let fence = fence.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ms(50)).await;
                    fence.extend(tokio::time::Instant::now() + ms(150));
                }
            })
        };
        assert_eq!(lake.put_with("long", slow(600)).await.unwrap(), 1);
        assert_eq!(lake.get("long").await.unwrap().unwrap(), &b"x"[..]);
        renewing.abort();
        let r = lake.put_with("cut", slow(600)).await;
        assert!(
            matches!(r, Err(StoreError::Fenced(FenceError::Expired))),
            "{r:?}"
        );
        fence.extend(tokio::time::Instant::now() + ms(10_000));
        let lose = {
            let fence = fence.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ms(100)).await;
                fence.lose("taken over".into());
            })
        };
        let r = lake.put_with("lost", slow(600)).await;
        assert!(
            matches!(r, Err(StoreError::Fenced(FenceError::Lost(_)))),
            "{r:?}"
        );
        lose.await.unwrap();
        tokio::time::sleep(ms(700)).await;
        assert_eq!(lake.get("cut").await.unwrap(), None);
        assert_eq!(lake.get("lost").await.unwrap(), None);
    }

    #[test]
    fn a_full_disk_is_told_apart() {
        let full = StoreError::Io {
            path: "x".into(),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert!(full.is_no_space());
        let other = StoreError::Io {
            path: "x".into(),
            source: std::io::Error::from_raw_os_error(13),
        };
        assert!(!other.is_no_space());
    }

    /// An object store that counts the multipart uploads aborted.
    #[derive(Debug)]
    struct CountsAborts {
        inner: object_store::memory::InMemory,
        aborts: Arc<std::sync::atomic::AtomicU64>,
    }

    impl std::fmt::Display for CountsAborts {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "CountsAborts")
        }
    }

    #[derive(Debug)]
    struct CountedUpload(
        Box<dyn object_store::MultipartUpload>,
        Arc<std::sync::atomic::AtomicU64>,
    );

    #[async_trait::async_trait]
    impl object_store::MultipartUpload for CountedUpload {
        fn put_part(&mut self, data: PutPayload) -> object_store::UploadPart {
            self.0.put_part(data)
        }
        async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
            self.0.complete().await
        }
        async fn abort(&mut self) -> object_store::Result<()> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.abort().await
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for CountsAborts {
        async fn put_opts(
            &self,
            location: &ObjPath,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &ObjPath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            let u = self.inner.put_multipart_opts(location, opts).await?;
            Ok(Box::new(CountedUpload(u, self.aborts.clone())))
        }
        async fn get_opts(
            &self,
            location: &ObjPath,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<ObjPath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<ObjPath>> {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&ObjPath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&ObjPath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &ObjPath,
            to: &ObjPath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A streamed upload cut off by the fence (the lease ran out mid-write) is aborted, so the
    /// store keeps none of its parts; a producer that fails aborts its upload too.
    #[tokio::test]
    async fn an_upload_cut_off_by_the_fence_is_aborted() {
        let aborts = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let store = Arc::new(CountsAborts {
            inner: object_store::memory::InMemory::new(),
            aborts: aborts.clone(),
        });
        let ms = std::time::Duration::from_millis;
        let fence = Fence::new(Some(tokio::time::Instant::now() + ms(200)));
        let lake = Lake::open("memory://")
            .unwrap()
            .with_upload_part(1000)
            .with_object_store(store.clone())
            .fenced(fence);
        // parts go up every 40 ms for 1.6 s: the fence closes after 200 ms, mid-upload
        let r = lake
            .put_with("cut", |w| {
                for _ in 0..40 {
                    w.write_all(&[7u8; 1000])?;
                    std::thread::sleep(std::time::Duration::from_millis(40));
                }
                Ok(())
            })
            .await;
        assert!(
            matches!(r, Err(StoreError::Fenced(FenceError::Expired))),
            "{r:?}"
        );
        // the abort runs as a task once the upload is dropped
        let deadline = tokio::time::Instant::now() + ms(5000);
        while aborts.load(std::sync::atomic::Ordering::SeqCst) == 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(ms(10)).await;
        }
        assert_eq!(aborts.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(lake.get("cut").await.unwrap(), None);
        let plain = Lake::open("memory://")
            .unwrap()
            .with_upload_part(1000)
            .with_object_store(store);
        let r = plain
            .put_with("failed", |w| {
                w.write_all(&[7u8; 5000])?;
                Err(std::io::Error::other("the producer broke"))
            })
            .await;
        assert!(r.is_err());
        assert_eq!(aborts.load(std::sync::atomic::Ordering::SeqCst), 2);
    }
}
