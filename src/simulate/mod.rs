//! The built-in simulator: deterministic synthetic traffic, served as a firehose and as a
//! Jetstream endpoint, or written as capture files, with its ground truth.
//!
//! - [`traffic`]: the generator (frames, Jetstream lines, truth keys).
//! - [`faults`]: corrupted frames for fault injection.
//! - [`server`]: the WebSocket server (firehose and Jetstream) with replay and faults.
//! - [`sync`]: the repository sync endpoints (relay listing, PLC stand-in, PDS hosts serving
//!   `getRepo`) with faults and ground truth, for backfills.

pub mod faults;
#[cfg(feature = "lake")]
pub mod server;
#[cfg(feature = "lake")]
pub mod sync;
pub mod traffic;
