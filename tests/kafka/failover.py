#!/usr/bin/env python3
"""An idempotent confluent-kafka producer (acks=all) writing unique values to one partition at a
steady rate while tests/it/replication.rs kills the partition's leader again and again.

    failover.py --bootstrap HOST:PORT,... --topic T --stop FILE

Produces c0, c1, ... to partition 0 until FILE exists, then flushes and prints one JSON line:
{"acked": [[i, offset], ...], "failed": ["...", ...]}.
"""

import argparse
import json
import os
import time

from confluent_kafka import Producer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--stop", required=True)
    args = parser.parse_args()
    producer = Producer(
        {
            "bootstrap.servers": args.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "message.timeout.ms": 120000,
            "retry.backoff.ms": 20,
            "topic.metadata.refresh.interval.ms": 1000,
        }
    )
    acked = []
    failed = []

    def delivered(err, msg):
        i = int(msg.value().decode()[1:])
        if err is not None:
            failed.append(f"c{i}: {err}")
        else:
            acked.append([i, msg.offset()])

    i = 0
    while not os.path.exists(args.stop):
        producer.produce(args.topic, value=f"c{i}", partition=0, on_delivery=delivered)
        i += 1
        producer.poll(0)
        time.sleep(0.002)
    left = producer.flush(120)
    if left:
        failed.append(f"{left} records still undelivered after 120 s")
    print(json.dumps({"acked": acked, "failed": failed}), flush=True)


if __name__ == "__main__":
    main()
