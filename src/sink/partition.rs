//! Partition keys, lake paths and file names: formatting *and* parsing, so the lake describes
//! itself.
//!
//! Layout (Hive style, read by DuckDB's `hive_partitioning` and Spark):
//!
//! ```text
//! <root>/events/collection_partition=<nsid>/date=YYYY-MM-DD/hour=HH/<file>.parquet
//! <root>/events/collection_partition=_other/…      NSIDs beyond the open-partition cap
//! <root>/events/collection_partition=_identity/…   #identity events
//! <root>/events/collection_partition=_account/…    #account events
//! <root>/events/collection_partition=_sync/…       #sync events (firehose only)
//! <root>/events/_delta_log/                        the `events` table's Delta log
//! <root>/history/collection=<nsid>/month=YYYY-MM/<file>.parquet   backfilled records
//! <root>/_errors/date=YYYY-MM-DD/hour=HH/<file>.parquet   quarantine
//! <root>/_errors/_delta_log/                       the quarantine's Delta log
//! <root>/_atlake/                                  the writer lease
//! ```
//!
//! File names carry the source and cursor range: `fh-<first>-<last>-<hash>.parquet` (firehose
//! seq) or `js-<first>-<last>-<hash>.parquet` (Jetstream `time_us`); the hash of the rows' keys
//! keeps names unique. No path component is ever built from a name that was not validated:
//! collections must pass [`is_path_safe_collection`], everything else is generated here.

use crate::model::lexicon::Lexicon;
use crate::model::rows::TableKind;
use crate::model::{Cursor, SourceKind};
use crate::syntax::{civil_from_days, is_nsid};
use std::fmt;

/// The key of an event partition's first directory level (`collection_partition=<value>`):
/// the Delta table's partition column of the same name. Files keep each row's real
/// collection in their `collection` column, which a Hive reader would otherwise shadow
/// (`_other` rows). Lakes written before the Delta log used `collection=`, still read.
pub const COLLECTION_KEY: &str = "collection_partition";
/// Directory of event partitions under the lake root.
pub const EVENTS_DIR: &str = "events";
/// Directory of backfilled history (month partitions) under the lake root.
pub const HISTORY_DIR: &str = "history";
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

/// How much time a partition covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Span {
    /// One hour (`events/…/date=…/hour=…`): live streams.
    Hour,
    /// One calendar month (`history/…/month=YYYY-MM`): backfilled records, which spread over
    /// years; hourly partitions would make a file per record.
    Month,
    /// One UTC day (`events/…/date=…/hour=__HIVE_DEFAULT_PARTITION__`): a long-tail
    /// collection's day, merged by compaction so that it stops making a file per hour. The
    /// `hour` partition value is null (the Hive and Delta spelling of "no single hour").
    Day,
}

/// The `hour=` value of a day partition: Hive's (and Spark's, DuckDB's, Polars') null.
pub const NULL_PARTITION: &str = "__HIVE_DEFAULT_PARTITION__";

/// A partition: what, and which hour (or month) of partition time.
///
/// The hour is private and always in `MIN_HOUR ..= MAX_HOUR` (years 0000 to 9999): every key
/// renders a directory that [`parse_path`] reads back to the same key. A month partition's hour
/// is the first hour of its month.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    /// What it holds.
    pub name: PartitionName,
    hour: i64,
    span: Span,
}

/// The first hour a partition may have: 0000-01-01T00.
pub const MIN_HOUR: i64 = -17_268_672;
/// The last hour a partition may have: 9999-12-31T23.
pub const MAX_HOUR: i64 = 70_389_527;

/// A time or hour that cannot name a partition directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("hour {hour} since the epoch is outside the years 0000 to 9999 a partition can name")]
pub struct PartitionRangeError {
    /// The hour refused.
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
    let us = crate::syntax::parse_datetime_us(&format!("{date}T{hour}:00:00Z")).ok()?;
    Some(us.div_euclid(HOUR_US))
}

impl PartitionKey {
    /// The partition of an event whose partition time is `time_us`.
    pub fn try_new(name: PartitionName, time_us: i64) -> Result<Self, PartitionRangeError> {
        PartitionKey::at_hour(name, time_us.div_euclid(HOUR_US))
    }

    /// The partition of hour number `hour` (hours since the epoch).
    pub fn at_hour(name: PartitionName, hour: i64) -> Result<Self, PartitionRangeError> {
        if (MIN_HOUR..=MAX_HOUR).contains(&hour) {
            Ok(PartitionKey {
                name,
                hour,
                span: Span::Hour,
            })
        } else {
            Err(PartitionRangeError { hour })
        }
    }

    /// The month partition (of backfilled history) of `time_us`. The quarantine has no month
    /// partitions: it is refused.
    pub fn month_of(name: PartitionName, time_us: i64) -> Result<Self, PartitionRangeError> {
        let hour = time_us.div_euclid(HOUR_US);
        if name == PartitionName::Errors || !(MIN_HOUR..=MAX_HOUR).contains(&hour) {
            return Err(PartitionRangeError { hour });
        }
        let (y, m, _) = civil_from_days(hour.div_euclid(24));
        Ok(PartitionKey {
            name,
            hour: crate::syntax::days_from_civil(y, m, 1) * 24,
            span: Span::Month,
        })
    }

    /// The day partition (a compacted long-tail day) of hour number `hour`. The quarantine has
    /// no day partitions: it is refused.
    pub fn day_of(name: PartitionName, hour: i64) -> Result<Self, PartitionRangeError> {
        let first = hour.div_euclid(24) * 24;
        if name == PartitionName::Errors || !(MIN_HOUR..=MAX_HOUR).contains(&hour) {
            return Err(PartitionRangeError { hour });
        }
        Ok(PartitionKey {
            name,
            hour: first,
            span: Span::Day,
        })
    }

    /// Hours since the epoch (of the first hour, for a month or day partition).
    pub fn hour(&self) -> i64 {
        self.hour
    }

    /// The time it covers.
    pub fn span(&self) -> Span {
        self.span
    }

    /// Directory relative to the lake root.
    pub fn dir(&self) -> String {
        let (date, hour) = date_hour(self.hour);
        if self.span == Span::Month {
            return format!(
                "{HISTORY_DIR}/collection={}/month={}",
                self.name.value(),
                &date[..7]
            );
        }
        let hour = if self.span == Span::Day {
            NULL_PARTITION
        } else {
            &hour
        };
        match &self.name {
            PartitionName::Errors => format!("{ERRORS_DIR}/date={date}/hour={hour}"),
            n => format!(
                "{EVENTS_DIR}/{COLLECTION_KEY}={}/date={date}/hour={hour}",
                n.value()
            ),
        }
    }

    /// First µs of the hour.
    pub fn start_us(&self) -> i64 {
        self.hour * HOUR_US
    }

    /// First µs after the hour (or month).
    pub fn end_us(&self) -> i64 {
        match self.span {
            Span::Hour => (self.hour + 1) * HOUR_US,
            Span::Day => (self.hour + 24) * HOUR_US,
            Span::Month => {
                let (y, m, _) = civil_from_days(self.hour.div_euclid(24));
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                crate::syntax::days_from_civil(ny, nm, 1) * 24 * HOUR_US
            }
        }
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.dir())
    }
}

/// A data file's name: `fh-<first>-<last>-<hash>.parquet` or `js-…`, the source and the range of
/// cursors of its rows (0-0 when no row had a cursor: inputs quarantined before the stream gave
/// any position).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileName {
    first: Cursor,
    last: Cursor,
    /// Hash of the rows' keys.
    pub hash: u32,
}

/// A file name that cannot be written: its cursors are of different sources or out of order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("file cursors {first} .. {last} are not an ordered range of one source")]
pub struct FileNameError {
    /// Lowest cursor.
    pub first: Cursor,
    /// Highest cursor.
    pub last: Cursor,
}

impl FileName {
    /// A name for rows with cursors `first ..= last`.
    pub fn try_new(first: Cursor, last: Cursor, hash: u32) -> Result<FileName, FileNameError> {
        if first.source() != last.source() || first > last {
            return Err(FileNameError { first, last });
        }
        Ok(FileName { first, last, hash })
    }

    /// Which source wrote it.
    pub fn source(&self) -> SourceKind {
        self.first.source()
    }

    /// Lowest cursor in the file.
    pub fn first(&self) -> Cursor {
        self.first
    }

    /// Highest cursor in the file.
    pub fn last(&self) -> Cursor {
        self.last
    }

    /// `fh-…` or `js-…`.
    pub fn render(&self) -> String {
        let p = match self.source() {
            SourceKind::Firehose => "fh",
            SourceKind::Jetstream => "js",
            SourceKind::Repo => "rp",
        };
        format!(
            "{p}-{}-{}-{:08x}.parquet",
            self.first.value(),
            self.last.value(),
            self.hash
        )
    }

    /// Parses a file name written by [`FileName::render`].
    pub fn parse(name: &str) -> Option<FileName> {
        let stem = name.strip_suffix(".parquet")?;
        let mut parts = stem.split('-');
        let source = SourceKind::parse(match parts.next()? {
            "fh" => "firehose",
            "js" => "jetstream",
            "rp" => "repo",
            _ => return None,
        })?;
        let first = Cursor::try_new(source, digits(parts.next()?)?).ok()?;
        let last = Cursor::try_new(source, digits(parts.next()?)?).ok()?;
        let h = parts.next()?;
        if h.len() != 8 || parts.next().is_some() {
            return None;
        }
        let hash = u32::from_str_radix(h, 16).ok()?;
        FileName::try_new(first, last, hash).ok()
    }
}

/// A non-negative decimal written without sign or leading zeros (as `render` writes it).
fn digits(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
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
            // lakes written before the Delta log named the directory `collection=`
            let v = coll
                .strip_prefix(COLLECTION_KEY)
                .and_then(|v| v.strip_prefix('='))
                .or_else(|| coll.strip_prefix("collection="))?;
            let n = PartitionName::parse(v)?;
            if n == PartitionName::Errors {
                return None;
            }
            (n, *date, *hour, *file)
        }
        [ERRORS_DIR, date, hour, file] => (PartitionName::Errors, *date, *hour, *file),
        [HISTORY_DIR, coll, month, file] => {
            let n = PartitionName::parse(coll.strip_prefix("collection=")?)?;
            let m = month.strip_prefix("month=")?;
            if n == PartitionName::Errors || m.len() != 7 {
                return None;
            }
            let start = parse_date_hour(&format!("{m}-01"), "00")?;
            let key = PartitionKey::month_of(n, start * HOUR_US).ok()?;
            return Some(LakeFile {
                key,
                name: FileName::parse(file)?,
                path: rel.to_string(),
                size,
                rows: None,
            });
        }
        _ => return None,
    };
    let hour = hour.strip_prefix("hour=")?;
    let key = if hour == NULL_PARTITION {
        let h = parse_date_hour(date.strip_prefix("date=")?, "00")?;
        PartitionKey::day_of(name, h).ok()?
    } else {
        let h = parse_date_hour(date.strip_prefix("date=")?, hour)?;
        PartitionKey::at_hour(name, h).ok()?
    };
    Some(LakeFile {
        key,
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

    /// A month partition holds exactly its month, renders under `history/` and parses back,
    /// across year ends and leap days.
    #[test]
    fn month_partitions_round_trip() {
        let name = PartitionName::Collection("app.bsky.feed.post".into());
        for (t, dir, days) in [
            (
                "2024-02-29T23:59:59Z",
                "history/collection=app.bsky.feed.post/month=2024-02",
                29,
            ),
            (
                "2023-12-31T23:00:00Z",
                "history/collection=app.bsky.feed.post/month=2023-12",
                31,
            ),
            (
                "2025-01-01T00:00:00Z",
                "history/collection=app.bsky.feed.post/month=2025-01",
                31,
            ),
        ] {
            let us = crate::syntax::parse_datetime_us(t).unwrap();
            let k = PartitionKey::month_of(name.clone(), us).unwrap();
            assert_eq!(k.dir(), dir);
            assert!((k.start_us()..k.end_us()).contains(&us));
            assert_eq!(k.end_us() - k.start_us(), days * 24 * HOUR_US);
            let f = FileName::try_new(
                Cursor::try_new(SourceKind::Repo, 3).unwrap(),
                Cursor::try_new(SourceKind::Repo, 3).unwrap(),
                7,
            )
            .unwrap();
            let path = format!("{dir}/{}", f.render());
            assert!(path.ends_with("/rp-3-3-00000007.parquet"));
            let back = parse_path(&path, 1).unwrap();
            assert_eq!(back.key, k);
            assert_eq!(back.name, f);
        }
        assert!(PartitionKey::month_of(PartitionName::Errors, 0).is_err());
        assert!(
            parse_path(
                "history/collection=_errors/month=2024-01/rp-1-1-00000001.parquet",
                1
            )
            .is_none()
        );
        assert!(
            parse_path(
                "history/collection=app.bsky.feed.post/month=2024-13/rp-1-1-00000001.parquet",
                1
            )
            .is_none()
        );
    }

    /// A day partition (a compacted long-tail day) covers its whole UTC day, renders with the
    /// null hour and parses back; the quarantine has none.
    #[test]
    fn day_partitions_round_trip() {
        let name = PartitionName::Collection("xyz.example.thing".into());
        let us = crate::syntax::parse_datetime_us("2024-02-29T17:59:59Z").unwrap();
        let k = PartitionKey::day_of(name.clone(), us.div_euclid(HOUR_US)).unwrap();
        assert_eq!(k.span(), Span::Day);
        assert_eq!(
            k.dir(),
            "events/collection_partition=xyz.example.thing/date=2024-02-29/hour=__HIVE_DEFAULT_PARTITION__"
        );
        let midnight = crate::syntax::parse_datetime_us("2024-02-29T00:00:00Z").unwrap();
        assert_eq!(k.start_us(), midnight);
        assert_eq!(k.end_us(), midnight + 24 * HOUR_US);
        let f = FileName::try_new(Cursor::seq(3).unwrap(), Cursor::seq(9).unwrap(), 7).unwrap();
        let back = parse_path(&format!("{}/{}", k.dir(), f.render()), 1).unwrap();
        assert_eq!(back.key, k);
        assert_ne!(
            back.key,
            PartitionKey::at_hour(name, midnight / HOUR_US).unwrap(),
            "a day is not its first hour"
        );
        assert!(PartitionKey::day_of(PartitionName::Errors, 0).is_err());
        assert!(
            parse_path(
                "_errors/date=2024-01-01/hour=__HIVE_DEFAULT_PARTITION__/fh-1-1-00000001.parquet",
                1
            )
            .is_none()
        );
    }

    /// An hour's bounds hold exactly its microseconds.
    #[test]
    fn an_hour_spans_its_own_microseconds() {
        for t in [
            0,
            1,
            HOUR_US - 1,
            HOUR_US,
            1_783_173_600_000_000,
            1_783_177_199_999_999,
        ] {
            let k = PartitionKey::try_new(PartitionName::Errors, t).unwrap();
            assert_eq!(k.start_us(), t - t.rem_euclid(HOUR_US), "{t}");
            assert_eq!(k.end_us() - k.start_us(), HOUR_US);
            assert!((k.start_us()..k.end_us()).contains(&t));
        }
    }

    /// Dates and hours that are not `YYYY-MM-DD` and `HH` are refused, whatever their length.
    #[test]
    fn malformed_dates_and_hours_are_refused() {
        for (d, h) in [
            ("", "00"),
            ("2026", "00"),
            ("2026-07", "00"),
            ("2026-07-0", "00"),
            ("2026-07-044", "00"),
            ("2026/07/04", "00"),
            ("2026-13-04", "00"),
            ("2026-07-04", "24"),
            ("2026-07-04", "0"),
            ("2026-07-04", ""),
        ] {
            assert_eq!(parse_date_hour(d, h), None, "{d} {h}");
        }
        assert_eq!(
            parse_date_hour("2026-07-04", "14"),
            Some(1_783_173_600_000_000 / HOUR_US)
        );
    }

    /// Collections up to 253 bytes name directories; a byte more does not.
    #[test]
    fn path_safe_collections_stop_at_253_bytes() {
        let head = format!("{}.{}.{}", "a".repeat(63), "b".repeat(63), "c".repeat(63));
        let at = format!("{head}.{}", "d".repeat(253 - head.len() - 1));
        let over = format!("{head}.{}", "d".repeat(254 - head.len() - 1));
        assert_eq!((at.len(), over.len()), (253, 254));
        assert!(crate::syntax::is_nsid(&at) && crate::syntax::is_nsid(&over));
        assert!(is_path_safe_collection(&at));
        assert!(!is_path_safe_collection(&over));
        assert!(!is_path_safe_collection("Com.Example.post"));
    }

    #[test]
    fn paths_round_trip() {
        let key = PartitionKey::try_new(
            PartitionName::Collection("app.bsky.feed.post".into()),
            1_783_175_887_517_000,
        )
        .unwrap();
        let name = FileName::try_new(
            Cursor::seq(31_527_015_471).unwrap(),
            Cursor::seq(31_527_016_000).unwrap(),
            0xdead_beef,
        )
        .unwrap();
        let path = format!("{}/{}", key.dir(), name.render());
        assert_eq!(
            path,
            "events/collection_partition=app.bsky.feed.post/date=2026-07-04/hour=14/fh-31527015471-31527016000-deadbeef.parquet"
        );
        let f = parse_path(&path, 10).unwrap();
        assert_eq!((f.key.clone(), f.name), (key.clone(), name));
        // the directory of lakes from before the Delta log
        let old = path.replace("collection_partition=", "collection=");
        assert_eq!(parse_path(&old, 10).unwrap().key, key);
        assert!(
            parse_path(
                &path.replace("collection_partition=", "collection_partitionx="),
                10
            )
            .is_none()
        );
        let e = PartitionKey::try_new(PartitionName::Errors, 0).unwrap();
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

    #[test]
    fn every_representable_hour_round_trips_and_nothing_else_is_a_key() {
        let file = "js-1-2-00000000.parquet";
        for hour in [
            MIN_HOUR,
            MIN_HOUR + 1,
            -1,
            0,
            1,
            464_770,
            MAX_HOUR - 1,
            MAX_HOUR,
        ] {
            let k = PartitionKey::at_hour(PartitionName::Sync, hour).unwrap();
            let f = parse_path(&format!("{}/{file}", k.dir()), 0).unwrap();
            assert_eq!(f.key, k, "{}", k.dir());
        }
        for hour in [MIN_HOUR - 1, MAX_HOUR + 1, i64::MIN, i64::MAX] {
            assert!(PartitionKey::at_hour(PartitionName::Sync, hour).is_err());
        }
        // the year-10000 and i64::MAX times of the issue's hostile lines
        assert!(PartitionKey::try_new(PartitionName::Other, 253_402_300_800_000_000).is_err());
        assert!(PartitionKey::try_new(PartitionName::Other, i64::MAX).is_err());
        assert!(PartitionKey::try_new(PartitionName::Other, i64::MIN).is_err());
    }

    #[test]
    fn file_names_refuse_what_they_could_not_parse_back() {
        let s = |v| Cursor::seq(v).unwrap();
        let t = |v| Cursor::time_us(v).unwrap();
        assert!(FileName::try_new(s(5), s(4), 0).is_err());
        assert!(FileName::try_new(s(1), t(2), 0).is_err());
        let n = FileName::try_new(t(0), t(crate::model::cursor::MAX_CURSOR), 7).unwrap();
        assert_eq!(FileName::parse(&n.render()), Some(n));
        for bad in [
            "fh--5-3-00000000.parquet",
            "fh-05-6-00000000.parquet",
            "fh-5-6-0.parquet",
            "fh-5-6-000000000.parquet",
            "fh-9223372036854775807-9223372036854775807-00000000.parquet",
            "xx-1-2-00000000.parquet",
            "fh-2-1-00000000.parquet",
            "fh-1-2-00000000-x.parquet",
        ] {
            assert!(FileName::parse(bad).is_none(), "{bad}");
        }
    }

    proptest::proptest! {
        /// No time, however absurd, gives a key whose directory the parser rejects or reads
        /// back as another key.
        #[test]
        fn any_time_either_round_trips_or_is_refused(t in proptest::prelude::any::<i64>(), e in 0u8..6) {
            let name = [PartitionName::Errors, PartitionName::Other, PartitionName::Sync,
                PartitionName::Identity, PartitionName::Account,
                PartitionName::Collection("app.bsky.feed.like".into())][usize::from(e)].clone();
            if let Ok(k) = PartitionKey::try_new(name, t) {
                let f = parse_path(&format!("{}/fh-1-2-00000000.parquet", k.dir()), 0);
                proptest::prop_assert_eq!(f.map(|f| f.key), Some(k));
            } else {
                let h = t.div_euclid(HOUR_US);
                proptest::prop_assert!(!(MIN_HOUR..=MAX_HOUR).contains(&h));
            }
        }

        /// Every pair of i64 either names a file that parses back to itself or is refused.
        #[test]
        fn any_cursor_pair_either_round_trips_or_is_refused(
            a in proptest::prelude::any::<i64>(),
            b in proptest::prelude::any::<i64>(),
            jet in proptest::prelude::any::<bool>(),
            hash in proptest::prelude::any::<u32>(),
        ) {
            let src = if jet { SourceKind::Jetstream } else { SourceKind::Firehose };
            let name = Cursor::try_new(src, a)
                .and_then(|a| Ok((a, Cursor::try_new(src, b)?)))
                .ok()
                .and_then(|(a, b)| FileName::try_new(a, b, hash).ok());
            match name {
                Some(n) => proptest::prop_assert_eq!(FileName::parse(&n.render()), Some(n)),
                None => proptest::prop_assert!(
                    a < 0 || b < 0 || a > b
                        || a > crate::model::cursor::MAX_CURSOR
                        || b > crate::model::cursor::MAX_CURSOR
                ),
            }
        }
    }
}
