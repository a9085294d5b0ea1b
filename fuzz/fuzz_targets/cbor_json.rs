//! DAG-CBOR → atproto JSON: never panics; when it succeeds the output is valid JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let mut w = atlake::decode::cbor::JsonWriter::new();
    if w.value_to_json(data, &mut out).is_ok() {
        assert!(serde_json::from_slice::<serde_json::Value>(&out).is_ok());
    }
    let mut r = atlake::decode::cbor::Reader::new(data);
    let _ = r.skip(atlake::decode::cbor::MAX_DEPTH);
});
