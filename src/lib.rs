//! # atlake
//!
//! An analytics sink for the AT Protocol event streams: it reads the relay firehose
//! (`com.atproto.sync.subscribeRepos`) or Jetstream, turns every event into Arrow rows
//! partitioned by collection and hour, writes them once (exactly once) as Parquet to local disk
//! or S3, and answers SQL over the result, including rows not yet flushed.
//!
//! ## Layout
//!
//! Each stage of the data path has its own module, in the order data flows through them;
//! dependencies point one way, down this list (the query side reads what ingest produced, never
//! its internals):
//!
//! ```text
//!  source ──▶ decode ──▶ model ──▶ sink (batcher → parquet → store) ──▶ checkpoint
//!  (socket,    (pure:     (Event,    partitions by collection/hour,       (cursor after
//!   capture)    bytes →    rows)      flush policy, atomic writes)          durable files)
//!                events)                        │
//!                                               ▼
//!                         ingest (the pipeline and its live state) ──▶ query (SQL, HTTP)
//! ```
//!
//! - [`source`]: transport only. Firehose and Jetstream over WebSocket (reconnect, resume,
//!   filters, zstd) and capture files; each yields raw messages with their cursors.
//! - [`decode`]: pure functions over bytes. DAG-CBOR, CID, CAR, `subscribeRepos` frames,
//!   Jetstream JSON, identifier syntax. No socket, no clock.
//! - [`model`]: the [`model::Event`] both sources produce, and its Arrow rows and schemas.
//! - [`sink`]: partition keys and lake paths, the batcher and its flush policy, Parquet
//!   encoding, and storage through `object_store` (local fsync + rename, S3, memory).
//! - [`checkpoint`]: the checkpoint (never ahead of durable data) and start-up recovery.
//! - [`ingest`]: the pipeline that ties source, decode, batcher, writer and checkpoint together
//!   with bounded channels, and the live state the daemon's SQL reads.
//! - [`query`]: DataFusion over the lake (tables, system tables, derived columns) and the HTTP
//!   endpoint.
//! - [`simulate`]: deterministic synthetic traffic, served as a firehose and a Jetstream
//!   endpoint with faults, or written as captures, with its ground truth.
//! - [`convert`]: capture file → Jetstream JSON lines.
//! - [`config`], [`telemetry`], [`cli`]: configuration, logs and metrics, the command line.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod convert;
pub mod decode;
pub mod model;
pub mod simulate;
pub mod source;
pub mod syntax;

#[cfg(feature = "lake")]
pub mod catalog;
#[cfg(feature = "lake")]
pub mod checkpoint;
#[cfg(feature = "lake")]
pub mod cli;
#[cfg(feature = "lake")]
pub mod config;
#[cfg(feature = "lake")]
pub mod daemon;
#[cfg(feature = "lake")]
pub mod ingest;
#[cfg(feature = "lake")]
pub mod query;
#[cfg(feature = "lake")]
pub mod sink;
#[cfg(feature = "lake")]
pub mod telemetry;
