//! The web console at `/`: a SQL editor with the example questions of `queries/`, paged typed
//! results over `POST /sql`, CSV and Parquet downloads, the tables with their columns, and a
//! live page of the daemon's metrics (`/metrics`), drawn on canvases.
//!
//! Its files are embedded in the binary (no CDN, no external font: it works offline) and served
//! without a token, since they hold no data; everything the page fetches needs the token as
//! usual. The page asks for it when a request is refused (401) and keeps it in the tab's
//! `sessionStorage`, never in a URL. Every file goes out with a strict Content-Security-Policy
//! (`default-src 'self'`, so no inline script) and `X-Content-Type-Options: nosniff`.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The response header carrying a result's Arrow schema (`POST /sql?schema=1`): a JSON array of
/// `{"name", "type", "nullable"}`, non-ASCII characters escaped as `\uXXXX`.
pub const SCHEMA_HEADER: HeaderName = HeaderName::from_static("x-atlake-schema");

/// The console's Content-Security-Policy: only this server's own files, no inline code, no
/// framing, no plugins, no form posts elsewhere.
pub const CSP: &str = "default-src 'self'; base-uri 'none'; form-action 'none'; \
                       frame-ancestors 'none'; object-src 'none'";

/// The example questions of `queries/`, embedded at build time: (file stem, SQL).
/// A unit test fails when a file of `queries/` is missing here.
pub const EXAMPLES: &[(&str, &str)] = &[
    (
        "account_status_changes",
        include_str!("../../queries/account_status_changes.sql"),
    ),
    (
        "embed_types_via_json",
        include_str!("../../queries/embed_types_via_json.sql"),
    ),
    (
        "lake_files_by_partition",
        include_str!("../../queries/lake_files_by_partition.sql"),
    ),
    (
        "most_followed_accounts_today",
        include_str!("../../queries/most_followed_accounts_today.sql"),
    ),
    (
        "most_liked_posts_last_hour",
        include_str!("../../queries/most_liked_posts_last_hour.sql"),
    ),
    (
        "posts_per_language_per_hour",
        include_str!("../../queries/posts_per_language_per_hour.sql"),
    ),
    (
        "q1_top_event_types",
        include_str!("../../queries/q1_top_event_types.sql"),
    ),
    (
        "q2_event_types_and_users",
        include_str!("../../queries/q2_event_types_and_users.sql"),
    ),
    (
        "q3_when_do_people_use_bluesky",
        include_str!("../../queries/q3_when_do_people_use_bluesky.sql"),
    ),
    (
        "q4_post_veterans",
        include_str!("../../queries/q4_post_veterans.sql"),
    ),
    (
        "q5_longest_activity",
        include_str!("../../queries/q5_longest_activity.sql"),
    ),
    (
        "reply_and_quote_ratios",
        include_str!("../../queries/reply_and_quote_ratios.sql"),
    ),
    (
        "third_party_lexicons",
        include_str!("../../queries/third_party_lexicons.sql"),
    ),
    (
        "top_hashtags",
        include_str!("../../queries/top_hashtags.sql"),
    ),
];

/// A file of the console: (path, Content-Type, body).
type File = (&'static str, &'static str, &'static str);

/// The console's files.
const FILES: &[File] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("console/index.html"),
    ),
    (
        "/console/app.js",
        "text/javascript; charset=utf-8",
        include_str!("console/app.js"),
    ),
    (
        "/console/style.css",
        "text/css; charset=utf-8",
        include_str!("console/style.css"),
    ),
    (
        "/console/icon.svg",
        "image/svg+xml",
        include_str!("console/icon.svg"),
    ),
];

/// The example questions as JSON.
const EXAMPLES_PATH: &str = "/console/examples";

/// Whether `path` is one of the console's files, served without a token.
pub fn is_public(path: &str) -> bool {
    path == EXAMPLES_PATH || FILES.iter().any(|(p, _, _)| *p == path)
}

/// The console's routes (GET, and HEAD with it).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut r = Router::new().route(EXAMPLES_PATH, get(examples));
    for &(path, content_type, body) in FILES {
        r = r.route(path, get(move || async move { file(content_type, body) }));
    }
    r
}

/// A console file with its headers.
fn file(content_type: &'static str, body: impl Into<axum::body::Body>) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
            // a new binary serves new files: the browser revalidates
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body.into(),
    )
        .into_response()
}

/// An example's title: its first comment line.
fn title(sql: &str) -> &str {
    sql.lines()
        .next()
        .and_then(|l| l.strip_prefix("--"))
        .map_or("", str::trim)
}

/// `[{"name", "title", "sql"}]`, in file-name order.
fn examples_json() -> String {
    let v: Vec<serde_json::Value> = EXAMPLES
        .iter()
        .map(|(name, sql)| serde_json::json!({ "name": name, "title": title(sql), "sql": sql }))
        .collect();
    serde_json::Value::Array(v).to_string()
}

async fn examples() -> Response {
    file("application/json", examples_json())
}

/// `schema` as the [`SCHEMA_HEADER`] value; `None` only if it cannot be one.
pub fn schema_header(schema: &arrow::datatypes::Schema) -> Option<HeaderValue> {
    let fields: Vec<serde_json::Value> = schema
        .fields()
        .iter()
        .map(|f| {
            serde_json::json!({
                "name": f.name(),
                "type": f.data_type().to_string(),
                "nullable": f.is_nullable(),
            })
        })
        .collect();
    let json = serde_json::Value::Array(fields).to_string();
    // a header value is visible ASCII: JSON escapes say the rest (serde_json already escapes
    // control characters)
    let mut ascii = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            ascii.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                ascii.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    match HeaderValue::from_str(&ascii) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(error = %e, "a result schema could not be sent as a header");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use std::collections::BTreeSet;

    #[test]
    fn every_example_query_file_is_embedded() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("queries");
        let mut on_disk = BTreeSet::new();
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "sql") {
                let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
                let embedded = EXAMPLES.iter().find(|(n, _)| *n == stem);
                let Some((_, sql)) = embedded else {
                    panic!("queries/{stem}.sql is not in console::EXAMPLES: add it");
                };
                assert_eq!(*sql, std::fs::read_to_string(&p).unwrap(), "{stem}");
                on_disk.insert(stem);
            }
        }
        let embedded: BTreeSet<String> = EXAMPLES.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(
            embedded, on_disk,
            "EXAMPLES lists exactly the files of queries/"
        );
        assert_eq!(embedded.len(), EXAMPLES.len(), "no example twice");
        assert!(EXAMPLES.iter().all(|(_, sql)| !title(sql).is_empty()));
    }

    #[test]
    fn examples_json_lists_each_example_with_its_title() {
        let v: serde_json::Value = serde_json::from_str(&examples_json()).unwrap();
        let items = v.as_array().unwrap();
        assert_eq!(items.len(), EXAMPLES.len());
        let q1 = items
            .iter()
            .find(|i| i["name"] == "q1_top_event_types")
            .unwrap();
        assert!(q1["sql"].as_str().unwrap().contains("FROM events"));
        assert!(q1["title"].as_str().unwrap().starts_with("JSONBench Q1"));
    }

    #[test]
    fn files_are_public_with_their_types_and_security_headers() {
        for (path, ct, _) in FILES {
            assert!(is_public(path));
            let r = file(ct, "");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], *ct);
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
        assert!(is_public("/console/examples"));
        for private in ["/sql", "/tables", "/metrics", "/filters", "/console", "/x"] {
            assert!(!is_public(private), "{private}");
        }
        assert!(CSP.starts_with("default-src 'self'"));
    }

    #[test]
    fn the_page_has_no_inline_code_and_no_outside_url() {
        let (_, _, html) = FILES[0];
        let lower = html.to_ascii_lowercase();
        // every script is a file of ours; no handler attributes, no inline styles
        assert_eq!(
            lower.matches("<script").count(),
            lower.matches("<script src=\"/console/").count()
        );
        assert!(!has_handler_attribute(&lower));
        assert!(!lower.contains("style=\""));
        // nothing from elsewhere (the icon's SVG namespace is a name, not a fetch)
        for (path, _, body) in FILES.iter().filter(|(p, _, _)| !p.ends_with(".svg")) {
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{path}"
            );
            assert!(!body.contains("innerHTML") && !body.contains("outerHTML"));
            assert!(!body.contains("eval("));
        }
    }

    /// Whether an HTML text has an attribute like ` onclick=`.
    fn has_handler_attribute(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        })
    }

    #[test]
    fn the_schema_header_is_ascii_json_of_the_arrow_schema() {
        let schema = Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("prénom \"x\" ✓ 🦋", DataType::Utf8, true),
            Field::new(
                "t",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ]);
        let v = schema_header(&schema).unwrap();
        let text = v.to_str().unwrap();
        assert!(text.is_ascii());
        let back: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(back[0]["name"], "n");
        assert_eq!(back[0]["type"], "Int64");
        assert_eq!(back[0]["nullable"], false);
        assert_eq!(back[1]["name"], "prénom \"x\" ✓ 🦋");
        assert_eq!(back[1]["type"], "Utf8");
        assert_eq!(
            back[2]["type"],
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())).to_string()
        );
    }
}
