#!/usr/bin/env python3
"""Prints the results table of docs/reliability.md from the verdicts scripts/chaos.sh left.

    scripts/chaos-table.py [DIR]    # default: $CARGO_TARGET_DIR/tmp/chaos (~/.cache/cairn-target/...)

One row per `NAME.verdict.json` (negative controls, whose names carry the control, are left out):
the scenario and client, faults injected, sends, acknowledged, lost, duplicated, other anomalies,
and the time from each fault to the first acknowledgement on the partition it aimed at.
"""

import json
import os
import sys
from pathlib import Path

CONTROLS = ("acks-on-log-end", "isr-shrink-without-controller", "followers-forget-producers",
            "unclean-election-by-default", "followers-keep-divergent-logs")


def seconds(ms):
    return "-" if ms is None else f"{ms / 1000:.2f} s"


def main():
    target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/cairn-target"))
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(target) / "tmp" / "chaos"
    print("| scenario | client | faults | sends | acknowledged | lost | duplicated "
          "| other anomalies | recovery p50 / p99 / max |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path in sorted(directory.glob("*.verdict.json")):
        name = path.name[: -len(".verdict.json")]
        if any(control in name for control in CONTROLS):
            continue
        client = "confluent-kafka" if name.endswith("-confluent") else "Cairn"
        scenario = name.removesuffix("-confluent")
        verdict = json.loads(path.read_text())
        stats, anomalies, availability = (verdict["stats"], verdict["anomalies"],
                                          verdict["availability"])
        other = sum(n for a, n in anomalies.items() if a not in ("lost", "duplicate"))
        recovery = " / ".join(seconds(availability.get(k)) for k in
                              ("recovery_p50_ms", "recovery_p99_ms", "recovery_max_ms"))
        print(f"| {scenario} | {client} | {len(availability['faults'])} | {stats['sends']:,} "
              f"| {stats['acknowledged']:,} | {anomalies.get('lost', 0)} "
              f"| {anomalies.get('duplicate', 0)} | {other} | {recovery} |")


if __name__ == "__main__":
    main()
