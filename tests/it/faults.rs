//! Faults, bad input and abuse: relays that misbehave, hostile names, mutated frames. Each test
//! checks that ingest goes on, that the fault is counted under its reason in the metrics, and
//! that what could not be decoded is in the `_errors` quarantine instead of vanishing.

use crate::common::{
    assert_exactly_once, local_checkpoint, read_lake, seeded, start_sim, wait_until,
};
use crate::ingest::test_config;
use atlake::config::SourceKind;
use atlake::ingest::{self, Input};
use atlake::simulate::server::{Faults, SimConfig};
use atlake::simulate::traffic::{Traffic, TrafficConfig};
use atlake::sink::store::Lake;
use atlake::source::capture::{CaptureFormat, CaptureWriter, Compression};
use std::time::Duration;

/// The value of a metric sample (summed over label sets that contain `labels`).
pub fn metric(name: &str, labels: &str) -> f64 {
    atlake::telemetry::samples(&atlake::telemetry::metrics().render())
        .into_iter()
        .filter(|s| s.name == name && s.labels.contains(labels))
        .map(|s| s.value)
        .sum()
}

async fn live(
    kind: SourceKind,
    faults: Faults,
    n: u64,
    tweak: impl FnOnce(&mut atlake::config::Config),
) -> (atlake::simulate::server::Truth, crate::common::LakeContents) {
    atlake::telemetry::metrics();
    let sim = start_sim(SimConfig {
        messages: Some(n),
        retention: 1_000_000,
        faults,
        ..seeded(99)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().to_str().unwrap().to_string();
    let mut cfg = test_config(&lake);
    cfg.source.kind = kind;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    tweak(&mut cfg);
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    sim.wait_for_messages(n).await;
    let (source, target) = match kind {
        SourceKind::Firehose => ("firehose", sim.last_seq().unwrap()),
        SourceKind::Jetstream => ("jetstream", sim.truth().last_time_us.unwrap()),
        SourceKind::Repo => unreachable!("not a live source"),
    };
    let ok = wait_until(Duration::from_secs(120), || {
        local_checkpoint(dir.path(), source).is_some_and(|c| c >= target)
    })
    .await;
    assert!(ok, "ingest did not catch up");
    h.stop(Duration::from_secs(10)).await.unwrap();
    let got = read_lake(&Lake::open(&lake).unwrap()).await;
    let truth = sim.truth();
    sim.stop();
    (truth, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_faults_are_counted_quarantined_and_survived() {
    let before = |r: &str| metric("atlake_quarantined_total", &format!("reason=\"{r}\""));
    let b = [
        before("oversized"),
        before("record_too_large"),
        before("hash_mismatch"),
        before("car"),
        before("frame"),
    ];
    let dups = metric("atlake_duplicates_total", "reason=\"seq\"");
    let too_slow = metric("atlake_stream_errors_total", "error=\"ConsumerTooSlow\"");
    let (truth, got) = live(
        SourceKind::Firehose,
        Faults {
            garbage_every: Some(700),
            oversized_every: Some(1100),
            big_record_every: Some(1200),
            bad_hash_every: Some(800),
            truncated_car_every: Some(1000),
            backwards_every: Some(600),
            too_slow_every: Some(900),
            ..Default::default()
        },
        3000,
        |_| {},
    )
    .await;
    assert_exactly_once(&got, &truth);
    let want = |name: &str| truth.faults.get(name).copied().unwrap_or(0);
    assert!(want("oversized") > 0 && want("record_too_large") > 0 && want("hash_mismatch") > 0);
    // each fault is in the quarantine once, under its reason
    for (fault, reason) in [
        ("oversized", "oversized"),
        ("record_too_large", "record_too_large"),
        ("hash_mismatch", "hash_mismatch"),
        ("car", "car"),
        ("garbage", "frame"),
    ] {
        assert_eq!(
            got.errors.get(reason).copied().unwrap_or(0),
            want(fault),
            "quarantined {reason}: {:?}",
            got.errors
        );
    }
    // and counted in the metrics (at least once each: replays after a dropped connection may
    // decode the same bad frame again before it is deduplicated)
    let after = [
        before("oversized"),
        before("record_too_large"),
        before("hash_mismatch"),
        before("car"),
        before("frame"),
    ];
    for (i, r) in [
        "oversized",
        "record_too_large",
        "hash_mismatch",
        "car",
        "frame",
    ]
    .iter()
    .enumerate()
    {
        assert!(
            after[i] - b[i] >= 1.0,
            "metric atlake_quarantined_total{{reason={r}}} did not move"
        );
    }
    assert!(
        metric("atlake_duplicates_total", "reason=\"seq\"") > dups,
        "a seq that went backwards was dropped and counted"
    );
    assert!(metric("atlake_stream_errors_total", "error=\"ConsumerTooSlow\"") > too_slow);
    assert!(metric("atlake_reconnects_total", "source=\"firehose\"") > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_relay_times_out_and_is_reconnected() {
    let before = metric("atlake_reconnects_total", "reason=\"timeout\"");
    let (truth, got) = live(
        SourceKind::Firehose,
        Faults {
            silent_connections: 1,
            ..Default::default()
        },
        500,
        |c| c.source.read_timeout.0 = Duration::from_millis(700),
    )
    .await;
    assert_exactly_once(&got, &truth);
    assert!(metric("atlake_reconnects_total", "reason=\"timeout\"") > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn future_and_outdated_cursors_are_acted_on() {
    atlake::telemetry::metrics();
    // a cursor beyond the relay's head: FutureCursor, then the live tip
    let fut = metric("atlake_stream_errors_total", "error=\"FutureCursor\"");
    let sim = start_sim(SimConfig {
        messages: None,
        rate: Some(400.0),
        retention: 2000,
        ..seeded(5)
    })
    .await;
    sim.wait_for_messages(100).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().to_str().unwrap().to_string();
    let mut cfg = test_config(&lake);
    cfg.source.kind = SourceKind::Firehose;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(sim.last_seq().unwrap() + 1_000_000);
    let h = ingest::start(cfg.clone(), Input::Network).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || metric(
            "atlake_stream_errors_total",
            "error=\"FutureCursor\""
        ) > fut)
        .await
    );
    let now = sim.last_seq().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || local_checkpoint(
            dir.path(),
            "firehose"
        )
        .is_some_and(|c| c > now))
        .await,
        "events flow from the live tip after FutureCursor"
    );
    let s = h.stop(Duration::from_secs(10)).await.unwrap();
    assert!(s.events > 0);
    // a cursor older than the replay window: #info OutdatedCursor, then the whole window
    sim.wait_for_messages(2500).await;
    let out = metric("atlake_info_total", "name=\"OutdatedCursor\"");
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg2 = test_config(dir2.path().to_str().unwrap());
    cfg2.source.kind = SourceKind::Firehose;
    cfg2.source.url = sim.url();
    cfg2.source.start_cursor = Some(1);
    let h2 = ingest::start(cfg2, Input::Network).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || metric(
            "atlake_info_total",
            "name=\"OutdatedCursor\""
        ) > out)
        .await
    );
    let now = sim.last_seq().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || local_checkpoint(
            dir2.path(),
            "firehose"
        )
        .is_some_and(|c| c >= now))
        .await,
        "caught up after OutdatedCursor"
    );
    let s = h2.stop(Duration::from_secs(10)).await.unwrap();
    assert!(
        s.events > 1500,
        "the whole window was replayed: {} events",
        s.events
    );
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_never_become_paths_and_are_quarantined() {
    atlake::telemetry::metrics();
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("hostile.jsonl");
    let did = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";
    let rec = r#"{"$type":"x.y.z","createdAt":"2026-07-04T14:38:07.000Z"}"#;
    let cid = {
        let mut e = atlake::decode::cbor::Encoder::new();
        e.json(&serde_json::from_str(rec).unwrap()).unwrap();
        atlake::decode::cid::Cid::for_dag_cbor(&e.buf).to_string()
    };
    let line = |did: &str, coll: &str, rkey: &str, t: u64| {
        format!(
            r#"{{"did":"{did}","time_us":{t},"kind":"commit","commit":{{"rev":"3mmoojp7vgo2g","operation":"create","collection":"{coll}","rkey":"{rkey}","record":{rec},"cid":"{cid}"}}}}"#
        )
    };
    let long_nsid = format!(
        "com.{}.{}.{}.{}.thing",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(63)
    );
    assert!(long_nsid.len() > 260 && atlake::syntax::is_nsid(&long_nsid));
    let mut lines: Vec<Vec<u8>> = vec![
        line(did, "../../x", "3mmoojp7etg2a", 1_783_173_600_000_001).into_bytes(),
        line(did, "a/b", "3mmoojp7etg2b", 1_783_173_600_000_002).into_bytes(),
        line(
            did,
            "Com.Example.thing",
            "3mmoojp7etg2c",
            1_783_173_600_000_003,
        )
        .into_bytes(),
        line(did, &long_nsid, "3mmoojp7etg2d", 1_783_173_600_000_004).into_bytes(),
        line(
            did,
            "app.bsky.feed.like",
            &"k".repeat(513),
            1_783_173_600_000_005,
        )
        .into_bytes(),
        line(
            &format!("did:plc:{}", "x".repeat(2100)),
            "app.bsky.feed.like",
            "3mmoojp7etg2e",
            1_783_173_600_000_006,
        )
        .into_bytes(),
        line(did, "app.bsky.feed.like", "..", 1_783_173_600_000_007).into_bytes(),
    ];
    let mut bad_utf8 = line(
        did,
        "app.bsky.feed.like",
        "3mmoojp7etg2f",
        1_783_173_600_000_008,
    )
    .into_bytes();
    let at = bad_utf8.len() / 2;
    bad_utf8[at] = 0xff;
    lines.push(bad_utf8);
    // and two good ones around them
    lines.push(
        line(
            did,
            "app.bsky.feed.like",
            "3mmoojp7etg2g",
            1_783_173_600_000_009,
        )
        .into_bytes(),
    );
    lines.push(
        line(
            did,
            "com.example.good",
            "3mmoojp7etg2h",
            1_783_173_600_000_010,
        )
        .into_bytes(),
    );
    let mut w =
        CaptureWriter::create(&cap, CaptureFormat::JetstreamJson, Compression::None).unwrap();
    for l in &lines {
        w.write(l).unwrap();
    }
    w.finish().unwrap();
    let lake_dir = dir.path().join("lake");
    let before = metric("atlake_quarantined_total", "");
    let h = ingest::start(test_config(lake_dir.to_str().unwrap()), Input::File(cap))
        .await
        .unwrap();
    let s = h.wait().await.unwrap();
    assert_eq!(
        (s.events, s.quarantined),
        (2, 8),
        "two good events land; eight hostile lines are quarantined"
    );
    assert!(metric("atlake_quarantined_total", "") - before >= 8.0);
    let got = read_lake(&Lake::open(lake_dir.to_str().unwrap()).unwrap()).await;
    assert_eq!(got.keys.len(), 2);
    let reasons: u64 = got.errors.values().sum();
    assert_eq!(reasons, 8, "{:?}", got.errors);
    assert!(
        got.errors.get("collection").copied().unwrap_or(0) >= 3,
        "{:?}",
        got.errors
    );
    assert!(
        got.errors.contains_key("rkey")
            && got.errors.contains_key("did")
            && got.errors.contains_key("json")
    );
    // no directory was named after anything hostile
    let mut stack = vec![lake_dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            assert!(p.starts_with(&lake_dir));
            assert!(
                !name.contains("..") && !name.contains("Com.") && name.len() < 200,
                "{}",
                p.display()
            );
            if p.is_dir() {
                stack.push(p);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_input_keeps_its_bytes_and_cursor() {
    let (_, got) = live(
        SourceKind::Firehose,
        Faults {
            garbage_every: Some(100),
            ..Default::default()
        },
        300,
        |_| {},
    )
    .await;
    assert_eq!(got.errors.get("frame").copied(), Some(3));
}

mod mutated {
    use super::*;
    use proptest::prelude::*;

    fn frames() -> Vec<Vec<u8>> {
        let mut t = Traffic::new(TrafficConfig {
            seed: 4,
            ..Default::default()
        });
        (0..40).map(|_| t.next_message().frame).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Real-looking frames with random byte flips, cuts and splices go through the whole
        /// ingest path (capture file → decode → batcher → Parquet → lake): nothing panics, every
        /// frame either lands as events or is quarantined, and the lake reads back.
        #[test]
        fn mutated_frames_through_the_whole_ingest_path(
            // the first frame stays intact: the capture's format is detected from it
            edits in proptest::collection::vec((1usize..40, any::<usize>(), any::<u8>(), 0u8..3), 1..30)
        ) {
            let mut fs = frames();
            for (which, pos, byte, kind) in edits {
                let f = &mut fs[which];
                if f.is_empty() { continue; }
                let p = pos % f.len();
                match kind {
                    0 => f[p] ^= byte | 1,
                    1 => f.truncate(p.max(1)),
                    _ => { let tail = f[p..].to_vec(); f.extend_from_slice(&tail[..tail.len().min(64)]); }
                }
            }
            let dir = tempfile::tempdir().unwrap();
            let cap = dir.path().join("cap");
            let mut w = CaptureWriter::create(&cap, CaptureFormat::LengthPrefixed, Compression::None).unwrap();
            for f in &fs { w.write(f).unwrap(); }
            w.finish().unwrap();
            let lake = dir.path().join("lake");
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let (summary, got) = rt.block_on(async {
                let h = ingest::start(test_config(lake.to_str().unwrap()), Input::File(cap)).await.unwrap();
                let s = h.wait().await.unwrap();
                (s, read_lake(&Lake::open(lake.to_str().unwrap()).unwrap()).await)
            });
            prop_assert!(summary.clean);
            prop_assert_eq!(summary.messages, 40);
            // every frame became events or errors (a frame can give both: good ops and bad ones)
            let errors: u64 = got.errors.values().sum();
            prop_assert_eq!(got.keys.len() as u64, summary.events);
            prop_assert_eq!(errors, summary.quarantined);
            prop_assert!(summary.events + summary.quarantined >= 1);
        }
    }
}
