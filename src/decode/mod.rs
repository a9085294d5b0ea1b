//! Pure decoders: bytes in, values or typed errors out. No socket, no clock, no global state.
//!
//! - [`cbor`]: DAG-CBOR reader, record → atproto JSON writer, encoder.
//! - [`cid`]: CIDv1 (dag-cbor / raw, sha2-256), binary and `b…` base32 forms.
//! - [`car`]: CARv1 slices with hash verification, whole or as a stream of chunks.
//! - [`frame`]: `subscribeRepos` frames: the wire format.
//! - [`events`]: frame bodies as events: commit ops joined with their record blocks.
//! - [`jetstream`]: Jetstream v1 JSON lines, the v1 zstd dictionary, and the line writer.
//! - [`mst`]: the repository's Merkle Search Tree: node codec, verified in-order walk, builder.
//! - [`repo`]: a whole repository (`getRepo`): its commit, checked against the DID asked for, and
//!   every record under the MST, in key order.
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
pub mod mst;
pub mod repo;
