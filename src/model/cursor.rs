//! Stream positions, and the bounds on the times atlake trusts.
//!
//! A [`Cursor`] says which stream it belongs to (a relay's firehose `seq`, or a Jetstream
//! instance's `time_us`) and holds a value in `0 ..= 2^53 - 1`: relays keep `seq` below 2^53,
//! and 2^53 µs is the year 2255, so every value fits a JSON number, can be stepped by one without
//! overflow, and names a file that the lake's own parser reads back. There are no sentinels:
//! "no position" is `Option<Cursor>`.
//!
//! [`TimeWindow`] is the range of stream times accepted as an event's partition time: from
//! [`NETWORK_EPOCH_US`] to ten minutes after the moment atlake received the event.

use super::SourceKind;
use std::fmt;

/// Largest cursor value: relays keep `seq` below 2^53 (a JSON-safe integer).
pub const MAX_CURSOR: i64 = (1 << 53) - 1;

/// A position in one source's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cursor {
    source: SourceKind,
    value: i64,
}

/// A cursor value out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{stream} cursor {value} is out of range (0 to 2^53 - 1)")]
pub struct CursorError {
    /// Which stream.
    pub stream: SourceKind,
    /// The value refused.
    pub value: i64,
}

impl Cursor {
    /// A cursor of `source` at `value`, if the value is in range.
    pub fn try_new(source: SourceKind, value: i64) -> Result<Cursor, CursorError> {
        if (0..=MAX_CURSOR).contains(&value) {
            Ok(Cursor { source, value })
        } else {
            Err(CursorError {
                stream: source,
                value,
            })
        }
    }

    /// A relay firehose `seq`.
    pub fn seq(value: i64) -> Result<Cursor, CursorError> {
        Cursor::try_new(SourceKind::Firehose, value)
    }

    /// A Jetstream `time_us`.
    pub fn time_us(value: i64) -> Result<Cursor, CursorError> {
        Cursor::try_new(SourceKind::Jetstream, value)
    }

    /// Which stream it belongs to.
    pub fn source(self) -> SourceKind {
        self.source
    }

    /// The number on the wire.
    pub fn value(self) -> i64 {
        self.value
    }

    /// The position just before this one (`None` at 0).
    pub fn prev(self) -> Option<Cursor> {
        (self.value > 0).then(|| Cursor {
            source: self.source,
            value: self.value - 1,
        })
    }

    /// This position moved back by `by` (at least 0), staying at 0 at the start.
    pub fn back_by(self, by: u64) -> Cursor {
        let by = i64::try_from(by).unwrap_or(i64::MAX);
        Cursor {
            source: self.source,
            value: self.value.saturating_sub(by).max(0),
        }
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.source {
            SourceKind::Firehose => write!(f, "seq {}", self.value),
            SourceKind::Jetstream => write!(f, "time_us {}", self.value),
            SourceKind::Repo => write!(f, "backfill batch {}", self.value),
        }
    }
}

/// 2022-11-17T00:00:00Z: no event of the network is older (the first PDS went live after it).
pub const NETWORK_EPOCH_US: i64 = 1_668_643_200_000_000;

/// How far past the moment of receipt a stream time may be: clocks of relays and Jetstream
/// instances drift by seconds, not minutes.
pub const MAX_FUTURE_US: i64 = 10 * 60 * 1_000_000;

/// The stream times accepted at one moment: `NETWORK_EPOCH_US ..= received + MAX_FUTURE_US`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWindow {
    /// When atlake received the input, µs since the epoch.
    pub received_us: i64,
}

/// Why a stream time was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TimeRangeError {
    /// Older than the network.
    #[error("time {0} µs is before 2022-11-17, older than the network")]
    TooOld(i64),
    /// Further ahead of the receive time than clocks drift.
    #[error("time {time} µs is more than 10 minutes after it was received ({received} µs)")]
    Future {
        /// the claimed time
        time: i64,
        /// when it was received
        received: i64,
    },
}

impl TimeWindow {
    /// The window around `received_us`.
    pub fn at(received_us: i64) -> TimeWindow {
        TimeWindow { received_us }
    }

    /// The window around the current wall-clock time.
    pub fn now() -> TimeWindow {
        TimeWindow::at(now_us())
    }

    /// Checks a stream time.
    pub fn check(self, time_us: i64) -> Result<i64, TimeRangeError> {
        if time_us < NETWORK_EPOCH_US {
            return Err(TimeRangeError::TooOld(time_us));
        }
        if time_us > self.received_us.saturating_add(MAX_FUTURE_US) {
            return Err(TimeRangeError::Future {
                time: time_us,
                received: self.received_us,
            });
        }
        Ok(time_us)
    }

    /// Whether a stream time is accepted.
    pub fn contains(self, time_us: i64) -> bool {
        self.check(time_us).is_ok()
    }
}

/// Wall-clock µs since the epoch (0 if the clock is before 1970, which the window then refuses
/// everything against but `NETWORK_EPOCH_US`-old times).
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_are_bounded_and_step_without_overflow() {
        assert!(Cursor::seq(-1).is_err());
        assert!(Cursor::seq(i64::MIN).is_err());
        assert!(Cursor::seq(i64::MAX).is_err());
        assert!(Cursor::seq(MAX_CURSOR + 1).is_err());
        let top = Cursor::seq(MAX_CURSOR).unwrap();
        assert_eq!(top.prev().unwrap().value(), MAX_CURSOR - 1);
        let zero = Cursor::time_us(0).unwrap();
        assert_eq!(zero.prev(), None);
        assert_eq!(zero.back_by(u64::MAX), zero);
        assert_eq!(Cursor::time_us(10).unwrap().back_by(3).value(), 7);
        assert_eq!(top.source(), SourceKind::Firehose);
        assert_eq!(zero.source(), SourceKind::Jetstream);
        assert_eq!(top.to_string(), format!("seq {MAX_CURSOR}"));
    }

    #[test]
    fn time_window_bounds() {
        let now = 1_783_175_887_517_000;
        let w = TimeWindow::at(now);
        assert!(w.contains(NETWORK_EPOCH_US));
        assert!(!w.contains(NETWORK_EPOCH_US - 1));
        assert!(w.contains(now + MAX_FUTURE_US));
        assert!(!w.contains(now + MAX_FUTURE_US + 1));
        assert!(!w.contains(i64::MAX));
        assert!(!w.contains(i64::MIN));
        assert!(TimeWindow::at(i64::MAX).contains(i64::MAX));
        assert!(matches!(
            w.check(253_402_300_800_000_000),
            Err(TimeRangeError::Future { .. })
        ));
    }
}
