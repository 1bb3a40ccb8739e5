#!/usr/bin/env bash
# Runs Cairn's whole test suite from a fresh clone: formatting, lints, every test.
# It installs what it needs (cargo-nextest if missing). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Repeated runs are incremental: build outside the clone unless told otherwise.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
cargo nextest run --workspace --locked --no-fail-fast

step "doc tests"
cargo test --workspace --doc --locked

step "benchmarks compile and run once (no timing)"
cargo bench --workspace --locked --no-run
