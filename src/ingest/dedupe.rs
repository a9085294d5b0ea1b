//! Duplicate suppression after a resume.
//!
//! Two sets: the keys of durable events beyond the checkpoint, read back from the files at
//! start-up (dropped once the stream is past them), and, for Jetstream, the keys of the events
//! of the last `rewind` of stream time (a reconnect replays that much on purpose).

use std::collections::{HashSet, VecDeque};

/// The dedupe state.
#[derive(Debug, Default)]
pub struct Dedupe {
    durable: HashSet<u128>,
    durable_until: Option<i64>,
    window: i64,
    recent: VecDeque<(i64, u128)>,
    recent_set: HashSet<u128>,
}

impl Dedupe {
    /// Keys of durable events up to cursor `until`; a recent-key window of `window` cursor units
    /// (0 disables it).
    pub fn new(durable: HashSet<u128>, until: Option<i64>, window: i64) -> Self {
        Dedupe {
            durable,
            durable_until: until,
            window,
            ..Default::default()
        }
    }

    /// Whether the event is a duplicate.
    pub fn is_duplicate(&self, key: u128) -> bool {
        self.durable.contains(&key) || self.recent_set.contains(&key)
    }

    /// Remembers an accepted event at `cursor`.
    pub fn remember(&mut self, key: u128, cursor: Option<i64>) {
        let Some(c) = cursor else { return };
        if let Some(until) = self.durable_until
            && c > until.saturating_add(self.window)
            && !self.durable.is_empty()
        {
            self.durable = HashSet::new();
            self.durable_until = None;
        }
        if self.window <= 0 {
            return;
        }
        self.recent.push_back((c, key));
        self.recent_set.insert(key);
        while let Some(&(oldest, k)) = self.recent.front() {
            if oldest >= c.saturating_sub(self.window) {
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

    #[test]
    fn durable_keys_expire_past_their_cursor_and_recent_window_slides() {
        let mut d = Dedupe::new([1u128, 2].into_iter().collect(), Some(100), 10);
        assert!(d.is_duplicate(1));
        d.remember(5, Some(105));
        assert!(d.is_duplicate(2) && d.is_duplicate(5));
        d.remember(6, Some(111));
        assert!(!d.is_duplicate(1), "durable keys dropped past until+window");
        assert!(d.is_duplicate(5));
        d.remember(7, Some(200));
        assert!(!d.is_duplicate(5) && d.is_duplicate(7));
    }
}
