#!/usr/bin/env python3
"""Committed offsets through Kafka clients we did not write (tests/it/kafka.rs drives it).

    offsets.py commit CLIENT BOOTSTRAP GROUP TOPIC   # commit 10+p (metadata "m-p") on partitions 0..2
    offsets.py verify CLIENT BOOTSTRAP GROUP TOPIC   # a new consumer reads them back
    offsets.py delete confluent BOOTSTRAP GROUP TOPIC   # DeleteGroups forgets them

CLIENT is confluent or kafka-python. Consumers assign partitions themselves (no group membership).
"""

import sys


def expected(p):
    return 10 + p * 7, f"m-{p}"


def confluent(mode, bootstrap, group, topic):
    from confluent_kafka import Consumer, KafkaException, TopicPartition
    from confluent_kafka.admin import AdminClient

    if mode == "delete":
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.delete_consumer_groups([group])[group].result()
        c = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        for tp in c.committed([TopicPartition(topic, p) for p in range(3)], timeout=10):
            assert tp.offset < 0, tp  # no committed offset any more
        c.close()
        try:
            admin.delete_consumer_groups([group])[group].result()
            raise AssertionError("deleting a deleted group succeeded")
        except KafkaException as err:
            assert "GROUP_ID_NOT_FOUND" in str(err), err
        return

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    tps = [TopicPartition(topic, p) for p in range(3)]
    if mode == "commit":
        c.assign(tps)
        offsets = [TopicPartition(topic, p, expected(p)[0], metadata=expected(p)[1]) for p in range(3)]
        for tp in c.commit(offsets=offsets, asynchronous=False):
            assert tp.error is None, tp.error
    got = c.committed(tps, timeout=10)
    for tp in got:
        assert tp.error is None, tp.error
        assert (tp.offset, tp.metadata) == expected(tp.partition), (tp, expected(tp.partition))
    c.close()


def kafka_python(mode, bootstrap, group, topic):
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in range(3)]
    if mode == "commit":
        c.assign(tps)
        c.commit({tp: OffsetAndMetadata(expected(tp.partition)[0], expected(tp.partition)[1], -1) for tp in tps})
    for tp in tps:
        got = c.committed(tp, metadata=True)
        assert got is not None, tp
        assert (got.offset, got.metadata) == expected(tp.partition), (got, expected(tp.partition))
    c.close()


if __name__ == "__main__":
    mode, client, bootstrap, group, topic = sys.argv[1:6]
    {"confluent": confluent, "kafka-python": kafka_python}[client](mode, bootstrap, group, topic)
    print(f"{client}: {mode} ok")
