//! The event model both sources produce.
//!
//! An [`Event`] is what happened in the network (a record op, an identity or account change);
//! an [`Envelope`] adds how it reached us (firehose `seq` and `time`, or Jetstream `time_us`).
//! The same record op read from the firehose and from Jetstream gives equal `Event`s; only the
//! envelope differs.

use super::ids::{Did, Nsid, Rkey, Tid};
use std::fmt;

/// Record operation of a commit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operation {
    /// A new record.
    Create,
    /// A new version of an existing record.
    Update,
    /// A removed record.
    Delete,
}

impl Operation {
    /// The wire name (`create`, `update`, `delete`).
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }

    /// Parses the wire name.
    pub fn parse(s: &str) -> Option<Operation> {
        match s {
            "create" => Some(Operation::Create),
            "update" => Some(Operation::Update),
            "delete" => Some(Operation::Delete),
            _ => None,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A record create, update or delete.
    Commit,
    /// `#identity`.
    Identity,
    /// `#account`.
    Account,
    /// `#sync` (firehose only; Jetstream does not forward it).
    Sync,
}

impl Kind {
    /// The name used in the `kind` column and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Commit => "commit",
            Kind::Identity => "identity",
            Kind::Account => "account",
            Kind::Sync => "sync",
        }
    }
}

/// One record operation of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitOp {
    /// Revision (TID) of the commit.
    pub rev: Tid,
    /// What happened to the record.
    pub operation: Operation,
    /// The record's collection.
    pub collection: Nsid,
    /// The record key.
    pub rkey: Rkey,
    /// The record's CID on create and update.
    pub cid: Option<String>,
    /// The record as atproto JSON text on create and update.
    pub record: Option<String>,
}

/// An `#identity` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Relay sequence number of the event.
    pub seq: i64,
    /// Relay time string.
    pub time: String,
    /// Handle, when the relay sent one.
    pub handle: Option<String>,
}

/// An `#account` event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Relay sequence number of the event.
    pub seq: i64,
    /// Relay time string.
    pub time: String,
    /// Whether the account is active at the relay.
    pub active: bool,
    /// Status when inactive (`takendown`, `suspended`, `deleted`, `deactivated`, …).
    pub status: Option<String>,
}

/// A `#sync` event: the repo is now at `rev`, possibly discontinuous with earlier commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncInfo {
    /// Revision the repo is at.
    pub rev: Tid,
    /// Only on atlake's marker of a fresh fetch after a gap (origin `repo`): the rev of the
    /// snapshot whose rows replace the repo's earlier rows (`rev` is then the cut: rows at or
    /// before it that are not the snapshot's are superseded). Written in the row's `record` as
    /// `{"snapshot_rev":"<rev>"}`.
    pub snapshot: Option<Tid>,
}

/// What an event carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventData {
    /// A record operation.
    Commit(CommitOp),
    /// An identity change.
    Identity(Identity),
    /// An account status change.
    Account(Account),
    /// A repo sync.
    Sync(SyncInfo),
}

/// One event, independent of the transport that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The account.
    pub did: Did,
    /// The payload.
    pub data: EventData,
}

impl Event {
    /// The `kind` of this event.
    pub fn kind(&self) -> Kind {
        match self.data {
            EventData::Commit(_) => Kind::Commit,
            EventData::Identity(_) => Kind::Identity,
            EventData::Account(_) => Kind::Account,
            EventData::Sync(_) => Kind::Sync,
        }
    }

    /// The commit op, if this is one.
    pub fn commit(&self) -> Option<&CommitOp> {
        match &self.data {
            EventData::Commit(c) => Some(c),
            _ => None,
        }
    }
}

/// Where an event came from: the one source-kind type of the crate (configuration, command
/// line, checkpoint, file names).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// `com.atproto.sync.subscribeRepos`.
    Firehose,
    /// Jetstream `/subscribe`.
    Jetstream,
    /// A repository fetched whole (`com.atproto.sync.getRepo`) by a backfill. Not a live
    /// source: its cursor is the backfill's batch number.
    Repo,
}

impl SourceKind {
    /// `firehose`, `jetstream` or `repo` (the `origin` column).
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Firehose => "firehose",
            SourceKind::Jetstream => "jetstream",
            SourceKind::Repo => "repo",
        }
    }

    /// Whether it is a live stream (firehose or Jetstream) that a daemon can follow.
    pub fn is_live(self) -> bool {
        matches!(self, SourceKind::Firehose | SourceKind::Jetstream)
    }

    /// Parses `firehose`, `jetstream` or `repo`.
    pub fn parse(s: &str) -> Option<SourceKind> {
        match s {
            "firehose" => Some(SourceKind::Firehose),
            "jetstream" => Some(SourceKind::Jetstream),
            "repo" => Some(SourceKind::Repo),
            _ => None,
        }
    }
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event with its transport fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The event.
    pub event: Event,
    /// Stream time in µs since the epoch: the firehose frame's `time`, or Jetstream's `time_us`.
    /// Partitions are cut by this, never by a record's `createdAt`. Ingest replaces a firehose
    /// time outside the [`TimeWindow`](super::TimeWindow) by the time atlake received the event,
    /// and keeps the claimed one in `claimed_time_us`.
    pub time_us: i64,
    /// The time the source claimed, when it was outside the accepted window and `time_us` holds
    /// the receive time instead (`None` otherwise).
    pub claimed_time_us: Option<i64>,
    /// Firehose sequence number (`None` for Jetstream).
    pub seq: Option<i64>,
    /// Where the commit sits in its repo's history (firehose commits only; Jetstream does
    /// not carry it). Every op of one commit shares it.
    pub chain: Option<std::sync::Arc<Chain>>,
}

/// A firehose commit's place in its repo's history (Sync 1.1): a consumer that knows the
/// repo's last commit checks that this one follows it (`since` is that commit's rev,
/// `prev_data` its MST root); otherwise events were missed and the repo must be fetched again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The rev of the previous commit (`since`), when the frame carries one.
    pub since: Option<String>,
    /// The previous commit's MST root (`prevData`), when the frame carries one.
    pub prev_data: Option<String>,
    /// This commit's MST root (the commit block's `data`).
    pub data: String,
}

impl Envelope {
    /// The resume cursor this event stands at: `seq` for the firehose, `time_us` for Jetstream
    /// (`None` when the value is out of a cursor's range).
    pub fn cursor(&self) -> Option<super::Cursor> {
        match self.seq {
            Some(s) => super::Cursor::seq(s).ok(),
            None => super::Cursor::time_us(self.time_us).ok(),
        }
    }
}

/// Why input could not become an event. Each reason is a stable metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorReason {
    /// The frame is not valid DAG-CBOR or misses required fields.
    Frame,
    /// The CAR slice does not parse.
    Car,
    /// A block does not hash to its CID.
    HashMismatch,
    /// The CAR's first root is not the commit, or the commit block disagrees with the frame.
    CommitMismatch,
    /// A create or update whose record block is not in the CAR.
    MissingBlock,
    /// A record block that is not valid atproto DAG-CBOR.
    Record,
    /// A record block larger than 1,000,000 bytes.
    RecordTooLarge,
    /// A whole message larger than the limit.
    Oversized,
    /// An op path that is not `collection/rkey`.
    Path,
    /// A collection that is not a valid NSID.
    Collection,
    /// A record key that breaks the syntax.
    Rkey,
    /// A DID that breaks the syntax.
    Did,
    /// A `time` that is not an RFC 3339 datetime.
    Time,
    /// An op action other than create/update/delete, or a cid where none belongs.
    Action,
    /// A Jetstream line that is not valid JSON of the expected shape.
    Json,
    /// A compressed message that does not decompress.
    Zstd,
    /// A rev that is not a TID.
    Rev,
    /// A commit flagged `tooBig` (deprecated; the diff is incomplete).
    TooBig,
    /// A firehose `seq` that is not a positive integer below 2^53.
    Seq,
    /// A Jetstream `time_us` outside the accepted window (before the network existed, or more
    /// than ten minutes after it was received): it cannot be a cursor or a partition time.
    TimeRange,
    /// A repository CAR that ends in the middle of a block.
    Truncated,
    /// A repository whose commit is another account's.
    DidMismatch,
    /// A repository whose commit block is not a valid commit.
    Commit,
    /// A repository whose MST does not match its root (bad node, order, layer or depth).
    Mst,
}

impl ErrorReason {
    /// The snake_case label used in metrics and in the `_errors` partition.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorReason::Frame => "frame",
            ErrorReason::Car => "car",
            ErrorReason::HashMismatch => "hash_mismatch",
            ErrorReason::CommitMismatch => "commit_mismatch",
            ErrorReason::MissingBlock => "missing_block",
            ErrorReason::Record => "record",
            ErrorReason::RecordTooLarge => "record_too_large",
            ErrorReason::Oversized => "oversized",
            ErrorReason::Path => "path",
            ErrorReason::Collection => "collection",
            ErrorReason::Rkey => "rkey",
            ErrorReason::Did => "did",
            ErrorReason::Time => "time",
            ErrorReason::Action => "action",
            ErrorReason::Json => "json",
            ErrorReason::Zstd => "zstd",
            ErrorReason::Rev => "rev",
            ErrorReason::TooBig => "too_big",
            ErrorReason::Seq => "seq",
            ErrorReason::TimeRange => "time_range",
            ErrorReason::Truncated => "truncated",
            ErrorReason::DidMismatch => "did_mismatch",
            ErrorReason::Commit => "commit",
            ErrorReason::Mst => "mst",
        }
    }
}

impl fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Input that could not become an event: kept, with its reason, for the `_errors` partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorEvent {
    /// Why.
    pub reason: ErrorReason,
    /// A human-readable detail.
    pub detail: String,
    /// The raw bytes (the frame, the line, or the record block).
    pub raw: Vec<u8>,
    /// Firehose seq when known.
    pub seq: Option<i64>,
    /// Stream time when known.
    pub time_us: Option<i64>,
    /// The DID when known (not validated).
    pub did: Option<String>,
    /// The op path when known (not validated).
    pub path: Option<String>,
}

impl ErrorEvent {
    /// An error with a reason and detail and the raw bytes.
    pub fn new(reason: ErrorReason, detail: impl Into<String>, raw: &[u8]) -> Self {
        ErrorEvent {
            reason,
            detail: detail.into(),
            raw: raw.to_vec(),
            seq: None,
            time_us: None,
            did: None,
            path: None,
        }
    }
}

/// One output of the decoders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A good event.
    Event(Envelope),
    /// Input set aside with its reason.
    Error(ErrorEvent),
}
