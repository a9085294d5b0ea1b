//! `atlake convert`: a capture file in, Jetstream v1 JSON lines out.
//!
//! Firehose frames become one line per op (identity and account as Jetstream emits them,
//! `time_us` from the frame's `time`); Jetstream NDJSON is validated and normalised (each record
//! re-encoded to DAG-CBOR, checked against its CID, and written back in canonical form).
//! Whatever cannot be converted is counted by reason and reported; it never stops the run.

use crate::decode::events::{DecodeOptions, FrameDecoder};
use crate::decode::jetstream::{JetstreamDecoder, JetstreamOptions, write_line};
use crate::model::{Decoded, ErrorReason};
use crate::source::capture::{CaptureError, CaptureFormat, CaptureReader, Compression, Message};
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;

/// Counts from one conversion.
#[derive(Debug, Default, Clone)]
pub struct ConvertStats {
    /// Input messages read.
    pub messages: u64,
    /// Lines written.
    pub lines: u64,
    /// Inputs set aside, by reason.
    pub errors: BTreeMap<ErrorReason, u64>,
    /// Events that have no Jetstream form (`#sync`).
    pub skipped: u64,
    /// The capture's format.
    pub format: Option<CaptureFormat>,
    /// The capture's compression.
    pub compression: Option<Compression>,
    /// The capture stopped early because its framing was lost.
    pub truncated: Option<String>,
}

/// Why a conversion failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The capture could not be opened or recognised.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// Output could not be written.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

/// Converts the capture at `input`, writing lines to `out`. `progress` is called every
/// 100,000 messages with the stats so far and the input byte offset.
pub fn convert(
    input: &Path,
    out: &mut impl Write,
    mut progress: impl FnMut(&ConvertStats, u64),
) -> Result<ConvertStats, ConvertError> {
    let mut reader = CaptureReader::open(input)?;
    let mut stats = ConvertStats {
        format: Some(reader.format),
        compression: Some(reader.compression),
        ..Default::default()
    };
    let mut frames = FrameDecoder::new(DecodeOptions::default());
    let mut lines = JetstreamDecoder::new(JetstreamOptions { normalize: true });
    let mut decoded = Vec::new();
    let mut buf = Vec::with_capacity(1 << 16);
    loop {
        decoded.clear();
        match reader.next_message() {
            None => break,
            Some(Err(e)) => {
                stats.truncated = Some(e.to_string());
                break;
            }
            Some(Ok(Message::Frame(f))) => frames.decode(f, &mut decoded),
            Some(Ok(Message::Line(l))) => decoded.push(lines.decode(l)),
        }
        stats.messages += 1;
        for d in &decoded {
            match d {
                Decoded::Event(env) => {
                    buf.clear();
                    if write_line(env, &mut buf) {
                        buf.push(b'\n');
                        out.write_all(&buf)?;
                        stats.lines += 1;
                    } else {
                        stats.skipped += 1;
                    }
                }
                Decoded::Error(e) => {
                    *stats.errors.entry(e.reason).or_default() += 1;
                    tracing::debug!(reason = %e.reason, detail = %e.detail, "input set aside");
                }
            }
        }
        if stats.messages.is_multiple_of(100_000) {
            progress(&stats, reader.offset);
        }
    }
    out.flush()?;
    Ok(stats)
}
