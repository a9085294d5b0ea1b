//! Duplicate suppression after a resume.
//!
//! Two sets: the keys of durable events beyond the checkpoint, read back from the files at
//! start-up (dropped once the stream is past them), and, for Jetstream, the keys of the events
//! of the last `rewind` of stream time (a reconnect replays that much on purpose).

use crate::model::key::EventKey;
use crate::model::{Cursor, KeyedSet};
use std::collections::{HashSet, VecDeque};

/// The dedupe state.
#[derive(Debug, Default)]
pub struct Dedupe {
    durable: KeyedSet<EventKey>,
    durable_until: Option<Cursor>,
    window: u64,
    recent: VecDeque<(Cursor, EventKey)>,
    recent_set: KeyedSet<EventKey>,
}

impl Dedupe {
    /// Keys of durable events up to cursor `until`; a recent-key window of `window` cursor units
    /// (0 disables it).
    pub fn new(durable: HashSet<EventKey>, until: Option<Cursor>, window: u64) -> Self {
        Dedupe {
            durable: durable.into_iter().collect(),
            durable_until: until,
            window,
            ..Default::default()
        }
    }

    /// Whether the event is a duplicate.
    pub fn is_duplicate(&self, key: EventKey) -> bool {
        self.durable.contains(&key) || self.recent_set.contains(&key)
    }

    /// Remembers an accepted event at `cursor`.
    pub fn remember(&mut self, key: EventKey, cursor: Option<Cursor>) {
        let Some(c) = cursor else { return };
        if let Some(until) = self.durable_until
            && c.back_by(self.window) > until
            && !self.durable.is_empty()
        {
            self.durable = KeyedSet::default();
            self.durable_until = None;
        }
        if self.window == 0 {
            return;
        }
        self.recent.push_back((c, key));
        self.recent_set.insert(key);
        let horizon = c.back_by(self.window);
        while let Some(&(oldest, k)) = self.recent.front() {
            if oldest >= horizon {
                break;
            }
            self.recent.pop_front();
            self.recent_set.remove(&k);
        }
    }

    /// Keys held (for metrics).
    pub fn len(&self) -> usize {
        self.durable.len() + self.recent_set.len()
    }

    /// Whether no keys are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A distinct key per number.
    fn k(n: u32) -> EventKey {
        let did = format!("did:plc:{n}");
        crate::model::key::key_of(crate::model::key::KeyParts {
            kind: "commit",
            did: &did,
            collection: "",
            rkey: "",
            rev: "",
            operation: "",
            event_seq: 0,
        })
    }

    #[test]
    fn durable_keys_expire_past_their_cursor_and_recent_window_slides() {
        let c = |v| Cursor::time_us(v).ok();
        let mut d = Dedupe::new([k(1), k(2)].into_iter().collect(), c(100), 10);
        assert!(d.is_duplicate(k(1)));
        d.remember(k(5), c(105));
        assert!(d.is_duplicate(k(2)) && d.is_duplicate(k(5)));
        d.remember(k(6), c(111));
        assert!(
            !d.is_duplicate(k(1)),
            "durable keys dropped past until+window"
        );
        assert!(d.is_duplicate(k(5)));
        d.remember(k(7), c(200));
        assert!(!d.is_duplicate(k(5)) && d.is_duplicate(k(7)));
    }

    #[test]
    fn durable_keys_stay_until_the_stream_is_a_whole_window_past_them() {
        let c = |v| Cursor::time_us(v).ok();
        let mut d = Dedupe::new([k(1)].into_iter().collect(), c(100), 10);
        // exactly a window past the checkpoint: a replay could still reach it
        d.remember(k(5), c(110));
        assert!(d.is_duplicate(k(1)));
        d.remember(k(6), c(111));
        assert!(!d.is_duplicate(k(1)));
    }

    #[test]
    fn the_key_count_is_both_sets() {
        let c = |v| Cursor::time_us(v).ok();
        let mut d = Dedupe::new([k(1), k(2)].into_iter().collect(), c(100), 10);
        assert_eq!(d.len(), 2);
        assert!(!d.is_empty());
        d.remember(k(3), c(101));
        d.remember(k(4), c(102));
        d.remember(k(5), c(103));
        assert_eq!(d.len(), 5);
        // past the window: the durable keys and the older recent ones are gone
        d.remember(k(6), c(300));
        assert_eq!(d.len(), 1);
        assert!(!d.is_empty());
        assert!(Dedupe::new(HashSet::new(), None, 0).is_empty());
        let mut none = Dedupe::new(HashSet::new(), None, 0);
        none.remember(k(1), c(1));
        assert!(none.is_empty());
        assert_eq!(none.len(), 0);
    }
}
