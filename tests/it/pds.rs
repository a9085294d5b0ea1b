//! The reference PDS (`@atproto/pds`, npm) on loopback with a PLC directory stand-in
//! (`tests/pds/`), both started here. Accounts and records are written over XRPC before and
//! during `atlake run` with backfill (the PDS's own firehose as the live source, the PDS as the
//! relay); after it, `current.records` equals what the PDS lists
//! (`com.atproto.repo.listRecords` for every repo and collection): same keys, CIDs and JSON.
//!
//! `scripts/test` installs the PDS into `~/.cache/atlake-pds` (`ATLAKE_PDS_DIR`).

use crate::common::{ChildGuard, atlake_bin, free_port};
use crate::tools::missing;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const COLLECTIONS: &[&str] = &[
    "app.bsky.feed.post",
    "app.bsky.feed.like",
    "app.bsky.graph.follow",
    "app.bsky.actor.profile",
];

fn pds_modules() -> Option<PathBuf> {
    let dir = std::env::var("ATLAKE_PDS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/atlake-pds")
        })
        .join("node_modules");
    dir.join("@atproto/pds").exists().then_some(dir)
}

/// Starts `node tests/pds/<script>` and reads its first stdout line (`<NAME> <port>`).
fn node(script: &str, modules: &PathBuf, env: &[(&str, String)]) -> (ChildGuard, String) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/pds")
        .join(script);
    let mut child = Command::new("node")
        .arg(path)
        .env("NODE_PATH", modules)
        .envs(env.iter().map(|(k, v)| (*k, v.clone())))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("node");
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).unwrap();
    (ChildGuard(child), line.trim().to_string())
}

struct Xrpc {
    c: reqwest::Client,
    base: String,
}

impl Xrpc {
    async fn post(&self, method: &str, jwt: Option<&str>, body: Value) -> Value {
        let mut r = self
            .c
            .post(format!("{}/xrpc/{method}", self.base))
            .json(&body);
        if let Some(j) = jwt {
            r = r.bearer_auth(j);
        }
        let r = r.send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{method}: {status} {v}");
        v
    }

    async fn create(&self, acct: &(String, String), coll: &str, record: Value) -> (String, String) {
        let v = self
            .post(
                "com.atproto.repo.createRecord",
                Some(&acct.1),
                json!({"repo": acct.0, "collection": coll, "record": record}),
            )
            .await;
        (
            v["uri"].as_str().unwrap().to_string(),
            v["cid"].as_str().unwrap().to_string(),
        )
    }

    /// Every record of every collection of `did`: (did, collection, rkey, cid, value).
    async fn list(&self, did: &str, out: &mut BTreeSet<(String, String, String, String, String)>) {
        for coll in COLLECTIONS {
            let mut cursor: Option<String> = None;
            loop {
                let mut url = format!(
                    "{}/xrpc/com.atproto.repo.listRecords?repo={did}&collection={coll}&limit=100",
                    self.base
                );
                if let Some(c) = &cursor {
                    url.push_str(&format!("&cursor={c}"));
                }
                let v: Value = self.c.get(url).send().await.unwrap().json().await.unwrap();
                let recs = v["records"].as_array().cloned().unwrap_or_default();
                for r in &recs {
                    let uri = r["uri"].as_str().unwrap();
                    let rkey = uri.rsplit('/').next().unwrap().to_string();
                    out.insert((
                        did.to_string(),
                        coll.to_string(),
                        rkey,
                        r["cid"].as_str().unwrap().to_string(),
                        r["value"].to_string(),
                    ));
                }
                match v["cursor"].as_str() {
                    Some(c) if !recs.is_empty() => cursor = Some(c.to_string()),
                    _ => break,
                }
            }
        }
    }
}

/// Waits until `current.records` equals `want` (90 s at most), else fails with the difference.
async fn converge(
    x: &Xrpc,
    sql: &str,
    want: &BTreeSet<(String, String, String, String, String)>,
    log: &std::path::Path,
) {
    let started = Instant::now();
    let mut got = BTreeSet::new();
    while started.elapsed() < Duration::from_secs(90) {
        got.clear();
        if let Ok(r) =
            x.c.post(sql)
                .body("SELECT did, collection, rkey, cid, record FROM current.records")
                .send()
                .await
            && let Ok(rows) = r.json::<Vec<Value>>().await
        {
            for r in rows {
                let rec: Value = serde_json::from_str(r["record"].as_str().unwrap_or("null"))
                    .unwrap_or(Value::Null);
                got.insert((
                    r["did"].as_str().unwrap_or("").to_string(),
                    r["collection"].as_str().unwrap_or("").to_string(),
                    r["rkey"].as_str().unwrap_or("").to_string(),
                    r["cid"].as_str().unwrap_or("").to_string(),
                    rec.to_string(),
                ));
            }
        }
        if got == *want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let missing_rows: Vec<_> = want.difference(&got).take(5).collect();
    let extra: Vec<_> = got.difference(want).take(5).collect();
    panic!(
        "current.records differs from the PDS: {} want, {} got; missing {missing_rows:?}; extra {extra:?}\n{}",
        want.len(),
        got.len(),
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

/// The rows of a query to the daemon's SQL endpoint.
async fn rows(c: &reqwest::Client, sql: &str, q: &str) -> Vec<Value> {
    c.post(sql)
        .body(q.to_string())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn now() -> String {
    atlake::syntax::format_datetime_ms(atlake::model::cursor::now_us())
}

/// Posts, likes of them, follows of the others and a profile, with deletes and an update.
async fn write(x: &Xrpc, accts: &[(String, String)], round: usize) {
    for (i, a) in accts.iter().enumerate() {
        let mut posts = Vec::new();
        for p in 0..6 {
            posts.push(
                x.create(
                    a,
                    "app.bsky.feed.post",
                    json!({"$type": "app.bsky.feed.post", "text": format!("round {round} post {p} by {i} ✨"), "langs": ["en"], "createdAt": now()}),
                )
                .await,
            );
        }
        for (uri, cid) in posts.iter().take(3) {
            x.create(
                a,
                "app.bsky.feed.like",
                json!({"$type": "app.bsky.feed.like", "subject": {"uri": uri, "cid": cid}, "createdAt": now()}),
            )
            .await;
        }
        if round == 0 {
            for (j, b) in accts.iter().enumerate() {
                if i != j {
                    x.create(
                        a,
                        "app.bsky.graph.follow",
                        json!({"$type": "app.bsky.graph.follow", "subject": b.0, "createdAt": now()}),
                    )
                    .await;
                }
            }
        }
        x.post(
            "com.atproto.repo.putRecord",
            Some(&a.1),
            json!({"repo": a.0, "collection": "app.bsky.actor.profile", "rkey": "self",
                   "record": {"$type": "app.bsky.actor.profile", "displayName": format!("user {i} r{round}"), "description": "hello"}}),
        )
        .await;
        let rkey = posts[0].0.rsplit('/').next().unwrap().to_string();
        x.post(
            "com.atproto.repo.deleteRecord",
            Some(&a.1),
            json!({"repo": a.0, "collection": "app.bsky.feed.post", "rkey": rkey}),
        )
        .await;
    }
}

/// The live source starts at the tip: history comes only from the backfill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn current_records_equal_what_the_reference_pds_lists() {
    scenario(false, false).await;
}

/// The real daemon is killed with SIGKILL between a `#sync` that marks a repo and the commit of
/// its fresh fetch (held off by a 10 s `refetch_delay`), after live flushes went past the `#sync`;
/// the restart replays the `#sync` (the live checkpoint stayed before it), fetches the repo
/// again, and `current.records` equals what the PDS lists, with no record twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_between_a_sync_and_its_fresh_fetch_loses_nothing() {
    scenario(false, true).await;
}

/// The live source replays the PDS's whole firehose (`--start-cursor 0`): every record of the
/// history arrives both as a live create and in a snapshot, and the cut-over keeps it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cutover_keeps_a_record_once_when_live_and_snapshot_overlap() {
    scenario(true, false).await;
}

/// The log lines of `log` after the first that contains `mark` (all of them when `mark` is
/// absent: `None`).
fn log_after(log: &std::path::Path, mark: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let at = text.find(mark)?;
    Some(text[at..].to_string())
}

async fn scenario(replay: bool, crash: bool) {
    let Some(modules) = pds_modules() else {
        return missing("the reference PDS (@atproto/pds in ~/.cache/atlake-pds)");
    };
    let (_plc, line) = node("plc.js", &modules, &[]);
    let plc = format!("http://127.0.0.1:{}", line.trim_start_matches("PLC "));
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let data = dir.path().join("pds");
    std::fs::create_dir_all(data.join("blobs")).unwrap();
    let env = [
        ("PDS_PORT", port.to_string()),
        ("PDS_HOSTNAME", "localhost".to_string()),
        ("PDS_DEV_MODE", "true".to_string()),
        ("PDS_DATA_DIRECTORY", data.to_str().unwrap().to_string()),
        (
            "PDS_BLOBSTORE_DISK_LOCATION",
            data.join("blobs").to_str().unwrap().to_string(),
        ),
        ("PDS_JWT_SECRET", "atlake-test-jwt-secret".to_string()),
        ("PDS_ADMIN_PASSWORD", "atlake-admin".to_string()),
        (
            "PDS_PLC_ROTATION_KEY_K256_PRIVATE_KEY_HEX",
            "3f6e0b2f7c1c4b7a9d2e5f8a1b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e".to_string(),
        ),
        ("PDS_DID_PLC_URL", plc.clone()),
        ("PDS_INVITE_REQUIRED", "false".to_string()),
        ("PDS_SERVICE_HANDLE_DOMAINS", ".test".to_string()),
        ("PDS_CRAWLERS", String::new()),
        ("LOG_ENABLED", "false".to_string()),
    ];
    let (_pds, line) = node("pds.js", &modules, &env);
    assert!(line.starts_with("PDS"), "{line}");
    let base = format!("http://127.0.0.1:{port}");
    let x = Xrpc {
        c: reqwest::Client::new(),
        base: base.clone(),
    };
    let mut accts = Vec::new();
    for i in 0..3 {
        let v = x
            .post(
                "com.atproto.server.createAccount",
                None,
                json!({"handle": format!("user{i}.test"), "email": format!("u{i}@example.com"), "password": "hunter2-hunter2"}),
            )
            .await;
        accts.push((
            v["did"].as_str().unwrap().to_string(),
            v["accessJwt"].as_str().unwrap().to_string(),
        ));
    }
    // history before atlake starts
    write(&x, &accts, 0).await;
    // the first account's repo as it is now: imported back later, a change without commits
    let old_car =
        x.c.get(format!(
            "{base}/xrpc/com.atproto.sync.getRepo?did={}",
            accts[0].0
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let sql_port = free_port();
    let lake = dir.path().join("lake");
    let log = dir.path().join("run.log");
    // with `crash`, a marked repo waits 10 s before its fresh fetch: the window the kill lands in
    let refetch_delay = if crash { "10s" } else { "1s" };
    let spawn = |log: &std::path::Path| {
        ChildGuard(
            Command::new(atlake_bin())
                .args([
                    "run",
                    "--source",
                    "firehose",
                    "--url",
                    &format!("ws://127.0.0.1:{port}"),
                    "--lake",
                    lake.to_str().unwrap(),
                    "--listen",
                    &format!("127.0.0.1:{sql_port}"),
                ])
                .args(if replay {
                    &["--start-cursor", "0"][..]
                } else {
                    &[][..]
                })
                .env("ATLAKE_BACKFILL_ENABLED", "true")
                .env("ATLAKE_BACKFILL_RELAY", &base)
                .env("ATLAKE_BACKFILL_PLC", &plc)
                .env("ATLAKE_BACKFILL_REFETCH_DELAY", refetch_delay)
                .env("ATLAKE_FLUSH_MAX_AGE", "1s")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log).unwrap())
                .spawn()
                .unwrap(),
        )
    };
    let mut run = spawn(&log);
    // and more while it backfills and follows the PDS's firehose
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&x, &accts, 1).await;
    let mut want = BTreeSet::new();
    for a in &accts {
        x.list(&a.0, &mut want).await;
    }
    assert!(want.len() > 40, "{}", want.len());
    let sql = format!("http://127.0.0.1:{sql_port}/sql?format=json");
    converge(&x, &sql, &want, &log).await;
    if !replay {
        // The account goes back to its old repo without a commit (`importRepo`, as a
        // migration does), then `activateAccount` announces it with a `#sync`: the daemon
        // fetches the repo again and `current.records` follows it (the records made since
        // are gone, the profile is back to its first version).
        let r =
            x.c.post(format!("{base}/xrpc/com.atproto.repo.importRepo"))
                .bearer_auth(&accts[0].1)
                .header("content-type", "application/vnd.ipld.car")
                .body(old_car.clone())
                .send()
                .await
                .unwrap();
        assert!(r.status().is_success(), "importRepo: {}", r.status());
        let r =
            x.c.post(format!("{base}/xrpc/com.atproto.server.activateAccount"))
                .bearer_auth(&accts[0].1)
                .send()
                .await
                .unwrap();
        assert!(r.status().is_success(), "activateAccount: {}", r.status());
        let mut log = log.clone();
        if crash {
            // the #sync marks the repo; the fresh fetch waits its 10 s delay
            let gap = "a gap in the repo's history";
            let started = Instant::now();
            while log_after(&log, gap).is_none() {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the #sync never marked the repo\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // live events past the #sync, flushed and committed (1 s flushes) while the fetch
            // waits: without the hold the live checkpoint would pass the #sync now
            write(&x, &accts[1..], 2).await;
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let held = rows(
                &x.c,
                &sql,
                "SELECT count(*) AS n FROM system.checkpoint c, \
                 (SELECT max(seq) AS s FROM events WHERE kind = 'sync' AND origin = 'firehose') e \
                 WHERE c.source = 'firehose' AND c.cursor < e.s",
            )
            .await;
            assert_eq!(held[0]["n"].as_i64(), Some(1), "{held:?}");
            let since = log_after(&log, gap).unwrap_or_default();
            assert!(
                !since.contains("backfill batch committed"),
                "the fresh fetch was committed before the kill:\n{since}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "too slow to land in the window"
            );
            run.kill().unwrap();
            run.wait().unwrap();
            // the restart replays the #sync and fetches the repo again
            log = dir.path().join("run2.log");
            run = spawn(&log);
        }
        let mut after = BTreeSet::new();
        for a in &accts {
            x.list(&a.0, &mut after).await;
        }
        let of_first = |set: &BTreeSet<(String, String, String, String, String)>| {
            set.iter().filter(|r| r.0 == accts[0].0).count()
        };
        assert!(
            of_first(&after) < of_first(&want),
            "the import changed nothing"
        );
        converge(&x, &sql, &after, &log).await;
        let markers = rows(
            &x.c,
            &sql,
            "SELECT count(*) AS n FROM events WHERE kind = 'sync' AND origin = 'repo'",
        )
        .await;
        assert!(markers[0]["n"].as_i64().unwrap() >= 1, "{markers:?}");
        if crash {
            assert!(
                log_after(&log, "a gap in the repo's history").is_some(),
                "the restart did not mark the repo again"
            );
        }
        // the #sync held the live checkpoint until its fresh fetch was committed; then the
        // checkpoint passes it (a hold that never ends would freeze it)
        let passed = "SELECT count(*) AS n FROM system.checkpoint c, \
             (SELECT max(seq) AS s FROM events WHERE kind = 'sync' AND origin = 'firehose') e \
             WHERE c.source = 'firehose' AND c.cursor >= e.s";
        let started = Instant::now();
        loop {
            let got = rows(&x.c, &sql, passed).await;
            if got.first().and_then(|r| r["n"].as_i64()) == Some(1) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the live checkpoint never passed the #sync: {got:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        want = after;
    }
    // both paths carried records, and no record is in the lake twice (the cut-over)
    let one = |q: &'static str| {
        let (c, sql) = (x.c.clone(), sql.clone());
        async move { rows(&c, &sql, q).await[0]["n"].as_i64().unwrap() }
    };
    let repo = one("SELECT count(*) AS n FROM events WHERE origin = 'repo'").await;
    let live =
        one("SELECT count(*) AS n FROM events WHERE origin = 'firehose' AND kind = 'commit'").await;
    // a repo fetched again after a gap is restated whole at its new rev (the snapshot that
    // replaces it): those rows are not doubles of the cut-over
    let doubled = one(
        "SELECT count(*) AS n FROM (SELECT e.did, e.collection, e.rkey, e.cid, count(*) AS c \
         FROM events e LEFT JOIN (SELECT did AS m_did, substr(record, 18, 13) AS m_rev FROM events \
         WHERE kind = 'sync' AND origin = 'repo') m ON e.did = m.m_did AND e.rev = m.m_rev \
         WHERE e.operation = 'create' AND m.m_did IS NULL GROUP BY 1, 2, 3, 4) WHERE c > 1",
    )
    .await;
    let restated = one(
        "SELECT count(*) AS n FROM events e JOIN (SELECT did AS m_did, substr(record, 18, 13) AS m_rev FROM events \
         WHERE kind = 'sync' AND origin = 'repo') m ON e.did = m.m_did AND e.rev = m.m_rev \
         WHERE e.kind = 'commit'",
    )
    .await;
    if !replay {
        assert!(restated > 0, "the fresh fetch wrote no rows");
    }
    let metrics =
        x.c.get(format!("http://127.0.0.1:{sql_port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
    let dropped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("atlake_backfill_cutover_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!(
        "PDS RESULT replay={replay} crash={crash} records={} repo_rows={repo} live_commit_rows={live} doubled={doubled} cutover_dropped={dropped} restated_after_sync={restated}",
        want.len()
    );
    if replay {
        assert!(dropped > 0.0, "the overlap never reached the cut-over");
    }
    assert!(live > 0, "live {live}");
    if !replay {
        assert!(repo > 0, "repo {repo}");
    }
    assert_eq!(doubled, 0, "records in the lake twice");
    let _ = Command::new("kill")
        .args(["-TERM", &run.id().to_string()])
        .status();
    let status = run.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
