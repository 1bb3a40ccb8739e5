#!/usr/bin/env bash
# Longer runs of the same harnesses CI runs, on demand (not part of CI): many more proptest cases,
# replication simulation seeds,
# power-loss seeds, kill -9 cycles and compaction seeds, the third-party Kafka clients with more records, and the
# consumer-group scenarios in release (run
# scripts/test.sh once first: it installs them). Usage: scripts/soak.sh [multiplier, default 20]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
m="${1:-20}"
export CAIRN_SOAK_CASES=$((192 * m)) CAIRN_SOAK_SEEDS=$((400 * m)) CAIRN_SOAK_KILLS=$((50 * m))
export CAIRN_KAFKA_RECORDS=$((100000 * m / 4))
export CAIRN_PYTHON="${CAIRN_PYTHON:-$HOME/.cache/cairn-venv/bin/python}"
echo "soak x$m: $CAIRN_SOAK_CASES model cases, $CAIRN_SOAK_SEEDS power-loss seeds, $CAIRN_SOAK_KILLS kills, $CAIRN_KAFKA_RECORDS records per Kafka client and codec"
cargo nextest run --release -p cairn-tests --no-fail-fast \
  -E 'test(log_model) | test(power_loss) | test(kill9) | test(compaction) | test(/produces_consumes/) | test(kcat_) | test(/group|static_member|rebalance_time/)'
# The replication simulation: 1,000 durable and 500 in-memory seeds in CI; here m x 1,000 each.
CAIRN_SIM_SEEDS=$((1000 * m)) cargo nextest run --release -p cairn-replication --test simulation
# The fault scenarios judged by the history checker, 70 s each.
scripts/chaos.sh all --seconds 70
scripts/chaos.sh all --seconds 70 --client confluent
