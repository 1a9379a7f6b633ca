#!/usr/bin/env python3
"""Integration tests of the Redis store: the real sluice binary, real HTTP clients and real
redis-server processes (redis_fixture.py), all on 127.0.0.1.

Usage: redis_test.py path/to/sluice [unittest args]   (about 15 s, also under ASan; needs
redis-server, scripts/deps). REDIS_TEST_VERBOSE=1 prints the outage tests' timings.

What users rely on:
- several Sluice processes sharing one Redis admit exactly the limit, never more, under
  concurrent clients, for every algorithm; the decision API answers as with the memory store;
- a Redis that dies, freezes, never started or refuses the password: every rule answers by its
  fail_mode (open: 200, closed: 429, local: this process' own counters), no client sees an
  error, the process stays up, /readyz and /metrics tell, and decisions are back in Redis
  within a second of Redis answering again;
- a frozen Redis costs a request no more than the store's deadline; a refused password does
  not make Sluice reconnect in a tight loop;
- keys carry the client's hash tag, the configured prefix and an expiry;
- a reload (SIGHUP) keeps deciding through Redis, and unchanged limits keep their counts.

Every process is started here and stopped by its PID (redis-server by redis_fixture).
"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from redis_fixture import (RedisServer, RespClient, free_port, port_taken,  # noqa: E402
                           read_log, spawn)

BIN = None
VERBOSE = bool(os.environ.get("REDIS_TEST_VERBOSE"))  # timings of the outage tests on stderr
ALGORITHMS = ["fixed_window", "token_bucket", "gcra", "sliding_window_log",
              "sliding_window_counter"]

def wait_for(cond, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(interval)


def far_window(margin=900):
    """A window (in whole hours) whose epoch-aligned edges are at least `margin` seconds away,
    so that no fixed window restarts while a test counts (fixed windows start at multiples of
    the window since the epoch)."""
    now = time.time()
    for hours in range(24, 48):
        w = hours * 3600
        if margin < now % w < w - margin:
            return f"{hours}h"
    raise AssertionError("no window far from its edges")  # cannot happen: edges differ


def rule(name, path, limit, window, algorithm=None, fail_mode=None, key="header:X-Client"):
    r = {"name": name, "path": path, "limit": limit, "window": window, "key": key}
    if algorithm:
        r["algorithm"] = algorithm
    if fail_mode:
        r["fail_mode"] = fail_mode
    return r


def config_yaml(endpoints, store=None):
    """A config file's text (JSON is YAML): endpoint rules, a default rule, a store."""
    c = {"rate_limits": {"default": {"requests_per_minute": 100000}, "endpoints": endpoints}}
    if store:
        c["store"] = store
    return json.dumps(c, indent=1)


def redis_store(redis, **kw):
    s = {"type": "redis", "address": redis if isinstance(redis, str) else redis.address}
    s.update(kw)
    return s


class Sluice:
    """One `sluice serve` on free loopback ports; its log goes to a temp file."""

    def __init__(self, config_text, threads=2, args=()):
        fd, self.config = tempfile.mkstemp(prefix="sluice-redis-test-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(config_text)
        # The ports are free when picked, but another process may take one before sluice
        # binds it: then sluice is started again on new ports.
        for attempt in range(5):
            if self._start(threads, args, last=attempt == 4):
                return

    def _start(self, threads, args, last):
        self.port, self.admin_port = free_port(), free_port()
        self.logfile = tempfile.TemporaryFile()
        self.proc = spawn(
            [BIN, "serve", "--config", self.config, "--listen", f"127.0.0.1:{self.port}",
             "--admin", f"127.0.0.1:{self.admin_port}", "--threads", str(threads), *args],
            stdin=subprocess.DEVNULL, stdout=self.logfile, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        for port in (self.admin_port, self.port):
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    if self.proc.poll() is not None:
                        if not last and port_taken(self.log()):
                            self.logfile.close()
                            return False
                        self._cleanup_files()
                        raise RuntimeError("sluice exited: " + self.log())
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError("sluice did not start: " + self.log())
                    time.sleep(0.02)
        return True

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log(self):
        if self.logfile.closed:
            return getattr(self, "_log", "")
        return read_log(self.logfile)

    def rewrite(self, config_text):
        with open(self.config, "w") as f:
            f.write(config_text)

    def request(self, method, path, body=None, headers=None, admin=False):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port if admin else self.port,
                                          timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def check(self, path, client, cost=None):
        payload = {"path": path, "method": "GET", "headers": {"X-Client": client}}
        if cost is not None:
            payload["cost"] = cost
        status, headers, body = self.request("POST", "/v1/check", json.dumps(payload))
        return status, headers, json.loads(body)

    def readyz(self):
        status, _, body = self.request("GET", "/readyz", admin=True)
        assert status == 200, status
        return json.loads(body)

    def metrics(self):
        """{'sluice_degraded_decisions_total{fail_mode="open"}': 3.0, ...}"""
        _, _, body = self.request("GET", "/metrics", admin=True)
        out = {}
        for line in body.decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def _cleanup_files(self):
        if not self.logfile.closed:
            self._log = self.log()
            self.logfile.close()
        if os.path.exists(self.config):
            os.unlink(self.config)

    def stop(self):
        """SIGTERM by PID, wait (SIGKILL after 10 s); returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._cleanup_files()
        return self.proc.returncode


class Answer:
    __slots__ = ("sent", "done", "server", "surface", "path", "client", "status", "allowed",
                 "degraded", "remaining", "body")

    def __repr__(self):
        return (f"Answer({self.surface} {self.path} {self.client} -> {self.status} "
                f"degraded={self.degraded} remaining={self.remaining} "
                f"sent={self.sent:.3f} done={self.done:.3f})")


def send(conn, surface, path, client):
    """One decision on a keep-alive connection: `gw` (gateway GET) or `check` (/v1/check)."""
    a = Answer()
    a.surface, a.path, a.client, a.server = surface, path, client, None
    a.sent = time.monotonic()
    if surface == "gw":
        conn.request("GET", path, headers={"X-Client": client})
    else:
        conn.request("POST", "/v1/check", headers={"Content-Type": "application/json"},
                     body=json.dumps({"path": path, "method": "GET",
                                      "headers": {"X-Client": client}}))
    r = conn.getresponse()
    data = r.read()
    a.done = time.monotonic()
    a.status = r.status
    remaining = r.getheader("X-RateLimit-Remaining")
    a.remaining = int(remaining) if remaining is not None else None
    a.allowed, a.degraded, a.body = r.status == 200, None, None
    if surface == "check":
        try:
            a.body = json.loads(data)
            a.allowed = a.body.get("allowed")
            a.degraded = a.body.get("degraded")
        except ValueError:
            a.body = data
    return a


class Load:
    """Steady concurrent load: one thread per (server, surface, paths, client) with its own
    keep-alive connection, cycling through `paths` until stop(); every answer and every
    transport error is recorded."""

    def __init__(self, plans, pause=0.002):
        self.answers, self.errors = [], []
        self.sent_times = {}  # (surface, path): when each answered request was sent
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(p, pause), daemon=True)
                         for p in plans]
        for t in self._threads:
            t.start()

    def _run(self, plan, pause):
        server, surface, paths, client = plan
        mine, i = [], 0
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        while not self._stop.is_set():
            path = paths[i % len(paths)]
            i += 1
            try:
                a = send(conn, surface, path, client)
                a.server = server
                mine.append(a)
                with self._lock:
                    self.sent_times.setdefault((surface, path), []).append(a.sent)
            except Exception as e:  # any transport error reached a client
                with self._lock:
                    self.errors.append(f"{surface} {path}: {e!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
            time.sleep(pause)
        conn.close()
        with self._lock:
            self.answers.extend(mine)

    def answered_since(self, t, n, deadline_s=20):
        """Until every (surface, path) has more than n answers to requests sent after t (a
        slow machine takes longer to send them), at most deadline_s."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            with self._lock:
                counts = [sum(1 for x in times if x > t) for times in self.sent_times.values()]
            if counts and min(counts) > n:
                return
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        return self.answers


class Poller:
    """Polls /readyz every 50 ms in the background: [(time asked, time answered, readyz json),
    ...]: an answer says how things were at some moment between the two."""

    def __init__(self, server):
        self.samples, self.errors = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server,), daemon=True)
        self._thread.start()

    def _run(self, server):
        while not self._stop.is_set():
            try:
                asked = time.monotonic()
                r = server.readyz()
                self.samples.append((asked, time.monotonic(), r))
            except Exception as e:
                self.errors.append(repr(e))
            time.sleep(0.05)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=30)
        return self.samples


def scan(redis, pattern):
    keys, cursor = [], "0"
    with redis.client() as c:
        while True:
            cursor, batch = c.call("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            keys.extend(batch)
            if cursor == "0":
                return sorted(keys)


class RedisTestCase(unittest.TestCase):
    def start_redis(self, **kw):
        r = RedisServer(**kw)
        self.addCleanup(r.stop)
        return r

    def start_sluice(self, config_text, threads=2):
        s = Sluice(config_text, threads)
        self.addCleanup(self._stop_sluice, s)
        return s

    def _stop_sluice(self, s):
        # A clean exit also means no sanitizer report under ASan/UBSan.
        code = s.stop()
        self.assertEqual(code, 0, f"sluice exited {code}:\n{s.log()[-3000:]}")

    def assert_alive(self, *servers):
        for s in servers:
            self.assertTrue(s.alive(), f"sluice died:\n{s.log()[-3000:]}")


# ---------------------------------------------------------------------------------------------
# Several processes, one Redis: exact counts


class SharedCountsTest(RedisTestCase):
    """Three Sluice processes on one Redis, one rule per algorithm."""

    LIMIT = 100

    @classmethod
    def setUpClass(cls):
        cls.redis = RedisServer()
        cls.window = far_window()
        cls.rules = [rule(a, "/" + a, cls.LIMIT, cls.window, algorithm=a) for a in ALGORITHMS]
        cls.servers = []
        try:
            # A generous deadline: these tests count, they do not exercise timeouts.
            text = config_yaml(cls.rules, redis_store(cls.redis, timeout="2s", fail_mode="closed"))
            for _ in range(3):
                cls.servers.append(Sluice(text))
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        codes = [(s.stop(), s) for s in cls.servers]
        cls.redis.stop()
        for code, s in codes:
            if code != 0:
                raise AssertionError(f"sluice exited {code}:\n{s.log()[-3000:]}")

    def test_exactly_the_limit_across_three_processes_for_every_algorithm(self):
        threads, per_thread = 12, 25  # 300 requests for a limit of 100
        for algorithm in ALGORITHMS:
            with self.subTest(algorithm=algorithm):
                client = f"{algorithm}-{uuid.uuid4().hex[:8]}"
                conns = [http.client.HTTPConnection("127.0.0.1", self.servers[i % 3].port,
                                                    timeout=10) for i in range(threads)]
                barrier = threading.Barrier(threads)
                answers, errors = [], []

                def hammer(i):
                    mine = []
                    surface = "gw" if i % 2 == 0 else "check"
                    try:
                        barrier.wait()
                        for _ in range(per_thread):
                            a = send(conns[i], surface, "/" + algorithm, client)
                            a.server = self.servers[i % 3]
                            mine.append(a)
                    except Exception as e:
                        errors.append(repr(e))
                    answers.extend(mine)  # list.extend is atomic under the GIL

                ts = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                for c in conns:
                    c.close()
                self.assertEqual(errors, [])
                self.assertEqual(len(answers), threads * per_thread)
                statuses = [a.status for a in answers]
                self.assertEqual(set(statuses) - {200, 429}, set())
                admitted = [a for a in answers if a.status == 200]
                self.assertEqual(len(admitted), self.LIMIT)
                self.assertEqual(statuses.count(429), threads * per_thread - self.LIMIT)
                # Every admitted request saw its own count: 99, 98, ..., 0 exactly once.
                self.assertEqual(sorted(a.remaining for a in admitted), list(range(self.LIMIT)))
                for a in answers:
                    if a.surface == "check":
                        self.assertEqual(a.allowed, a.status == 200, a)
                        self.assertNotIn("degraded", a.body, a)
                # the three processes shared the work
                for s in self.servers:
                    self.assertEqual(sum(1 for a in answers if a.server is s),
                                     threads // 3 * per_thread)
        for s in self.servers:
            m = s.metrics()
            for mode in ("open", "closed", "local"):
                self.assertEqual(m[f'sluice_degraded_decisions_total{{fail_mode="{mode}"}}'], 0)
        self.assert_alive(*self.servers)

    def test_decision_api_answers_as_the_memory_store_does(self):
        memory = self.start_sluice(config_yaml(self.rules))
        shared = self.servers[1]
        client = "api-" + uuid.uuid4().hex[:8]
        fw, tb = "/fixed_window", "/token_bucket"

        def both(method, path, payload):
            out = []
            for s in (memory, shared):
                status, headers, body = s.request(method, path, json.dumps(payload))
                out.append((status, headers, json.loads(body)))
            return out

        def check(path, cost=None):
            p = {"path": path, "method": "GET", "headers": {"X-Client": client}}
            if cost is not None:
                p["cost"] = cost
            return p

        def same(m, r, where):
            self.assertNotIn("degraded", r, where)
            self.assertEqual(sorted(m), sorted(r), where)
            for k in m:
                if k in ("reset", "retry_after") and isinstance(m[k], int):
                    self.assertLessEqual(abs(m[k] - r[k]), 2, (where, k, m, r))
                elif k == "reset_after_ms":
                    self.assertLessEqual(abs(m[k] - r[k]), 2000, (where, k, m, r))
                else:
                    self.assertEqual(m[k], r[k], (where, k, m, r))

        def same_answer(pair, where):
            (ms, mh, mb), (rs, rh, rb) = pair
            self.assertEqual(ms, rs, where)
            keep = {"content-type", "retry-after", "ratelimit-policy", "ratelimit"}
            self.assertEqual({k for k in mh if k.startswith("x-ratelimit") or k in keep},
                             {k for k in rh if k.startswith("x-ratelimit") or k in keep}, where)
            for k in ("x-ratelimit-limit", "x-ratelimit-remaining", "ratelimit-policy"):
                self.assertEqual(mh.get(k), rh.get(k), (where, k))
            if "results" in mb:
                self.assertEqual(sorted(mb), ["results"])
                self.assertEqual(len(mb["results"]), len(rb["results"]), where)
                for i, (m, r) in enumerate(zip(mb["results"], rb["results"])):
                    same(m, r, f"{where} results[{i}]")
            else:
                same(mb, rb, where)

        pair = both("POST", "/v1/check", check(fw))
        same_answer(pair, "first check")
        self.assertEqual((pair[1][0], pair[1][2]["remaining"]), (200, self.LIMIT - 1))
        batch = {"checks": [check(fw), check(fw, 3), check(tb), check("/gcra"),
                            check("/sliding_window_log"), check("/sliding_window_counter", 2),
                            check(fw, 0), check(fw, self.LIMIT + 1), check("/other")]}
        pair = both("POST", "/v1/check/batch", batch)
        same_answer(pair, "batch")
        results = pair[1][2]["results"]
        self.assertEqual([r["allowed"] for r in results], [True] * 7 + [False, True])
        self.assertEqual([r["remaining"] for r in results[:7]],
                         [self.LIMIT - 2, self.LIMIT - 5, self.LIMIT - 1, self.LIMIT - 1,
                          self.LIMIT - 1, self.LIMIT - 2, self.LIMIT - 5])
        self.assertIsNone(results[7]["retry_after"])  # more than the limit can never pass
        same_answer(both("POST", "/v1/check", check(fw, self.LIMIT + 1)), "cost above limit")
        same_answer(both("POST", "/v1/check", check(fw, self.LIMIT - 5)), "spend the rest")
        pair = both("POST", "/v1/check", check(fw))
        same_answer(pair, "limited")
        status, headers, body = pair[1]
        self.assertEqual((status, body["allowed"], body["remaining"]), (429, False, 0))
        self.assertEqual(int(headers["retry-after"]), body["retry_after"])
        self.assertGreater(body["retry_after"], 0)
        # the batch's checks were decided through Redis
        keys = scan(self.redis, f"sluice:{{header:x-client={client}}}:*")
        self.assertEqual(len(keys), len(ALGORITHMS), keys)


# ---------------------------------------------------------------------------------------------
# Redis down: fail modes and recovery

LOCAL_LIMIT = 5
PATHS = {"/open": "open", "/closed": "closed", "/local": "local"}


def fail_mode_config(redis_address, **store):
    """Three rules, one per fail mode, and a store that gives up on Redis quickly. The
    deadline is 100 ms rather than a production-like 5-20 ms: on a loaded 2-core machine
    (and under ASan) Sluice or Redis is now and then off the CPU for more than 20 ms, and
    calls then time out while Redis is fine, which the tests here count as a failure."""
    endpoints = [rule("open", "/open", 100000, "1d", fail_mode="open"),
                 rule("closed", "/closed", 100000, "1d", fail_mode="closed"),
                 rule("local", "/local", LOCAL_LIMIT, "1d", fail_mode="local")]
    s = {"timeout": "100ms", "fail_mode": "closed",
         "circuit_breaker": {"failures": 3, "open_for": "300ms"}}
    s.update(store)
    return config_yaml(endpoints, redis_store(redis_address, **s))


def degraded_counts(server):
    m = server.metrics()
    return {mode: m[f'sluice_degraded_decisions_total{{fail_mode="{mode}"}}']
            for mode in PATHS.values()}


def store_errors(server):
    m = server.metrics()
    return sum(m[f'sluice_store_errors_total{{kind="{k}"}}']
               for k in ("timeout", "connection", "server"))


class FailModeTest(RedisTestCase):
    def outage(self, server, stop, resume, down_for=1.5):
        """Runs steady load on `server`; after 0.8 s calls stop() (returns once Redis cannot
        answer), keeps the load for `down_for` s, calls resume() (returns once Redis answers),
        keeps the load until each path has 6 answers sent 1 s after that. Returns (answers, errors, readyz samples, times)."""
        plans = []
        for i in range(6):
            surface = "check" if i < 4 else "gw"
            plans.append((server, surface, list(PATHS), f"c{i}-{uuid.uuid4().hex[:6]}"))
        before = degraded_counts(server)
        poller = Poller(server)
        load = Load(plans)
        try:
            time.sleep(0.8)
            t_stop = time.monotonic()
            stop()
            t_down = time.monotonic()  # Redis cannot answer from here on
            time.sleep(down_for)
            t_resume = time.monotonic()  # nor until here
            resume()
            t_back = time.monotonic()  # Redis answers PING
            time.sleep(1.0)
            load.answered_since(t_back + 1.0, 5)  # check_outage's "after" group
        finally:
            answers = load.stop()
            samples = poller.stop()
        self.assertEqual(poller.errors, [])
        after = degraded_counts(server)
        for mode in PATHS.values():
            self.assertGreater(after[mode], before[mode], f"degraded {mode} not counted")
        return answers, load.errors, samples, (t_stop, t_down, t_resume, t_back)

    def test_a_dropped_connection_costs_only_the_calls_on_it(self):
        # Redis (or a proxy, or an idle timeout) drops Sluice's connections under load. The
        # calls pipelined on them fail together, which the breaker counts as one failure,
        # and the requests after them wait for the redial: they are decided in Redis, not
        # by the fail mode for the breaker's open time.
        redis = self.start_redis()
        s = self.start_sluice(fail_mode_config(redis.address))
        clients = 8
        degraded, decided, stop = [], [], threading.Event()

        def run(i):
            while not stop.is_set():
                status, _, body = s.check("/closed", f"drop-{i}")
                (degraded if body.get("degraded") else decided).append(time.monotonic())

        threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            with RespClient(redis.address) as c:
                killed = c.call("CLIENT", "KILL", "TYPE", "normal")
            t_kill = time.monotonic()
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)
        self.assertGreater(killed, 0)
        # At most the calls in flight when the connections dropped: one per client.
        self.assertLessEqual(len(degraded), clients, f"{len(degraded)} degraded answers")
        self.assertTrue(any(t > t_kill + 0.1 for t in decided), "no decision in Redis after")

    def check_outage(self, answers, errors, samples, times, fresh_redis):
        t_stop, t_down, t_resume, t_back = times
        if VERBOSE:
            back = [a.sent - t_back for a in answers if a.sent > t_back and a.surface == "check"
                    and a.degraded is None]
            print(f"\n  {len(answers)} answers, stop {t_down - t_stop:.3f} s, resume "
                  f"{t_back - t_resume:.3f} s, first Redis decision {min(back):.3f} s after, "
                  f"last degraded sent {max(a.sent for a in answers if a.degraded) - t_back:.3f}"
                  f" s after, slowest answer {max(a.done - a.sent for a in answers):.3f} s",
                  file=sys.stderr)
        self.assertEqual(errors, [], "transport errors reached clients")
        statuses = {a.status for a in answers}
        self.assertEqual(statuses - {200, 429}, set(), "status codes other than 200/429")
        recovered_by = t_back + 1.0
        down = [a for a in answers if a.sent > t_down and a.done < t_resume]
        before = [a for a in answers if a.done < t_stop]
        after = [a for a in answers if a.sent > recovered_by]
        for group, name in ((down, "down"), (before, "before"), (after, "after")):
            for path in PATHS:
                for surface in ("check", "gw"):
                    n = sum(1 for a in group if a.path == path and a.surface == surface)
                    self.assertGreater(n, 5, f"too few {surface} {path} answers {name}")
        for a in answers:
            mode = PATHS[a.path]
            if a.surface == "check":
                self.assertEqual(a.allowed, a.status == 200, a)
                self.assertIn(a.degraded, (None, mode), a)
                if a.degraded:  # only around the outage
                    self.assertTrue(t_stop < a.done and a.sent < recovered_by,
                                    f"{a}: sent {a.sent - t_stop:+.3f} s after the outage began,"
                                    f" {a.sent - t_back:+.3f} s after Redis answered again")
            if mode == "open":
                self.assertEqual(a.status, 200, a)
        for a in down:  # Redis could not answer these at all
            mode = PATHS[a.path]
            if a.surface == "check":
                self.assertEqual(a.degraded, mode, a)
            if mode == "closed":
                self.assertEqual(a.status, 429, a)
        for a in before + after:
            if a.surface == "check":
                self.assertIsNone(a.degraded, f"decided without Redis while it answered: {a}")
            if PATHS[a.path] == "closed":
                self.assertEqual(a.status, 200, a)
        # local: each client's degraded answers (in its own order) admit the limit from this
        # process' counters, then reject.
        by_client = {}
        for a in sorted(answers, key=lambda a: a.sent):
            if a.path == "/local" and a.degraded == "local":
                by_client.setdefault(a.client, []).append(a.status)
        self.assertEqual(len(by_client), 4)
        for client, got in by_client.items():
            self.assertGreater(len(got), LOCAL_LIMIT, client)
            self.assertEqual(got, [200] * LOCAL_LIMIT + [429] * (len(got) - LOCAL_LIMIT), client)
        # local through Redis: the limit per client before the outage (and after a restart,
        # which forgets every count), never more. (A call that timed out while Redis came
        # back may have spent in Redis: then fewer, never more.)
        for phase, group in (("before", [a for a in answers if a.sent < t_stop]),
                             ("after", [a for a in answers if a.sent > t_down])):
            if phase == "after" and not fresh_redis:
                continue
            per = {}
            for a in sorted(group, key=lambda a: a.sent):
                if a.path == "/local" and a.surface == "check" and a.degraded is None:
                    per.setdefault(a.client, []).append(a.status)
            for client, got in per.items():
                admitted = got.count(200)
                self.assertEqual(got, [200] * admitted + [429] * (len(got) - admitted),
                                 (phase, client))
                late_degraded = any(a.client == client and a.degraded and a.sent > t_resume
                                    for a in answers)
                if not late_degraded:
                    self.assertEqual(admitted, min(LOCAL_LIMIT, len(got)), (phase, client))
                self.assertLessEqual(admitted, LOCAL_LIMIT, (phase, client))
        # /readyz: ready all along, degraded during the outage, not once Redis is back
        self.assertTrue(all(s["ready"] and s["store"] == "redis" for _, _, s in samples))
        during = [s for asked, answered, s in samples
                  if t_down + 0.5 < asked and answered < t_resume]
        self.assertTrue(during and all(s["degraded"] for s in during), during)
        self.assertTrue(any(s["store_state"] != "ok" for s in during), during)
        later = [s for asked, _, s in samples if asked > recovered_by]
        self.assertTrue(later and not any(s["degraded"] for s in later), later)
        self.assertTrue(all(s["store_state"] == "ok" for s in later), later)

    def check_back_in_redis(self, redis, server):
        client = "fresh-" + uuid.uuid4().hex[:8]
        for path in PATHS:
            status, _, body = server.check(path, client)
            self.assertEqual(status, 200, body)
            self.assertNotIn("degraded", body)
        keys = scan(redis, f"sluice:{{header:x-client={client}}}:*")
        self.assertEqual([k.split("}:")[1].rsplit("~", 1)[0] for k in keys],
                         ["closed/limit", "local/limit", "open/limit"], keys)

    def test_redis_killed_and_restarted_under_load(self):
        redis = self.start_redis()
        s = self.start_sluice(fail_mode_config(redis.address))
        errors_before = store_errors(s)
        answers, errors, samples, times = self.outage(s, redis.kill, redis.restart)
        self.assert_alive(s)
        self.check_outage(answers, errors, samples, times, fresh_redis=True)
        self.assertGreater(store_errors(s), errors_before)
        # decisions made after the restart are in the new (empty) Redis
        clients = {a.client for a in answers}
        self.assertTrue(scan(redis, "sluice:*"))
        for key in scan(redis, "sluice:*"):
            self.assertIn(key.split("{")[1].split("}")[0].split("=", 1)[1], clients)
        self.check_back_in_redis(redis, s)

    def test_redis_frozen_then_resumed(self):
        redis = self.start_redis()
        s = self.start_sluice(fail_mode_config(redis.address))

        def freeze():
            os.kill(redis.pid, signal.SIGSTOP)
            wait_for(lambda: _proc_state(redis.pid) == "T", 5, "redis-server stopped")

        def thaw():
            os.kill(redis.pid, signal.SIGCONT)
            wait_for(lambda: _ping(redis), 5, "redis-server answering")

        self.addCleanup(lambda: redis.running() and os.kill(redis.pid, signal.SIGCONT))
        answers, errors, samples, times = self.outage(s, freeze, thaw)
        self.assert_alive(s)
        self.check_outage(answers, errors, samples, times, fresh_redis=False)
        m = s.metrics()
        self.assertGreater(m['sluice_store_errors_total{kind="timeout"}'], 0)
        # a frozen Redis costs each request at most the store's deadline, not a hang
        down = [a for a in answers if a.sent > times[1] and a.done < times[2]]
        self.assertLess(max(a.done - a.sent for a in down), 1.0)
        self.check_back_in_redis(redis, s)

    def test_frozen_redis_costs_each_request_only_the_deadline(self):
        # No breaker (it would answer without trying), one worker thread (one connection),
        # a long connect timeout: every request tries the frozen Redis and must get its
        # fail-mode answer by the 20 ms deadline, not by the connect timeout (1 s) nor by the
        # stall timeout that closes a silent connection (1 s).
        for password in (None, "pw-deadline"):
            with self.subTest(password=password):
                redis = self.start_redis(password=password)
                auth = {"password": password} if password else {}
                s = self.start_sluice(fail_mode_config(
                    redis.address, timeout="20ms", connect_timeout="1s", **auth,
                    circuit_breaker={"failures": 1000, "open_for": "1s"}), threads=1)
                if password is None:  # the connection is made and idle: the connect is over
                    wait_for(lambda: "degraded" not in s.check("/open", "warm")[2], 5,
                             "a decision through Redis")
                    time.sleep(0.3)
                os.kill(redis.pid, signal.SIGSTOP)
                self.addCleanup(lambda r=redis: r.running() and os.kill(r.pid, signal.SIGCONT))
                wait_for(lambda: _proc_state(redis.pid) == "T", 5, "redis-server stopped")
                took = []
                for _ in range(4):
                    t0 = time.monotonic()
                    status, _, body = s.check("/open", "frozen")
                    took.append(round(time.monotonic() - t0, 3))
                    self.assertEqual((status, body.get("degraded")), (200, "open"), body)
                os.kill(redis.pid, signal.SIGCONT)
                self.assertLess(max(took), 0.3, f"seconds per request: {took}")
                self.assert_alive(s)

    def test_redis_never_started(self):
        port = free_port()  # nothing listens here until the end of the test
        s = self.start_sluice(fail_mode_config(f"127.0.0.1:{port}"))
        client = "never-" + uuid.uuid4().hex[:8]
        for i in range(LOCAL_LIMIT + 3):
            for path, mode in PATHS.items():
                status, h, body = s.check(path, client)
                expect = 200 if mode == "open" or (mode == "local" and i < LOCAL_LIMIT) else 429
                self.assertEqual((status, body["allowed"], body["degraded"]),
                                 (expect, expect == 200, mode), (i, path, body))
                if mode == "local":
                    self.assertEqual(body["remaining"], max(LOCAL_LIMIT - 1 - i, 0))
            for path, mode in PATHS.items():
                status, _, _ = s.request("GET", path, headers={"X-Client": "gw-" + client})
                expect = 200 if mode == "open" or (mode == "local" and i < LOCAL_LIMIT) else 429
                self.assertEqual(status, expect, (i, path))
        ready = s.readyz()
        self.assertEqual((ready["ready"], ready["store"], ready["degraded"]), (True, "redis", True))
        self.assertGreater(store_errors(s), 0)
        self.assert_alive(s)
        # Redis starts: decisions go to it within a second.
        redis = self.start_redis(port=port)
        t_back = time.monotonic()

        def through_redis():
            status, _, body = s.check("/closed", client)
            return status == 200 and "degraded" not in body
        wait_for(through_redis, 1.0, "decisions back in Redis")
        self.assertLess(time.monotonic() - t_back, 1.0)
        self.check_back_in_redis(redis, s)
        self.assertFalse(s.readyz()["degraded"])

    def test_a_redis_named_by_host_name(self):
        # A name resolves off the worker's loop (a cluster announcing hostnames, a
        # Kubernetes service): decisions go through it; a name that does not resolve is a
        # store that cannot be reached, with its reason, and the requests decide by their
        # fail_mode.
        redis = self.start_redis()
        s = self.start_sluice(fail_mode_config(f"localhost:{redis.port}"))
        client = "named-" + uuid.uuid4().hex[:8]
        status, _, body = s.check("/closed", client)
        self.assertEqual(status, 200, body)
        self.assertNotIn("degraded", body)
        bad = self.start_sluice(fail_mode_config("no-such-host.invalid:6379"))
        status, _, body = bad.check("/open", client)
        self.assertEqual((status, body.get("degraded")), (200, "open"), body)
        wait_for(lambda: "cannot resolve no-such-host.invalid" in bad.log(), 5,
                 "the resolution failure logged")
        self.assertEqual(bad.request("GET", "/healthz", admin=True)[0], 200)

    def test_readyz_reports_a_redis_no_connection_reaches_with_no_traffic(self):
        # Before any decision (or fewer failed ones than open the breaker), a store no
        # connection comes up to is not "ok": /readyz says so, and why; and says ok again
        # once one comes up, with no traffic either.
        port = free_port()
        s = self.start_sluice(fail_mode_config(f"127.0.0.1:{port}"))
        ready = wait_for(lambda: (lambda r: r if r["degraded"] else None)(s.readyz()), 5,
                         "readyz degraded with no decision")
        self.assertEqual(ready["store_state"],
                         f"unavailable: no connection comes up (127.0.0.1:{port}: connect: "
                         "Connection refused), rules decide by their fail_mode")
        self.start_redis(port=port)
        ready = wait_for(lambda: (lambda r: r if not r["degraded"] else None)(s.readyz()), 5,
                         "readyz back with no decision")
        self.assertEqual(ready["store_state"], "ok")

    def test_a_redis_that_refuses_the_connection_is_logged_with_its_reason(self):
        # At maxclients Redis writes why before it closes; that is what an operator needs.
        redis = self.start_redis(extra_args=["--maxclients", "1"])
        holder = RespClient(redis.address)
        self.addCleanup(holder.close)
        holder.call("PING")
        s = self.start_sluice(fail_mode_config(redis.address))
        wait_for(lambda: "max number of clients reached" in s.log(), 5, "the reason logged")
        # Redis answers the connection's first command (PING) with it, then closes.
        self.assertIn("PING: ERR max number of clients reached; reconnecting", s.log())
        # /readyz names it too (polled: the redials' closes and resets come and go).
        wait_for(lambda: "max number of clients reached" in s.readyz()["store_state"], 5,
                 "the reason in /readyz")

    def test_readyz_names_the_outage_not_an_old_error_answer(self):
        # An error answer long before (the NOSCRIPT of a flushed script cache, answered by
        # EVAL at once) is not why Redis went away, and the outage's own reason replaces
        # Redis' words within seconds, however often the redials fail.
        redis = self.start_redis()
        s = self.start_sluice(fail_mode_config(redis.address))
        self.assertEqual(s.check("/closed", "a")[0], 200)
        with RespClient(redis.address) as c:
            c.call("SCRIPT", "FLUSH")
        status, _, body = s.check("/closed", "a")
        self.assertEqual(status, 200, body)
        self.assertNotIn("degraded", body)
        time.sleep(1.2)
        redis.kill()
        for _ in range(5):
            s.check("/open", "a")
        ready = wait_for(lambda: (lambda r: r if "Connection refused" in r["store_state"]
                                  else None)(s.readyz()), 10, "the outage's reason in /readyz")
        self.assertNotIn("NOSCRIPT", ready["store_state"])
        self.assertNotIn("closed by Redis after: NOSCRIPT", s.log())

    def test_a_node_one_of_whose_pooled_connections_is_refused_is_not_down(self):
        # Two connections, room at Redis for one (maxclients): every decision goes through
        # Redis, so neither /readyz nor the unreachable gauge may say the node is down.
        redis = self.start_redis(extra_args=["--maxclients", "1"])
        s = self.start_sluice(fail_mode_config(redis.address, pool_size=2), threads=1)
        wait_for(lambda: "max number of clients reached" in s.log(), 5, "the refusal logged")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            status, _, body = s.check("/closed", "a")
            self.assertEqual(status, 200, body)
            self.assertNotIn("degraded", body)
            ready = s.readyz()
            self.assertEqual((ready["degraded"], ready["store_state"]), (False, "ok"), ready)
            self.assertEqual(s.metrics()["sluice_redis_nodes_unreachable"], 0)
            time.sleep(0.1)

    def test_readyz_reports_a_redis_that_refuses_decisions_from_the_start(self):
        # A Redis that answers but refuses what every decision needs (a password Sluice
        # lacks, a read-only replica, an ACL without EVALSHA) is not "ok" until traffic
        # trips the breaker: /readyz says so, and why, with no decision made.
        master = self.start_redis()
        replica = self.start_redis()
        with RespClient(replica.address) as c:
            host, port = master.address.split(":")
            c.call("REPLICAOF", host, port)
        locked = self.start_redis()
        with RespClient(locked.address) as c:
            c.call("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-evalsha", "-eval")
        cases = [(fail_mode_config(replica.address), "READONLY"),
                 (fail_mode_config(locked.address, username="limited", password="pw"),
                  "NOPERM"),
                 (None, "NOAUTH")]
        for config, reason in cases:
            with self.subTest(reason=reason):
                if config is None:  # a password set on Redis, not yet given to Sluice
                    with RespClient(locked.address) as c:
                        c.call("CONFIG", "SET", "requirepass", "sekret")
                    config = fail_mode_config(locked.address)
                s = self.start_sluice(config)
                # Polled: an unauthenticated Redis may also reset the connection on the
                # start's longer commands, and a reset can take its answer with it; the
                # probes /readyz sends meet the refusal again.
                ready = wait_for(lambda: (lambda r: r if reason in r["store_state"] else None)(
                    s.readyz()), 10, f"readyz naming {reason} with no decision")
                self.assertTrue(ready["degraded"], ready)
                # A connection is usable once Redis answered its PING: NOAUTH is the
                # connection's failure; the others refuse only what decisions need.
                self.assertIn("unavailable: no connection comes up" if reason == "NOAUTH" else
                              "unavailable: circuit breaker open", ready["store_state"])
                wait_for(lambda: reason in s.log(), 10, f"{reason} logged")

    def test_a_redis_that_evicts_keys_is_warned_about_once(self):
        # At maxmemory, any policy but noeviction drops counts: a limited client is admitted
        # again. volatile-* evicts Sluice's keys (all of which expire) first.
        evicting = self.start_redis(extra_args=["--maxmemory", "100mb",
                                                "--maxmemory-policy", "volatile-lru"])
        s = self.start_sluice(fail_mode_config(evicting.address))
        warning = (f"WARN redis {evicting.address} evicts keys at maxmemory (maxmemory-policy "
                   "volatile-lru): a count it evicts is lost and its client admitted again "
                   "(Sluice's keys, which all expire, go first); give Sluice a Redis with "
                   "noeviction")
        wait_for(lambda: warning in s.log(), 5, "the eviction warning")
        self.assertEqual(s.check("/closed", "evict")[0], 200)
        self.assertEqual(s.log().count("evicts keys at maxmemory"), 1)  # not once per worker
        plain = self.start_redis()  # maxmemory 0: nothing is evicted
        s2 = self.start_sluice(fail_mode_config(plain.address))
        self.assertEqual(s2.check("/closed", "evict")[0], 200)
        self.assertNotIn("evicts keys", s2.log())

    def test_readyz_names_the_answer_that_opened_the_breaker(self):
        # Traffic meets OOM (noeviction at maxmemory): /readyz says why the keys decide by
        # their fail mode, not only that they do.
        redis = self.start_redis()
        s = self.start_sluice(fail_mode_config(redis.address), threads=1)
        self.assertEqual(s.check("/closed", "oom")[0], 200)
        with RespClient(redis.address) as c:
            c.call("CONFIG", "SET", "maxmemory-policy", "noeviction")
            c.call("CONFIG", "SET", "maxmemory", "1")
        for _ in range(4):
            s.check("/closed", "oom")
        ready = s.readyz()
        self.assertTrue(ready["degraded"], ready)
        self.assertIn("answered OOM command not allowed", ready["store_state"])

    def test_readyz_finds_redis_back_with_no_traffic(self):
        # A breaker waiting for its probe is probed by /readyz itself: an idle node (or one
        # out of rotation because it reported degraded) sees Redis back without a decision.
        # --threads 1: the one worker's client knows the node (through the first request).
        port = free_port()
        s = self.start_sluice(fail_mode_config(f"127.0.0.1:{port}"), threads=1)
        for _ in range(4):
            s.check("/open", "idle")
        self.assertTrue(s.readyz()["degraded"])
        self.start_redis(port=port)
        # Past open_for (300 ms) the breaker waits for a probe, which /readyz sends (polled:
        # the connection's redial backoff may fail the first one on a slow machine).
        ready = wait_for(lambda: (lambda r: r if not r["degraded"] else None)(s.readyz()), 5,
                         "readyz back with no decision")
        self.assertEqual((ready["degraded"], ready["store_state"]), (False, "ok"), ready)
        status, _, body = s.check("/closed", "idle")
        self.assertEqual((status, "degraded" in body), (200, False), body)


    def test_readyz_stays_degraded_while_redis_answers_ping_but_refuses_decisions(self):
        # An ACL user without EVALSHA/EVAL (as OOM with noeviction, or a read-only replica):
        # Redis answers PING, every decision fails. /readyz's probe is a decision, so it
        # keeps the node degraded, and finds it back once the ACL allows the script.
        redis = self.start_redis()
        with RespClient(redis.address) as c:
            c.call("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-evalsha", "-eval")
        s = self.start_sluice(fail_mode_config(redis.address, username="limited",
                                               password="pw"), threads=1)
        for _ in range(4):
            status, _, body = s.check("/closed", "acl")
            self.assertEqual((status, body.get("degraded")), (429, "closed"), body)
        for _ in range(4):
            time.sleep(0.4)  # past open_for (300 ms): the breaker waits for a probe
            ready = s.readyz()
            self.assertEqual((ready["ready"], ready["degraded"]), (True, True), ready)
        status, _, body = s.check("/closed", "acl")
        self.assertEqual((status, body.get("degraded")), (429, "closed"), body)
        with RespClient(redis.address) as c:
            c.call("ACL", "SETUSER", "limited", "+evalsha", "+eval")
        ready = wait_for(lambda: (lambda r: r if not r["degraded"] else None)(s.readyz()), 5,
                         "readyz back once the ACL allows the script")
        self.assertEqual((ready["degraded"], ready["store_state"]), (False, "ok"), ready)
        status, _, body = s.check("/closed", "acl")
        self.assertEqual((status, "degraded" in body), (200, False), body)
        # The probe's key is Sluice's own and short-lived.
        keys = scan(redis, "sluice:{sluice-probe}:*")
        self.assertLessEqual(len(keys), 1, keys)
        for k in keys:
            with RespClient(redis.address) as c:
                pttl = c.call("PTTL", k)  # -2: expired since the scan, short-lived too
                self.assertTrue(pttl == -2 or 0 < pttl <= 2000, (k, pttl))
        self.assert_alive(s)


    def test_a_server_answering_but_not_with_decisions_opens_the_breaker(self):
        # Something other than Redis on the address (another service, a misrouted proxy)
        # answers every command "+OK". That is no decision: the node is failing, its breaker
        # opens (requests stop paying a round trip for their fail mode), /readyz tells.
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        evals = []

        def serve(conn):
            with conn:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    # One "+OK" per command: each starts with "*<n>" at a line start.
                    commands = len(re.findall(rb"(?:^|\r\n)\*\d+\r\n\$", data))
                    # Commands, not words: the script that SCRIPT LOAD sends names EVALSHA.
                    evals.append(len(re.findall(
                        rb"(?:^|\r\n)\*\d+\r\n(?:\$7\r\nEVALSHA|\$4\r\nEVAL)\r\n", data)))
                    conn.sendall(b"+OK\r\n" * commands)

        def accept():
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        # open_for is a minute: with 300 ms, a slow run (ASan on a loaded machine) lets the
        # half-open probes through while the eight requests are sent, which is right but not
        # what this test counts.
        s = self.start_sluice(fail_mode_config(
            address, circuit_breaker={"failures": 3, "open_for": "1m"}), threads=1)
        for _ in range(8):
            status, _, body = s.check("/closed", "fake")
            self.assertEqual((status, body.get("degraded")), (429, "closed"), body)
        # Three failures open it (failures: 3): the start's probe decision and the first
        # requests; a request sent while the probe was in flight fails with it and counts
        # once with it. The rest are refused without a call.
        self.assertLessEqual(sum(evals), 4, evals)
        ready = s.readyz()
        self.assertEqual((ready["ready"], ready["degraded"]), (True, True), ready)
        m = s.metrics()  # for alerts, as /readyz says it
        self.assertEqual((m["sluice_redis_nodes"], m["sluice_redis_nodes_open"],
                          m["sluice_redis_nodes_unreachable"]), (1, 1, 0), m)
        self.assert_alive(s)


class RemoteMetricsTest(RedisTestCase):
    def test_decision_api_calls_are_observed_once_each_when_answered(self):
        redis = self.start_redis()
        s = self.start_sluice(config_yaml([rule("r", "/r", 100, "1m")], redis_store(redis)))
        count = "sluice_decision_latency_seconds_count"
        self.assertEqual(s.metrics()[count], 0)
        m = s.metrics()
        self.assertEqual((m["sluice_redis_nodes"], m["sluice_redis_nodes_open"],
                          m["sluice_redis_nodes_unreachable"]), (1, 0, 0), m)
        self.assertEqual(s.check("/r", "lat")[0], 200)
        status, _, _ = s.request("POST", "/v1/check/batch", json.dumps({"checks": [
            {"path": "/r", "headers": {"X-Client": "lat"}}, {"path": "/other"}]}))
        self.assertEqual(status, 200)
        self.assertEqual(s.metrics()[count], 2)


class QueueWithAnotherLimitTest(RedisTestCase):
    def test_a_queue_delays_its_request_whatever_the_rules_other_limits_leave(self):
        # As with the memory store: the queue's turn is the request's delay, though the
        # answer speaks for the limit with least left.
        redis = self.start_redis()
        endpoint = {"name": "q", "path": "/q", "key": "header:X-Client", "limits": [
            {"limit": 1, "window": "1s", "algorithm": "leaky_queue", "burst": 10,
             "name": "queue"},
            {"limit": 3, "window": far_window(), "algorithm": "fixed_window",
             "name": "daily"}]}
        s = self.start_sluice(config_yaml([endpoint], redis_store(redis, timeout="2s")))
        answers, sent, answered = [], [], []  # the checks' times, before and after each
        for _ in range(3):
            sent.append(time.monotonic())
            answers.append(s.check("/q", "queued")[2])
            answered.append(time.monotonic())
        self.assertEqual([(a["limit_name"], a["remaining"]) for a in answers],
                         [("daily", 2), ("daily", 1), ("daily", 0)])
        self.assertNotIn("degraded", answers[0])
        delays = [a["delay_ms"] for a in answers]
        self.assertEqual(delays[0], 0, delays)
        for i in (1, 2):  # a turn per second, less the time between the first check and this
            least = 1000 * (i - (answered[i] - sent[0])) - 1
            most = 1000 * (i - (sent[i] - answered[0])) + 1
            self.assertTrue(least <= delays[i] <= min(most, 1000 * i), (delays, least, most))


def _proc_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1][0]


def _ping(redis):
    try:
        with RespClient(redis.address, timeout=0.5) as c:
            return c.call("PING") == "PONG"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Keys, AUTH, reload


class KeysAuthReloadTest(RedisTestCase):
    def test_keys_carry_prefix_hash_tag_and_expiry(self):
        redis = self.start_redis()
        window = far_window()
        endpoints = [rule(a, "/" + a, 10, window, algorithm=a) for a in ALGORITHMS]
        endpoints.append({"name": "two", "path": "/two", "key": "header:X-Client",
                          "limits": [{"limit": 10, "window": "1m", "name": "two-minute"},
                                     {"limit": 100, "window": "1h", "name": "two-hour",
                                      "algorithm": "gcra"}]})
        s = self.start_sluice(config_yaml(endpoints, redis_store(redis, key_prefix="rl-test:",
                                                                 timeout="2s")))
        client = "keys-" + uuid.uuid4().hex[:8]
        for a in ALGORITHMS + ["two"]:
            status, _, body = s.check("/" + a, client)
            self.assertEqual(status, 200, body)
            self.assertNotIn("degraded", body)
        # (less the start's check on Sluice's own probe key, short-lived and prefixed too)
        keys = [k for k in scan(redis, "*") if not k.startswith("rl-test:{sluice-probe}:")]
        self.assertEqual(len(keys), len(ALGORITHMS) + 2, scan(redis, "*"))
        pattern = re.compile(r"rl-test:\{header:x-client=" + re.escape(client) +
                             r"\}:([a-z_\-/]+)~[0-9a-f]{8}")
        names = sorted(pattern.fullmatch(k).group(1) for k in keys if pattern.fullmatch(k))
        self.assertEqual(names, sorted([a + "/limit" for a in ALGORITHMS] +
                                       ["two-hour", "two-minute"]), keys)
        with redis.client() as c:
            for k in keys:
                pttl = c.call("PTTL", k)
                self.assertGreater(pttl, 0, k)
                self.assertLessEqual(pttl, 48 * 3600 * 1000, k)
        # the default prefix is "sluice:"
        self.assertEqual(scan(redis, "sluice:*"), [])

    def test_admin_keys_read_and_forget_the_shared_state(self):
        redis = self.start_redis()
        window = far_window()
        endpoints = [rule(a, "/" + a, 10, window, algorithm=a) for a in ALGORITHMS]
        config = config_yaml(endpoints, redis_store(redis, timeout="2s", fail_mode="local"))
        spender, reader = self.start_sluice(config), self.start_sluice(config)
        client = "admin-" + uuid.uuid4().hex[:8]
        query = "/v1/keys?limit={}/limit&key=header%3Ax-client%3D" + client

        def state(node, a):
            status, _, body = node.request("GET", query.format(a), admin=True)
            self.assertEqual(status, 200, body)
            return json.loads(body)

        for a in ALGORITHMS:
            for _ in range(3):
                self.assertEqual(spender.check("/" + a, client)[0], 200)
            # Another node reads what the first spent: the state is in Redis, not in-process.
            got = state(reader, a)
            self.assertEqual((got["limit"], got["remaining"], got["key"], got["limit_name"]),
                             (10, 7, "header:x-client=" + client, a + "/limit"), got)
            self.assertGreater(got["reset_after_ms"], 0, got)
            self.assertEqual(state(reader, a)["remaining"], 7, "a read spends nothing")
        self.assertEqual(len(scan(redis, f"sluice:{{header:x-client={client}}}:*")),
                         len(ALGORITHMS))

        for a in ALGORITHMS:
            status, _, body = reader.request("DELETE", query.format(a), admin=True)
            self.assertEqual((status, json.loads(body)), (200, {"deleted": True}), a)
            self.assertEqual(state(spender, a)["remaining"], 10, a)
            status, _, body = reader.request("DELETE", query.format(a), admin=True)
            self.assertEqual((status, json.loads(body)), (200, {"deleted": False}), a)
        self.assertEqual(scan(redis, f"sluice:{{header:x-client={client}}}:*"), [])
        status, _, body = spender.check("/fixed_window", client)
        self.assertEqual((status, body["remaining"]), (200, 9), body)

        status, _, body = reader.request("GET", "/v1/keys?limit=nope&key=x", admin=True)
        self.assertEqual((status, json.loads(body)["message"]), (404, "no limit named 'nope'"))
        status, _, body = reader.request("PUT", query.format("gcra"), admin=True)
        self.assertEqual(status, 405, body)

        # Redis down: the admin call says so (it does not answer from the fail mode's counts).
        redis.kill()
        for method in ("GET", "DELETE"):
            status, _, body = reader.request(method, query.format("gcra"), admin=True)
            self.assertEqual(status, 503, body)
            self.assertRegex(json.loads(body)["message"], r"^redis: (connection|timeout|open)")
        # ...and a DELETE that could not reach Redis leaves the fail mode's own counts as
        # they were: a refused reset resets nothing.
        local_client = "local-" + uuid.uuid4().hex[:8]
        for _ in range(10):
            self.assertEqual(spender.check("/fixed_window", local_client)[0], 200)
        self.assertEqual(spender.check("/fixed_window", local_client)[0], 429)
        status, _, body = spender.request(
            "DELETE", f"/v1/keys?limit=fixed_window/limit&key=header%3Ax-client%3D{local_client}",
            admin=True)
        self.assertEqual(status, 503, body)
        self.assertEqual(spender.check("/fixed_window", local_client)[0], 429)
        self.assert_alive(spender, reader)

    def test_password(self):
        redis = self.start_redis(password="s3cret-pw")
        good = self.start_sluice(fail_mode_config(redis.address, password="s3cret-pw"))
        wrong = self.start_sluice(fail_mode_config(redis.address, password="wrong-pw"))
        missing = self.start_sluice(fail_mode_config(redis.address))  # no AUTH at all
        client = "auth-" + uuid.uuid4().hex[:8]
        for i in range(LOCAL_LIMIT + 2):
            for path, mode in PATHS.items():
                admit = mode != "local" or i < LOCAL_LIMIT
                status, _, body = good.check(path, client)
                self.assertEqual((status, "degraded" in body), (200 if admit else 429, False),
                                 (i, path, body))
                for bad in (wrong, missing):
                    status, _, body = bad.check(path, client)
                    expect = 200 if mode == "open" or (mode == "local" and i < LOCAL_LIMIT) \
                        else 429
                    self.assertEqual((status, body.get("degraded")), (expect, mode),
                                     (i, path, body))
        self.assertEqual(len(scan(redis, f"sluice:{{header:x-client={client}}}:*")), 3)
        # Each says why: a refused AUTH fails every connection; a Redis asked nothing of
        # AUTH refuses the start's PING, which opens the breaker before any decision.
        for bad, reason in ((wrong, "WRONGPASS"), (missing, "NOAUTH")):
            ready = bad.readyz()
            self.assertTrue(ready["degraded"])
            self.assertIn(reason, ready["store_state"])
        self.assertGreater(store_errors(wrong), 0)
        self.assertFalse(good.readyz()["degraded"])
        self.assertEqual(store_errors(good), 0)
        self.assert_alive(good, wrong, missing)

    def test_username_without_password_authenticates_as_that_user(self):
        # An ACL user created `nopass` needs no password, but Sluice must still name it:
        # here the default user may not run scripts, so only `bob` decides in Redis.
        redis = self.start_redis()
        with redis.client() as c:
            c.call("ACL", "SETUSER", "bob", "on", "nopass", "~sluice:*", "+@all")
            c.call("ACL", "SETUSER", "default", "-evalsha", "-eval")
        s = self.start_sluice(fail_mode_config(redis.address, username="bob"))
        for i in range(3):
            status, _, body = s.check("/closed", "bob-client")
            self.assertEqual((status, "degraded" in body, body["remaining"]),
                             (200, False, 100000 - 1 - i), body)
        with redis.client() as c:
            users = {line.split(" user=")[1].split()[0]
                     for line in c.call("CLIENT", "LIST").splitlines() if "cmd=evalsha" in line}
        self.assertEqual(users, {"bob"})
        self.assertEqual(store_errors(s), 0)

    def test_workers_connect_and_load_the_script_before_the_first_request(self):
        redis = self.start_redis()
        s = self.start_sluice(config_yaml([rule("api", "/api/*", 10, "1m")],
                                          redis_store(redis, timeout="2s")), threads=2)

        def clients():
            return len([line for line in redis.call("CLIENT", "LIST").splitlines()
                        if "cmd=client" not in line])  # not this very call's connection
        wait_for(lambda: clients() == 2, 5, "one connection per worker thread")
        info = redis.call("INFO", "memory")
        self.assertEqual(int(re.search(r"number_of_cached_scripts:(\d+)", info).group(1)), 1)
        status, _, body = s.check("/api/x", "warm")
        self.assertEqual(status, 200, body)
        self.assertNotIn("degraded", body)
        stats = redis.call("INFO", "commandstats")
        # the first decision is one EVALSHA: no NOSCRIPT answer, no EVAL retry (the other
        # two are each worker's check at start, a decision on Sluice's probe key)
        self.assertRegex(stats, r"cmdstat_evalsha:calls=3,")
        self.assertNotIn("cmdstat_eval:", stats)
        self.assertEqual(clients(), 2)

    def test_wrong_password_backs_off_reconnects(self):
        redis = self.start_redis(password="s3cret-pw")
        wrong = self.start_sluice(fail_mode_config(redis.address, password="wrong-pw"))

        def connections():
            info = redis.call("INFO", "stats")
            return int(re.search(r"total_connections_received:(\d+)", info).group(1))
        for _ in range(5):  # every worker thread has tried to connect
            wrong.check("/open", "x")
        c0, t0 = connections(), time.monotonic()
        time.sleep(1.0)
        c1, t1 = connections(), time.monotonic()
        rate = (c1 - c0 - 1) / (t1 - t0)
        # 2 worker threads x 1 connection, backoff up to 200 ms: about 10 a second
        self.assertLess(rate, 30, f"{rate:.0f} connections (and failed AUTHs) a second")
        self.assert_alive(wrong)

    def test_sighup_reload_keeps_deciding_through_redis(self):
        redis = self.start_redis()
        window = far_window()
        first = [rule("same", "/same", 3, window), rule("changed", "/changed", 10, window)]
        s = self.start_sluice(config_yaml(first, redis_store(redis, timeout="2s")))
        client = "reload-" + uuid.uuid4().hex[:8]
        for _ in range(2):
            self.assertEqual(s.check("/same", client)[0], 200)
        self.assertEqual(s.check("/changed", client)[2]["remaining"], 9)
        old_keys = scan(redis, f"sluice:{{header:x-client={client}}}:*")
        self.assertEqual(len(old_keys), 2)
        second = [rule("same", "/same", 3, window), rule("changed", "/changed", 20, window),
                  rule("added", "/added", 4, window, algorithm="token_bucket")]
        s.rewrite(config_yaml(second, redis_store(redis, timeout="2s")))
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: s.check("/changed", "peek", cost=0)[2]["limit"] == 20, 5,
                 "the reloaded limit")
        # unchanged: the count in Redis carries over; changed: fresh keys; new rule: in Redis
        status, _, body = s.check("/same", client)
        self.assertEqual((status, body["remaining"], "degraded" in body), (200, 0, False), body)
        self.assertEqual(s.check("/same", client)[0], 429)
        status, _, body = s.check("/changed", client)
        self.assertEqual((status, body["remaining"], "degraded" in body), (200, 19, False), body)
        status, _, body = s.check("/added", client)
        self.assertEqual((status, body["remaining"], "degraded" in body), (200, 3, False), body)
        new_keys = scan(redis, f"sluice:{{header:x-client={client}}}:*")
        self.assertEqual(len(new_keys), 4, new_keys)  # same, changed (old and new), added
        self.assertTrue(set(old_keys) < set(new_keys))
        # Polled: the reload is logged and counted just after its rules take over.
        wait_for(lambda: "reloaded" in s.log(), 10, "the reload logged")
        wait_for(lambda: s.metrics()["sluice_reloads_total"] == 1, 10, "the reload counted")
        self.assert_alive(s)

    def test_a_reload_that_changes_the_store_mode_is_refused(self):
        # The new file is valid for its own store (token_bucket in mode remote), not for the
        # running one (local_sync adds up window counts): the running rules stay.
        redis = self.start_redis()
        window = far_window()
        synced = [rule("api", "/api", 5, window, algorithm="fixed_window")]
        s = self.start_sluice(config_yaml(synced, redis_store(redis, mode="local_sync")))
        self.assertEqual(s.check("/api", "m")[2]["remaining"], 4)
        remote = [rule("api", "/api", 50, window, algorithm="token_bucket")]
        s.rewrite(config_yaml(remote, redis_store(redis)))
        status, _, body = s.request("POST", "/v1/reload", admin=True)
        self.assertEqual(status, 400, body)
        self.assertIn("the store's type or mode changed", json.loads(body)["message"])
        for remaining in (3, 2):
            status, _, body = s.check("/api", "m")
            self.assertEqual((status, body["limit"], body["remaining"]), (200, 5, remaining), body)
        self.assert_alive(s)


    def test_a_reload_applies_a_changed_store_fail_mode(self):
        # The store's fail_mode is the default of every rule without its own: a reload that
        # changes it changes how the next degraded decision is answered.
        port = free_port()  # nothing listens: every decision is degraded
        api = [rule("api", "/api", 5, "1h")]
        fast = {"timeout": "50ms", "connect_timeout": "50ms"}
        s = self.start_sluice(config_yaml(api, redis_store(f"127.0.0.1:{port}", fail_mode="open",
                                                           **fast)))
        status, _, body = s.check("/api", "fm")
        self.assertEqual((status, body.get("degraded")), (200, "open"), body)
        s.rewrite(config_yaml(api, redis_store(f"127.0.0.1:{port}", fail_mode="closed", **fast)))
        status, _, body = s.request("POST", "/v1/reload", admin=True)
        self.assertEqual(status, 200, body)
        for _ in range(3):
            status, _, body = s.check("/api", "fm")
            self.assertEqual((status, body.get("degraded")), (429, "closed"), body)
        self.assert_alive(s)

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: redis_test.py path/to/sluice [unittest args]")
    BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=2)
