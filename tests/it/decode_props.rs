//! Property tests: random DAG-CBOR values, written by an encoder that lives in this test (not the
//! library's), decode to exactly the JSON text an independent oracle predicts; random bytes never
//! make a decoder panic.

use atlake::decode::cbor::JsonWriter;
use atlake::decode::events::FrameDecoder;
use atlake::decode::frame::parse_frame;
use atlake::decode::jetstream::{JetstreamDecoder, JetstreamOptions};
use data_encoding::BASE64_NOPAD;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
enum V {
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
    Bool(bool),
    Null,
    Link(bool, [u8; 32]),
    Array(Vec<V>),
    Map(Vec<(String, V)>),
}

fn leaf() -> impl Strategy<Value = V> {
    prop_oneof![
        any::<i64>().prop_map(V::Int),
        (-30i64..30).prop_map(V::Int),
        "[a-z <>&\"\\\\\n\té😀\u{2028}\u{1}]{0,20}".prop_map(V::Text),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(V::Bytes),
        any::<bool>().prop_map(V::Bool),
        Just(V::Null),
        (any::<bool>(), any::<[u8; 32]>()).prop_map(|(raw, d)| V::Link(raw, d)),
    ]
}

fn value() -> impl Strategy<Value = V> {
    leaf().prop_recursive(5, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(V::Array),
            proptest::collection::btree_map("[a-zA-Z0-9_é]{1,8}", inner, 0..6)
                .prop_map(|m| V::Map(m.into_iter().collect())),
        ]
    })
}

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    match n {
        0..=23 => out.push(m | n as u8),
        24..=0xff => out.extend([m | 24, n as u8]),
        0x100..=0xffff => {
            out.push(m | 25);
            out.extend((n as u16).to_be_bytes())
        }
        0x1_0000..=0xffff_ffff => {
            out.push(m | 26);
            out.extend((n as u32).to_be_bytes())
        }
        _ => {
            out.push(m | 27);
            out.extend(n.to_be_bytes())
        }
    }
}

/// The test's own DAG-CBOR encoder.
fn enc(v: &V, out: &mut Vec<u8>) {
    match v {
        V::Int(i) if *i >= 0 => head(out, 0, *i as u64),
        V::Int(i) => head(out, 1, (-1 - *i) as u64),
        V::Text(s) => {
            head(out, 3, s.len() as u64);
            out.extend(s.as_bytes())
        }
        V::Bytes(b) => {
            head(out, 2, b.len() as u64);
            out.extend(b)
        }
        V::Bool(b) => out.push(if *b { 0xf5 } else { 0xf4 }),
        V::Null => out.push(0xf6),
        V::Link(raw, d) => {
            out.extend([
                0xd8,
                0x2a,
                0x58,
                0x25,
                0x00,
                0x01,
                if *raw { 0x55 } else { 0x71 },
                0x12,
                0x20,
            ]);
            out.extend(d)
        }
        V::Array(a) => {
            head(out, 4, a.len() as u64);
            a.iter().for_each(|x| enc(x, out))
        }
        V::Map(m) => {
            let mut m = m.clone();
            m.sort_by(|a, b| (a.0.len(), a.0.as_bytes()).cmp(&(b.0.len(), b.0.as_bytes())));
            head(out, 5, m.len() as u64);
            for (k, x) in &m {
                head(out, 3, k.len() as u64);
                out.extend(k.as_bytes());
                enc(x, out);
            }
        }
    }
}

fn esc(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '<' | '>' | '&' | '\u{0}'..='\u{1f}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            '\u{2028}' | '\u{2029}' => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn b32(bytes: &[u8]) -> String {
    let spec = {
        let mut s = data_encoding::Specification::new();
        s.symbols.push_str("abcdefghijklmnopqrstuvwxyz234567");
        s.encoding().unwrap()
    };
    format!("b{}", spec.encode(bytes))
}

/// The JSON text the decoder must produce.
fn oracle(v: &V, out: &mut String) {
    match v {
        V::Int(i) => out.push_str(&i.to_string()),
        V::Text(s) => esc(s, out),
        V::Bytes(b) => out.push_str(&format!("{{\"$bytes\":\"{}\"}}", BASE64_NOPAD.encode(b))),
        V::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        V::Null => out.push_str("null"),
        V::Link(raw, d) => {
            let mut cid = vec![0x01, if *raw { 0x55 } else { 0x71 }, 0x12, 0x20];
            cid.extend(d);
            out.push_str(&format!("{{\"$link\":\"{}\"}}", b32(&cid)))
        }
        V::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                oracle(x, out);
            }
            out.push(']');
        }
        V::Map(m) => {
            let mut m = m.clone();
            m.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                esc(k, out);
                out.push(':');
                oracle(x, out);
            }
            out.push('}');
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_values_decode_to_the_predicted_json(v in value()) {
        let mut bytes = Vec::new();
        enc(&v, &mut bytes);
        let mut out = Vec::new();
        JsonWriter::new().value_to_json(&bytes, &mut out).unwrap();
        let mut want = String::new();
        oracle(&v, &mut want);
        prop_assert_eq!(String::from_utf8(out).unwrap(), want);
        // the CID of the block is the sha256 of these exact bytes
        let d: [u8; 32] = Sha256::digest(&bytes).into();
        prop_assert!(atlake::decode::cid::Cid::for_dag_cbor(&bytes).digest() == &d);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut out = Vec::new();
        let _ = JsonWriter::new().value_to_json(&bytes, &mut out);
        let _ = parse_frame(&bytes);
        let mut events = Vec::new();
        FrameDecoder::default().decode(&bytes, &mut events);
        let _ = JetstreamDecoder::new(JetstreamOptions { normalize: true }).decode(&bytes);
        let _ = atlake::decode::car::Car::parse(&bytes, true);
    }
}
