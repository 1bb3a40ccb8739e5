#!/usr/bin/env python3
"""What confluent-kafka's own producer and consumer reach against a broker's Kafka listener, as a
user of that client sees it (records/s and MB/s for 1 KiB records, acks=1, no compression).

    benches/kafka_clients.py [--bootstrap 127.0.0.1:9092] [--records 500000] [--record-bytes 1024]

Uses the virtualenv scripts/test.sh creates (~/.cache/cairn-venv/bin/python). Prints one JSON line
per workload: first with librdkafka's defaults, then with batching a throughput-minded user would
set (linger.ms=5, batch.size=1 MiB, fetch sizes of 1 MiB per partition).
"""

import argparse
import json
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def produce(bootstrap, topic, n, size, extra):
    value = bytes(i % 251 for i in range(size))
    p = Producer({"bootstrap.servers": bootstrap, "acks": "1", **extra})
    started = time.perf_counter()
    for _ in range(n):
        while True:
            try:
                p.produce(topic, value)
                break
            except BufferError:
                p.poll(0.001)
    left = p.flush(120)
    elapsed = time.perf_counter() - started
    assert left == 0, f"{left} undelivered"
    return elapsed


def consume(bootstrap, topic, n, extra):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False, **extra})
    c.assign([TopicPartition(topic, 0, 0)])
    got = 0
    started = time.perf_counter()
    while got < n:
        # Batches of 1,000: with 10,000, confluent-kafka 2.16's consume() stalls for about a
        # second at a time although librdkafka's fetch queue holds 25,000 messages (its fetch log
        # shows the broker answering every fetch in about a millisecond): 146 MB/s against
        # 1,644 MB/s with 1,000 on the same data. Never more than remain: consume() waits out its
        # timeout for a short count.
        for m in c.consume(min(1000, n - got), 0.05):
            assert m.error() is None, m.error()
            got += 1
    elapsed = time.perf_counter() - started
    c.close()
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--records", type=int, default=500_000)
    ap.add_argument("--record-bytes", type=int, default=1024)
    args = ap.parse_args()
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    settings = {
        "defaults": ({}, {}),
        "tuned": (
            {"linger.ms": 5, "batch.size": 1 << 20, "queue.buffering.max.kbytes": 1 << 20},
            {"fetch.max.bytes": 52428800, "max.partition.fetch.bytes": 1 << 20},
        ),
    }
    for name, (producer_extra, consumer_extra) in settings.items():
        topic = f"confluent-bench-{name}-{int(time.time())}"
        for f in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
            f.result()
        n, size = args.records, args.record_bytes
        for workload, secs in (
            ("produce", produce(args.bootstrap, topic, n, size, producer_extra)),
            ("consume", consume(args.bootstrap, topic, n, consumer_extra)),
        ):
            print(json.dumps({
                "client": "confluent-kafka", "settings": name, "workload": workload,
                "records": n, "record_bytes": size, "seconds": round(secs, 3),
                "records_per_sec": round(n / secs), "mb_per_sec": round(n * size / secs / 1e6, 1),
            }), flush=True)
        for f in admin.delete_topics([topic]).values():
            f.result()


if __name__ == "__main__":
    main()
