#!/usr/bin/env bash
# Fault scenarios judged by the history checker, on demand with longer windows than CI's 20 s.
# Each starts 3 brokers (RF 3, min ISR 2), runs idempotent acks=all producers and a consumer,
# injects its fault again and again, heals, drains every partition and runs cairn-check on the
# history; the history and the verdict are kept in $CARGO_TARGET_DIR/tmp/chaos/.
# Usage: scripts/chaos.sh [kill-leader|restart-leader|kill-follower|kill-controller|kill-all|pause-leader|
#   isolate-leader|isolate-follower|isolate-controller|one-way-leader|bridge|loss|cascade|
#   move-partition|disk-full|slow-leader|proxy-drop-leader|proxy-hold-leader-answers|all] [--seconds N] [--client cairn|confluent]
# --client confluent runs confluent-kafka's workload (tests/kafka/chaos.py: an idempotent
# producer and a consumer group that commits) instead of Cairn's client.
# (network scenarios need root, ip and iptables: scripts/test.sh installs them)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
scenario="all"
seconds=70
client=cairn
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --client) client="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) scenario="$1"; shift ;;
  esac
done
case "$scenario" in
  all) filter='test(/^chaos::chaos_/)' ;;
  kill-leader|restart-leader|kill-follower|kill-controller|kill-all|pause-leader|isolate-leader|isolate-follower|isolate-controller|one-way-leader|bridge|loss|cascade|move-partition|disk-full|slow-leader|proxy-drop-leader|proxy-hold-leader-answers) filter="test(=chaos::chaos_${scenario//-/_})" ;;
  *) echo "unknown scenario $scenario (kill-leader, restart-leader, kill-follower, kill-controller, kill-all, pause-leader, isolate-leader, isolate-follower, isolate-controller, one-way-leader, bridge, loss, cascade, move-partition, disk-full, slow-leader, proxy-drop-leader, proxy-hold-leader-answers, all)" >&2; exit 2 ;;
esac
case "$client" in
  cairn) ;;
  confluent)
    # The same scenarios, confluent's workload (the chaos_confluent_* tests are CI's subset).
    filter="($filter) - test(/^chaos::chaos_confluent_/)"
    export CAIRN_PYTHON="${CAIRN_PYTHON:-${CAIRN_VENV:-$HOME/.cache/cairn-venv}/bin/python}" ;;
  *) echo "unknown client $client (cairn, confluent)" >&2; exit 2 ;;
esac
export CAIRN_CHAOS_CLIENT="$client"
export CAIRN_CHAOS_SECONDS="$seconds"
cargo nextest run -p cairn-tests --no-fail-fast --no-capture -E "$filter"
echo "histories and verdicts: $CARGO_TARGET_DIR/tmp/chaos/"
