//! Pure decoders: bytes in, values or typed errors out. No socket, no clock, no global state.
//!
//! - [`cbor`]: DAG-CBOR reader, record → atproto JSON writer, encoder.
//! - [`cid`]: CIDv1 (dag-cbor / raw, sha2-256), binary and `b…` base32 forms.
//! - [`car`]: CARv1 slices with hash verification.
//! - [`frame`]: `subscribeRepos` frames: the wire format.
//! - [`events`]: frame bodies as events: commit ops joined with their record blocks.
//! - [`jetstream`]: Jetstream v1 JSON lines, the v1 zstd dictionary, and the line writer.
//! - [`json`]: JSON string output compatible with Jetstream's, and data-model errors.
//!
//! Every decoder treats its input as hostile: lengths are checked against the bytes that remain
//! before anything is allocated, nesting is bounded, and no input can make a decoder panic
//! (fuzz targets in `fuzz/` exercise each one).

pub mod car;
pub mod cbor;
pub mod cid;
pub mod events;
pub mod frame;
pub mod jetstream;
pub mod json;
