//! Partition keys, lake paths and file names: formatting *and* parsing, so the lake describes
//! itself.
//!
//! Layout (Hive style, read by DuckDB's `hive_partitioning` and Spark):
//!
//! ```text
//! <root>/events/collection=<nsid>/date=YYYY-MM-DD/hour=HH/<file>.parquet
//! <root>/events/collection=_other/…      NSIDs beyond the open-partition cap
//! <root>/events/collection=_identity/…   #identity events
//! <root>/events/collection=_account/…    #account events
//! <root>/events/collection=_sync/…       #sync events (firehose only)
//! <root>/_errors/date=YYYY-MM-DD/hour=HH/<file>.parquet   quarantine
//! <root>/_atlake/checkpoint.json
//! ```
//!
//! File names carry the source and cursor range: `fh-<first>-<last>-<hash>.parquet` (firehose
//! seq) or `js-<first>-<last>-<hash>.parquet` (Jetstream `time_us`); the hash of the rows' keys
//! keeps names unique. No path component is ever built from a name that was not validated:
//! collections must pass [`is_path_safe_collection`], everything else is generated here.

use crate::decode::syntax::{civil_from_days, is_nsid};
use crate::model::SourceKind;
use crate::model::lexicon::Lexicon;
use crate::model::rows::TableKind;
use std::fmt;

/// Directory of event partitions under the lake root.
pub const EVENTS_DIR: &str = "events";
/// Directory of the quarantine under the lake root.
pub const ERRORS_DIR: &str = "_errors";
/// Directory of atlake's own state under the lake root.
pub const STATE_DIR: &str = "_atlake";
/// Longest collection used as a partition name.
pub const MAX_PARTITION_NSID: usize = 253;

/// Microseconds per hour.
pub const HOUR_US: i64 = 3_600_000_000;

/// Whether a collection may name a partition directory: a valid NSID, at most 253 bytes, with a
/// lower-case authority (NSID authorities are case-insensitive; we never let two spellings of
/// one authority make two directories).
pub fn is_path_safe_collection(nsid: &str) -> bool {
    if !is_nsid(nsid) || nsid.len() > MAX_PARTITION_NSID {
        return false;
    }
    match nsid.rsplit_once('.') {
        Some((authority, _)) => !authority.bytes().any(|c| c.is_ascii_uppercase()),
        None => false,
    }
}

/// What a partition holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PartitionName {
    /// One collection (validated by [`is_path_safe_collection`]).
    Collection(String),
    /// Collections beyond the open-partition cap.
    Other,
    /// `#identity` events.
    Identity,
    /// `#account` events.
    Account,
    /// `#sync` events.
    Sync,
    /// The quarantine.
    Errors,
}

impl PartitionName {
    /// The value in the `collection=` directory (not used for [`PartitionName::Errors`]).
    pub fn value(&self) -> &str {
        match self {
            PartitionName::Collection(c) => c,
            PartitionName::Other => "_other",
            PartitionName::Identity => "_identity",
            PartitionName::Account => "_account",
            PartitionName::Sync => "_sync",
            PartitionName::Errors => "_errors",
        }
    }

    /// Parses a `collection=` value.
    pub fn parse(v: &str) -> Option<PartitionName> {
        Some(match v {
            "_other" => PartitionName::Other,
            "_identity" => PartitionName::Identity,
            "_account" => PartitionName::Account,
            "_sync" => PartitionName::Sync,
            "_errors" => PartitionName::Errors,
            c if is_path_safe_collection(c) => PartitionName::Collection(c.to_string()),
            _ => return None,
        })
    }

    /// The row shape of this partition.
    pub fn table_kind(&self) -> TableKind {
        match self {
            PartitionName::Collection(c) => TableKind::Events(Lexicon::of(c)),
            PartitionName::Other | PartitionName::Sync => TableKind::Events(None),
            PartitionName::Identity => TableKind::Identity,
            PartitionName::Account => TableKind::Account,
            PartitionName::Errors => TableKind::Errors,
        }
    }
}

/// A partition: what, and which hour of stream time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// What it holds.
    pub name: PartitionName,
    /// Hours since the Unix epoch.
    pub hour: i64,
}

/// `YYYY-MM-DD` and `HH` of an hour number.
pub fn date_hour(hour: i64) -> (String, String) {
    let days = hour.div_euclid(24);
    let (y, m, d) = civil_from_days(days);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}", hour.rem_euclid(24)),
    )
}

/// Hour number of `YYYY-MM-DD` and `HH`.
pub fn parse_date_hour(date: &str, hour: &str) -> Option<i64> {
    let b = date.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' || hour.len() != 2 {
        return None;
    }
    let us = crate::decode::syntax::parse_datetime_us(&format!("{date}T{hour}:00:00Z")).ok()?;
    Some(us.div_euclid(HOUR_US))
}

impl PartitionKey {
    /// The partition of an event at `time_us`.
    pub fn new(name: PartitionName, time_us: i64) -> Self {
        PartitionKey {
            name,
            hour: time_us.div_euclid(HOUR_US),
        }
    }

    /// Directory relative to the lake root.
    pub fn dir(&self) -> String {
        let (date, hour) = date_hour(self.hour);
        match &self.name {
            PartitionName::Errors => format!("{ERRORS_DIR}/date={date}/hour={hour}"),
            n => format!(
                "{EVENTS_DIR}/collection={}/date={date}/hour={hour}",
                n.value()
            ),
        }
    }

    /// First µs of the hour.
    pub fn start_us(&self) -> i64 {
        self.hour * HOUR_US
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dir())
    }
}

/// A data file's name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileName {
    /// Which source wrote it.
    pub source: SourceKind,
    /// Lowest cursor in the file.
    pub first: i64,
    /// Highest cursor in the file.
    pub last: i64,
    /// Hash of the rows' keys.
    pub hash: u32,
}

impl FileName {
    /// `fh-…` or `js-…`.
    pub fn render(&self) -> String {
        let p = match self.source {
            SourceKind::Firehose => "fh",
            SourceKind::Jetstream => "js",
        };
        format!("{p}-{}-{}-{:08x}.parquet", self.first, self.last, self.hash)
    }

    /// Parses a file name written by [`FileName::render`].
    pub fn parse(name: &str) -> Option<FileName> {
        let stem = name.strip_suffix(".parquet")?;
        let mut parts = stem.split('-');
        let source = match parts.next()? {
            "fh" => SourceKind::Firehose,
            "js" => SourceKind::Jetstream,
            _ => return None,
        };
        let first: i64 = parts.next()?.parse().ok()?;
        let last: i64 = parts.next()?.parse().ok()?;
        let hash = u32::from_str_radix(parts.next()?, 16).ok()?;
        if parts.next().is_some() || first > last {
            return None;
        }
        Some(FileName {
            source,
            first,
            last,
            hash,
        })
    }
}

/// A data file of the lake, as found by listing or as just written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LakeFile {
    /// Its partition.
    pub key: PartitionKey,
    /// Its name.
    pub name: FileName,
    /// Path relative to the lake root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Rows, when known without reading the file.
    pub rows: Option<u64>,
}

/// Parses a path relative to the lake root; `None` for anything that is not a data file
/// (temporary files, foreign files, invalid names).
pub fn parse_path(rel: &str, size: u64) -> Option<LakeFile> {
    let parts: Vec<&str> = rel.split('/').collect();
    let (name, date, hour, file) = match parts.as_slice() {
        [EVENTS_DIR, coll, date, hour, file] => {
            let n = PartitionName::parse(coll.strip_prefix("collection=")?)?;
            if n == PartitionName::Errors {
                return None;
            }
            (n, *date, *hour, *file)
        }
        [ERRORS_DIR, date, hour, file] => (PartitionName::Errors, *date, *hour, *file),
        _ => return None,
    };
    let h = parse_date_hour(date.strip_prefix("date=")?, hour.strip_prefix("hour=")?)?;
    Some(LakeFile {
        key: PartitionKey { name, hour: h },
        name: FileName::parse(file)?,
        path: rel.to_string(),
        size,
        rows: None,
    })
}

/// Whether a path is a leftover temporary file of an interrupted local write.
pub fn is_temp_path(rel: &str) -> bool {
    rel.rsplit('/')
        .next()
        .is_some_and(|f| f.starts_with('.') && f.ends_with(".tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        let key = PartitionKey::new(
            PartitionName::Collection("app.bsky.feed.post".into()),
            1_783_175_887_517_000,
        );
        let name = FileName {
            source: SourceKind::Firehose,
            first: 31_527_015_471,
            last: 31_527_016_000,
            hash: 0xdead_beef,
        };
        let path = format!("{}/{}", key.dir(), name.render());
        assert_eq!(
            path,
            "events/collection=app.bsky.feed.post/date=2026-07-04/hour=14/fh-31527015471-31527016000-deadbeef.parquet"
        );
        let f = parse_path(&path, 10).unwrap();
        assert_eq!((f.key, f.name), (key, name));
        let e = PartitionKey::new(PartitionName::Errors, 0);
        assert_eq!(e.dir(), "_errors/date=1970-01-01/hour=00");
        assert!(parse_path(&format!("{}/js-1-2-00000000.parquet", e.dir()), 1).is_some());
    }

    #[test]
    fn hostile_names_never_make_paths() {
        for bad in [
            "../../x",
            "a/b",
            "Com.Example.thing",
            "com..x",
            "",
            ".",
            "_other2",
        ] {
            assert!(PartitionName::parse(bad).is_none(), "{bad}");
        }
        let long = format!("com.{}.x", "a".repeat(300));
        assert!(!is_path_safe_collection(&long));
        assert!(is_path_safe_collection("com.example.fooBar"));
        assert!(
            parse_path(
                "events/collection=../date=2026-01-01/hour=00/fh-1-2-0.parquet",
                0
            )
            .is_none()
        );
        assert!(
            parse_path(
                "events/collection=a.b.c/date=2026-01-01/hour=00/.fh-1-2-0.parquet.tmp",
                0
            )
            .is_none()
        );
        assert!(is_temp_path(
            "events/collection=a.b.c/date=2026-01-01/hour=00/.fh-1-2-0.parquet.tmp"
        ));
    }
}
