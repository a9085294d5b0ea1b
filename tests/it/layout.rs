//! The house matches its plan: every module imports only the layers below it (the table in
//! `src/lib.rs`, "Layout"). A new upward or sideways import fails here, with the file and the
//! module it reached for. Test modules (`#[cfg(test)] mod tests` at the end of a file) may use
//! anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each top-level module and the modules it may import. Keep in step with `src/lib.rs`.
const ALLOWED: &[(&str, &[&str])] = &[
    // leaves
    ("syntax", &[]),
    ("backoff", &[]),
    ("telemetry", &[]),
    ("memory", &[]),
    // the data
    ("model", &["syntax"]),
    ("config", &["syntax", "model"]),
    ("decode", &["syntax", "model"]),
    // transport and storage
    (
        "source",
        &["syntax", "model", "config", "decode", "backoff"],
    ),
    ("sink", &["syntax", "model", "config", "backoff"]),
    ("checkpoint", &["syntax", "model", "config", "sink"]),
    ("catalog", &["syntax", "model", "sink", "checkpoint"]),
    // the two sides of the catalog: neither reads the other
    (
        "ingest",
        &[
            "syntax",
            "model",
            "config",
            "decode",
            "backoff",
            "source",
            "sink",
            "checkpoint",
            "catalog",
            "memory",
        ],
    ),
    (
        "backfill",
        &[
            "syntax",
            "model",
            "config",
            "decode",
            "backoff",
            "source",
            "sink",
            "checkpoint",
            "catalog",
        ],
    ),
    (
        "query",
        &[
            "syntax",
            "model",
            "config",
            "sink",
            "checkpoint",
            "catalog",
            "telemetry",
            "memory",
        ],
    ),
    // tools beside the data path
    ("simulate", &["syntax", "model", "decode"]),
    ("convert", &["syntax", "model", "decode", "source"]),
    // the edges
    (
        "daemon",
        &[
            "config",
            "model",
            "sink",
            "ingest",
            "backfill",
            "query",
            "telemetry",
        ],
    ),
    (
        "export",
        &["syntax", "model", "config", "sink", "checkpoint", "query"],
    ),
    (
        "cli",
        &[
            "export",
            "syntax",
            "model",
            "config",
            "decode",
            "source",
            "sink",
            "checkpoint",
            "ingest",
            "backfill",
            "query",
            "daemon",
            "simulate",
            "convert",
            "telemetry",
            "memory",
        ],
    ),
];

/// The top-level modules a file names through `crate::…` (its test module left out).
fn imports(text: &str) -> BTreeSet<String> {
    let code = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c}`
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let m = part.trim().split("::").next().unwrap_or("").trim();
                if !m.is_empty() {
                    out.insert(m.to_string());
                }
            }
        } else {
            let m: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !m.is_empty() {
                out.insert(m);
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn imports_only_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut seen = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        seen.insert(module.clone());
        let Some(ok) = allowed.get(module.as_str()) else {
            violations.push(format!(
                "{}: module `{module}` is not in the layer table",
                rel.display()
            ));
            continue;
        };
        for m in imports(&std::fs::read_to_string(f).unwrap()) {
            if m != module && !ok.contains(&m.as_str()) {
                violations.push(format!("{} imports crate::{m}", rel.display()));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "imports against the layers of src/lib.rs:\n{}",
        violations.join("\n")
    );
    // every module of the table exists (a renamed module updates the table)
    for (m, _) in ALLOWED {
        assert!(seen.contains(*m), "no module `{m}` in src/");
    }
}

#[test]
fn the_import_scanner_sees_every_form() {
    let text = "use crate::model::Event;\nuse crate::{sink::store::Lake, query};\n\
                fn f() { crate::ingest::start(); }\n#[cfg(test)]\nmod tests { use crate::cli; }";
    let got: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(got, ["ingest", "model", "query", "sink"]);
}
