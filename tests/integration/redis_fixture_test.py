#!/usr/bin/env python3
"""Self-test of the Redis test infrastructure: redis_fixture.py (RedisServer, RespClient,
RedisCluster) and tests/with_redis.sh. Needs redis-server and redis-cli (scripts/deps).

Usage: python3 tests/integration/redis_fixture_test.py     (about 10 s)
"""
import os
import shutil
import subprocess
import sys
import textwrap
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from redis_fixture import (RedisCluster, RedisServer, RespClient, RespError,  # noqa: E402
                           key_slot, parse_info)


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie is dead
    except OSError:
        return False


class RedisServerTest(unittest.TestCase):
    def test_set_get_ttl_eval_and_restart(self):
        with RedisServer() as r:
            self.assertEqual(r.address, f"127.0.0.1:{r.port}")
            self.assertTrue(pid_alive(r.pid))
            with RespClient(r.address) as c:
                self.assertEqual(c.call("PING"), "PONG")
                self.assertEqual(c.call("SET", "k", "v", "EX", 100), "OK")
                self.assertEqual(c.call("GET", "k"), "v")
                self.assertTrue(0 < c.call("TTL", "k") <= 100)
                self.assertIsNone(c.call("GET", "missing"))
                self.assertEqual(c.call("EVAL", "return {1, 'a', {tonumber(ARGV[1])}}", 0, 7),
                                 [1, "a", [7]])
                with self.assertRaises(RespError):
                    c.call("INCR", "k")  # not an integer
                self.assertEqual(c.pipeline(("INCR", "n"), ("INCR", "k"), ("INCR", "n"))[::2],
                                 [1, 2])
                self.assertEqual(c.call("CONFIG", "GET", "save"), ["save", ""])
                self.assertEqual(c.call("CONFIG", "GET", "appendonly"), ["appendonly", "no"])
            port, pid = r.port, r.pid
            r.restart()
            self.assertEqual(r.port, port)
            self.assertNotEqual(r.pid, pid)
            self.assertFalse(pid_alive(pid))
            self.assertIsNone(r.call("GET", "k"))  # no persistence: a restart forgets
            r.call("SET", "k", "again")
            r.kill()
            self.assertFalse(r.running())
            with self.assertRaises(OSError):
                RespClient(r.address, timeout=0.5).call("PING")
            r.restart()
            self.assertEqual(r.call("PING"), "PONG")
            last_pid = r.pid
        self.assertFalse(pid_alive(last_pid))
        self.assertFalse(os.path.exists(r.dir))

    def test_password(self):
        with RedisServer(password="s3cret") as r:
            with RespClient(r.address) as c:
                with self.assertRaises(RespError) as e:
                    c.call("GET", "k")
                self.assertIn("NOAUTH", str(e.exception))
            with RespClient(r.address, password="s3cret") as c:
                self.assertEqual(c.call("SET", "k", b"\x00\xff"), "OK")
            with RespClient(r.address, password="s3cret", decode=False) as c:
                self.assertEqual(c.call("GET", "k"), b"\x00\xff")

    def test_forgotten_servers_die_with_the_process(self):
        # atexit stops a server a test forgot; PR_SET_PDEATHSIG kills one whose test was killed.
        code = textwrap.dedent(f"""
            import sys; sys.path.insert(0, {HERE!r})
            from redis_fixture import RedisServer
            r = RedisServer(); print(r.pid, r.dir, flush=True)
            if sys.argv[1] == "hang": sys.stdin.read()
        """)
        p = subprocess.run([sys.executable, "-c", code, "exit"], capture_output=True, text=True,
                           timeout=20)
        pid, tmp = p.stdout.split()
        self.assertFalse(pid_alive(int(pid)))
        self.assertFalse(os.path.exists(tmp))
        with subprocess.Popen([sys.executable, "-c", code, "hang"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as p:
            pid, tmp = p.stdout.readline().split()
            pid = int(pid)
            self.addCleanup(shutil.rmtree, tmp, True)  # a killed process cannot remove it
            self.assertTrue(pid_alive(pid))
            p.kill()
        deadline = time.time() + 5
        while pid_alive(pid) and time.time() < deadline:
            time.sleep(0.05)
        self.assertFalse(pid_alive(pid))


class WithRedisTest(unittest.TestCase):
    SCRIPT = os.path.join(ROOT, "tests", "with_redis.sh")

    def test_exports_the_address_and_passes_the_status_on(self):
        code = textwrap.dedent(f"""
            import os, sys; sys.path.insert(0, {HERE!r})
            from redis_fixture import RespClient
            a = os.environ["SLUICE_TEST_REDIS"]
            assert RespClient(a).call("SET", "x", 1) == "OK"
            print(a, flush=True)
            sys.exit(3)
        """)
        p = subprocess.run([self.SCRIPT, sys.executable, "-c", code], capture_output=True,
                           text=True, timeout=20)
        self.assertEqual(p.returncode, 3, p.stderr)
        address = p.stdout.strip()
        self.assertTrue(address.startswith("127.0.0.1:"), address)
        with self.assertRaises(OSError):  # stopped
            RespClient(address, timeout=0.5).call("PING")
        self.assertEqual(subprocess.run([self.SCRIPT, "true"], timeout=20).returncode, 0)


class RedisClusterTest(unittest.TestCase):
    def test_slots_covered_keys_routed_and_failover(self):
        t0 = time.time()
        cluster = RedisCluster()
        self.addCleanup(cluster.stop)
        self.assertLess(time.time() - t0, 15)
        self.assertEqual(len(cluster.addresses), 6)
        masters = cluster.masters()
        self.assertEqual(len(masters), 3)
        covered = sorted(r for _, _, ranges in masters for r in ranges)
        self.assertEqual(sum(b - a + 1 for a, b in covered), 16384)
        self.assertEqual(covered[0][0], 0)
        self.assertEqual(covered[-1][1], 16383)
        for node in cluster.nodes:
            info = parse_info(node.call("CLUSTER", "INFO"))
            self.assertEqual((info["cluster_state"], info["cluster_slots_ok"]), ("ok", "16384"))

        # Keys land on the master of their slot; hash tags keep keys of one user together.
        self.assertEqual(key_slot("foo"), 12182)
        self.assertEqual(key_slot("a{user:1}b"), key_slot("user:1"))
        key = "sluice:{user:1}:login"
        with cluster.client_for(key) as c:
            self.assertEqual(c.call("SET", key, "5", "EX", 60), "OK")
            self.assertEqual(c.call("WAIT", 1, 2000), 1)  # on its replica before the kill
        other = next(a for a, _, _ in masters if a != cluster.master_for(key))
        with RespClient(other) as c:
            with self.assertRaises(RespError) as e:
                c.call("GET", key)
            self.assertTrue(str(e.exception).startswith("MOVED"), e.exception)

        # Kill the master of the key: its replica takes over its slots, with the key.
        index = [a for a, _, _ in masters].index(cluster.master_for(key))
        victim_address, victim_pid, victim_slots = masters[index]
        t0 = time.time()
        promoted = cluster.kill_master(index)
        self.assertLess(time.time() - t0, 15)
        self.assertFalse(pid_alive(victim_pid))
        self.assertNotEqual(promoted, victim_address)
        self.assertIn((promoted, cluster.node(promoted).pid, victim_slots), cluster.masters())
        self.assertEqual(cluster.master_for(key), promoted)
        with cluster.client_for(key) as c:
            self.assertEqual(c.call("GET", key), "5")
            self.assertTrue(0 < c.call("TTL", key) <= 60)
        info = parse_info(cluster.node(promoted).call("CLUSTER", "INFO"))
        self.assertEqual(info["cluster_state"], "ok")

        # The old master comes back as a replica.
        cluster.restart_node(victim_address)
        self.assertEqual(cluster.node(victim_address).call("ROLE")[0], "slave")

        pids = [n.pid for n in cluster.nodes]
        cluster.stop()
        self.assertFalse(any(pid_alive(p) for p in pids))


if __name__ == "__main__":
    unittest.main(verbosity=2)
