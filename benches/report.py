#!/usr/bin/env python3
"""Prints the ratios of Cairn's storage benchmarks to their same-run baselines, from criterion's
estimates. Usage: python3 benches/report.py [CRITERION_DIR] (default: $CARGO_TARGET_DIR/criterion,
else target/criterion)."""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.environ.get("CARGO_TARGET_DIR", "target"), "criterion")


def seconds(group, bench):
    path = os.path.join(root, group, bench, "new", "estimates.json")
    with open(path) as f:
        # The mean, not the median: rare slow iterations (segment rolls) are part of the cost.
        return json.load(f)["mean"]["point_estimate"] / 1e9


def bytes_per_iter(group, bench):
    path = os.path.join(root, group, bench, "new", "benchmark.json")
    with open(path) as f:
        return json.load(f)["throughput"]["Bytes"]


def rate(group, bench):
    return bytes_per_iter(group, bench) / seconds(group, bench)


rows = [
    ("append, no fsync", "append", "log", "write_all", 0.70),
    ("append, fdatasync per batch", "append_fsync", "log", "write_all_fdatasync", 0.80),
    ("sequential read, mmap", "read", "mmap", "memcpy", 0.50),
    ("sequential read, pread", "read", "pread", "memcpy", None),
    ("compaction pass (input bytes)", "compaction", "compact", "copy_fsync", None),
    ("producer send, 1 KB records", "producer", "send", "copy_crc", None),
    ("producer send_batch, 1 KB", "producer", "send_batch", "copy_crc", None),
]
print(f"{'benchmark':32} {'cairn MB/s':>11} {'baseline MB/s':>14} {'ratio':>6} {'target':>7}")
for name, group, ours, base, target in rows:
    try:
        a, b = rate(group, ours), rate(group, base)
    except (OSError, KeyError) as err:
        print(f"{name:32} missing ({err})")
        continue
    ratio = a / b
    verdict = "" if target is None else (f">={target:.2f} " + ("ok" if ratio >= target else "MISSED"))
    print(f"{name:32} {a / 1e6:11.0f} {b / 1e6:14.0f} {ratio:6.2f} {verdict}")
try:
    print(f"{'recovery scan':32} {rate('recovery', 'scan_1gib') / 1e9:8.2f} GB/s (target >= 1 GB/s)")
except (OSError, KeyError) as err:
    print(f"recovery scan: missing ({err})")
try:
    print(f"{'clean open, 1000 segments':32} {seconds('open', 'clean_1000_segments') * 1e3:8.1f} ms (target < 100 ms)")
except (OSError, KeyError) as err:
    print(f"clean open: missing ({err})")
