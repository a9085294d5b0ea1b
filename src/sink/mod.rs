//! Where events go: partitions and paths, the batcher and its flush policy, Parquet encoding,
//! and the object store.
//!
//! - [`partition`]: partition keys, lake paths and file names (format and parse).
//! - [`batcher`]: buffers per (collection, hour) and the named flush policy.
//! - [`parquet`]: sorting and encoding one flush.
//! - [`store`]: local disk (fsync + rename), S3 and memory through `object_store`.
//! - [`read`]: the lake's Parquet files in batches, in bounded memory (S3 by ranges).
//! - [`lease`]: one writer per lake (an OS lock locally, a conditional-put lease on S3).

pub mod batcher;
pub mod lease;
pub mod parquet;
pub mod partition;
pub mod read;
pub mod store;
