#!/usr/bin/env python3
"""Integration tests: the real sluice binary on loopback ports, driven by a real HTTP client.

Usage: server_test.py path/to/sluice
Every test starts its own server on free ports and stops it by its PID.
"""
import http.client
import json
import os
import pathlib
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from redis_fixture import free_port, freed_memory_returned, read_log  # noqa: E402  (also gateway_test's, sticky_test's)

BIN = None
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEED = os.path.join(ROOT, "tests", "config", "seed.yaml")


def seed_text():
    """The seed's config (section 4), as the tests extend or edit it."""
    return pathlib.Path(SEED).read_text()


class Server:
    def __init__(self, config=None, extra=()):
        # The ports are free when picked, but another process may bind one before sluice
        # does: then sluice exits with "Address already in use" and is started again on new
        # ports.
        for attempt in range(5):
            if self._start(config, extra, last=attempt == 4):
                return

    def _start(self, config, extra, last):
        self.port, self.admin_port = free_port(), free_port()
        args = [BIN, "serve", "--listen", f"127.0.0.1:{self.port}",
                "--admin", f"127.0.0.1:{self.admin_port}", *extra]
        if "--threads" not in extra:
            args += ["--threads", "2"]
        if config:
            args += ["--config", config]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.time() + 30  # generous: a sanitizer build on a loaded machine
        while time.time() < deadline:
            try:
                # The public port is bound before the admin one: both listen once this connects.
                with socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2):
                    return True
            except OSError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read()
                    self.proc.stdout.close()
                    self.proc.stderr.close()
                    taken = (f"cannot listen on 127.0.0.1:{self.port}: Address already in use",
                             f"cannot listen on 127.0.0.1:{self.admin_port}: Address already in use")
                    if not last and any(m in err for m in taken):
                        return False
                    raise RuntimeError("sluice exited: " + err)
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("sluice did not start")

    def request(self, method, path, body=None, headers=None, admin=False, timeout=5):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port if admin else self.port,
                                          timeout=timeout)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data

    def check(self, payload):
        status, headers, body = self.request("POST", "/v1/check", json.dumps(payload))
        return status, headers, json.loads(body)

    def metric(self, series):
        """The value of one series of /metrics, e.g. 'sluice_reloads_total'; None if absent."""
        _, _, body = self.request("GET", "/metrics", admin=True)
        for line in body.decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == series:
                return float(value)
        return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.proc.stdout.closed:
            self.stdout = self.proc.stdout.read()
            self.stderr = self.proc.stderr.read()
            self.proc.stdout.close()
            self.proc.stderr.close()
        return self.proc.returncode


def http_get(port, path):
    """GET path on 127.0.0.1:port, on a connection of its own: (status, body text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def start_with_open_files(test, soft, hard, extra=()):
    """sluice serve (one thread) under RLIMIT_NOFILE (soft, hard), stopped at the test's
    end; (proc, port, admin port, log file)."""
    for _ in range(5):
        port, admin = free_port(), free_port()
        log = tempfile.TemporaryFile(mode="w+")
        proc = subprocess.Popen(
            [BIN, "serve", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
             "--threads", "1", *extra], stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)))
        deadline = time.time() + 30
        while proc.poll() is None and time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", admin), timeout=1).close()
                break
            except OSError:
                time.sleep(0.02)
        if proc.poll() is None:
            break
        if "Address already in use" not in read_log(log):
            test.fail("sluice did not start")
    test.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
    test.addCleanup(log.close)
    return proc, port, admin, log


class ServerTest(unittest.TestCase):
    def start(self, config=None, extra=()):
        s = Server(config, extra)
        self.addCleanup(s.stop)
        return s

    @staticmethod
    def exchange_to_close(s, data):
        """Sends `data` on a new connection; all it gets back until Sluice closes it."""
        answers = b""
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(data)
            while True:
                got = c.recv(65536)
                if not got:
                    return answers
                answers += got

    def config_file(self, text):
        """A config file holding `text`, removed after the test."""
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(text)
        self.addCleanup(os.unlink, f.name)
        return f.name

    def test_seed_login_limit_headers_and_429_body(self):
        s = self.start(SEED)
        for i in range(5):
            status, h, _ = s.request("POST", "/api/login")
            self.assertEqual(status, 200)
            self.assertEqual(h["x-ratelimit-limit"], "5")
            self.assertEqual(h["x-ratelimit-remaining"], str(4 - i))
            reset = int(h["x-ratelimit-reset"])
            self.assertTrue(time.time() < reset <= time.time() + 121, reset)
        status, h, body = s.request("POST", "/api/login")
        self.assertEqual(status, 429)
        self.assertEqual(h["x-ratelimit-remaining"], "0")
        retry = int(h["retry-after"])
        self.assertTrue(1 <= retry <= 120, retry)
        self.assertEqual(h["content-type"], "application/json")
        self.assertEqual(h["ratelimit-policy"], "5;w=60")
        self.assertEqual(json.loads(body), {
            "error": "rate_limit_exceeded",
            "message": f"Too many requests. Retry after {retry} seconds.",
            "retry_after": retry})

    def test_a_queue_delays_its_request_whatever_the_rules_other_limits_leave(self):
        # The answer speaks for the limit closest to refusing (here the daily one), but
        # the queue counted each request as served at its turn: that turn is the request's
        # delay. Before, a second limit with less left hid it (delay_ms 0 each time).
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n"
            "    - path: /q\n      key: ip\n      limits:\n"
            "        - {limit: 1, window: 1s, algorithm: leaky_queue, burst: 10, name: queue}\n"
            "        - {limit: 3, window: 1d, algorithm: fixed_window, name: daily}\n"))
        answers, sent, answered = [], [], []  # the checks' times, before and after each
        for _ in range(3):
            sent.append(time.monotonic())
            answers.append(s.check({"path": "/q", "method": "GET", "ip": "10.6.0.1"})[2])
            answered.append(time.monotonic())
        self.assertEqual([a["limit_name"] for a in answers], ["daily"] * 3)
        self.assertEqual([a["remaining"] for a in answers], [2, 1, 0])
        delays = [a["delay_ms"] for a in answers]
        self.assertEqual(delays[0], 0, delays)
        for i in (1, 2):  # a turn per second, less the time between the first check and this
            least = 1000 * (i - (answered[i] - sent[0])) - 1
            most = 1000 * (i - (sent[i] - answered[0])) + 1
            self.assertTrue(least <= delays[i] <= min(most, 1000 * i), (delays, least, most))
        m = s.request("GET", "/metrics", admin=True)[2].decode()
        self.assertIn('sluice_decisions_total{rule="/q",outcome="delayed"} 2', m)

    def test_a_queued_request_is_answered_at_its_turn_without_an_upstream(self):
        # A decision-only gateway's 200 lets its caller forward: it waits for the request's
        # turn, as forwarding does. 3 requests at once into a queue draining one per 100 ms:
        # the first at once, the third ~200 ms later.
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n"
            "    - {path: /q, limit: 10, window: 1s, algorithm: leaky_queue, burst: 3}\n"
            "    - {path: /qs, limit: 1, window: 10s, algorithm: leaky_queue, burst: 3,"
            " shadow: true}\n"
            "    - {path: /qr, limit: 1, window: 10s, algorithm: leaky_queue, burst: 3}\n"))

        def three_at_once(path):
            """The times after sending of three answers to requests sent together."""
            socks = [socket.create_connection(("127.0.0.1", s.port), timeout=30)
                     for _ in range(3)]
            for c in socks:
                self.addCleanup(c.close)
            t0 = time.monotonic()
            for c in socks:
                c.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            times = []
            for c in socks:  # in order: each waits for the one before
                head = b""
                while b"\r\n" not in head:
                    data = c.recv(65536)
                    self.assertTrue(data, "closed before the status line")
                    head += data
                self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
                times.append(time.monotonic() - t0)
            return times

        times = three_at_once(b"/q")
        self.assertGreaterEqual(times[2], 0.15, times)  # its turn came ~200 ms after the first
        # A shadow queue counts what it would delay, and delays nothing: the third would
        # have waited 20 s.
        times = three_at_once(b"/qs")
        self.assertLess(times[2], 10, times)
        metrics = s.request("GET", "/metrics", admin=True)[2].decode()
        self.assertIn('sluice_decisions_total{rule="/qs",outcome="delayed"} 2', metrics)
        # The decision API tells its caller the same: wait for a real queue, not a shadow one.
        # (One whose turns are 10 s apart: a slow run cannot let the first drain before the
        # second is decided.)
        delays = [s.check({"path": p, "ip": "192.0.2.8"})[2]["delay_ms"] for p in ["/qr"] * 2]
        self.assertEqual(delays[0], 0, delays)
        self.assertGreater(delays[1], 0, delays)
        for _ in range(2):
            status, _, body = s.check({"path": "/qs", "ip": "192.0.2.8"})
            self.assertEqual((status, body["delay_ms"]), (200, 0), body)

    def test_ietf_headers_can_be_turned_off(self):
        s = self.start(self.config_file(
            seed_text() + "response_headers: {ietf: false}\n"))
        _, h, _ = s.request("GET", "/x")
        self.assertIn("x-ratelimit-limit", h)
        self.assertNotIn("ratelimit-policy", h)
        self.assertNotIn("ratelimit", h)

    def test_ratelimit_policy_states_the_rate_never_above_the_real_one(self):
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n"
            "    - {path: /tb, limit: 1, window: 1s, algorithm: token_bucket, burst: 100}\n"
            "    - {path: /gcra, limit: 10, window: 1m, algorithm: gcra, burst: 2}\n"
            "    - {path: /fw, limit: 3, window: 1500ms, algorithm: fixed_window}\n"))
        for path, policy in [("/tb", "1;w=1"), ("/gcra", "10;w=60"), ("/fw", "3;w=2")]:
            self.assertEqual(s.request("GET", path)[1]["ratelimit-policy"], policy, path)

    def test_rules_sharing_a_limit_name(self):
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n"
            "    - {name: a, path: /a, limit: 2, window: 1m}\n"
            "    - path: /b\n      limits: [{limit: 3, window: 1m, name: shared}]\n"
            "    - path: /c\n      limits: [{limit: 4, window: 1m, name: shared}]\n"))
        for path, limit in (("/a", "2"), ("/b", "3"), ("/c", "4"), ("/other", None)):
            status, h, _ = s.request("GET", path)
            self.assertEqual(status, 200, path)
            self.assertEqual(h.get("x-ratelimit-limit"), limit, path)
        # Each has its own counters; the admin API needs to be told whose.
        key = "/v1/keys?limit=shared&key=ip%3D127.0.0.1"
        for method in ("GET", "DELETE"):
            status, _, body = s.request(method, key, admin=True)
            self.assertEqual(status, 409, body)
            self.assertEqual(json.loads(body)["message"],
                             "limit name 'shared' is used by limits of different policies in "
                             "rules '/b' (sliding_window_counter 3/1m), '/c' "
                             "(sliding_window_counter 4/1m): add &rule=NAME")
        status, _, body = s.request("GET", key + "&rule=%2Fc", admin=True)
        self.assertEqual((status, json.loads(body)["policy"], json.loads(body)["remaining"]),
                         (200, "sliding_window_counter 4/1m", 3), body)
        status, _, body = s.request("DELETE", key + "&rule=/b", admin=True)
        self.assertEqual((status, json.loads(body)), (200, {"deleted": True}), body)
        status, _, body = s.request("GET", key + "&rule=/b", admin=True)
        self.assertEqual(json.loads(body)["remaining"], 3, body)  # /b's key was reset
        status, _, body = s.request("GET", key + "&rule=/c", admin=True)
        self.assertEqual(json.loads(body)["remaining"], 3, body)  # /c's was not
        status, _, body = s.request("GET", key + "&rule=a", admin=True)
        self.assertEqual(status, 404, body)

    def test_a_rule_and_its_tier_sharing_a_limit_name(self):
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n"
            "    - name: a\n      path: /a\n      limits: [{limit: 5, window: 1m, name: shared}]\n"
            "      tiers:\n        pro: {limits: [{limit: 50, window: 1m, name: shared}]}\n"))
        s.request("GET", "/a")
        s.request("GET", "/a", headers={"X-User-Tier": "pro"})
        s.request("GET", "/a", headers={"X-User-Tier": "pro"})
        key = "/v1/keys?limit=shared&key=ip%3D127.0.0.1&rule=a"
        status, _, body = s.request("GET", key, admin=True)
        self.assertEqual((status, json.loads(body)["message"]), (409, (
            "limit name 'shared' is used by limits of different policies in rules 'a' "
            "(sliding_window_counter 5/1m), 'a' tier 'pro' (sliding_window_counter 50/1m): "
            "add &rule=NAME and &tier=TIER (empty for the rule's own)")), body)
        for tier, policy, remaining in (("", "5/1m", 4), ("pro", "50/1m", 48)):
            status, _, body = s.request("GET", key + "&tier=" + tier, admin=True)
            self.assertEqual((status, json.loads(body)["policy"], json.loads(body)["remaining"]),
                             (200, "sliding_window_counter " + policy, remaining), body)
        status, _, body = s.request("DELETE", key + "&tier=pro", admin=True)
        self.assertEqual((status, json.loads(body)), (200, {"deleted": True}), body)
        status, _, body = s.request("GET", key + "&tier=pro", admin=True)
        self.assertEqual(json.loads(body)["remaining"], 50, body)
        status, _, body = s.request("GET", key + "&tier=gold", admin=True)
        self.assertEqual((status, json.loads(body)["message"]),
                         (404, "rule 'a' tier 'gold' has no limit named 'shared'"), body)
        for params, message in (
                ("&tier=", "no rule's own limits (no tier) have a limit named 'x'"),
                ("&tier=pro", "no rule tier 'pro' has a limit named 'x'"),
                ("&rule=a&tier=", "rule 'a' (its own limits, no tier) has no limit named 'x'")):
            status, _, body = s.request("GET", "/v1/keys?limit=x&key=k" + params, admin=True)
            self.assertEqual((status, json.loads(body)["message"]), (404, message), body)
        # A 405 names the methods that would do (RFC 9110), before any parameter is read.
        for method, path, allow in (("PUT", "/v1/keys?limit=shared&key=k", "GET, DELETE"),
                                    ("POST", "/v1/keys", "GET, DELETE"),
                                    ("GET", "/v1/reload", "POST")):
            status, h, body = s.request(method, path, admin=True)
            self.assertEqual((status, h.get("allow")), (405, allow), (method, path, body))

    def test_default_rule_has_both_seed_limits(self):
        s = self.start(SEED)
        status, h, _ = s.request("GET", "/anything")
        self.assertEqual(status, 200)
        self.assertEqual(h["x-ratelimit-limit"], "60")  # the tighter of 60/min and 1000/h
        self.assertEqual(h["x-ratelimit-remaining"], "59")

    def test_path_spellings_cannot_dodge_a_rule(self):
        s = self.start(SEED)
        spellings = ["/api/login", "/api//login", "/api/./login", "/api/x/../login",
                     "/API/login/", "/api/%6cogin"]
        for i, path in enumerate(spellings[:5]):
            status, h, _ = s.request("POST", path)
            self.assertEqual((status, h["x-ratelimit-remaining"]), (200, str(4 - i)), path)
        status, _, _ = s.request("POST", spellings[5])
        self.assertEqual(status, 429)
        # Spellings a servlet container routes to /api/login: ";" parameters, "..;".
        for path in ["/api/login;jsessionid=x", "/api/x/..;/login", "/api;v=2/login;"]:
            status, h, _ = s.request("POST", path)
            self.assertEqual((status, h.get("x-ratelimit-limit")), (429, "5"), path)
        # A method in another case, which a WSGI server reads as POST.
        for method in ["post", "Post"]:
            status, h, _ = s.request(method, "/api/login")
            self.assertEqual((status, h.get("x-ratelimit-limit")), (429, "5"), method)

    def test_identity_headers_only_from_trusted_proxies_when_asked(self):
        # keys.from_trusted_proxies_only: a client that reaches Sluice directly cannot name
        # its own user and tier (here: enterprise, 1000 a minute, keyed by a fresh user id).
        identity = {"X-User-Tier": "enterprise", "X-User-Id": "u1"}
        strict = seed_text() + "keys: {from_trusted_proxies_only: true}\n"
        s = self.start(self.config_file(strict))
        _, h, _ = s.request("GET", "/anything", headers=identity)
        self.assertEqual((h["x-ratelimit-limit"], h["x-ratelimit-remaining"]), ("60", "59"))
        _, h, _ = s.request("GET", "/anything", headers={"X-User-Id": "u2"})
        self.assertEqual(h["x-ratelimit-remaining"], "58")  # one key: the address's
        # From a trusted proxy the headers are the identity it vouches for.
        s = self.start(self.config_file(strict + "trusted_proxies: [127.0.0.1]\n"))
        _, h, _ = s.request("GET", "/anything", headers=identity)
        self.assertEqual((h["x-ratelimit-limit"], h["x-ratelimit-remaining"]), ("1000", "999"))
        # Without the switch, as the seed has it, a client's headers are taken as given.
        s = self.start(SEED)
        _, h, _ = s.request("GET", "/anything", headers=identity)
        self.assertEqual(h["x-ratelimit-limit"], "1000")

    def test_an_escaped_slash_is_refused_unless_allowed(self):
        # "/api%2Flogin" is "/api/login" to a WSGI or CGI upstream and one segment to others:
        # whichever reading Sluice took, a client could pick the other to leave its rule.
        s = self.start(SEED)
        # A raw '\\' too: Node's URL parser reads "/api\\login" as "/api/login".
        # And a leading "//": Node's `new URL("//h/api/login", base)` and Python's urlsplit
        # read it as "/api/login" on host "h".
        for path in ["/api%2Flogin", "/api%2flogin", "/api%5Clogin", "/x/%2F..%2Fapi/login",
                     "/api\\login", "/api\\x\\..\\login", "//h/api/login", "//api/login"]:
            status, _, body = s.request("POST", path)
            self.assertEqual(status, 400, path)
            self.assertIn("an escaped '/' or '\\' (%2F, %5C), or a leading '//' in the path is "
                          "refused", json.loads(body)["message"], path)
        status, _, body = s.check({"path": "/api%2Flogin", "method": "POST"})
        self.assertEqual(status, 400)
        self.assertIn("an escaped '/'", body["message"])
        self.assertEqual(s.request("POST", "/api/login")[1]["x-ratelimit-remaining"], "4")
        # Allowed, it stays one segment: the default rule's, for an upstream that keeps it so.
        s = self.start(self.config_file(
            seed_text() + "paths: {allow_encoded_slashes: true}\n"))
        status, h, _ = s.request("POST", "/api%2Flogin")
        self.assertEqual((status, h["x-ratelimit-limit"]), (200, "60"))

    def raw(self, s, data):
        """Sends raw bytes on a fresh connection; the first answer's (status, head, body)."""
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(data)
            r = http.client.HTTPResponse(c)
            r.begin()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()

    def test_a_version_other_than_http_1_is_505(self):
        s = self.start(SEED)
        for version in [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/3.1"]:
            status, h, body = self.raw(s, b"GET /api/search " + version + b"\r\nHost: a\r\n\r\n")
            self.assertEqual(status, 505, version)
            self.assertEqual(h["connection"], "close")
            self.assertEqual(json.loads(body)["message"],
                             "HTTP version not supported: this port speaks HTTP/1.0 and HTTP/1.1")
        # A later minor version is read as HTTP/1.1 (RFC 9112 2.3), and counted as one.
        for i, version in enumerate([b"HTTP/1.2", b"HTTP/1.9"]):
            status, h, _ = self.raw(s, b"POST /api/login " + version + b"\r\nHost: a\r\n"
                                    b"Content-Length: 0\r\n\r\n")
            self.assertEqual((status, h["x-ratelimit-remaining"]), (200, str(4 - i)), version)
        # A version that is not one is a malformed request line.
        for version in [b"HTTX/1.1", b"http/1.1", b"HTTP/11.1", b"HTTP/1.1x"]:
            status, _, body = self.raw(s, b"GET /api/search " + version + b"\r\nHost: a\r\n\r\n")
            self.assertEqual(status, 400, version)
            self.assertIn("malformed HTTP request", json.loads(body)["message"])
        self.assertEqual(s.request("GET", "/api/search")[0], 200)

    def test_absolute_form_targets_meet_the_same_rules(self):
        # A client may name the whole URI (RFC 9112 3.2.2): it is the same resource, counted
        # by the same rule, whatever its scheme's or host's case.
        s = self.start(SEED)
        targets = [b"http://example.com/api/login", b"HTTP://Example.com:8080/api//login?x=1",
                   b"https://h/API/%6cogin/"]
        for i, target in enumerate(targets):
            status, h, _ = self.raw(s, b"POST " + target + b" HTTP/1.1\r\nHost: other\r\n"
                                    b"Content-Length: 0\r\n\r\n")
            self.assertEqual((status, h["x-ratelimit-remaining"]), (200, str(4 - i)), target)
        self.assertEqual(s.request("POST", "/api/login")[1]["x-ratelimit-remaining"], "1")
        # The decision API too. An HTTP/1.1 request names its Host in this form as well
        # (RFC 9112 3.2): without one it gets 400.
        payload = b'{"path": "/x", "method": "GET"}'
        for host, answer in [(b"Host: sluice\r\n", 200), (b"", 400)]:
            status, _, body = self.raw(s, b"POST http://sluice/v1/check HTTP/1.1\r\n" + host +
                                       b"Content-Length: " + str(len(payload)).encode() +
                                       b"\r\n\r\n" + payload)
            self.assertEqual(status, answer, body)
            if answer == 200:
                self.assertTrue(json.loads(body)["allowed"])
        for target, message in [(b"http:///api/login", "must name a host"),
                                (b"http://u@example.com/api/login", "user information")]:
            status, _, body = self.raw(s, b"POST " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(status, 400, target)
            self.assertIn(message, json.loads(body)["message"])
        # Another scheme names no path Sluice can match.
        status, _, _ = self.raw(s, b"GET ftp://example.com/api/login HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(status, 400)

    def test_query_keys_cannot_be_dodged_by_spelling_or_repeating(self):
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n    - path: /export\n      limit: 2\n"
            "      window: 1m\n      key: query:account\n"))
        self.assertEqual([s.request("GET", "/export?account=alice")[0] for _ in range(2)],
                         [200, 200])
        # What an application decodes to "alice" is alice.
        for q in ["account=%61lice", "account=ali%63e", "acc%6Funt=alice", "account=al%69ce&x=1"]:
            status, h, _ = s.request("GET", "/export?" + q)
            self.assertEqual((status, h["x-ratelimit-limit"]), (429, "2"), q)
        # A repeated parameter has no one value: all such requests share one count.
        for q in ["account=x&account=alice", "account=alice&account=y"]:
            self.assertEqual(s.request("GET", "/export?" + q)[0], 200, q)
        self.assertEqual(s.request("GET", "/export?account=z&account=alice")[0], 429)
        self.assertEqual(s.request("GET", "/export?account=bob")[0], 200)
        # Rack before 3.0 (Rails 7.0 and older) splits on ';' too: its alice is alice.
        for q in ["account=alice;x=1", "x=1;account=alice"]:
            self.assertEqual(s.request("GET", "/export?" + q)[0], 429, q)
        # ... and repeated there is repeated: the shared count above is spent.
        self.assertEqual(s.request("GET", "/export?account=carol;account=dave")[0], 429)

    def test_untrusted_x_forwarded_for_is_ignored(self):
        s = self.start(SEED)
        for i in range(5):
            status, _, _ = s.request("POST", "/api/login",
                                     headers={"X-Forwarded-For": f"198.51.100.{i}"})
            self.assertEqual(status, 200)
        status, _, _ = s.request("POST", "/api/login", headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(status, 429)

    def test_trusted_proxy_forwards_the_client_address(self):
        s = self.start(self.config_file(
            seed_text() + "trusted_proxies: [127.0.0.1]\n"))
        for _ in range(5):
            s.request("POST", "/api/login", headers={"X-Forwarded-For": "198.51.100.1"})
        status, _, _ = s.request("POST", "/api/login", headers={"X-Forwarded-For": "198.51.100.1"})
        self.assertEqual(status, 429)
        status, _, _ = s.request("POST", "/api/login", headers={"X-Forwarded-For": "198.51.100.2"})
        self.assertEqual(status, 200)
        # A proxy that writes the client's port (Azure Application Gateway, IIS ARR): the
        # address is the client's, not one key for every client behind the proxy.
        for with_port, without in (("203.0.113.60:5000", "203.0.113.60"),
                                   ("[2001:db8::7]:443", "2001:db8::9")):  # one /64
            for _ in range(5):
                status, _, _ = s.request("POST", "/api/login",
                                         headers={"X-Forwarded-For": with_port})
                self.assertEqual(status, 200, with_port)
            status, _, _ = s.request("POST", "/api/login", headers={"X-Forwarded-For": without})
            self.assertEqual(status, 429, with_port)
        # A Forwarded header the proxy passed on from the client is not read.
        status, _, _ = s.request("POST", "/api/login", headers={
            "X-Forwarded-For": "198.51.100.1", "Forwarded": "for=198.51.100.99"})
        self.assertEqual(status, 429)

    def test_a_proxy_writing_the_header_not_read_is_logged(self):
        s = self.start(self.config_file(seed_text() + "trusted_proxies: [127.0.0.1]\n"))
        t0 = time.monotonic()
        for _ in range(10):
            s.request("POST", "/api/login", headers={"Forwarded": "for=198.51.100.7"})
        took = time.monotonic() - t0
        s.stop()
        lines = s.stderr.count("sent only Forwarded, which forwarding_header does not read")
        # Once a second at most, not once a request: in `took` seconds, at most 1 + took
        # lines (a slow machine may take more than a second for the 10 requests).
        self.assertGreaterEqual(lines, 1, s.stderr)
        self.assertLessEqual(lines, max(2, 1 + int(took)), s.stderr)
        self.assertIn("(set forwarding_header: forwarded)", s.stderr)

    def test_a_proxy_that_writes_forwarded_is_read_from_that_header_only(self):
        # As HAProxy's `option forwarded`: it adds Forwarded and passes the client's own
        # X-Forwarded-For on untouched, so that one must not count.
        s = self.start(self.config_file(
            seed_text() + "trusted_proxies: [127.0.0.1]\n"
            "forwarding_header: forwarded\n"))
        for i in range(6):
            status, _, _ = s.request("POST", "/api/login", headers={
                "Forwarded": "for=198.51.100.7", "X-Forwarded-For": f"203.0.113.{i}"})
            self.assertEqual(status, 200 if i < 5 else 429, i)
        status, _, _ = s.request("POST", "/api/login", headers={"Forwarded": "for=198.51.100.8"})
        self.assertEqual(status, 200)

    def test_tiers_from_headers(self):
        s = self.start(SEED)
        status, h, _ = s.request("GET", "/x", headers={"X-User-Tier": "pro", "X-User-Id": "7"})
        self.assertEqual((status, h["x-ratelimit-limit"]), (200, "100"))
        status, h, _ = s.request("GET", "/x", headers={"X-User-Tier": "free", "X-User-Id": "8"})
        self.assertEqual(h["x-ratelimit-limit"], "30")

    def test_a_top_level_tier_keeps_a_default_key_that_names_the_user(self):
        # key: user_id+ip keeps a client that names any user from spending that user's
        # quota (the README's advice where identity headers are not vouched for); a tier
        # must not drop the ip part. With a key that does not name the user, a tier is a
        # quota per user, wherever the user comes from.
        for key, shared in (("user_id+ip", False), ("ip", True)):
            s = self.start(self.config_file(
                "rate_limits:\n  default: {limit: 1000, window: 1m, key: " + key + "}\n"
                "  tiers:\n    free: {requests_per_minute: 3}\n"))

            def check(ip):
                return s.check({"path": "/x", "ip": ip, "user_id": "victim", "tier": "free"})

            self.assertEqual([check("198.51.100.1")[0] for _ in range(4)], [200, 200, 200, 429])
            status, _, body = check("198.51.100.2")
            self.assertEqual(status, 429 if shared else 200, (key, body))
            self.assertEqual(body["limit"], 3)
            s.stop()

    def test_check_api(self):
        s = self.start(SEED)
        for i in range(30):
            status, _, body = s.check({"path": "/api/search", "method": "GET", "user_id": "42"})
            self.assertEqual(status, 200)
            self.assertTrue(body["allowed"])
            self.assertEqual(body["remaining"], 29 - i)
        status, h, body = s.check({"path": "/api/search", "method": "GET", "user_id": "42"})
        self.assertEqual(status, 429)
        self.assertFalse(body["allowed"])
        self.assertEqual(body["rule"], "GET /api/search")
        self.assertEqual(body["limit_name"], "GET /api/search/limit")
        self.assertEqual(body["retry_after"], int(h["retry-after"]))
        # another user is not affected
        status, _, body = s.check({"path": "/api/search", "method": "GET", "user_id": "43"})
        self.assertEqual((status, body["remaining"]), (200, 29))
        # A query string on the API's path is still the API.
        status, _, body = s.request(
            "POST", "/v1/check?v=2",
            json.dumps({"path": "/api/search", "method": "GET", "user_id": "42"}),
            {"Content-Type": "application/json"})
        self.assertEqual((status, json.loads(body)["rule"]), (429, "GET /api/search"))

    def test_check_api_tells_a_client_that_expects_it_to_continue(self):
        s = self.start(SEED)
        body = json.dumps({"path": "/api/search", "method": "GET", "user_id": "7"}).encode()
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"POST /v1/check HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
            self.assertEqual(c.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            c.sendall(body)
            answer = c.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertEqual(json.loads(answer.split(b"\r\n\r\n", 1)[1])["remaining"], 29)

    def test_a_refusal_after_a_head_request_has_its_body(self):
        # A refused request is answered as itself: after a HEAD on the same connection, its
        # 400 keeps its body (a Content-Length with no body would hang a client); a refused
        # HEAD's has none.
        s = self.start(SEED)

        def exchange(data):
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(data)
                got = b""
                while chunk := c.recv(65536):
                    got += chunk
            return got

        got = exchange(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
        second = got[got.index(b"HTTP/1.1 400 "):]
        head, _, body = second.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: (\d+)", head)
        self.assertEqual(int(length.group(1)), len(body), second)
        self.assertEqual(json.loads(body)["message"], "a request must have exactly one Host header")
        got = exchange(b"HEAD /x HTTP/1.1\r\n\r\n")
        self.assertTrue(got.startswith(b"HTTP/1.1 400 "), got)
        self.assertTrue(got.endswith(b"\r\n\r\n"), got)

    def test_without_an_upstream_the_head_decides_before_any_body(self):
        # A decision-only gateway (a proxy's auth subrequest) decides on the request's head,
        # as gateway mode does: a client that expects 100-continue hears its 429 without
        # sending the body, and a large upload is not read (nor refused as too large).
        s = self.start(SEED)
        for _ in range(5):
            self.assertEqual(s.request("POST", "/api/login")[0], 200)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"POST /api/login HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                      b"Content-Length: 10\r\n\r\n")
            answer = c.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 "), answer)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                      b"Content-Length: 2000000\r\n\r\n")
            answer = c.recv(65536)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)

    def test_a_kept_alive_connections_next_body_gets_the_read_timeout(self):
        # The next request on a kept-alive connection has the read deadline from its first
        # byte, a stalled body included, not what is left of the idle one.
        s = self.start(SEED, extra=["--read-timeout-ms", "1000", "--idle-timeout-ms", "20000"])
        with socket.create_connection(("127.0.0.1", s.port), timeout=30) as c:
            c.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            first = c.recv(65536)
            self.assertTrue(first.startswith(b"HTTP/1.1 200 "), first)
            t0 = time.monotonic()
            c.sendall(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
            closed = b""
            try:
                while True:
                    piece = c.recv(65536)
                    if not piece:
                        break
                    closed += piece
            except ConnectionResetError:
                pass
            waited = time.monotonic() - t0
        self.assertLess(waited, 10, closed)  # the read timeout (1 s), not the idle one (20 s)

    def test_check_api_takes_a_stated_ip_only_from_a_trusted_caller(self):
        # Otherwise any client of the port could spend another's limits by naming its
        # address. Loopback callers are trusted unless decision_api.trust_loopback is off.
        login = {"path": "/api/login", "method": "POST", "ip": "203.0.113.7"}
        for extra, trusted in [("decision_api: {trust_loopback: false}\n", False),
                               ("decision_api: {trust_loopback: false}\n"
                                "trusted_proxies: [127.0.0.0/8]\n", True)]:
            with self.subTest(extra=extra):
                with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                    f.write(seed_text() + extra)
                self.addCleanup(os.unlink, f.name)
                s = self.start(f.name)
                status, _, body = s.check(login)
                if trusted:
                    self.assertEqual((status, body["remaining"]), (200, 4), body)
                    continue
                self.assertEqual(status, 400, body)
                self.assertEqual(body["message"],
                                 "'ip' is taken only from a trusted caller (trusted_proxies, "
                                 "and loopback unless decision_api.trust_loopback is false); "
                                 "leave it out to be decided as the caller's own address")
                del login["ip"]  # decided for the caller itself, and 203.0.113.7 spent nothing
                status, _, body = s.check(login)
                self.assertEqual((status, body["remaining"]), (200, 4), body)
                login["ip"] = "203.0.113.7"
        s = self.start(SEED)  # the default: a loopback caller states the address
        status, _, body = s.check(login)
        self.assertEqual((status, body["remaining"]), (200, 4))
        # Through a trusted proxy, the caller is the client it forwards for: untrusted.
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(seed_text() + "decision_api: {trust_loopback: false}\n"
                    "trusted_proxies: [127.0.0.0/8]\n")
        self.addCleanup(os.unlink, f.name)
        s = self.start(f.name)
        for xff in ("198.51.100.9", "unknown"):  # a client it cannot name is behind it too
            status, _, data = s.request("POST", "/v1/check", json.dumps(login),
                                        headers={"X-Forwarded-For": xff})
            self.assertEqual(status, 400, data)
            self.assertIn("'ip' is taken only from a trusted caller", json.loads(data)["message"])
        status, _, body = s.check(login)  # the proxy's own check: 203.0.113.7 spent nothing
        self.assertEqual((status, body["remaining"]), (200, 4), body)

    def test_check_api_takes_an_identity_only_from_a_trusted_caller_when_configured(self):
        # keys.from_trusted_proxies_only: the gateway reads the identity headers only from a
        # trusted proxy; the decision API must not let anyone else name a user either, in a
        # field or in "headers", or a client could spend (or dodge) any user's limits.
        base = ("rate_limits:\n  endpoints:\n    - {name: acct, path: /acct, limit: 2, "
                "window: 1m, key: user_id}\n"
                "keys: {from_trusted_proxies_only: true}\ntrusted_proxies: [10.0.0.0/8]\n")
        s = self.start(self.config_file(base + "decision_api: {trust_loopback: false}\n"))
        for field in ("user_id", "api_key", "tier"):
            status, _, body = s.check({"path": "/acct", field: "victim"})
            self.assertEqual((status, body["message"]), (400, (
                "'user_id', 'api_key' and 'tier' are taken only from a trusted caller "
                "(keys.from_trusted_proxies_only)")), field)
        # An identity header is not read: the check is the caller's own address's.
        for _ in range(2):
            status, _, body = s.check({"path": "/acct", "headers": {"X-User-Id": "victim"}})
            self.assertEqual(status, 200, body)
        status, _, body = s.check({"path": "/acct", "headers": {"X-User-Id": "other"}})
        self.assertEqual(status, 429, body)
        status, _, data = s.request("GET", "/v1/keys?limit=acct/limit&key=user_id%3Dvictim",
                                    admin=True)
        self.assertEqual((status, json.loads(data)["remaining"]), (200, 2))  # victim spent nothing
        # A trusted caller (loopback, the default) names users as before.
        t = self.start(self.config_file(base))
        for expected in (200, 200, 429):
            status, _, body = t.check({"path": "/acct", "user_id": "victim"})
            self.assertEqual(status, expected, body)
        status, _, body = t.check({"path": "/acct", "headers": {"X-User-Id": "v2"}})
        self.assertEqual((status, body["remaining"]), (200, 1), body)

    def test_check_api_misspelt_routes_are_not_read_as_allowed_checks(self):
        # Without an upstream any other path is decided as a request and answered
        # {"allowed":true}: a caller with a trailing slash or another case would read every
        # check as allowed.
        s = self.start(SEED)
        refused = {"path": "/api/login", "method": "POST", "ip": "203.0.113.99", "cost": 1000}
        status, _, _ = s.check(refused)
        self.assertEqual(status, 429)
        for target in ("/v1/check/", "/v1//check", "/V1/check", "/v1/check;x", "/v1/%63heck",
                       "/v1/check/batch/", "/v1/./check?x=1"):
            status, _, data = s.request("POST", target, json.dumps(refused))
            self.assertEqual((status, json.loads(data)), (404, {
                "error": "not_found", "message": "the decision API is at POST /v1/check and "
                "POST /v1/check/batch, spelled exactly so"}), target)
        status, _, _ = s.request("POST", "/v1/check?v=2", json.dumps(refused))
        self.assertEqual(status, 429)  # a query string is still the API

    def test_check_api_reads_query_keys_from_the_path_and_repeated_headers_as_repeated(self):
        # The same request gets the same key through the gateway and the decision API.
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n    - {name: export, path: /export, limit: 1, "
            "window: 1m, key: 'query:account'}\n    - {name: tenant, path: /t, limit: 1, "
            "window: 1m, key: 'header:x-tenant'}\n"))
        status, _, body = s.check({"path": "/export?account=42", "ip": "7.7.7.7"})
        self.assertEqual(status, 200, body)
        status, _, _, = s.request("GET", "/export?account=42")
        self.assertEqual(status, 429)  # the gateway's request met the same key
        status, _, body = s.check({"path": "/export?account=%34%33", "ip": "7.7.7.8"})
        self.assertEqual(status, 200, body)
        status, _, _, = s.request("GET", "/export?account=43")
        self.assertEqual(status, 429)
        status, _, body = s.check({"path": "/export?account=44&account=45"})
        self.assertEqual(status, 200, body)
        status, _, body = s.check({"path": "/export?account=46&account=47"})
        self.assertEqual(status, 429, body)  # both keyed "(repeated)", as the gateway does
        # A header given in two cases is given twice: keyed "(repeated)", not the first.
        status, _, body = s.check({"path": "/t", "headers": {"X-Tenant": "a", "x-tenant": "b"}})
        self.assertEqual(status, 200, body)
        status, _, body = s.check({"path": "/t", "headers": {"X-Tenant": "c", "x-tenant": "d"}})
        self.assertEqual(status, 429, body)
        status, _, body = s.check({"path": "/t", "headers": {"X-Tenant": "a"}})
        self.assertEqual(status, 200, body)

    def test_check_api_empty_ids_fall_back_to_the_address(self):
        # "" is no id: were it one, every caller sending it would share one key.
        s = self.start(SEED)
        upload = {"path": "/api/upload", "method": "POST", "user_id": ""}
        for _ in range(10):
            s.check(dict(upload, ip="198.51.100.1"))
        status, _, body = s.check(dict(upload, ip="198.51.100.1"))
        self.assertEqual((status, body["remaining"]), (429, 0), body)
        status, _, body = s.check(dict(upload, ip="203.0.113.99"))
        self.assertEqual((status, body["remaining"]), (200, 9), body)
        for field in ("api_key", "tier"):
            status, _, body = s.check({"path": "/api/upload", "method": "POST",
                                       "ip": "203.0.113.99", field: ""})
            self.assertEqual(status, 200, body)

    def test_check_api_cost_and_batch(self):
        s = self.start(SEED)
        status, _, body = s.check({"path": "/api/login", "method": "POST", "ip": "192.0.2.1",
                                   "cost": 3})
        self.assertEqual((status, body["remaining"]), (200, 2))
        status, _, data = s.request("POST", "/v1/check/batch", json.dumps({"checks": [
            {"path": "/api/login", "method": "POST", "ip": "192.0.2.1"},
            {"path": "/api/login", "method": "POST", "ip": "192.0.2.1"},
            {"path": "/api/login", "method": "POST", "ip": "192.0.2.1"}]}))
        self.assertEqual(status, 200)
        results = json.loads(data)["results"]
        self.assertEqual([r["allowed"] for r in results], [True, True, False])

    def test_check_api_rejects_bad_input_and_spends_nothing(self):
        s = self.start(SEED)
        cases = [
            ("{bad", "malformed JSON: syntax error"),
            ("[]", "a check must be a JSON object"),
            ('{"method":"GET"}', "missing 'path'"),
            ('{"path":"nope"}', "bad 'path': nope"),
            ('{"path":"/a","ip":"300.1.1.1"}', "bad 'ip': 300.1.1.1"),
            ('{"path":"/a","cost":-1}', "'cost' must be >= 0"),
            ('{"path":"/a","cost":"1"}', "'cost' must be a whole number"),
            ('{"path":"/a","cost":1.0}',
             "'cost' must be written as a whole number (no fraction or exponent)"),
            ('{"path":"/a","cost":1e3}',
             "'cost' must be written as a whole number (no fraction or exponent)"),
            ('{"path":"/a","cost":9223372036854775808}',
             "'cost' is too large (at most 9223372036854775807)"),
            ('{"path":"/a?x=1","query":{"x":"2"}}',
             "'path' has a query string and 'query' is given too: give the parameters once"),
            # Parsers disagree on which of two values wins (here: the login rule or another).
            ('{"path":"/api/login","method":"POST","path":"/other"}',
             "malformed JSON: the key 'path' is given twice"),
            ('{"path":"/a","headers":{"X-User-Id":"a","X-User-Id":"b"}}',
             "malformed JSON: the key 'X-User-Id' is given twice"),
            ('{"path":"/a","user_id":5}', "'user_id' must be a string"),
            ('{"path":"/a","method":""}', "bad 'method': "),
            ('{"path":"/a","method":"POST "}', "bad 'method': POST "),
            ('{"path":"/a","method":"POST\\u0000"}', "bad 'method': POST\u0000"),
            ('{"path":"/a","headers":"zz"}', "'headers' must be an object of strings"),
            ('{"path":"/a","headers":{"x-user-id":5}}', "'headers' must be an object of strings"),
            ('{"path":"/a","query":[1]}', "'query' must be an object of strings"),
        ]
        for payload, message in cases:
            status, _, body = s.request("POST", "/v1/check", payload)
            self.assertEqual(status, 400, payload)
            self.assertEqual(json.loads(body), {"error": "bad_request", "message": message})
        status, _, body = s.request("POST", "/v1/check/batch", json.dumps({"checks": [
            {"path": "/api/login", "method": "POST", "ip": "192.0.2.5"}, {"path": "x"}]}))
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["message"], "checks[1]: bad 'path': x")
        _, _, body = s.check({"path": "/api/login", "method": "POST", "ip": "192.0.2.5"})
        self.assertEqual(body["remaining"], 4)  # the bad batch spent nothing
        status, _, _ = s.request("GET", "/v1/check")
        self.assertEqual(status, 405)

    def test_batch_size_is_bounded(self):
        # A worker decides a batch in one go: its size is bounded (1000 checks by default,
        # --max-batch-checks), and a batch over it is refused whole, spending nothing.
        login = {"path": "/api/login", "method": "POST", "ip": "192.0.2.44"}
        s = self.start(SEED)
        status, _, body = s.request("POST", "/v1/check/batch",
                                    json.dumps({"checks": [login] * 1001}))
        self.assertEqual((status, json.loads(body)), (400, {
            "error": "bad_request", "message": "too many checks: 1001 (at most 1000 in one batch)"}))
        status, _, body = s.request("POST", "/v1/check/batch",
                                    json.dumps({"checks": [login] * 1000}))
        self.assertEqual(status, 200)
        self.assertEqual([r["allowed"] for r in json.loads(body)["results"]].count(True), 5)
        small = self.start(SEED, extra=["--max-batch-checks", "3"])
        status, _, body = small.request("POST", "/v1/check/batch",
                                        json.dumps({"checks": [login] * 4}))
        self.assertEqual((status, json.loads(body)["message"]),
                         (400, "too many checks: 4 (at most 3 in one batch)"))
        status, _, body = small.request("POST", "/v1/check/batch",
                                        json.dumps({"checks": [login] * 3}))
        self.assertEqual(status, 200)
        self.assertEqual([r["remaining"] for r in json.loads(body)["results"]], [4, 3, 2])

    def test_bounded_sizes(self):
        s = self.start(SEED)
        status, _, body = s.request("GET", "/x", headers={"X-Big": "a" * 20000})
        # (the error token as every other error of Sluice's is written)
        self.assertEqual((status, json.loads(body)["error"]),
                         (431, "request_header_fields_too_large"))
        status, _, body = s.request("POST", "/v1/check", body="x" * (2 << 20))
        self.assertEqual((status, json.loads(body)["error"]), (413, "payload_too_large"))
        small = self.start(SEED, extra=["--max-request-body", "1000"])
        status, _, body = small.request("POST", "/v1/check", body="x" * 1001)
        self.assertEqual((status, json.loads(body)["message"]), (413, "request body too large"))
        status, _, _ = small.request("POST", "/v1/check", body=json.dumps(
            {"path": "/api/login", "method": "POST", "ip": "192.0.2.9", "pad": "x" * 900}))
        self.assertEqual(status, 200)

    def test_bodies_held_unread_are_bounded_server_wide(self):
        # Each body read whole counts its announced length from its head on: clients that
        # announce large bodies and send them slowly cannot make the process hold
        # max_connections x max_request_body.
        s = self.start(SEED, extra=["--threads", "1", "--max-buffered-mib", "1"])
        head = (b"POST /v1/check HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                b"Content-Length: 700000\r\n\r\n")
        slow = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        self.addCleanup(slow.close)
        slow.sendall(head + b"{")
        time.sleep(0.2)  # its head is read: its body holds 700,000 of the 1 MiB
        status, h, body = self.raw(s, head + b"{")
        self.assertEqual(status, 503, body)
        self.assertEqual(h["connection"], "close")
        self.assertEqual(json.loads(body)["message"],
                         "request bodies in flight are over the server's bound "
                         "(--max-buffered-mib); retry shortly")
        self.assertEqual(s.metric("sluice_bodies_refused_total"), 1)
        # A small body still fits beside it, and once the slow one is read, a large one does.
        self.assertEqual(s.check({"path": "/x", "ip": "192.0.2.1"})[0], 200)
        slow.sendall(b" " * (700000 - 2) + b"}")
        r = http.client.HTTPResponse(slow)
        r.begin()
        self.assertEqual(r.status, 400)  # {} names no path
        r.read()
        payload = json.dumps({"path": "/x", "ip": "192.0.2.2", "pad": "x" * 699000}).encode()
        status, _, body = self.raw(s, b"POST /v1/check HTTP/1.1\r\nHost: a\r\nContent-Length: " +
                                   str(len(payload)).encode() + b"\r\n\r\n" + payload)
        self.assertEqual(status, 200, body)
        # Split between two workers, the budget's share (512 KiB each) is below a body that
        # fits the whole: a worker holding nothing still reads it, and a chunked one.
        two = self.start(SEED, extra=["--threads", "2", "--max-buffered-mib", "1"])
        for _ in range(4):  # whichever worker takes the connection
            status, _, body = self.raw(two, b"POST /v1/check HTTP/1.1\r\nHost: a\r\n"
                                       b"Content-Length: " + str(len(payload)).encode() +
                                       b"\r\n\r\n" + payload)
            self.assertEqual(status, 200, body)
            small = b'{"path": "/x", "ip": "192.0.2.3"}'
            status, _, body = self.raw(two, b"POST /v1/check HTTP/1.1\r\nHost: a\r\n"
                                       b"Transfer-Encoding: chunked\r\n\r\n" +
                                       b"%x\r\n" % len(small) + small + b"\r\n0\r\n\r\n")
            self.assertEqual(status, 200, body)
        self.assertEqual(two.metric("sluice_bodies_refused_total"), 0)
        s.stop()
        self.assertIn("WARN a request was answered 503 unread: request bodies in flight are at "
                      "--max-buffered-mib (sluice_bodies_refused_total)\n", s.stderr)

    def test_a_key_header_given_twice_keys_as_repeated(self):
        # An upstream may read either line (or both joined): keyed on the first, a client
        # sending a new first line each time was counted under it and served as the second.
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n"
            "    - {path: /t, limit: 2, window: 1m, key: 'header:X-Tenant'}\n"
            "    - {path: /u, limit: 2, window: 1m, key: user_id}\n"))

        def get(path, lines):
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n{lines}Connection: close\r\n\r\n"
                          .encode())
                answer = b""
                while data := c.recv(65536):
                    answer += data
            return int(answer.split(b" ", 2)[1])

        for path, name in (("/t", "X-Tenant"), ("/u", "X-User-Id")):
            statuses = [get(path, f"{name}: fresh{i}\r\n{name}: victim\r\n") for i in range(3)]
            self.assertEqual(statuses, [200, 200, 429], path)
            # The victim's own counter is untouched; the repeated ones share one.
            self.assertEqual([get(path, f"{name}: victim\r\n") for _ in range(3)],
                             [200, 200, 429], path)

    def test_a_request_line_beyond_the_head_bound_is_414(self):
        s = self.start(SEED)
        status, _, body = s.request("GET", "/" + "a" * 17000)
        self.assertEqual((status, json.loads(body)["message"]), (414, "request target too long"))
        status, _, _ = s.request("GET", "/" + "a" * 100, headers={"X-Big": "a" * 17000})
        self.assertEqual(status, 431)

    def test_requests_refused_unread_are_counted_by_status(self):
        # No rule sees them, so sluice_decisions_total cannot: a client probing the bounds or
        # speaking another protocol shows here.
        s = self.start(SEED)
        self.assertEqual(s.request("GET", "/" + "a" * 17000)[0], 414)
        self.assertEqual(s.request("GET", "/x", headers={"X-Big": "a" * 20000})[0], 431)
        self.assertEqual(s.request("POST", "/v1/check", body="x" * (2 << 20))[0], 413)
        self.assertEqual(self.raw(s, b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n")[0], 505)
        self.assertEqual(self.raw(s, b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")[0], 400)
        self.assertEqual(self.raw(s, b"GET /x HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n")[0], 400)
        self.assertEqual(self.raw(s, b"POST /x HTTP/1.1\r\nHost: a\r\n"
                                     b"Transfer-Encoding: gzip, chunked\r\n\r\n")[0], 501)
        # A client leaving mid-request was refused nothing: not counted.
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"POST /v1/check HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n{")
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
        series = 'sluice_requests_refused_total{status="%d"}'
        self.assertEqual([s.metric(series % code) for code in (400, 413, 414, 431, 501, 505)],
                         [2, 1, 1, 1, 1, 1])
        # A request a rule answers 400 for what it asks is counted where it always was.
        self.assertEqual(s.request("POST", "/v1/check", body="{")[0], 400)
        self.assertEqual(s.metric(series % 400), 2)
        self.assertEqual(s.metric("sluice_bad_requests_total"), 1)

    def test_chunk_lines_and_trailers_without_end_are_refused_not_held(self):
        # Beast holds a chunk line or trailer section whole until it ends, bounded by
        # nothing of its own: one client sent 517 MB of chunk extension into the server's
        # memory in 3 s. The connection's read buffer bounds them: 400 after a few pieces.
        s = self.start(SEED)
        head = (b"POST /v1/check HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        for name, start, piece in (("extension", b"3;", b"e" * 60000),
                                   ("trailers", b"3\r\nabc\r\n0\r\n",
                                    b"X-T: " + b"v" * 60000 + b"\r\n")):
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(head + start)
                sent, answer = 0, b""
                c.settimeout(0.05)
                while not answer and sent < (4 << 20):
                    try:
                        c.sendall(piece)
                        sent += len(piece)
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    except socket.timeout:
                        pass
                    try:
                        answer = c.recv(4096)
                    except socket.timeout:
                        pass
                c.settimeout(5)
                while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                    more = c.recv(4096)
                    if not more:
                        break
                    answer += more
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (name, answer[:80]))
                self.assertIn(b"a chunk line or the trailers are too long", answer)
                self.assertLess(sent, 1 << 20, name)

    def read_json_answer(self, c):
        """An answer with a JSON body, read from socket `c` up to the body's closing brace."""
        answer = b""
        while not answer.endswith(b"}"):
            more = c.recv(4096)
            self.assertTrue(more, answer)
            answer += more
        return answer

    def test_a_chunk_line_ended_by_a_bare_lf_is_refused_at_once(self):
        # RFC 9112 7.1 ends chunk lines and trailers with CRLF. Beast's parser passes over a
        # lone LF looking for one, so such a body was held, unanswered, until the read
        # deadline (60 s); a CRLF split across reads is still one line end.
        s = self.start(SEED)
        head = b"POST /v1/check HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b'{"path": "/api/search", "method": "GET", "user_id": "lf"}'
        good = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        for framing in (b"%x\n%s\n0\n\n" % (len(body), body),
                        b"%x;ext=1\n%s\n0\n\n" % (len(body), body),
                        b"%x\r\n%s\r\n0\nX-T: 1\n\n" % (len(body), body),
                        b"%x\r\n%s\r\n0\r\nX-T: 1\n\r\n" % (len(body), body)):
            with self.subTest(framing=framing), \
                    socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
                c.sendall(head + framing)
                answer = self.read_json_answer(c)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:80])
                self.assertIn(b"Connection: close", answer)
                self.assertIn(b'"message":"malformed HTTP request: a line must end with CRLF"',
                              answer)
        # The same body with CRLFs, all at once and a byte at a time: decided.
        for pieces in ([head + good], [head] + [good[i:i + 1] for i in range(len(good))]):
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for p in pieces:
                    c.sendall(p)
                    if len(pieces) > 1:
                        time.sleep(0.001)
                answer = self.read_json_answer(c)
                self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:80])
                self.assertIn(b'"allowed":true', answer)

    def test_slow_client_does_not_starve_others(self):
        s = self.start(SEED)
        slow = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(20)]
        for c in slow:
            c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: ")  # and never finish
        self.addCleanup(lambda: [c.close() for c in slow])
        t0 = time.time()
        for _ in range(20):
            status, _, _ = s.request("GET", "/healthz", admin=True)
            self.assertEqual(status, 200)
            status, _, _ = s.request("GET", "/y")
            self.assertEqual(status, 200)
        self.assertLess(time.time() - t0, 5)

    def test_a_request_that_does_not_arrive_in_time_is_cut_off(self):
        s = self.start(SEED, ["--read-timeout-ms", "500", "--idle-timeout-ms", "800"])
        t0 = time.time()  # before the connection, whose accept may start the timeout
        slow = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(slow.close)
        slow.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n")  # and never the blank line
        slow.settimeout(5)
        self.assertEqual(slow.recv(100), b"")  # closed by the server
        self.assertTrue(0.4 < time.time() - t0 < 2.5, time.time() - t0)
        idle = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        idle.request("GET", "/x")
        idle.getresponse().read()
        time.sleep(1.5)  # past the idle deadline: the server has closed it
        self.assertEqual(idle.sock.recv(100), b"")
        idle.close()
        # The next request on a kept-alive connection, dribbled: from its first byte it has
        # the read timeout, as on a new connection.
        s2 = self.start(SEED, ["--read-timeout-ms", "500", "--idle-timeout-ms", "8000"])
        kept = socket.create_connection(("127.0.0.1", s2.port))
        self.addCleanup(kept.close)
        kept.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        kept.settimeout(5)
        self.assertTrue(kept.recv(4096).startswith(b"HTTP/1.1 200"))
        t0 = time.time()
        closed = False
        for b in b"GET /y HTTP/1.1\r\nHost: a\r\nX-Slow: abcdefghijklmnopqrstuvwxyz":
            try:
                kept.sendall(bytes([b]))
            except OSError:
                closed = True
                break
            time.sleep(0.1)
            if time.time() - t0 > 4:
                break
        if not closed:
            kept.settimeout(3)
            try:
                closed = kept.recv(100) == b""
            except OSError:
                closed = True
        self.assertTrue(closed)
        self.assertLess(time.time() - t0, 2.5)  # not the 8 s idle timeout

    def test_connection_bounds_server_wide_and_per_address(self):
        s = self.start(SEED, ["--max-connections", "8", "--max-connections-per-ip", "3"])

        def connect(source):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=5,
                                         source_address=(source, 0))
            self.addCleanup(c.close)
            return c

        def served(c):
            c.sendall(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
            return c.recv(100).startswith(b"HTTP/1.1 200")

        def refused(c):
            try:
                return c.recv(100) == b""  # closed at once, before any request
            except ConnectionResetError:
                return True

        held = [connect("127.0.0.2") for _ in range(3)]
        self.assertTrue(all(served(c) for c in held))
        self.assertEqual(s.metric("sluice_connections_refused_total"), 0)
        self.assertTrue(refused(connect("127.0.0.2")))  # a 4th from the same address
        self.assertEqual(s.metric("sluice_connections_refused_total"), 1)  # counted
        self.assertTrue(served(connect("127.0.0.1")))  # another address is served
        held[0].close()
        # A slot freed by a close is reused, once the server has seen the close (until then
        # a 4th connection from 127.0.0.2 is rightly refused).
        deadline = time.monotonic() + 10
        while True:
            try:
                if served(connect("127.0.0.2")):
                    break
            except OSError:  # refused: reset while sending or reading
                pass
            self.assertLess(time.monotonic(), deadline, "the closed connection's slot not freed")
            time.sleep(0.05)
        # The server-wide bound: 8 in all, from any addresses.
        more = [connect(f"127.0.0.{i}") for i in (3, 3, 4, 4)]
        self.assertTrue(all(served(c) for c in more))
        before = s.metric("sluice_connections_refused_total")
        self.assertTrue(refused(connect("127.0.0.5")))
        self.assertEqual(s.metric("sluice_connections_refused_total"), before + 1)
        # Each listener has its own bounds: the admin port still answers, from an address
        # at its per-address bound on the public port too.
        for _ in range(3):
            self.assertEqual(s.request("GET", "/healthz", admin=True)[0], 200)
        admin = []
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", s.admin_port), timeout=5,
                                         source_address=("127.0.0.2", 0))
            self.addCleanup(c.close)
            admin.append(c)
        for c in admin:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
            self.assertTrue(c.recv(100).startswith(b"HTTP/1.1 200"))
        # Refusals are logged too, at most once a second.
        s.stop()
        self.assertIn("WARN a connection was closed at accept, over --max-connections or "
                      "--max-connections-per-ip (sluice_connections_refused_total)", s.stderr)

    def test_keys_back_to_fresh_are_dropped_by_the_periodic_sweep(self):
        # The server sweeps its tables every 10 s, a shard per loop turn: the keys of a
        # 1 s window are gone from /metrics within a sweep period of their window's end.
        s = self.start(self.config_file(
            "rate_limits:\n  endpoints:\n"
            "    - {path: /s, limit: 5, window: 1s, key: query:u}\n"))

        def held():
            text = s.request("GET", "/metrics", admin=True)[2].decode()
            lines = [line for line in text.splitlines()
                     if line.startswith('sluice_keys{limit="/s/limit"}')]
            self.assertEqual(len(lines), 1, text)
            return int(lines[0].split()[1])

        for i in range(300):
            self.assertEqual(s.request("GET", f"/s?u={i}")[0], 200)
        self.assertEqual(held(), 300)
        deadline = time.time() + 25  # a window (1 s), a sweep period (10 s), a loaded machine
        while held() and time.time() < deadline:
            time.sleep(0.5)
        self.assertEqual(held(), 0)
        status, h, _ = s.request("GET", "/s?u=1")  # a swept key starts afresh
        self.assertEqual((status, h["x-ratelimit-remaining"]), (200, "4"))

    def test_every_answer_has_a_date_and_blank_lines_before_a_request_are_skipped(self):
        # RFC 9110 6.6.1: an origin server with a clock sends Date (a client whose clock is
        # off needs it to read X-RateLimit-Reset, an epoch time).
        s = self.start(SEED)
        import email.utils
        for method, path, body, admin in [("GET", "/x", None, False),
                                          ("POST", "/v1/check", "{", False),
                                          ("GET", "/healthz", None, True)]:
            status, headers, _ = s.request(method, path, body, admin=admin)
            date = email.utils.parsedate_to_datetime(headers["date"])
            self.assertLess(abs(date.timestamp() - time.time()), 5, (path, headers["date"]))
        for _ in range(6):
            status, headers, _ = s.request("POST", "/api/login")
        self.assertEqual(status, 429)
        self.assertIn("date", headers)
        # RFC 9112 2.2: empty lines before a request line are ignored (a client may send a
        # CRLF after a body), a few of them, as nginx does.
        answers = self.exchange_to_close(
            s, b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nab\r\n"
               b"\r\nGET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        self.assertEqual(answers.count(b"HTTP/1.1 200 OK"), 2, answers)

    def test_close_on_a_second_connection_line_ends_the_connection(self):
        # RFC 9110 5.3: field lines of one name are one list; "close" in any of them ends
        # the connection after this answer (the pipelined request after it is not served).
        s = self.start(SEED)
        for version in (b"1.1", b"1.0"):
            answers = self.exchange_to_close(
                s, b"GET /a HTTP/" + version + b"\r\nHost: x\r\nConnection: keep-alive"
                   b"\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertEqual(answers.count(b" 200 OK"), 1, answers)

    def test_a_flood_of_new_keys_never_frees_a_limited_one(self):
        # A table full of keys: new keys must not evict one at its limit, or flooding them
        # would admit its client again. Once every key held is at its limit, new keys are
        # refused, counted and logged.
        path = self.config_file(
            "rate_limits:\n  default: {limit: 1000, window: 1m}\n  endpoints:\n"
            "    - path: /k\n      key: \"header:X-Key\"\n      limit: 2\n      window: 1m\n")
        s = self.start(path, ["--max-keys", "8"])

        def get(key):
            return s.request("GET", "/k", headers={"X-Key": key})[0]
        self.assertEqual([get("victim") for _ in range(3)], [200, 200, 429])
        for i in range(50):  # keys that spend a little, then keys that spend all
            get(f"light{i}")
        self.assertEqual(get("victim"), 429)
        for i in range(50):
            get(f"heavy{i}")
            get(f"heavy{i}")
        self.assertEqual(get("victim"), 429)
        self.assertEqual(get("newcomer"), 429)  # nothing left to forget
        self.assertGreater(s.metric('sluice_table_full_refusals_total{limit="/k/limit"}'), 0)
        time.sleep(6)  # the main loop reports refusals every 5 s
        s.stop()
        self.assertIn("WARN limit /k/limit: ", s.stderr)
        self.assertIn("new keys refused, its table full of keys at their limit", s.stderr)

    def test_admin_calls_refuse_what_would_act_on_another_key_or_do_nothing(self):
        s = self.start(SEED)
        for target, message in [
                ("/v1/keys?limit=POST%20/api/login/limit&key=%ZZ",
                 "the parameter 'key' has a '%' not followed by two hex digits (write '%25' "
                 "for '%')"),
                ("/v1/keys?limit=POST%20/api/login/limit&key=ip%3D1.2.3.4&key=ip%3D5.6.7.8",
                 "the parameter 'key' is given twice")]:
            for method in ("GET", "DELETE"):
                status, _, body = s.request(method, target, admin=True)
                self.assertEqual((status, json.loads(body)["message"]), (400, message), target)
        # The probes and the scrape are reads: another method is 405, not a silent 200.
        for method, path in [("DELETE", "/healthz"), ("POST", "/metrics"), ("PUT", "/readyz")]:
            status, headers, _ = s.request(method, path, admin=True)
            self.assertEqual((status, headers.get("allow")), (405, "GET, HEAD"), path)
        self.assertEqual(s.request("HEAD", "/healthz", admin=True)[0], 200)

    def test_the_latency_histogram_counts_every_kind_of_request(self):
        # One observation per request answered: a gateway request, a decision API call, a
        # batch (one, however many checks).
        s = self.start(SEED)
        count = "sluice_decision_latency_seconds_count"
        self.assertEqual(s.metric(count), 0)
        s.request("POST", "/api/login")
        self.assertEqual(s.check({"path": "/api/login", "method": "POST"})[0], 200)
        status, _, _ = s.request("POST", "/v1/check/batch", json.dumps(
            {"checks": [{"path": "/api/login", "method": "POST"}, {"path": "/x"}]}))
        self.assertEqual(status, 200)
        self.assertEqual(s.metric(count), 3)
        self.assertEqual(s.metric('sluice_decision_latency_seconds_bucket{le="+Inf"}'), 3)

    def test_a_peek_is_counted_as_peeked_not_as_allowed(self):
        # A cost-0 check looks at what is left: an "allowed" count would tell a dashboard of
        # admitted traffic that never came.
        s = self.start(SEED)
        login = {"path": "/api/login", "method": "POST"}
        self.assertEqual(s.check(dict(login, cost=0))[0], 200)
        self.assertEqual(s.check(login)[0], 200)
        series = 'sluice_decisions_total{rule="POST /api/login",outcome="%s"}'
        self.assertEqual((s.metric(series % "peeked"), s.metric(series % "allowed")), (1, 1))

    def test_admin_metrics_keys_and_reload(self):
        path = self.config_file(seed_text())
        s = self.start(path)
        self.assertEqual(s.request("GET", "/healthz", admin=True)[0], 200)
        self.assertEqual(s.request("GET", "/readyz", admin=True)[0], 200)
        for _ in range(6):
            s.request("POST", "/api/login")
        _, _, metrics = s.request("GET", "/metrics", admin=True)
        text = metrics.decode()
        self.assertIn('sluice_decisions_total{rule="POST /api/login",outcome="allowed"} 5', text)
        self.assertIn('sluice_decisions_total{rule="POST /api/login",outcome="limited"} 1', text)
        self.assertIn('sluice_keys{limit="POST /api/login/limit"} 1', text)
        self.assertIn("sluice_decision_latency_seconds_count", text)
        held = [line for line in text.splitlines() if line.startswith("sluice_memory_store_bytes ")]
        self.assertEqual(len(held), 1, text)
        self.assertGreater(int(held[0].split()[1]), 0)
        key = "/v1/keys?limit=POST%20/api/login/limit&key=ip%3D127.0.0.1"
        status, _, body = s.request("GET", key, admin=True)
        self.assertEqual((status, json.loads(body)["remaining"]), (200, 0))
        status, _, body = s.request("DELETE", key, admin=True)
        self.assertEqual(json.loads(body), {"deleted": True})
        self.assertEqual(s.request("POST", "/api/login")[0], 200)
        # A key or a name is echoed as UTF-8 (a JSON text must be), whatever bytes it held.
        status, _, body = s.request("GET", key.replace("127.0.0.1", "%FF%0A%C3"), admin=True)
        self.assertEqual((status, json.loads(body.decode("utf-8"))["key"]),
                         (200, "ip=\ufffd\n\ufffd"))
        status, _, body = s.request("GET", "/v1/keys?limit=%FEx&key=a", admin=True)
        self.assertEqual((status, json.loads(body.decode("utf-8"))["message"]),
                         (404, "no limit named '\ufffdx'"))
        # A bad config is refused and the running rules stay.
        with open(path, "w") as out:
            out.write("rate_limits:\n  endpoints:\n    - path: /api/login\n      limit: 5\n"
                      "      windw: 1m\n")
        status, _, body = s.request("POST", "/v1/reload", admin=True)
        self.assertEqual(status, 400)
        self.assertIn("unknown key 'windw'", json.loads(body)["message"])
        self.assertEqual(s.request("POST", "/api/login")[1]["x-ratelimit-limit"], "5")
        # Counted, for an alert: the file on disk is not what runs.
        self.assertEqual(s.metric("sluice_reload_failures_total"), 1)
        self.assertEqual(s.metric("sluice_reloads_total"), 0)
        gauge = 'sluice_config_last_reload_successful{part="rules"}'
        self.assertEqual(s.metric(gauge), 0)
        # The parts not in use show no series.
        self.assertIsNone(s.metric('sluice_config_last_reload_successful{part="envoy"}'))
        # A good one is applied.
        with open(path, "w") as out:
            out.write(seed_text().replace("limit: 5", "limit: 7"))
        status, _, _ = s.request("POST", "/v1/reload", admin=True)
        self.assertEqual(status, 200)
        self.assertEqual(s.request("POST", "/api/login")[1]["x-ratelimit-limit"], "7")
        self.assertIn("sluice_reloads_total 1", s.request("GET", "/metrics", admin=True)[2].decode())
        self.assertEqual(s.metric(gauge), 1)  # the failure is no longer standing
        # The admin calls read and reset the counters the running rules use (7 a minute),
        # not the table the old policy left behind.
        for _ in range(6):
            s.request("POST", "/api/login")
        status, _, body = s.request("GET", key, admin=True)
        self.assertEqual((status, json.loads(body)["policy"], json.loads(body)["remaining"]),
                         (200, "sliding_window_counter 7/1m", 0), body)
        self.assertEqual(s.request("POST", "/api/login")[0], 429)
        status, _, body = s.request("DELETE", key, admin=True)
        self.assertEqual(json.loads(body), {"deleted": True})
        self.assertEqual(s.request("POST", "/api/login")[1]["x-ratelimit-remaining"], "6")
        # A reload that leaves the policy as it is keeps its counts.
        self.assertEqual(s.request("POST", "/v1/reload", admin=True)[0], 200)
        self.assertEqual(s.request("POST", "/api/login")[1]["x-ratelimit-remaining"], "5")
        text = s.request("GET", "/metrics", admin=True)[2].decode()
        self.assertEqual(text.count('sluice_keys{limit="POST /api/login/limit"}'), 1, text)
        # A limit the running rules no longer have is unknown, though its table remains:
        # an operator must not read or reset state no decision uses.
        with open(path, "w") as out:
            out.write(seed_text().replace('path: "/api/login"', 'path: "/api/signin"'))
        self.assertEqual(s.request("POST", "/v1/reload", admin=True)[0], 200)
        for method in ("GET", "DELETE"):
            status, _, body = s.request(method, key, admin=True)
            self.assertEqual((status, json.loads(body)["message"]),
                             (404, "no limit named 'POST /api/login/limit'"), method)

    def test_ipv6_clients_are_keyed_by_their_64(self):
        s = self.start(SEED)
        for i in range(5):
            status, _, body = s.check({"path": "/api/login", "method": "POST",
                                       "ip": f"2001:db8:1:2::{i + 1}"})
            self.assertEqual((status, body["remaining"]), (200, 4 - i))
        status, _, _ = s.check({"path": "/api/login", "method": "POST",
                                "ip": "2001:db8:1:2:ffff::9"})
        self.assertEqual(status, 429)  # same /64: same key
        status, _, _ = s.check({"path": "/api/login", "method": "POST", "ip": "2001:db8:1:3::1"})
        self.assertEqual(status, 200)  # the next /64 is another client

    def test_a_rule_added_before_others_leaves_their_counts_alone(self):
        path = self.config_file("rate_limits:\n  endpoints:\n"
                                "    - {path: /login, limit: 5, window: 1m}\n"
                                "    - {path: /search, limit: 5, window: 1m}\n")
        s = self.start(path)
        self.assertEqual([s.request("GET", "/search")[0] for _ in range(6)], [200] * 5 + [429])
        with open(path, "w") as out:
            out.write("rate_limits:\n  endpoints:\n"
                      "    - {path: /new, limit: 100, window: 1m}\n"
                      "    - {path: /login, limit: 5, window: 1m}\n"
                      "    - {path: /search, limit: 5, window: 1m}\n")
        self.assertEqual(s.request("POST", "/v1/reload", admin=True)[0], 200)
        status, h, _ = s.request("GET", "/login")
        self.assertEqual((status, h["x-ratelimit-remaining"]), (200, "4"))
        self.assertEqual(s.request("GET", "/search")[0], 429)

    def test_reload_under_load_loses_no_request(self):
        path = self.config_file(seed_text())
        s = self.start(path)
        import threading
        errors, answered = [], [0]
        stop = threading.Event()

        def hammer():
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
            while not stop.is_set():
                try:
                    conn.request("GET", "/anything")
                    r = conn.getresponse()
                    r.read()
                    if r.status not in (200, 429):
                        errors.append(r.status)
                    answered[0] += 1
                except Exception as e:  # any transport error is a lost request
                    errors.append(repr(e))
                    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
            conn.close()

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        # At least 20 reloads, and on until the load has had more than 100 answers meanwhile
        # (a slow machine may answer fewer in the time of 20 reloads).
        i, deadline = 0, time.monotonic() + 60
        while i < 20 or (answered[0] <= 100 and time.monotonic() < deadline):
            with open(path, "w") as out:
                out.write(seed_text().replace("requests_per_minute: 60",
                                                    f"requests_per_minute: {60 + i % 20}"))
            status, _, _ = s.request("POST", "/v1/reload", admin=True)
            self.assertEqual(status, 200)
            i += 1
            time.sleep(0.02)
        stop.set()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertGreater(answered[0], 100)

    @staticmethod
    def big_config(default_limit, rules=10000):
        """A valid config of `rules` endpoint rules: a reload of it takes a while."""
        lines = ["rate_limits:", f"  default: {{limit: {default_limit}, window: 1m}}",
                 "  endpoints:"]
        lines += [f"    - {{path: /api/r{i}/*, method: GET, limit: {i + 1}, window: 1m, "
                  "key: [ip, user_id]}" for i in range(rules)]
        return "\n".join(lines) + "\n"

    @staticmethod
    def slow_reload(s):
        """POST /v1/reload, waiting as long as a large file takes (a sanitizer build parses
        it ten times slower); its status."""
        conn = http.client.HTTPConnection("127.0.0.1", s.admin_port, timeout=300)
        try:
            conn.request("POST", "/v1/reload")
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            conn.close()

    def test_a_large_reload_holds_no_request(self):
        # One worker: a reload parsed on it would hold every request until it is done.
        path = self.config_file(seed_text())
        s = self.start(path, extra=["--threads", "1"])
        with open(path, "w") as out:
            out.write(self.big_config(70))
        import threading
        done = []

        def reload():
            t0 = time.monotonic()
            status = self.slow_reload(s)
            done.append((status, t0, time.monotonic()))

        t = threading.Thread(target=reload)
        t.start()
        served = []  # (sent, answered) of each request while the reload runs
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        while t.is_alive():
            sent = time.monotonic()
            conn.request("GET", "/anything")
            r = conn.getresponse()
            r.read()
            self.assertIn(r.status, (200, 429))
            served.append((sent, time.monotonic()))
        t.join()
        conn.close()
        status, t0, t1 = done[0]
        self.assertEqual(status, 200)
        self.assertGreater(t1 - t0, 0.2, "the reload was too quick to tell")
        during = [x for x in served if x[0] > t0 and x[1] < t1]
        self.assertGreaterEqual(len(during), 10, f"{len(served)} requests, reload {t1 - t0:.2f} s")
        _, h, _ = s.request("GET", "/api/r41/x")
        self.assertEqual(h["x-ratelimit-limit"], "42")

    def test_a_file_reloaded_on_request_is_not_reloaded_again_by_the_watch(self):
        # The admin call or SIGHUP read the changed file: the watch, which would see the
        # change a tick or two later, has nothing left to do.
        path = self.config_file(seed_text())
        s = self.start(path)
        for n, how in enumerate(["admin", "sighup"], 1):
            with open(path, "w") as out:
                out.write(seed_text().replace("limit: 5", f"limit: {5 + n}"))
            if how == "admin":
                self.assertEqual(s.request("POST", "/v1/reload", admin=True)[0], 200)
            else:
                s.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 20
            while s.request("POST", "/api/login")[1]["x-ratelimit-limit"] != str(5 + n):
                self.assertLess(time.monotonic(), deadline, "the reload was not applied")
                time.sleep(0.05)
            time.sleep(3)  # the watch ticks every second, and loads a change a tick later
            self.assertEqual(s.metric("sluice_reloads_total"), n, how)
        s.stop()
        self.assertEqual(s.stderr.count("INFO reloaded"), 2, s.stderr)

    def test_reloads_still_queued_at_a_stop_are_not_run(self):
        # A drain is no time to read and compile a large file whose rules would never serve:
        # the reload running finishes, the queued ones are answered without running.
        path = self.config_file(seed_text())
        # A drain far longer than a reload: the one running at the stop must end in it.
        s = self.start(path, extra=["--threads", "1", "--drain-timeout-ms", "300000"])
        with open(path, "w") as out:
            out.write(self.big_config(70))
        t0 = time.monotonic()
        self.assertEqual(self.slow_reload(s), 200)
        one = time.monotonic() - t0
        import threading
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(self.slow_reload(s)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(min(one / 3, 0.5))  # the first runs, five wait
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        self.assertEqual(s.proc.wait(timeout=120), 0)
        took = time.monotonic() - t0
        for t in threads:
            t.join()
        s.stop()
        # The measured reload, and the one running at the stop if it had begun: the five
        # queued behind it never ran (a time bound would move with the machine's load).
        self.assertLessEqual(s.stderr.count("INFO reloaded"), 2, s.stderr)
        self.assertLess(took, 120, f"one reload takes {one:.2f} s")
        self.assertNotIn("INFO reloaded", s.stderr.partition("INFO stopped")[2])
        # Those not run are answered 503 (the service is going), not 400 (a bad file).
        self.assertEqual(len(statuses), 6, statuses)
        self.assertGreaterEqual(statuses.count(503), 5, statuses)
        self.assertEqual(statuses.count(503) + statuses.count(200), 6, statuses)

    def test_a_config_file_gone_is_said_once_and_the_rules_stay(self):
        path = self.config_file(seed_text())
        s = self.start(path)
        text = pathlib.Path(path).read_text()
        os.unlink(path)
        time.sleep(3.5)  # three ticks: gone for two of them is said
        self.assertEqual(s.request("POST", "/api/login")[1]["x-ratelimit-limit"], "5")
        with open(path, "w") as f:
            f.write(text)
        time.sleep(1.5)
        self.assertEqual(s.stop(), 0)
        self.assertEqual(s.stderr.count(f"WARN the config file {path} is gone or unreadable: the "
                                        "running rules stay, and a restart would fail until it "
                                        "is back"), 1, s.stderr)

    def test_reloads_apply_the_newest_file(self):
        # A slow reload of an older file must not land after a quick one of a newer file:
        # reloads run one at a time, each reading the file as it is when its turn comes.
        path = self.config_file(seed_text())
        s = self.start(path)
        import threading
        statuses = []

        def reload():
            statuses.append(self.slow_reload(s))

        with open(path, "w") as out:
            out.write(self.big_config(61))
        slow = threading.Thread(target=reload)
        slow.start()
        time.sleep(0.05)  # the slow one is reading or parsing the large file
        # Replaced whole (written beside it, then renamed over it), as config tools do: a
        # reload whose turn came while the file was rewritten in place would read half a
        # file and be refused, rightly.
        with open(path + ".new", "w") as out:
            out.write("rate_limits:\n  default: {limit: 62, window: 1m}\n")
        os.replace(path + ".new", path)
        s.proc.send_signal(signal.SIGHUP)
        quick = threading.Thread(target=reload)
        quick.start()
        slow.join()
        quick.join()
        self.assertEqual(statuses, [200, 200])
        _, h, _ = s.request("GET", "/anything")
        self.assertEqual(h["x-ratelimit-limit"], "62")

    def test_a_reload_naming_a_fifo_as_tls_file_fails_and_later_reloads_apply(self):
        # The store's TLS files are read as the config is: a FIFO (or /dev/zero) named there
        # fails the load at once; read to its end, it held the reload thread (or took all
        # memory), and no later reload applied.
        store = "store: {type: redis, address: '127.0.0.1:1', timeout: 50ms}\n"
        rules = "rate_limits:\n  default: {limit: 60, window: 1m}\n"
        path = self.config_file(store + rules)
        s = self.start(path)
        fifo = os.path.join(tempfile.mkdtemp(), "ca.fifo")
        os.mkfifo(fifo)
        self.addCleanup(os.unlink, fifo)
        with open(path, "w") as out:
            out.write(store.replace("timeout: 50ms}", f"timeout: 50ms, tls: {{ca_file: '{fifo}'}}}}")
                      + rules)
        status, _, body = s.request("POST", "/v1/reload", admin=True)
        self.assertEqual(status, 400)
        self.assertIn(f"cannot read '{fifo}': not a regular file", json.loads(body)["message"])
        with open(path, "w") as out:
            out.write(store + rules.replace("60", "61"))
        self.assertEqual(s.request("POST", "/v1/reload", admin=True)[0], 200)
        self.assertEqual(s.request("GET", "/anything")[1]["x-ratelimit-limit"], "61")

    def test_a_burst_of_sighups_is_one_reload_after_the_running_one(self):
        # Signals that come while a reload waits its turn join it; queued one each, a burst
        # would hold the reload thread for a burst of full reads of a large file.
        path = self.config_file(seed_text())
        s = self.start(path)

        def reloads():
            # A scrape waits for a core while a large reload parses: under TSan on a loaded
            # machine, seconds.
            text = s.request("GET", "/metrics", admin=True, timeout=60)[2].decode()
            return int(re.search(r"^sluice_reloads_total (\d+)$", text, re.M).group(1))

        def await_reloads(n):
            deadline = time.monotonic() + 120
            while reloads() < n:
                self.assertLess(time.monotonic(), deadline)
                time.sleep(0.02)

        with open(path, "w") as out:
            out.write(self.big_config(63))
        await_reloads(1)  # the file watcher's; the file stays as it is from here
        t0 = time.monotonic()
        for _ in range(20):
            s.proc.send_signal(signal.SIGHUP)
            time.sleep(0.005)
        await_reloads(2)
        took = time.monotonic() - t0  # about one reload of the file
        self.assertGreater(took, 0.3, "the reload was too quick to tell")
        time.sleep(2 * took + 1)  # room for one more reload, and then some
        self.assertLessEqual(reloads(), 3, "20 signals in 0.1 s: the reload running, one after it")
        self.assertEqual(s.request("GET", "/anything")[1]["x-ratelimit-limit"], "63")

    def test_sighup_reloads(self):
        path = self.config_file(seed_text())
        s = self.start(path)
        with open(path, "w") as out:
            out.write(seed_text().replace("limit: 30", "limit: 31"))
        s.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 20
        while time.time() < deadline:
            _, h, _ = s.request("GET", "/api/search", headers={"X-User-Id": "1"})
            if h["x-ratelimit-limit"] == "31":
                break
            time.sleep(0.05)
        self.assertEqual(h["x-ratelimit-limit"], "31")

    def test_table_counters_never_fall_across_reloads_that_change_a_policy(self):
        """sluice_evictions_total is a counter: a reload that moves a limit to another
        policy's table, and back, must not make it fall (Prometheus would read a reset, and
        the return as evictions that never happened)."""
        def config(limit):
            return ("rate_limits:\n  default: {requests_per_minute: 60}\n  endpoints:\n"
                    f"    - {{path: /api/login, method: POST, name: login, limit: {limit}, "
                    "window: 1m, key: ip}\n")

        path = self.config_file(config(5))
        s = self.start(path, extra=["--max-keys", "4"])
        series = 'sluice_evictions_total{limit="login/limit"}'
        seen = []

        def spend(first, n):
            for i in range(first, first + n):
                body = json.dumps({"path": "/api/login", "method": "POST", "ip": f"203.0.113.{i}"})
                self.assertEqual(s.request("POST", "/v1/check", body)[0], 200)
            seen.append(s.metric(series))

        def reload(limit):
            with open(path, "w") as f:
                f.write(config(limit))
            self.assertEqual(s.request("POST", "/v1/reload", admin=True)[0], 200)
            seen.append(s.metric(series))

        spend(1, 40)
        self.assertGreater(seen[-1], 0)
        reload(6)
        spend(41, 10)
        reload(5)
        spend(51, 10)
        self.assertEqual(seen, sorted(seen), seen)
        self.assertGreater(seen[-1], seen[0])

    def test_idle_keep_alive_connections_hold_little_whatever_they_last_carried(self):
        """Thousands of kept-alive connections wait between requests: each must hold a few
        KiB, not its largest answer (a 1,000-check batch's is about 230 KB) or upload."""
        libs = subprocess.run(["ldd", BIN], capture_output=True, text=True).stdout
        if "libmimalloc" not in libs:
            self.skipTest("measured with mimalloc, which returns freed pages at once when "
                          "told to (a sanitizer build keeps freed memory in quarantine)")
        with freed_memory_returned():
            s = self.start(extra=["--threads", "1"])

        def rss_kib():
            with open(f"/proc/{s.proc.pid}/status") as f:
                return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

        body = json.dumps({"checks": [{"path": f"/p{i}", "cost": 0} for i in range(1000)]})
        batch = (f"POST /v1/check/batch HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 f"\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
        upload = b"x" * 100_000
        put = (f"PUT /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {len(upload)}\r\n\r\n"
               .encode() + upload)
        conns = []
        self.addCleanup(lambda: [c.close() for c in conns])

        def exchange(data):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            c.sendall(data)
            got = b""
            while b"\r\n\r\n" not in got:
                got += c.recv(1 << 20)
            head, rest = got.split(b"\r\n\r\n", 1)
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            while len(rest) < length:
                rest += c.recv(1 << 20)
            conns.append(c)  # kept alive, idle
            return len(rest)

        exchange(batch)
        before = rss_kib()
        n = 150
        for _ in range(n):
            self.assertGreater(exchange(batch), 200_000)
            exchange(put)
        per_connection = (rss_kib() - before) / (2 * n)
        print(f"\n  RSS per idle connection: {per_connection:.1f} KiB", file=sys.stderr)
        self.assertLess(per_connection, 64, "idle connections hold their last answer or upload")

    def test_a_log_pipe_whose_reader_left_does_not_end_the_process(self):
        # `sluice serve 2>&1 | tee` with tee gone, or a log collector restarting: the next
        # log line must fail quietly, not raise SIGPIPE and end the service.
        path = self.config_file(seed_text())
        port, admin = free_port(), free_port()
        read, write = os.pipe()
        proc = subprocess.Popen([BIN, "serve", "--config", path, "--listen", f"127.0.0.1:{port}",
                                 "--admin", f"127.0.0.1:{admin}", "--threads", "1"],
                                stdout=write, stderr=write)
        os.close(write)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        with os.fdopen(read, "rb") as out:
            out.readline()  # the banner: it listens
        # The reader is gone; a reload logs a line.
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        self.assertIsNone(proc.poll(), f"sluice exited {proc.returncode}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/x")
        self.assertEqual(conn.getresponse().status, 200)
        conn.close()
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(timeout=10), 0)

    def test_a_sighup_with_no_config_file_says_so(self):
        s = self.start()
        s.proc.send_signal(signal.SIGHUP)
        # Read until the warning comes: a stop before the reload thread has run skips it.
        want = "WARN reload: no config file to read (running on the embedded default)"
        seen, deadline = b"", time.time() + 30
        while want.encode() not in seen and time.time() < deadline:
            if select.select([s.proc.stderr], [], [], 0.1)[0]:
                seen += os.read(s.proc.stderr.fileno(), 65536)
        s.stop()
        self.assertIn(want, seen.decode() + s.stderr)

    def test_the_open_files_limit_is_raised_or_its_shortfall_said(self):
        # A soft limit below the hard one goes up to it at start.
        proc, _, _, _ = start_with_open_files(self, 64, 4096)
        with open(f"/proc/{proc.pid}/limits") as f:
            line = next(l for l in f if l.startswith("Max open files"))
        self.assertEqual(line.split()[3:5], ["4096", "4096"], line)
        # A hard limit too low is said at start; running out is logged and counted, and the
        # connections waiting are served once others close.
        proc, port, admin, log = start_with_open_files(self, 64, 64)
        # The admin port answered once before, as probes and scrapes do: under UBSan the
        # first virtual call of each kind checks its object's type by making a pipe, which
        # out of descriptors fails and is reported as a bad object.
        self.assertEqual(http_get(admin, "/metrics")[0], 200)
        clients = []
        try:
            for _ in range(80):
                c = socket.create_connection(("127.0.0.1", port), timeout=10)
                c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                clients.append(c)
            deadline = time.time() + 15
            while True:
                if "WARN accept failed: Too many open files" in read_log(log):
                    break
                self.assertLess(time.time(), deadline, "running out was not logged")
                time.sleep(0.05)
            # Out of descriptors, the admin port still answers: its listener holds one in
            # reserve for it, and takes it again once the answer's connection is closed.
            for attempt in range(3):
                status, text = http_get(admin, "/metrics")
                self.assertEqual(status, 200, attempt)
                self.assertRegex(text, r"(?m)^sluice_accept_failures_total [1-9]")
                time.sleep(0.3)  # the close seen, the reserve taken again
        finally:
            for c in clients:
                c.close()
        deadline = time.time() + 15
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
                conn.close()
                break
            except OSError:
                self.assertLess(time.time(), deadline, "the admin port did not come back")
                time.sleep(0.1)
        failures = int(re.search(r"^sluice_accept_failures_total (\d+)$", text, re.M).group(1))
        self.assertGreater(failures, 0)
        self.assertIn("WARN the open files limit (64) is below what the listeners may hold "
                      "(--max-connections 10000) and 256 more for upstream and Redis "
                      "connections", read_log(log))

    def test_a_signal_as_soon_as_the_port_answers_is_handled(self):
        # A supervisor may signal the moment a port answers: a SIGHUP then reloads and a
        # SIGTERM drains, never the signals' default action (the end of the process).
        for i in range(20):
            port, admin = free_port(), free_port()
            sig = signal.SIGHUP if i % 2 == 0 else signal.SIGTERM
            proc = subprocess.Popen([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--admin",
                                     f"127.0.0.1:{admin}", "--threads", "1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                deadline = time.time() + 30
                while proc.poll() is None and time.time() < deadline:
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=1).close()
                        break
                    except OSError:
                        time.sleep(0.001)
                proc.send_signal(sig)
                if sig == signal.SIGTERM:
                    self.assertEqual(proc.wait(timeout=10), 0, f"start {i}")
                    continue
                time.sleep(0.1)
                self.assertIsNone(proc.poll(), f"start {i}: SIGHUP ended the process")
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/x")
                self.assertEqual(conn.getresponse().status, 200)
                conn.close()
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()

    def test_config_file_change_reloads(self):
        path = self.config_file(seed_text())
        s = self.start(path)
        time.sleep(1.1)  # a different modification time than the one loaded
        with open(path, "w") as out:
            out.write(seed_text().replace("limit: 10", "limit: 12"))
        deadline = time.time() + 30  # a change settles for a tick first (1 s ticks)
        limit = None
        while time.time() < deadline:
            _, h, _ = s.request("POST", "/api/upload", headers={"X-User-Id": "u"})
            limit = h["x-ratelimit-limit"]
            if limit == "12":
                break
            time.sleep(0.1)
        self.assertEqual(limit, "12")

    def wait_for_limit(self, s, want):
        deadline = time.time() + 30  # a change settles for a tick first (1 s ticks)
        limit = None
        while time.time() < deadline:
            _, h, _ = s.request("POST", "/api/upload", headers={"X-User-Id": "u"})
            limit = h["x-ratelimit-limit"]
            if limit == want:
                break
            time.sleep(0.1)
        self.assertEqual(limit, want)

    def test_a_config_swapped_or_edited_with_its_old_time_reloads(self):
        # As Kubernetes mounts a ConfigMap: the path is a symlink through "..data" to a
        # directory that an update replaces, here with a file whose time is the old one's.
        root = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ["rm", "-rf", root])
        v1, v2 = os.path.join(root, "v1"), os.path.join(root, "v2")
        os.mkdir(v1)
        os.mkdir(v2)
        with open(os.path.join(v1, "sluice.yaml"), "w") as out:
            out.write(seed_text())
        with open(os.path.join(v2, "sluice.yaml"), "w") as out:
            out.write(seed_text().replace("limit: 10", "limit: 12"))
        old = os.stat(os.path.join(v1, "sluice.yaml"))
        os.utime(os.path.join(v2, "sluice.yaml"), ns=(old.st_atime_ns, old.st_mtime_ns))
        os.symlink("v1", os.path.join(root, "..data"))
        path = os.path.join(root, "sluice.yaml")
        os.symlink("..data/sluice.yaml", path)
        s = self.start(path)
        self.wait_for_limit(s, "10")
        os.symlink("v2", os.path.join(root, "..data_tmp"))
        os.rename(os.path.join(root, "..data_tmp"), os.path.join(root, "..data"))
        self.wait_for_limit(s, "12")
        # An edit in place that keeps the time (cp -p, rsync -t).
        target = os.path.join(v2, "sluice.yaml")
        with open(target, "w") as out:
            out.write(seed_text().replace("limit: 10", "limit: 14"))
        os.utime(target, ns=(old.st_atime_ns, old.st_mtime_ns))
        self.wait_for_limit(s, "14")

    def test_admin_token(self):
        s = self.start(SEED, ["--admin-token", "s3cret"])
        status, h, _ = s.request("GET", "/metrics", admin=True)
        self.assertEqual((status, h.get("www-authenticate")), (401, "Bearer"))
        status, _, _ = s.request("GET", "/metrics", admin=True,
                                 headers={"Authorization": "Bearer wrong"})
        self.assertEqual(status, 401)
        for wrong in ("Bearer s3cre", "Bearer s3cretx", "Bearer s3cret x", "Bearers3cret",
                      "Bearer", "Basic s3cret", "s3cret", "Bearer \ts3cret"):
            status, _, _ = s.request("GET", "/metrics", admin=True,
                                     headers={"Authorization": wrong})
            self.assertEqual(status, 401, wrong)
        # The scheme in any case, then one or more spaces (RFC 9110's 1*SP).
        for right in ("Bearer s3cret", "bearer s3cret", "BEARER s3cret", "Bearer   s3cret"):
            status, _, _ = s.request("GET", "/metrics", admin=True,
                                     headers={"Authorization": right})
            self.assertEqual(status, 200, right)

    def test_in_flight_request_finishes_on_sigterm(self):
        s = self.start(SEED)
        conn = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(conn.close)
        conn.settimeout(10)
        # Expect: 100-continue, so that the server's interim answer shows it has read the head.
        conn.sendall(b"POST /v1/check HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = b""
        while b"\r\n\r\n" not in interim:
            piece = conn.recv(4096)
            self.assertTrue(piece, interim)
            interim += piece
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        s.proc.send_signal(signal.SIGTERM)  # mid-request: the body is not all there yet
        # The body goes once the server is shutting down: it has closed its listeners.
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
            except ConnectionRefusedError:
                break
            except OSError:  # reset or slow while the listeners close: try again
                pass
            self.assertLess(time.monotonic(), deadline, "the server did not start shutting down")
            time.sleep(0.02)
        conn.sendall(b'{"path":"/api/login","method":"POST"}   ')
        reply = b""
        while b"\r\n\r\n" not in reply:
            chunk = conn.recv(4096)
            if not chunk:
                break
            reply += chunk
        self.assertTrue(reply.startswith(b"HTTP/1.1 200"), reply[:80])
        self.assertIn(b"Connection: close", reply)
        self.assertEqual(s.proc.wait(timeout=10), 0)

    def test_a_stop_waits_no_longer_than_the_connections_own_deadlines(self):
        s = self.start(SEED, ["--read-timeout-ms", "1000"])
        stalled = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(stalled.close)
        stalled.sendall(b"POST /v1/check HTTP/1.1\r\nHost: a\r\nContent-Length: 40\r\n\r\n{")
        time.sleep(0.2)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)  # a request that will never be whole is open
        self.assertEqual(s.proc.wait(timeout=10), 0)
        self.assertLess(time.monotonic() - t0, 4)  # its read deadline, not the 10 s drain

    def test_a_port_another_socket_listens_on_is_refused(self):
        # Every worker listens with SO_REUSEPORT; without a check, a second process (or the
        # admin listener on the same port) would share the port and take part of its
        # connections without a word.
        s = self.start(SEED)
        for args in (["--listen", f"127.0.0.1:{s.port}", "--admin", f"127.0.0.1:{free_port()}"],
                     ["--listen", f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{s.port}"]):
            out = subprocess.run([BIN, "serve", *args], capture_output=True, text=True, timeout=10)
            self.assertEqual(out.returncode, 1, out.stderr)
            self.assertIn(f"cannot listen on 127.0.0.1:{s.port}: Address already in use", out.stderr)
        port = free_port()
        out = subprocess.run([BIN, "serve", "--listen", f"127.0.0.1:{port}", "--admin",
                              f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=10)
        self.assertIn(f"cannot listen on 127.0.0.1:{port}: Address already in use", out.stderr)
        self.assertEqual(s.request("GET", "/x")[0], 200)  # the first one serves on

    def test_sigterm_exits_cleanly(self):
        s = self.start(SEED)
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        conn.request("GET", "/x")  # an idle keep-alive connection must not hold shutdown up
        conn.getresponse().read()
        t0 = time.time()
        self.assertEqual(s.stop(), 0)
        self.assertLess(time.time() - t0, 5)
        conn.close()

    def test_embedded_default(self):
        s = self.start()
        _, h, _ = s.request("GET", "/")
        self.assertEqual(h["x-ratelimit-limit"], "60")
        self.assertEqual(s.stop(), 0)
        out = s.stdout
        self.assertIn(f"listening on 127.0.0.1:{s.port} (admin 127.0.0.1:{s.admin_port})", out)
        self.assertIn("rule default: any method /*, key ip, sliding_window_counter 60/1m", out)

    def test_ipv6_addresses_are_written_in_brackets(self):
        # "::1:8080" could be read as an address; the start-up line and the errors write
        # "[::1]:8080", as --listen takes it.
        try:
            taken = socket.socket(socket.AF_INET6)
            taken.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback here")
        taken.listen()
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        out = subprocess.run([BIN, "serve", "--listen", f"[::1]:{port}", "--admin", "[::1]:0"],
                             capture_output=True, text=True, timeout=10)
        self.assertEqual(out.returncode, 1, out.stderr)
        self.assertIn(f"cannot listen on [::1]:{port}: Address already in use", out.stderr)

        proc = subprocess.Popen([BIN, "serve", "--listen", "[::1]:0", "--admin", "[::1]:0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=10)
        m = re.search(r"listening on \[::1\]:(\d+) \(admin \[::1\]:(\d+)\)", line)
        self.assertIsNotNone(m, line)
        self.assertNotEqual(m.group(1), "0")
        self.assertNotEqual(m.group(2), "0")

    def test_the_config_files_server_section_sets_what_no_flag_does(self):
        # `sluice serve --config FILE` alone: listeners, threads and log format come from
        # the file. A reload that changes the section applies the file's rules and keeps the
        # running listeners, and says so.
        path = self.config_file(seed_text() + "server:\n  listen: 127.0.0.1:0\n"
                                "  admin: 127.0.0.1:0\n  threads: 1\n  log_format: json\n")
        proc = subprocess.Popen([BIN, "serve", "--config", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
            m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(admin 127\.0\.0\.1:(\d+)\), "
                          r"1 thread,", line)
            self.assertIsNotNone(m, line)
            port, admin = int(m.group(1)), int(m.group(2))
            self.assertEqual(http_get(port, "/api/search")[0], 200)
            with open(path + ".new", "w") as f:  # replaced whole: the file watch reloads too
                f.write(seed_text().replace("limit: 5", "limit: 7") +
                        "server:\n  listen: 127.0.0.1:1\n  log_format: json\n")
            os.replace(path + ".new", path)
            conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
            conn.request("POST", "/v1/reload")
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/v1/check", json.dumps({"path": "/api/login", "method": "POST"}))
            self.assertEqual(json.loads(conn.getresponse().read())["limit"], 7)
            conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0, err)
        entries = [json.loads(line) for line in err.splitlines()]  # every line one object
        for e in entries:
            self.assertEqual(sorted(e), ["level", "message", "time"], e)
            self.assertRegex(e["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        self.assertIn({"level": "warn", "message": "the server section changed; the new rules "
                       "apply, the server settings need a restart"},
                      [{"level": e["level"], "message": e["message"]} for e in entries])
        self.assertEqual(entries[-1]["message"], "stopped")

    def test_a_flag_given_wins_over_the_config_files_server_section(self):
        path = self.config_file(seed_text() + "server:\n  listen: 127.0.0.1:1\n"
                                "  admin: 127.0.0.1:2\n  log_format: json\n  threads: 3\n")
        proc = subprocess.Popen([BIN, "serve", "--config", path, "--listen", "127.0.0.1:0",
                                 "--admin", "127.0.0.1:0", "--log-format", "text"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=10)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+) \(admin 127\.0\.0\.1:(\d+)\), "
                      r"3 threads,", line)
        self.assertIsNotNone(m, line)
        self.assertNotIn(m.group(1), ("0", "1"))
        self.assertNotIn(m.group(2), ("0", "2"))
        self.assertRegex(err.splitlines()[-1], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO stopped$")

    def test_an_error_that_stops_the_start_is_a_json_line_in_json_mode(self):
        # A log pipeline that parses every line keeps the one that says why Sluice did not
        # start: a config that does not load (the flag's format: the file's is not read),
        # and an error found after the file's server section set JSON.
        bad = self.config_file("rate_limits:\n  endpoints:\n    - path: /api/login\n"
                               "      limit: five\n      window: 1m\n")
        good = self.config_file(seed_text() + "server:\n  log_format: json\n")
        runs = [(["--config", bad, "--log-format", "json"], 2),
                (["--config", good, "--listen", "127.0.0.1:not-a-port"], 2)]
        errors = []
        for args, code in runs:
            out = subprocess.run([BIN, "serve", *args], capture_output=True, text=True,
                                 timeout=20)
            self.assertEqual(out.returncode, code, out)
            lines = out.stderr.splitlines()
            self.assertEqual(len(lines), 1, out.stderr)
            entry = json.loads(lines[0])
            self.assertEqual(sorted(entry), ["level", "message", "time"], entry)
            self.assertEqual(entry["level"], "error")
            errors.append(entry["message"])
        message = (f"{bad}:4:14: rate_limits.endpoints[0].limit: expected a whole number, "
                   "got 'five'")
        self.assertEqual(errors[0], message)
        self.assertEqual(errors[1], "sluice serve: bad --listen '127.0.0.1:not-a-port' "
                                    "(IP:PORT; IPv6 as [::1]:PORT)")
        # In text, as a person at a terminal reads it: the bare message.
        out = subprocess.run([BIN, "serve", "--config", bad], capture_output=True, text=True,
                             timeout=20)
        self.assertEqual(out.returncode, 2, out)
        self.assertEqual(out.stderr, message + "\n")

    def test_admin_token_from_the_config_file_guards_a_public_admin_listener(self):
        # An empty SLUICE_ADMIN_TOKEN (a template left blank) is no token: the file's holds.
        env = dict(os.environ, SLUICE_ADMIN_TOKEN="")
        path = self.config_file(seed_text() + "server:\n  listen: 127.0.0.1:0\n"
                                "  admin: 0.0.0.0:0\n  admin_token: s3cret\n")
        proc = subprocess.Popen([BIN, "serve", "--config", path], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            line = proc.stdout.readline()
            m = re.search(r"\(admin 0\.0\.0\.0:(\d+)\)", line)
            self.assertIsNotNone(m, line)
            admin = int(m.group(1))
            self.assertEqual(http_get(admin, "/metrics")[0], 401)
            conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=5)
            conn.request("GET", "/metrics", headers={"Authorization": "Bearer s3cret"})
            self.assertEqual(conn.getresponse().status, 200)
            conn.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=10)

    def test_admin_refuses_public_bind_without_token(self):
        r = subprocess.run([BIN, "serve", "--admin", "0.0.0.0:0", "--listen", "127.0.0.1:0"],
                           capture_output=True, text=True, timeout=10,
                           env={k: v for k, v in os.environ.items() if k != "SLUICE_ADMIN_TOKEN"})
        self.assertEqual(r.returncode, 2)
        self.assertIn("needs a token", r.stderr)


if __name__ == "__main__":
    BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=1)
