//! Every `queries/*.sql` runs against a deterministic fixture lake and must print exactly its
//! golden output in `tests/golden/`. Re-bless after an intended change with
//! `ATLAKE_BLESS=1 cargo test --test it queries`.

use atlake::ingest::{self, Input};
use atlake::query::{Limits, QueryEngine};
use atlake::simulate::traffic::{Traffic, TrafficConfig};
use atlake::sink::store::Lake;
use atlake::source::capture::{CaptureFormat, CaptureWriter, Compression};
use std::path::PathBuf;
use std::time::Duration;

/// The fixture: 4,000 simulated messages over about three hours of stream time, flushed only at
/// hour close and at the end, so the files are the same on every run.
pub async fn golden_lake() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap");
    let mut t = Traffic::new(TrafficConfig {
        seed: 1234,
        step_us: 2_500_000,
        accounts: 800,
        ..Default::default()
    });
    let mut w = CaptureWriter::create(&cap, CaptureFormat::Frames, Compression::None).unwrap();
    for _ in 0..4000 {
        w.write(&t.next_message().frame).unwrap();
    }
    w.finish().unwrap();
    let lake = dir.path().join("lake").to_str().unwrap().to_string();
    let mut cfg = crate::ingest::test_config(&lake);
    cfg.flush.max_rows = 10_000_000;
    cfg.flush.max_age.0 = Duration::from_secs(36_000);
    cfg.flush.hour_close_grace.0 = Duration::from_secs(0);
    let h = ingest::start(cfg, Input::File(cap)).await.unwrap();
    h.wait().await.unwrap();
    (dir, lake)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_file_matches_its_golden_output() {
    let (_dir, lake) = golden_lake().await;
    let engine = QueryEngine::try_new(Lake::open(&lake).unwrap(), None, Limits::default()).unwrap();
    let bless = std::env::var("ATLAKE_BLESS").is_ok_and(|v| v == "1");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("queries"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "at least 10 example queries");
    let mut failures = Vec::new();
    for f in &files {
        let sql = std::fs::read_to_string(f).unwrap();
        let name = f.file_stem().unwrap().to_str().unwrap();
        assert!(
            sql.starts_with("-- "),
            "{name}: starts with a comment saying the question"
        );
        assert!(
            sql.lines().take(4).any(|l| l.starts_with("-- Tables:")),
            "{name}: says the tables used"
        );
        let batches = engine
            .collect(&sql)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert!(rows > 0, "{name}: no rows on the fixture");
        let out = format!(
            "{}\n",
            arrow::util::pretty::pretty_format_batches(&batches).unwrap()
        );
        let golden = root().join("tests/golden").join(format!("{name}.txt"));
        if bless {
            std::fs::write(&golden, &out).unwrap();
            continue;
        }
        match std::fs::read_to_string(&golden) {
            Ok(want) if want == out => {}
            Ok(want) => failures.push(format!(
                "{name}: output differs from {}\n--- want\n{want}\n--- got\n{out}",
                golden.display()
            )),
            Err(_) => failures.push(format!(
                "{name}: no golden file {} (run with ATLAKE_BLESS=1)",
                golden.display()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
