#!/usr/bin/env bash
# Longer runs of the same harnesses CI runs, on demand (not part of CI): many more proptest cases,
# power-loss seeds and kill -9 cycles. Usage: scripts/soak.sh [multiplier, default 20]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
m="${1:-20}"
export CAIRN_SOAK_CASES=$((192 * m)) CAIRN_SOAK_SEEDS=$((400 * m)) CAIRN_SOAK_KILLS=$((50 * m))
echo "soak x$m: $CAIRN_SOAK_CASES model cases, $CAIRN_SOAK_SEEDS power-loss seeds, $CAIRN_SOAK_KILLS kills"
cargo nextest run --release -p cairn-tests --no-fail-fast -E 'test(log_model) | test(power_loss) | test(kill9)'
