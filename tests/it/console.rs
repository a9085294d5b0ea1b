//! The web console at `/`.
//!
//! - Over HTTP: its files need no token and carry their Content-Type, CSP and `nosniff`; the
//!   data still needs the token; every `queries/*.sql` is an example; `schema=1` adds the
//!   result's schema as a header and leaves the body as it was.
//! - In a real browser: `atlake run` ingesting from the simulator with a token, and `atlake
//!   serve` on the same lake, driven by `tests/console/console_test.py` (Playwright for Python
//!   and Debian's Chromium; see the script for what it checks).

use crate::common::{AtlakeChild, free_port, seeded, start_sim};
use crate::tools;
use atlake::simulate::server::SimConfig;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "console-test-token";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `atlake args… --listen 127.0.0.1:PORT` in `dir` with the token; its base URL once it answers.
async fn start(
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (AtlakeChild, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--listen", &listen]);
    let mut envs = vec![
        ("ATLAKE_SERVER_TOKEN".to_string(), TOKEN.to_string()),
        ("ATLAKE_LOG".to_string(), "warn".to_string()),
    ];
    envs.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut child = AtlakeChild::spawn(&all, &envs, dir, name);
    let base = format!("http://{listen}");
    let c = reqwest::Client::new();
    let up = Instant::now();
    while c.get(format!("{base}/health")).send().await.is_err() {
        assert!(
            up.elapsed() < Duration::from_secs(60) && matches!(child.child.try_wait(), Ok(None)),
            "{name} did not start: {}",
            child.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, base)
}

async fn post(c: &reqwest::Client, url: &str, sql: &str) -> reqwest::Response {
    c.post(url)
        .bearer_auth(TOKEN)
        .body(sql.to_string())
        .send()
        .await
        .unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_files_need_no_token_and_the_schema_header_leaves_bodies_alone() {
    let (dir, lake, _) = crate::sql::fixture_lake(50, 3).await;
    let (_serve, base) = start(dir.path(), "serve", &["serve", "--lake", &lake], &[]).await;
    let c = reqwest::Client::new();
    for (path, ct) in [
        ("/", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/style.css", "text/css; charset=utf-8"),
        ("/console/icon.svg", "image/svg+xml"),
        ("/console/examples", "application/json"),
    ] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} without a token");
        assert_eq!(header(&r, "content-type"), ct, "{path}");
        assert!(
            header(&r, "content-security-policy").starts_with("default-src 'self'"),
            "{path}"
        );
        assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
    }
    // every example of queries/ is there, as the file says it
    let examples: Vec<serde_json::Value> = c
        .get(format!("{base}/console/examples"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("queries"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    assert_eq!(examples.len(), files.len());
    for f in &files {
        let stem = f.file_stem().unwrap().to_str().unwrap();
        let e = examples
            .iter()
            .find(|e| e["name"] == stem)
            .unwrap_or_else(|| panic!("{stem} is not an example"));
        assert_eq!(e["sql"], std::fs::read_to_string(f).unwrap(), "{stem}");
    }
    // the data still needs the token
    for path in [
        "/tables",
        "/metrics",
        "/sql?q=SELECT%201",
        "/console/nothing",
    ] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
    }
    // a route that does not exist is a JSON error like the others
    let r = c
        .get(format!("{base}/nothing/here"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let e: serde_json::Value = r.json().await.unwrap();
    assert_eq!(e["error"], "not_found", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("/nothing/here"),
        "{e}"
    );
    // schema=1: the same body, plus the schema
    let sql = "SELECT n, CASE WHEN n % 2 = 0 THEN NULL ELSE 'é' END AS \"prénom\" \
               FROM (SELECT unnest(range(0, 5)) AS n)";
    for format in ["json", "csv", "ndjson", "arrow", "parquet"] {
        let plain = post(&c, &format!("{base}/sql?format={format}"), sql).await;
        assert_eq!(plain.status(), 200);
        assert!(plain.headers().get("x-atlake-schema").is_none());
        let plain_type = header(&plain, "content-type").to_string();
        let plain = plain.bytes().await.unwrap();
        let typed = post(&c, &format!("{base}/sql?format={format}&schema=1"), sql).await;
        assert_eq!(typed.status(), 200);
        assert_eq!(header(&typed, "content-type"), plain_type);
        let schema: serde_json::Value =
            serde_json::from_str(header(&typed, "x-atlake-schema")).unwrap();
        assert_eq!(
            schema,
            serde_json::json!([
                {"name": "n", "type": "Int64", "nullable": true},
                {"name": "prénom", "type": "Utf8", "nullable": true},
            ]),
            "{format}"
        );
        let typed = typed.bytes().await.unwrap();
        assert_eq!(typed, plain, "{format}: the body is the same");
    }
    // an error has no schema
    let r = post(&c, &format!("{base}/sql?schema=1"), "SELECT * FROM nowhere").await;
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("x-atlake-schema").is_none());
}

/// Chromium: `$ATLAKE_CHROMIUM`, or `chromium` on the PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ATLAKE_CHROMIUM") {
        let p = PathBuf::from(p);
        return p.is_file().then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let Some(py) = tools::python_with(&["playwright.sync_api", "pyarrow.parquet"]) else {
        tools::missing("Python with playwright and pyarrow");
        return;
    };
    let Some(chromium) = chromium() else {
        tools::missing("chromium");
        return;
    };
    let sim = start_sim(SimConfig {
        messages: None,
        rate: Some(300.0),
        retention: 100_000,
        ..seeded(41)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let url = sim.url();
    let (mut daemon, base) = start(
        dir.path(),
        "run",
        &[
            "run",
            "--source",
            "jetstream",
            "--url",
            &url,
            "--start-cursor",
            "0",
            "--lake",
            "lake",
        ],
        &[("ATLAKE_FLUSH_MAX_AGE", "1s")],
    )
    .await;
    let lake = dir.path().join("lake");
    let (mut serve, serve_base) = start(
        dir.path(),
        "serve",
        &["serve", "--lake", lake.to_str().unwrap()],
        &[],
    )
    .await;
    // rows and files before the browser comes
    let c = reqwest::Client::new();
    let since = Instant::now();
    loop {
        let r = post(
            &c,
            &format!("{base}/sql"),
            "SELECT count(*) AS n FROM system.files",
        )
        .await;
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        if v[0]["n"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(60),
            "no files after a minute: {}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let downloads = dir.path().join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    // kept after the test, to be looked at: target/tmp/console/{query,live}.png
    let screenshots = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console");
    let script = root().join("tests/console/console_test.py");
    let out_path = dir.path().join("browser.log");
    let out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&out_path)
        .unwrap();
    let mut child = Command::new(&py)
        .arg(&script)
        .args([
            "--base",
            &base,
            "--serve-base",
            &serve_base,
            "--token",
            TOKEN,
        ])
        .arg("--queries")
        .arg(root().join("queries"))
        .arg("--chromium")
        .arg(&chromium)
        .arg("--downloads")
        .arg(&downloads)
        .arg("--screenshots")
        .arg(&screenshots)
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    eprintln!(
        "--- console_test.py (screenshots in {}) ---\n{output}",
        screenshots.display()
    );
    let alive = matches!(daemon.child.try_wait(), Ok(None));
    let serve_alive = matches!(serve.child.try_wait(), Ok(None));
    sim.stop();
    let status = status.unwrap_or_else(|| panic!("the browser test did not end in 5 minutes"));
    assert!(
        status.success(),
        "the browser test failed ({status}):\n{output}\n--- run log ---\n{}",
        daemon.log()
    );
    assert!(
        output.contains("console test: every check passed"),
        "{output}"
    );
    assert!(alive, "the daemon died: {}", daemon.log());
    assert!(serve_alive, "serve died: {}", serve.log());
}
