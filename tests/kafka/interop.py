#!/usr/bin/env python3
"""Interop between Cairn's own client (native protocol) and confluent-kafka (Kafka protocol).

    interop.py produce BOOTSTRAP TOPIC N   # confluent-kafka writes records 0..N
    interop.py verify BOOTSTRAP TOPIC N    # confluent-kafka reads them and compares every byte

tests/it/kafka.rs runs the other halves with Cairn's client; both sides generate record i the same
way (see `interop_record` there): binary values, keys, a header and a timestamp, all of partition
0 of a one-partition topic.
"""

import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition


def record(i):
    key = f"interop-{i}".encode()
    value = bytes((i * 7 + j * 13) % 256 for j in range((i * 13) % 500))
    headers = [("i", str(i).encode())]
    return key, value, headers, 1_700_000_000_000 + i


def main():
    mode, bootstrap, topic, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if mode == "produce":
        p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all", "compression.type": "zstd"})
        errors = []
        for i in range(n):
            key, value, headers, ts = record(i)
            p.produce(topic, key=key, value=value, headers=headers, timestamp=ts, partition=0,
                      on_delivery=lambda err, _m: errors.append(err) if err else None)
            p.poll(0)
        assert p.flush(30) == 0, "records left undelivered"
        assert not errors, errors[:3]
        print(f"produced {n}")
        return
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    got = []
    deadline = time.time() + 60
    while len(got) < n and time.time() < deadline:
        for m in c.consume(1000, 0.5):
            assert m.error() is None, m.error()
            got.append(m)
    c.close()
    assert len(got) == n, f"read {len(got)} of {n}"
    for i, m in enumerate(got):
        key, value, headers, ts = record(i)
        assert m.offset() == i, (i, m.offset())
        assert m.key() == key, (i, m.key(), key)
        assert m.value() == value, (i, "value differs")
        assert (m.headers() or []) == headers, (i, m.headers())
        assert m.timestamp()[1] == ts, (i, m.timestamp(), ts)
    print(f"verified {n}")


if __name__ == "__main__":
    main()
