//! The built-in simulator: deterministic synthetic traffic, served as a firehose and as a
//! Jetstream endpoint, or written as capture files, with its ground truth.
//!
//! - [`traffic`]: the generator (frames, Jetstream lines, truth keys).

pub mod traffic;
