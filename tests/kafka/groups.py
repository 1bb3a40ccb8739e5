#!/usr/bin/env python3
"""A consumer group of Kafka consumers we did not write against a real Cairn broker (tests/it/kafka.rs).

    groups.py run BOOTSTRAP TOPIC GROUP CLIENTS   # the scenario below; non-zero on a failed check
    groups.py member BOOTSTRAP TOPIC GROUP NAME CLIENT   # one member process (started by `run`)
    groups.py jointime BOOTSTRAP TOPIC GROUP   # a 4th member joining 3 over 12 partitions, librdkafka defaults
    groups.py static BOOTSTRAP TOPIC GROUP   # a static member (group.instance.id) restarted after kill -9

confluent-kafka members use the assignor in CAIRN_GROUP_ASSIGNOR (default range; cooperative-sticky
works too). CLIENTS names the client of members m1..m4, comma-separated: confluent or kafka-python (a mixed
group is fine: both speak the classic protocol with the standard consumer-protocol encoding).

Scenario: a producer writes keyed records (about 1,000 a second) to a 12-partition topic while
three member processes subscribe (range assignor, session timeout 6 s); each prints, as JSON lines with a timestamp, every assignment and
revocation and every record it processed, committing after processing. Checks: no partition is
owned by two members at overlapping times; after `kill -9` of one member its partitions move to
the others within the session timeout plus a margin; every record is processed at least once
(commits after processing: none skipped). Then a fourth member joins and the time until every
member has its new assignment is printed.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

PARTITIONS = 12


def member(bootstrap, topic, group, name, client):
    def say(**kv):
        print(json.dumps({"name": name, "t": time.time(), **kv}), flush=True)

    if client == "kafka-python":
        return kafka_python_member(bootstrap, topic, group, say)
    from confluent_kafka import Consumer

    config = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
    }
    if os.environ.get("CAIRN_GROUP_STATIC"):
        # Static membership (KIP-345): the member's name is its instance id.
        config["group.instance.id"] = name
    if not os.environ.get("CAIRN_GROUP_DEFAULTS"):
        config.update({
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            "partition.assignment.strategy": os.environ.get("CAIRN_GROUP_ASSIGNOR", "range"),
        })
    c = Consumer(config)

    def on_assign(consumer, partitions):
        say(assigned=sorted(p.partition for p in partitions))

    def on_revoke(consumer, partitions):
        try:
            consumer.commit(asynchronous=False)
        except Exception:
            pass
        say(revoked=sorted(p.partition for p in partitions))

    say(joining=True)
    c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
    processed = 0
    while True:
        for m in c.consume(100, 0.2):
            if m.error():
                continue
            say(p=m.partition(), o=m.offset())
            processed += 1
        if processed:
            try:
                c.commit(asynchronous=False)
            except Exception:
                pass
            processed = 0


def kafka_python_member(bootstrap, topic, group, say):
    from kafka import ConsumerRebalanceListener, KafkaConsumer
    from kafka.coordinator.assignors.range import RangePartitionAssignor

    c = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=500,
        partition_assignment_strategy=[RangePartitionAssignor],
    )

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked):
            try:
                c.commit()
            except Exception:
                pass
            say(revoked=sorted(tp.partition for tp in revoked))

        def on_partitions_assigned(self, assigned):
            say(assigned=sorted(tp.partition for tp in assigned))

    c.subscribe([topic], listener=Listener())
    while True:
        batch = c.poll(timeout_ms=200, max_records=100)
        processed = 0
        for records in batch.values():
            for m in records:
                say(p=m.partition, o=m.offset)
                processed += 1
        if processed:
            try:
                c.commit()
            except Exception:
                pass


class Members:
    """Member processes of one group and what they printed (ownership, records, assignment times)."""

    def __init__(self, bootstrap, topic, group, clients):
        self.bootstrap, self.topic, self.group = bootstrap, topic, group
        self.kinds = dict(zip(("m1", "m2", "m3", "m4"), clients.split(",")))
        self.lock = threading.Lock()
        # partition -> (member, since), in the order the readers see events (for waiting only:
        # the readers of different members run independently)
        self.owned = {}
        self.events = []  # (time, partition, member, "assigned" | "revoked"), by the members' clocks
        self.seen = set()
        self.assigned_at = {}  # member -> time of its latest assignment
        self.joining_at = {}  # member -> when it subscribed
        self.procs = {}

    def watch(self, proc, name):
        for line in proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                if "assigned" in ev:
                    self.assigned_at[name] = ev["t"]
                    for part in ev["assigned"]:
                        self.events.append((ev["t"], part, name, "assigned"))
                        self.owned[part] = (name, ev["t"])
                elif "revoked" in ev:
                    for part in ev["revoked"]:
                        self.events.append((ev["t"], part, name, "revoked"))
                        if self.owned.get(part, ("",))[0] == name:
                            del self.owned[part]
                elif "joining" in ev:
                    self.joining_at[name] = ev["t"]
                elif "p" in ev:
                    self.seen.add((ev["p"], ev["o"]))

    def start(self, name):
        proc = subprocess.Popen(
            [sys.executable, __file__, "member", self.bootstrap, self.topic, self.group, name, self.kinds[name]],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs[name] = proc
        threading.Thread(target=self.watch, args=(proc, name), daemon=True).start()

    def wait_for(self, cond, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                if cond():
                    return
            time.sleep(0.01)
        with self.lock:
            raise SystemExit(f"FAIL: {what} (owned {self.owned}, seen {len(self.seen)})")

    def killed(self, name, t):
        """`name` died at `t` (SIGKILL: it cannot print its revocations)."""
        with self.lock:
            for part in range(PARTITIONS):
                self.events.append((t, part, name, "revoked"))
                if self.owned.get(part, ("",))[0] == name:
                    del self.owned[part]

    def overlaps(self):
        """Partitions assigned to a member while another owned them, replaying every member's
        events in time order (the readers see them in no particular order across members)."""
        with self.lock:
            events = sorted(self.events)
        owner, found = {}, []
        for t, part, name, kind in events:
            if kind == "assigned":
                if owner.get(part, name) != name:
                    found.append(f"partition {part} assigned to {name} at {t:.3f} while {owner[part]} owned it")
                owner[part] = name
            elif owner.get(part) == name:
                del owner[part]
        return found

    def owners(self):
        counts = {}
        for name, _ in self.owned.values():
            counts[name] = counts.get(name, 0) + 1
        return counts

    def kill_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


class SteadyProducer:
    """Keyed records at a steady pace (about 1,000 a second) on a thread, until stopped; `stop`
    returns the acknowledged (partition, offset) pairs."""

    def __init__(self, bootstrap, topic):
        from confluent_kafka import Producer

        self.stop_flag = threading.Event()
        self.acked = set()
        self.producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})

        def delivered(err, msg):
            if err is None:
                self.acked.add((msg.partition(), msg.offset()))

        def produce():
            i = 0
            while not self.stop_flag.is_set():
                for _ in range(50):
                    self.producer.produce(topic, key=f"k{i}", value=f"v{i}", on_delivery=delivered)
                    i += 1
                self.producer.poll(0)
                time.sleep(0.05)

        self.thread = threading.Thread(target=produce, daemon=True)
        self.thread.start()

    def stop(self):
        self.stop_flag.set()
        self.thread.join(30)
        assert self.producer.flush(30) == 0
        return self.acked


def jointime(bootstrap, topic, group):
    """A fourth member joins a healthy group of three over 12 partitions, with a producer running
    and librdkafka's default session, heartbeat and assignor settings: prints the time from its
    subscribe to every member's final assignment (the same measure as Cairn's tests/it/groups.rs)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=12, replication_factor=1)]).values():
        f.result()
    producer = SteadyProducer(bootstrap, topic)
    os.environ["CAIRN_GROUP_DEFAULTS"] = "1"
    g = Members(bootstrap, topic, group, "confluent,confluent,confluent,confluent")
    try:
        for name in ("m1", "m2", "m3"):
            g.start(name)
        g.wait_for(lambda: len(g.owned) == 12 and len(g.owners()) == 3, 60, "three members sharing 12 partitions")
        g.wait_for(lambda: len(g.seen) > 500, 60, "records flowing")
        g.start("m4")
        g.wait_for(lambda: len(g.owners()) == 4 and all(n == 3 for n in g.owners().values()), 60,
                   "four members with three partitions each")
        with g.lock:
            took = max(g.assigned_at[m] for m in ("m1", "m2", "m3", "m4")) - g.joining_at["m4"]
        print(f"ok: confluent-kafka (librdkafka defaults): a fourth member joined a group of three over 12 "
              f"partitions in {took:.3f} s (from its subscribe to every member's final assignment)", flush=True)
    finally:
        producer.stop()
        g.kill_all()


def static(bootstrap, topic, group):
    """Static members (confluent-kafka, `group.instance.id`): each in turn (the leader among them)
    is killed with SIGKILL and restarted within its session timeout; it gets its partitions back
    and the others are not disturbed (no revocation, no assignment)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]).values():
        f.result()
    os.environ["CAIRN_GROUP_STATIC"] = "1"
    producer = SteadyProducer(bootstrap, topic)
    g = Members(bootstrap, topic, group, "confluent,confluent,confluent")
    try:
        for name in ("m1", "m2", "m3"):
            g.start(name)
        g.wait_for(lambda: len(g.owned) == PARTITIONS and len(g.owners()) == 3, 60, "three static members")
        g.wait_for(lambda: len(g.seen) > 300, 60, "records flowing")
        # Every member in turn (so the leader too): killed, restarted, given its partitions back.
        for victim in ("m1", "m2", "m3"):
            with g.lock:
                before = sorted(p for p, (m, _) in g.owned.items() if m == victim)
            g.procs[victim].send_signal(signal.SIGKILL)
            g.procs[victim].wait()
            killed = time.time()
            g.killed(victim, killed)
            g.start(victim)
            g.wait_for(lambda: all(g.owned.get(p, ("",))[0] == victim for p in before), 30,
                       f"the restarted static member {victim} getting its partitions back")
            took = time.time() - killed
            time.sleep(1)
            with g.lock:
                others = [e for e in g.events if e[0] >= killed and e[2] != victim]
                after = sorted(p for p, (m, _) in g.owned.items() if m == victim)
            assert after == before, (victim, before, after)
            assert not others, f"the other members were disturbed when {victim} restarted: {others}"
            print(f"ok: static member {victim} killed with SIGKILL and restarted got its partitions {before} "
                  f"back {took:.2f} s after the kill; the other members saw no rebalance", flush=True)
        acked = producer.stop()
        g.wait_for(lambda: acked <= g.seen, 60, "every acknowledged record processed")
        print(f"ok: all {len(acked)} records processed", flush=True)
        overlaps = g.overlaps()
        assert not overlaps, overlaps[:3]
    finally:
        producer.stop()
        g.kill_all()


def run(bootstrap, topic, group, clients):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(topic, num_partitions=PARTITIONS, replication_factor=1)]).values():
        f.result()
    # A producer runs while the group forms, loses a member and takes one in.
    producer = SteadyProducer(bootstrap, topic)

    g = Members(bootstrap, topic, group, clients)
    lock, owned, seen, assigned_at, procs = g.lock, g.owned, g.seen, g.assigned_at, g.procs
    start, wait_for = g.start, g.wait_for

    try:
        for name in ("m1", "m2", "m3"):
            start(name)
        wait_for(lambda: len(owned) == PARTITIONS and len({m for m, _ in owned.values()}) == 3,
                 60, "three members sharing the partitions")
        print(f"ok: three members own {dict((k, v[0]) for k, v in sorted(owned.items()))}", flush=True)
        wait_for(lambda: len(seen) >= 500, 60, "records flowing")
        # kill -9 one member: its partitions move once its session expires.
        victim = "m2"
        with lock:
            victim_parts = [p for p, (m, _) in owned.items() if m == victim]
        killed = time.time()
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        g.killed(victim, killed)
        wait_for(lambda: all(part in owned and owned[part][0] != victim for part in victim_parts),
                 20, f"{victim}'s partitions {victim_parts} moving to the others")
        moved = max(owned[p][1] for p in victim_parts) - killed
        print(f"ok: after kill -9 of {victim}, its partitions moved in {moved:.2f} s (session timeout 6 s)", flush=True)
        assert moved < 15, moved
        time.sleep(1)
        acked = producer.stop()
        wait_for(lambda: acked <= seen, 60, "every acknowledged record processed")
        print(f"ok: all {len(acked)} records produced during the run processed at least once", flush=True)
        # A fourth member joins: time until every live member has its new assignment.
        joined = time.time()
        start("m4")
        wait_for(lambda: all(assigned_at.get(m, 0) >= joined for m in ("m1", "m3", "m4")), 30,
                 "a fourth member joining")
        with lock:
            done = max(assigned_at[m] for m in ("m1", "m3", "m4"))
        print(f"ok: a member joining a group of two took {done - joined:.2f} s until every member had its assignment", flush=True)
        # The group as an admin sees it (ListGroups, DescribeGroups).
        from confluent_kafka import ConsumerGroupState
        listed = admin.list_consumer_groups().result()
        assert group in [g.group_id for g in listed.valid], listed.valid
        # Cooperative assignors rebalance a second time after the revocation: wait for Stable.
        deadline = time.time() + 15
        while True:
            described = admin.describe_consumer_groups([group])[group].result()
            parts = sorted(tp.partition for m in described.members for tp in m.assignment.topic_partitions)
            if described.state == ConsumerGroupState.STABLE and parts == list(range(PARTITIONS)):
                break
            assert time.time() < deadline, (described.state, parts)
            time.sleep(0.2)
        assert len(described.members) == 3, described.members
        print(f"ok: DescribeGroups: {described.state}, 3 members, assignor {described.partition_assignor}, partitions {parts}", flush=True)
        overlaps = g.overlaps()
        if overlaps:
            raise SystemExit(f"FAIL: {overlaps[:3]}")
        print("ok: no partition was owned by two members at once", flush=True)
    finally:
        producer.stop()
        g.kill_all()


if __name__ == "__main__":
    if sys.argv[1] == "member":
        member(*sys.argv[2:7])
    elif sys.argv[1] == "jointime":
        jointime(*sys.argv[2:5])
    elif sys.argv[1] == "static":
        static(*sys.argv[2:5])
    else:
        run(*sys.argv[2:6])
