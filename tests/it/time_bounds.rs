//! Times that cannot hide data: absurd stream times and seqs, through `ingest --input` and
//! through live sources. No row disappears from SQL, no partition is written that the lake
//! cannot parse, and no absurd value becomes the checkpoint.

use crate::common::{
    assert_exactly_once, local_checkpoint, read_lake, seeded, start_sim, wait_until,
};
use crate::ingest::test_config;
use atlake::config::SourceKind;
use atlake::ingest::{self, Input};
use atlake::model::cursor::NETWORK_EPOCH_US;
use atlake::query::{Limits, QueryEngine};
use atlake::simulate::server::{BAD_TIMES_US, Faults, SimConfig, Truth};
use atlake::simulate::traffic::{Traffic, TrafficConfig};
use atlake::sink::store::Lake;
use atlake::source::capture::{CaptureFormat, CaptureWriter, Compression};
use std::time::Duration;

/// One number from a SQL query.
async fn sql_count(lake: &str, sql: &str) -> i64 {
    let engine = QueryEngine::try_new(Lake::open(lake).unwrap(), None, Limits::default()).unwrap();
    let batches = engine.collect(sql).await.unwrap();
    let c = batches[0].column(0);
    arrow::array::cast::AsArray::as_primitive::<arrow::datatypes::Int64Type>(c).value(0)
}

/// Every `.parquet` under the lake's data directories is a file the lake lists (none was
/// written under a partition it cannot parse).
async fn assert_every_file_parses(dir: &std::path::Path) {
    let on_disk = crate::common::files_under(&[dir.join("events"), dir.join("_errors")])
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .count();
    let listed = atlake::checkpoint::list_files(&Lake::open(dir.to_str().unwrap()).unwrap())
        .await
        .unwrap()
        .len();
    assert_eq!(listed, on_disk, "files on disk that the lake cannot parse");
}

/// A Jetstream capture whose lines 1000.. are interleaved with distinct events at absurd
/// times: year 10000 and `i64::MAX` three times each, as in the issue, plus 0, negative, 2020
/// and 2050. Returns the truth of the good lines, the absurd lines' count, and the newest good
/// `time_us`.
fn hostile_jetstream_capture(path: &std::path::Path) -> (Truth, u64, i64, u64) {
    let mut t = Traffic::new(TrafficConfig {
        seed: 41,
        ..Default::default()
    });
    let mut w =
        CaptureWriter::create(path, CaptureFormat::JetstreamJson, Compression::None).unwrap();
    let mut truth = Truth::default();
    let mut last = 0;
    let mut bad = 0u64;
    let absurd: Vec<i64> = [253_402_300_800_000_000; 3]
        .into_iter()
        .chain([i64::MAX; 3])
        .chain(BAD_TIMES_US[2..].iter().copied())
        .collect();
    let mut lines = 0u64;
    for i in 0..2000u64 {
        let m = t.next_message();
        for (time_us, line) in m.jetstream_lines() {
            w.write(&line).unwrap();
            last = time_us;
            lines += 1;
        }
        truth.add_message(&m);
        if i >= 1000 && ((i - 1000) as usize) < absurd.len() {
            let mut env = m.events[0].clone();
            env.time_us = absurd[(i - 1000) as usize];
            env.seq = None;
            if let atlake::model::EventData::Commit(c) = &mut env.event.data {
                c.rkey = atlake::model::Rkey::parse(format!("hostile{i}")).unwrap();
            }
            let mut line = Vec::new();
            assert!(atlake::decode::jetstream::write_line(&env, &mut line));
            // a field atlake does not write: the quarantine must keep the line as it came
            line.splice(1..1, br#""x_hostile":1,"#.iter().copied());
            w.write(&line).unwrap();
            bad += 1;
            lines += 1;
        }
    }
    w.finish().unwrap();
    (truth, bad, last, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_jetstream_times_through_ingest_input_are_quarantined_and_never_a_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("hostile.jsonl");
    let (truth, bad, last_good, lines) = hostile_jetstream_capture(&cap);
    let lake = dir.path().join("lake");
    let out = std::process::Command::new(crate::common::atlake_bin())
        .args([
            "ingest",
            "--input",
            cap.to_str().unwrap(),
            "--lake",
            lake.to_str().unwrap(),
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // the summary counts every line, the events written and the lines quarantined
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary = format!(
        "ingest: {lines} messages, {} events written, {bad} quarantined, 0 duplicates skipped, 0 filtered,",
        truth.events()
    );
    assert!(stderr.contains(&summary), "{summary}\n{stderr}");
    let got = read_lake(&Lake::open(lake.to_str().unwrap()).unwrap()).await;
    assert_exactly_once(&got, &truth);
    assert_eq!(
        got.errors.get("time_range").copied(),
        Some(bad),
        "{:?}",
        got.errors
    );
    // each quarantined line is the line as it came, not the event written again
    assert_eq!(
        sql_count(
            lake.to_str().unwrap(),
            "SELECT count(*) FROM errors WHERE reason = 'time_range' AND strpos(CAST(raw AS VARCHAR), '{\"x_hostile\":1,') = 1"
        )
        .await,
        bad as i64
    );
    // the checkpoint is the newest good time, not the end of time
    assert_eq!(local_checkpoint(&lake, "jetstream"), Some(last_good));
    let l = lake.to_str().unwrap();
    assert_eq!(
        sql_count(l, "SELECT count(*) FROM events").await,
        truth.events() as i64
    );
    assert_eq!(
        sql_count(l, "SELECT count(*) FROM errors WHERE reason = 'time_range'").await,
        bad as i64
    );
    // the quarantine is partitioned by receive time, its rows' time_us within the window
    assert_eq!(
        sql_count(
            l,
            &format!("SELECT count(*) FROM errors WHERE time_us < {NETWORK_EPOCH_US}")
        )
        .await,
        0
    );
    assert_every_file_parses(&lake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_firehose_times_are_kept_by_receive_time_and_absurd_seqs_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("hostile.frames");
    let mut t = Traffic::new(TrafficConfig {
        seed: 42,
        ..Default::default()
    });
    let mut w = CaptureWriter::create(&cap, CaptureFormat::Frames, Compression::None).unwrap();
    let mut truth = Truth::default();
    let (mut last_seq, mut bad_seq, mut bad_time_events) = (0, 0u64, 0u64);
    let bad_seqs = [i64::MAX, i64::MIN, 0, -7];
    for i in 0..1500u64 {
        let m = t.next_message();
        truth.add_message(&m);
        last_seq = m.seq;
        if i % 100 == 50 {
            // a commit time from the far future, or from 1970: the event stays
            let when = atlake::simulate::server::BAD_FRAME_TIMES[(i / 100) as usize % 2];
            w.write(&atlake::simulate::faults::with_time(&m.frame, when).unwrap())
                .unwrap();
            bad_time_events += m.events.len() as u64;
        } else {
            w.write(&m.frame).unwrap();
        }
        if i % 300 == 150 {
            let s = bad_seqs[(i / 300) as usize % bad_seqs.len()];
            w.write(&atlake::simulate::faults::with_seq(&m.frame, s).unwrap())
                .unwrap();
            bad_seq += 1;
        }
    }
    w.finish().unwrap();
    let lake = dir.path().join("lake");
    let l = lake.to_str().unwrap();
    let before = atlake::model::cursor::now_us();
    let h = ingest::start(test_config(l), Input::File(cap.clone()))
        .await
        .unwrap();
    let s = h.wait().await.unwrap();
    let after = atlake::model::cursor::now_us();
    assert!(s.clean);
    let got = read_lake(&Lake::open(l).unwrap()).await;
    assert_exactly_once(&got, &truth);
    assert_eq!(
        got.errors.get("seq").copied(),
        Some(bad_seq),
        "{:?}",
        got.errors
    );
    assert_eq!(local_checkpoint(&lake, "firehose"), Some(last_seq));
    // kept, with the claimed time beside the receive time, and found by a query on the time
    // they were received (which prunes files by their partition hour)
    assert_eq!(
        sql_count(
            l,
            "SELECT count(*) FROM events WHERE claimed_time_us IS NOT NULL"
        )
        .await,
        bad_time_events as i64
    );
    assert_eq!(
        sql_count(
            l,
            &format!(
                "SELECT count(*) FROM events WHERE claimed_time_us IS NOT NULL \
                 AND time_us BETWEEN {before} AND {after}"
            )
        )
        .await,
        bad_time_events as i64
    );
    assert_every_file_parses(&lake).await;
}

/// Live sources with the simulator's `bad-time` and `bad-seq` faults.
async fn live(kind: SourceKind) {
    let n = 3000;
    let sim = start_sim(SimConfig {
        messages: Some(n),
        retention: 1_000_000,
        faults: Faults {
            bad_time_every: Some(97),
            bad_seq_every: Some(131),
            ..Default::default()
        },
        ..seeded(43)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let l = dir.path().to_str().unwrap().to_string();
    let mut cfg = test_config(&l);
    cfg.source.kind = kind;
    cfg.source.url = sim.url();
    cfg.source.start_cursor = Some(0);
    let h = ingest::start(cfg, Input::Network).await.unwrap();
    sim.wait_for_messages(n).await;
    let (name, target) = match kind {
        SourceKind::Firehose => ("firehose", sim.last_seq().unwrap()),
        SourceKind::Jetstream => ("jetstream", sim.truth().last_time_us.unwrap()),
        SourceKind::Repo => unreachable!("not a live source"),
    };
    let ok = wait_until(Duration::from_secs(120), || {
        local_checkpoint(dir.path(), name).is_some_and(|c| c >= target)
    })
    .await;
    assert!(ok, "did not catch up");
    h.stop(Duration::from_secs(10)).await.unwrap();
    // nothing past the newest real position ever became the checkpoint
    assert_eq!(local_checkpoint(dir.path(), name), Some(target));
    let truth = sim.truth();
    let got = read_lake(&Lake::open(&l).unwrap()).await;
    assert_exactly_once(&got, &truth);
    let fault = |k: &str| truth.faults.get(k).copied().unwrap_or(0);
    match kind {
        SourceKind::Jetstream => {
            assert!(fault("bad_time") > 0);
            assert_eq!(
                got.errors.get("time_range").copied(),
                Some(fault("bad_time"))
            );
        }
        SourceKind::Firehose => {
            assert!(fault("bad_seq") > 0 && fault("bad_frame_time") > 0);
            assert_eq!(got.errors.get("seq").copied(), Some(fault("bad_seq")));
            assert!(
                sql_count(
                    &l,
                    "SELECT count(*) FROM events WHERE claimed_time_us IS NOT NULL"
                )
                .await
                    >= fault("bad_frame_time") as i64
            );
        }
        SourceKind::Repo => unreachable!("not a live source"),
    }
    assert_eq!(
        sql_count(&l, "SELECT count(*) FROM events").await,
        truth.events() as i64
    );
    assert_every_file_parses(dir.path()).await;
    sim.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_times_from_a_live_jetstream() {
    live(SourceKind::Jetstream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_times_and_seqs_from_a_live_firehose() {
    live(SourceKind::Firehose).await;
}
