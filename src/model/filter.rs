//! Collection and DID filters: which events a user wants kept.

use super::{Did, Envelope, EventData};
use crate::syntax::{is_nsid_pattern, nsid_matches};

/// Collection and DID filters, shared by both sources (applied by Jetstream's server and,
/// for the firehose, client-side). Made only by [`Filters::new`], which checks them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    collections: Vec<String>,
    dids: Vec<Did>,
    /// The same DIDs, looked up per event (up to 10,000 of them).
    wanted: std::collections::BTreeSet<Did>,
}

/// Filters that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// Not an NSID or `prefix.*`.
    #[error("{0:?} is not an NSID or prefix.* pattern")]
    Collection(String),
    /// Not a DID.
    #[error(transparent)]
    Did(#[from] super::IdError),
    /// Too many (Jetstream's limits).
    #[error("at most {0}")]
    TooMany(&'static str),
}

impl Filters {
    /// Checked filters: collection patterns (at most 100) and DIDs (at most 10,000).
    pub fn try_new(collections: Vec<String>, dids: Vec<String>) -> Result<Filters, FilterError> {
        if let Some(c) = collections.iter().find(|c| !is_nsid_pattern(c)) {
            return Err(FilterError::Collection(c.clone()));
        }
        if collections.len() > 100 {
            return Err(FilterError::TooMany("100 collections"));
        }
        if dids.len() > 10_000 {
            return Err(FilterError::TooMany("10,000 DIDs"));
        }
        let dids = dids
            .into_iter()
            .map(Did::parse)
            .collect::<Result<Vec<_>, _>>()?;
        let wanted = dids.iter().cloned().collect();
        Ok(Filters {
            collections,
            dids,
            wanted,
        })
    }

    /// The collection patterns (NSIDs or `prefix.*`); empty keeps all.
    pub fn collections(&self) -> &[String] {
        &self.collections
    }

    /// The DIDs; empty keeps all.
    pub fn dids(&self) -> &[Did] {
        &self.dids
    }

    /// Whether the DID filter passes `did` (every DID when it is empty). DIDs filter every
    /// kind of event; collections filter commits only (identity and account events always
    /// pass, as on Jetstream). An event is kept when both pass.
    pub fn wants_did(&self, did: &Did) -> bool {
        self.wanted.is_empty() || self.wanted.contains(did)
    }

    /// Whether the collection filter passes an event (only commits are filtered).
    pub fn wants_collection(&self, env: &Envelope) -> bool {
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
