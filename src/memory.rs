//! Giving freed memory back to the system.
//!
//! An allocator keeps what a process frees for its next allocation; glibc's keeps it in one
//! arena per thread that allocated, and a daemon whose threads take turns ingesting, writing
//! and answering SQL ends up holding the peak of each (README, "Memory": anonymous RSS 252–269
//! MiB in the 32-minute soak, of 31–64 MiB of buffered rows). The library cannot talk to the
//! allocator (it has no `unsafe`), so the binary registers the call that does
//! ([`set_release`]: glibc's `malloc_trim`), and the library says when a large amount of
//! memory has just been freed ([`freed`]): when the last running query ends, when a flush has
//! been written, when a compaction pass ends. The binary decides how often to act on it.

use std::sync::OnceLock;

static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Registers what [`freed`] calls. Returns false if one was registered already (the first
/// stays).
pub fn set_release(f: fn()) -> bool {
    RELEASE.set(f).is_ok()
}

/// Tells the registered release that much memory was freed just now. Cheap and safe to call
/// from any thread at any rate: the release must only note it and act later, elsewhere.
pub fn freed() {
    if let Some(f) = RELEASE.get() {
        f();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    static CALLS: AtomicUsize = AtomicUsize::new(0);

    fn count() {
        CALLS.fetch_add(1, Ordering::Relaxed);
    }

    fn other() {}

    #[test]
    fn the_first_release_registered_is_the_one_called() {
        // other tests of this binary may call `freed` too: only growth is asserted
        let before = CALLS.load(Ordering::Relaxed);
        assert!(set_release(count));
        assert!(!set_release(other));
        freed();
        freed();
        assert!(CALLS.load(Ordering::Relaxed) >= before + 2);
    }
}
