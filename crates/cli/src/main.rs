//! The `cairn` binary.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    cairn_cli::main()
}
