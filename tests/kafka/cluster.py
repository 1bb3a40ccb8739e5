#!/usr/bin/env python3
"""Kafka clients we did not write, against a Cairn cluster of several brokers.

Run by tests/it/cluster.rs:

    cluster.py CLIENT --produce HOST:PORT --consume HOST:PORT --topic T --records N

CLIENT is confluent (confluent-kafka) or kafka-python. The producer bootstraps from one broker,
the consumer from another: each must learn every partition's leader from Metadata and talk to
it. confluent-kafka produces idempotently with acks=all and consumes as a member of a consumer
group (FindCoordinator sends it to the group's coordinator, which may be a third broker, and it
commits there); kafka-python produces with acks=all and reads every partition by assignment.

Prints one JSON line: the leaders the client's metadata gave ({partition: node}), how many
records it produced and consumed. Exits non-zero with a message on the first failed check.
"""

import argparse
import json
import sys
import time


def fail(message):
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def confluent(args):
    from confluent_kafka import Consumer, Producer

    producer = Producer(
        {
            "bootstrap.servers": args.produce,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    errors = []

    def delivered(err, _msg):
        if err is not None:
            errors.append(str(err))

    for i in range(args.records):
        producer.produce(args.topic, key=f"k{i}", value=f"confluent-{i}", on_delivery=delivered)
        producer.poll(0)
    left = producer.flush(60)
    if left or errors:
        fail(f"{left} records not delivered; errors: {errors[:5]}")
    metadata = producer.list_topics(args.topic, timeout=10)
    leaders = {p.id: p.leader for p in metadata.topics[args.topic].partitions.values()}

    consumer = Consumer(
        {
            "bootstrap.servers": args.consume,
            "group.id": f"cluster-{args.topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "session.timeout.ms": 6000,
        }
    )
    consumer.subscribe([args.topic])
    seen = set()
    deadline = time.time() + 90
    while len(seen) < args.records and time.time() < deadline:
        msg = consumer.poll(1.0)
        if msg is None:
            continue
        if msg.error():
            fail(f"consume error: {msg.error()}")
        seen.add(msg.value().decode())
    if len(seen) < args.records:
        fail(f"consumed {len(seen)} of {args.records}")
    # The group's commits go to its coordinator, wherever it is.
    consumer.commit(asynchronous=False)
    consumer.close()
    return leaders, args.records, len(seen)


def kafka_python(args):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    producer = KafkaProducer(bootstrap_servers=args.produce, acks="all", linger_ms=5)
    futures = [
        producer.send(args.topic, key=f"k{i}".encode(), value=f"kafka-python-{i}".encode())
        for i in range(args.records)
    ]
    for future in futures:
        future.get(timeout=60)
    producer.flush()
    producer.close()

    consumer = KafkaConsumer(bootstrap_servers=args.consume, enable_auto_commit=False)
    partitions = sorted(consumer.partitions_for_topic(args.topic) or [])
    if not partitions:
        fail("no partitions in the consumer's metadata")
    assigned = [TopicPartition(args.topic, p) for p in partitions]
    consumer.assign(assigned)
    consumer.seek_to_beginning(*assigned)
    leaders = {
        p: consumer._client.cluster.leader_for_partition(TopicPartition(args.topic, p))
        for p in partitions
    }
    seen = set()
    deadline = time.time() + 90
    while len(seen) < args.records and time.time() < deadline:
        for records in consumer.poll(timeout_ms=1000).values():
            for record in records:
                seen.add(record.value.decode())
    consumer.close()
    if len(seen) < args.records:
        fail(f"consumed {len(seen)} of {args.records}")
    return leaders, args.records, len(seen)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=["confluent", "kafka-python"])
    parser.add_argument("--produce", required=True)
    parser.add_argument("--consume", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--records", type=int, default=600)
    args = parser.parse_args()
    run = confluent if args.client == "confluent" else kafka_python
    leaders, produced, consumed = run(args)
    print(
        json.dumps(
            {
                "client": args.client,
                "leaders": {str(p): n for p, n in leaders.items()},
                "produced": produced,
                "consumed": consumed,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
