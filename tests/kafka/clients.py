#!/usr/bin/env python3
"""Kafka clients we did not write, against a real Cairn broker.

Run by tests/it/kafka.rs, once per client:

    clients.py CLIENT --broker HOST:PORT --proxy-port PORT [--records N]

CLIENT is confluent (confluent-kafka, librdkafka bundled in its wheel), kafka-python, or kcat
(kcat 1.7.1 from Debian, librdkafka 2.0.2). The broker must advertise 127.0.0.1:PROXY_PORT on its
Kafka listener: every connection then goes through a TCP proxy in this script, which can drop all
of them at once (the idempotence check). Exits non-zero with a message on the first failed
check; prints one line per passed check.

Checks, per client: metadata lists the broker; topics are created and deleted (kcat cannot
administer topics: confluent-kafka's admin client does it for kcat's run); N keyed records with
headers and timestamps are produced to a 6-partition topic with each codec and consumed back by
partition assignment, each compared field by field, each key in the partition Kafka's murmur2
partitioner picks; ListOffsets by timestamp finds the first record at or after the time; an
idempotent producer loses no record and writes none twice while the proxy drops its
connections mid-stream.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time

CODECS = ["none", "gzip", "snappy", "lz4", "zstd"]
PARTITIONS = 6
BASE_TS = int(time.time() * 1000) - 3_600_000


def fail(message):
    print(f"FAIL: {message}", flush=True)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def passed(message):
    print(f"ok: {message}", flush=True)


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), as a signed 32-bit int."""
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & 0xFFFFFFFF
    for i in range(length // 4):
        k = int.from_bytes(data[i * 4 : i * 4 + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length % 4
    tail = length - rest
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def kafka_partition(key: bytes, n: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n


def record(codec, i):
    """The i-th record of a codec's run: printable, so kcat's line format carries it."""
    key = f"key-{i % 997}".encode()
    body = bytes((i * 31 + j) % 94 + 33 for j in range(i % 200))
    value = f"{codec}:{i}:".encode() + body.replace(b"\t", b"_")
    headers = [("idx", str(i).encode()), ("codec", codec.encode())]
    return key, value, headers, BASE_TS + i


class Proxy:
    """Forwards 127.0.0.1:port to the broker. drop() closes every connection it carries;
    lose_next_response() swallows the next bytes the broker sends (a produce acknowledgement,
    mostly) and closes that connection, so the client retries a request the broker executed."""

    def __init__(self, port, broker):
        host, bport = broker.rsplit(":", 1)
        self.target = (host, int(bport))
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(128)
        self.lock = threading.Lock()
        self.live = []
        self.drops = 0
        self.lose = threading.Event()
        self.lost = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.sock.accept()
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.live.append((client, upstream))
            # Whether this connection's last request was a Produce (judged by the API key after
            # the length prefix of the bytes a recv returns: requests this small arrive whole).
            producing = threading.Event()
            for a, b, from_broker in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, from_broker, producing), daemon=True).start()

    def _pipe(self, a, b, from_broker, producing):
        try:
            while True:
                data = a.recv(1 << 16)
                if not data:
                    break
                if not from_broker and len(data) >= 6:
                    if data[4:6] == b"\x00\x00":
                        producing.set()
                    else:
                        producing.clear()
                if from_broker and producing.is_set() and self.lose.is_set():
                    # A produce acknowledgement: lose it and close the connection.
                    self.lose.clear()
                    with self.lock:
                        self.lost += 1
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def lose_next_response(self):
        self.lose.set()

    def drop(self):
        with self.lock:
            pairs, self.live = self.live, []
            self.drops += 1
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# ---------------------------------------------------------------------------------------------
# Client adapters: one interface over the three clients.


class Confluent:
    name = "confluent-kafka"

    def __init__(self, bootstrap):
        from confluent_kafka.admin import AdminClient

        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})

    def brokers(self):
        md = self.admin.list_topics(timeout=10)
        return [(b.id, b.host, b.port) for b in md.brokers.values()]

    def topics(self):
        md = self.admin.list_topics(timeout=10)
        return {name: len(t.partitions) for name, t in md.topics.items()}

    def create(self, topic, partitions):
        from confluent_kafka.admin import NewTopic

        for f in self.admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)]).values():
            f.result()

    def delete(self, topic):
        for f in self.admin.delete_topics([topic]).values():
            f.result()

    def produce(self, topic, codec, records, idempotent=False, on_progress=None):
        from confluent_kafka import Producer

        config = {
            "bootstrap.servers": self.bootstrap,
            "compression.type": codec,
            "partitioner": "murmur2_random",
            "linger.ms": 5,
            "acks": "all",
        }
        if idempotent:
            config.update({"enable.idempotence": True, "message.timeout.ms": 60000})
        p = Producer(config)
        errors = []

        def delivered(err, _msg):
            if err is not None:
                errors.append(err)

        for n, (key, value, headers, ts) in enumerate(records):
            while True:
                try:
                    p.produce(topic, key=key, value=value, headers=headers, timestamp=ts or 0, on_delivery=delivered)
                    break
                except BufferError:
                    p.poll(0.05)
            if n % 1000 == 0:
                p.poll(0)
                if on_progress:
                    on_progress(n)
        remaining = p.flush(60)
        check(remaining == 0, f"{remaining} records not delivered")
        check(not errors, f"delivery errors: {errors[:3]}")

    def consume(self, topic, partitions, expected):
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "unused", "enable.auto.commit": False})
        c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        out = []
        deadline = time.time() + 120
        while len(out) < expected and time.time() < deadline:
            # Batches of 1,000: larger ones make confluent-kafka 2.16 stall (benches/kafka_clients.py).
            for m in c.consume(min(1000, expected - len(out)), 0.2):
                check(m.error() is None, f"consume error: {m.error()}")
                out.append((m.partition(), m.offset(), m.key(), m.value(), m.headers() or [], m.timestamp()[1]))
        c.close()
        return out

    def offset_for_time(self, topic, partition, ts):
        from confluent_kafka import Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "unused"})
        [tp] = c.offsets_for_times([TopicPartition(topic, partition, ts)], timeout=10)
        c.close()
        return tp.offset  # -1: none at or after ts


class KafkaPython:
    name = "kafka-python"

    def __init__(self, bootstrap):
        from kafka import KafkaAdminClient

        self.bootstrap = bootstrap
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)

    def brokers(self):
        return [(b["broker_id"], b["host"], b["port"]) for b in self.admin.describe_cluster()["brokers"]]

    def topics(self):
        described = self.admin.describe_topics()
        return {t.get("name", t.get("topic")): len(t["partitions"]) for t in described}

    def create(self, topic, partitions):
        from kafka.admin import NewTopic

        result = self.admin.create_topics([NewTopic(topic, partitions, 1)])
        errors = [t for t in result.to_object()["topics"] if t["error_code"] != 0] if hasattr(result, "to_object") else []
        check(not errors, f"create {topic}: {errors}")

    def delete(self, topic):
        self.admin.delete_topics([topic])

    def produce(self, topic, codec, records, idempotent=False, on_progress=None):
        from kafka import KafkaProducer

        p = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            compression_type=None if codec == "none" else codec,
            acks="all",
            linger_ms=5,
            enable_idempotence=idempotent,
            retries=2147483647 if idempotent else 5,
            delivery_timeout_ms=120000,
        )
        futures = []
        for n, (key, value, headers, ts) in enumerate(records):
            futures.append(p.send(topic, key=key, value=value, headers=headers, timestamp_ms=ts))
            if on_progress and n % 1000 == 0:
                on_progress(n)
        p.flush(120)
        failed = [f.exception for f in futures if f.failed()]
        check(not failed, f"{len(failed)} sends failed: {failed[:3]}")
        p.close()

    def consume(self, topic, partitions, expected):
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, max_poll_records=10000)
        c.assign([TopicPartition(topic, p) for p in range(partitions)])
        c.seek_to_beginning()
        out = []
        deadline = time.time() + 180
        while len(out) < expected and time.time() < deadline:
            for tp, messages in c.poll(timeout_ms=1000).items():
                for m in messages:
                    out.append((m.partition, m.offset, m.key, m.value, list(m.headers), m.timestamp))
        c.close()
        return out

    def offset_for_time(self, topic, partition, ts):
        from kafka import KafkaConsumer, TopicPartition

        c = KafkaConsumer(bootstrap_servers=self.bootstrap)
        found = c.offsets_for_times({TopicPartition(topic, partition): ts})
        c.close()
        entry = found[TopicPartition(topic, partition)]
        return -1 if entry is None else entry.offset


class Kcat:
    """kcat cannot administer topics or set per-record headers and timestamps: topics come from
    confluent-kafka's admin client, every record carries the same fixed headers, and timestamps are
    the producer's clock (checked to be in the produce window)."""

    name = "kcat"

    def __init__(self, bootstrap):
        self.bootstrap = bootstrap
        self.admin = Confluent(bootstrap)
        self.produced_window = {}

    def _run(self, args, stdin=None, timeout=180):
        done = subprocess.run(["kcat", "-b", self.bootstrap, *args], input=stdin, capture_output=True, timeout=timeout)
        check(done.returncode == 0, f"kcat {' '.join(args)} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
        return done.stdout

    def brokers(self):
        md = json.loads(self._run(["-L", "-J"]))
        return [(b["id"], *b["name"].rsplit(":", 1)) for b in md["brokers"]]

    def topics(self):
        md = json.loads(self._run(["-L", "-J"]))
        return {t["topic"]: len(t["partitions"]) for t in md["topics"]}

    def create(self, topic, partitions):
        self.admin.create(topic, partitions)

    def delete(self, topic):
        self.admin.delete(topic)

    def produce(self, topic, codec, records, idempotent=False, on_progress=None):
        lines = b"".join(key + b"\t" + value + b"\n" for key, value, _, _ in records)
        args = ["-P", "-t", topic, "-K", "\t", "-z", codec, "-X", "partitioner=murmur2_random", "-H", "idx=kcat", "-H", f"codec={codec}"]
        args += ["-X", "acks=all", "-X", "linger.ms=5"]
        if idempotent:
            args += ["-X", "enable.idempotence=true", "-X", "message.timeout.ms=60000"]
        start = int(time.time() * 1000)
        if on_progress is None:
            self._run(args, stdin=lines)
        else:
            # Paced: written to kcat's stdin a thousand lines at a time.
            proc = subprocess.Popen(["kcat", "-b", self.bootstrap, *args], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
            batch = []
            for n, (key, value, _, _) in enumerate(records):
                if n % 1000 == 0:
                    proc.stdin.write(b"".join(batch))
                    proc.stdin.flush()
                    batch = []
                    on_progress(n)
                batch.append(key + b"\t" + value + b"\n")
            proc.stdin.write(b"".join(batch))
            proc.stdin.close()
            err = proc.stderr.read()
            check(proc.wait(timeout=180) == 0, f"kcat producer failed: {err.decode()[-2000:]}")
        self.produced_window[topic] = (start, int(time.time() * 1000))

    def consume(self, topic, partitions, expected):
        out = self._run(["-C", "-t", topic, "-o", "beginning", "-e", "-J", "-q", "-c", str(expected)])
        got = []
        for line in out.splitlines():
            m = json.loads(line)
            headers = m.get("headers") or []
            pairs = [(headers[i], headers[i + 1].encode()) for i in range(0, len(headers), 2)]
            key = m["key"].encode() if m["key"] is not None else None
            value = m["payload"].encode() if m["payload"] is not None else None
            got.append((m["partition"], m["offset"], key, value, pairs, m["ts"]))
        return got

    def offset_for_time(self, topic, partition, ts):
        out = self._run(["-Q", "-t", f"{topic}:{partition}:{ts}"]).decode()
        # "topic [partition] offset N"
        return int(out.split("offset")[-1].split()[0])


CLIENTS = {"confluent": Confluent, "kafka-python": KafkaPython, "kcat": Kcat}


# ---------------------------------------------------------------------------------------------


def verify_records(client, topic, codec, n, got):
    check(len(got) == n, f"{topic}: consumed {len(got)} records, produced {n}")
    by_value = {}
    for part, offset, key, value, headers, ts in got:
        idx = int(value.split(b":")[1])
        check(idx not in by_value, f"{topic}: record {idx} consumed twice")
        by_value[idx] = (part, offset, key, value, headers, ts)
    offsets = {}
    for i in range(n):
        check(i in by_value, f"{topic}: record {i} missing")
        part, offset, key, value, headers, ts = by_value[i]
        ekey, evalue, eheaders, ets = record(codec, i)
        check(key == ekey, f"{topic} record {i}: key {key!r} != {ekey!r}")
        check(value == evalue, f"{topic} record {i}: value differs")
        check(part == kafka_partition(key, PARTITIONS), f"{topic} record {i}: key {key!r} in partition {part}, murmur2 says {kafka_partition(key, PARTITIONS)}")
        if isinstance(client, Kcat):
            check(headers == [("idx", b"kcat"), ("codec", codec.encode())], f"{topic} record {i}: headers {headers}")
            lo, hi = client.produced_window[topic]
            check(lo - 1000 <= ts <= hi + 1000, f"{topic} record {i}: timestamp {ts} outside {lo}..{hi}")
        else:
            check(list(headers) == eheaders, f"{topic} record {i}: headers {headers} != {eheaders}")
            check(ts == ets, f"{topic} record {i}: timestamp {ts} != {ets}")
        offsets.setdefault(part, []).append(offset)
    for part, offs in offsets.items():
        check(sorted(offs) == list(range(len(offs))), f"{topic}-{part}: offsets not 0..{len(offs)} without gaps")


def check_timestamps(client, topic, got):
    by_part = {}
    for part, offset, _, _, _, ts in got:
        by_part.setdefault(part, []).append((offset, ts))
    for part, entries in sorted(by_part.items()):
        entries.sort()
        _, mid_ts = entries[len(entries) // 2]
        want = min(o for o, t in entries if t >= mid_ts)
        found = client.offset_for_time(topic, part, mid_ts)
        check(found == want, f"{topic}-{part}: offset for time {mid_ts} is {found}, expected {want}")
        late = client.offset_for_time(topic, part, max(t for _, t in entries) + 60_000)
        check(late in (-1, len(entries)), f"{topic}-{part}: offset after the last timestamp is {late}")
    passed(f"{client.name}: ListOffsets by timestamp on {len(by_part)} partitions")


def check_idempotence(client, proxy, n):
    topic = f"{args.client}-idempotent"
    client.create(topic, 3)
    records = [(f"id-{i % 101}".encode(), f"idem:{i}:x".encode(), [("idx", str(i).encode())], BASE_TS + i) for i in range(n)]
    stop = threading.Event()

    def dropper():
        # While the producer runs (paced to take about three seconds): five times, lose the
        # broker's next response and close that connection (the request was executed, the
        # client retries it: a duplicate the broker must recognise), and twice drop every
        # connection at once.
        for i in range(7):
            if stop.wait(0.4):
                return
            if i in (2, 5):
                proxy.drop()
            else:
                proxy.lose_next_response()

    started = threading.Event()
    thread = threading.Thread(target=lambda: (started.wait(), dropper()), daemon=True)
    if isinstance(client, Kcat):
        # kcat exits when every broker connection is down at once ("All broker connections are
        # down: terminating"), so it produces idempotently without drops; librdkafka's retries
        # across drops are checked through confluent-kafka.
        print("note: kcat: idempotent produce checked without connection drops (kcat exits when all brokers are down)", flush=True)
    else:
        thread.start()
    drops_before, lost_before = proxy.drops, proxy.lost

    def pace(sent):
        started.set()
        time.sleep(3.0 * 1000 / n)  # called every 1000 records

    client.produce(topic, "lz4", records, idempotent=True, on_progress=pace)
    stop.set()
    if thread.is_alive():
        thread.join()
    drops = proxy.drops - drops_before + proxy.lost - lost_before
    got = client.consume(topic, 3, n)
    seen = {}
    for part, offset, key, value, _, _ in got:
        idx = int(value.split(b":")[1])
        check(idx not in seen, f"{topic}: record {idx} written twice (offsets {seen.get(idx)} and {offset})")
        seen[idx] = offset
    missing = [i for i in range(n) if i not in seen]
    check(not missing, f"{topic}: {len(missing)} records lost, first {missing[:5]}")
    passed(f"{client.name}: idempotent producer, {n} records, {drops} connection drops ({proxy.lost - lost_before} with a lost response), no loss, no duplicate")
    client.delete(topic)


def main():
    global args
    parser = argparse.ArgumentParser()
    parser.add_argument("client", choices=sorted(CLIENTS))
    parser.add_argument("--broker", required=True, help="the broker's Kafka listener")
    parser.add_argument("--proxy-port", type=int, required=True, help="the port the broker advertises")
    parser.add_argument("--records", type=int, default=int(os.environ.get("CAIRN_KAFKA_RECORDS", "100000")))
    parser.add_argument("--idempotent-records", type=int, default=20000)
    args = parser.parse_args()
    proxy = Proxy(args.proxy_port, args.broker)
    bootstrap = f"127.0.0.1:{args.proxy_port}"
    client = CLIENTS[args.client](bootstrap)
    started = time.time()

    brokers = client.brokers()
    check([(int(b[0]), b[1], int(b[2])) for b in brokers] == [(1, "127.0.0.1", args.proxy_port)], f"brokers {brokers}")
    passed(f"{client.name}: metadata lists the broker")

    admin_topic = f"{args.client}-admin"
    client.create(admin_topic, 3)
    check(client.topics().get(admin_topic) == 3, f"{admin_topic} not listed with 3 partitions: {client.topics()}")
    if isinstance(client, Confluent):
        from confluent_kafka.admin import ConfigResource

        configs = {
            name: entry.value
            for f in client.admin.describe_configs([ConfigResource("topic", admin_topic)]).values()
            for name, entry in f.result().items()
        }
        check(configs.get("cleanup.policy") == "delete" and "retention.ms" in configs, f"DescribeConfigs: {configs}")
        passed(f"{client.name}: DescribeConfigs lists {len(configs)} topic configs")
    client.delete(admin_topic)
    deadline = time.time() + 10
    while admin_topic in client.topics() and time.time() < deadline:
        time.sleep(0.1)
    check(admin_topic not in client.topics(), f"{admin_topic} still listed after delete")
    passed(f"{client.name}: create and delete topics" + (" (through confluent-kafka's admin client)" if args.client == "kcat" else ""))

    for codec in CODECS:
        topic = f"{args.client}-{codec}"
        client.create(topic, PARTITIONS)
        t0 = time.time()
        client.produce(topic, codec, [record(codec, i) for i in range(args.records)])
        t1 = time.time()
        got = client.consume(topic, PARTITIONS, args.records)
        t2 = time.time()
        verify_records(client, topic, codec, args.records, got)
        passed(f"{client.name}: {args.records} records with {codec}: produced in {t1 - t0:.1f} s, consumed in {t2 - t1:.1f} s, all fields equal, keys in murmur2 partitions")
        if codec == "none":
            check_timestamps(client, topic, got)
        client.delete(topic)

    check_idempotence(client, proxy, args.idempotent_records)
    passed(f"{client.name}: all checks in {time.time() - started:.1f} s")


if __name__ == "__main__":
    main()
