//! Transport only: where raw messages come from, with their cursors.
//!
//! - [`capture`]: capture files (raw frames, length-prefixed frames, Jetstream NDJSON; zstd/gzip).

pub mod capture;
