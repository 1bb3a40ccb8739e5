#!/usr/bin/env python3
"""confluent-kafka's AdminClient.elect_leaders (Kafka's ElectLeaders) against a Cairn cluster.

    elect.py --bootstrap HOST:PORT --topic T --partitions N

Asks for a preferred-leader election of every partition of T and prints one JSON line:
{"partition": "error or null", ...}.
"""

import argparse
import json

from confluent_kafka import ElectionType, TopicPartition
from confluent_kafka.admin import AdminClient


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    args = parser.parse_args()
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    partitions = [TopicPartition(args.topic, p) for p in range(args.partitions)]
    future = admin.elect_leaders(ElectionType.PREFERRED, partitions)
    results = future.result(timeout=30)
    print(
        json.dumps(
            {str(tp.partition): (None if err is None else err.name()) for tp, err in results.items()}
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
