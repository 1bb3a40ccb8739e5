//! The `cairn` command for integration tests: the same entry point as `crates/cli/src/main.rs`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    cairn_cli::main()
}
