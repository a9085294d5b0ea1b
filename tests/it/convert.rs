//! `atlake convert` on every capture format, through the real binary.

use crate::common::atlake_bin;
use atlake::decode::jetstream::write_line;
use atlake::simulate::traffic::{Traffic, TrafficConfig};
use atlake::source::capture::{CaptureFormat, CaptureWriter, Compression};
use std::process::Command;

fn expected_lines(msgs: &[atlake::simulate::traffic::SimMessage]) -> Vec<String> {
    let mut out = Vec::new();
    for m in msgs {
        for e in &m.events {
            let mut b = Vec::new();
            if write_line(e, &mut b) {
                out.push(String::from_utf8(b).unwrap());
            }
        }
    }
    out
}

#[test]
fn converts_every_capture_format() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Traffic::new(TrafficConfig {
        seed: 7,
        ..Default::default()
    });
    let msgs: Vec<_> = (0..400).map(|_| t.next_message()).collect();
    let from_frames = expected_lines(&msgs);
    assert!(from_frames.len() >= 400);
    // the Jetstream capture of the same traffic, with Jetstream's own time_us
    let js_lines: Vec<String> = msgs
        .iter()
        .flat_map(|m| m.jetstream_lines())
        .map(|(_, l)| String::from_utf8(l).unwrap())
        .collect();
    for format in [
        CaptureFormat::Frames,
        CaptureFormat::LengthPrefixed,
        CaptureFormat::JetstreamJson,
    ] {
        for compression in [Compression::None, Compression::Zstd, Compression::Gzip] {
            let path = dir.path().join(format!("cap-{format:?}-{compression:?}"));
            let mut w = CaptureWriter::create(&path, format, compression).unwrap();
            if format == CaptureFormat::JetstreamJson {
                for l in &js_lines {
                    w.write(l.as_bytes()).unwrap();
                }
            } else {
                for m in &msgs {
                    w.write(&m.frame).unwrap();
                }
            }
            w.finish().unwrap();
            let out = Command::new(atlake_bin())
                .args(["convert", "--input"])
                .arg(&path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{format:?}/{compression:?}: {stderr}");
            let got: Vec<String> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|s| s.to_string())
                .collect();
            let want = if format == CaptureFormat::JetstreamJson {
                &js_lines
            } else {
                &from_frames
            };
            assert_eq!(got.len(), want.len(), "{format:?}/{compression:?}");
            assert_eq!(&got, want, "{format:?}/{compression:?}");
            assert!(stderr.contains(format.as_str()), "{stderr}");
        }
    }
}

#[test]
fn convert_normalises_jetstream_json_and_sets_aside_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.jsonl");
    let good_cid = {
        let mut e = atlake::decode::cbor::Encoder::new();
        e.json(&serde_json::json!({"$type":"app.bsky.feed.like","createdAt":"2026-07-04T14:38:07.000Z","subject":{"cid":"bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq","uri":"at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3mmoojp7etg2g"}})).unwrap();
        atlake::decode::cid::Cid::for_dag_cbor(&e.buf).to_string()
    };
    // keys out of order and spaces: normalised on output
    let messy = format!(
        r#"{{ "kind":"commit", "time_us":1779719009132431, "did":"did:plc:ewvi7nxzyoun6zhxrhs64oiz", "commit":{{"collection":"app.bsky.feed.like","rkey":"3mmoojp7etg2g","rev":"3mmoojp7vgo2g","operation":"create","cid":"{good_cid}","record":{{"subject":{{"uri":"at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3mmoojp7etg2g","cid":"bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq"}},"createdAt":"2026-07-04T14:38:07.000Z","$type":"app.bsky.feed.like"}}}}}}"#
    );
    let wrong_cid = messy.replace(
        &good_cid,
        "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq",
    );
    let float = messy
        .replace("\"rkey\"", "\"x\":1.5,\"rkey\"")
        .replace("\"createdAt\":\"2026", "\"n\":1.5,\"createdAt\":\"2026");
    std::fs::write(
        &path,
        format!("{messy}\nnot json\n{wrong_cid}\n{float}\n\n"),
    )
    .unwrap();
    let out = Command::new(atlake_bin())
        .args(["convert", "--input"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        stdout,
        format!(
            "{{\"did\":\"did:plc:ewvi7nxzyoun6zhxrhs64oiz\",\"time_us\":1779719009132431,\"kind\":\"commit\",\"commit\":{{\"rev\":\"3mmoojp7vgo2g\",\"operation\":\"create\",\"collection\":\"app.bsky.feed.like\",\"rkey\":\"3mmoojp7etg2g\",\"record\":{{\"$type\":\"app.bsky.feed.like\",\"createdAt\":\"2026-07-04T14:38:07.000Z\",\"subject\":{{\"cid\":\"bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq\",\"uri\":\"at://did:plc:ewvi7nxzyoun6zhxrhs64oiz/app.bsky.feed.post/3mmoojp7etg2g\"}}}},\"cid\":\"{good_cid}\"}}}}\n"
        )
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("set aside: json: 1"), "{stderr}");
    assert!(stderr.contains("set aside: record: 2"), "{stderr}");
}

#[test]
fn convert_reports_a_missing_file_in_one_line() {
    let out = Command::new(atlake_bin())
        .args(["convert", "--input", "/nonexistent/x.cap"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("No such file"), "{stderr}");
}
