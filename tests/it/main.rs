//! atlake's integration tests: one binary, one module per area.

mod common;
mod convert;
mod decode_fixtures;
mod decode_frames;
mod decode_props;
mod sim_shape;
mod ingest;
