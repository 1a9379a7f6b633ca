#!/usr/bin/env python3
"""Integration tests of multi-region limits: the real sluice binary and two redis-server
processes standing for two regions' Redis, all on 127.0.0.1.

Usage: multiregion_test.py path/to/sluice [unittest args]   (about 15 s; needs redis-server)

What users rely on:
- partitioned limits: a node enforces its region's share of a global limit, exactly, in
  mode remote and in mode local_sync;
- async aggregation: a region decides against the global limit minus what the other
  regions published; after a sync the regions together admit the global limit, and under
  concurrent load they stay within the stated bound;
- another region's Redis down costs nothing but the publications (counted); they resume
  once it is back.
"""
import json
import os
import queue
import socket
import sys
import threading
import time
import types
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import redis_test  # noqa: E402  (the Sluice process wrapper and helpers)
from redis_fixture import RedisCluster, RedisServer  # noqa: E402
from redis_test import Sluice, far_window, wait_for  # noqa: E402
from hybrid_test import (INTERVAL, allowed, decide_keys, stated_bound,  # noqa: E402
                         wait_remaining)


def config(region, redis, limit, window, mode="local_sync", shares=None, peers=()):
    endpoint = {"name": "api", "path": "/api/*", "limit": limit, "window": window,
                "algorithm": "fixed_window", "key": "header:X-Client"}
    if shares:
        endpoint["regions"] = shares
    c = {"region": region,
         "rate_limits": {"default": {"requests_per_minute": 100000}, "endpoints": [endpoint]},
         "store": {"type": "redis", "address": redis.address, "mode": mode}}
    if mode == "local_sync":
        c["store"]["sync_interval"] = "100ms"
    else:
        # A generous deadline: these tests count, they do not exercise timeouts (a decision
        # past the 5 ms default on a loaded machine would take the fail-mode path).
        c["store"]["timeout"] = "2s"
    if peers:
        c["store"]["peers"] = [{"region": r, "address": a.address} for r, a in peers]
    return json.dumps(c, indent=1)


def published(redis, client, region):
    """What `region` published into `redis` for `client`, summed over windows."""
    keys = redis.call("KEYS", "sluice:{header:x-client=" + client + "}:*@" + region)
    return sum(int(redis.call("GET", k)) for k in keys)


class MultiRegionTest(unittest.TestCase):
    def setUp(self):
        self.east, self.west = RedisServer(), RedisServer()
        self.nodes = []

    def tearDown(self):
        for n in self.nodes:
            n.stop()
        self.east.stop()
        self.west.stop()

    def start(self, text):
        node = Sluice(text)
        self.nodes.append(node)
        return node

    def aggregated(self, limit, window):
        east = self.start(config("us-east", self.east, limit, window,
                                 peers=[("eu-west", self.west)]))
        west = self.start(config("eu-west", self.west, limit, window,
                                 peers=[("us-east", self.east)]))
        return east, west

    def test_partitioned_shares_are_enforced_in_each_region(self):
        shares = {"us-east": 4, "eu-west": 6}
        window = far_window()
        east = self.start(config("us-east", self.east, 10, window, mode="remote", shares=shares))
        west = self.start(config("eu-west", self.west, 10, window, shares=shares))
        self.assertEqual(allowed(east, "p1", 10), 4)
        self.assertEqual(allowed(west, "p1", 10), 6)
        self.assertEqual(east.check("/api/x", "p1")[2]["limit"], 4)
        self.assertEqual(west.check("/api/x", "p1")[2]["limit"], 6)

    def test_a_reload_that_changes_the_region_is_refused(self):
        # The region names the shares' keys and the syncer's publications: half of it
        # changed would count one region's hits under two names.
        shares = {"us-east": 4, "eu-west": 6}
        window = far_window()
        west = self.start(config("eu-west", self.west, 10, window, shares=shares))
        west.rewrite(config("us-east", self.west, 10, window, shares=shares))
        status, _, body = west.request("POST", "/v1/reload", admin=True)
        self.assertEqual(status, 400, body)
        self.assertIn("the top-level region changed", json.loads(body)["message"])
        self.assertEqual(west.check("/api/x", "p9")[2]["limit"], 6)

    def test_equal_shares_on_one_redis_are_counted_apart(self):
        # Two regions may share one Redis: each share has keys of its own, even when the
        # shares (and so the policies) are equal.
        shares = {"us-east": 5, "eu-west": 5}
        window = far_window()
        for mode in ("remote", "local_sync"):
            client = "eq-" + mode
            east = self.start(config("us-east", self.east, 10, window, mode=mode, shares=shares))
            west = self.start(config("eu-west", self.east, 10, window, mode=mode, shares=shares))
            self.assertEqual(allowed(east, client, 8), 5, mode)
            if mode == "local_sync":
                time.sleep(4 * INTERVAL)  # east's hits reach Redis; west would read them
            self.assertEqual(allowed(west, client, 8), 5, mode)

    def test_a_region_decides_against_the_global_limit_minus_the_others_usage(self):
        east, west = self.aggregated(20, far_window())
        self.assertEqual(allowed(east, "a1", 12), 12)
        wait_for(lambda: published(self.west, "a1", "us-east") == 12, 15,
                 "us-east's 12 published in eu-west's Redis")
        west.check("/api/x", "a1", cost=0)  # west meets the key; its next rounds fetch
        wait_remaining(west, "a1", 8, "eu-west's view of us-east's 12")
        self.assertEqual(allowed(west, "a1", 12), 8)
        wait_for(lambda: published(self.east, "a1", "eu-west") == 8, 15,
                 "eu-west's 8 published in us-east's Redis")
        east.check("/api/x", "a1", cost=0)
        wait_remaining(east, "a1", 0, "us-east's view of eu-west's 8")
        self.assertEqual(allowed(east, "a1", 5), 0)

    def test_concurrent_regions_converge_within_the_stated_bound(self):
        limit, rate = 100, 100.0
        east, west = self.aggregated(limit, far_window())
        admitted = [0, 0]

        def client(i, node):
            due = time.monotonic()
            for _ in range(int(rate * 3)):
                time.sleep(max(0.0, due - time.monotonic()))
                if node.check("/api/x", "a2")[2]["allowed"]:
                    admitted[i] += 1
                due = max(due + 1 / rate, time.monotonic())  # no burst after a stall

        threads = [threading.Thread(target=client, args=(i, n))
                   for i, n in enumerate((east, west))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = sum(admitted)
        bound, interval, d = stated_bound((east, west), limit, rate)
        print(f"\n2 regions, global limit {limit}, {rate:.0f}/s each: admitted {total} "
              f"(bound {bound:.0f}: I {interval * 1000:.1f} ms, d {d * 1000:.1f} ms)",
              file=sys.stderr)
        self.assertGreaterEqual(total, limit)
        self.assertLessEqual(total, bound)

    def test_a_peer_down_costs_only_the_publications(self):
        east, west = self.aggregated(1000, far_window())
        self.west.kill()
        self.assertEqual(allowed(east, "a3", 6), 6)
        wait_for(lambda: east.metrics()["sluice_sync_peer_failures_total"] > 0, 15,
                 "a failed publication counted")
        # Its own Redis answers, but the other region sees its hits late: degraded.
        wait_for(lambda: east.readyz()["degraded"], 15, "/readyz degraded")
        self.assertIn("publishing this region's totals failed", json.dumps(east.readyz()))
        self.assertEqual(east.metrics()["sluice_sync_degraded"], 1)
        wait_for(lambda: "publishing this region's totals failed" in east.log(), 15,
                 "the failed publication logged")
        self.west.restart()
        self.assertEqual(allowed(east, "a3", 1), 1)
        wait_for(lambda: published(self.west, "a3", "us-east") == 7, 15,
                 "publications back once eu-west's Redis is")
        wait_for(lambda: not east.readyz()["degraded"], 15, "/readyz back")
        self.assertEqual(east.metrics()["sluice_sync_degraded"], 0)
        self.assertTrue(east.alive() and west.alive())

    def test_totals_given_up_on_for_a_peer_are_counted_and_logged(self):
        # At most 100,000 totals wait for a peer; past that, newer ones are given up on:
        # that region never learns them, which /metrics counts and the log says.
        east, west = self.aggregated(1000, far_window())
        self.west.kill()
        decide_keys(east, "p", 110_000)
        wait_for(lambda: east.metrics()["sluice_sync_peer_dropped_total"] > 0, 30,
                 "totals given up on counted")
        wait_for(lambda: "newer ones are given up on" in east.log(), 15, "and logged")
        self.assertTrue(east.alive() and west.alive())

    def test_totals_a_peer_missed_reach_it_once_it_is_back(self):
        # A key decided only while the other region's Redis was down: its total is
        # published again each round until that Redis takes it, not dropped with the
        # key's refresh rounds, and the region is healthy again with no new decision.
        east, west = self.aggregated(10, far_window())
        self.west.kill()
        self.assertEqual(allowed(east, "a4", 6), 6)
        wait_for(lambda: east.metrics()["sluice_sync_peer_failures_total"] >= 5, 15,
                 "the publication retried round after round")
        self.west.restart()
        wait_for(lambda: published(self.west, "a4", "us-east") == 6, 15,
                 "the missed total published once eu-west's Redis is back")
        wait_for(lambda: not east.readyz()["degraded"], 15, "/readyz back")
        west.check("/api/x", "a4", cost=0)
        wait_remaining(west, "a4", 4, "eu-west's view of us-east's 6")
        self.assertEqual(allowed(west, "a4", 10), 4)

    def test_a_peer_down_costs_this_regions_redis_nothing_more(self):
        # What a peer did not take is sent to the peer again, not counted again in this
        # region's Redis: its keys leave the rounds as usual.
        east, west = self.aggregated(1000, far_window())
        self.west.kill()
        for i in range(30):
            self.assertEqual(allowed(east, f"k{i}", 1), 1)
        wait_for(lambda: east.metrics()["sluice_sync_peer_failures_total"] >= 8, 15,
                 "publications retried")

        def count_calls():
            stats = self.east.call("INFO", "commandstats")
            line = next((l for l in stats.splitlines() if l.startswith("cmdstat_evalsha:")), "")
            return int(line.split("calls=")[1].split(",")[0]) if line else 0
        calls0, t0 = count_calls(), time.monotonic()
        time.sleep(1.5)
        rounds = (time.monotonic() - t0) / INTERVAL
        # An idle round's probe, at most one a round (and a round under way): not 30 keys
        # a round, as when every key stayed in the rounds until its publication was taken.
        self.assertLessEqual(count_calls() - calls0, rounds + 2)
        self.west.restart()
        wait_for(lambda: sum(published(self.west, f"k{i}", "us-east") for i in range(30)) == 30,
                 15, "every total published once eu-west's Redis is back")

    def test_a_peer_back_after_the_window_is_healthy_again(self):
        # Nothing is left to publish once the window is over: the peer's health is asked
        # for all the same, so /readyz does not stay degraded with the peer back.
        east, west = self.aggregated(1000, "2s")
        self.west.kill()
        self.assertEqual(allowed(east, "a5", 1), 1)
        wait_for(lambda: east.readyz()["degraded"], 15, "/readyz degraded")
        time.sleep(2.5)  # past the window, and past its expiry for the total kept aside
        self.west.restart()
        wait_for(lambda: not east.readyz()["degraded"], 15, "/readyz back")

    def test_a_peer_across_a_slow_link_is_published_to_without_failures(self):
        # Another region is a WAN away: a round trip longer than the sync interval (here
        # 1.2 s against 100 ms, past the 1 s a connection waits on its own Redis) must
        # neither fail every publication nor slow the rounds.
        proxy = DelayProxy(self.west.port, delay=0.6)
        self.addCleanup(proxy.close)
        east = self.start(config("us-east", self.east, 1000, far_window(),
                                 peers=[("eu-west", proxy)]))
        self.assertEqual(allowed(east, "a6", 6), 6)
        wait_for(lambda: published(self.west, "a6", "us-east") == 6, 15,
                 "us-east's 6 published through the slow link")
        self.assertEqual(allowed(east, "a6", 3), 3)
        wait_for(lambda: published(self.west, "a6", "us-east") == 9, 15, "and the next 3")
        m = east.metrics()
        self.assertEqual(m["sluice_sync_peer_failures_total"], 0)
        self.assertEqual(m["sluice_sync_degraded"], 0)
        self.assertFalse(east.readyz()["degraded"])
        # The rounds of this region's own Redis kept their pace meanwhile.
        self.assertLess(m["sluice_sync_round_max_seconds"], 0.15)

    def test_a_peer_on_redis_cluster_takes_every_publication(self):
        # The other region's Redis is a cluster: each total goes to its key's slot's master
        # (MOVED and ASK followed), not only those of the slots the named node serves.
        cluster = RedisCluster(replicas_per_master=0)
        self.addCleanup(cluster.stop)
        seed = types.SimpleNamespace(address=cluster.masters()[0][0])
        east = self.start(config("us-east", self.east, 1000, far_window(),
                                 peers=[("eu-west", seed)]))
        clients = [f"c{i}" for i in range(12)]
        owners = {cluster.master_for("{header:x-client=" + c + "}") for c in clients}
        self.assertGreater(len(owners), 1)  # the keys are spread over the masters
        for c in clients:
            self.assertEqual(allowed(east, c, 2), 2)

        def published_in_cluster(client):
            node = cluster.client_for("{header:x-client=" + client + "}")
            return published(node, client, "us-east")
        wait_for(lambda: all(published_in_cluster(c) == 2 for c in clients), 15,
                 "every total published on its slot's master")
        self.assertEqual(east.metrics()["sluice_sync_peer_failures_total"], 0)
        self.assertFalse(east.readyz()["degraded"])


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that holds every chunk `delay` seconds, each way, in order."""

    def __init__(self, port, delay):
        self.target, self.delay, self.socks = port, delay, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                q = queue.Queue()
                threading.Thread(target=self._read, args=(a, q), daemon=True).start()
                threading.Thread(target=self._write, args=(b, q), daemon=True).start()

    def _read(self, sock, q):
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            q.put((time.monotonic() + self.delay, data))
            if not data:
                return

    @staticmethod
    def _write(sock, q):
        while True:
            due, data = q.get()
            time.sleep(max(0.0, due - time.monotonic()))
            try:
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    return
                sock.sendall(data)
            except OSError:
                return

    def close(self):
        self.listener.close()
        for sock in self.socks:
            sock.close()


if __name__ == "__main__":
    redis_test.BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
