#!/usr/bin/env python3
"""The confluent-kafka workload of the fault scenarios (tests/it/chaos.rs): it writes a history for
the checker (crates/check, docs/reliability.md) while the nemesis breaks the cluster.

    chaos.py --bootstrap HOST:PORT,... --topic T --partitions N --group G
             --origin-ns NS --history FILE --stop FILE

- A producer (librdkafka's idempotent producer, acks=all) sends unique values c0, c1, ...
  round-robin over the partitions, about 400 a second, logging `invoke` before each send and
  `ok` (with its offset) or `info` (the error: librdkafka gave up, unknown outcome) when it
  resolves.
- Two consumers in group G (subscribe, no auto-commit) log every record they receive (`poll`,
  with the group), each new assignment or revocation (`assign`), and commit what they processed
  after each batch, synchronously, logging the commit per partition (`invoke`, then `ok`, or
  `fail` for a refusal that surely did not apply, or `info`).
- When FILE exists the producer stops and flushes what it still holds; the consumers go on until
  they have received every acknowledged value (at most CATCH_UP_S seconds more: librdkafka's
  fetcher sometimes loses a partition for a few seconds when its leader moves, and recovers at
  a metadata refresh), printing how long that took; then they leave, and a fresh consumer of
  the group reads its committed offsets (`committed`).

With CAIRN_CHAOS_RDKAFKA_DEBUG set (librdkafka's `debug` contexts, e.g. `cgrp,protocol`) the
producer and the consumers log librdkafka's debug lines to CAIRN_CHAOS_RDKAFKA_LOG (default
chaos-rdkafka.log).

Times are CLOCK_MONOTONIC nanoseconds since NS, in ms: the same clock the Rust harness logs
faults with. Events are appended to the history as JSON lines.
"""

import argparse
import json
import logging
import os
import threading
import time

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

# Commit errors that mean the commit surely did not apply (the coordinator refused it).
REFUSED = {
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.FENCED_INSTANCE_ID,
    KafkaError._ASSIGNMENT_LOST,
}


# How long the consumers may take to receive every acknowledged value once the producer stopped.
CATCH_UP_S = 20


class Progress:
    """Values acknowledged to the producer and received by the consumers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acknowledged = set()
        self.received = set()

    def ack(self, value):
        with self.lock:
            self.acknowledged.add(value)

    def receive(self, value):
        with self.lock:
            self.received.add(value)

    def missing(self):
        with self.lock:
            return len(self.acknowledged - self.received)


class History:
    def __init__(self, path, origin_ns):
        self.file = open(path, "a", buffering=1 << 20)
        self.origin_ns = origin_ns
        self.lock = threading.Lock()

    def log(self, **event):
        with self.lock:
            event["time"] = (time.monotonic_ns() - self.origin_ns) / 1e6
            self.file.write(json.dumps(event) + "\n")

    def close(self):
        with self.lock:
            self.file.close()


def produce(args, history, stop, progress):
    producer = Producer(debugged(
        {
            "bootstrap.servers": args.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 2,
            "message.timeout.ms": 60000,
            "retry.backoff.ms": 20,
            "topic.metadata.refresh.interval.ms": 1000,
        },
        "confluent-producer",
    ))

    def delivered(err, msg):
        value = msg.value().decode()
        if err is None:
            history.log(type="ok", f="send", process="confluent-producer", value=value,
                        topic=args.topic, partition=msg.partition(), offset=msg.offset())
            progress.ack(value)
        else:
            # librdkafka gave up on it (a timeout, a fatal error): it may have been written.
            history.log(type="info", f="send", process="confluent-producer", value=value,
                        error=str(err))

    i = 0
    while not stop.is_set():
        value = f"c{i}"
        partition = i % args.partitions
        history.log(type="invoke", f="send", process="confluent-producer", value=value,
                    topic=args.topic, partition=partition)
        while True:
            try:
                producer.produce(args.topic, value=value, partition=partition,
                                 on_delivery=delivered)
                break
            except BufferError:
                producer.poll(0.05)
        i += 1
        producer.poll(0)
        time.sleep(0.0025)
    left = producer.flush(90)
    if left:
        print(f"{left} sends still unresolved after 90 s", flush=True)


def debugged(config, name):
    """`config` with librdkafka's debug log to a file, when CAIRN_CHAOS_RDKAFKA_DEBUG asks."""
    contexts = os.environ.get("CAIRN_CHAOS_RDKAFKA_DEBUG")
    if not contexts:
        return config
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    handler = logging.FileHandler(os.environ.get("CAIRN_CHAOS_RDKAFKA_LOG", "chaos-rdkafka.log"))
    handler.setFormatter(logging.Formatter("%(created).3f %(name)s %(message)s"))
    logger.addHandler(handler)
    return dict(config, debug=contexts, logger=logger)


def consume(args, name, history, stop, progress):
    consumer = Consumer(debugged(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": args.group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "topic.metadata.refresh.interval.ms": 1000,
        },
        name,
    ))

    def assigned(_consumer, partitions):
        history.log(type="info", f="assign", process=name, group=args.group,
                    value="assigned " + ",".join(str(p.partition) for p in partitions))

    def revoked(_consumer, partitions):
        history.log(type="info", f="assign", process=name, group=args.group,
                    value="revoked " + ",".join(str(p.partition) for p in partitions))

    consumer.subscribe([args.topic], on_assign=assigned, on_revoke=revoked)
    while not stop.is_set():
        try:
            messages = consumer.consume(200, 0.2)
        except KafkaException:
            continue
        positions = {}
        for m in messages:
            if m.error():
                continue
            value = m.value().decode()
            history.log(type="ok", f="poll", process=name, group=args.group,
                        value=value, topic=m.topic(), partition=m.partition(),
                        offset=m.offset())
            progress.receive(value)
            positions[m.partition()] = m.offset() + 1
        if positions:
            commit(consumer, args, name, history, positions)
    consumer.close()


def commit(consumer, args, name, history, positions):
    offsets = [TopicPartition(args.topic, p, o) for p, o in sorted(positions.items())]
    for tp in offsets:
        history.log(type="invoke", f="commit", process=name, group=args.group,
                    topic=args.topic, partition=tp.partition, offset=tp.offset)
    try:
        answered = consumer.commit(offsets=offsets, asynchronous=False)
    except KafkaException as e:
        err = e.args[0]
        kind = "fail" if err.code() in REFUSED else "info"
        for tp in offsets:
            history.log(type=kind, f="commit", process=name, group=args.group,
                        topic=args.topic, partition=tp.partition, offset=tp.offset,
                        error=str(err))
        return
    for tp in answered or []:
        if tp.error is None:
            history.log(type="ok", f="commit", process=name, group=args.group,
                        topic=args.topic, partition=tp.partition, offset=tp.offset)
        else:
            kind = "fail" if tp.error.code() in REFUSED else "info"
            history.log(type=kind, f="commit", process=name, group=args.group,
                        topic=args.topic, partition=tp.partition, offset=tp.offset,
                        error=str(tp.error))


def read_committed(args, history):
    """The group's committed offsets, read by a fresh member once the others left."""
    consumer = Consumer({"bootstrap.servers": args.bootstrap, "group.id": args.group,
                         "enable.auto.commit": False})
    partitions = [TopicPartition(args.topic, p) for p in range(args.partitions)]
    deadline = time.monotonic() + 60
    while True:
        try:
            committed = consumer.committed(partitions, timeout=10)
            break
        except KafkaException as e:
            if time.monotonic() > deadline:
                raise
            print(f"reading committed offsets: {e}; again", flush=True)
            time.sleep(0.5)
    for tp in committed:
        if tp.error is None and tp.offset >= 0:
            history.log(type="ok", f="committed", process="confluent-committed",
                        group=args.group, topic=args.topic, partition=tp.partition,
                        offset=tp.offset)
    consumer.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--origin-ns", type=int, required=True)
    parser.add_argument("--history", required=True)
    parser.add_argument("--stop", required=True)
    args = parser.parse_args()
    history = History(args.history, args.origin_ns)
    progress = Progress()
    stop_producing = threading.Event()
    stop_consuming = threading.Event()
    producer = threading.Thread(target=produce, args=(args, history, stop_producing, progress))
    consumers = [
        threading.Thread(target=consume,
                         args=(args, f"confluent-consumer-{n}", history, stop_consuming, progress))
        for n in (1, 2)
    ]
    for t in [producer] + consumers:
        t.start()
    while not os.path.exists(args.stop):
        time.sleep(0.1)
    stop_producing.set()
    producer.join()
    stopped = time.monotonic()
    while progress.missing() and time.monotonic() - stopped < CATCH_UP_S:
        time.sleep(0.05)
    missing = progress.missing()
    waited = time.monotonic() - stopped
    if missing:
        print(f"the consumers still miss {missing} acknowledged values {waited:.1f} s after the "
              "producer stopped", flush=True)
    else:
        print(f"the consumers received every acknowledged value {waited * 1000:.0f} ms after "
              "the producer stopped", flush=True)
    stop_consuming.set()
    for t in consumers:
        t.join()
    read_committed(args, history)
    history.close()


if __name__ == "__main__":
    main()
