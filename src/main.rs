//! The `atlake` binary: a thin wrapper around [`atlake::cli`].
//!
//! Allocator: the system's. On glibc, allocations of 256 KiB and more are always served by
//! `mmap`, so freed Arrow buffers go back to the system at once. By default glibc raises that
//! threshold each time a large block is freed (up to 32 MiB), after which the batcher's growing
//! buffers come from the heap arenas and fragment them. Measured with `scripts/bench`'s inputs
//! (README, "Memory"): the 2M-event Jetstream ingest peaked at 143-146 MiB with the fixed
//! threshold, 200-247 MiB without it, and 265-278 MiB with mimalloc 3, for 5-10 % less speed
//! than either.

fn main() -> std::process::ExitCode {
    fixed_mmap_threshold();
    atlake::cli::main()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; it is called before any other thread
    // exists, with a parameter and value glibc documents (mallopt(3)).
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024) };
    debug_assert_eq!(ok, 1, "mallopt(M_MMAP_THRESHOLD) failed");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fixed_mmap_threshold() {}
