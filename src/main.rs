//! The `atlake` binary: a thin wrapper around [`atlake::cli`].

fn main() -> std::process::ExitCode {
    atlake::cli::main()
}
