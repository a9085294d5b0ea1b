//! atlake's integration tests: one binary, one module per area.

mod abuse;
mod backfill;
mod cli;
mod common;
mod compaction;
mod convert;
mod crash;
mod daemon;
mod decode_fixtures;
mod decode_frames;
mod decode_props;
mod faults;
mod ingest;
mod layout;
mod lease;
mod pds;
mod pg;
mod queries;
mod reconnect;
mod schemas;
mod sim_shape;
mod sql;
mod storage;
mod time_bounds;
mod tools;
