#!/usr/bin/env python3
"""Integration tests of Sluice's Envoy rate limit service (RLS v3): the real sluice binary
serving envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit over gRPC, driven by a
real gRPC client (grpcio), all on 127.0.0.1.

Usage: rls_test.py path/to/sluice path/to/rls.protoset [unittest args]   (about 5 s; needs
redis-server).

The messages are built from the descriptor set (rls.protoset), without generated code.
grpcio and protobuf are Debian's (python3-grpcio, python3-protobuf) for /usr/bin/python3: when
the python3 running this has no grpc module, the test runs itself again with /usr/bin/python3.

What is covered:
- every request field: domain, descriptors and their entries, descriptor.limit (the
  per-descriptor override, with each unit), hits_addend on the request and on a descriptor
  (the descriptor's wins; the request's 0 means 1; a descriptor's 0 peeks: nothing spent);
- every response field: overall_code, statuses[i].code / current_limit {requests_per_unit,
  unit, name} / limit_remaining / duration_until_reset, response_headers_to_add
  (RateLimit-Limit/-Remaining/-Reset of the tightest descriptor with --rls-headers, none
  without);
- the config: exact values, wildcards, key-only descriptors counting each value apart, nested
  descriptors, unlimited, shadow_mode (OK but counted), replaces, several domains from several
  files, Sluice's `algorithm:` (token_bucket, gcra) and `rate_limits:` (two limits on one
  descriptor, all-or-nothing);
- envoyproxy/ratelimit's README examples 1-9 (tests/config/envoy/examples) as Envoy would
  query them;
- errors: empty domain, no descriptors: INVALID_ARGUMENT with the message; unknown domain: OK;
- SIGHUP reloads the envoy config directory, and so does a change to its files (a ConfigMap's
  symlink swap included); a broken one keeps the running config;
- the JSON form over HTTP (POST /v1/envoy/ratelimit) answers as gRPC does, sharing counters;
- concurrent callers of one descriptor: exactly the limit is admitted;
- Redis: two Sluice processes share exact counts over gRPC, keys are in Redis with an expiry;
- store mode local_sync: two processes deciding locally count each other's hits once synced
  (config limits and overrides); a limit the mode cannot decide is refused at load;
- SIGTERM with calls in flight: a prompt, clean exit;
- gRPC over TLS and mutual TLS: cleartext clients, clients trusting another CA, and (mutual)
  clients without a certificate or with one from another CA are refused;
- grpc.health.v1.Health/Check (SERVING, NOT_FOUND for another service) and Watch (SERVING,
  or SERVICE_UNKNOWN, held until shutdown, then NOT_SERVING and OK); /metrics counting
  gRPC calls by method and code, HTTP/2 protocol errors and open connections;
- gRPC over HTTP/2 as any client may send it: an unknown method (UNIMPLEMENTED), a malformed
  or compressed message (INVALID_ARGUMENT, UNIMPLEMENTED), strings that are not UTF-8
  (INVALID_ARGUMENT; protobuf's complaint logged once a second, not per call), a message
  over 1 MiB (RESOURCE_EXHAUSTED), 600 calls in flight on one connection (exactly the limit
  admitted), cancelled calls, bytes that are not HTTP/2 (the connection closed, others
  served), a connection that never sends an HTTP/2 frame (closed after 10 s), HTTP/2
  requests that are not gRPC (415, 405), and --max-connections-per-ip on the gRPC port (the
  connection over it closed, the slot back once one closes).

Fixed windows are aligned to the epoch: a test that counts waits, when needed, until enough
of the current window is left (fresh_window), so that no window restarts while it counts.
Every process is started here and stopped by its PID (redis-server by redis_fixture).
"""
import os
import sys

# grpcio's fork handlers wait for its threads to pause, and a caller thread still in a call
# made a fork (subprocess.Popen, starting the next server) hang: no process forked here uses
# gRPC, so they are off.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

try:
    import grpc
except ImportError:
    if sys.executable != "/usr/bin/python3" and os.path.exists("/usr/bin/python3"):
        os.execv("/usr/bin/python3",
                 ["/usr/bin/python3", os.path.abspath(__file__), *sys.argv[1:]])
    raise

import http.client  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import unittest  # noqa: E402
import urllib.parse  # noqa: E402
import uuid  # noqa: E402

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory  # noqa

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLES = os.path.join(ROOT, "tests", "config", "envoy", "examples")
sys.path.insert(0, HERE)

from redis_fixture import (RedisServer, RespClient, free_port, freed_memory_returned,  # noqa
                           port_taken, read_log, spawn)
from redis_tls_test import make_cert, make_pki  # noqa: E402

BIN = None
METHOD = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
Req = Resp = Descriptor = None  # message classes, from the protoset (load_protos)

# RateLimitResponse.Code and RateLimit.Unit (and envoy.type.v3.RateLimitUnit).
UNKNOWN, OK, OVER_LIMIT = 0, 1, 2
SECOND, MINUTE, HOUR, DAY, MONTH, YEAR, WEEK = 1, 2, 3, 4, 5, 6, 7
UNIT_SECONDS = {SECOND: 1, MINUTE: 60, HOUR: 3600, DAY: 86400, MONTH: 30 * 86400,
                YEAR: 365 * 86400, WEEK: 7 * 86400}
U32_MAX = 2**32 - 1

def load_protos(path):
    global Req, Resp, Descriptor
    fds = descriptor_pb2.FileDescriptorSet()
    with open(path, "rb") as f:
        fds.ParseFromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        pool.Add(fd)
    factory = message_factory.MessageFactory(pool)

    def cls(name):
        return factory.GetPrototype(pool.FindMessageTypeByName(name))
    Req = cls("envoy.service.ratelimit.v3.RateLimitRequest")
    Resp = cls("envoy.service.ratelimit.v3.RateLimitResponse")
    Descriptor = cls("envoy.extensions.common.ratelimit.v3.RateLimitDescriptor")


def D(*entries, limit=None, hits=None):
    """A request descriptor: D("a=1", "b=2", limit=(5, DAY), hits=3). An entry is KEY=VALUE,
    split at the first '='."""
    d = Descriptor()
    for e in entries:
        k, v = e.split("=", 1)
        entry = d.entries.add()
        entry.key, entry.value = k, v
    if limit is not None:
        d.limit.SetInParent()
        d.limit.requests_per_unit, d.limit.unit = limit
    if hits is not None:
        d.hits_addend.SetInParent()  # present even when 0
        d.hits_addend.value = hits
    return d


def R(domain, *descriptors, hits=0):
    r = Req(domain=domain, hits_addend=hits)
    for d in descriptors:
        r.descriptors.append(d)
    return r


def window_left(period):
    """Seconds left in the current epoch-aligned window of `period` seconds."""
    return period - time.time() % period


def fresh_window(period, need):
    """Waits, if needed, until at least `need` seconds are left in the current window."""
    left = window_left(period)
    if left < need:
        time.sleep(left + 0.02)


def in_one_window(period, need, body, tries=5):
    """Runs body() once at least `need` seconds are left in the current window of `period`
    seconds (fresh_window). On a short window a loaded machine may still pass its end
    mid-test, and the counts restart: when body() fails and its calls did not all fall in
    one window, it runs again from a later window (whose counts nothing spent yet), up to
    `tries` times. A failure within one window is reported as it is."""
    for attempt in range(tries):
        fresh_window(period, need)
        first = time.time() // period
        try:
            return body()
        except AssertionError:
            if time.time() // period == first or attempt == tries - 1:
                raise
        time.sleep(window_left(period) + 0.02)  # past the window the last calls fell in


def seconds(duration):
    return duration.seconds + duration.nanos / 1e9


def wait_for(cond, timeout, what, interval=0.03, log=None):
    """Until cond() is true; on timeout fails with `what` and the end of log(), if given."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s" +
                                 (f"; the log ends:\n{log()[-3000:]}" if log else ""))
        time.sleep(interval)


def h2_frame(type_, flags, stream, payload):
    return len(payload).to_bytes(3, "big") + bytes([type_, flags]) + stream.to_bytes(4, "big") \
        + payload


def h2_frames(sock):
    """The HTTP/2 frames a socket receives, as (type, flags, stream, payload), until it
    closes."""
    buf = b""
    while True:
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            n = int.from_bytes(buf[:3], "big")
            yield buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + n]
            buf = buf[9 + n:]
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk


def write(dir_, name, text):
    with open(os.path.join(dir_, name), "w") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# The config most tests use: every feature, in two domains from two files.

FEATURES = {
    "a_feat.yaml": """
domain: feat
descriptors:
  - key: db
    value: users
    rate_limit: {unit: hour, requests_per_unit: 3, name: db_users}
  - key: path
    value: /api/*
    rate_limit: {unit: hour, requests_per_unit: 2}
  - key: files
    value: files/*
    share_threshold: true
    rate_limit: {unit: hour, requests_per_unit: 2}
  - key: user
    rate_limit: {unit: day, requests_per_unit: 2}
  - key: tenant
    value: acme
    descriptors:
      - key: user
        rate_limit: {unit: day, requests_per_unit: 3}
        descriptors:
          - key: op
            value: write
            rate_limit: {unit: day, requests_per_unit: 1}
  - key: internal
    rate_limit: {unlimited: true}
  - key: allow
  - key: shadow
    shadow_mode: true
    rate_limit: {unit: day, requests_per_unit: 1}
  - key: general
    rate_limit: {unit: day, requests_per_unit: 2, name: general}
  - key: vip
    rate_limit:
      unit: day
      requests_per_unit: 5
      replaces: [{name: general}]
  - key: tb
    rate_limit: {unit: day, requests_per_unit: 24, algorithm: token_bucket, burst: 5}
  - key: gcra
    rate_limit: {unit: day, requests_per_unit: 24, algorithm: gcra, burst: 3}
  - key: plan
    value: free
    descriptors:
      - key: account
        rate_limits:
          - {unit: second, requests_per_unit: 4, algorithm: token_bucket, burst: 2,
             name: free_burst}
          - {unit: day, requests_per_unit: 4, name: free_daily}
  - key: counter
    rate_limit: {unit: day, requests_per_unit: 10}
  - key: conc
    rate_limit: {unit: day, requests_per_unit: 100}
  - key: json
    rate_limit: {unit: day, requests_per_unit: 4}
  - key: dm
    detailed_metric: true
    rate_limit: {unit: day, requests_per_unit: 5}
  - key: vm
    value: vm-*
    value_to_metric: true
    rate_limit: {unit: day, requests_per_unit: 5}
""",
    "b_other.yml": """
domain: other
descriptors:
  - key: db
    value: users
    rate_limit: {unit: day, requests_per_unit: 1}
""",
    ".hidden.yaml": "domain: hidden\ndescriptors:\n  - key: k\n"
                    "    rate_limit: {unit: day, requests_per_unit: 1}\n",
    # Any name, as envoyproxy/ratelimit reads every file of its runtime directory.
    "c_notes.conf": "domain: conf\ndescriptors:\n  - key: k\n"
                    "    rate_limit: {unit: day, requests_per_unit: 7}\n",
}


def features_dir():
    d = tempfile.mkdtemp(prefix="sluice-rls-features-")
    for name, text in FEATURES.items():
        write(d, name, text)
    return d


# ---------------------------------------------------------------------------------------------
# One `sluice serve --envoy-config DIR --grpc ...` on free loopback ports.


class Sluice:
    def __init__(self, envoy_dir, extra=(), config=None, threads=2, headers_expected=False,
                 credentials=None, server_settings=None):
        """server_settings: a dict of the config file's server: section; then the Envoy
        directory and the gRPC address are given there too (in a file written for the
        run, with no rules of its own), not by flags."""
        self.envoy_dir = envoy_dir
        self.server_settings = server_settings
        self.headers_expected = headers_expected
        self.channel = None
        # The ports are free when picked, but another process may take one before sluice
        # binds it: then sluice is started again on new ports.
        for attempt in range(5):
            if self._start(extra, config, threads, credentials, last=attempt == 4):
                break
        self.rpc = self.channel.unary_unary(METHOD,
                                            request_serializer=lambda m: m.SerializeToString(),
                                            response_deserializer=Resp.FromString)

    def _start(self, extra, config, threads, credentials, last):
        self.port, self.admin_port, self.grpc_port = free_port(), free_port(), free_port()
        args = [BIN, "serve", "--listen", f"127.0.0.1:{self.port}",
                "--admin", f"127.0.0.1:{self.admin_port}", "--threads", str(threads)]
        if self.server_settings is None:
            args += ["--envoy-config", self.envoy_dir, "--grpc", f"127.0.0.1:{self.grpc_port}"]
        else:
            settings = {"envoy_config": self.envoy_dir, "grpc": f"127.0.0.1:{self.grpc_port}",
                        **self.server_settings}
            fd, config = tempfile.mkstemp(suffix=".yaml", prefix="sluice-rls-server-")
            with os.fdopen(fd, "w") as f:
                f.write("server:\n" + "".join(f"  {k}: {json.dumps(v)}\n"
                                              for k, v in settings.items()))
            self._config_file = config
        args += list(extra)
        if config:
            args += ["--config", config]
        self.logfile = tempfile.TemporaryFile()
        self.proc = spawn(args, stdin=subprocess.DEVNULL, stdout=self.logfile,
                          stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 15
            for port in (self.grpc_port, self.port, self.admin_port):
                while True:
                    try:
                        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                            break
                    except OSError:
                        if self.proc.poll() is not None:
                            if not last and port_taken(self.log()):
                                self.logfile.close()
                                return False
                            raise RuntimeError("sluice exited: " + self.log())
                        if time.monotonic() > deadline:
                            raise RuntimeError("sluice did not start: " + self.log())
                        time.sleep(0.02)
            # The banner comes after the signal handlers are in place (SIGHUP reloads).
            while "envoy rate limit service (RLS v3)" not in self.log():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("sluice did not start: " + self.log())
                time.sleep(0.02)
            if credentials is None:
                self.channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}")
            else:  # the server's certificate names localhost and 127.0.0.1
                self.channel = grpc.secure_channel(f"localhost:{self.grpc_port}", credentials)
            grpc.channel_ready_future(self.channel).result(timeout=10)
        except BaseException:
            self.stop()
            raise
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

    def call(self, req, check_headers=True):
        """ShouldRateLimit over gRPC; the response."""
        resp = self.rpc(req, timeout=5)
        if check_headers and not self.headers_expected:
            assert len(resp.response_headers_to_add) == 0, resp  # only with --rls-headers
        return resp

    def call_error(self, req):
        """ShouldRateLimit that must fail: the grpc.RpcError."""
        try:
            resp = self.rpc(req, timeout=5)
        except grpc.RpcError as e:
            return e
        raise AssertionError(f"expected an error, got {resp}")

    def http(self, method, path, body=None, headers=None, admin=False):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port if admin else self.port,
                                          timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def call_json(self, req):
        """The same request as JSON over HTTP (POST /v1/envoy/ratelimit); the response parsed
        back into a RateLimitResponse (unknown fields refused)."""
        status, headers, body = self.http(
            "POST", "/v1/envoy/ratelimit", json_format.MessageToJson(req),
            {"Content-Type": "application/json"})
        assert status == 200, (status, body)
        assert headers["content-type"] == "application/json", headers
        return json_format.Parse(body, Resp())

    def metric(self, name):
        """The sum of the samples of `name` (every label set), or of the one sample `name`
        when it has labels."""
        _, _, body = self.http("GET", "/metrics", admin=True)
        total = 0.0
        for line in body.decode().splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == name or (sample.startswith(name + "{") and "{" not in name):
                total += float(value)
        return total

    def stop(self):
        """Closes the channel, SIGTERM by PID, waits (SIGKILL after 10 s); the exit status."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.logfile.closed:
            self._log = self.log()
            self.logfile.close()
        if getattr(self, "_config_file", None):
            os.unlink(self._config_file)
            self._config_file = None
        return self.proc.returncode


class RlsCase(unittest.TestCase):
    def new_dir(self, files=None):
        d = tempfile.mkdtemp(prefix="sluice-rls-")
        self.addCleanup(shutil.rmtree, d, True)
        for name, text in (files or {}).items():
            write(d, name, text)
        return d

    def start(self, envoy_dir, **kw):
        s = Sluice(envoy_dir, **kw)
        self.addCleanup(s.stop)
        return s

    def assertStatus(self, st, code, rpu=None, unit=None, name="", remaining=None, reset=None,
                     delta=1.5):
        """One DescriptorStatus. rpu None: no current_limit (no limit applied). reset: the
        time left in the window as the test measured it, within delta of the service's own
        measure, which it answers rounded up to whole seconds; None: not checked."""
        self.assertEqual(st.code, code, st)
        if rpu is None:
            self.assertFalse(st.HasField("current_limit"), st)
        else:
            self.assertTrue(st.HasField("current_limit"), st)
            self.assertEqual((st.current_limit.requests_per_unit, st.current_limit.unit,
                              st.current_limit.name), (rpu, unit, name), st)
        if remaining is not None:
            self.assertEqual(st.limit_remaining, remaining, st)
        if reset is not None:
            got = seconds(st.duration_until_reset)
            self.assertGreaterEqual(got, math.ceil(reset - delta), st)
            self.assertLessEqual(got, math.ceil(reset + delta), st)
        # Whole seconds, as envoyproxy/ratelimit answers: Envoy's X-RateLimit-Reset reads
        # only the seconds field.
        self.assertEqual(st.duration_until_reset.nanos, 0, st)

    def assertResetBetween(self, st, period, before, after):
        """duration_until_reset is the time left in the window of `period` seconds at some
        moment between two measures of the test's (`before` and `after` the call), rounded up
        to whole seconds: exact, however long the call took. (1 ms of slack for the clocks'
        rounding.)"""
        got = seconds(st.duration_until_reset)
        ranges = [(math.ceil(after - 0.001), math.ceil(before + 0.001))]
        if after > before:  # a window ended between the two: either window's measure
            ranges = [(1, math.ceil(before + 0.001)), (math.ceil(after - 0.001), period)]
        self.assertTrue(any(lo <= got <= hi for lo, hi in ranges),
                        f"reset {got} s, not within {ranges}: {st}")

    def assertNoLimit(self, st):
        """A descriptor no limit applies to: OK, nothing else."""
        self.assertEqual(st.code, OK, st)
        self.assertFalse(st.HasField("current_limit"), st)
        self.assertEqual(st.limit_remaining, 0, st)
        self.assertFalse(st.HasField("duration_until_reset"), st)

    def uniq(self):
        return uuid.uuid4().hex[:10]


class SharedServerCase(RlsCase):
    """One server (memory store, the features config) for all the tests of a class; it must
    exit cleanly at the end."""
    @classmethod
    def setUpClass(cls):
        cls.dir = features_dir()
        cls.s = Sluice(cls.dir)

    @classmethod
    def tearDownClass(cls):
        rc = cls.s.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)
        if rc != 0:
            raise AssertionError(f"sluice exited with {rc}: {cls.s.log()[-2000:]}")


# ---------------------------------------------------------------------------------------------
# Requests, responses and the config, against one server (memory store).


class FeaturesTest(SharedServerCase):
    def test_exact_value_counts_then_answers_over_limit(self):
        s = self.s
        fresh_window(3600, 5)
        for i in range(3):
            expect = window_left(3600)
            r = s.call(R("feat", D("db=users")))
            self.assertEqual(r.overall_code, OK)
            self.assertEqual(len(r.statuses), 1)
            self.assertStatus(r.statuses[0], OK, 3, HOUR, "db_users", 2 - i, expect)
        expect = window_left(3600)
        r = s.call(R("feat", D("db=users")))
        self.assertEqual(r.overall_code, OVER_LIMIT)
        self.assertStatus(r.statuses[0], OVER_LIMIT, 3, HOUR, "db_users", 0, expect)
        # Another value of the key has no descriptor: no limit.
        r = s.call(R("feat", D("db=orders")))
        self.assertEqual(r.overall_code, OK)
        self.assertNoLimit(r.statuses[0])
        # Nothing else of the response is set.
        for field in ("response_headers_to_add", "request_headers_to_add"):
            self.assertEqual(len(getattr(r, field)), 0)
        self.assertEqual(r.raw_body, b"")
        self.assertFalse(r.HasField("quota"))

    def test_wildcard_counts_each_value_apart_unless_share_threshold(self):
        s, u = self.s, self.uniq()
        fresh_window(3600, 5)
        for i in range(2):
            r = s.call(R("feat", D(f"path=/api/{u}/a")))
            self.assertStatus(r.statuses[0], OK, 2, HOUR, "", 1 - i)
        self.assertEqual(s.call(R("feat", D(f"path=/api/{u}/a"))).overall_code, OVER_LIMIT)
        r = s.call(R("feat", D(f"path=/api/{u}/b")))  # another value: its own counter
        self.assertStatus(r.statuses[0], OK, 2, HOUR, "", 1)
        self.assertNoLimit(s.call(R("feat", D(f"path=/web/{u}"))).statuses[0])
        self.assertNoLimit(s.call(R("feat", D("path=/ap"))).statuses[0])
        # share_threshold: every value the wildcard matches shares one counter.
        r = s.call(R("feat", D(f"files=files/{u}.pdf")))
        self.assertStatus(r.statuses[0], OK, 2, HOUR, "", 1)
        r = s.call(R("feat", D(f"files=files/{u}.csv")))
        self.assertStatus(r.statuses[0], OK, 2, HOUR, "", 0)
        r = s.call(R("feat", D(f"files=files/{u}.txt")))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 2, HOUR, "", 0)

    def test_key_only_descriptor_counts_each_value_apart(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)
        for value, remaining in ((f"{u}-1", 1), (f"{u}-1", 0), (f"{u}-2", 1), (f"{u}-3", 1)):
            r = s.call(R("feat", D(f"user={value}")))
            self.assertStatus(r.statuses[0], OK, 2, DAY, "", remaining, window_left(86400))
        r = s.call(R("feat", D(f"user={u}-1")))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 2, DAY, "", 0)
        # The empty value is a value of its own.
        self.assertStatus(s.call(R("feat", D("user="))).statuses[0], OK, 2, DAY, "")

    def test_nested_descriptors(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)
        r = s.call(R("feat", D("tenant=acme", f"user={u}")))
        self.assertStatus(r.statuses[0], OK, 3, DAY, "", 2)
        r = s.call(R("feat", D("tenant=acme", f"user={u}", "op=write")))
        self.assertStatus(r.statuses[0], OK, 1, DAY, "", 0)
        r = s.call(R("feat", D("tenant=acme", f"user={u}", "op=write")))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 1, DAY, "", 0)
        # The deeper level has its own counter: user's is still at 2.
        r = s.call(R("feat", D("tenant=acme", f"user={u}")))
        self.assertStatus(r.statuses[0], OK, 3, DAY, "", 1)
        # What does not match level by level gets no limit: a level without a limit of its
        # own, a value not in the tree, entries in another order, entries left over, and the
        # limits on the way down do not apply.
        for d in (D("tenant=acme"), D("tenant=other", f"user={u}"),
                  D(f"user={u}", "tenant=acme"),
                  D("tenant=acme", f"user={u}", "op=read"),
                  D("tenant=acme", f"user={u}", "op=write", "x=y"),
                  D("allow=anything"), D()):
            r = s.call(R("feat", d))
            self.assertEqual(r.overall_code, OK)
            self.assertNoLimit(r.statuses[0])

    def test_unlimited(self):
        s = self.s
        for _ in range(3):
            r = s.call(R("feat", D("internal=ldap")))
            self.assertEqual(r.overall_code, OK)
            st = r.statuses[0]
            self.assertEqual(st.code, OK)
            self.assertEqual(st.limit_remaining, U32_MAX)
            self.assertFalse(st.HasField("current_limit"), st)
            self.assertFalse(st.HasField("duration_until_reset"), st)

    def test_detailed_metric_and_value_to_metric_name_the_requests_values(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)

        def series(rule, outcome):
            return f'sluice_decisions_total{{rule="envoy:{rule}",outcome="{outcome}"}}'

        rolled_up = [s.metric(series(r, "allowed")) for r in ("feat.dm", "feat.vm_vm-*")]
        for _ in range(2):
            s.call(R("feat", D(f"dm={u}"), D(f"vm=vm-{u}")))
        s.call(R("feat", D(f"dm={u}-b"), hits=6))
        self.assertEqual(s.metric(series(f"feat.dm_{u}", "allowed")), 2)
        self.assertEqual(s.metric(series(f"feat.vm_vm-{u}", "allowed")), 2)
        self.assertEqual(s.metric(series(f"feat.dm_{u}-b", "limited")), 1)
        # Not counted under the descriptor's own name as well.
        self.assertEqual([s.metric(series(r, "allowed")) for r in ("feat.dm", "feat.vm_vm-*")],
                         rolled_up)

    def test_shadow_mode_answers_ok_but_counts(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)
        # Counted per limit, by its id: domain, then each descriptor's key (and value).
        shadowed = 'sluice_decisions_total{rule="envoy:feat.shadow",outcome="shadow_limited"}'
        allowed = 'sluice_decisions_total{rule="envoy:feat.shadow",outcome="allowed"}'
        before, before_allowed = s.metric(shadowed), s.metric(allowed)
        r = s.call(R("feat", D(f"shadow={u}")))
        self.assertStatus(r.statuses[0], OK, 1, DAY, "", 0, window_left(86400))
        for _ in range(2):  # over the limit: still OK, but counted as over
            r = s.call(R("feat", D(f"shadow={u}")))
            self.assertEqual(r.overall_code, OK)
            self.assertStatus(r.statuses[0], OK, 1, DAY, "", 0, window_left(86400))
        self.assertEqual(s.metric(shadowed), before + 2)
        self.assertEqual(s.metric(allowed), before_allowed + 1)
        # Beside a descriptor really over its limit, the overall code is that one's.
        s.call(R("feat", D(f"user={u}", hits=2)))
        r = s.call(R("feat", D(f"shadow={u}"), D(f"user={u}")))
        self.assertEqual(r.overall_code, OVER_LIMIT)
        self.assertEqual([st.code for st in r.statuses], [OK, OVER_LIMIT])

    def test_replaces_drops_the_named_limit_of_the_request(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)
        r = s.call(R("feat", D(f"general={u}")))
        self.assertStatus(r.statuses[0], OK, 2, DAY, "general", 1)
        # With vip in the same request, general is neither checked nor counted.
        for i in range(3):
            r = s.call(R("feat", D(f"general={u}"), D(f"vip={u}")))
            self.assertEqual(r.overall_code, OK)
            self.assertNoLimit(r.statuses[0])
            self.assertStatus(r.statuses[1], OK, 5, DAY, "", 4 - i)
        r = s.call(R("feat", D(f"general={u}")))
        self.assertStatus(r.statuses[0], OK, 2, DAY, "general", 0)
        r = s.call(R("feat", D(f"general={u}")))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 2, DAY, "general", 0)
        # Replaced, an exhausted limit no longer stops the request.
        r = s.call(R("feat", D(f"vip={u}"), D(f"general={u}")))
        self.assertEqual(r.overall_code, OK)
        self.assertStatus(r.statuses[0], OK, 5, DAY, "", 1)
        self.assertNoLimit(r.statuses[1])

    def test_several_domains_from_several_files(self):
        s = self.s
        fresh_window(86400, 5)
        r = s.call(R("other", D("db=users")))  # b_other.yml: its own limit and counter
        self.assertStatus(r.statuses[0], OK, 1, DAY, "", 0)
        r = s.call(R("other", D("db=users")))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 1, DAY, "", 0)
        r = s.call(R("feat", D("db=users")))  # a_feat.yaml
        self.assertEqual(r.statuses[0].current_limit.unit, HOUR)
        self.assertEqual(r.statuses[0].current_limit.name, "db_users")
        r = s.call(R("conf", D("k=v")))  # c_notes.conf: not *.yaml, loaded all the same
        self.assertStatus(r.statuses[0], OK, 7, DAY, "", None)
        # Hidden files are not loaded: an unknown domain.
        r = s.call(R("hidden", D("k=v"), D("k=v")))
        self.assertEqual(r.overall_code, OK)
        self.assertNoLimit(r.statuses[0])

    def test_unknown_domain_is_ok_for_every_descriptor(self):
        r = self.s.call(R("no_such_domain", D("db=users"), D("a=1", "b=2"), D()))
        self.assertEqual(r.overall_code, OK)
        self.assertEqual(len(r.statuses), 3)
        for st in r.statuses:
            self.assertNoLimit(st)

    def test_token_bucket(self):
        s, u = self.s, self.uniq()
        for i in range(5):  # the burst at once; then one token an hour
            r = s.call(R("feat", D(f"tb={u}")))
            self.assertStatus(r.statuses[0], OK, 24, DAY, "", 4 - i, 3600 * (i + 1))
        r = s.call(R("feat", D(f"tb={u}")))
        # Over: until the bucket is full again (the longer of that and the retry time).
        self.assertStatus(r.statuses[0], OVER_LIMIT, 24, DAY, "", 0, 5 * 3600)
        # More than the bucket holds can never pass: told one period, not "0 s" (which has
        # Envoy's clients retry at once, forever).
        for key in (f"tb={u}-never", f"gcra={u}-never"):
            r = s.call(R("feat", D(key), hits=100))
            self.assertStatus(r.statuses[0], OVER_LIMIT, 24, DAY, "", 0, 86400)

    def test_gcra(self):
        s, u = self.s, self.uniq()
        for i in range(3):
            r = s.call(R("feat", D(f"gcra={u}")))
            self.assertStatus(r.statuses[0], OK, 24, DAY, "", 2 - i, 3600 * (i + 1))
        r = s.call(R("feat", D(f"gcra={u}")))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 24, DAY, "", 0, 3 * 3600)

    def test_rate_limits_list_all_or_nothing(self):
        # account: a token bucket of 2 refilled at 4/s (free_burst) and 4 a day (free_daily).
        s = self.s
        fresh_window(86400, 10)
        # The second call must come within the 0.5 s the bucket takes to refill: on a loaded
        # machine the pair may take longer, and is then made again for another account.
        for _ in range(5):
            u = self.uniq()
            d = D("plan=free", f"account={u}", hits=2)
            t0 = time.monotonic()
            first = s.call(R("feat", d))
            second = s.call(R("feat", d))
            if time.monotonic() - t0 < 0.5:
                break
        # bucket 0, day 2 left: the bucket speaks (least remaining). Full again in 0.5 s:
        # told in whole seconds, rounded up.
        self.assertStatus(first.statuses[0], OK, 4, SECOND, "free_burst", 0, 1, delta=0)
        # The bucket refuses (for 0.5 s): the daily limit is not spent.
        self.assertStatus(second.statuses[0], OVER_LIMIT, 4, SECOND, "free_burst", 0, 1, delta=0)
        time.sleep(0.6)  # the bucket is full again
        r = s.call(R("feat", d))  # admitted only if the refused call spent nothing of the day
        self.assertEqual(r.overall_code, OK, r)
        time.sleep(0.6)
        r = s.call(R("feat", D("plan=free", f"account={u}")))  # the bucket admits, the day not
        self.assertStatus(r.statuses[0], OVER_LIMIT, 4, DAY, "free_daily", 0, window_left(86400))
        self.assertEqual(r.overall_code, OVER_LIMIT)
        r = s.call(R("feat", D("plan=free", f"account={u}-2")))  # another account
        self.assertStatus(r.statuses[0], OK, 4, SECOND, "free_burst", 1)

    def test_descriptors_are_decided_independently(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)
        s.call(R("feat", D(f"user={u}-full", hits=2)))
        r = s.call(R("feat", D(f"user={u}-full"), D(f"user={u}-free"), D("db=orders"),
                     D("internal=x")))
        self.assertEqual(r.overall_code, OVER_LIMIT)
        self.assertEqual(len(r.statuses), 4)
        self.assertStatus(r.statuses[0], OVER_LIMIT, 2, DAY, "", 0)
        self.assertStatus(r.statuses[1], OK, 2, DAY, "", 1)  # counted although [0] is over
        self.assertNoLimit(r.statuses[2])
        self.assertEqual(r.statuses[3].limit_remaining, U32_MAX)
        r = s.call(R("feat", D(f"user={u}-free")))
        self.assertStatus(r.statuses[0], OK, 2, DAY, "", 0)

    def test_hits_addend(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)
        c = f"counter={u}"  # 10 a day
        r = s.call(R("feat", D(c), hits=3))  # the request's hits_addend
        self.assertStatus(r.statuses[0], OK, 10, DAY, "", 7)
        r = s.call(R("feat", D(c), hits=0))  # 0 (unset in proto3): 1
        self.assertStatus(r.statuses[0], OK, 10, DAY, "", 6)
        # A descriptor's hits_addend wins over the request's; the others use the request's.
        r = s.call(R("feat", D(c, hits=1), D(f"counter={u}-b"), hits=4))
        self.assertStatus(r.statuses[0], OK, 10, DAY, "", 5)
        self.assertStatus(r.statuses[1], OK, 10, DAY, "", 6)
        # A descriptor's 0 peeks: answered, nothing spent, and counted as a look.
        peeked = 'sluice_decisions_total{rule="envoy:feat.counter",outcome="peeked"}'
        allowed = 'sluice_decisions_total{rule="envoy:feat.counter",outcome="allowed"}'
        counted = (s.metric(peeked), s.metric(allowed))
        for _ in range(2):
            r = s.call(R("feat", D(c, hits=0), hits=7))
            self.assertStatus(r.statuses[0], OK, 10, DAY, "", 5, window_left(86400))
        self.assertEqual((s.metric(peeked), s.metric(allowed)), (counted[0] + 2, counted[1]))
        # More than is left: over (0 left for it, as envoyproxy answers), and nothing spent.
        r = s.call(R("feat", D(c, hits=6)))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 10, DAY, "", 0, window_left(86400))
        r = s.call(R("feat", D(c, hits=5)))
        self.assertStatus(r.statuses[0], OK, 10, DAY, "", 0)
        # A peek at an exhausted counter: over (one more would not pass), still nothing spent.
        r = s.call(R("feat", D(c, hits=0)))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 10, DAY, "", 0)
        self.assertEqual(r.overall_code, OVER_LIMIT)
        # A peek at a fresh counter: all of it left, and the window's end as its reset.
        r = s.call(R("feat", D(f"counter={u}-c", hits=0)))
        self.assertStatus(r.statuses[0], OK, 10, DAY, "", 10, window_left(86400))
        # More than the limit can ever admit: over, told when the (empty) window resets.
        r = s.call(R("feat", D(f"counter={u}-d"), hits=11))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 10, DAY, "", 0, window_left(86400))
        r = s.call(R("feat", D(f"counter={u}-d"), hits=10))  # nothing was spent
        self.assertStatus(r.statuses[0], OK, 10, DAY, "", 0)
        # A descriptor's hits_addend is 64 bits, as Envoy sends it (a count of bytes may pass
        # 2^32): 2^32 and 2^32 + 1 are over, not the 0 or 1 of their low 32 bits.
        for hits in (1 << 32, (1 << 32) + 1, (1 << 64) - 1):
            r = s.call(R("feat", D(f"counter={u}-e", hits=hits)))
            self.assertStatus(r.statuses[0], OVER_LIMIT, 10, DAY, "", 0)
        r = s.call(R("feat", D(f"counter={u}-e", hits=1)))  # nothing was spent
        self.assertStatus(r.statuses[0], OK, 10, DAY, "", 9)

    def test_limit_override_with_each_unit(self):
        s, u = self.s, self.uniq()
        for unit, period in UNIT_SECONDS.items():
            fresh_window(period, 0.5)
            before = window_left(period)
            # Entries that match nothing in the config: the override alone decides.
            r = s.call(R("feat", D(f"ovr={u}-{unit}", limit=(2, unit))))
            after = window_left(period)
            self.assertStatus(r.statuses[0], OK, 2, unit, "", 1)
            self.assertResetBetween(r.statuses[0], period, before, after)
        # Counting, and the override replaces the config's own limit for that descriptor
        # (db=users is 3 an hour in the config), with a counter of its own.
        fresh_window(86400, 5)
        d = D(f"user={u}", limit=(2, DAY))
        self.assertStatus(s.call(R("feat", d)).statuses[0], OK, 2, DAY, "", 1)
        self.assertStatus(s.call(R("feat", d)).statuses[0], OK, 2, DAY, "", 0)
        r = s.call(R("feat", d))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 2, DAY, "", 0, window_left(86400))
        self.assertEqual(r.overall_code, OVER_LIMIT)
        r = s.call(R("feat", D(f"user={u}")))  # the config's limit: untouched
        self.assertStatus(r.statuses[0], OK, 2, DAY, "", 1)
        r = s.call(R("feat", D("db=users", limit=(1000, MINUTE))))
        self.assertStatus(r.statuses[0], OK, 1000, MINUTE, "", None)
        # A unit no RateLimitUnit names (an open enum on the wire) is no limit, whatever its
        # low 8 bits would name (263 is WEEK's 7 plus 256).
        for unit in (8, 263, -255):
            self.assertNoLimit(s.call(R("feat", D(f"ovr={u}-bad", limit=(1, unit)))).statuses[0])
        # The override counts with the descriptor's hits.
        r = s.call(R("feat", D(f"x={u}", limit=(5, HOUR), hits=3)))
        self.assertStatus(r.statuses[0], OK, 5, HOUR, "", 2)
        # In a domain the config does not have, it is no limit (as envoyproxy/ratelimit):
        # no client makes counters where nobody configured any.
        for _ in range(2):
            r = s.call(R("no_such_domain", D(f"x={u}", limit=(1, HOUR))))
            self.assertEqual(r.overall_code, OK)
            self.assertNoLimit(r.statuses[0])
        # An override with no unit is no limit.
        self.assertNoLimit(s.call(R("feat", D(f"ovr={u}", limit=(2, UNKNOWN)))).statuses[0])

    def test_invalid_requests(self):
        s = self.s
        e = s.call_error(R("", D("db=users")))
        self.assertEqual(e.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(e.details(), "rate limit domain must not be empty")
        e = s.call_error(R("feat"))
        self.assertEqual(e.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.assertEqual(e.details(), "rate limit descriptor list must not be empty")
        e = s.call_error(R("", hits=3))
        self.assertEqual(e.code(), grpc.StatusCode.INVALID_ARGUMENT)
        # Still serving.
        self.assertEqual(s.call(R("feat", D("db=orders"))).overall_code, OK)

    def test_json_over_http_answers_as_grpc(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)
        # Twin requests: the same shape on separate counters (key-only descriptors).
        shapes = [
            lambda v: R("feat", D(f"json={v}")),
            lambda v: R("feat", D(f"json={v}"), hits=2),
            lambda v: R("feat", D(f"json={v}", hits=0), D("internal=x"), D("db=orders")),
            lambda v: R("feat", D(f"json={v}", hits=1), D(f"user={v}", limit=(7, WEEK))),
            lambda v: R("nowhere", D(f"json={v}")),
            lambda v: R("feat", D(f"json={v}")),
            lambda v: R("feat", D(f"json={v}")),
        ]
        for i, shape in enumerate(shapes):
            g = s.call(shape(f"{u}-grpc"))
            h = s.call_json(shape(f"{u}-http"))
            for a, b in zip(g.statuses, h.statuses):
                self.assertAlmostEqual(seconds(a.duration_until_reset),
                                       seconds(b.duration_until_reset), delta=1.5)
                self.assertEqual(a.HasField("duration_until_reset"),
                                 b.HasField("duration_until_reset"))
                a.ClearField("duration_until_reset")
                b.ClearField("duration_until_reset")
            self.assertEqual(g, h, f"request {i}")
        self.assertEqual(g.overall_code, OVER_LIMIT)  # the sequence reached the limit
        # The two share their counters.
        v = f"{u}-shared"
        for i in range(4):
            call = s.call if i % 2 == 0 else s.call_json
            self.assertStatus(call(R("feat", D(f"json={v}"))).statuses[0], OK, 4, DAY, "",
                              3 - i)
        self.assertEqual(s.call(R("feat", D(f"json={v}"))).overall_code, OVER_LIMIT)
        self.assertEqual(s.call_json(R("feat", D(f"json={v}"))).overall_code, OVER_LIMIT)
        # The proto's JSON mapping, as written.
        status, _, body = s.http("POST", "/v1/envoy/ratelimit", json.dumps({
            "domain": "feat", "hitsAddend": 2,
            "descriptors": [{"entries": [{"key": "json", "value": f"{u}-raw"}]},
                            {"entries": [{"key": "o", "value": "1"}],
                             "limit": {"requestsPerUnit": 9, "unit": "HOUR"},
                             "hitsAddend": 4}]}))
        self.assertEqual(status, 200, body)
        doc = json.loads(body)
        self.assertEqual(doc["overallCode"], "OK")
        st0, st1 = doc["statuses"]
        self.assertEqual(st0["code"], "OK")
        self.assertEqual(st0["currentLimit"]["requestsPerUnit"], 4)
        self.assertEqual(st0["currentLimit"]["unit"], "DAY")
        self.assertEqual(st0["limitRemaining"], 2)
        self.assertRegex(st0["durationUntilReset"], r"^\d+(\.\d+)?s$")
        self.assertEqual((st1["currentLimit"]["requestsPerUnit"], st1["currentLimit"]["unit"],
                          st1["limitRemaining"]), (9, "HOUR", 5))
        self.assertEqual(doc.get("responseHeadersToAdd", []), [])

    def test_envoyproxys_own_http_paths(self):
        # Its JSON form at /json, 429 when over the limit.
        s, u = self.s, self.uniq()
        body = json.dumps({"domain": "feat",
                           "descriptors": [{"entries": [{"key": "json", "value": f"{u}-ep"}]}]})
        codes = []
        for _ in range(5):
            status, _, data = s.http("POST", "/json", body)
            codes.append((status, json.loads(data)["overallCode"]))
        self.assertEqual(codes, [(200, "OK")] * 4 + [(429, "OVER_LIMIT")])
        # The same call at Sluice's own path answers 200 with the code in the body.
        status, _, data = s.http("POST", "/v1/envoy/ratelimit", body)
        self.assertEqual((status, json.loads(data)["overallCode"]), (200, "OVER_LIMIT"))
        # Its /healthcheck answers 200 as any path the rules allow (probes read the status).
        status, _, data = s.http("GET", "/healthcheck")
        self.assertEqual((status, json.loads(data)), (200, {"allowed": True}))

    def test_json_over_http_errors(self):
        s = self.s
        cases = [
            ("{bad", "malformed RateLimitRequest JSON: "),
            ('{"domain": "feat", "descriptors": [], "nope": 1}',
             "malformed RateLimitRequest JSON: "),
            ('{"domain": "feat", "hitsAddend": -1, "descriptors": [{"entries": []}]}',
             "malformed RateLimitRequest JSON: "),
            ('{"domain": "", "descriptors": [{"entries": [{"key": "db", "value": "users"}]}]}',
             "rate limit domain must not be empty"),
            ('{"domain": "feat"}', "rate limit descriptor list must not be empty"),
            # Parsers disagree on which of two values wins: neither is picked.
            ('{"domain": "feat", "domain": "x", "descriptors": [{"entries": []}]}',
             "malformed RateLimitRequest JSON: the key 'domain' is given twice"),
            ('{"domain": "feat", "descriptors": [{"entries": [{"key": "a", "value": "1", '
             '"value": "2"}]}]}', "malformed RateLimitRequest JSON: the key 'value' is given "
             "twice"),
        ]
        for body, message in cases:
            status, headers, data = s.http("POST", "/v1/envoy/ratelimit", body)
            self.assertEqual(status, 400, body)
            self.assertEqual(headers["content-type"], "application/json")
            doc = json.loads(data)
            self.assertEqual(doc["error"], "bad_request", body)
            if message.endswith(": "):
                self.assertTrue(doc["message"].startswith(message), doc)
                self.assertGreater(len(doc["message"]), len(message), doc)
            else:
                self.assertEqual(doc["message"], message)
        status, headers, _ = s.http("GET", "/v1/envoy/ratelimit")
        self.assertEqual((status, headers.get("allow")), (405, "POST"))
        self.assertTrue(s.alive())

    def test_concurrent_callers_admit_exactly_the_limit(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 30)
        channels = [grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}") for _ in range(4)]
        self.addCleanup(lambda: [c.close() for c in channels])
        rpcs = [c.unary_unary(METHOD, request_serializer=lambda m: m.SerializeToString(),
                              response_deserializer=Resp.FromString) for c in channels]
        req = R("feat", D(f"conc={u}"))  # 100 a day
        results, errors = [], []
        lock = threading.Lock()
        start = threading.Barrier(12)

        def caller(rpc):
            start.wait()
            mine = []
            try:
                for _ in range(25):
                    r = rpc(req, timeout=10)
                    mine.append((r.overall_code, r.statuses[0].limit_remaining))
            except Exception as e:  # noqa: BLE001 (any failure is a lost call)
                errors.append(repr(e))
            with lock:
                results.extend(mine)

        threads = [threading.Thread(target=caller, args=(rpcs[i % 4],)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 300)
        admitted = sorted(rem for code, rem in results if code == OK)
        self.assertEqual(admitted, list(range(100)))  # each admitted call saw its own count
        self.assertEqual(sum(1 for code, _ in results if code == OVER_LIMIT), 200)
        self.assertEqual(s.call(req).overall_code, OVER_LIMIT)


# ---------------------------------------------------------------------------------------------
# gRPC over HTTP/2 itself: what a client that is not Envoy may send.


class RlsMetricsTest(RlsCase):
    def test_each_call_is_one_latency_observation(self):
        # gRPC or JSON, one call with several descriptors is one request: one observation.
        s = self.start(self.new_dir(FEATURES))
        count = "sluice_decision_latency_seconds_count"
        self.assertEqual(s.metric(count), 0)
        for _ in range(3):
            self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"),
                                      D(f"db={self.uniq()}"))).overall_code, OK)
        self.assertEqual(s.call_json(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)
        self.assertEqual(s.metric(count), 4)

    def test_envoy_limits_have_their_key_series(self):
        # sluice_keys and the full-table refusals cover the Envoy config's tables, and the
        # tables of requests' own limits, as they do the HTTP rules'.
        s = self.start(self.new_dir(FEATURES), extra=["--max-keys", "16"])
        for i in range(40):  # 2 hits: each key at its limit (2 a day), never evicted
            s.call(R("feat", D(f"user=u{i}", hits=2)))
        s.call(R("feat", D("own=1", limit=(100, MINUTE))))
        # The table's 16 slots are spread over shards: keys land by hash, and a shard full
        # refuses its next key while another may have room.
        keys = s.metric('sluice_keys{limit="envoy:feat.user"}')
        refused = s.metric('sluice_table_full_refusals_total{limit="envoy:feat.user"}')
        self.assertTrue(0 < keys <= 16 and refused > 0, (keys, refused))
        self.assertEqual(keys + refused, 40)
        self.assertEqual(s.metric('sluice_keys{limit="envoy:(request limit)"}'), 1)


class OverrideBoundTest(RlsCase):
    """Limits that requests bring themselves get counters for 1024 distinct (requests per
    unit, unit) pairs; one beyond is decided by the store's fail mode, never ignored."""

    def fill(self, s):
        for i in range(1024):
            s.call(R("feat", D(f"fill={i}", limit=(100000 + i, MINUTE))))

    def test_beyond_the_bound_is_refused_by_default(self):
        s = self.start(self.new_dir(FEATURES))
        u = self.uniq()
        self.fill(s)
        # A pair seen within the bound keeps its counters (in one minute: they restart with
        # the next).
        fresh_window(60, 5)
        d = D(f"seen={u}", limit=(100000, MINUTE), hits=100000)
        self.assertStatus(s.call(R("feat", d)).statuses[0], OK, 100000, MINUTE, "", 0)
        self.assertEqual(s.call(R("feat", d)).overall_code, OVER_LIMIT)
        # A new one has no counters: the default fail mode (local, with nothing to count on
        # either) refuses it, as closed does. Before, it was ignored and nothing limited it.
        for _ in range(3):
            r = s.call(R("feat", D(f"victim={u}", limit=(5, HOUR))))
            self.assertEqual(r.overall_code, OVER_LIMIT)
            self.assertStatus(r.statuses[0], OVER_LIMIT, 5, HOUR, "", 0)
            self.assertGreaterEqual(seconds(r.statuses[0].duration_until_reset), 1)
        self.assertEqual(s.metric('sluice_degraded_decisions_total{fail_mode="closed"}'), 3.0)
        self.assertIn("beyond the 1024 distinct ones that get counters; decided by fail_mode "
                      "closed", s.log())
        # Descriptors of the config are decided as ever beside it.
        r = s.call(R("feat", D(f"user={u}"), D(f"victim={u}", limit=(5, HOUR))))
        self.assertEqual([st.code for st in r.statuses], [OK, OVER_LIMIT])

    def test_beyond_the_bound_with_fail_mode_open_is_admitted(self):
        with RedisServer() as redis:
            config = os.path.join(self.new_dir({"sluice.yaml": (
                "rate_limits:\n  default: {requests_per_minute: 1000}\n"
                # A generous deadline: only the bound, never a slow call, is decided open.
                f"store: {{type: redis, address: '{redis.address}', fail_mode: open, "
                "timeout: 2s}\n")}),
                "sluice.yaml")
            s = self.start(self.new_dir(FEATURES), config=config)
            u = self.uniq()
            self.fill(s)
            r = s.call(R("feat", D(f"victim={u}", limit=(5, HOUR))))
            self.assertEqual(r.overall_code, OK)
            self.assertStatus(r.statuses[0], OK, 5, HOUR, "", 5)
            self.assertEqual(s.metric('sluice_degraded_decisions_total{fail_mode="open"}'), 1.0)
            self.assertIn("decided by fail_mode open", s.log())
            s.stop()


class GrpcProtocolTest(SharedServerCase):
    def raw(self, method=METHOD):
        """A call that sends its request bytes as they are."""
        return self.s.channel.unary_unary(method, request_serializer=None,
                                          response_deserializer=None)

    def assertServing(self):
        self.assertEqual(self.s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)

    def assertFails(self, call, code, details):
        with self.assertRaises(grpc.RpcError) as e:
            call()
        self.assertEqual(e.exception.code(), code)
        self.assertEqual(e.exception.details(), details)

    def test_grpc_health_check(self):
        """grpc.health.v1.Health/Check, its messages written by hand: HealthCheckRequest
        {string service = 1}, HealthCheckResponse {ServingStatus status = 1}, SERVING = 1."""
        check = self.raw("/grpc.health.v1.Health/Check")
        serving = b"\x08\x01"
        self.assertEqual(check(b"", timeout=5), serving)  # the server as a whole
        name = b"envoy.service.ratelimit.v3.RateLimitService"
        self.assertEqual(check(b"\x0a" + bytes([len(name)]) + name, timeout=5), serving)
        # The name envoyproxy/ratelimit registers, which its users' probes ask for.
        self.assertEqual(check(b"\x0a\x09ratelimit", timeout=5), serving)
        self.assertFails(lambda: check(b"\x0a\x04nope", timeout=5), grpc.StatusCode.NOT_FOUND,
                         "unknown service nope")
        self.assertFails(lambda: check(b"\x0a\x09nope", timeout=5),
                         grpc.StatusCode.INVALID_ARGUMENT, "malformed HealthCheckRequest message")
        watch = self.s.channel.unary_stream("/grpc.health.v1.Health/Watch",
                                            request_serializer=None, response_deserializer=None)
        self.assertFails(lambda: list(watch(b"\x0a\x09nope", timeout=5)),
                         grpc.StatusCode.INVALID_ARGUMENT, "malformed HealthCheckRequest message")

    def test_metrics_count_calls_by_method_and_code(self):
        s = self.s
        ok = ('sluice_grpc_calls_total{method="/envoy.service.ratelimit.v3.RateLimitService/'
              'ShouldRateLimit",code="OK"}')
        invalid = ok.replace('"OK"', '"INVALID_ARGUMENT"')
        unknown = 'sluice_grpc_calls_total{method="(unknown)",code="UNIMPLEMENTED"}'
        own = 'sluice_decisions_total{rule="envoy:(request limit)",outcome="allowed"}'
        before = {m: s.metric(m) for m in (ok, invalid, unknown, own)}
        for _ in range(2):
            s.call(R("feat", D(f"db={self.uniq()}")))
        s.call(R("feat", D(f"db={self.uniq()}", limit=(5, MINUTE))))
        s.call_error(R("", D("db=users")))
        with self.assertRaises(grpc.RpcError):
            self.raw("/no.Such/Method")(b"", timeout=5)
        self.assertEqual(s.metric(ok), before[ok] + 3)
        self.assertEqual(s.metric(invalid), before[invalid] + 1)
        self.assertEqual(s.metric(unknown), before[unknown] + 1)
        self.assertEqual(s.metric(own), before[own] + 1)  # limits requests bring, together
        self.assertGreaterEqual(s.metric("sluice_grpc_connections"), 1)

    def test_unknown_method_is_unimplemented(self):
        path = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimitNot"
        self.assertFails(lambda: self.raw(path)(b"", timeout=5), grpc.StatusCode.UNIMPLEMENTED,
                         "unknown method " + path)
        # Refused on its head: a message over the size bound is not read to find that out.
        self.assertFails(lambda: self.raw(path)(b"\0" * (3 << 20), timeout=10),
                         grpc.StatusCode.UNIMPLEMENTED, "unknown method " + path)
        self.assertServing()

    def test_malformed_message_is_invalid_argument(self):
        self.assertFails(lambda: self.raw()(b"\x0a\xff\xff\xff", timeout=5),
                         grpc.StatusCode.INVALID_ARGUMENT, "malformed RateLimitRequest message")
        # An empty message is a valid (empty) request: refused for what it lacks.
        self.assertFails(lambda: self.raw()(b"", timeout=5), grpc.StatusCode.INVALID_ARGUMENT,
                         "rate limit domain must not be empty")
        self.assertServing()

    def test_strings_that_are_not_utf8_are_refused_without_flooding_the_log(self):
        # domain (field 1) two bytes that are not UTF-8: protobuf refuses proto3 strings that
        # are not, and logs it; a client sending many must not write a line per call.
        t0 = time.monotonic()
        for _ in range(40):
            self.assertFails(lambda: self.raw()(b"\x0a\x02\xff\xfe", timeout=5),
                             grpc.StatusCode.INVALID_ARGUMENT, "malformed RateLimitRequest message")
        took = time.monotonic() - t0
        log = self.s.log()
        self.assertNotIn("[libprotobuf", log)
        self.assertIn("protobuf: ", log)
        # One a second at most (the 40 calls take longer on a slow machine).
        self.assertLessEqual(log.count("protobuf: "), max(3, 2 + math.ceil(took)), took)
        self.assertServing()

    def test_compressed_message_is_unimplemented(self):
        # As gRPC's compression spec asks of a server without the client's codec.
        req = R("feat", D("db=" + "a" * 20000))  # compresses well: sent compressed
        self.assertFails(lambda: self.s.rpc(req, timeout=5, compression=grpc.Compression.Gzip),
                         grpc.StatusCode.UNIMPLEMENTED,
                         "grpc-encoding gzip is not accepted (identity only)")
        self.assertServing()

    def test_message_over_one_mebibyte_is_resource_exhausted(self):
        req = R("feat", D("db=" + "c" * 1_100_000))
        self.assertFails(lambda: self.s.rpc(req, timeout=10),
                         grpc.StatusCode.RESOURCE_EXHAUSTED,
                         "request message larger than 1048576 bytes")
        # Just under the bound is read and decided.
        big = R("feat", D("db=" + "b" * 1_000_000))
        self.assertEqual(self.s.call(big).overall_code, OK)
        self.assertServing()

    def test_many_calls_in_flight_on_one_connection_admit_exactly_the_limit(self):
        fresh_window(86400, 30)
        req = R("feat", D(f"conc={self.uniq()}"))  # 100 a day
        futures = [self.s.rpc.future(req, timeout=20) for _ in range(600)]
        codes = [f.result().overall_code for f in futures]
        self.assertEqual(codes.count(OK), 100)
        self.assertEqual(codes.count(OVER_LIMIT), 500)

    def test_cancelled_calls_leave_it_serving(self):
        req = R("feat", D(f"db={self.uniq()}"))
        for _ in range(5):
            futures = [self.s.rpc.future(req, timeout=20) for _ in range(200)]
            for f in futures[::2]:
                f.cancel()
            for f in futures[1::2]:
                self.assertEqual(f.result().overall_code, OK)
        self.assertServing()

    def test_a_reset_of_a_stream_never_opened_is_ignored(self):
        """gRPC's C core (this very Python client among them) resets a call cancelled before
        its HEADERS went out: a reset of an idle stream, which HTTP/2 calls a connection
        error. The connection and its other calls carry on."""
        message = R("feat", D(f"db={self.uniq()}")).SerializeToString()
        hpack = b"".join(b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v for k, v in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", METHOD.encode()),
            (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))
        with socket.create_connection(("127.0.0.1", self.s.grpc_port), timeout=5) as c:
            c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") +
                      h2_frame(3, 0, 1, b"\x00\x00\x00\x08") +  # RST_STREAM(CANCEL), stream 1 idle
                      h2_frame(1, 4, 3, hpack) +  # HEADERS (END_HEADERS), stream 3
                      h2_frame(0, 1, 3, b"\x00" + len(message).to_bytes(4, "big") + message))
            data, ended = b"", False
            for type_, flags, stream, payload in h2_frames(c):
                self.assertNotEqual(type_, 7, f"GOAWAY {payload!r}")
                if stream == 3 and type_ == 0:
                    data += payload
                if stream == 3 and type_ == 1 and flags & 1:  # the trailers
                    ended = True
                    break
        self.assertTrue(ended, "the call on stream 3 got no trailers")
        self.assertEqual(Resp.FromString(data[5:]).overall_code, OK)
        self.assertServing()

    def test_malformed_requests_are_reset_and_spend_nothing(self):
        """RFC 9113 section 8.1.1: a request that breaks HTTP/2's messaging rules is a stream
        error, not a call. Were it decided, a duplicated :path would be read one way by
        Sluice and another by whatever else reads the request."""
        user = self.uniq()
        message = R("feat", D(f"user={user}")).SerializeToString()
        valid = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", METHOD.encode()),
                 (b":authority", b"x"), (b"content-type", b"application/grpc"),
                 (b"te", b"trailers")]
        cases = {
            "a second :path": valid + [(b":path", b"/grpc.health.v1.Health/Check")],
            "a pseudo-header after a regular one":
                [h for h in valid if h[0] != b":authority"] + [(b":authority", b"x")],
            "a connection-specific header": valid + [(b"connection", b"keep-alive")],
            "an upper-case name": valid + [(b"X-Upper", b"1")],
            "no :scheme": valid[:1] + valid[2:],
        }
        frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"")
        streams = {}
        for i, (what, headers) in enumerate(cases.items()):
            stream = 2 * i + 1
            streams[stream] = what
            hpack = b"".join(b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v
                             for k, v in headers)
            frames += h2_frame(1, 4, stream, hpack) + h2_frame(
                0, 1, stream, b"\x00" + len(message).to_bytes(4, "big") + message)
        reset = {}
        with socket.create_connection(("127.0.0.1", self.s.grpc_port), timeout=5) as c:
            c.sendall(frames)
            for type_, flags, stream, payload in h2_frames(c):
                if type_ in (0, 1) and stream in streams:  # DATA or HEADERS: an answer
                    self.fail(f"{streams[stream]}: answered, not reset")
                if type_ == 3 and stream in streams:  # RST_STREAM
                    reset[streams[stream]] = int.from_bytes(payload, "big")
                    if len(reset) == len(streams):
                        break
        self.assertEqual(reset, {what: 1 for what in cases})  # PROTOCOL_ERROR each
        # Nothing was spent: the user's first call finds all of its limit but this one.
        self.assertStatus(self.s.call(R("feat", D(f"user={user}"))).statuses[0], OK, 2, DAY,
                          "", 1)
        self.assertServing()

    def test_not_http2_is_closed_and_others_are_served(self):
        errors = self.s.metric("sluice_grpc_protocol_errors_total")
        for junk in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 100,
                     b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 64):
            with socket.create_connection(("127.0.0.1", self.s.grpc_port), timeout=5) as c:
                c.sendall(junk)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # GOAWAY (or nothing), then the close
                    if not c.recv(65536):
                        break
                else:
                    self.fail(f"connection still open after {junk[:20]!r}")
        self.assertEqual(self.s.metric("sluice_grpc_protocol_errors_total"), errors + 3)
        self.assertServing()

    def test_a_connection_that_never_speaks_http2_is_closed_after_ten_seconds(self):
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.s.grpc_port), timeout=20) as c:
            c.sendall(b"PRI * HTTP")  # a preface cut short, then silence
            while c.recv(65536):  # the server's SETTINGS, then the close
                pass
        took = time.monotonic() - t0
        self.assertGreater(took, 9)
        self.assertLess(took, 14)
        self.assertServing()  # the channel opened before, idle meanwhile, still serves

    def curl(self, *args):
        """curl over HTTP/2 without TLS (prior knowledge) to the gRPC port: the status."""
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                              "--http2-prior-knowledge", "--max-time", "5", *args,
                              f"http://127.0.0.1:{self.s.grpc_port}{METHOD}"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout

    def test_a_call_past_its_deadline_is_not_decided(self):
        """A call whose grpc-timeout passes before its message is whole gets
        DEADLINE_EXCEEDED, and spends nothing: curl sends the headers, then the message a
        second later, with a 100 ms timeout."""
        desc = f"conc={self.uniq()}"  # 100 a day
        before = self.s.call(R("feat", D(desc))).statuses[0].limit_remaining
        message = R("feat", D(desc)).SerializeToString()
        framed = b"\x00" + len(message).to_bytes(4, "big") + message
        late = 'DEADLINE_EXCEEDED"}'
        exceeded = self.s.metric('sluice_grpc_calls_total{method="' + METHOD + '",code="' + late)
        conns = self.s.metric("sluice_grpc_connections")
        curl = subprocess.Popen(
            ["curl", "-sS", "-i", "--http2-prior-knowledge", "--max-time", "10", "-X", "POST",
             "-T", "-", "-H", "content-type: application/grpc", "-H", "te: trailers",
             "-H", "grpc-timeout: 100m", f"http://127.0.0.1:{self.s.grpc_port}{METHOD}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # The wait counts from curl's connection (its headers follow at once), not from its
        # start, which a loaded machine may take longer than the timeout to get through; a
        # second, as curl may itself be held up between connecting and sending its headers.
        wait_for(lambda: self.s.metric("sluice_grpc_connections") > conns, 15,
                 "curl's connection")
        time.sleep(1.0)
        out, err = curl.communicate(framed, timeout=15)
        self.assertIn(b"grpc-status: 4", out, err)
        self.assertEqual(self.s.metric('sluice_grpc_calls_total{method="' + METHOD +
                                       '",code="' + late), exceeded + 1)
        after = self.s.call(R("feat", D(desc))).statuses[0].limit_remaining
        self.assertEqual(after, before - 1)  # only the call after it spent

    def test_http2_requests_that_are_not_grpc(self):
        self.assertEqual(self.curl("-X", "POST", "-H", "content-type: application/json",
                                   "--data", "{}"), "415")
        self.assertEqual(self.curl(), "405")  # GET
        self.assertServing()


class GrpcHealthWatchTest(RlsCase):
    def test_watch_holds_the_status_until_shutdown(self):
        """grpc.health.v1.Health/Watch: the status at once (SERVING; SERVICE_UNKNOWN = 3 for
        a name not served, the call kept open as the protocol asks), nothing more while the
        server serves, then NOT_SERVING = 2 and the call's end (OK) when it shuts down."""
        d = features_dir()
        self.addCleanup(shutil.rmtree, d, True)
        s = self.start(d)
        watch = s.channel.unary_stream("/grpc.health.v1.Health/Watch",
                                       request_serializer=None, response_deserializer=None)
        name = b"envoy.service.ratelimit.v3.RateLimitService"
        calls = {"server": watch(b"", timeout=60),
                 "rls": watch(b"\x0a" + bytes([len(name)]) + name, timeout=60),
                 "other": watch(b"\x0a\x04nope", timeout=60)}
        got = {k: [] for k in calls}
        ends = {}

        def follow(key, call):
            try:
                for message in call:
                    got[key].append(message)
                ends[key] = call.code()
            except grpc.RpcError as e:
                ends[key] = e.code()

        threads = [threading.Thread(target=follow, args=kv, daemon=True) for kv in calls.items()]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while any(not v for v in got.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # and nothing else comes while the server serves
        serving, not_serving, unknown = b"\x08\x01", b"\x08\x02", b"\x08\x03"
        self.assertEqual(got, {"server": [serving], "rls": [serving], "other": [unknown]})
        self.assertEqual(ends, {})
        self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)  # alongside
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=20)
        self.assertEqual(got, {"server": [serving, not_serving], "rls": [serving, not_serving],
                               "other": [unknown, unknown]})
        self.assertEqual(ends, {k: grpc.StatusCode.OK for k in calls})
        self.assertEqual(s.proc.wait(timeout=20), 0, s.log()[-2000:])
        self.assertNotIn("calls still in flight", s.log())  # the held calls did not hold it up


class GrpcConnectionBoundTest(RlsCase):
    def test_connections_per_client_address_are_bounded(self):
        d = features_dir()
        self.addCleanup(shutil.rmtree, d, True)
        s = self.start(d, extra=["--max-connections-per-ip", "3"])
        self.assertEqual(s.call(R("feat", D("db=bound"))).overall_code, OK)  # connection 1

        def held():
            """A connection that has spoken HTTP/2 (preface and SETTINGS), so it stays."""
            c = socket.create_connection(("127.0.0.1", s.grpc_port), timeout=5)
            self.addCleanup(c.close)
            settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # empty SETTINGS frame
            c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings)
            return c

        def answer(c):
            """What the server sends first: b"" when it closed the connection (a reset, as
            the client's bytes were unread, counts as closed)."""
            try:
                return c.recv(65536)
            except ConnectionResetError:
                return b""

        conns = [held(), held()]  # 2 and 3
        for c in conns:
            self.assertTrue(answer(c))  # the server's SETTINGS: accepted
        self.assertEqual(answer(held()), b"", "a 4th connection from 127.0.0.1 is closed")
        self.assertEqual(s.call(R("feat", D("db=bound"))).overall_code, OK)  # 1 still serves
        conns[0].close()
        deadline = time.monotonic() + 5
        while True:  # the slot comes back once the server has seen the close
            if answer(held()):
                break
            self.assertLess(time.monotonic(), deadline, "no connection accepted after a close")
            time.sleep(0.05)


class GrpcMemoryTest(RlsCase):
    def test_a_large_call_leaves_no_memory_held(self):
        """A call of a megabyte (500,000 descriptors) is answered, and once it is, the memory
        its messages took goes back: a thread's pool of calls keeps messages of ordinary size
        only, not the elements of the largest call it ever served."""
        libs = subprocess.run(["ldd", BIN], capture_output=True, text=True).stdout
        if "libmimalloc" not in libs:
            self.skipTest("measured with mimalloc, which returns freed pages at once when "
                          "told to (a sanitizer build keeps freed memory in quarantine)")
        d = self.new_dir({"c.yaml": "domain: d\ndescriptors:\n  - key: k\n"
                                    "    rate_limit: {unit: minute, requests_per_unit: 100}\n"})
        with freed_memory_returned():
            s = self.start(d, threads=1)
        raw = s.channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        small = R("d", D("k=a")).SerializeToString()

        def rss_kib():
            with open(f"/proc/{s.proc.pid}/status") as f:
                return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))

        raw(small, timeout=10)
        before = rss_kib()
        n = 500_000
        big = R("d").SerializeToString() + b"\x12\x00" * n  # n empty descriptors
        self.assertEqual(len(Resp.FromString(raw(big, timeout=60)).statuses), n)
        for _ in range(3):
            self.assertEqual(Resp.FromString(raw(small, timeout=10)).overall_code, OK)
        grew = rss_kib() - before
        print(f"\n  RSS after a call of {len(big)} bytes: {grew:+d} KiB", file=sys.stderr)
        self.assertLess(grew, 24 << 10, "the large call's messages are still held")


class GrpcStallTest(RlsCase):
    """A call's request must be whole within the read timeout (--read-timeout-ms), and a
    write must be taken within it: a client that sends part of a message and stops, or that
    never reads its answers, would otherwise hold the memory and the connection slot for
    good. Idle connections are not bounded (Envoy keeps them for later calls)."""

    @staticmethod
    def hpack(path):
        """A call's HEADERS block, each field a literal (no indexing)."""
        return b"".join(b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v for k, v in (
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", path),
            (b":authority", b"x"), (b"content-type", b"application/grpc"), (b"te", b"trailers")))

    HPACK = hpack(METHOD.encode())

    def server(self):
        d = self.new_dir({"c.yaml": "domain: d\ndescriptors:\n  - key: k\n"
                                    "    rate_limit: {unit: minute, requests_per_unit: 100}\n"})
        return self.start(d, extra=["--read-timeout-ms", "1000"])

    def test_a_request_never_whole_closes_its_connection(self):
        s = self.server()
        before = s.metric("sluice_grpc_connections")
        with socket.create_connection(("127.0.0.1", s.grpc_port), timeout=30) as idle:
            idle.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b""))
            t0 = time.monotonic()
            with socket.create_connection(("127.0.0.1", s.grpc_port), timeout=30) as c:
                # A message announced as 100 bytes, 10 of them sent, then silence.
                c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") +
                          h2_frame(1, 4, 1, self.HPACK) +
                          h2_frame(0, 0, 1, b"\x00" + (100).to_bytes(4, "big") + b"x" * 10))
                for _ in h2_frames(c):  # until the server closes it
                    pass
            took = time.monotonic() - t0
            self.assertLess(took, 8, "closed by the read timeout (1 s), not left open")
            self.assertEqual(s.metric("sluice_grpc_stalled_total"), 1)
            # The idle connection, with nothing pending, is still open; a call is served.
            time.sleep(1.5)
            self.assertEqual(s.metric("sluice_grpc_connections"), before + 1)
        self.assertEqual(s.call(R("d", D("k=a"))).overall_code, OK)

    def test_an_early_answer_whose_client_never_ends_its_request_resets_only_that_stream(self):
        # A call to an unknown method is answered at its head (UNIMPLEMENTED, END_STREAM);
        # its client never ends its request. After the read timeout that stream alone is
        # reset (RST_STREAM NO_ERROR): the connection stays, and its next call is served.
        s = self.server()
        unknown = self.hpack(b"/nope.Service/Nope")
        message = R("d", D("k=early")).SerializeToString()
        with socket.create_connection(("127.0.0.1", s.grpc_port), timeout=10) as c:
            c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") +
                      h2_frame(1, 4, 1, unknown))
            t0 = time.monotonic()
            frames = h2_frames(c)
            answered = reset = None
            for type_, flags, stream, payload in frames:
                if type_ == 4 and not flags & 1:
                    c.sendall(h2_frame(4, 1, 0, b""))  # SETTINGS ACK
                if stream == 1 and type_ == 1 and flags & 1:
                    answered = time.monotonic() - t0
                if stream == 1 and type_ == 3:
                    reset = (time.monotonic() - t0, int.from_bytes(payload, "big"))
                    break
                self.assertNotEqual(type_, 7, "the connection was closed (GOAWAY)")
            self.assertIsNotNone(answered, "no early answer")
            self.assertLess(answered, 0.5)
            self.assertIsNotNone(reset, "the connection closed with no reset of the stream")
            self.assertEqual(reset[1], 0, "RST_STREAM's code is NO_ERROR")
            self.assertGreater(reset[0], 0.9, "reset before the read timeout")
            # The same connection serves the next call.
            c.sendall(h2_frame(1, 4, 3, self.HPACK) +
                      h2_frame(0, 1, 3, b"\x00" + len(message).to_bytes(4, "big") + message))
            got = b""
            for type_, flags, stream, payload in frames:
                self.assertNotEqual(type_, 7, "the connection was closed (GOAWAY)")
                if stream == 3 and type_ == 0:
                    got += payload
                if stream == 3 and type_ == 1 and flags & 1:
                    break
            self.assertEqual(Resp.FromString(got[5:]).overall_code, OK)
        self.assertEqual(s.metric("sluice_grpc_stalled_total"), 0)

    def test_a_message_announced_over_the_bound_is_refused_at_its_prefix(self):
        # The prefix says 2 GiB; 10 bytes follow, then nothing: the call is answered
        # RESOURCE_EXHAUSTED at once, not held until the bound's worth has come.
        s = self.server()
        exhausted = f'sluice_grpc_calls_total{{method="{METHOD}",code="RESOURCE_EXHAUSTED"}}'
        with socket.create_connection(("127.0.0.1", s.grpc_port), timeout=10) as c:
            t0 = time.monotonic()
            c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") +
                      h2_frame(1, 4, 1, self.HPACK) +
                      h2_frame(0, 0, 1, b"\x00" + (1 << 31).to_bytes(4, "big") + b"x" * 10))
            for type_, flags, stream, _ in h2_frames(c):
                if type_ == 4 and not flags & 1:
                    c.sendall(h2_frame(4, 1, 0, b""))  # SETTINGS ACK
                if stream == 1 and type_ == 1 and flags & 1:
                    break
            took = time.monotonic() - t0
        self.assertLess(took, 0.8, "answered by the prefix, not by the read timeout (1 s)")
        self.assertEqual(s.metric(exhausted), 1)
        self.assertEqual(s.metric("sluice_grpc_stalled_total"), 0)

    def test_request_bytes_held_over_all_connections_are_bounded(self):
        # Each connection may hold about two messages' worth; --grpc-max-buffered-mib bounds
        # all of them together. Two clients each start 10 calls of 1 MB and send 65,000
        # bytes of each (what flow control lets a stream send unasked), then stop: past
        # 1 MiB in all, a call is answered RESOURCE_EXHAUSTED; once they go, calls pass.
        d = self.new_dir({"c.yaml": "domain: d\ndescriptors:\n  - key: k\n"
                                    "    rate_limit: {unit: minute, requests_per_unit: 100}\n"})
        s = self.start(d, extra=["--grpc-max-buffered-mib", "1"])
        exhausted = ('sluice_grpc_calls_total{method="/envoy.service.ratelimit.v3.'
                     'RateLimitService/ShouldRateLimit",code="RESOURCE_EXHAUSTED"}')
        holders = []
        for _ in range(2):
            c = socket.create_connection(("127.0.0.1", s.grpc_port), timeout=30)
            self.addCleanup(c.close)
            data = b"\x00" + (1_000_000).to_bytes(4, "big") + b"x" * 64_995
            c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b"") +
                      b"".join(h2_frame(1, 4, i, self.HPACK) +
                               b"".join(h2_frame(0, 0, i, data[at:at + 16_384])  # max frame
                                        for at in range(0, len(data), 16_384))
                               for i in range(1, 21, 2)))
            holders.append(c)
        deadline = time.monotonic() + 10
        while s.metric(exhausted) < 1:
            self.assertLess(time.monotonic(), deadline, "no call was refused over the bound")
            time.sleep(0.05)
        big = R("d", D("k=" + "b" * 100_000))
        with self.assertRaises(grpc.RpcError) as e:
            s.rpc(big, timeout=10)
        self.assertEqual((e.exception.code(), e.exception.details()),
                         (grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "the server holds too many request bytes in flight; retry later"))
        for c in holders:
            c.close()
        deadline = time.monotonic() + 10
        while True:  # their streams' bytes are given back as their connections close
            try:
                self.assertEqual(s.rpc(big, timeout=10).overall_code, OK)
                break
            except grpc.RpcError as err:
                self.assertEqual(err.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
                self.assertLess(time.monotonic(), deadline, "the bytes were not given back")
                time.sleep(0.05)

    def test_a_client_that_never_reads_is_closed(self):
        s = self.server()
        c = socket.socket()
        self.addCleanup(c.close)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect(("127.0.0.1", s.grpc_port))
        c.settimeout(2)
        # Calls, and not one answer read: the answers pile up until the server stops
        # reading, and its last write is never taken.
        message = R("d", D("k=a")).SerializeToString()
        data = b"\x00" + len(message).to_bytes(4, "big") + message
        c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b""))
        sent, stream = 0, 1
        try:
            while stream < 400_000:
                batch = b"".join(h2_frame(1, 4, i, self.HPACK) + h2_frame(0, 1, i, data)
                                 for i in range(stream, stream + 2000, 2))
                c.sendall(batch)
                sent += len(batch)
                stream += 2000
        except socket.timeout:
            pass  # the server no longer reads
        except (ConnectionResetError, BrokenPipeError):
            pass  # or, on a slow machine, it already closed the connection mid-send
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and s.metric("sluice_grpc_stalled_total") < 1:
            time.sleep(0.2)
        self.assertEqual(s.metric("sluice_grpc_stalled_total"), 1, f"{sent} bytes of calls sent")
        self.assertEqual(s.call(R("d", D("k=other"))).overall_code, OK)  # k=a's are spent


# ---------------------------------------------------------------------------------------------
# gRPC over TLS, and mutual TLS (certificates made here with the openssl command).


class GrpcTlsTest(RlsCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.d = cls.tmp.name
        make_pki(d, "server")
        make_cert(d, "other-ca", "stranger", server=False)
        cls.envoy = features_dir()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.envoy, ignore_errors=True)
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.d, name)

    def read(self, name):
        with open(self.path(name), "rb") as f:
            return f.read()

    def creds(self, ca="ca", client=None):
        return grpc.ssl_channel_credentials(
            root_certificates=self.read(f"{ca}.crt"),
            private_key=self.read(f"{client}.key") if client else None,
            certificate_chain=self.read(f"{client}.crt") if client else None)

    def server_args(self, mutual):
        args = ["--grpc-tls-cert", self.path("server.crt"), "--grpc-tls-key",
                self.path("server.key")]
        return args + (["--grpc-tls-client-ca", self.path("ca.crt")] if mutual else [])

    def refused(self, s, channel):
        """A call on `channel` fails (UNAVAILABLE) and the server goes on serving."""
        try:
            rpc = channel.unary_unary(METHOD, request_serializer=lambda m: m.SerializeToString(),
                                      response_deserializer=Resp.FromString)
            with self.assertRaises(grpc.RpcError) as e:
                rpc(R("feat", D(f"db={self.uniq()}")), timeout=5)
            self.assertEqual(e.exception.code(), grpc.StatusCode.UNAVAILABLE)
        finally:
            channel.close()
        self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)

    def test_tls(self):
        s = self.start(self.envoy, extra=self.server_args(False), credentials=self.creds())
        self.assertIn(", TLS)", s.log())
        self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)
        # Cleartext to the TLS port, and a client that trusts another CA: refused.
        self.refused(s, grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}"))
        self.refused(s, grpc.secure_channel(f"localhost:{s.grpc_port}",
                                            self.creds(ca="other-ca")))
        # TLS that does not offer HTTP/2 (ALPN h2) ends in the handshake.
        for alpn in ("http/1.1", "h2"):
            out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{s.grpc_port}",
                                  "-CAfile", self.path("ca.crt"), "-alpn", alpn],
                                 input="", capture_output=True, text=True, timeout=10)
            if alpn == "h2":
                self.assertIn("ALPN protocol: h2", out.stdout)
            else:
                self.assertNotEqual(out.returncode, 0)
                self.assertIn("no application protocol", out.stdout + out.stderr)

    def test_mutual_tls(self):
        s = self.start(self.envoy, extra=self.server_args(True),
                       credentials=self.creds(client="client"))
        self.assertIn(", mutual TLS)", s.log())
        self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)
        # No client certificate, or one another CA signed: refused.
        self.refused(s, grpc.secure_channel(f"localhost:{s.grpc_port}", self.creds()))
        self.refused(s, grpc.secure_channel(f"localhost:{s.grpc_port}",
                                            self.creds(client="stranger")))

    def test_mutual_tls_from_the_config_file(self):
        s = self.start(self.envoy, credentials=self.creds(client="client"), server_settings={
            "grpc_tls_cert": self.path("server.crt"), "grpc_tls_key": self.path("server.key"),
            "grpc_tls_client_ca": self.path("ca.crt")})
        self.assertIn(", mutual TLS)", s.log())
        self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)
        self.refused(s, grpc.insecure_channel(f"127.0.0.1:{s.grpc_port}"))
        self.refused(s, grpc.secure_channel(f"localhost:{s.grpc_port}", self.creds()))

    def test_a_rotated_certificate_is_served_to_new_connections(self):
        # cert-manager or a Secret update rewrites the files in place, one after the other:
        # the pair caught half-written is refused and the current certificate stays; once
        # both are written, new connections get the new one without a restart, and a
        # connection already open goes on with its own.
        live = self.new_dir()
        for name in ("server.crt", "server.key"):
            shutil.copy(self.path(name), os.path.join(live, name))
        s = self.start(self.envoy, credentials=self.creds(), extra=[
            "--grpc-tls-cert", os.path.join(live, "server.crt"),
            "--grpc-tls-key", os.path.join(live, "server.key")])
        self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)
        make_cert(self.d, "other-ca", "rotated", server=True)

        def put(name, source):  # as a writer does it: a new file renamed over the old
            shutil.copy(self.path(source), os.path.join(live, name + ".tmp"))
            os.replace(os.path.join(live, name + ".tmp"), os.path.join(live, name))

        def new_channel_works(ca):
            channel = grpc.secure_channel(f"localhost:{s.grpc_port}", self.creds(ca=ca))
            try:
                rpc = channel.unary_unary(
                    METHOD, request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=Resp.FromString)
                return rpc(R("feat", D(f"db={self.uniq()}")), timeout=5).overall_code == OK
            except grpc.RpcError:
                return False
            finally:
                channel.close()

        put("server.crt", "rotated.crt")
        wait_for(lambda: "keeping the current certificate" in s.log(), 10, "the refused pair")
        self.assertIn(f"reload failed, keeping the current certificate: gRPC TLS: --grpc-tls-key "
                      f"{live}/server.key: not the key of --grpc-tls-cert {live}/server.crt\n",
                      s.log())
        self.assertEqual(s.metric("sluice_reload_failures_total"), 1)
        self.assertTrue(new_channel_works("ca"))
        # The watch tries a change once; a SIGHUP tries again what differs from what was
        # loaded (a try may fail for a passing reason: out of descriptors).
        os.kill(s.pid, signal.SIGHUP)
        wait_for(lambda: s.log().count("keeping the current certificate") == 2, 10,
                 "the SIGHUP's try")
        self.assertEqual(s.metric("sluice_reload_failures_total"), 2)
        put("server.key", "rotated.key")
        wait_for(lambda: "reloaded the gRPC TLS certificate" in s.log(), 10, "the new pair")
        wait_for(lambda: new_channel_works("other-ca"), 5, "a connection with the new one")
        self.assertFalse(new_channel_works("ca"))
        # The test's own channel connected before: it keeps its connection and certificate.
        self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)
        # A SIGHUP with the files as loaded does not read them again.
        reloads = s.metric("sluice_reloads_total")  # the envoy directory's and the pair's
        os.kill(s.pid, signal.SIGHUP)
        wait_for(lambda: s.metric("sluice_reloads_total") == reloads + 1, 10,
                 "the SIGHUP's reload of the envoy directory")
        time.sleep(0.2)
        self.assertEqual(s.log().count("reloaded the gRPC TLS certificate"), 1)
        self.assertEqual(s.metric("sluice_reload_failures_total"), 2)
        self.assertTrue(s.alive())

    def test_a_mutual_tls_session_is_resumed(self):
        # Envoy and gRPC clients resume the TLS sessions they cached when they reconnect.
        s = self.start(self.envoy, extra=self.server_args(True),
                       credentials=self.creds(client="client"))
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = ssl.create_default_context(cafile=self.path("ca.crt"))
            ctx.load_cert_chain(self.path("client.crt"), self.path("client.key"))
            ctx.set_alpn_protocols(["h2"])
            ctx.minimum_version = ctx.maximum_version = version

            def connect(session=None):
                raw = socket.create_connection(("127.0.0.1", s.grpc_port), timeout=5)
                c = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
                c.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, b""))
                first = c.recv(9)  # the server's SETTINGS (a TLS 1.3 ticket comes before)
                self.assertEqual(first[3], 4, first)
                return c

            first = connect()
            session = first.session
            first.close()
            again = connect(session)
            self.assertTrue(again.session_reused, version)
            again.close()
        self.assertEqual(s.call(R("feat", D(f"db={self.uniq()}"))).overall_code, OK)

    def test_an_encrypted_key_is_refused_without_a_prompt(self):
        # With a terminal, OpenSSL would ask for the passphrase there and wait, signals and
        # all: `script` gives the command one.
        key = self.path("server-enc.key")
        subprocess.run(["openssl", "pkey", "-in", self.path("server.key"), "-aes256", "-passout",
                        "pass:x", "-out", key], check=True, capture_output=True)
        command = (f"{BIN} serve --envoy-config {self.envoy} --listen 127.0.0.1:0 --admin "
                   f"127.0.0.1:0 --grpc 127.0.0.1:0 --grpc-tls-cert {self.path('server.crt')} "
                   f"--grpc-tls-key {key}")
        done = subprocess.run(["script", "-qec", command, "/dev/null"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        self.assertNotEqual(done.returncode, 0, done)
        self.assertIn(f"gRPC TLS: --grpc-tls-key {key}: the key is encrypted (Sluice reads "
                      "unencrypted PEM keys only; decrypt it with `openssl pkey`)", done.stdout)
        self.assertNotIn("pass phrase", done.stdout)

    def test_a_key_without_its_certificate_is_a_usage_error(self):
        out = subprocess.run([BIN, "serve", "--envoy-config", self.envoy, "--grpc-tls-key",
                              self.path("server.key")], capture_output=True, text=True,
                             timeout=10)
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("--grpc-tls-key requires --grpc-tls-cert", out.stderr)


# ---------------------------------------------------------------------------------------------
# envoyproxy/ratelimit's README examples, loaded from tests/config/envoy/examples.


class ReadmeExamplesTest(RlsCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="sluice-rls-examples-")
        for i in range(1, 10):
            shutil.copy(os.path.join(EXAMPLES, f"example{i}.yaml"), cls.dir)
        cls.s = Sluice(cls.dir)

    @classmethod
    def tearDownClass(cls):
        rc = cls.s.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)
        if rc != 0:
            raise AssertionError(f"sluice exited with {rc}: {cls.s.log()[-2000:]}")

    def test_all_nine_domains_load(self):
        out = self.s.log()
        self.assertIn(f"envoy rate limit service (RLS v3) on 127.0.0.1:{self.s.grpc_port}", out)
        self.assertIn("9 domains from " + self.dir, out)

    def test_example1_two_values_of_one_key(self):
        s = self.s

        def in_a_second():
            expect = window_left(1)
            r = s.call(R("mongo_cps", D("database=users"), hits=499))
            self.assertStatus(r.statuses[0], OK, 500, SECOND, "", 1, expect, delta=0.3)
            r = s.call(R("mongo_cps", D("database=users")))
            self.assertStatus(r.statuses[0], OK, 500, SECOND, "", 0)
            r = s.call(R("mongo_cps", D("database=users"), D("database=default"),
                         D("database=x")))
            self.assertEqual(r.overall_code, OVER_LIMIT)
            self.assertStatus(r.statuses[0], OVER_LIMIT, 500, SECOND, "", 0)
            self.assertStatus(r.statuses[1], OK, 500, SECOND, "", 499)
            self.assertNoLimit(r.statuses[2])
        in_one_window(1, 0.6, in_a_second)

    def test_example2_nested_key_only_per_phone_number(self):
        s, u = self.s, self.uniq()
        fresh_window(86400, 5)
        for i in range(5):
            r = s.call(R("messaging", D("message_type=marketing", f"to_number={u}1")))
            self.assertStatus(r.statuses[0], OK, 5, DAY, "", 4 - i, window_left(86400))
        r = s.call(R("messaging", D("message_type=marketing", f"to_number={u}1")))
        self.assertStatus(r.statuses[0], OVER_LIMIT, 5, DAY, "", 0)
        r = s.call(R("messaging", D("message_type=marketing", f"to_number={u}2")))
        self.assertStatus(r.statuses[0], OK, 5, DAY, "", 4)
        # Envoy sends both descriptors: the per-number daily 100 counts on its own.
        r = s.call(R("messaging", D("message_type=marketing", f"to_number={u}1"),
                     D(f"to_number={u}1")))
        self.assertEqual(r.overall_code, OVER_LIMIT)
        self.assertStatus(r.statuses[1], OK, 100, DAY, "", 99)
        self.assertNoLimit(s.call(R("messaging", D("message_type=marketing"))).statuses[0])
        self.assertNoLimit(s.call(R("messaging", D("message_type=transactional",
                                                   f"to_number={u}1"))).statuses[0])

    def test_example3_key_value_before_key_only_and_a_blacklisted_ip(self):
        s, u = self.s, self.uniq()
        for _ in range(2):
            r = s.call(R("edge_proxy_per_ip", D("remote_address=50.0.0.5")))
            self.assertEqual(r.overall_code, OVER_LIMIT)
            self.assertStatus(r.statuses[0], OVER_LIMIT, 0, SECOND, "", 0)
            self.assertGreater(seconds(r.statuses[0].duration_until_reset), 0)  # the window's end
            self.assertLessEqual(seconds(r.statuses[0].duration_until_reset), 1)

        def in_a_second():
            r = s.call(R("edge_proxy_per_ip", D(f"remote_address=10.{u}"), hits=10))
            self.assertStatus(r.statuses[0], OK, 10, SECOND, "", 0)
            r = s.call(R("edge_proxy_per_ip", D(f"remote_address=10.{u}"),
                         D(f"remote_address=11.{u}")))
            self.assertStatus(r.statuses[0], OVER_LIMIT, 10, SECOND, "", 0)
            self.assertStatus(r.statuses[1], OK, 10, SECOND, "", 9)
        in_one_window(1, 0.6, in_a_second)

    def test_example4_two_entries(self):
        s = self.s
        fresh_window(1, 0.6)
        r = s.call(R("example4", D("key=value", "subkey=a"), D("key=value", "subkey=b"),
                     D("key=value", "subkey=a")))
        self.assertEqual(r.overall_code, OK)
        self.assertStatus(r.statuses[0], OK, 300, SECOND, "", None)
        self.assertEqual(r.statuses[0].limit_remaining - r.statuses[2].limit_remaining, 1)
        self.assertStatus(r.statuses[1], OK, 300, SECOND, "", None)
        for d in (D("key=value"), D("subkey=a"), D("key=other", "subkey=a")):
            self.assertNoLimit(s.call(R("example4", d)).statuses[0])

    def test_example5_unlimited(self):
        s, u = self.s, self.uniq()
        fresh_window(60, 2)
        r = s.call(R("internal", D(f"ldap={u}"), D(f"azure={u}"), hits=1000))
        self.assertEqual(r.overall_code, OVER_LIMIT)
        st = r.statuses[0]
        self.assertEqual((st.code, st.limit_remaining), (OK, U32_MAX))
        self.assertFalse(st.HasField("current_limit"))
        self.assertStatus(r.statuses[1], OVER_LIMIT, 100, MINUTE, "", 0, window_left(60))
        r = s.call(R("internal", D(f"ldap={u}"), D(f"azure={u}")))
        self.assertEqual(r.overall_code, OK)
        self.assertEqual(r.statuses[0].limit_remaining, U32_MAX)
        self.assertStatus(r.statuses[1], OK, 100, MINUTE, "", 99, window_left(60))

    def test_example6_shadow_mode(self):
        s, u = self.s, self.uniq()

        def in_a_second():
            r = s.call(R("example6", D(f"service={u}", "user=user-a"), hits=10))
            self.assertStatus(r.statuses[0], OK, 10, SECOND, "", 0)
            r = s.call(R("example6", D(f"service={u}", "user=user-a"),
                         D(f"service={u}", "user=user-b", hits=20)))
            self.assertEqual(r.overall_code, OK)
            self.assertStatus(r.statuses[0], OK, 10, SECOND, "", 0)  # over, in shadow mode
            self.assertStatus(r.statuses[1], OK, 20, SECOND, "", 0)
            r = s.call(R("example6", D(f"service={u}", "user=user-a"),
                         D(f"service={u}", "user=user-b")))
            self.assertEqual(r.overall_code, OVER_LIMIT)
            self.assertEqual([st.code for st in r.statuses], [OK, OVER_LIMIT])
        in_one_window(1, 0.6, in_a_second)
        self.assertNoLimit(s.call(R("example6", D(f"service={u}", "user=user-c"))).statuses[0])

    def test_example7_replaces(self):
        s = self.s
        a, b = D("key_1=value_1", "user=bkthomps"), D("key_2=value_2", "user=bkthomps")

        def in_a_second():
            r = s.call(R("example7", a))
            self.assertStatus(r.statuses[0], OK, 5, SECOND, "specific_limit", None)
            left = r.statuses[0].limit_remaining
            r = s.call(R("example7", a, b))
            self.assertEqual(r.overall_code, OK)
            self.assertNoLimit(r.statuses[0])
            self.assertStatus(r.statuses[1], OK, 10, SECOND, "", None)
            r = s.call(R("example7", a))  # not counted while replaced
            self.assertStatus(r.statuses[0], OK, 5, SECOND, "specific_limit", left - 1)
        in_one_window(1, 0.6, in_a_second)

    def test_example8_key_only_beside_a_value(self):
        s, u = self.s, self.uniq()
        fresh_window(60, 2)
        r = s.call(R("example8", D("key1=value1"), D(f"key1={u}a"), D(f"key1={u}b"),
                     D(f"key1={u}a")))
        self.assertEqual(r.overall_code, OK)
        self.assertStatus(r.statuses[0], OK, 20, MINUTE, "", None)
        self.assertStatus(r.statuses[1], OK, 10, MINUTE, "", 9)
        self.assertStatus(r.statuses[2], OK, 10, MINUTE, "", 9)
        self.assertStatus(r.statuses[3], OK, 10, MINUTE, "", 8)

    def test_example9_wildcard(self):
        s, u = self.s, self.uniq()
        fresh_window(60, 2)
        r = s.call(R("example9", D(f"key1=value{u}"), D(f"key1=value{u}x"), D(f"key1=value{u}"),
                     D("key1=valu"), D(f"key1=x-value{u}")))
        self.assertStatus(r.statuses[0], OK, 20, MINUTE, "", 19)
        self.assertStatus(r.statuses[1], OK, 20, MINUTE, "", 19)  # each value apart
        self.assertStatus(r.statuses[2], OK, 20, MINUTE, "", 18)
        self.assertNoLimit(r.statuses[3])
        self.assertNoLimit(r.statuses[4])
        r = s.call(R("example9", D("key1=value")))  # '*' matches the empty run too
        self.assertStatus(r.statuses[0], OK, 20, MINUTE, "", None)


# ---------------------------------------------------------------------------------------------
# --rls-headers


class HeadersTest(RlsCase):
    def test_ratelimit_headers_of_the_tightest_descriptor(self):
        d = features_dir()
        self.addCleanup(shutil.rmtree, d, True)
        s = self.start(d, extra=["--rls-headers"], headers_expected=True)
        u = self.uniq()
        fresh_window(86400, 5)

        def headers(r):
            return [(h.key, h.value) for h in r.response_headers_to_add]

        r = s.call(R("feat", D(f"counter={u}"), D(f"user={u}"), D("internal=x")))
        reset = math.ceil(seconds(r.statuses[1].duration_until_reset))
        self.assertAlmostEqual(reset, window_left(86400), delta=2)
        self.assertEqual(headers(r), [("RateLimit-Limit", "2"), ("RateLimit-Remaining", "1"),
                                      ("RateLimit-Reset", str(reset))])
        # As envoyproxy/ratelimit picks it: the descriptor with least left, or the last one
        # over its limit, which has nothing left: user (over for 2) rather than counter.
        r = s.call(R("feat", D(f"counter={u}"), D(f"user={u}"), hits=2))
        self.assertEqual([st.code for st in r.statuses], [OK, OVER_LIMIT])
        self.assertEqual(headers(r)[:2], [("RateLimit-Limit", "2"), ("RateLimit-Remaining", "0")])
        r = s.call(R("feat", D(f"counter={u}"), D(f"user={u}-3"), hits=1))
        self.assertEqual(headers(r)[:2], [("RateLimit-Limit", "2"), ("RateLimit-Remaining", "1")])
        r = s.call(R("feat", D(f"counter={u}"), D(f"user={u}-4"), hits=2))
        self.assertEqual(r.statuses[0].limit_remaining, 4)
        self.assertEqual(headers(r)[:2], [("RateLimit-Limit", "2"), ("RateLimit-Remaining", "0")])
        # counter has 0 left and passes, user is over: the one over.
        r = s.call(R("feat", D(f"counter={u}"), D(f"user={u}-5"), hits=4))
        self.assertEqual([st.code for st in r.statuses], [OK, OVER_LIMIT])
        self.assertEqual(headers(r)[:2], [("RateLimit-Limit", "2"), ("RateLimit-Remaining", "0")])
        # A shadow descriptor over its limit (answered OK) does not take the headers from one
        # really over; the last one over wins.
        s.call(R("feat", D(f"shadow={u}")))
        r = s.call(R("feat", D(f"shadow={u}"), D(f"user={u}"), D(f"db=users-{u}", limit=(3, HOUR)),
                     hits=5))
        self.assertEqual([st.code for st in r.statuses], [OK, OVER_LIMIT, OVER_LIMIT])
        h = headers(r)
        self.assertEqual(h[:2], [("RateLimit-Limit", "3"), ("RateLimit-Remaining", "0")])
        self.assertAlmostEqual(int(h[2][1]), window_left(3600), delta=2)
        r = s.call(R("feat", D(f"user={u}-2", limit=(3, HOUR))))
        h = headers(r)
        self.assertEqual(h[:2], [("RateLimit-Limit", "3"), ("RateLimit-Remaining", "2")])
        self.assertAlmostEqual(int(h[2][1]), window_left(3600), delta=2)
        # No limit applied (none configured, unlimited, unknown domain): no headers.
        for req in (R("feat", D("db=orders")), R("feat", D("internal=x")),
                    R("nowhere", D("a=b"))):
            self.assertEqual(headers(s.call(req)), [])
        # The JSON form carries them too.
        r = s.call_json(R("feat", D(f"counter={u}-j")))
        self.assertEqual(headers(r)[:2], [("RateLimit-Limit", "10"),
                                          ("RateLimit-Remaining", "9")])


    def assertShadowModeAndHeaderNames(self, s, names):
        """Three calls on a limit of 2 a day under global shadow mode: the third is over
        the limit, which its descriptor says while the answer stays OK; its headers carry
        `names`."""
        u = self.uniq()
        fresh_window(86400, 5)
        codes = []
        for _ in range(3):
            r = s.call(R("feat", D(f"user={u}")))
            codes.append((r.overall_code, r.statuses[0].code))
        self.assertEqual(codes, [(OK, OK), (OK, OK), (OK, OVER_LIMIT)])
        self.assertEqual([h.key for h in r.response_headers_to_add], names)

    def test_header_names_and_global_shadow_mode(self):
        # envoyproxy/ratelimit's LIMIT_*_HEADER names and its SHADOW_MODE.
        d = features_dir()
        self.addCleanup(shutil.rmtree, d, True)
        s = self.start(d, extra=["--rls-headers", "--rls-limit-header", "X-Quota",
                                 "--rls-remaining-header", "X-Quota-Left",
                                 "--rls-reset-header", "X-Quota-Reset", "--rls-shadow"],
                       headers_expected=True)
        self.assertShadowModeAndHeaderNames(s, ["X-Quota", "X-Quota-Left", "X-Quota-Reset"])
        text = s.http("GET", "/metrics", admin=True)[2].decode()
        self.assertRegex(text, r'sluice_decisions_total\{rule="envoy:[^"]*user[^"]*",'
                               r'outcome="shadow_limited"\} 1')


    def test_the_settings_in_the_config_files_server_section(self):
        # The flags' twins in the file (a deployment described by one file); a flag given
        # on the command line wins over the file's setting.
        d = features_dir()
        self.addCleanup(shutil.rmtree, d, True)
        s = self.start(d, server_settings={
            "rls_headers": True, "rls_limit_header": "X-Quota",
            "rls_remaining_header": "X-Quota-Left", "rls_reset_header": "X-Quota-Reset",
            "rls_shadow": True, "grpc_max_buffered_mib": 8},
            extra=["--rls-reset-header", "X-Flag-Reset"], headers_expected=True)
        self.assertIn(f"on 127.0.0.1:{s.grpc_port}", s.log())
        self.assertShadowModeAndHeaderNames(s, ["X-Quota", "X-Quota-Left", "X-Flag-Reset"])


# ---------------------------------------------------------------------------------------------
# The envoy config directory is reloaded on SIGHUP, and when its files change. (Both run in
# these tests: a change is loaded by whichever comes first, so each step waits for what it
# expects in the log written after it.)


class MergeDomainsTest(RlsCase):
    def test_files_of_one_domain_are_served_as_one_and_reloaded(self):
        # Long windows: the test counts across reloads, and a window that ended mid-test
        # would start its count again.
        files = {"a.yaml": "domain: shared\ndescriptors:\n  - key: k\n"
                           "    rate_limit: {unit: year, requests_per_unit: 1}\n",
                 "b.yaml": "domain: shared\ndescriptors:\n  - key: m\n"
                           "    rate_limit: {unit: week, requests_per_unit: 2}\n"}
        d = self.new_dir(files)
        # Without the flag the directory is refused, as envoyproxy/ratelimit refuses it.
        out = subprocess.run([BIN, "validate", "--envoy-config", d], capture_output=True,
                             text=True, timeout=20)
        self.assertEqual(out.returncode, 1, out)
        self.assertIn("b.yaml:1:9: domain: duplicate domain 'shared'", out.stderr)
        out = subprocess.run([BIN, "validate", "--envoy-config", d, "--envoy-merge-domains"],
                             capture_output=True, text=True, timeout=20)
        self.assertEqual(out.returncode, 0, out)
        self.assertEqual(out.stdout, f"{d}: ok (1 domains)\n")

        s = self.start(d, extra=["--envoy-merge-domains"])
        r = s.call(R("shared", D("k=x"), D("m=x")))
        self.assertEqual(r.overall_code, OK, r)
        self.assertStatus(r.statuses[0], OK, 1, YEAR, "", 0)
        self.assertStatus(r.statuses[1], OK, 2, WEEK, "", 1)
        self.assertEqual(s.call(R("shared", D("k=x"))).overall_code, OVER_LIMIT)

        # A third file of the domain, loaded by a reload: the merge holds for reloads too, and
        # the counts of the limits already there go on.
        at = len(s.log())
        write(d, "c.yaml", "domain: shared\ndescriptors:\n  - key: n\n"
                           "    rate_limit: {unit: month, requests_per_unit: 3}\n")
        os.kill(s.pid, signal.SIGHUP)
        wait_for(lambda: s.call(R("shared", D("n=x"))).statuses[0].HasField("current_limit"), 20,
                 "the third file served", log=s.log)
        self.assertNotIn("reload failed", s.log()[at:])
        r = s.call(R("shared", D("m=x"), D("n=y")))
        self.assertStatus(r.statuses[0], OK, 2, WEEK, "", 0)
        self.assertStatus(r.statuses[1], OK, 3, MONTH, "", 2)
        # A descriptor two files give is refused; the merged config stays.
        at = len(s.log())
        write(d, "d.yaml", "domain: shared\ndescriptors:\n  - key: k\n")
        os.kill(s.pid, signal.SIGHUP)
        wait_for(lambda: "duplicate descriptor 'k' in this list (first at " + d + "/a.yaml:3:5)"
                 in s.log()[at:], 20, "the refused reload logged", log=s.log)
        self.assertEqual(s.call(R("shared", D("k=x"))).overall_code, OVER_LIMIT)
        self.assertStatus(s.call(R("shared", D("n=z"))).statuses[0], OK, 3, MONTH, "", 2)


class ReloadTest(RlsCase):
    def test_concurrent_reloads_from_every_source_while_calls_flow(self):
        # Admin reloads run on the workers, SIGHUP and the file watch on the main loop; with
        # a limit whose policy flips on every write, each reload also makes or finds tables.
        d = self.new_dir({"r.yaml": "domain: flip\ndescriptors:\n  - key: k\n"
                                    "    rate_limit: {unit: day, requests_per_unit: 1000000}\n"})
        s = self.start(d)
        stop = time.monotonic() + 3
        errors = []

        def admin_reloads():
            try:
                while time.monotonic() < stop:
                    status, _, _ = s.http("POST", "/v1/reload", admin=True)
                    if status != 200:
                        errors.append(f"reload answered {status}")
            except Exception as e:  # noqa: BLE001 (any failure is the test's)
                errors.append(repr(e))

        def calls():
            try:
                while time.monotonic() < stop:
                    if s.call(R("flip", D(f"k={self.uniq()}"))).overall_code != OK:
                        errors.append("a call was over its limit")
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=f) for f in (admin_reloads, admin_reloads, calls)]
        for t in threads:
            t.start()
        i = 0
        while time.monotonic() < stop:
            i += 1
            write(d, ".r.tmp", "domain: flip\ndescriptors:\n  - key: k\n"
                               f"    rate_limit: {{unit: day, requests_per_unit: {1000000 + i % 7}}}\n")
            os.replace(os.path.join(d, ".r.tmp"), os.path.join(d, "r.yaml"))  # whole, at once
            os.kill(s.pid, signal.SIGHUP)
            time.sleep(0.02)
        for t in threads:
            t.join()
        self.assertEqual(errors[:3], [])
        self.assertEqual(s.stop(), 0, s.log()[-2000:])

    def test_admin_reads_the_table_a_limit_changed_back_decides_with(self):
        # 10 a day, then 20, then 10 again: decisions are back on the first table (its
        # counts carried over), and the admin key call reads that one, not the newest made.
        def limit(n):
            return ("domain: back\ndescriptors:\n  - key: k\n"
                    f"    rate_limit: {{unit: day, requests_per_unit: {n}}}\n")
        d = self.new_dir({"r.yaml": limit(10)})
        s = self.start(d)
        fresh_window(86400, 30)
        u = self.uniq()
        self.assertStatus(s.call(R("back", D(f"k={u}"))).statuses[0], OK, 10, DAY, "", 9)
        for n in (20, 10):
            write(d, "r.yaml", limit(n))
            os.kill(s.pid, signal.SIGHUP)
            wait_for(lambda: s.call(R("back", D(f"k={self.uniq()}"))).statuses[0]
                     .current_limit.requests_per_unit == n, 10, f"{n} a day loaded")
        self.assertStatus(s.call(R("back", D(f"k={u}"))).statuses[0], OK, 10, DAY, "", 8)
        key = "/v1/keys?limit=envoy%3Aback.k&key=" + urllib.parse.quote(f"back|k={u}", safe="")
        status, _, body = s.http("GET", key, admin=True)
        self.assertEqual((status, json.loads(body)["policy"], json.loads(body)["remaining"]),
                         (200, "fixed_window 10/1d", 8), body)

    def test_a_change_made_while_the_first_load_reads_is_loaded(self):
        # The directory's state is taken before its first load: a file changed while a
        # large config parses is seen by the watch, not taken for what was loaded.
        big = "domain: big\ndescriptors:\n" + "".join(
            f"  - key: k{i}\n    rate_limit: {{unit: day, requests_per_unit: 5}}\n"
            for i in range(10000))
        d = self.new_dir({"a.yaml": "domain: early\ndescriptors:\n  - key: k\n"
                                    "    rate_limit: {unit: day, requests_per_unit: 6}\n",
                          "z.yaml": big})
        changed = threading.Event()

        def change():  # while z.yaml (read after a.yaml) is parsed
            time.sleep(0.1)
            write(d, "a.yaml", "domain: early\ndescriptors:\n  - key: k\n"
                               "    rate_limit: {unit: day, requests_per_unit: 66}\n")
            changed.set()
        threading.Thread(target=change, daemon=True).start()
        s = self.start(d)
        self.assertTrue(changed.wait(10))
        wait_for(lambda: s.call(R("early", D(f"k={self.uniq()}"))).statuses[0]
                 .current_limit.requests_per_unit == 66, 30, "the change loaded")

    def test_sighup_reload_and_a_broken_config_keeps_the_running_one(self):
        d = self.new_dir({"r.yaml": "domain: reload\ndescriptors:\n  - key: k\n"
                                    "    rate_limit: {unit: day, requests_per_unit: 2}\n"
                                    "  - key: same\n"
                                    "    rate_limit: {unit: day, requests_per_unit: 9}\n"})
        s = self.start(d)
        # The counts below must stay in one day's window and, once the limit is hourly, one
        # hour's (windows are aligned to the epoch): the test takes seconds, more under TSan.
        fresh_window(86400, 90)
        fresh_window(3600, 90)
        self.assertStatus(s.call(R("reload", D("k=a"))).statuses[0], OK, 2, DAY, "", 1)
        self.assertStatus(s.call(R("reload", D("same=a"))).statuses[0], OK, 9, DAY, "", 8)
        self.assertNoLimit(s.call(R("added", D("k=a"))).statuses[0])

        # New limits, and a new domain in a new file.
        write(d, "r.yaml", "domain: reload\ndescriptors:\n  - key: k\n"
                           "    rate_limit: {unit: hour, requests_per_unit: 5, name: five}\n"
                           "  - key: same\n"
                           "    rate_limit: {unit: day, requests_per_unit: 9}\n")
        write(d, "s.yaml", "domain: added\ndescriptors:\n  - key: k\n"
                           "    rate_limit: {unit: minute, requests_per_unit: 7}\n")
        self.assertEqual(s.metric("sluice_reloads_total"), 0)
        os.kill(s.pid, signal.SIGHUP)
        wait_for(lambda: "INFO reloaded " + d in s.log(), 20, "reload logged", log=s.log)
        # Counted as the rules' reloads are (the file watch may load the change too).
        self.assertGreaterEqual(s.metric("sluice_reloads_total"), 1)
        # Until every write above is loaded (the watcher may have seen only the first).
        wait_for(lambda: s.call(R("added", D("k=z"))).statuses[0].HasField("current_limit"), 20,
                 "the new domain served", log=s.log)
        r = s.call(R("reload", D("k=a")))
        self.assertStatus(r.statuses[0], OK, 5, HOUR, "five", 4)  # a new limit: a new count
        self.assertStatus(s.call(R("added", D("k=a"))).statuses[0], OK, 7, MINUTE, "", 6)
        # An unchanged limit keeps its count.
        self.assertStatus(s.call(R("reload", D("same=a"))).statuses[0], OK, 9, DAY, "", 7)

        # Broken configs: each is refused, the process lives on with the config it had.
        broken = [
            ("r.yaml", "domain: reload\ndescriptors:\n  - key: k\n"
                       "    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
             "unknown unit 'fortnight'"),
            ("r.yaml", "domain: reload\ndescriptors: [{key: k\n", "r.yaml:"),
            ("t.yaml", "domain: added\n", "duplicate domain 'added'"),
        ]
        with open(os.path.join(d, "r.yaml")) as f:
            good = f.read()
        for n, (name, text, message) in enumerate(broken, 1):
            at = len(s.log())
            write(d, name, text)
            os.kill(s.pid, signal.SIGHUP)
            wait_for(lambda: "envoy config reload failed, keeping the current one" in
                     s.log()[at:] and message in s.log()[at:], 20, f"failed reload {n} logged",
                     log=s.log)
            self.assertTrue(s.alive())
            # Counted (the file watch may refuse the same file too, before the signal's).
            self.assertGreaterEqual(s.metric("sluice_reload_failures_total"), n)
            r = s.call(R("reload", D(f"k=b{n}"), D("added=x"), D("k=a")))
            self.assertStatus(r.statuses[0], OK, 5, HOUR, "five", 4)
            self.assertStatus(r.statuses[2], OK, 5, HOUR, "five", 4 - n)
            self.assertStatus(s.call(R("added", D(f"k=b{n}"))).statuses[0], OK, 7, MINUTE, "", 6)
            # Undo for the next case.
            at = len(s.log())
            if name == "t.yaml":
                os.unlink(os.path.join(d, name))
            else:
                write(d, name, good)
            wait_for(lambda: "INFO reloaded " + d in s.log()[at:], 20, "good config reloaded",
                     log=s.log)
        # Back to a good config: applied again.
        at = len(s.log())
        write(d, "r.yaml", good.replace("requests_per_unit: 5", "requests_per_unit: 6"))
        os.kill(s.pid, signal.SIGHUP)
        wait_for(lambda: "INFO reloaded " + d in s.log()[at:], 20, "reload logged", log=s.log)
        self.assertStatus(s.call(R("reload", D("k=c"))).statuses[0], OK, 6, HOUR, "five", 5)
        # SIGHUP with nothing changed on disk (so nothing for the watcher): reloaded all the same.
        time.sleep(1.5)  # the watcher has seen the last write
        at = len(s.log())
        os.kill(s.pid, signal.SIGHUP)
        wait_for(lambda: "INFO reloaded " + d in s.log()[at:], 20, "reload on SIGHUP logged",
                 log=s.log)
        self.assertEqual(s.stop(), 0)

    def test_changed_files_are_loaded_without_a_signal(self):
        """As Kubernetes updates a ConfigMap volume: each file a symlink into ..data, itself a
        symlink swapped at once to a new directory."""
        d = self.new_dir()
        v1 = os.path.join(d, "..v1")
        os.mkdir(v1)
        write(v1, "r.yaml", "domain: watch\ndescriptors:\n  - key: k\n"
                            "    rate_limit: {unit: day, requests_per_unit: 3}\n")
        os.symlink("..v1", os.path.join(d, "..data"))
        os.symlink("..data/r.yaml", os.path.join(d, "r.yaml"))
        s = self.start(d)
        fresh_window(86400, 15)
        self.assertStatus(s.call(R("watch", D("k=a"))).statuses[0], OK, 3, DAY, "", 2)

        def swap(version, text):
            v = os.path.join(d, f"..{version}")
            os.mkdir(v)
            write(v, "r.yaml", text)
            os.symlink(f"..{version}", os.path.join(d, "..tmp"))
            os.replace(os.path.join(d, "..tmp"), os.path.join(d, "..data"))

        at = len(s.log())
        swap("v2", "domain: watch\ndescriptors:\n  - key: k\n"
                   "    rate_limit: {unit: day, requests_per_unit: 4, name: four}\n")
        wait_for(lambda: "INFO reloaded " + d in s.log()[at:], 20, "the swap loaded")
        self.assertStatus(s.call(R("watch", D("k=a"))).statuses[0], OK, 4, DAY, "four", 3)
        # A broken update is refused; the running config stays.
        at = len(s.log())
        swap("v3", "domain: watch\ndescriptors:\n  - key: k\n"
                   "    rate_limit: {unit: day}\n")
        wait_for(lambda: "envoy config reload failed, keeping the current one" in s.log()[at:],
                 20, "the broken swap refused")
        self.assertIn("requests_per_unit", s.log()[at:])
        self.assertStatus(s.call(R("watch", D("k=a"))).statuses[0], OK, 4, DAY, "four", 2)
        # A new file beside it.
        at = len(s.log())
        swap("v4", "domain: watch\ndescriptors:\n  - key: k\n"
                   "    rate_limit: {unit: day, requests_per_unit: 4, name: four}\n")
        write(d, "more.yaml", "domain: more\ndescriptors:\n  - key: k\n"
                              "    rate_limit: {unit: hour, requests_per_unit: 8}\n")
        wait_for(lambda: s.call(R("more", D("k=a"))).statuses[0].HasField("current_limit"), 20,
                 "the new file served")
        # An edit in place that keeps the file's size and time (cp -p, rsync -t).
        more = os.path.join(d, "more.yaml")
        old = os.stat(more)
        write(d, "more.yaml", "domain: more\ndescriptors:\n  - key: k\n"
                              "    rate_limit: {unit: hour, requests_per_unit: 9}\n")
        os.utime(more, ns=(old.st_atime_ns, old.st_mtime_ns))
        wait_for(lambda: s.call(R("more", D("k=b"))).statuses[0].current_limit.requests_per_unit
                 == 9, 20, "the edit that kept the time loaded")
        self.assertEqual(s.stop(), 0)


# ---------------------------------------------------------------------------------------------
# Redis: counts shared by several Sluice processes.


class RedisTest(RlsCase):
    @classmethod
    def setUpClass(cls):
        cls.redis = RedisServer()
        cls.dir = features_dir()
        fd, cls.config = tempfile.mkstemp(prefix="sluice-rls-redis-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            # The store alone, as the README's Envoy example has it: the limits are Envoy's.
            f.write(f"store: {{type: redis, address: '{cls.redis.address}', timeout: 2s}}\n")
        cls.a = cls.b = None
        try:
            cls.a = Sluice(cls.dir, config=cls.config)
            cls.b = Sluice(cls.dir, config=cls.config)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        rcs = [s.stop() for s in (cls.a, cls.b) if s is not None]
        cls.redis.stop()
        shutil.rmtree(cls.dir, ignore_errors=True)
        os.unlink(cls.config)
        if any(rc != 0 for rc in rcs):
            raise AssertionError(f"sluice exited with {rcs}")

    def test_store_is_redis(self):
        for s in (self.a, self.b):
            self.assertIn("store redis", s.log())
            # With no rate_limits in the file, the HTTP listener runs the embedded default.
            self.assertIn("rule default: any method /*, key ip, sliding_window_counter 60/1m",
                          s.log())

    def test_admin_reads_and_resets_an_envoy_key_in_redis(self):
        a, b, u = self.a, self.b, self.uniq()
        fresh_window(86400, 10)
        for _ in range(3):
            self.assertEqual(a.call(R("feat", D(f"counter={u}"))).overall_code, OK)
        key = ("/v1/keys?limit=envoy%3Afeat.counter&key="
               + urllib.parse.quote(f"feat|counter={u}", safe=""))
        status, _, body = b.http("GET", key, admin=True)  # the other node reads Redis' count
        self.assertEqual((status, json.loads(body)["remaining"]), (200, 7), body)
        status, _, body = b.http("DELETE", key, admin=True)
        self.assertEqual((status, json.loads(body)), (200, {"deleted": True}), body)
        self.assertStatus(a.call(R("feat", D(f"counter={u}"))).statuses[0], OK, 10, DAY, "", 9,
                          window_left(86400))

    def test_two_processes_share_exact_counts(self):
        a, b, u = self.a, self.b, self.uniq()
        fresh_window(86400, 10)
        fresh_window(3600, 10)  # the override's hour below
        for i in range(10):
            s = (a, b)[i % 2]
            r = s.call(R("feat", D(f"counter={u}")))
            self.assertStatus(r.statuses[0], OK, 10, DAY, "", 9 - i, window_left(86400))
        for s in (a, b):
            r = s.call(R("feat", D(f"counter={u}")))
            self.assertStatus(r.statuses[0], OVER_LIMIT, 10, DAY, "", 0)
        # An override, hits_addend and a peek, through Redis.
        d = D(f"ovr={u}", limit=(3, HOUR))
        self.assertStatus(a.call(R("feat", d)).statuses[0], OK, 3, HOUR, "", 2)
        self.assertStatus(b.call(R("feat", D(f"ovr={u}", limit=(3, HOUR), hits=0))).statuses[0],
                          OK, 3, HOUR, "", 2)
        self.assertStatus(b.call(R("feat", d, hits=2)).statuses[0], OK, 3, HOUR, "", 0)
        self.assertStatus(a.call(R("feat", d)).statuses[0], OVER_LIMIT, 3, HOUR, "", 0)
        # Token bucket; JSON over HTTP (decided on a worker's loop) shares the same counts.
        for i, call in enumerate((a.call, b.call_json, a.call_json, b.call, a.call)):
            self.assertStatus(call(R("feat", D(f"tb={u}"))).statuses[0], OK, 24, DAY, "", 4 - i)
        self.assertEqual(b.call_json(R("feat", D(f"tb={u}"))).overall_code, OVER_LIMIT)
        # Several descriptors of one request, on both.
        r = a.call(R("feat", D(f"counter={u}"), D(f"user={u}"), D("internal=x"), D("db=orders")))
        self.assertEqual([st.code for st in r.statuses], [OVER_LIMIT, OK, OK, OK])
        self.assertEqual(r.statuses[1].limit_remaining, 1)
        r = b.call(R("feat", D(f"user={u}")))
        self.assertStatus(r.statuses[0], OK, 2, DAY, "", 0)

    def test_concurrent_callers_on_two_processes_admit_exactly_the_limit(self):
        u = self.uniq()
        fresh_window(86400, 30)
        req = R("feat", D(f"conc={u}"))  # 100 a day
        results, errors = [], []
        lock = threading.Lock()
        start = threading.Barrier(8)

        def caller(s):
            start.wait()
            mine = []
            try:
                for _ in range(25):
                    r = s.rpc(req, timeout=10)
                    mine.append((r.overall_code, r.statuses[0].limit_remaining))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
            with lock:
                results.extend(mine)

        threads = [threading.Thread(target=caller, args=((self.a, self.b)[i % 2],))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(errors, [])
        self.assertEqual(len(results), 200)
        self.assertEqual(sorted(rem for code, rem in results if code == OK), list(range(100)))
        self.assertEqual(sum(1 for code, _ in results if code == OVER_LIMIT), 100)

    def test_keys_are_in_redis_with_an_expiry(self):
        u = self.uniq()
        self.a.call(R("feat", D("tenant=acme", f"user={u}")))
        self.b.call(R("feat", D(f"x={u}", limit=(2, MINUTE))))
        with RespClient(self.redis.address) as c:
            keys = c.call("KEYS", f"*{u}*")
            self.assertEqual(len(keys), 2, keys)
            for k in keys:
                self.assertTrue(k.startswith("sluice:{"), k)
                ttl = c.call("PTTL", k)
                self.assertGreater(ttl, 0, k)
            matched = [k for k in keys if f"feat|tenant=acme|user={u}" in k]
            self.assertEqual(len(matched), 1, keys)
            # The window's end, plus the script's spread of under a second.
            self.assertLessEqual(c.call("PTTL", matched[0]), 86400 * 1000 + 999)
            override = [k for k in keys if f"x={u}" in k]
            self.assertEqual(len(override), 1, keys)
            self.assertLessEqual(c.call("PTTL", override[0]), 60 * 1000 + 999)
        for s in (self.a, self.b):
            self.assertEqual(s.metric("sluice_store_errors_total"), 0.0)
            self.assertEqual(s.metric("sluice_degraded_decisions_total"), 0.0)


# ---------------------------------------------------------------------------------------------
# SIGTERM while calls are in flight.


class CallsInFlightTest(RlsCase):
    def start_on_redis(self, store_timeout, **kw):
        """Sluice on a Redis of its own, with a call made through it; (sluice, redis, the
        descriptor, counted in Redis). SIGSTOP then freezes Redis until SIGCONT (sent at cleanup too)."""
        redis = RedisServer()
        self.addCleanup(redis.stop)
        config = self.new_dir({"sluice.yaml": (
            "rate_limits:\n  default: {requests_per_minute: 1000}\n"
            f"store: {{type: redis, address: '{redis.address}', timeout: {store_timeout}}}\n")})
        s = self.start(features_dir(), config=os.path.join(config, "sluice.yaml"), **kw)
        counter = D(f"counter={self.uniq()}")  # a limit: each call goes to Redis
        self.assertEqual(s.call(R("feat", counter)).overall_code, OK)
        self.addCleanup(lambda: redis.running() and os.kill(redis.pid, signal.SIGCONT))
        return s, redis, counter

    def test_calls_of_reset_streams_still_count_against_the_connections_bound(self):
        # A client that resets its streams (here: its calls time out) while Redis is frozen
        # frees their stream slots, not their store calls: past max_concurrent_streams
        # (1024) calls in flight on one connection, more are refused at once.
        s, redis, counter = self.start_on_redis("6s", threads=1)
        os.kill(redis.pid, signal.SIGSTOP)  # Redis answers nothing until SIGCONT
        futures = [s.rpc.future(R("feat", counter), timeout=1) for _ in range(1100)]
        codes = [f.exception().code() if f.exception() else None for f in futures]
        self.assertEqual(codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) +
                         codes.count(grpc.StatusCode.DEADLINE_EXCEEDED), 1100, codes[:20])
        # Every stream is closed now (the client gave up on each), but 1024 calls wait on
        # Redis: the next is refused at once, not held.
        err = s.call_error(R("feat", counter))
        self.assertEqual(err.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        self.assertIn("too many calls in flight", err.details())
        os.kill(redis.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10  # once Redis answers, the calls end and free room
        while True:
            try:
                s.call(R("feat", counter))  # answered (over its limit by now: no matter)
                break
            except grpc.RpcError as e:
                self.assertLess(time.monotonic(), deadline, e)
                time.sleep(0.1)

    def test_a_call_in_flight_at_sigterm_has_the_drain_timeout(self):
        # gRPC calls in flight at a stop get --drain-timeout-ms (here 6 s), as HTTP requests
        # do: one waiting 3 s on a frozen Redis is answered, not cut off at 2 s.
        s, redis, counter = self.start_on_redis("8s", extra=["--drain-timeout-ms", "6000"])
        os.kill(redis.pid, signal.SIGSTOP)
        call = s.rpc.future(R("feat", counter), timeout=10)
        time.sleep(0.5)  # the call waits on Redis
        os.kill(s.pid, signal.SIGTERM)
        time.sleep(3)
        os.kill(redis.pid, signal.SIGCONT)
        self.assertEqual(call.result().overall_code, OK)
        self.assertEqual(s.proc.wait(timeout=10), 0, s.log()[-2000:])


class LocalSyncTest(RlsCase):
    def test_two_processes_count_each_others_hits_once_synced(self):
        redis = RedisServer()
        self.addCleanup(redis.stop)
        config = self.new_dir({"sluice.yaml": (
            "rate_limits:\n  default: {requests_per_minute: 1000}\n"
            f"store: {{type: redis, address: '{redis.address}', mode: local_sync,"
            " sync_interval: 50ms}\n")})
        envoy = self.new_dir({"sync.yaml": (
            "domain: sync\n"
            "descriptors:\n"
            "  - key: counter\n"
            "    rate_limit: {unit: day, requests_per_unit: 10}\n")})
        a = self.start(envoy, config=os.path.join(config, "sluice.yaml"))
        b = self.start(envoy, config=os.path.join(config, "sluice.yaml"))
        u = self.uniq()
        fresh_window(86400, 30)
        fresh_window(3600, 30)  # the override's hour, as the counter's day
        for i in range(6):
            self.assertStatus(a.call(R("sync", D(f"counter={u}"))).statuses[0], OK, 10, DAY, "",
                              9 - i)
        ovr = D(f"ovr={u}", limit=(3, HOUR))
        self.assertStatus(a.call(R("sync", ovr)).statuses[0], OK, 3, HOUR, "", 2)
        # b decides from its own counts, then counts a's hits once its syncs fetch them.
        peek = R("sync", D(f"counter={u}", hits=0), D(f"ovr={u}", limit=(3, HOUR), hits=0))
        deadline = time.monotonic() + 10
        while [st.limit_remaining for st in b.call(peek).statuses] != [4, 2]:
            self.assertLess(time.monotonic(), deadline, "b never counted a's hits")
            time.sleep(0.05)
        for i in range(4):
            self.assertStatus(b.call(R("sync", D(f"counter={u}"))).statuses[0], OK, 10, DAY, "",
                              3 - i)
        self.assertEqual(b.call(R("sync", D(f"counter={u}"))).overall_code, OVER_LIMIT)
        self.assertEqual(b.call(R("sync", ovr, hits=2)).overall_code, OK)
        self.assertEqual(b.call(R("sync", ovr)).overall_code, OVER_LIMIT)
        self.assertIn("redis (local_sync)", b.http("GET", "/readyz", admin=True)[2].decode())
        # The admin key calls read the synced counts decisions use; no one node resets them.
        key = ("/v1/keys?limit=envoy%3Async.counter&key="
               + urllib.parse.quote(f"sync|counter={u}", safe=""))
        status, _, body = b.http("GET", key, admin=True)
        self.assertEqual((status, json.loads(body)["remaining"]), (200, 0), body)
        self.assertEqual(b.http("DELETE", key, admin=True)[0], 409)

    def test_a_limit_synced_counts_cannot_decide_is_refused(self):
        config = self.new_dir({"sluice.yaml": (
            "rate_limits:\n  default: {requests_per_minute: 1000}\n"
            "store: {type: redis, address: '127.0.0.1:1', mode: local_sync}\n")})
        envoy = self.new_dir({"gcra.yaml": (
            "domain: g\n"
            "descriptors:\n"
            "  - key: k\n"
            "    rate_limit: {unit: second, requests_per_unit: 5, algorithm: gcra}\n")})
        with self.assertRaises(RuntimeError) as e:
            self.start(envoy, config=os.path.join(config, "sluice.yaml"))
        self.assertIn("cannot run with store mode local_sync", str(e.exception))


class RedisArithmeticTest(RlsCase):
    def test_a_limit_too_large_for_the_scripts_doubles_is_refused(self):
        # As a rules file's limit is: the script would decide it with rounding.
        config = self.new_dir({"sluice.yaml": (
            "store: {type: redis, address: '127.0.0.1:1'}\n")})
        envoy = self.new_dir({"big.yaml": (
            "domain: d\n"
            "descriptors:\n"
            "  - key: k\n"
            "    rate_limit: {unit: year, requests_per_unit: 4000000000,"
            " algorithm: sliding_window_counter}\n")})
        out = subprocess.run([BIN, "validate", os.path.join(config, "sluice.yaml"),
                              "--envoy-config", envoy], capture_output=True, text=True, timeout=30)
        self.assertEqual(out.returncode, 1, out.stdout)
        self.assertEqual(out.stderr.strip(), (
            "envoy config: limit d.k (sliding_window_counter 4000000000/365d) is too large for "
            "the redis store, whose script computes in doubles (a count times the unit in "
            "microseconds must stay below 2^53): use a smaller requests_per_unit or burst, a "
            "shorter unit, or the memory store"))
        with self.assertRaises(RuntimeError) as e:
            self.start(envoy, config=os.path.join(config, "sluice.yaml"))
        self.assertIn("too large for the redis store", str(e.exception))


class ConfigWarningsTest(RlsCase):
    def test_quota_mode_is_refused(self):
        # envoyproxy/ratelimit lets a request over a quota_mode limit through; Sluice would
        # refuse it, so such a config does not load.
        envoy = self.new_dir({"q.yaml": "domain: q\ndescriptors:\n  - key: tenant\n"
                                        "    quota_mode: true\n"
                                        "    rate_limit: {unit: hour, requests_per_unit: 2}\n"})
        with self.assertRaises(RuntimeError) as e:
            self.start(envoy)
        self.assertIn("q.yaml:4:17: descriptors[0].quota_mode: quota_mode (allow over the quota "
                      "and report it in metadata) is not supported", str(e.exception))

    def test_warnings_are_logged_at_start_and_at_each_reload(self):
        text = ("domain: w\ndescriptors:\n  - key: general\n"
                "    rate_limit: {unit: hour, requests_per_unit: 2, name: general}\n"
                "  - key: vip\n"
                "    rate_limit: {unit: hour, requests_per_unit: 5, replaces: [{name: genral}]}\n"
                "    metadata: {pool: a}\n")
        d = self.new_dir({"w.yaml": text})
        s = self.start(d)
        typo = ("WARN envoy config: " + os.path.join(d, "w.yaml") +
                ":6:70: descriptors[1].rate_limit.replaces[0].name: 'genral' names no rate limit "
                "of domain 'w'")
        metadata = "descriptors[1].metadata: not sent to Envoy: Sluice answers no dynamic_metadata"
        wait_for(lambda: typo in s.log() and metadata in s.log(), 10, "warnings logged at start")
        at = len(s.log())
        os.kill(s.pid, signal.SIGHUP)
        wait_for(lambda: "INFO reloaded " + d in s.log()[at:], 20, "reload logged")
        self.assertIn(typo, s.log()[at:])
        self.assertEqual(s.stop(), 0)


class ShutdownTest(RlsCase):
    def sigterm_under_load(self, s, threads=16, load_seconds=0.3):
        """Calls ShouldRateLimit from `threads` threads, sends SIGTERM and waits for the exit;
        (exit status or None if still running after 8 s, seconds it took)."""
        stop = threading.Event()
        answered = [0]

        def caller():
            req = R("feat", D("conc=x"), D("user=y"))
            while not stop.is_set():
                try:
                    s.rpc(req, timeout=2)
                    answered[0] += 1
                except grpc.RpcError:
                    pass  # UNAVAILABLE once the server is going

        ts = [threading.Thread(target=caller) for _ in range(threads)]
        for t in ts:
            t.start()
        try:
            wait_for(lambda: answered[0] > 50, 10, "calls answered")
            time.sleep(load_seconds)
            t0 = time.monotonic()
            os.kill(s.pid, signal.SIGTERM)
            try:
                rc = s.proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                rc = None
                s.proc.kill()
                s.proc.wait()
            return rc, time.monotonic() - t0
        finally:
            stop.set()
            for t in ts:
                t.join(10)

    def test_sigterm_with_calls_in_flight_memory_store(self):
        d = features_dir()
        self.addCleanup(shutil.rmtree, d, True)
        for _ in range(2):
            s = self.start(d)
            rc, took = self.sigterm_under_load(s)
            self.assertEqual(rc, 0, s.log()[-2000:])
            self.assertLess(took, 6)

    # With Redis, gRPC calls wait on the workers' loops: SIGTERM stops gRPC before them.
    def test_sigterm_with_calls_in_flight_redis_store(self):
        redis = RedisServer()
        self.addCleanup(redis.stop)
        d = features_dir()
        self.addCleanup(shutil.rmtree, d, True)
        cd = self.new_dir()  # apart: every file of the envoy directory is envoy config
        config = os.path.join(cd, "sluice.yaml")
        write(cd, "sluice.yaml", "rate_limits:\n  default: {requests_per_minute: 1000}\n"
                                f"store: {{type: redis, address: '{redis.address}', "
                                "timeout: 100ms}\n")
        for i in range(8):
            s = self.start(d, config=config)
            rc, took = self.sigterm_under_load(s)
            self.assertEqual(rc, 0, f"try {i}: still running 8 s after SIGTERM" if rc is None
                             else s.log()[-2000:])
            self.assertLess(took, 6)

    def test_sigterm_drains_both_listeners_at_once(self):
        # A gRPC call whose message never comes holds the gRPC drain to its deadline; the
        # HTTP listener must not stay open (and its drain start) only after that.
        d = features_dir()
        self.addCleanup(shutil.rmtree, d, True)
        s = self.start(d, extra=("--drain-timeout-ms", "2000"))

        def literal(index, value):  # HPACK: a literal field not indexed, its name by index
            name = bytes([index]) if index < 15 else bytes([0x0f, index - 15])
            return name + bytes([len(value)]) + value.encode()
        # :method POST, :scheme http, :path, :authority, content-type; no message follows.
        block = (bytes([0x83, 0x86]) + literal(4, METHOD) + literal(1, "sluice")
                 + literal(31, "application/grpc"))
        headers = (len(block).to_bytes(3, "big") + bytes([1, 4]) + (1).to_bytes(4, "big")
                   + block)
        with socket.create_connection(("127.0.0.1", s.grpc_port), timeout=5) as g:
            g.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
                      + headers)
            time.sleep(0.2)
            t0 = time.monotonic()
            os.kill(s.pid, signal.SIGTERM)
            time.sleep(0.5)
            with self.assertRaises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
            rc = s.proc.wait(timeout=10)
            took = time.monotonic() - t0
        self.assertEqual(rc, 0, s.log()[-2000:])
        self.assertLess(took, 4.5)  # the drain (2 s) and the gRPC close's grace (1 s)
        self.assertIn("grpc: closing connections with calls still in flight", s.log())


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: rls_test.py path/to/sluice path/to/rls.protoset [unittest args]")
    BIN = os.path.abspath(sys.argv.pop(1))
    load_protos(sys.argv.pop(1))
    unittest.main(verbosity=1)
