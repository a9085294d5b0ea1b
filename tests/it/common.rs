//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// A file under `tests/fixtures`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// Non-comment, non-blank lines of a syntax fixture, untrimmed.
pub fn fixture_lines(rel: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixture(rel)).expect("fixture");
    text.split('\n')
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.to_string())
        .collect()
}

/// The path of the built `atlake` binary.
pub fn atlake_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_atlake"))
}

/// Runs `atlake` with `args` and then `path`; panics with its stderr unless it succeeds.
pub fn atlake_ok(args: &[&str], path: &std::path::Path) {
    atlake_ok_with(args, path, &[]);
}

/// [`atlake_ok`] with environment variables `env` set.
pub fn atlake_ok_with(args: &[&str], path: &std::path::Path, env: &[(&str, &str)]) {
    let out = std::process::Command::new(atlake_bin())
        .args(args)
        .arg(path)
        .envs(env.iter().copied())
        .output()
        .expect("run atlake");
    assert!(
        out.status.success(),
        "atlake {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;
use atlake::simulate::server::Truth;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// (kind, did, collection, rkey, rev-or-seq, operation)
pub type Key = (String, String, String, String, String, String);

/// What a lake holds, read back from its Parquet files.
#[derive(Debug, Default)]
pub struct LakeContents {
    /// Event rows by (kind, collection, operation).
    pub counts: BTreeMap<(String, String, String), u64>,
    /// Every event row's key (with repeats, if any).
    pub keys: Vec<Key>,
    /// Quarantined rows by reason.
    pub errors: BTreeMap<String, u64>,
    /// Files read.
    pub files: usize,
}

impl LakeContents {
    /// Keys that occur more than once.
    pub fn duplicates(&self) -> Vec<Key> {
        let mut seen: HashMap<&Key, u32> = HashMap::new();
        for k in &self.keys {
            *seen.entry(k).or_default() += 1;
        }
        seen.into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(k, _)| k.clone())
            .collect()
    }
}

fn s(b: &arrow::record_batch::RecordBatch, name: &str, i: usize) -> String {
    match b.column_by_name(name) {
        Some(c) if c.is_valid(i) => {
            if let Some(a) = c.as_string_opt::<i32>() {
                a.value(i).to_string()
            } else if let Some(a) = c.as_string_view_opt() {
                a.value(i).to_string()
            } else {
                String::new()
            }
        }
        _ => String::new(),
    }
}

/// Reads every file of a lake.
pub async fn read_lake(lake: &atlake::sink::store::Lake) -> LakeContents {
    let files = atlake::checkpoint::list_files(lake)
        .await
        .expect("list lake");
    read_files(lake, files).await
}

/// Reads the files the lake's logs commit (what a Delta reader reads).
pub async fn read_committed(lake: &atlake::sink::store::Lake) -> LakeContents {
    let logs = atlake::checkpoint::Logs::load(lake).await.expect("logs");
    let files = logs
        .events
        .files
        .values()
        .chain(logs.errors.files.values())
        .cloned()
        .collect();
    read_files(lake, files).await
}

/// Reads `files`.
pub async fn read_files(
    lake: &atlake::sink::store::Lake,
    files: Vec<atlake::sink::partition::LakeFile>,
) -> LakeContents {
    let mut out = LakeContents::default();
    for f in files {
        out.files += 1;
        let bytes = lake.get(&f.path).await.expect("get").expect("exists");
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)
            .expect("parquet")
            .build()
            .expect("reader");
        let errors = f.key.name == atlake::sink::partition::PartitionName::Errors;
        for b in reader {
            let b = b.expect("batch");
            for i in 0..b.num_rows() {
                if errors {
                    *out.errors.entry(s(&b, "reason", i)).or_default() += 1;
                    continue;
                }
                let kind = s(&b, "kind", i);
                let rev = if kind == "identity" || kind == "account" {
                    b.column_by_name("event_seq")
                        .map(|c| c.as_primitive::<Int64Type>().value(i).to_string())
                        .unwrap_or_default()
                } else {
                    s(&b, "rev", i)
                };
                let coll = s(&b, "collection", i);
                let op = s(&b, "operation", i);
                *out.counts
                    .entry((kind.clone(), coll.clone(), op.clone()))
                    .or_default() += 1;
                out.keys
                    .push((kind, s(&b, "did", i), coll, s(&b, "rkey", i), rev, op));
            }
        }
    }
    out
}

/// The truth's keys in the same shape.
pub fn truth_keys(t: &Truth) -> Vec<Key> {
    let mut v: Vec<Key> = t
        .keys
        .iter()
        .map(|k| {
            (
                k.kind.to_string(),
                k.did.clone(),
                k.collection.clone(),
                k.rkey.clone(),
                k.rev.clone(),
                k.operation.to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Asserts that the lake holds exactly the truth: same counts, same keys, no duplicates.
pub fn assert_exactly_once(got: &LakeContents, truth: &Truth) {
    let dups = got.duplicates();
    assert!(
        dups.is_empty(),
        "{} duplicated events, e.g. {:?}",
        dups.len(),
        dups.first()
    );
    assert_eq!(
        got.counts, truth.counts,
        "counts per (kind, collection, operation)"
    );
    let mut keys = got.keys.clone();
    keys.sort();
    let want = truth_keys(truth);
    if keys != want {
        let missing = want
            .iter()
            .filter(|k| keys.binary_search(k).is_err())
            .count();
        let extra = keys
            .iter()
            .filter(|k| want.binary_search(k).is_err())
            .count();
        panic!("key sets differ: {missing} missing, {extra} extra");
    }
}

/// Polls `f` until it is true or `timeout` passes.
pub async fn wait_until<F: FnMut() -> bool>(timeout: Duration, mut f: F) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// The checkpoint cursor of a source in a local lake, read from disk: the newest `txn` of the
/// `events` table's Delta log (every commit is a JSON file, none is ever removed).
pub fn local_checkpoint(dir: &std::path::Path, source: &str) -> Option<i64> {
    let log = dir.join("events/_delta_log");
    let mut commits: Vec<PathBuf> = std::fs::read_dir(&log)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() == 25 && n.ends_with(".json"))
        })
        .collect();
    commits.sort();
    let app = format!("atlake.{source}");
    let mut cursor = None;
    for c in commits {
        let text = std::fs::read_to_string(&c).ok()?;
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).ok()?;
            if v["txn"]["appId"].as_str() == Some(&app) {
                cursor = v["txn"]["version"].as_i64();
            }
        }
    }
    cursor
}

/// A TCP port that was free a moment ago, for a child process to listen on.
/// Every regular file under `dirs` (missing directories are skipped).
pub fn files_under(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = dirs.to_vec();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed when the test ends, even by a failed assertion.
pub struct ChildGuard(pub std::process::Child);

impl std::ops::Deref for ChildGuard {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for ChildGuard {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl ChildGuard {
    /// Sends SIGTERM (which must be delivered) and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM was not delivered");
        self.0.wait().expect("wait")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The resident set size of process `pid` in KiB (0 once it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:")
}

/// The anonymous part of a process's resident set (heap, stacks), in KiB: what it holds, not
/// the pages of its own binary's code that it has run (file-backed, shared, reclaimable).
pub fn rss_anon_kb(pid: u32) -> u64 {
    status_kb(pid, "RssAnon:")
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A simulator configuration with traffic seed `seed`; the other fields are the defaults.
pub fn seeded(seed: u64) -> atlake::simulate::server::SimConfig {
    atlake::simulate::server::SimConfig {
        traffic: atlake::simulate::traffic::TrafficConfig {
            seed,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The body of `GET url`, as text.
pub async fn get_text(c: &reqwest::Client, url: &str) -> String {
    let r = c.get(url).send().await.expect("GET");
    r.text().await.expect("a body")
}

/// `POST {base}/sql` of `sql` (with the bearer token when given); the JSON answer.
pub async fn post_json(
    c: &reqwest::Client,
    base: &str,
    sql: &str,
    token: Option<&str>,
) -> serde_json::Value {
    let mut req = c.post(format!("{base}/sql")).body(sql.to_string());
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send()
        .await
        .expect("POST /sql")
        .json()
        .await
        .expect("a JSON answer")
}

/// Starts the simulator on a free loopback port.
pub async fn start_sim(
    cfg: atlake::simulate::server::SimConfig,
) -> atlake::simulate::server::SimHandle {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    atlake::simulate::server::start(cfg, addr)
        .await
        .expect("the simulator starts on loopback")
}

/// An `atlake` child process with its stderr in a log file; killed when dropped.
pub struct AtlakeChild {
    /// The process.
    pub child: ChildGuard,
    /// Its stderr.
    pub log: std::path::PathBuf,
}

impl AtlakeChild {
    /// Starts `atlake args…` in `dir` with `env`, logging to `dir/<name>.log`.
    pub fn spawn(
        args: &[&str],
        env: &[(String, String)],
        dir: &std::path::Path,
        name: &str,
    ) -> Self {
        let log = dir.join(format!("{name}.log"));
        let child = std::process::Command::new(atlake_bin())
            .args(args)
            .current_dir(dir)
            .envs(env.iter().cloned())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn atlake");
        AtlakeChild {
            child: ChildGuard(child),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until its log contains `needle`; false on timeout or if it exits first.
    pub async fn wait_log(&mut self, needle: &str, timeout: Duration) -> bool {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if self.log().contains(needle) {
                return true;
            }
            if !matches!(self.child.try_wait(), Ok(None)) {
                return self.log().contains(needle);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        self.child.wait().expect("wait")
    }

    /// Waits for the exit, at most `timeout`.
    pub async fn exit_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        None
    }
}

/// Held by the tests whose timing bounds need the machine (the abuse test's per-query bound)
/// and by the heaviest ones (kill -9 loops of the backfill), so that they never overlap on a
/// 2-core machine.
pub static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// atlake's SQL engine over the lake at `lake`, with the default limits.
pub fn engine(lake: &str) -> atlake::query::QueryEngine {
    atlake::query::QueryEngine::try_new(
        atlake::sink::store::Lake::open(lake).unwrap(),
        None,
        atlake::query::Limits::default(),
    )
    .unwrap()
}

/// Counts per (collection, operation, kind) as atlake's SQL sees them.
pub async fn sql_counts(lake: &str) -> BTreeMap<String, u64> {
    use arrow::array::AsArray;
    let engine = engine(lake);
    let batches = engine
        .collect("SELECT coalesce(collection, '-') || '|' || coalesce(operation, '-') || '|' || kind AS k, count(*) AS n FROM events GROUP BY 1")
        .await
        .unwrap();
    let mut out = BTreeMap::new();
    for b in &batches {
        let k = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8).unwrap();
        let k = k.as_string::<i32>();
        let n = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        for i in 0..b.num_rows() {
            out.insert(k.value(i).to_string(), n.value(i) as u64);
        }
    }
    out
}
