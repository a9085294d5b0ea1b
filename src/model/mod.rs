//! The event model shared by both sources, and its Arrow form.
//!
//! [`event`] holds [`Event`] (what happened) and [`Envelope`] (how it arrived).

pub mod cursor;
pub mod event;
pub mod filter;
pub mod ids;
#[cfg(feature = "lake")]
pub mod key;
pub mod lexicon;
#[cfg(feature = "lake")]
pub mod rows;

pub use cursor::{Cursor, TimeWindow};

/// A hash map on the ingest path: ahash, keyed at random once per process, so it is fast and
/// no one can choose keys (DIDs, record keys, collections from the network) that collide. std's
/// SipHash took 5.6 % of an ingest's samples (docs/performance.md).
pub type KeyedMap<K, V> = std::collections::HashMap<K, V, ahash::RandomState>;
/// The set of [`KeyedMap`].
pub type KeyedSet<K> = std::collections::HashSet<K, ahash::RandomState>;
pub use event::*;
pub use filter::Filters;
pub use ids::{Did, IdError, Nsid, Rkey, Tid};
