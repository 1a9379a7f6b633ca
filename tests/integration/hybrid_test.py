#!/usr/bin/env python3
"""Integration tests of store mode local_sync (the hybrid "local + sync" mode): the real
sluice binary, real HTTP clients and real redis-server processes, all on 127.0.0.1.

Usage: hybrid_test.py path/to/sluice [unittest args]   (about 20 s; needs redis-server)

What users rely on:
- one node decides exactly, with no Redis call on the request path;
- after a sync, another node counts the first node's hits, and Redis holds the total;
- three nodes sharing one Redis admit at least the limit and at most the limit plus the
  stated bound, (N-1) x r x (2 x interval + d) for N nodes each admitting r per second;
- Redis down: decisions go on from local counts (no error, no crash), /readyz and /metrics
  say degraded; Redis back (empty, and without the script): every hit of the window reaches
  Redis again, exactly once;
- SIGTERM sends the last interval's hits before the process ends;
- a limit's key table costs memory as its keys use it, not --max-keys x slot size at start,
  and the tables of limits a reload dropped or changed are given back;
- a full key table (--max-keys) says degraded on /readyz, and gives the slots of keys whose
  windows are over to new keys, which are synced again.
"""
import json
import os
import re
import signal
import sys
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import redis_test  # noqa: E402  (the Sluice process wrapper and helpers)
from redis_fixture import RedisServer  # noqa: E402
from redis_test import Sluice, far_window, wait_for  # noqa: E402

INTERVAL = 0.1  # sync_interval of every node here
SLACK = 0.1     # d: a round's time on loopback plus scheduling on a loaded 2-core machine


def stated_bound(nodes, limit, rate):
    """limit + (N - 1) * r * (2 * I + d) (docs/design.md), with I and d as the nodes ran them.

    A hit reaches Redis within one round start and one round of its decision, and another
    node sees it within one more of each: 2 * I + d with I the longest gap between round
    starts and d two of the longest rounds, both from the nodes' own metrics. A quiet
    machine runs rounds on time (I = INTERVAL, d of a few ms), and SLACK stays the floor of
    d (it also covers the test clients' own lag); a loaded machine delays rounds, and the
    bound it states grows with them.
    """
    m = [n.metrics() for n in nodes]
    interval = max([INTERVAL] + [x["sluice_sync_interval_max_seconds"] for x in m])
    d = max(SLACK, 2 * max(x["sluice_sync_round_max_seconds"] for x in m))
    return limit + (len(nodes) - 1) * rate * (2 * interval + d), interval, d


def config(redis, limit, window, algorithm="fixed_window", interval="100ms"):
    c = {
        "rate_limits": {
            "default": {"requests_per_minute": 100000},
            "endpoints": [{"name": "api", "path": "/api/*", "limit": limit, "window": window,
                           "algorithm": algorithm, "key": "header:X-Client"}],
        },
        "store": {"type": "redis", "address": redis.address, "mode": "local_sync",
                  "sync_interval": interval},
    }
    return json.dumps(c, indent=1)


def allowed(node, client, n, cost=None):
    return sum(1 for _ in range(n) if node.check("/api/x", client, cost)[2]["allowed"])


def decide_keys(node, prefix, count):
    """Decides `count` distinct clients (prefix0, prefix1, ...) once each on /api/x, in
    batches of 1000: a burst of new keys."""
    for first in range(0, count, 1000):
        checks = [{"path": "/api/x", "method": "GET", "headers": {"X-Client": f"{prefix}{k}"}}
                  for k in range(first, min(count, first + 1000))]
        status, _, body = node.request("POST", "/v1/check/batch", json.dumps({"checks": checks}))
        assert status == 200, (status, body)


def wait_remaining(node, client, want, what):
    """Polls a peek (cost 0: nothing spent) until `node` answers `want` remaining for
    `client`: a sync round's result, which a loaded machine may delay well past the interval.
    Fails, with the last answer, after 15 s."""
    last = []

    def seen():
        last[:] = [node.check("/api/x", client, cost=0)[2]["remaining"]]
        return last[0] == want
    try:
        wait_for(seen, 15, what)
    except AssertionError as e:
        raise AssertionError(f"{e} (remaining {last[0]}, want {want})") from None


def wait_settled(node, still=10 * INTERVAL):
    """Waits until `node` syncs nothing more: its count of synced windows holds still for
    `still` seconds (a key is fetched for three rounds after its last decision). Fails after
    15 s."""
    last, since = None, time.monotonic()
    deadline = since + 15
    while True:
        n = node.metrics()["sluice_sync_windows_total"]
        now = time.monotonic()
        if n != last:
            last, since = n, now
        elif now - since >= still:
            return
        if now > deadline:
            raise AssertionError(f"{node} still syncing after 15 s")
        time.sleep(INTERVAL / 2)


def redis_total(redis, client):
    """The count Redis holds for `client` across its window keys (a hash per window: each
    node's cumulative hits)."""
    keys = redis.call("KEYS", "sluice:{header:x-client=" + client + "}:*")
    return sum(int(v) for k in keys if "@" not in k for v in redis.call("HVALS", k))


class HybridTest(unittest.TestCase):
    def setUp(self):
        self.redis = RedisServer()
        self.nodes = []

    def tearDown(self):
        for n in self.nodes:
            n.stop()
        self.redis.stop()

    def start(self, text, threads=2, args=()):
        node = Sluice(text, threads=threads, args=args)
        self.nodes.append(node)
        return node

    def test_one_node_is_exact_under_concurrent_clients(self):
        node = self.start(config(self.redis, 40, far_window()))
        counts = []

        def client():
            counts.append(allowed(node, "c1", 25))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(sum(counts), 40)
        status, headers, body = node.check("/api/x", "c1")
        self.assertEqual(status, 429)
        self.assertEqual(body["remaining"], 0)
        wait_for(lambda: redis_total(self.redis, "c1") == 40, 15, "40 hits in Redis")
        self.assertEqual(node.readyz()["store"], "redis (local_sync)")
        self.assertFalse(node.readyz()["degraded"])

    def test_after_a_sync_a_second_node_counts_the_first_nodes_hits(self):
        text = config(self.redis, 20, far_window())
        a, b = self.start(text), self.start(text)
        self.assertEqual(allowed(a, "c2", 15), 15)
        # a fetches the key's total in the rounds after it decides it (three after the last
        # decision), then no more until it meets the key again: once its count of synced
        # windows holds still for ten intervals, a's view is fixed before b adds hits,
        # however late a loaded machine runs a's rounds.
        wait_for(lambda: redis_total(self.redis, "c2") == 15, 15, "a's hits in Redis")
        wait_settled(a)
        b.check("/api/x", "c2", cost=0)  # b meets the key: its next sync fetches the total
        wait_remaining(b, "c2", 5, "b's view of a's 15 hits")
        self.assertEqual(allowed(b, "c2", 10), 5)
        # The admin key call reads the counts decisions use: b's view of every node's hits.
        key = "/v1/keys?limit=api/limit&key=header%3Ax-client%3Dc2"
        status, _, body = b.request("GET", key, admin=True)
        self.assertEqual((status, json.loads(body)["remaining"]), (200, 0), body)
        # No one node can reset a count that every node's share in Redis makes up.
        status, _, body = b.request("DELETE", key, admin=True)
        self.assertEqual(status, 409, body)
        self.assertIn("cannot be reset from one node", json.loads(body)["message"])
        wait_for(lambda: redis_total(self.redis, "c2") == 20, 15, "b's hits in Redis")
        # a decides from its last view until it meets the key again and syncs.
        self.assertEqual(a.check("/api/x", "c2", cost=0)[2]["remaining"], 5)
        wait_remaining(a, "c2", 0, "a's view of b's 5 hits")
        self.assertEqual(allowed(a, "c2", 5), 0)
        time.sleep(3 * INTERVAL + SLACK)
        self.assertEqual(redis_total(self.redis, "c2"), 20)
        self.assertGreater(a.metrics()["sluice_sync_rounds_total"], 0)

    def test_three_nodes_stay_within_the_stated_bound(self):
        limit, rate = 150, 100.0  # each node is offered `rate` requests a second
        text = config(self.redis, limit, far_window())
        nodes = [self.start(text) for _ in range(3)]
        admitted = [0, 0, 0]

        def client(i):
            due = time.monotonic()
            for _ in range(int(rate * 4)):  # 4 s at `rate`: twice the limit and more
                time.sleep(max(0.0, due - time.monotonic()))
                if nodes[i].check("/api/x", "c3")[2]["allowed"]:
                    admitted[i] += 1
                # Never faster than `rate`, the bound's offered rate: after a stall the
                # missed sends are not made up in a burst.
                due = max(due + 1 / rate, time.monotonic())

        threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = sum(admitted)
        for n in nodes:  # what the bound reads: rounds start at least an interval apart
            m = n.metrics()
            self.assertGreaterEqual(m["sluice_sync_interval_max_seconds"], INTERVAL)
            self.assertGreater(m["sluice_sync_round_max_seconds"], 0)
        bound, interval, d = stated_bound(nodes, limit, rate)
        print(f"\n3 nodes, limit {limit}, {rate:.0f}/s each: admitted {total} "
              f"(bound {bound:.0f}: I {interval * 1000:.1f} ms, d {d * 1000:.1f} ms)",
              file=sys.stderr)
        self.assertGreaterEqual(total, limit)
        self.assertLessEqual(total, bound)
        wait_for(lambda: redis_total(self.redis, "c3") == total, 15, "every hit in Redis")

    def test_redis_down_decisions_go_on_and_the_outage_hits_arrive_once_back(self):
        node = self.start(config(self.redis, 1000, far_window()))
        self.assertEqual(allowed(node, "c4", 5), 5)
        wait_for(lambda: redis_total(self.redis, "c4") == 5, 15, "5 hits in Redis")
        port = self.redis.port
        self.redis.kill()
        self.assertEqual(allowed(node, "c4", 7), 7)  # local counts decide
        wait_for(lambda: node.readyz()["degraded"], 15, "/readyz degraded")
        self.assertIn("sync failing", node.readyz()["store_state"])
        m = node.metrics()
        self.assertGreater(m["sluice_sync_failures_total"], 0)
        self.assertEqual(m["sluice_sync_degraded"], 1)
        self.assertEqual(m["sluice_sync_held_keys"], 1)
        # Polled: the sync thread logs just after it marks the store degraded.
        wait_for(lambda: "redis sync with 127.0.0.1:%d failed" % port in node.log(), 15,
                 "the failed sync logged")
        self.redis.restart()  # empty: no persistence, no script
        self.assertEqual(allowed(node, "c4", 1), 1)
        wait_for(lambda: not node.readyz()["degraded"], 15, "/readyz back")
        # The node sends its cumulative count: the window's 13 hits are back in Redis.
        wait_for(lambda: redis_total(self.redis, "c4") == 13, 15, "the window's 13 hits")
        time.sleep(3 * INTERVAL)
        self.assertEqual(redis_total(self.redis, "c4"), 13)  # counted once
        self.assertTrue(node.alive())
        self.assertEqual(node.metrics()["sluice_sync_held_keys"], 0)

    def test_an_idle_nodes_health_follows_redis_both_ways(self):
        # With nothing to sync, each round still asks Redis: an idle node reports an outage
        # it has no traffic to meet, and reports Redis back without a decision.
        node = self.start(config(self.redis, 1000, far_window()))
        self.assertEqual(allowed(node, "c9", 3), 3)
        wait_for(lambda: redis_total(self.redis, "c9") == 3, 15, "3 hits in Redis")
        wait_settled(node)
        self.assertFalse(node.readyz()["degraded"])
        # Idle rounds that reach Redis count as rounds, as those that fail count as failures.
        rounds = node.metrics()["sluice_sync_rounds_total"]
        wait_for(lambda: node.metrics()["sluice_sync_rounds_total"] >= rounds + 3, 15,
                 "idle rounds counted")
        self.redis.kill()
        wait_for(lambda: node.readyz()["degraded"], 15, "/readyz degraded with no traffic")
        m = node.metrics()
        self.assertEqual((m["sluice_sync_degraded"], m["sluice_sync_held_keys"]), (1, 0))
        self.assertGreater(m["sluice_sync_failures_total"], 0)
        self.redis.restart()
        wait_for(lambda: not node.readyz()["degraded"], 15, "/readyz back with no traffic")
        self.assertEqual(node.metrics()["sluice_sync_degraded"], 0)
        # The probes' key is short-lived and apart from every client's.
        probes = self.redis.call("KEYS", "sluice:{sluice-sync-probe}:*")
        self.assertLessEqual(len(probes), 1, probes)
        for k in probes:
            pttl = self.redis.call("PTTL", k)  # -2: expired since KEYS, short-lived too
            self.assertTrue(pttl == -2 or 0 < pttl <= 1000, (k, pttl))

    def test_held_keys_count_only_hits_redis_has_not_taken(self):
        # Steady traffic with Redis healthy: every round is applied, nothing waits.
        node = self.start(config(self.redis, 100000, far_window(), interval="200ms"))
        samples = []
        end = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < end:
            node.check("/api/x", f"h{i % 20}")
            i += 1
            if i % 40 == 0:
                samples.append(node.metrics()["sluice_sync_held_keys"])
        self.assertGreater(node.metrics()["sluice_sync_rounds_total"], 2)
        # A scrape may fall inside a round (its keys still in flight): most may not.
        self.assertGreaterEqual(samples.count(0), len(samples) * 3 // 4, samples)
        wait_settled(node)
        self.assertEqual(node.metrics()["sluice_sync_held_keys"], 0)

    def test_a_burst_of_many_new_keys_is_synced_once_it_ends(self):
        # 200,000 keys decided at once would make one round of 200,000 calls, longer than
        # any deadline, failed whole round after round until the windows end. Rounds take
        # a share at a time instead, going on where the last stopped: the node catches up.
        node = self.start(config(self.redis, 5, far_window()))
        keys = 200_000
        decide_keys(node, "b", keys)
        deadline = time.monotonic() + 30
        while node.metrics()["sluice_sync_held_keys"] > 0:
            self.assertLess(time.monotonic(), deadline, f"still held: {node.metrics()}")
            time.sleep(0.2)
        m = node.metrics()
        self.assertEqual(m["sluice_sync_dropped_hits_total"], 0)
        self.assertGreaterEqual(m["sluice_sync_windows_total"], keys)
        self.assertEqual(redis_total(self.redis, "b199999"), 1)
        self.assertEqual(redis_total(self.redis, "b0"), 1)

    def test_sigterm_sends_the_hits_of_many_keys_over_several_rounds(self):
        # More keys than one round takes, decided just before SIGTERM: the last rounds go on
        # share after share while Redis takes them, and every hit arrives.
        node = self.start(config(self.redis, 5, far_window(), interval="30s"))
        keys = 60_000
        decide_keys(node, "s", keys)
        self.assertEqual(node.stop(), 0)
        self.assertNotIn("lost", node.log())
        self.assertEqual(sum(1 for k in range(0, keys, 997)
                             if redis_total(self.redis, f"s{k}") == 1), len(range(0, keys, 997)))

    def test_a_reload_checks_windows_against_the_running_sync_interval(self):
        # A new sync_interval takes a restart: rules whose window is not longer than the
        # running one are refused on reload, whatever interval the file now says.
        node = self.start(config(self.redis, 100, "1m", interval="2s"))
        node.rewrite(config(self.redis, 100, "1s", interval="100ms"))
        status, _, body = node.request("POST", "/v1/reload", admin=True)
        self.assertEqual(status, 400, body)
        message = json.loads(body)["message"]
        self.assertIn("a window of 1s is not longer than store.sync_interval (2s)", message)
        self.assertIn("the running sync_interval; a new one takes a restart", message)
        # The running rules stay: 1 m windows.
        self.assertEqual(node.check("/api/x", "r1")[2]["limit"], 100)
        self.assertIn("2s", node.readyz()["store_state"])

    def test_sigterm_sends_the_last_hits(self):
        node = self.start(config(self.redis, 1000, far_window(), interval="30s"))
        self.assertEqual(allowed(node, "c5", 9), 9)
        self.assertEqual(node.stop(), 0)
        self.assertEqual(redis_total(self.redis, "c5"), 9)

    def test_sigterm_with_redis_frozen_exits_within_five_seconds(self):
        # The last round waits for a Redis that does not answer at most 5 s, not a round's
        # deadline (here the 30 s interval): a frozen Redis does not hold a rollout up.
        node = self.start(config(self.redis, 1000, far_window(), interval="30s"))
        self.assertEqual(allowed(node, "c6", 3), 3)
        os.kill(self.redis.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            self.assertEqual(node.stop(), 0)
            took = time.monotonic() - t0
        finally:
            os.kill(self.redis.pid, signal.SIGCONT)
        self.assertLess(took, 8)
        self.assertIn("did not answer within 5 s of shutting down", node.log())

    def test_sliding_window_counter_is_shared_too(self):
        text = config(self.redis, 30, "1h", algorithm="sliding_window_counter")
        a, b = self.start(text), self.start(text)
        self.assertEqual(allowed(a, "c6", 30), 30)
        b.check("/api/x", "c6", cost=0)
        wait_remaining(b, "c6", 0, "b's view of a's 30 hits")
        self.assertEqual(allowed(b, "c6", 5), 0)


    def test_idle_tables_are_not_resident_and_reloads_do_not_grow_them(self):
        # 21 limits at the default --max-keys (2^20 keys, 48 MB of table each): 1 GB if the
        # tables were resident at start, and each reload that changes them another 1 GB.
        def text(limit):
            endpoints = [{"name": f"e{i}", "path": f"/e{i}", "limit": limit, "window": "1m",
                          "algorithm": "fixed_window"} for i in range(20)]
            return json.dumps({
                "rate_limits": {"default": {"limit": limit, "window": "1m",
                                            "algorithm": "fixed_window"},
                                "endpoints": endpoints},
                "store": {"type": "redis", "address": self.redis.address, "mode": "local_sync",
                          "sync_interval": "100ms"}})

        def rss_mb(node):
            with open(f"/proc/{node.pid}/status") as f:
                return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) / 1024

        node = self.start(text(5), threads=1)
        for i in range(20):
            node.check(f"/e{i}", "c1")
        start = rss_mb(node)
        self.assertLess(start, 200, "resident at start")
        for limit in range(6, 11):
            node.rewrite(text(limit))
            status, _, body = node.request("POST", "/v1/reload", admin=True)
            self.assertEqual(status, 200, body)
            for i in range(20):
                node.check(f"/e{i}", "c1")
        wait_settled(node)
        self.assertLess(rss_mb(node), start + 100, "resident after 5 reloads")

    def test_a_full_table_says_degraded_and_reuses_the_slots_of_keys_that_are_over(self):
        node = self.start(config(self.redis, 5, "1s"), args=["--max-keys", "1024"])
        for start in range(0, 3000, 500):
            checks = [{"path": "/api/x", "method": "GET", "headers": {"X-Client": f"old{i}"}}
                      for i in range(start, start + 500)]
            status, _, body = node.request("POST", "/v1/check/batch",
                                           json.dumps({"checks": checks}))
            self.assertIn(status, (200, 429), body[:200])
        self.assertGreater(node.metrics()["sluice_sync_table_full_total"], 0)
        ready = node.readyz()
        self.assertTrue(ready["degraded"], ready)
        self.assertIn("key table is full", json.dumps(ready))
        # The old keys' windows end and the syncer forgets them: a new key gets a slot, and
        # its hits reach Redis.
        time.sleep(2.5)

        def synced():
            node.check("/api/x", "victim")
            return redis_total(self.redis, "victim") > 0
        wait_for(synced, 10, "a new key synced once the old keys' windows ended")

if __name__ == "__main__":
    redis_test.BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
