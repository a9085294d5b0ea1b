//! The atproto interop fixtures: data model round trips, valid/invalid data, syntax lists.

use crate::common::{fixture, fixture_lines};
use atlake::decode::cbor::{Encoder, JsonWriter, decode_base64, validate_json};
use atlake::decode::cid::Cid;
use atlake::syntax;
use serde_json::Value;

fn load(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

#[test]
fn data_model_fixtures_cbor_to_json_and_cid() {
    let cases = load("atproto-interop-tests/data-model/data-model-fixtures.json");
    let cases = cases.as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let cbor = decode_base64(case["cbor_base64"].as_str().unwrap()).unwrap();
        let mut out = Vec::new();
        JsonWriter::new().record_to_json(&cbor, &mut out).unwrap();
        let ours: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(ours, case["json"], "CBOR -> JSON");
        assert_eq!(
            Cid::for_dag_cbor(&cbor).to_string(),
            case["cid"].as_str().unwrap(),
            "computed CID"
        );
        // and back: JSON -> canonical DAG-CBOR gives the fixture bytes
        let mut e = Encoder::new();
        e.json(&case["json"]).unwrap();
        assert_eq!(e.buf, cbor, "JSON -> CBOR");
    }
}

#[test]
fn data_model_valid_cases_pass() {
    for case in load("atproto-interop-tests/data-model/data-model-valid.json")
        .as_array()
        .unwrap()
    {
        assert_eq!(validate_json(&case["json"]), Ok(()), "{}", case["note"]);
    }
}

#[test]
fn data_model_invalid_cases_fail() {
    let cases = load("atproto-interop-tests/data-model/data-model-invalid.json");
    assert_eq!(cases.as_array().unwrap().len(), 12);
    for case in cases.as_array().unwrap() {
        assert!(validate_json(&case["json"]).is_err(), "{}", case["note"]);
    }
}

fn check_lists(name: &str, f: fn(&str) -> bool) {
    let valid = fixture_lines(&format!(
        "atproto-interop-tests/syntax/{name}_syntax_valid.txt"
    ));
    let invalid = fixture_lines(&format!(
        "atproto-interop-tests/syntax/{name}_syntax_invalid.txt"
    ));
    assert!(!valid.is_empty() && !invalid.is_empty());
    for v in &valid {
        assert!(f(v), "{name}: should be valid: {v:?}");
    }
    for v in &invalid {
        assert!(!f(v), "{name}: should be invalid: {v:?}");
    }
}

#[test]
fn syntax_nsid() {
    check_lists("nsid", syntax::is_nsid);
}

#[test]
fn syntax_did() {
    check_lists("did", syntax::is_did);
}

#[test]
fn syntax_handle() {
    check_lists("handle", syntax::is_handle);
}

#[test]
fn syntax_recordkey() {
    check_lists("recordkey", syntax::is_rkey);
}

#[test]
fn syntax_tid() {
    check_lists("tid", syntax::is_tid);
}

#[test]
fn syntax_aturi() {
    check_lists("aturi", syntax::is_at_uri);
}

#[test]
fn syntax_atidentifier() {
    check_lists("atidentifier", syntax::is_at_identifier);
}

#[test]
fn syntax_cid() {
    check_lists("cid", syntax::is_cid_string);
}

#[test]
fn syntax_datetime() {
    check_lists("datetime", syntax::is_datetime);
}

#[test]
fn syntax_language() {
    check_lists("language", syntax::is_language);
}

#[test]
fn syntax_uri() {
    check_lists("uri", syntax::is_uri);
}

#[test]
fn datetime_parse_invalid_cases_fail_to_parse() {
    let lines = fixture_lines("atproto-interop-tests/syntax/datetime_parse_invalid.txt");
    assert!(!lines.is_empty());
    for l in lines {
        assert!(syntax::is_datetime(&l), "syntactically fine: {l:?}");
        assert!(
            syntax::parse_datetime_us(&l).is_err(),
            "must not parse: {l:?}"
        );
    }
    for l in fixture_lines("atproto-interop-tests/syntax/datetime_syntax_valid.txt") {
        assert!(syntax::parse_datetime_us(&l).is_ok(), "valid parses: {l:?}");
    }
}
