//! The `atlake` binary: a thin wrapper around [`atlake::cli`].
//!
//! Allocator: the system's. On glibc, allocations of 256 KiB and more are always served by
//! `mmap`, so freed Arrow buffers go back to the system at once. By default glibc raises that
//! threshold each time a large block is freed (up to 32 MiB), after which the batcher's growing
//! buffers come from the heap arenas and fragment them. Measured with `scripts/bench`'s inputs
//! (README, "Memory"): the 2M-event Jetstream ingest peaked at 142-147 MiB with the fixed
//! threshold, 204-241 MiB without it, and 262-272 MiB with mimalloc 3. The price is speed on
//! the firehose, which makes many small allocations (about 20 % against mimalloc). Every
//! command also returns freed memory to the system when the library says much was freed
//! (`trim`).
//!
//! The commands that only answer SQL (`query`, `serve`) also keep up to 1 MiB free at the top
//! of each heap instead of glibc's 128 KiB (which the fixed mmap threshold leaves in place): a
//! scan frees and allocates batches of 100 KiB to 1 MiB all the time, and with 128 KiB every
//! free gave pages back (`madvise`) that the next batch faulted in again, on every core (TLB
//! shootdowns). JSONBench Q3 as `atlake query` on the 10M-event lake: 0.24-0.26 s before,
//! 0.20-0.21 s after, peak RSS unchanged (docs/performance.md). Ingest showed no gain and a
//! few MiB more at its peak, so it keeps glibc's value; the trims after each query still
//! return everything.

fn main() -> std::process::ExitCode {
    let answers_only = matches!(
        std::env::args_os()
            .nth(1)
            .as_deref()
            .and_then(|c| c.to_str()),
        Some("query" | "serve")
    );
    fixed_mmap_threshold(answers_only);
    match trim::start() {
        Ok(()) => {
            atlake::memory::set_release(trim::request);
        }
        Err(e) => eprintln!("warning: freed memory stays with the process: {e}"),
    }
    atlake::cli::main()
}

/// Gives freed memory back to the system when the library says a lot was just freed (a
/// query ended, a flush was written, a compaction pass ended; `atlake::memory`): glibc keeps
/// freed memory in its arenas, and `malloc_trim` returns the free pages of every arena. On
/// its own thread, a quarter of a second after the news (so that the frees which come with
/// it land first), at most four times a second.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
mod trim {
    use std::sync::{Condvar, Mutex};
    use std::time::Duration;

    static PENDING: Mutex<bool> = Mutex::new(false);
    static WAKE: Condvar = Condvar::new();

    /// Notes that memory was freed. Never blocks for long: the trimmer holds the lock only
    /// to read and clear the flag.
    pub fn request() {
        // a poisoned lock means the trimmer thread panicked: nothing to wake
        if let Ok(mut pending) = PENDING.lock() {
            *pending = true;
            WAKE.notify_one();
        }
    }

    /// Starts the trimmer thread.
    pub fn start() -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("atlake-trim".into())
            .stack_size(256 << 10)
            .spawn(|| {
                loop {
                    let Ok(mut pending) = PENDING.lock() else {
                        return;
                    };
                    while !*pending {
                        pending = match WAKE.wait(pending) {
                            Ok(p) => p,
                            Err(_) => return,
                        };
                    }
                    *pending = false;
                    drop(pending);
                    std::thread::sleep(Duration::from_millis(250));
                    // SAFETY: malloc_trim only returns free memory of glibc's arenas to the
                    // system (madvise); it takes the arenas' locks itself (malloc(3)). Its
                    // result says whether any memory was released, which changes nothing here.
                    unsafe { libc::malloc_trim(0) };
                }
            })
            .map(|_| ())
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod trim {
    pub fn request() {}
    pub fn start() -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fixed_mmap_threshold(answers_only: bool) {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists, with a parameter and value glibc documents (mallopt(3)).
    let set = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024) };
    // a refusal (0) leaves glibc's default behaviour, which works with a higher peak: said,
    // since the memory figures of the README assume the fixed threshold
    if set == 0 {
        eprintln!("warning: glibc refused a fixed mmap threshold; peak memory will be higher");
    }
    if answers_only {
        // SAFETY: as above; M_TRIM_THRESHOLD is documented in mallopt(3)
        let set = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20) };
        if set == 0 {
            eprintln!("warning: glibc refused a 1 MiB trim threshold; scans will be slower");
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fixed_mmap_threshold(_answers_only: bool) {}
