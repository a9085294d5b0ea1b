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
