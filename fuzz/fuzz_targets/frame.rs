//! subscribeRepos frames → events: never panics, every input gives events or typed errors.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = atlake::decode::frame::parse_frame(data);
    let mut out = Vec::new();
    atlake::decode::events::FrameDecoder::default().decode(data, &mut out);
});
