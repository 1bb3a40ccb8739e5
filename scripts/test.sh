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

step "benchmarks: one quick pass of each, small data (smoke test, no timing)"
CAIRN_BENCH_QUICK=1 cargo bench --workspace --locked -- --test

step "doc tests"
cargo test --workspace --doc --locked

step "tests"
cargo nextest run --workspace --locked --no-fail-fast
