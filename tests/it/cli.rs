//! The command line as a user meets it: configs, help, and one-line errors.

use crate::common::atlake_bin;
use atlake::config::Config;
use std::process::Command;

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_config_file_loads_and_the_default_one_is_the_defaults() {
    let mut n = 0;
    for e in std::fs::read_dir(root().join("config")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let cfg = Config::load(Some(&p), Vec::new())
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
            // check-config runs the same loader
            let out = Command::new(atlake_bin())
                .args(["check-config", "--config"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                p.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            if p.file_name().unwrap() == "atlake.toml" {
                assert_eq!(
                    cfg.to_toml().unwrap(),
                    Config::default().to_toml().unwrap(),
                    "config/atlake.toml spells out the defaults"
                );
            }
        }
    }
    assert!(n >= 4, "{n} config files");
}

fn one_line_error(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(atlake_bin())
        .args(args)
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "{args:?}: one line, got:\n{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(
        !err.contains("backtrace") && !err.contains("panicked"),
        "{err}"
    );
    err
}

#[test]
fn errors_are_one_clear_line() {
    let e = one_line_error(&["check-config", "--config", "/nope/atlake.toml"]);
    assert!(
        e.contains("cannot read config file /nope/atlake.toml"),
        "{e}"
    );
    let e = one_line_error(&["query", "--lake", "ftp://x/y", "SELECT 1"]);
    assert!(e.contains("unsupported scheme"), "{e}");
    let e = one_line_error(&[
        "ingest",
        "--source",
        "firehose",
        "--url",
        "wss://bsky.network",
        "--lake",
        "/proc/nope/lake",
    ]);
    assert!(e.contains("/proc/nope/lake"), "{e}");
    let e = one_line_error(&["ingest", "--collections", "not an nsid", "--lake", "x"]);
    assert!(e.contains("source.collections"), "{e}");
    let e = one_line_error(&[
        "ingest",
        "--source",
        "jetstream",
        "--url",
        "ht!tp://bad url",
        "--lake",
        "lake",
    ]);
    assert!(e.to_lowercase().contains("url"), "{e}");
    // unreachable S3: a clear line, not a hang or a trace
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(atlake_bin())
        .args(["query", "--lake", "s3://bucket/x", "SELECT 1"])
        .current_dir(dir.path())
        .env("AWS_ENDPOINT", "http://127.0.0.1:1")
        .env("AWS_ACCESS_KEY_ID", "x")
        .env("AWS_SECRET_ACCESS_KEY", "x")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the lake"), "{err}");
}

#[test]
fn every_command_has_help_with_examples() {
    for cmd in [
        "run",
        "demo",
        "ingest",
        "serve",
        "query",
        "simulate",
        "convert",
        "check-config",
    ] {
        let out = Command::new(atlake_bin())
            .args([cmd, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "{cmd} --help has examples:\n{text}"
        );
    }
}

/// `atlake query` with deep SQL of every shape: refused with an error (or answered), never a
/// crash of the process.
#[test]
fn deep_sql_on_the_command_line_is_refused_not_a_crash() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_dir, lake, _) = rt.block_on(crate::sql::fixture_lake(20, 1));
    for (shape, q) in atlake::query::guard::deep_sql(3_000) {
        let out = Command::new(atlake_bin())
            .args(["query", "--lake", &lake, &q])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "{shape}: {:?} {err}",
            out.status,
        );
        assert!(!err.is_empty(), "{shape}: no error message");
        assert!(!err.contains("no atlake lake"), "{shape}: {err}");
    }
}

/// What got in a new user's way: a mistyped lake path, SQL given with `--sql`, a mistyped
/// table, a bad value in an environment variable.
#[test]
fn the_first_hour_gets_clear_answers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (dir, lake, _) = rt.block_on(crate::sql::fixture_lake(50, 2));
    // a path that is not a lake: an error, and nothing created
    let typo = dir.path().join("lkae-demo");
    let e = one_line_error(&[
        "query",
        "--lake",
        typo.to_str().unwrap(),
        "SELECT count(*) FROM events",
    ]);
    assert!(
        e.contains("no atlake lake") && e.contains("no such directory"),
        "{e}"
    );
    assert!(!typo.exists(), "query created {}", typo.display());
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = one_line_error(&["query", "--lake", empty.to_str().unwrap(), "SELECT 1"]);
    assert!(e.contains("no atlake lake") && e.contains("_atlake"), "{e}");
    // --sql, and the positional SQL, give the same answer
    let run = |args: &[&str]| {
        let out = Command::new(atlake_bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let q = "SELECT count(*) AS n FROM events";
    let a = run(&["query", "--lake", &lake, "--format", "csv", "--sql", q]);
    let b = run(&["query", "--lake", &lake, "--format", "csv", q]);
    assert_eq!(a, b);
    assert!(a.starts_with("n\n") && a.trim_end() != "n\n0", "{a}");
    // a mistyped table: the name as written and the nearest one
    let e = one_line_error(&["query", "--lake", &lake, "SELECT count(*) FROM post"]);
    assert!(
        e.contains("no table named \"post\"; did you mean \"posts\"?")
            && !e.contains("datafusion.public"),
        "{e}"
    );
    // a bad environment value is the variable's error
    let out = Command::new(atlake_bin())
        .args(["check-config"])
        .env("ATLAKE_FLUSH_MAX_AGE", "thirty")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("environment variable ATLAKE_FLUSH_MAX_AGE"),
        "{err}"
    );
}
