//! # atlake
//!
//! An analytics sink for the AT Protocol event streams: it reads the relay firehose
//! (`com.atproto.sync.subscribeRepos`) or Jetstream, turns every event into Arrow rows
//! partitioned by collection and hour, writes them as Parquet to local disk or S3, and answers
//! SQL over the result.
//!
//! ## Layout
//!
//! Each stage of the data path has its own module, and dependencies point one way, down this
//! list:
//!
//! - [`decode`]: pure functions over bytes (DAG-CBOR, CID, CAR, firehose frames, Jetstream JSON,
//!   identifier syntax).
//! - [`model`]: the [`model::Event`] both sources produce, and its Arrow schema.

pub mod convert;
pub mod decode;
pub mod model;
pub mod simulate;
pub mod source;

#[cfg(feature = "lake")]
pub mod checkpoint;
#[cfg(feature = "lake")]
pub mod cli;
#[cfg(feature = "lake")]
pub mod config;
#[cfg(feature = "lake")]
pub mod ingest;
#[cfg(feature = "lake")]
pub mod query;
#[cfg(feature = "lake")]
pub mod sink;
#[cfg(feature = "lake")]
pub mod telemetry;
