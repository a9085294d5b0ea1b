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
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    std::fs::create_dir_all(&lake).unwrap();
    for (shape, q) in atlake::query::guard::deep_sql(3_000) {
        let out = Command::new(atlake_bin())
            .args(["query", "--lake", lake.to_str().unwrap(), &q])
            .output()
            .unwrap();
        assert!(
            out.status.code().is_some_and(|c| c != 0),
            "{shape}: {:?} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{shape}: no error message");
    }
}
