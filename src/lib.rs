//! # atlake
//!
//! An analytics sink for the AT Protocol event streams: it reads the relay firehose
//! (`com.atproto.sync.subscribeRepos`) or Jetstream, turns every event into Arrow rows
//! partitioned by collection and hour, writes them once (exactly once) as Parquet to local disk
//! or S3, and answers SQL over the result, including rows not yet flushed.
//!
//! ## Layout
//!
//! Each stage of the data path has its own module. Modules are in layers, and a module imports
//! only from the layers below its own (never sideways): the test `layout` in `tests/it` reads
//! every file of `src/` and fails on an import against this table.
//!
//! ```text
//!  edges        cli ─────────▶ daemon (ingest + SQL in one process), export
//!                │                │
//!  the two      ingest ──────▶ catalog ◀────── query        ingest and backfill write
//!  sides        (pipeline,     (files,         (SQL, HTTP)   the lake, query reads
//!                writer,        buffered rows,               snapshots of it; none reads
//!                committer,     checkpoint)                  another
//!                compactor)
//!               backfill (repos → month partitions, per-repo progress)
//!                │   │              │
//!  the lake      │   └──────▶ checkpoint ──▶ sink (partitions, batcher, Parquet, store, lease)
//!                ▼
//!  transport   source (sockets, captures)       tools: simulate, convert
//!                │
//!  the data    decode (pure: bytes → events) ──▶ model (events, keys, cursors, rows) ◀── config
//!                                                  │
//!  leaves                                        syntax   backoff   telemetry   memory
//! ```
//!
//! - [`syntax`]: identifier syntax (NSID, DID, record key, TID, datetimes) and endpoint URLs.
//!   A leaf: every name that becomes part of a path passes through it.
//! - [`backoff`]: the one retry backoff (source reconnects, stores, checkpoints, the lease).
//! - [`model`]: the [`model::Event`] both sources produce, event keys, cursors and the time
//!   window, filters, and the Arrow rows and schemas.
//! - [`decode`]: pure functions over bytes. DAG-CBOR, CID, CAR, `subscribeRepos` frames,
//!   Jetstream JSON. No socket, no clock.
//! - [`config`]: the configuration (file, `ATLAKE_*` environment, flags).
//! - [`source`]: transport only. Firehose and Jetstream over WebSocket (reconnect, resume,
//!   filters, zstd) and capture files; each yields raw messages with their cursors.
//! - [`sink`]: partition keys and lake paths, the batcher and its flush policy, Parquet
//!   encoding and reading (in batches; S3 by ranges), storage through `object_store` (local
//!   fsync + rename, S3, memory), and the writer lease (one writer per lake).
//! - [`checkpoint`]: the lake's Delta log (files and the cursor committed together, never
//!   ahead of durable data), start-up recovery, and what keeps the tables in shape:
//!   retention, vacuum, compaction and the purge of deleted data.
//! - [`catalog`]: what the lake holds as a running daemon sees it (files, buffered and
//!   in-flight rows, the checkpoint, storage health): ingest writes it, query reads it.
//! - [`ingest`]: the pipeline that ties source, decode, batcher, writer and checkpoint together
//!   with bounded channels, under the lake's writer lease.
//! - [`backfill`]: history from the repositories (list, resolve, fetch, verify, walk) into
//!   month partitions of the `history` table, with durable per-repo progress, under the lake's
//!   writer lease.
//! - [`query`]: DataFusion over the lake (tables, system tables, derived columns), one query
//!   core, and its front ends: the HTTP endpoint and the Postgres wire protocol.
//! - [`daemon`]: `atlake run`, ingest and SQL in one process, started the same way by the
//!   command line and the tests.
//! - [`export`]: `atlake export`, a slice of the lake as Parquet, NDJSON or CSV files,
//!   without deleted data.
//! - [`simulate`]: deterministic synthetic traffic, served as a firehose and a Jetstream
//!   endpoint with faults, or written as captures, with its ground truth.
//! - [`convert`]: capture file → Jetstream JSON lines.
//! - [`telemetry`], [`cli`]: logs and metrics, the command line.
//! - [`memory`]: a leaf; when freed memory should go back to the system (the binary says how).
#![forbid(unsafe_code)]

pub mod backoff;
pub mod convert;
pub mod decode;
pub mod memory;
pub mod model;
pub mod simulate;
pub mod source;
pub mod syntax;

#[cfg(feature = "lake")]
pub mod backfill;
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
pub mod export;
#[cfg(feature = "lake")]
pub mod ingest;
#[cfg(feature = "lake")]
pub mod query;
#[cfg(feature = "lake")]
pub mod sink;
#[cfg(feature = "lake")]
pub mod telemetry;
