#!/usr/bin/env bash
# Runs Cairn's whole test suite from a fresh clone: formatting, lints, every test.
# It installs what it needs: cargo-nextest if missing, the Kafka clients the Kafka-protocol tests
# run (confluent-kafka, kafka-python and its codecs) into a virtualenv, and kcat, iptables and
# iproute2 from Debian when run as root. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# Repeated runs are incremental: build outside the clone unless told otherwise. Without
# rustc's incremental caches, which only speed up edit-compile loops and otherwise grow by
# gigabytes per run until the disk is full (seen: 17 GB after a few sessions).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

step() { printf '\n==> %s\n' "$*"; }

if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# Third-party Kafka clients, pinned, in a virtualenv outside the clone (reused across runs).
export CAIRN_VENV="${CAIRN_VENV:-$HOME/.cache/cairn-venv}"
export CAIRN_PYTHON="$CAIRN_VENV/bin/python"
if ! "$CAIRN_PYTHON" -c 'import confluent_kafka, kafka, lz4, snappy, zstandard, cramjam' >/dev/null 2>&1; then
  step "installing Kafka clients into $CAIRN_VENV"
  python3 -m venv "$CAIRN_VENV"
  "$CAIRN_VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/kafka/requirements.txt
fi
# kcat for its client test; iptables and iproute2 for the network-fault tests (network
# namespaces, as root).
for tool in kcat:kcat iptables:iptables ip:iproute2; do
  command -v "${tool%%:*}" >/dev/null 2>&1 && continue
  package="${tool##*:}"
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    step "installing $package (Debian)"
    apt-get install -y -qq "$package" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$package" >/dev/null 2>&1; } \
      || echo "$package could not be installed: the tests that need it print that they skipped"
  else
    echo "$package is not installed and this is not root: the tests that need it print that they skipped"
  fi
done

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
