//! The stored Arrow schemas only ever gain columns: `tests/golden/schemas.txt` holds every
//! table kind's stored schema. A change that only adds columns is blessed with
//! `ATLAKE_BLESS=1 cargo test --test it schemas`; a removed, renamed or retyped column, or one
//! whose nullability changed, fails even then, because files already in lakes would no longer
//! read the same. Every reader matches stored columns by name (the SQL scan, recovery, Delta
//! readers), so a column may move: schema version 4 moved the identity and account columns
//! after `origin`, where every event file now has them.

use atlake::model::rows::{all_kinds, schema};

fn render() -> String {
    let mut out = String::new();
    for k in all_kinds() {
        out.push_str(&format!("{k:?}\n"));
        for f in schema(k).fields() {
            out.push_str(&format!(
                "  {}: {} {}\n",
                f.name(),
                f.data_type(),
                if f.is_nullable() { "null" } else { "not null" }
            ));
        }
    }
    out
}

/// (kind, column lines) blocks of a rendering.
fn blocks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        match line.strip_prefix("  ") {
            Some(col) => {
                if let Some(last) = out.last_mut() {
                    last.1.push(col.to_string());
                }
            }
            None => out.push((line.to_string(), Vec::new())),
        }
    }
    out
}

/// What makes `now` more than an extension of `before`: a kind or column that is gone or
/// changed (columns are matched by name; new columns and new kinds may appear).
fn breaking(before: &str, now: &str) -> Vec<String> {
    let now = blocks(now);
    let mut out = Vec::new();
    for (kind, cols) in blocks(before) {
        let Some((_, new_cols)) = now.iter().find(|(k, _)| *k == kind) else {
            out.push(format!("{kind}: the table kind is gone"));
            continue;
        };
        for c in &cols {
            let name = c.split(':').next().unwrap_or(c);
            let now = new_cols.iter().find(|n| n.split(':').next() == Some(name));
            if now != Some(c) {
                out.push(format!("{kind}: column `{c}` is {now:?}"));
            }
        }
    }
    out
}

#[test]
fn stored_schemas_only_gain_columns() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/schemas.txt");
    let now = render();
    let before = std::fs::read_to_string(&path).unwrap_or_default();
    let broken = breaking(&before, &now);
    assert!(
        broken.is_empty(),
        "stored schemas must only gain columns:\n{}",
        broken.join("\n")
    );
    if std::env::var("ATLAKE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &now).unwrap();
        return;
    }
    assert_eq!(
        before,
        now,
        "the stored schemas changed by adding columns; bless with ATLAKE_BLESS=1 (see {})",
        path.display()
    );
}

#[test]
fn the_check_refuses_removed_retyped_and_renamed_columns() {
    let before = "Events(None)\n  did: Utf8 not null\n  time_us: Int64 not null\n";
    let added = format!("{before}  new: Int64 null\n");
    assert!(breaking(before, &added).is_empty());
    assert!(!breaking(before, "Events(None)\n  did: Utf8 not null\n").is_empty());
    assert!(
        !breaking(
            before,
            "Events(None)\n  did: Utf8 not null\n  time_us: Utf8 not null\n"
        )
        .is_empty()
    );
    // moved: still read by name
    assert!(
        breaking(
            before,
            "Events(None)\n  time_us: Int64 not null\n  did: Utf8 not null\n"
        )
        .is_empty()
    );
    // renamed, or nullable now
    assert!(
        !breaking(
            before,
            "Events(None)\n  did: Utf8 not null\n  time: Int64 not null\n"
        )
        .is_empty()
    );
    assert!(
        !breaking(
            before,
            "Events(None)\n  did: Utf8 null\n  time_us: Int64 not null\n"
        )
        .is_empty()
    );
    assert!(!breaking(before, "Identity\n").is_empty());
}
