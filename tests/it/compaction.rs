//! The lake as a table, rewritten: compaction keeps every row once (through atlake, Delta
//! readers and plain Parquet readers), survives kill -9 at any moment, and the purge leaves no
//! trace of deleted records and accounts in any file.

use crate::common::{AtlakeChild, assert_exactly_once, atlake_bin, atlake_ok, read_committed};
use atlake::checkpoint::delta::{self, Table};
use atlake::config::Config;
use atlake::ingest::{self, Input};
use atlake::simulate::server::Truth;
use atlake::simulate::traffic::{Rng, Traffic, TrafficConfig};
use atlake::sink::partition::{LakeFile, PartitionName, Span};
use atlake::sink::store::Lake;
use atlake::source::capture::{CaptureFormat, CaptureWriter, Compression};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

/// A Jetstream capture of `n` simulated messages `step_us` apart, and its truth.
fn capture(path: &std::path::Path, n: u64, step_us: i64, seed: u64) -> Truth {
    let mut t = Traffic::new(TrafficConfig {
        seed,
        step_us,
        ..Default::default()
    });
    let mut w =
        CaptureWriter::create(path, CaptureFormat::JetstreamJson, Compression::Zstd).unwrap();
    let mut truth = Truth::default();
    for _ in 0..n {
        let m = t.next_message();
        for (_, l) in m.jetstream_lines() {
            w.write(&l).unwrap();
        }
        truth.add_message(&m);
    }
    w.finish().unwrap();
    truth
}

/// Ingests `cap` into `lake` with tiny flushes (many small files, as a long run makes).
async fn ingest_small_files(cap: &std::path::Path, lake: &std::path::Path) {
    let mut cfg = Config::default();
    cfg.lake.url = lake.to_str().unwrap().to_string();
    cfg.flush.max_rows = 150;
    cfg.flush.max_open_partitions = 24; // some collections share `_other`
    let h = ingest::start(cfg, Input::File(cap.to_path_buf()))
        .await
        .unwrap();
    h.wait().await.unwrap();
}

/// `atlake compact --purge` with a vacuum retention of 2 s, then, 2.1 s later, `atlake compact`
/// again: its vacuum deletes what the purge removed from the tables.
async fn purge_and_vacuum(lake: &std::path::Path) {
    let env = [
        ("ATLAKE_LAKE_VACUUM_RETENTION", "2s"),
        ("ATLAKE_SERVER_QUERY_TIMEOUT", "1s"),
    ];
    let out = compact(lake, &["--purge"], &env);
    assert!(out.contains("purge scan ran"), "{out}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    compact(lake, &[], &env);
}

/// `atlake compact` with `env` and `args`; panics with its output unless it succeeds.
fn compact(lake: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(atlake_bin())
        .args(["compact", "--lake", lake.to_str().unwrap()])
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "atlake compact failed: {text}");
    text
}

/// Asserts that the `events` log has at most one file per partition (hour or day) and source.
fn assert_one_file_per_partition(log: &delta::LogState) {
    let mut per_key: BTreeMap<(String, Span, i64, &str), usize> = BTreeMap::new();
    for f in log.files.values() {
        *per_key
            .entry((
                f.key.name.value().to_string(),
                f.key.span(),
                f.key.hour(),
                f.name.source().as_str(),
            ))
            .or_default() += 1;
    }
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
}

/// Every committed file's rows are in order: by time (`_other`: collection, then time).
fn assert_sorted(root: &std::path::Path, f: &LakeFile) {
    use arrow::array::AsArray;
    let file = std::fs::File::open(root.join(&f.path)).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut prev: Option<(String, i64)> = None;
    for b in reader {
        let b = b.unwrap();
        let t = b
            .column_by_name("time_us")
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>();
        let c = b.column_by_name("collection").unwrap().as_string::<i32>();
        for i in 0..b.num_rows() {
            let coll = if f.key.name == PartitionName::Other {
                c.value(i).to_string()
            } else {
                String::new()
            };
            let k = (coll, t.value(i));
            if let Some(p) = &prev {
                assert!(*p <= k, "{} is not sorted at row {i}", f.path);
            }
            prev = Some(k);
        }
    }
}

/// Compaction of closed partitions: the big collections end with one file per hour, the
/// long-tail ones with one file per day (`hour` null in the log); every file is sorted; and
/// atlake, the Python `deltalake` package, Polars (`scan_delta`, and `scan_parquet` over the
/// plain files after vacuum) and DuckDB all find the rows they found before, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_every_row_and_every_reader_agrees() {
    let Some(py) = crate::tools::python_with(&["deltalake", "polars", "duckdb"]) else {
        return crate::tools::missing("python3 with deltalake, polars and duckdb");
    };
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.zst");
    // 12,000 messages 0.8 s apart: about 2.7 hours of stream time
    let truth = capture(&cap, 12_000, 800_000, 41);
    let lake_dir = dir.path().join("lake");
    ingest_small_files(&cap, &lake_dir).await;
    let l = lake_dir.to_str().unwrap();
    let lake = Lake::open(l).unwrap();
    let before = delta::load(&lake, Table::Events).await.unwrap();
    let want = crate::common::sql_counts(l).await;
    assert_eq!(want.values().sum::<u64>(), truth.events());
    let env = [
        ("ATLAKE_PRIVACY_PURGE_DELETED", "false"),
        // the like, follow and post streams stay hourly, the long tail goes daily
        ("ATLAKE_COMPACTION_SMALL_DAY", "40KiB"),
        ("ATLAKE_LAKE_VACUUM_RETENTION", "2s"),
        ("ATLAKE_SERVER_QUERY_TIMEOUT", "1s"),
    ];
    let out = compact(&lake_dir, &[], &env);
    let after = delta::load(&lake, Table::Events).await.unwrap();
    eprintln!(
        "COMPACTION files {} -> {}: {out}",
        before.files.len(),
        after.files.len()
    );
    assert!(after.files.len() * 2 < before.files.len(), "{out}");
    // at most one file per hour (big) or per day (long tail), per source
    let mut per_key: BTreeMap<(String, Span, i64), usize> = BTreeMap::new();
    for f in after.files.values() {
        *per_key
            .entry((f.key.name.value().to_string(), f.key.span(), f.key.hour()))
            .or_default() += 1;
        assert_sorted(&lake_dir, f);
    }
    assert!(per_key.values().all(|n| *n == 1), "{per_key:?}");
    let spans: Vec<Span> = per_key.keys().map(|k| k.1).collect();
    assert!(
        spans.contains(&Span::Day) && spans.contains(&Span::Hour),
        "{per_key:?}"
    );
    // a long-tail day and an hourly big collection do not mix within a day
    for (name, span, hour) in per_key.keys() {
        if *span == Span::Day {
            assert!(
                !per_key
                    .keys()
                    .any(|k| &k.0 == name && k.1 == Span::Hour && k.2 / 24 == hour / 24),
                "{name} has a day file and hour files"
            );
        }
    }
    assert_eq!(
        crate::common::sql_counts(l).await,
        want,
        "atlake after compaction"
    );
    // the replaced files are still in storage until vacuum: Delta readers already see the
    // new snapshot; then vacuum, and plain readers agree too
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = compact(&lake_dir, &[], &env);
    assert!(out.contains("vacuum deleted"), "{out}");
    let v: serde_json::Value = serde_json::from_str(&crate::tools::run_python(
        &py,
        crate::ingest::DELTA_COUNTS,
        &[l, "jetstream"],
    ))
    .unwrap();
    for reader in ["delta", "polars_delta", "polars_plain", "duckdb"] {
        let got: BTreeMap<String, u64> = v[reader]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
            .collect();
        assert_eq!(got, want, "{reader} after compaction and vacuum");
    }
    assert_eq!(v["files"].as_u64(), Some(after.files.len() as u64));
    assert!(
        v["null_hour_rows"].as_u64().unwrap() > 0,
        "day files have a null hour"
    );
    // the cursor survives compaction
    assert_eq!(
        v["txn"].as_i64(),
        after.txn(atlake::model::SourceKind::Jetstream).map(|t| t.0)
    );
    assert_exactly_once(&read_committed(&lake).await, &truth);
    let listed = atlake::checkpoint::list_files(&lake).await.unwrap();
    assert_eq!(
        listed.len(),
        after.files.len(),
        "vacuum left only committed files"
    );
}

/// kill -9 of `atlake compact` at random moments, 12 times (several in the middle of a
/// rewrite, several in the middle of a commit), then one run to the end: nothing lost,
/// nothing doubled, through atlake and through the Python `deltalake` package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_compaction_loses_and_doubles_nothing() {
    let py = crate::tools::python_with(&["deltalake"]);
    if py.is_none() {
        crate::tools::missing("python3 with deltalake");
    }
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.zst");
    let truth = capture(&cap, 8_000, 800_000, 43);
    let lake_dir = dir.path().join("lake");
    ingest_small_files(&cap, &lake_dir).await;
    let l = lake_dir.to_str().unwrap().to_string();
    let lake = Lake::open(&l).unwrap();
    let want = crate::common::sql_counts(&l).await;
    let env: Vec<(String, String)> = [
        ("ATLAKE_PRIVACY_PURGE_DELETED", "false"),
        ("ATLAKE_COMPACTION_SMALL_DAY", "40KiB"),
        // every write (rewrites and commits) takes 40 ms longer: kills land inside them
        ("ATLAKE_FAULT_SLOW_WRITE_MS", "40"),
        ("ATLAKE_LOG", "info"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let args = ["compact", "--lake", l.as_str()];
    let mut rng = Rng::new(0x5EED);
    let (mut kills, mut mid_rewrite, mut mid_commit) = (0, 0, 0);
    let started = Instant::now();
    while kills < 12 || ((mid_rewrite == 0 || mid_commit == 0) && kills < 40) {
        let mut child = AtlakeChild::spawn(&args, &env, dir.path(), &format!("run{kills}"));
        let pid = child.pid();
        let suffix = format!(".{pid}.tmp");
        // every other kill waits for a temporary file of the wanted kind to exist
        let want_log = kills % 2 == 1;
        let until = Instant::now() + Duration::from_millis(200 + rng.below(1500));
        loop {
            let temps: Vec<std::path::PathBuf> =
                crate::common::files_under(std::slice::from_ref(&lake_dir))
                    .into_iter()
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with('.') && n.ends_with(&suffix))
                    })
                    .collect();
            let in_log = temps
                .iter()
                .any(|p| p.components().any(|c| c.as_os_str() == "_delta_log"));
            let in_data = temps.len() > usize::from(in_log);
            if (want_log && in_log) || (!want_log && in_data) || Instant::now() > until {
                break;
            }
            if child.child.0.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        child.child.0.kill().unwrap();
        let _ = child.child.0.wait();
        kills += 1;
        for p in crate::common::files_under(std::slice::from_ref(&lake_dir)) {
            let Some(n) = p.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if n.starts_with('.') && n.ends_with(&suffix) {
                if p.components().any(|c| c.as_os_str() == "_delta_log") {
                    mid_commit += 1;
                } else {
                    mid_rewrite += 1;
                }
            }
        }
        // what any reader sees at any moment is every row once
        assert_exactly_once(&read_committed(&lake).await, &truth);
    }
    let out = compact(
        &lake_dir,
        &[],
        &[
            ("ATLAKE_PRIVACY_PURGE_DELETED", "false"),
            ("ATLAKE_COMPACTION_SMALL_DAY", "40KiB"),
        ],
    );
    eprintln!(
        "COMPACTION CRASH RESULT kills={kills} mid_rewrite={mid_rewrite} mid_commit={mid_commit} events={} lost=0 duplicated=0 took={:?}: {out}",
        truth.events(),
        started.elapsed()
    );
    assert!(mid_rewrite > 0, "no kill landed during a rewrite");
    assert!(mid_commit > 0, "no kill landed during a commit");
    assert_exactly_once(&read_committed(&lake).await, &truth);
    assert_eq!(crate::common::sql_counts(&l).await, want);
    // a further run finds nothing left to compact
    let log = delta::load(&lake, Table::Events).await.unwrap();
    assert_one_file_per_partition(&log);
    if let Some(py) = py {
        let v: serde_json::Value = serde_json::from_str(&crate::tools::run_python(
            &py,
            crate::ingest::DELTA_COUNTS_ONLY,
            &[&l],
        ))
        .unwrap();
        let got: BTreeMap<String, u64> = v
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
            .collect();
        assert_eq!(got, want, "the Python deltalake package");
    }
}

/// Jetstream lines of a story: alice posts ten times and deletes five of them; bob gets a
/// handle, posts five times and deletes his account; carol posts five times. Returns the lines
/// and the strings that must disappear and stay.
fn purge_story() -> (Vec<String>, Vec<String>, Vec<String>) {
    let base = 1_783_173_600_000_000i64; // 2026-07-04T14:00Z
    let mut lines = Vec::new();
    let (mut gone, mut kept) = (Vec::new(), Vec::new());
    // TIDs in order (base32-sortable digits): a later rev sorts after an earlier one
    let tid = |i: usize| {
        const ABC: &[u8] = b"234567abcdefghijklmnopqrstuvwxyz";
        let digits: String = (0..5)
            .rev()
            .map(|k| ABC[(i >> (5 * k)) & 31] as char)
            .collect();
        format!("3mpt7ukd{digits}")
    };
    let post = |did: &str, i: usize, t: i64, text: &str| {
        let record = serde_json::json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": "2026-07-04T14:00:00.000Z"});
        let cid = atlake::decode::cid::Cid::for_dag_cbor(text.as_bytes()).to_string();
        let line = serde_json::json!({"did": did, "time_us": t, "kind": "commit", "commit": {
            "rev": tid(i), "operation": "create", "collection": "app.bsky.feed.post",
            "rkey": tid(i), "record": record, "cid": cid}});
        (line.to_string(), cid)
    };
    let (alice, bob, carol) = (
        "did:plc:aliceaaaaaaaaaaaaaaaaaaa",
        "did:plc:bobbbbbbbbbbbbbbbbbbbbbb",
        "did:plc:carolccccccccccccccccccc",
    );
    let mut t = base;
    let mut next = || {
        t += 7_000_000;
        t
    };
    lines.push(
        serde_json::json!({"did": bob, "time_us": next(), "kind": "identity", "identity": {
            "did": bob, "handle": "bob-secret-handle.test", "seq": 5, "time": "2026-07-04T14:00:07.000Z"}})
        .to_string(),
    );
    for i in 0..10 {
        let text = format!("alice secret post {i}");
        let (l, cid) = post(alice, i, next(), &text);
        lines.push(l);
        if i < 5 {
            gone.extend([text, cid]);
        } else {
            kept.extend([text, cid]);
        }
    }
    for i in 0..5 {
        let text = format!("bob secret post {i}");
        let (l, cid) = post(bob, 100 + i, next(), &text);
        lines.push(l);
        gone.extend([text, cid]);
    }
    for i in 0..5 {
        let text = format!("carol keeps post {i}");
        let (l, cid) = post(carol, 200 + i, next(), &text);
        lines.push(l);
        kept.extend([text, cid]);
    }
    for i in 0..5 {
        lines.push(
            serde_json::json!({"did": alice, "time_us": next(), "kind": "commit", "commit": {
                "rev": tid(300 + i), "operation": "delete", "collection": "app.bsky.feed.post",
                "rkey": tid(i)}})
            .to_string(),
        );
    }
    lines.push(
        serde_json::json!({"did": bob, "time_us": next(), "kind": "account", "account": {
            "active": false, "status": "deleted", "did": bob, "seq": 9, "time": "2026-07-04T14:05:00.000Z"}})
        .to_string(),
    );
    gone.push("bob-secret-handle.test".into());
    (lines, gone, kept)
}

/// Quarantined lines of the same story (a rev that is no TID: each is set aside with its DID
/// and op path, the whole line kept as raw bytes), timed after carol's last post (148 s) and
/// before alice's first delete (154 s), so they go before the deletes, in the third run:
/// alice's of a post she deletes, bob's (his account is deleted), and carol's, which stays.
/// Returns the lines, the text the purge must remove and the text it must keep.
fn quarantine_story() -> (Vec<String>, Vec<String>, Vec<String>) {
    let base = 1_783_173_600_000_000i64;
    let (mut lines, mut gone, mut kept) = (Vec::new(), Vec::new(), Vec::new());
    for (n, (did, rkey, text)) in [
        (
            "did:plc:aliceaaaaaaaaaaaaaaaaaaa",
            "3mpt7ukd22222",
            "alice quarantined secret",
        ),
        (
            "did:plc:bobbbbbbbbbbbbbbbbbbbbbb",
            "3mpt7ukd223de",
            "bob quarantined secret",
        ),
        (
            "did:plc:carolccccccccccccccccccc",
            "3mpt7ukd2276i",
            "carol quarantined keeps",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let record = serde_json::json!({"$type": "app.bsky.feed.post", "text": text, "createdAt": "2026-07-04T14:00:00.000Z"});
        lines.push(
            serde_json::json!({"did": did, "time_us": base + 1_000_000 * (148 + n as i64), "kind": "commit", "commit": {
                "rev": "not-a-tid", "operation": "create", "collection": "app.bsky.feed.post",
                "rkey": rkey, "record": record, "cid": "bafyreib"}})
            .to_string(),
        );
        if n == 2 {
            kept.push(text.to_string());
        } else {
            gone.push(text.to_string());
        }
    }
    (lines, gone, kept)
}

/// Ingests the story in four runs (as a daemon restarted four times would), so that it lands
/// in several files; returns the runs' logs.
fn ingest_story(lines: &[String], dir: &std::path::Path, lake_dir: &std::path::Path) -> String {
    let mut log = String::new();
    for (i, part) in [&lines[..11], &lines[11..21], &lines[21..26], &lines[26..]]
        .iter()
        .enumerate()
    {
        let input = dir.join(format!("story{i}.jsonl"));
        std::fs::write(&input, part.join("\n") + "\n").unwrap();
        let out = Command::new(atlake_bin())
            .args(["ingest", "--input", input.to_str().unwrap(), "--lake"])
            .arg(lake_dir)
            .output()
            .unwrap();
        log.push_str(&String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{log}");
    }
    log
}

/// With `privacy.purge_deleted` (the default), compaction and vacuum leave no text or cid of a
/// deleted record and no row of a deleted account in any file of the lake, read by DuckDB
/// file by file; the delete events, the account's deletion and everything else stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_leaves_no_trace_of_deleted_records_and_accounts() {
    let Some(py) = crate::tools::python_with(&["duckdb"]) else {
        return crate::tools::missing("python3 with duckdb");
    };
    let dir = tempfile::tempdir().unwrap();
    let (mut lines, mut gone, mut kept) = purge_story();
    // the quarantine holds deleted content too (the third run ingests it, before the deletes)
    let (q_lines, q_gone, q_kept) = quarantine_story();
    lines.splice(21..21, q_lines);
    gone.extend(q_gone);
    kept.extend(q_kept);
    let lake_dir = dir.path().join("lake");
    let log = ingest_story(&lines, dir.path(), &lake_dir);
    let l = lake_dir.to_str().unwrap();
    let read = || -> (usize, Vec<serde_json::Value>) {
        let v: serde_json::Value = serde_json::from_str(&crate::tools::run_python(
            &py,
            EXPORTED_ROWS,
            &[l, "parquet"],
        ))
        .unwrap();
        (
            v["files"].as_u64().unwrap() as usize,
            v["rows"].as_array().unwrap().clone(),
        )
    };
    let text_of = |rows: &[serde_json::Value]| -> String {
        rows.iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (files_before, rows) = read();
    let all = text_of(&rows);
    assert!(files_before >= 5, "several small files: {log}");
    for s in gone.iter().chain(&kept) {
        assert!(
            all.contains(s.as_str()),
            "{s} is in the lake before the purge"
        );
    }
    purge_and_vacuum(&lake_dir).await;
    let (_, rows) = read();
    let all = text_of(&rows);
    for s in &gone {
        assert!(
            !all.contains(s.as_str()),
            "{s} is still in a file of the lake:\n{all}"
        );
    }
    for s in &kept {
        assert!(all.contains(s.as_str()), "{s} was purged but not deleted");
    }
    let bob = "did:plc:bobbbbbbbbbbbbbbbbbbbbbb";
    let bobs: Vec<&serde_json::Value> = rows.iter().filter(|r| r["did"] == bob).collect();
    assert_eq!(bobs.len(), 1, "only bob's account deletion stays: {bobs:?}");
    assert_eq!(bobs[0]["kind"], "account");
    assert_eq!(bobs[0]["status"], "deleted");
    let deletes = rows
        .iter()
        .filter(|r| r["operation"] == "delete" && r["did"] == "did:plc:aliceaaaaaaaaaaaaaaaaaaa")
        .count();
    assert_eq!(deletes, 5, "the delete events stay");
    // alice's deleted posts keep their row (time, rkey, operation), not their content
    let blanked = rows
        .iter()
        .filter(|r| {
            r["operation"] == "create"
                && r["did"] == "did:plc:aliceaaaaaaaaaaaaaaaaaaa"
                && r["cid"].is_null()
                && r["record"].is_null()
        })
        .count();
    assert_eq!(blanked, 5);
    // atlake's SQL agrees
    let engine = crate::common::engine(l);
    let b = engine
        .collect("SELECT count(*) FROM posts WHERE text LIKE '%secret%'")
        .await
        .unwrap();
    let n = b[0]
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap()
        .value(0);
    assert_eq!(n, 5, "alice's five kept posts");
}

/// The purge reaches the backfilled history: after `atlake backfill` from the simulator's
/// sync endpoints, live deletes of two records of one account and the deletion of another
/// account are ingested; compaction's purge and a vacuum then leave none of their cids in any
/// Parquet file of the lake (DuckDB, file by file), keep every other record's, and the history
/// table's log names the rewritten files, not the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_reaches_the_backfilled_history() {
    use atlake::simulate::sync::{SyncSim, SyncSimConfig};
    let Some(py) = crate::tools::python_with(&["duckdb"]) else {
        return crate::tools::missing("python3 with duckdb");
    };
    let sim = SyncSim::start(SyncSimConfig {
        accounts: 6,
        records: 12,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    atlake_ok(
        &[
            "backfill", "--relay", &sim.relay, "--plc", &sim.plc, "--lake",
        ],
        &lake_dir,
    );
    let mut truth = sim.truth();
    truth.sort_by_key(|t| std::cmp::Reverse(t.records.len()));
    let (alice, bob) = (&truth[0], &truth[1]);
    assert!(alice.records.len() >= 3 && !bob.records.is_empty());
    let history_before = delta::load(
        &Lake::open(lake_dir.to_str().unwrap()).unwrap(),
        Table::History,
    )
    .await
    .unwrap();
    assert!(
        !history_before.files.is_empty(),
        "the backfill committed its files to the history log"
    );
    // live: two of alice's records deleted, bob's account deleted
    let now = atlake::model::cursor::now_us();
    let mut lines = Vec::new();
    let mut gone = Vec::new();
    let mut kept = Vec::new();
    for (i, (key, (cid, _))) in alice.records.iter().enumerate() {
        if i < 2 {
            let (coll, rkey) = key.split_once('/').unwrap();
            lines.push(
                serde_json::json!({"did": alice.did, "time_us": now + i as i64, "kind": "commit",
                    "commit": {"rev": "3mpt7ukd22222", "operation": "delete", "collection": coll,
                    "rkey": rkey}})
                .to_string(),
            );
            gone.push(cid.clone());
        } else {
            kept.push(cid.clone());
        }
    }
    gone.extend(bob.records.values().map(|(cid, _)| cid.clone()));
    lines.push(
        serde_json::json!({"did": bob.did, "time_us": now + 10, "kind": "account", "account": {
            "active": false, "status": "deleted", "did": bob.did, "seq": 9,
            "time": atlake::syntax::format_datetime_ms(now)}})
        .to_string(),
    );
    for t in &truth[2..] {
        kept.extend(t.records.values().map(|(cid, _)| cid.clone()));
    }
    let input = dir.path().join("live.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    atlake_ok(
        &["ingest", "--input", input.to_str().unwrap(), "--lake"],
        &lake_dir,
    );
    let l = lake_dir.to_str().unwrap();
    let all = || crate::tools::run_python(&py, EXPORTED_ROWS, &[l, "parquet"]);
    let before = all();
    for c in gone.iter().chain(&kept) {
        assert!(
            before.contains(c.as_str()),
            "{c} is in the lake before the purge"
        );
    }
    // an export, before any purge, holds the history without what was deleted
    let export = dir.path().join("export");
    atlake_ok(
        &["export", "--lake", l, "--format", "ndjson", "--to"],
        &export,
    );
    let mut exported = String::new();
    for e in walkdir(&export.join("history")) {
        exported.push_str(&std::fs::read_to_string(e).unwrap());
    }
    for c in &gone {
        assert!(!exported.contains(c.as_str()), "{c} is in the export");
    }
    for c in &kept {
        assert!(exported.contains(c.as_str()), "{c} is not in the export");
    }
    purge_and_vacuum(&lake_dir).await;
    let after = all();
    for c in &gone {
        assert!(
            !after.contains(c.as_str()),
            "{c} is still in a file of the lake"
        );
    }
    for c in &kept {
        assert!(
            after.contains(c.as_str()),
            "{c} was not deleted but is gone"
        );
    }
    let history = delta::load(&Lake::open(l).unwrap(), Table::History)
        .await
        .unwrap();
    let replaced = history_before
        .files
        .keys()
        .filter(|p| !history.files.contains_key(*p))
        .count();
    assert!(
        replaced >= 1,
        "the purge rewrote history files in the history log"
    );
    for p in history.files.keys() {
        assert!(
            lake_dir.join(p).exists(),
            "{p} is committed and in the lake"
        );
    }
    assert_eq!(
        history.backfill_batch(),
        history_before.backfill_batch(),
        "the purge leaves the backfill's txn as it was"
    );
}

/// Every file under `dir`, recursively.
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every row of every file under a directory (a lake's data files of both tables, whatever
/// their schema, or an export in any format), as text.
const EXPORTED_ROWS: &str = r#"
import json, sys, glob, os
import duckdb
root, ext = sys.argv[1], sys.argv[2]
files = sorted(glob.glob(f"{root}/**/*.{ext}", recursive=True))
files = [f for f in files if "/_delta_log/" not in f]
rows = []
for f in files:
    if ext == "parquet":
        rel = duckdb.sql(f"select * from read_parquet('{f}')")
    elif ext == "ndjson":
        rel = duckdb.sql(f"select * from read_json('{f}', format='newline_delimited')")
    else:
        rel = duckdb.sql(f"select * from read_csv('{f}', header=true, all_varchar=true)")
    cols = rel.columns
    for r in rel.fetchall():
        rows.append({c: (None if v is None else str(v)) for c, v in zip(cols, r)})
print(json.dumps({"files": len(files), "rows": rows}))
"#;

/// `atlake export`: in every format, a slice another tool reads back (DuckDB), with exactly the
/// rows atlake's SQL finds for the same collections and times; a record deleted before the
/// export, or an account, is not in it although the lake was never purged; `--current` holds
/// only the records that still exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_writes_slices_without_deleted_data_in_every_format() {
    let Some(py) = crate::tools::python_with(&["duckdb"]) else {
        return crate::tools::missing("python3 with duckdb");
    };
    let dir = tempfile::tempdir().unwrap();
    let (lines, gone, kept) = purge_story();
    let lake_dir = dir.path().join("lake");
    ingest_story(&lines, dir.path(), &lake_dir);
    let l = lake_dir.to_str().unwrap();
    let export = |to: &str, args: &[&str]| {
        let out = Command::new(atlake_bin())
            .args(["export", "--lake", l, "--to"])
            .arg(dir.path().join(to))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(out.status.success(), "{text}");
        text
    };
    let read = |to: &str, ext: &str| -> Vec<serde_json::Value> {
        let p = dir.path().join(to);
        let v: serde_json::Value = serde_json::from_str(&crate::tools::run_python(
            &py,
            EXPORTED_ROWS,
            &[p.to_str().unwrap(), ext],
        ))
        .unwrap();
        v["rows"].as_array().unwrap().clone()
    };
    let alice = "did:plc:aliceaaaaaaaaaaaaaaaaaaa";
    for (fmt, ext) in [("parquet", "parquet"), ("ndjson", "ndjson"), ("csv", "csv")] {
        export(fmt, &["--format", fmt]);
        let rows = read(fmt, ext);
        let all: String = rows.iter().map(|r| r.to_string()).collect();
        for s in &gone {
            assert!(!all.contains(s.as_str()), "{fmt}: {s} was exported");
        }
        for s in &kept {
            assert!(all.contains(s.as_str()), "{fmt}: {s} is missing");
        }
        // every event but bob's seven (identity and posts; his account's deletion stays)
        assert_eq!(rows.len(), lines.len() - 6, "{fmt}");
        assert_eq!(
            rows.iter()
                .filter(|r| r["did"] == alice && r["operation"] == "delete")
                .count(),
            5,
            "{fmt}: the delete events"
        );
    }
    // a slice: posts from the 15th event on (events are 7 s apart: bob's identity, alice's ten
    // posts, bob's five, carol's five, alice's five deletes, bob's account)
    let since = 1_783_173_600_000_000i64 + 15 * 7_000_000;
    let since_s = "2026-07-04T14:01:45Z";
    assert_eq!(atlake::syntax::parse_datetime_us(since_s).unwrap(), since);
    export(
        "slice",
        &["--collections", "app.bsky.feed.post", "--since", since_s],
    );
    let rows = read("slice", "parquet");
    assert!(rows.iter().all(|r| r["collection"] == "app.bsky.feed.post"));
    assert!(
        rows.iter()
            .all(|r| r["time_us"].as_str().unwrap().parse::<i64>().unwrap() >= since)
    );
    // from event 15: bob's last two posts (gone with his account), carol's five, the five
    // deletes
    assert_eq!(rows.len(), 5 + 5, "{rows:?}");
    // the records that still exist: alice's five kept posts and carol's five
    export(
        "current",
        &["--current", "--format", "ndjson", "--rows-per-file", "3"],
    );
    let rows = read("current", "ndjson");
    let all: String = rows.iter().map(|r| r.to_string()).collect();
    assert_eq!(rows.len(), 10, "{all}");
    // files of exactly 3 rows, the last one short
    let mut sizes: Vec<usize> = walkdir(&dir.path().join("current"))
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
        .collect();
    sizes.sort();
    assert_eq!(sizes, vec![1, 3, 3, 3]);
    for s in &gone {
        assert!(!all.contains(s.as_str()), "--current: {s} was exported");
    }
}

/// Ingests `dir/cap.zst` with `cfg` into the S3 lake at `url` on `moto`; the lake and the
/// configuration, pointed at it.
async fn ingest_to_s3(
    moto: &crate::tools::Moto,
    url: &str,
    dir: &std::path::Path,
    mut cfg: Config,
) -> (Lake, Config) {
    let lake = Lake::open_with_env(url, &moto.env()).unwrap();
    cfg.lake.url = url.to_string();
    let h = ingest::start_with_lake(cfg.clone(), Input::File(dir.join("cap.zst")), lake.clone())
        .await
        .unwrap();
    h.wait().await.unwrap();
    (lake, cfg)
}

/// On S3 (moto, conditional puts): compaction keeps every event exactly once in the committed
/// files, one per partition; then the purge removes what deleted accounts and deletes
/// call for, and the committed rows are exactly those it did not drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_and_purge_on_s3() {
    let Some(moto) = crate::tools::Moto::start("compact").await else {
        return crate::tools::missing("moto_server (S3-compatible server)");
    };
    let dir = tempfile::tempdir().unwrap();
    let truth = capture(&dir.path().join("cap.zst"), 4_000, 800_000, 47);
    let mut cfg = Config::default();
    cfg.flush.max_rows = 150;
    let (lake, mut cfg) = ingest_to_s3(&moto, "s3://compact/lake", dir.path(), cfg).await;
    assert_exactly_once(&read_committed(&lake).await, &truth);
    cfg.privacy.purge_deleted = false;
    cfg.compaction.small_day = atlake::config::ByteSize(40 << 10);
    let s = atlake::checkpoint::compact::run_command(&lake, &cfg, false, false)
        .await
        .unwrap();
    assert!(
        s.files_after < s.files_before && s.pass.inputs > s.pass.outputs,
        "{s:?}"
    );
    let log = delta::load(&lake, Table::Events).await.unwrap();
    assert_one_file_per_partition(&log);
    assert_exactly_once(&read_committed(&lake).await, &truth);
    cfg.privacy.purge_deleted = true;
    let s = atlake::checkpoint::compact::run_command(&lake, &cfg, false, true)
        .await
        .unwrap();
    assert!(
        s.pass.purge_scan && s.pass.dropped > 0 && s.pass.blanked > 0,
        "{s:?}"
    );
    let got = read_committed(&lake).await;
    assert!(got.duplicates().is_empty());
    assert_eq!(got.keys.len() as u64, truth.events() - s.pass.dropped);
    // a second scan finds nothing more to purge
    let again = atlake::checkpoint::compact::run_command(&lake, &cfg, false, true)
        .await
        .unwrap();
    assert_eq!(
        (again.pass.dropped, again.pass.blanked, again.pass.inputs),
        (0, 0, 0)
    );
}

/// What a lake asks of its object store, for the data files: whole-object reads, the largest
/// ranged read, and multipart uploads started and completed.
#[derive(Debug, Default)]
struct Asked {
    whole_gets: std::sync::atomic::AtomicU64,
    largest_range: std::sync::atomic::AtomicU64,
    multiparts: std::sync::atomic::AtomicU64,
}

/// An object store that passes every call to `inner` and notes in `asked` what the data
/// files were read and written with.
#[derive(Debug)]
struct Observed {
    inner: std::sync::Arc<dyn object_store::ObjectStore>,
    asked: std::sync::Arc<Asked>,
}

impl std::fmt::Display for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Observed({})", self.inner)
    }
}

impl Observed {
    fn note_range(&self, location: &object_store::path::Path, len: u64) {
        if location.as_ref().ends_with(".parquet") {
            self.asked
                .largest_range
                .fetch_max(len, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Observed {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        if location.as_ref().ends_with(".parquet") {
            self.asked
                .multiparts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        let r = self.inner.get_opts(location, options.clone()).await?;
        if location.as_ref().ends_with(".parquet") && !options.head {
            match options.range {
                None => {
                    self.asked
                        .whole_gets
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Some(_) => self.note_range(location, r.range.end - r.range.start),
            }
        }
        Ok(r)
    }

    async fn get_ranges(
        &self,
        location: &object_store::path::Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<bytes::Bytes>> {
        let got = self.inner.get_ranges(location, ranges).await?;
        for b in &got {
            self.note_range(location, b.len() as u64);
        }
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// On S3 (moto), compaction and the purge read their inputs by ranges (the footer, then a row
/// group's column chunks at a time: never a whole data file) and write their outputs as
/// multipart uploads of a few parts in flight (never the whole output in memory), and the
/// lake stays exactly once through it; an export from the S3 lake reads the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_on_s3_reads_ranges_and_uploads_in_parts() {
    let part = 32 << 10;
    // moto wants 5 MiB parts, like S3, unless told otherwise
    let Some(moto) =
        crate::tools::Moto::start_with_env("ranges", &[("S3_UPLOAD_PART_MIN_SIZE", "1024")]).await
    else {
        return crate::tools::missing("moto_server (S3-compatible server)");
    };
    let dir = tempfile::tempdir().unwrap();
    // about an hour of traffic: each big collection's hour is a few files of several row groups
    let truth = capture(&dir.path().join("cap.zst"), 24_000, 100_000, 53);
    let mut cfg = Config::default();
    cfg.flush.max_rows = 4_000;
    cfg.writer.row_group_rows = 300;
    let (plain, mut cfg) = ingest_to_s3(&moto, "s3://ranges/lake", dir.path(), cfg).await;
    let before = delta::load(&plain, Table::Events).await.unwrap();
    let biggest = before.files.values().map(|f| f.size).max().unwrap();
    assert!(
        biggest > 4 * part as u64,
        "inputs too small to tell: {biggest}"
    );
    let asked = std::sync::Arc::new(Asked::default());
    let lake = plain
        .with_object_store(std::sync::Arc::new(Observed {
            inner: plain.object_store(),
            asked: asked.clone(),
        }))
        .with_upload_part(part);
    cfg.compaction.small_day = atlake::config::ByteSize(40 << 10);
    let s = atlake::checkpoint::compact::run_command(&lake, &cfg, true, true)
        .await
        .unwrap();
    assert!(
        s.pass.inputs > s.pass.outputs && s.pass.dropped > 0,
        "{s:?}"
    );
    let log = delta::load(&plain, Table::Events).await.unwrap();
    let largest_out = log.files.values().map(|f| f.size).max().unwrap();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        asked.whole_gets.load(Relaxed),
        0,
        "a data file was read whole"
    );
    let largest_read = asked.largest_range.load(Relaxed);
    assert!(
        largest_read > 0 && largest_read < biggest,
        "largest read {largest_read} of files up to {biggest}"
    );
    assert!(
        largest_out > 2 * part as u64 && asked.multiparts.load(Relaxed) > 0,
        "outputs up to {largest_out}, {:?}",
        asked
    );
    let got = read_committed(&plain).await;
    assert!(got.duplicates().is_empty());
    assert_eq!(got.keys.len() as u64, truth.events() - s.pass.dropped);
    // an export from the S3 lake reads it the same way
    let out = dir.path().join("export");
    let slice = atlake::export::Slice {
        collections: vec![],
        since_us: None,
        until_us: None,
        current: false,
        rows_per_file: atlake::export::CURRENT_FILE_ROWS,
        format: atlake::export::Format::Parquet,
    };
    let progress = std::sync::Arc::new(atlake::export::Progress::default());
    atlake::export::run(
        &lake,
        &Lake::open(out.to_str().unwrap()).unwrap(),
        &slice,
        &atlake::checkpoint::facts::Budget::default(),
        progress.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        asked.whole_gets.load(Relaxed),
        0,
        "export read a data file whole"
    );
    assert_eq!(progress.rows.load(Relaxed), got.keys.len() as u64);
}

/// What the purge left, row by row: every event's key, time and whether it kept its content,
/// sorted.
async fn purged_rows(lake: &str) -> Vec<String> {
    let engine = crate::common::engine(lake);
    let batches = engine
        .collect(
            "SELECT kind || '|' || did || '|' || coalesce(collection, '-') || '|' || \
             coalesce(rkey, '-') || '|' || coalesce(operation, '-') || '|' || \
             CAST(time_us AS VARCHAR) || '|' || CAST(cid IS NULL AS VARCHAR) || '|' || \
             CAST(record IS NULL AS VARCHAR) AS r FROM events ORDER BY r",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    for b in &batches {
        let c = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let c = arrow::array::AsArray::as_string::<i32>(&c);
        out.extend((0..b.num_rows()).map(|i| c.value(i).to_string()));
    }
    out
}

/// With a facts budget of 64 KiB, the purge's deletion facts go to disk (sorted runs merged
/// into one file), and `atlake compact --purge` leaves exactly the rows, blanked exactly as, a
/// purge with its facts in memory leaves on a copy of the same lake; an export with the
/// facts on disk has the rows of one with them in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_with_its_facts_on_disk_matches_one_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.zst");
    let truth = capture(&cap, 30_000, 100_000, 43);
    let (mem, disk) = (dir.path().join("mem"), dir.path().join("disk"));
    ingest_small_files(&cap, &mem).await;
    let ok = Command::new("cp")
        .arg("-a")
        .arg(&mem)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(ok.success());
    let spill = dir.path().join("spill");
    std::fs::create_dir(&spill).unwrap();
    let spill_s = spill.to_str().unwrap();
    let tiny = [
        ("ATLAKE_PRIVACY_FACTS_MEMORY", "64KiB"),
        ("ATLAKE_PRIVACY_SPILL_DIR", spill_s),
    ];
    let before = purged_rows(mem.to_str().unwrap()).await;
    assert_eq!(before.len() as u64, truth.events());
    let out_mem = compact(&mem, &["--purge", "--open"], &[]);
    let out_disk = compact(&disk, &["--purge", "--open"], &tiny);
    assert!(out_mem.contains("purge scan ran"), "{out_mem}");
    assert!(
        out_mem.contains("deletion facts loaded") && out_mem.contains("spilled=false"),
        "{out_mem}"
    );
    assert!(out_disk.contains("spilled=true"), "{out_disk}");
    let (a, b) = (
        purged_rows(mem.to_str().unwrap()).await,
        purged_rows(disk.to_str().unwrap()).await,
    );
    let blanked = a.iter().filter(|r| r.ends_with("|true|true")).count()
        - before.iter().filter(|r| r.ends_with("|true|true")).count();
    assert!(
        blanked > 100 && a.len() < before.len(),
        "the purge blanked {blanked} and dropped {} rows",
        before.len() - a.len()
    );
    assert!(a == b, "the two purges differ");
    // the spill files had no names: nothing is left
    assert_eq!(std::fs::read_dir(&spill).unwrap().count(), 0);
    // export: same rows either way
    let export = |to: &str, env: &[(&str, &str)]| {
        crate::common::atlake_ok_with(
            &[
                "export",
                "--lake",
                disk.to_str().unwrap(),
                "--format",
                "ndjson",
                "--to",
            ],
            &dir.path().join(to),
            env,
        );
        let mut lines: Vec<String> = walkdir(&dir.path().join(to))
            .iter()
            .flat_map(|p| {
                std::fs::read_to_string(p)
                    .unwrap()
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect();
        lines.sort();
        lines
    };
    let (x, y) = (export("x-mem", &[]), export("x-disk", &tiny));
    assert_eq!(x.len(), b.len());
    assert!(x == y, "the two exports differ");
}
