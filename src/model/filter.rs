//! Collection and DID filters: which events a user wants kept.

use super::{Envelope, EventData};
use crate::syntax::{is_did, is_nsid_pattern, nsid_matches};

/// Collection and DID filters, shared by both sources (applied by Jetstream's server and,
/// for the firehose, client-side).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    /// NSIDs or `prefix.*`; empty keeps all.
    pub collections: Vec<String>,
    /// DIDs; empty keeps all.
    pub dids: Vec<String>,
}

impl Filters {
    /// Validated filters.
    pub fn new(collections: Vec<String>, dids: Vec<String>) -> Result<Filters, String> {
        if let Some(c) = collections.iter().find(|c| !is_nsid_pattern(c)) {
            return Err(format!("{c:?} is not an NSID or prefix.* pattern"));
        }
        if let Some(d) = dids.iter().find(|d| !is_did(d)) {
            return Err(format!("{d:?} is not a DID"));
        }
        if collections.len() > 100 {
            return Err("at most 100 collections".into());
        }
        if dids.len() > 10_000 {
            return Err("at most 10,000 DIDs".into());
        }
        Ok(Filters { collections, dids })
    }

    /// Whether an event passes: DIDs filter every kind; collections filter commits only
    /// (identity and account events always pass, as on Jetstream).
    pub fn matches(&self, env: &Envelope) -> bool {
        if !self.dids.is_empty() && !self.dids.contains(&env.event.did) {
            return false;
        }
        match &env.event.data {
            EventData::Commit(c) if !self.collections.is_empty() => self
                .collections
                .iter()
                .any(|p| nsid_matches(p, &c.collection)),
            _ => true,
        }
    }

    /// Whether nothing is filtered.
    pub fn is_empty(&self) -> bool {
        self.collections.is_empty() && self.dids.is_empty()
    }
}
