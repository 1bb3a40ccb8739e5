#!/usr/bin/env python3
"""confluent-kafka against a TLS listener (tests/it/security.rs, docs/security.md).

    tls.py --broker HOST:PORT --ca FILE [--cert FILE --key FILE] --topic T

Produces 100 records over `security.protocol=SSL` (with a client certificate when given: mTLS),
reads them back, and prints one JSON line: {"produced": N, "consumed": N, "error": "..."}.
A refused handshake shows up as an error within a few seconds, not a hang.
"""

import argparse
import json

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--topic", required=True)
    args = parser.parse_args()
    security = {
        "bootstrap.servers": args.broker,
        "security.protocol": "SSL",
        "ssl.ca.location": args.ca,
    }
    if args.cert:
        security["ssl.certificate.location"] = args.cert
        security["ssl.key.location"] = args.key
    errors = []

    def error(err):
        errors.append(str(err))

    producer = Producer(dict(security, **{
        "message.timeout.ms": 8000,
        "socket.connection.setup.timeout.ms": 3000,
        "error_cb": error,
    }))
    delivered = []

    def report(err, msg):
        if err is None:
            delivered.append(msg.offset())
        else:
            errors.append(str(err))

    for i in range(100):
        producer.produce(args.topic, value=f"tls-{i}".encode(), partition=0, on_delivery=report)
    producer.flush(15)
    consumed = 0
    if delivered:
        consumer = Consumer(dict(security, **{
            "group.id": "tls-test",
            "enable.auto.commit": False,
            "error_cb": error,
        }))
        consumer.assign([TopicPartition(args.topic, 0, 0)])
        while consumed < len(delivered):
            try:
                messages = consumer.consume(100, 10)
            except KafkaException as e:
                errors.append(str(e))
                break
            if not messages:
                break
            consumed += sum(1 for m in messages if m.error() is None)
        consumer.close()
    print(json.dumps({"produced": len(delivered), "consumed": consumed,
                      "error": errors[0] if errors else None}), flush=True)


if __name__ == "__main__":
    main()
