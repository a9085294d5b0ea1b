//! The `atlake` binary: a thin wrapper around [`atlake::cli`].
//!
//! Allocator: the system's. On glibc, allocations of 256 KiB and more are always served by
//! `mmap`, so freed Arrow buffers go back to the system at once. By default glibc raises that
//! threshold each time a large block is freed (up to 32 MiB), after which the batcher's growing
//! buffers come from the heap arenas and fragment them. Measured with `scripts/bench`'s inputs
//! (README, "Memory"): the 2M-event Jetstream ingest peaked at 142-147 MiB with the fixed
//! threshold, 204-241 MiB without it, and 262-272 MiB with mimalloc 3. The price is speed on
//! the firehose, which makes many small allocations (about 20 % against mimalloc).

fn main() -> std::process::ExitCode {
    fixed_mmap_threshold();
    atlake::cli::main()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists, with a parameter and value glibc documents (mallopt(3)).
    // a refusal (0) leaves glibc's default behaviour, which works, only with a higher peak
    let _ = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024) };
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fixed_mmap_threshold() {}
