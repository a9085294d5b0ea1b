//! Identifier syntax checks on arbitrary strings: never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        use atlake::syntax::*;
        let _ = (is_nsid(s), is_did(s), is_handle(s), is_rkey(s), is_tid(s), is_at_uri(s));
        let _ = (is_cid_string(s), is_datetime(s), parse_datetime_us(s), is_language(s), is_uri(s));
        let _ = (is_nsid_pattern(s), tid_timestamp_us(s), split_at_uri(s));
        let _ = atlake::decode::cid::Cid::parse(s);
    }
});
