//! Jetstream lines (and zstd messages with the v1 dictionary): never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    use atlake::decode::jetstream::*;
    let _ = JetstreamDecoder::new(JetstreamOptions { normalize: true }).decode(data);
    let _ = JetstreamDecoder::new(JetstreamOptions { normalize: false }).decode(data);
    if let Ok(mut z) = ZstdCodec::try_new() {
        let _ = z.decompress(data);
    }
});
