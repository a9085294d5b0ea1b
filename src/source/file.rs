//! A capture file as a source: messages in file order, then the end.
//!
//! Reading happens on a blocking thread; messages go into the same bounded channel as the
//! network sources. Messages at or below the resume cursor are skipped before decoding, so
//! re-ingesting a file after a crash only does the remaining work.

use super::capture::{CaptureError, CaptureFormat, CaptureReader, OwnedMessage};
use super::firehose::frame_cursor;
use super::jetstream::line_cursor;
use super::{Payload, RawMessage};
use crate::model::{Cursor, SourceKind, TimeWindow};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::mpsc;

/// Progress of a file being read.
#[derive(Debug, Default)]
pub struct FileProgress {
    /// Compressed bytes read from the file.
    pub bytes_read: AtomicU64,
    /// File size.
    pub total: AtomicU64,
    /// Messages read.
    pub messages: AtomicU64,
    /// Messages skipped as already durable.
    pub skipped: AtomicU64,
    /// Reading finished.
    pub done: AtomicBool,
}

/// A capture file source.
#[derive(Debug, Clone)]
pub struct FileSource {
    /// The file.
    pub path: PathBuf,
    /// Its detected format.
    pub format: CaptureFormat,
    /// Skip messages with a cursor at or below this.
    pub resume_after: Option<Cursor>,
}

/// A reader that counts bytes.
struct Counting<R> {
    inner: R,
    progress: Arc<FileProgress>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl FileSource {
    /// Opens and detects a capture.
    pub fn open(path: &Path) -> Result<(FileSource, SourceKind), CaptureError> {
        let r = CaptureReader::open(path)?;
        let kind = match r.format {
            CaptureFormat::JetstreamJson => SourceKind::Jetstream,
            _ => SourceKind::Firehose,
        };
        Ok((
            FileSource {
                path: path.to_path_buf(),
                format: r.format,
                resume_after: None,
            },
            kind,
        ))
    }

    /// Reads the whole file into `tx` on a blocking thread; returns when done.
    pub async fn run(
        self,
        tx: mpsc::Sender<RawMessage>,
        progress: Arc<FileProgress>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), CaptureError> {
        tokio::task::spawn_blocking(move || self.read_all(tx, progress, shutdown))
            .await
            .unwrap_or_else(|e| {
                Err(CaptureError::Corrupt {
                    offset: 0,
                    detail: format!("reader thread failed: {e}"),
                })
            })
    }

    fn read_all(
        self,
        tx: mpsc::Sender<RawMessage>,
        progress: Arc<FileProgress>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), CaptureError> {
        let f = std::fs::File::open(&self.path).map_err(|source| CaptureError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        if let Ok(m) = f.metadata() {
            progress.total.store(m.len(), Ordering::Relaxed);
        }
        let counting = Counting {
            // unbuffered: the capture reader buffers itself and hands out views of its buffer
            inner: f,
            progress: progress.clone(),
        };
        let mut reader = CaptureReader::from_reader(counting, &self.path.display().to_string())?;
        let mut window = TimeWindow::now();
        let result = loop {
            if *shutdown.borrow() {
                break Ok(());
            }
            let (payload, cursor) = match reader.next_owned() {
                None => break Ok(()),
                Some(Err(e)) => break Err(e),
                Some(Ok(OwnedMessage::Frame(f))) => {
                    let c = frame_cursor(&f);
                    (Payload::Frame(f), c)
                }
                Some(Ok(OwnedMessage::Line(l))) => {
                    if progress
                        .messages
                        .load(Ordering::Relaxed)
                        .is_multiple_of(4096)
                    {
                        window = TimeWindow::now();
                    }
                    let t = line_cursor(&l, window);
                    (Payload::Line(l), t)
                }
            };
            progress.messages.fetch_add(1, Ordering::Relaxed);
            if let (Some(c), Some(r)) = (cursor, self.resume_after)
                && c <= r
            {
                progress.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if tx.blocking_send(RawMessage { payload, cursor }).is_err() {
                break Ok(());
            }
        };
        progress.done.store(true, Ordering::Relaxed);
        result
    }
}
