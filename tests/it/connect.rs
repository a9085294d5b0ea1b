//! The README's "Connect" section as a user copies it: its Python block (psycopg, ADBC Flight
//! SQL, pandas over Flight SQL and over HTTP Parquet) runs as written against `atlake serve`
//! with a token and all three front ends, and reads what HTTP reads.

use crate::abuse::{TOKEN, start_serve};
use crate::common::{free_port, post_json};
use crate::sql::fixture_lake;
use crate::tools::{missing, python_with, run_python};

/// The first ```python block after `## Connect` in the README.
fn connect_snippet() -> String {
    let readme = include_str!("../../README.md");
    let section = &readme[readme.find("\n## Connect\n").expect("a Connect section")..];
    let start = section.find("```python\n").expect("a Python block") + "```python\n".len();
    let len = section[start..].find("```").expect("the block ends");
    section[start..start + len].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_connect_snippet_runs_as_written() {
    let Some(py) = python_with(&["pandas", "psycopg", "adbc_driver_flightsql", "pyarrow"]) else {
        return missing("python with pandas, psycopg, adbc-driver-flightsql");
    };
    let snippet = connect_snippet();
    for needle in [
        "127.0.0.1:50051",
        "127.0.0.1:8080",
        "port=5432",
        "token = \"…\"",
    ] {
        assert!(snippet.contains(needle), "the snippet has {needle}");
    }
    let (dir, lake, _) = fixture_lake(800, 17).await;
    let (pg, fl) = (free_port(), free_port());
    let (_child, base, log) = start_serve(
        dir.path(),
        &lake,
        &[
            ("ATLAKE_SERVER_PG_LISTEN", &format!("127.0.0.1:{pg}")),
            ("ATLAKE_SERVER_FLIGHT_LISTEN", &format!("127.0.0.1:{fl}")),
        ],
    )
    .await;
    let http_port = base.rsplit(':').next().unwrap();
    let script = snippet
        .replace("port=5432", &format!("port={pg}"))
        .replace("127.0.0.1:50051", &format!("127.0.0.1:{fl}"))
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http_port}"))
        .replace("token = \"…\"", &format!("token = {TOKEN:?}"))
        + "\nimport json\nprint(json.dumps({\"http\": df.astype(str).values.tolist(), \
           \"flight\": table.to_pandas().astype(str).values.tolist(), \"pg\": len(rows)}))\n";
    let out = run_python(&py, &script, &[]);
    let got: serde_json::Value = serde_json::from_str(out.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| {
            panic!(
                "{e}: {out}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    // what HTTP's JSON says
    let sql = "SELECT collection, count(*) AS n FROM events GROUP BY 1 ORDER BY n DESC, collection LIMIT 5";
    let want = post_json(&reqwest::Client::new(), &base, sql, Some(TOKEN)).await;
    let want: Vec<serde_json::Value> = want
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| {
            serde_json::json!([
                r["collection"].as_str().unwrap_or("None"),
                r["n"].to_string()
            ])
        })
        .collect();
    assert_eq!(want.len(), 5);
    assert_eq!(got["http"], serde_json::Value::Array(want.clone()), "{out}");
    assert_eq!(got["flight"], serde_json::Value::Array(want), "{out}");
    assert!(got["pg"].as_u64().is_some(), "{out}");
}
