#!/usr/bin/env python3
"""Sluice on a real Redis Cluster of 3 masters and 3 replicas (started here, loopback only).

Usage: cluster_test.py path/to/sluice
Checks slot routing (every client's keys live on the master that owns their hash tag's
slot, and limits are exact across the three shards; an Envoy descriptor's several limits
in one slot), and a master killed under load: the
failover is followed, clients only ever see 200 or 429, keys of the other shards stay on
Redis throughout (a circuit breaker per node), and decisions go back to the
cluster once the replica is promoted. Store mode local_sync on the cluster (after the
failover, with the dead master still among the seeds): each window's count goes to the
master of its slot, and a second node counts the first node's hits. A slot migration:
a healthy master's breaker stays closed, and a request whose keys it splits (TRYAGAIN)
is tried again until the migration completes and decided on Redis with its count kept;
slots resharded by redis-cli under load: every request decided on Redis, counted once.
"""
import contextlib
import datetime
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import redis_test  # noqa: E402
import server_test  # noqa: E402
from redis_fixture import (REDIS_CLI, RedisCluster, RedisServer, RespClient,  # noqa: E402
                           RespError,
                           free_port, key_slot, parse_info)

CONFIG = """
store:
  type: redis-cluster
  addresses: [{seed}]
  # Generous: these tests count degraded answers of healthy shards, and a killed master
  # fails its calls at once (a reset), not by the timeout.
  timeout: 1s
  circuit_breaker:
    failures: 3
    open_for: 200ms
rate_limits:
  default:
    limit: 3
    window: WINDOW
    algorithm: fixed_window
""".replace("WINDOW", redis_test.far_window())  # no window edge while the tests count


def logged_at(line):
    """The Unix time a log line ("2026-11-28T01:02:03.456Z WARN ...") was written."""
    when = datetime.datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%S.%fZ")
    return when.replace(tzinfo=datetime.timezone.utc).timestamp()


class Client:
    """A keep-alive HTTP client for /v1/check."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)

    def check(self, ip):
        self.conn.request("POST", "/v1/check", json.dumps({"path": "/x", "ip": ip}))
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())

    def check_path(self, path, client):
        """A check keyed by the X-Client header, as redis_test.Sluice.check states it."""
        self.conn.request("POST", "/v1/check", json.dumps(
            {"path": path, "method": "GET", "headers": {"X-Client": client}}))
        r = self.conn.getresponse()
        return r.status, json.loads(r.read())

    def close(self):
        self.conn.close()


class ClusterTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # As recommended for Sluice: a shard that lost its master does not stop the others.
        cls.cluster = RedisCluster(masters=3, replicas_per_master=1,
                                   require_full_coverage=False)
        cls.dir = tempfile.TemporaryDirectory()
        cls.config = os.path.join(cls.dir.name, "cluster.yaml")
        with open(cls.config, "w") as f:
            # Every node as a seed: any one that answers gives the whole topology.
            f.write(CONFIG.format(seed=", ".join(cls.cluster.addresses)))

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()
        cls.dir.cleanup()

    def setUp(self):
        self.server = server_test.Server(self.config)

    def tearDown(self):
        self.assertEqual(self.server.stop(), 0, self.server.stderr)

    def log_tail(self):
        """Stops Sluice and returns the end of its log (why a decision degraded)."""
        self.server.stop()
        return self.server.stderr[-4000:]

    def test_1_keys_are_routed_to_their_slots_master_and_limits_are_exact(self):
        client = Client(self.server.port)
        masters_used = set()
        for i in range(60):
            ip = f"10.20.{i // 200}.{i % 200}"
            answers = [client.check(ip) for _ in range(4)]
            self.assertEqual([s for s, _ in answers], [200, 200, 200, 429], ip)
            self.assertEqual([b["remaining"] for _, b in answers], [2, 1, 0, 0], ip)
            for _, body in answers:
                self.assertNotIn("degraded", body)
            tag = f"ip={ip}"
            master = self.cluster.master_for("{" + tag + "}")
            masters_used.add(master)
            with RespClient(master) as r:
                keys = r.call("KEYS", "sluice:{" + tag + "}:*")
                self.assertEqual(len(keys), 1, (ip, master))
                self.assertGreater(r.call("PTTL", keys[0]), 0)
                self.assertEqual(key_slot(keys[0]), key_slot("{" + tag + "}"))
        client.close()
        self.assertEqual(len(masters_used), 3, "60 clients should land on every shard")
        # The admin calls find each key on its own shard: read it, forget it, start afresh.
        for i in range(6):
            ip = f"10.20.0.{i}"
            query = f"/v1/keys?limit={answers[0][1]['limit_name']}&key=ip%3D{ip}"
            status, _, body = self.server.request("GET", query, admin=True)
            self.assertEqual((status, json.loads(body)["remaining"]), (200, 0), body)
            status, _, body = self.server.request("DELETE", query, admin=True)
            self.assertEqual((status, json.loads(body)), (200, {"deleted": True}), body)
            with RespClient(self.cluster.master_for("{ip=" + ip + "}")) as r:
                self.assertEqual(r.call("KEYS", "sluice:{ip=" + ip + "}:*"), [])
            fresh = Client(self.server.port)
            status, body = fresh.check(ip)
            fresh.close()
            self.assertEqual((status, body["remaining"]), (200, 2), body)

    def test_1b_an_envoy_descriptors_limits_share_one_slot(self):
        # Envoy RLS on the cluster: the limits of one descriptor (a rate_limits list) are
        # decided by one script, so their keys must share a hash tag; keys in two slots
        # would be refused (CROSSSLOT) and nothing counted.
        envoy_dir = os.path.join(self.dir.name, "envoy")
        os.makedirs(envoy_dir, exist_ok=True)
        with open(os.path.join(envoy_dir, "d.yaml"), "w") as f:
            f.write("domain: d\ndescriptors:\n  - key: account\n    rate_limits:\n"
                    "      - {unit: hour, requests_per_unit: 10}\n"
                    "      - {unit: day, requests_per_unit: 3}\n")
        self.server.stop()
        self.server = server_test.Server(self.config, extra=[
            "--envoy-config", envoy_dir, "--grpc", f"127.0.0.1:{free_port()}"])
        day = 86400
        if day - time.time() % day < 60:  # no day's end while counting
            time.sleep(day - time.time() % day + 0.1)
        masters_used = set()
        for i in range(12):
            account = f"acct{i}"
            call = json.dumps({"domain": "d", "descriptors": [
                {"entries": [{"key": "account", "value": account}]}]})
            answers = []
            for _ in range(4):
                status, _, body = self.server.request("POST", "/v1/envoy/ratelimit", call)
                self.assertEqual(status, 200, body)
                r = json.loads(body)
                answers.append((r["overallCode"], r["statuses"][0].get("limitRemaining", 0)))
            self.assertEqual(answers, [("OK", 2), ("OK", 1), ("OK", 0), ("OVER_LIMIT", 0)],
                             account)
            tag = "{d|account=" + account + "}"
            master = self.cluster.master_for(tag)
            masters_used.add(master)
            with RespClient(master) as r:
                self.assertEqual(len(r.call("KEYS", "sluice:" + tag + ":*")), 2, account)
        self.assertEqual(len(masters_used), 3, "12 accounts should land on every shard")
        self.assertEqual(self.server.request("GET", "/readyz", admin=True)[0], 200)
        self.assertNotIn("CROSSSLOT", self.log_tail())

    def test_2_a_master_killed_under_load_is_followed_to_its_promoted_replica(self):
        stop = threading.Event()
        statuses, errors = {}, []
        healthy_shard_degraded = [0, 0]  # [degraded, all] answers for keys of other masters
        lock = threading.Lock()
        victim, _, victim_slots = self.cluster.masters()[0]

        def on_victim(ip):
            slot = key_slot("{ip=" + ip + "}")
            return any(a <= slot <= b for a, b in victim_slots)

        def load(worker):
            client, i = Client(self.server.port), 0
            while not stop.is_set():
                i += 1
                ip = f"10.30.{worker}.{i % 250}"
                try:
                    status, body = client.check(ip)
                except Exception as e:  # any transport error is a failure of the test
                    errors.append(repr(e))
                    client.close()
                    client = Client(self.server.port)
                    continue
                with lock:
                    key = (status, body.get("degraded"))
                    statuses[key] = statuses.get(key, 0) + 1
                    if not on_victim(ip):
                        healthy_shard_degraded[0] += "degraded" in body
                        healthy_shard_degraded[1] += 1
            client.close()

        threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            promoted = self.cluster.kill_master(0)
            time.sleep(1.5)  # the slot map refreshes and the breaker closes again
        finally:
            stop.set()
            for t in threads:
                t.join()
        self.assertEqual(errors, [])
        self.assertTrue(set(s for s, _ in statuses) <= {200, 429}, statuses)
        self.assertIsNone(self.server.proc.poll(), "sluice must survive the failover")
        # Each node has its own circuit breaker: the dead master's keys degrade, the other
        # two shards' keys stay on Redis all along.
        self.assertGreater(healthy_shard_degraded[1], 100)
        if healthy_shard_degraded[0]:
            self.fail(f"{healthy_shard_degraded[0]} answers for healthy shards degraded "
                      f"({statuses}); sluice's log:\n{self.log_tail()}")
        # Decisions are back on the cluster within a bounded time (10 fresh clients in a
        # row, spread over the shards, decided on Redis)...
        client = Client(self.server.port)
        deadline, streak, n = time.monotonic() + 5, 0, 0
        while streak < 10:
            self.assertLess(time.monotonic(), deadline, "decisions not back on the cluster")
            n += 1
            _, body = client.check(f"10.50.{n // 200}.{n % 200}")
            streak = streak + 1 if "degraded" not in body else 0
            if streak == 0:
                time.sleep(0.05)
        # ...and then every client is, including those whose slots moved.
        moved = 0
        for i in range(60):
            ip = f"10.40.{i // 200}.{i % 200}"
            status, body = client.check(ip)
            self.assertEqual(status, 200)
            if "degraded" in body:
                self.fail(f"{ip} degraded after the failover: {body}; sluice's log:\n"
                          f"{self.log_tail()}")
            if self.cluster.master_for("{ip=" + ip + "}") == promoted:
                moved += 1
                with RespClient(promoted) as r:
                    self.assertEqual(len(r.call("KEYS", "sluice:{ip=" + ip + "}:*")), 1)
        client.close()
        self.assertGreater(moved, 0, "some clients live on the promoted replica's slots")
        # The dead master serves no slot now: /readyz, polled as often as a load balancer
        # does, is ok once the slot maps leave it out (at once here: the calls above took
        # the new map), not once its breaker is forgotten (10 s after it was last needed)...
        deadline = time.monotonic() + 5
        while True:
            body = json.loads(self.server.request("GET", "/readyz", admin=True)[2])
            if not body["degraded"]:
                break
            self.assertLess(time.monotonic(), deadline, f"/readyz stays degraded: {body}")
            time.sleep(0.5)
        ok_at = time.time()
        time.sleep(2.5)
        # ...and the dead master is no longer redialed (a warning a second, for good).
        self.server.stop()
        late = [line for line in self.server.stderr.splitlines()
                if victim in line and "reconnecting" in line and
                logged_at(line) > ok_at + 1]
        self.assertEqual(late, [], "still redialing the dead master")


    def test_3_local_sync_counts_go_to_each_slots_master(self):
        text = json.dumps({
            "rate_limits": {
                "default": {"requests_per_minute": 100000},
                "endpoints": [{"name": "api", "path": "/api/*", "limit": 10,
                               "window": redis_test.far_window(),
                               "algorithm": "fixed_window", "key": "header:X-Client"}],
            },
            "store": {"type": "redis-cluster", "addresses": self.cluster.addresses,
                      "mode": "local_sync", "sync_interval": "50ms"},
        })
        a, b = redis_test.Sluice(text), redis_test.Sluice(text)
        self.addCleanup(b.stop)
        self.addCleanup(a.stop)
        clients = [f"sync{i}" for i in range(24)]

        def held(client):  # the hits the cluster holds for a client: its slot's master
            tag = "{header:x-client=" + client + "}"
            with RespClient(self.cluster.master_for(tag)) as r:
                keys = r.call("KEYS", "sluice:" + tag + ":*")
                return sum(int(v) for k in keys for v in r.call("HVALS", k))

        for c in clients:
            self.assertEqual([a.check("/api/x", c)[0] for _ in range(6)], [200] * 6, c)
            b.check("/api/x", c, cost=0)  # b meets the key: its syncs fetch the total
        redis_test.wait_for(lambda: all(held(c) == 6 for c in clients), 10,
                            "every client's 6 hits on its slot's master")
        masters = {self.cluster.master_for("{header:x-client=" + c + "}") for c in clients}
        self.assertEqual(len(masters), 3, "24 clients should land on every shard")
        redis_test.wait_for(
            lambda: all(b.check("/api/x", c, cost=0)[2]["remaining"] == 4 for c in clients), 10,
            "b counting a's hits")
        for c in clients:
            self.assertEqual([b.check("/api/x", c)[0] for _ in range(5)], [200] * 4 + [429], c)
        redis_test.wait_for(lambda: all(held(c) == 10 for c in clients), 10,
                            "b's hits on the cluster too")
        self.assertFalse(a.readyz()["degraded"])
        self.assertEqual(a.stop(), 0, a.log())
        self.assertEqual(b.stop(), 0, b.log())

    def test_4_a_slot_migration_does_not_trip_a_healthy_masters_breaker(self):
        # During a migration, a request whose keys are split between the two nodes (or not
        # there yet) gets TRYAGAIN: that request takes its fail mode, but the node is
        # healthy, so the other keys it serves stay on Redis.
        text = json.dumps({
            "rate_limits": {
                "default": {"requests_per_minute": 100000, "key": "header:X-Client"},
                "endpoints": [
                    {"name": "two", "path": "/two", "key": "header:X-Client",
                     "fail_mode": "closed",
                     "limits": [{"limit": 1000, "window": "1h"}, {"limit": 1000, "window": "1m"}]},
                    {"name": "one", "path": "/one", "key": "header:X-Client", "limit": 1000,
                     "window": "1h"}],
            },
            # The live nodes only: /readyz is read below, and would name the master test_2
            # killed while its connection is recent.
            "store": {"type": "redis-cluster",
                      "addresses": [n.address for n in self.cluster.live_nodes()],
                      "timeout": "100ms", "circuit_breaker": {"failures": 3, "open_for": "5s"}},
        })
        s = redis_test.Sluice(text)
        self.addCleanup(s.stop)

        def tag(client):
            return "sluice:{header:x-client=" + client + "}:x"

        mover = "mover"
        slot, src = key_slot(tag(mover)), self.cluster.master_for(tag(mover))
        dst = next(a for a, _, _ in self.cluster.masters() if a != src)
        bystander = next(c for c in (f"by{i}" for i in range(1000))
                         if self.cluster.master_for(tag(c)) == dst)
        ids = {n.address: n.id for n in self.cluster.cluster_nodes()}
        redis_test.wait_for(lambda: "degraded" not in s.check("/one", bystander)[2], 10,
                            "the bystander decided on Redis")

        def restore():  # the slot back to its owner, on every master
            for address, _, _ in self.cluster.masters():
                with RespClient(address) as r:
                    r.call("CLUSTER", "SETSLOT", slot, "NODE", ids[src])
        self.addCleanup(restore)
        with RespClient(dst) as r:
            r.call("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        with RespClient(src) as r:
            r.call("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
        for _ in range(2):
            for _ in range(6):  # twice the breaker's failures in a row
                status, _, body = s.check("/two", mover)
                self.assertEqual((status, body.get("degraded")), (429, "closed"), body)
            status, _, body = s.check("/one", bystander)
            self.assertEqual((status, "degraded" in body), (200, False), body)
        self.assertIn("TRYAGAIN", s.log())
        self.assertNotIn(f"redis {dst}: circuit breaker open", s.log())
        # Every node is up, but some keys took their fail mode: /readyz says so.
        ready = s.readyz()
        self.assertTrue(ready["degraded"], ready)
        self.assertIn(f"{dst}: answered TRYAGAIN", ready["store_state"])
        # A new client of the slot is asked to the importing node. With its script cache
        # empty (a new or restarted node), the EVAL that follows NOSCRIPT goes there with
        # ASKING too, or the node would answer MOVED back to the source.
        newcomer = next(c for c in (f"new{i}" for i in range(10**6))
                        if key_slot(tag(c)) == slot)

        def moved_errors():
            with RespClient(dst) as r:
                stats = parse_info(r.call("INFO", "errorstats"))
            return int(stats.get("errorstat_MOVED", "count=0").split(",")[0].split("=")[1])

        with RespClient(dst) as r:
            r.call("SCRIPT", "FLUSH")
        before = moved_errors()
        status, _, body = s.check("/one", newcomer)
        self.assertEqual((status, "degraded" in body), (200, False), body)
        self.assertEqual(moved_errors(), before, "the importing node answered MOVED")
        restore()
        status, _, body = s.check("/two", mover)
        self.assertEqual((status, "degraded" in body), (200, False), body)
        self.assertEqual(s.stop(), 0, s.log())

    def test_4b_a_request_split_by_a_migration_is_tried_again_until_it_completes(self):
        # Redis answers TRYAGAIN while a migration has moved some of a request's keys and
        # not the rest; the cluster spec asks the client to try again. Within its deadline
        # the request waits out the migration and is decided on Redis, its count kept.
        window = redis_test.far_window()  # no window edge while the test counts
        text = json.dumps({
            "rate_limits": {
                "default": {"requests_per_minute": 100000, "key": "header:X-Client"},
                "endpoints": [
                    {"name": "two", "path": "/two", "key": "header:X-Client",
                     "fail_mode": "closed", "algorithm": "fixed_window",
                     "limits": [{"limit": 1000, "window": window},
                                {"limit": 900, "window": window}]}],
            },
            "store": {"type": "redis-cluster",
                      "addresses": [n.address for n in self.cluster.live_nodes()],
                      "timeout": "3s", "circuit_breaker": {"failures": 3, "open_for": "5s"}},
        })
        s = redis_test.Sluice(text)
        self.addCleanup(s.stop)

        def tag(client):
            return "sluice:{header:x-client=" + client + "}:x"

        def keys_in(address, slot):
            with RespClient(address) as r:
                return r.call("CLUSTER", "GETKEYSINSLOT", slot, 10)

        # A client alone in its slot: its two keys are the slot's only keys.
        masters = [a for a, _, _ in self.cluster.masters()]
        mover = next(c for c in (f"split{i}" for i in range(10**6))
                     if not any(keys_in(a, key_slot(tag(c))) for a in masters))
        slot, src = key_slot(tag(mover)), self.cluster.master_for(tag(mover))
        dst = next(a for a in masters if a != src)
        ids = {n.address: n.id for n in self.cluster.cluster_nodes()}
        status, _, body = s.check("/two", mover)
        self.assertEqual((status, body["remaining"], "degraded" in body), (200, 899, False), body)
        keys = sorted(keys_in(src, slot))
        self.assertEqual(len(keys), 2, keys)

        def migrate(key):
            host, port = dst.rsplit(":", 1)
            with RespClient(src) as r:
                r.call("MIGRATE", host, port, "", 0, 5000, "KEYS", key)

        with RespClient(dst) as r:
            r.call("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
        with RespClient(src) as r:
            r.call("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
        migrate(keys[0])  # the request's keys are split now

        def complete():  # the rest of the slot moves, and the slot with it
            migrate(keys[1])
            for address in [dst, src] + [a for a in masters if a not in (src, dst)]:
                with RespClient(address) as r:
                    r.call("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])

        def whole_again():  # however the test ends (once complete, src answers MOVED)
            with contextlib.suppress(RespError):
                complete()
        self.addCleanup(whole_again)

        def finish():
            time.sleep(0.4)
            complete()
        mover_thread = threading.Thread(target=finish)
        started = time.monotonic()
        mover_thread.start()
        status, _, body = s.check("/two", mover)
        waited = time.monotonic() - started
        mover_thread.join()
        self.assertEqual((status, body["remaining"], "degraded" in body), (200, 898, False), body)
        self.assertGreater(waited, 0.35, "decided before the migration ended")
        self.assertEqual(sorted(keys_in(dst, slot)), keys)
        # /metrics shows the tries after TRYAGAIN. (How the handover is met depends on
        # timing: ASK, MOVED, or a slot map refreshed first.)
        metrics = s.metrics()
        self.assertGreater(metrics["sluice_redis_cluster_tryagain_retries_total"], 0, metrics)
        self.assertEqual(s.stop(), 0, s.log())

    def test_5_a_plain_redis_among_the_seeds_gets_no_keys(self):
        # A seed with cluster support disabled answers script calls like any Redis: were
        # keys sent there, a node listing it first would count apart from every other node.
        plain = RedisServer()
        self.addCleanup(plain.stop)
        config = CONFIG.replace("algorithm: fixed_window",
                                "algorithm: fixed_window\n    key: header:X-Client")
        first = redis_test.Sluice(config.format(
            seed=", ".join([plain.address] + self.cluster.addresses)), threads=1)
        self.addCleanup(first.stop)
        second = redis_test.Sluice(config.format(
            seed=", ".join(self.cluster.addresses + [plain.address])), threads=1)
        self.addCleanup(second.stop)
        # One worker each, so one warm-up call shows its slot map is known (a seed may be
        # the master test_2 killed, which costs the first calls their fail mode).
        for s in (first, second):
            redis_test.wait_for(lambda: "degraded" not in s.check("/x", "warm-up")[2], 10,
                                "decided on Redis")
        answers = [s.check("/x", "plain-seed") for s in (first, second, first, second)]
        self.assertEqual([(status, "degraded" in body) for status, _, body in answers],
                         [(200, False), (200, False), (200, False), (429, False)])
        with RespClient(plain.address) as r:
            self.assertEqual(r.call("KEYS", "*"), [])
        self.assertNotIn(plain.address, json.dumps(first.readyz()))  # never called
        self.assertEqual(first.stop(), 0)
        self.assertIn(f"ERROR redis {plain.address} is not a Redis Cluster node (ERR This "
                      "instance has cluster support disabled): no keys go there; "
                      "store.addresses of a redis-cluster store lists the cluster's nodes",
                      first.log())

    def test_6_a_slot_without_a_master_does_not_trip_its_masters_breaker(self):
        # With require-full-coverage off, a slot no master serves gets "CLUSTERDOWN Hash
        # slot not served": that client takes its fail mode, but a client keying into it
        # over and over must not put every other slot of that master into fail mode.
        text = CONFIG.replace("algorithm: fixed_window", "algorithm: fixed_window\n"
                              "    key: header:X-Client\n    fail_mode: closed").format(
            seed=", ".join(self.cluster.addresses))
        s = redis_test.Sluice(text)
        self.addCleanup(s.stop)

        def tag(client):
            return "{header:x-client=" + client + "}"
        orphan = "orphan"
        slot, owner = key_slot(tag(orphan)), self.cluster.master_for(tag(orphan))
        neighbours = [c for c in (f"n{i}" for i in range(10**4))
                      if self.cluster.master_for(tag(c)) == owner and key_slot(tag(c)) != slot]
        redis_test.wait_for(lambda: "degraded" not in s.check("/x", neighbours[0])[2], 10,
                            "a neighbour decided on Redis")

        def restore():
            with RespClient(owner) as r:
                r.call("CLUSTER", "ADDSLOTS", slot)
        with RespClient(owner) as r:
            r.call("CLUSTER", "DELSLOTS", slot)
        self.addCleanup(restore)
        for neighbour in neighbours[1:4]:
            for _ in range(6):  # twice the breaker's failures in a row
                status, _, body = s.check("/x", orphan)
                self.assertEqual((status, body.get("degraded")), (429, "closed"), body)
            status, _, body = s.check("/x", neighbour)
            self.assertEqual((status, "degraded" in body), (200, False), body)
        self.assertIn("CLUSTERDOWN Hash slot not served", s.log())
        self.assertNotIn(f"redis {owner}: circuit breaker open", s.log())
        self.assertEqual(s.stop(), 0, s.log())


class ClusterChangeTest(unittest.TestCase):
    """A cluster of its own (three masters, no replicas), changed the way operators do."""

    @classmethod
    def setUpClass(cls):
        cls.cluster = RedisCluster(masters=3, replicas_per_master=0,
                                   require_full_coverage=False)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def config(self, seeds):
        return CONFIG.replace("algorithm: fixed_window", "algorithm: fixed_window\n"
                              "    key: header:X-Client\n    fail_mode: closed").replace(
            "timeout: 1s", "timeout: 1s\n  connect_timeout: 1s").format(seed=", ".join(seeds))

    @staticmethod
    def tag(client):
        return "{header:x-client=" + client + "}"

    @staticmethod
    def errors(address, kind):
        """How many error answers of a kind ("ASK", "TRYAGAIN") a node has given."""
        with RespClient(address) as r:
            stats = parse_info(r.call("INFO", "errorstats"))
        return int(stats.get("errorstat_" + kind, "count=0").split(",")[0].split("=")[1])

    def test_1_a_first_seed_that_is_down_costs_no_decision(self):
        # Before the first slot map, keys go to the first seed; one that is down must not
        # send them to their fail mode while the other seeds answer.
        dead = RedisServer()
        dead.stop()  # its port, with nothing listening
        s = redis_test.Sluice(self.config([dead.address] + self.cluster.addresses), threads=1)
        self.addCleanup(s.stop)
        answers = [s.check("/x", f"early{i}")[2] for i in range(20)]
        self.assertEqual([b.get("degraded") for b in answers], [None] * 20, answers)

    def test_2_an_idle_node_refreshes_its_slot_map(self):
        # A node with no traffic, hence no MOVED or failure to learn from, still asks for
        # the slot map now and then: masters replaced while it was idle are known to it.
        s = redis_test.Sluice(self.config([self.cluster.masters()[0][0]]), threads=1)
        self.addCleanup(s.stop)
        self.assertNotIn("degraded", s.check("/x", "warm")[2])

        def slots_calls():
            total = 0
            for n in self.cluster.live_nodes():
                stats = parse_info(n.call("INFO", "commandstats"))
                calls = stats.get("cmdstat_cluster|slots", "calls=0").split(",")[0]
                total += int(calls.split("=")[1])
            return total
        before = slots_calls()
        redis_test.wait_for(lambda: slots_calls() > before, 15, "a refresh with no traffic")

    def test_3_a_node_removed_from_the_cluster_is_followed(self):
        # What `redis-cli --cluster reshard` then `del-node` leave: the node's slots on
        # another master, the node reset (it knows no slot, and answers every key
        # "CLUSTERDOWN Hash slot not served", never MOVED) and forgotten by the others.
        c = self.cluster
        s = redis_test.Sluice(self.config(c.addresses), threads=1)
        self.addCleanup(s.stop)
        (gone, _, ranges), (heir, _, _) = c.masters()[0], c.masters()[1]
        client = next(x for x in (f"c{i}" for i in range(10**4))
                      if c.master_for(self.tag(x)) == gone)
        self.assertNotIn("degraded", s.check("/x", client)[2])
        ids = {n.address: n.id for n in c.cluster_nodes()}
        slots = [slot for first, last in ranges for slot in range(first, last + 1)]
        with RespClient(gone) as r:
            r.call("FLUSHALL")  # as if migrated away: a node with keys cannot be reset
        for address in (heir, gone, *(a for a, _, _ in c.masters()[2:])):
            with RespClient(address) as r:
                r.pipeline(*(("CLUSTER", "SETSLOT", slot, "NODE", ids[heir]) for slot in slots))
        with RespClient(heir) as r:
            r.call("CLUSTER", "BUMPEPOCH")
        with RespClient(gone) as r:
            r.call("CLUSTER", "RESET", "SOFT")
        for address in ids:
            if address != gone:
                with RespClient(address) as r:
                    r.call("CLUSTER", "FORGET", ids[gone])
        with RespClient(gone) as r:  # what Sluice's map still sends the client's key to
            with self.assertRaisesRegex(RespError, "^CLUSTERDOWN Hash slot not served"):
                r.call("EVAL", "return 1", "1", self.tag(client))
        redis_test.wait_for(lambda: "degraded" not in s.check("/x", client)[2], 10,
                            "decisions back on the cluster, at the slot's new master")
        answers = [s.check("/x", client) for _ in range(4)]
        self.assertEqual([(st, "degraded" in b) for st, _, b in answers][-1], (429, False))
        with RespClient(heir) as r:
            self.assertTrue(r.call("KEYS", "sluice:" + self.tag(client) + ":*"))

class ReshardTest(unittest.TestCase):
    """A cluster of its own (three masters, no replicas) that redis-cli reshards: the
    slots it moves would change which master ClusterChangeTest's tests pick."""

    tag = staticmethod(ClusterChangeTest.tag)
    errors = staticmethod(ClusterChangeTest.errors)

    @classmethod
    def setUpClass(cls):
        cls.cluster = RedisCluster(masters=3, replicas_per_master=0)

    @classmethod
    def tearDownClass(cls):
        cls.cluster.stop()

    def test_counts_stay_exact_while_redis_cli_reshards_their_slots(self):
        # Slots moved by the operators' tool while their clients are under load, one key
        # per MIGRATE (`--cluster-pipeline 1`), so a request's two keys are split between
        # the two masters for a while (TRYAGAIN), others are asked over (ASK), and each
        # slot ends handed over (MOVED). Every request is decided on Redis (none takes its
        # fail mode) and counted once: what Redis holds is exactly what was admitted.
        c = self.cluster
        window = redis_test.far_window()
        s = redis_test.Sluice(json.dumps({
            "rate_limits": {
                "default": {"requests_per_minute": 100000, "key": "header:X-Client"},
                "endpoints": [{"name": "two", "path": "/two", "key": "header:X-Client",
                               "fail_mode": "closed", "algorithm": "fixed_window",
                               "limits": [{"limit": 100000, "window": window},
                                          {"limit": 200000, "window": window}]}]},
            "store": {"type": "redis-cluster", "addresses": c.addresses, "timeout": "2s"},
        }))
        self.addCleanup(s.stop)
        (src, _, ranges), (dst, _, _) = c.masters()[0], c.masters()[1]
        moving = 256  # redis-cli moves the source's lowest slots first
        first = ranges[0][0]
        clients = [x for x in (f"r{i}" for i in range(10**5))
                   if first <= key_slot(self.tag(x)) < first + moving][:24]
        allowed = {x: 0 for x in clients}
        answers = {x: 0 for x in clients}
        odd = []
        lock = threading.Lock()
        done = threading.Event()

        def load(mine):
            client = Client(s.port)
            try:
                while not done.is_set():
                    for x in mine:
                        status, body = client.check_path("/two", x)
                        with lock:
                            answers[x] += 1
                            if status == 200 and "degraded" not in body:
                                allowed[x] += 1
                            else:
                                odd.append((x, status, body))
            finally:
                client.close()
        # Older keys in the clients' slots keep each slot moving for a while after the
        # clients' own keys (one MIGRATE per key, newest first): requests meanwhile are
        # asked over to the importing master.
        with RespClient(src) as r:
            r.pipeline(*(("SET", f"filler:{self.tag(x)}:{i}", "x")
                         for x in clients for i in range(200)))
        threads = [threading.Thread(target=load, args=(clients[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            redis_test.wait_for(lambda: min(answers.values()) >= 5, 20, "load on every client")
            ids = {n.address: n.id for n in c.cluster_nodes()}
            asked_before = self.errors(src, "ASK")
            before = sum(answers.values())
            reshard = subprocess.run(
                [REDIS_CLI, "--cluster", "reshard", src, "--cluster-from", ids[src],
                 "--cluster-to", ids[dst], "--cluster-slots", str(moving), "--cluster-yes",
                 "--cluster-pipeline", "1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, timeout=120)
            during = sum(answers.values()) - before
        finally:
            done.set()
            for t in threads:
                t.join()
        self.assertEqual(reshard.returncode, 0, reshard.stdout[-3000:])
        c.wait_ok()
        self.assertEqual([c.master_for(self.tag(x)) for x in clients], [dst] * len(clients))
        self.assertGreater(during, 50, "requests while the slots moved")
        asked = self.errors(src, "ASK") - asked_before
        self.assertGreater(asked, 0, "no request met a slot mid-move")
        followed = s.metrics()['sluice_redis_cluster_redirects_total{kind="ask"}']
        self.assertTrue(0 < followed <= asked, (followed, asked))  # Sluice is the only client
        self.assertEqual(odd, [])
        for x in clients:  # one more: it sees every admitted request counted, once
            status, _, body = s.check("/two", x)
            self.assertEqual((status, body["remaining"]), (200, 100000 - allowed[x] - 1),
                             (x, body))
        self.assertEqual(s.stop(), 0, s.log())


if __name__ == "__main__":
    server_test.BIN = os.path.abspath(sys.argv.pop(1))
    redis_test.BIN = server_test.BIN
    unittest.main(verbosity=1)
