//! The `atlake` binary: a thin wrapper around [`atlake::cli`].

// mimalloc returns freed memory to the system promptly and is faster than glibc's malloc for
// the many small, short-lived allocations of decoding (peak RSS and events/s in the README)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    atlake::cli::main()
}
