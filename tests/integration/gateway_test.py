#!/usr/bin/env python3
"""Gateway mode: the real sluice binary in front of a real upstream HTTP server, on loopback.

Usage: gateway_test.py path/to/sluice
"""
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import select
import signal
import socket
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server_test  # noqa: E402  (Server, free_port)


# How long the upstream holds a /hold request: far longer than Sluice may take, even under
# ASan on a loaded machine, to pass on a client's hang-up.
HOLD_SECONDS = 10


BLOCK = bytes(range(251)) * 400  # 100,400 bytes; 251 is prime, so pieces never align


def pattern(n, at=0):
    """n bytes of a repeating, position-dependent pattern (a shifted or lost piece shows),
    from position `at` of it on."""
    start = at % len(BLOCK)
    return (BLOCK[start:] + BLOCK * (n // len(BLOCK) + 1))[:n]


class Upstream(http.server.ThreadingHTTPServer):
    """Echoes what it received; /slow sleeps first; counts requests. Streaming bodies:
    /big?n=N (N bytes with a Content-Length), /chunked (a piece, then the rest once
    `release` is set), /upload?first-chunk (sets `first_chunk` when the upload's first chunk
    is in), /until-close (no length: the body ends with the connection),
    /dies (announces 1 MB, sends 100 kB and drops the connection), /refuse (answers 413 to
    the head alone and closes, the body unread)."""

    daemon_threads = True

    def __init__(self):
        self.hits = 0
        self.closed_early = 0  # /hold requests whose connection Sluice closed
        self.lock = threading.Lock()
        self.release = threading.Event()
        self.first_chunk = threading.Event()
        self.late_sent = threading.Event()  # /late-408 wrote its unasked 408

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer()

            def do_POST(self):
                self.answer()

            def do_HEAD(self):  # the length a GET would have, and no body
                if self.path == "/head-body":  # wrongly, a body after all
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd")
                    return
                if self.path == "/head-chunked":  # a GET would be chunked: no length
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "64")
                self.end_headers()

            def read_body(self):
                """The request's body, chunked or not; (body, whether it was chunked)."""
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", 0))), False
                body = b""
                self.chunks = 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b""):
                            pass
                        return body, True
                    self.chunks += 1
                    body += self.rfile.read(size)
                    self.rfile.readline()
                    if self.path.endswith("?first-chunk"):
                        self.server.first_chunk.set()

            def stream(self):
                path, _, query = self.path.partition("?")
                if path == "/upload":
                    if query == "hints":  # an interim answer before it reads the body
                        self.wfile.write(b"HTTP/1.1 103 Early Hints\r\n"
                                         b"Link: </a.css>; rel=preload\r\n\r\n")
                        self.wfile.flush()
                    if query == "hints-split":  # the same, in two pieces a moment apart
                        self.wfile.write(b"HTTP/1.1 10")
                        self.wfile.flush()
                        time.sleep(0.05)
                        self.wfile.write(b"3 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
                        self.wfile.flush()
                    body, chunked = self.read_body()
                    out = json.dumps({"length": len(body), "chunked": chunked,
                                      "sha256": hashlib.sha256(body).hexdigest()}).encode()
                    if query == "te":  # the Transfer-Encoding it came with, instead
                        out = json.dumps({"te": self.headers.get("Transfer-Encoding"),
                                          "length": len(body)}).encode()
                    if query == "chunks":  # how many chunks it came in
                        out = json.dumps({"chunks": self.chunks, "length": len(body),
                                          "sha256": hashlib.sha256(body).hexdigest()}).encode()
                    if query.startswith("answer="):  # a long answer to the upload
                        out = pattern(int(query.split("=")[1]))
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                elif path == "/big":
                    n = int(query.split("=")[1])
                    self.send_response(200)
                    self.send_header("Content-Length", str(n))
                    self.end_headers()
                    # Made piece by piece: 32 MiB at once take Python long enough, on a busy
                    # machine, to pass the tests' upstream timeouts.
                    step = 1 << 20
                    for i in range(0, n, step):
                        self.wfile.write(pattern(min(step, n - i), at=i))
                elif path == "/chunked":
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"5\r\nhello\r\n")
                    self.wfile.flush()
                    self.server.release.wait(10)
                    self.wfile.write(b"6\r\n world\r\n0\r\n\r\n")
                elif path == "/until-close":
                    self.send_response(200)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(pattern(300_000))
                    self.close_connection = True
                elif path == "/refuse":
                    out = b'{"error":"too_large"}'
                    self.send_response(413)
                    self.send_header("Content-Length", str(len(out)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(out)
                    self.wfile.flush()
                    # Closing with the body unread in the socket resets the connection.
                    self.close_connection = True
                elif path == "/refuse-streamed":  # /refuse, in chunks: a streamed answer
                    self.wfile.write(b"HTTP/1.1 413 Too Large\r\nTransfer-Encoding: chunked\r\n"
                                     b"Connection: close\r\n\r\n"
                                     b"15\r\n{\"error\":\"too_large\"}\r\n0\r\n\r\n")
                    self.wfile.flush()
                    self.close_connection = True
                elif path == "/refuse-open":  # /refuse, then neither reads nor closes
                    out = b'{"error":"too_large"}'
                    self.send_response(413)
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                    self.wfile.flush()
                    time.sleep(8)
                    self.close_connection = True
                elif path == "/extra":  # an answer, and another no request asked for
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                                     b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED")
                elif path == "/late-408":  # an answer; then, idle, a 408 and the end
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    self.wfile.flush()
                    time.sleep(0.2)
                    self.wfile.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                    self.wfile.flush()
                    self.server.late_sent.set()
                    self.close_connection = True
                elif path in ("/as-sent", "/as-sent-latin1"):  # fields as an upstream spells them
                    latin1 = b"X-Name: caf\xe9\r\n" if path.endswith("latin1") else b""
                    self.wfile.write(b"HTTP/1.1 201 Made Here\r\nSet-Cookie: a=1\r\n"
                                     b"X-Spaced:   v  \r\n" + latin1 +
                                     b"Set-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok")
                elif path == "/proxy-close":  # closing, but not at once, and reading nothing
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nProxy-Connection: close\r\n"
                                     b"Content-Length: 2\r\n\r\nhi")
                    self.wfile.flush()
                    time.sleep(0.5)
                    self.close_connection = True
                elif path in ("/named-kept", "/named-kept-latin1"):  # Connection names these
                    latin1 = b"X-Name: caf\xe9\r\n" if path.endswith("latin1") else b""
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: Host, x-forwarded-for, "
                                     b"X-Gone\r\nHost: up\r\nX-Forwarded-For: 9.9.9.9\r\n"
                                     b"X-Gone: 1\r\n" + latin1 +
                                     b"Content-Length: 2\r\n\r\nok")
                elif path == "/in-pieces":  # an answer that comes a few bytes at a time
                    for piece in [b"HTTP/1.1 200 O", b"K\r\nContent-Len", b"gth: 5\r",
                                  b"\n\r\n", b"he", b"llo"]:
                        self.wfile.write(piece)
                        self.wfile.flush()
                        time.sleep(0.05)
                elif path == "/hop":  # hop-by-hop fields, and rate limit headers of its own
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nConnection: X-Internal-Token\r\n"
                                     b"X-Internal-Token: secret\r\nKeep-Alive: timeout=5\r\n"
                                     b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\n"
                                     b"X-RateLimit-Limit: 5000\r\nX-Kept: yes\r\n"
                                     b"Content-Length: 2\r\n\r\nok")
                elif path == "/gzip-chunked":  # a coding Sluice does not decode
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                                     b"3\r\n\x1f\x8b\x08\r\n0\r\n\r\n")
                elif path == "/gzip":  # the same, delimited by the connection's end
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"
                                     b"\x1f\x8b\x08")
                    self.close_connection = True
                elif path == "/tiny-chunks":  # 5,000 chunks of one byte, in one write
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                     + b"1\r\nx\r\n" * 5000 + b"0\r\n\r\n")
                elif path == "/no-reason":  # a code of no known reason, given none
                    self.wfile.write(b"HTTP/1.1 299 \r\nContent-Length: 2\r\n\r\nok")
                elif path == "/no-reason-chunked":
                    self.wfile.write(b"HTTP/1.1 299 \r\nTransfer-Encoding: chunked\r\n\r\n"
                                     b"2\r\nok\r\n0\r\n\r\n")
                elif path == "/long-head":  # a field of N bytes (a long CSP, large cookies)
                    n = int(query.split("=")[1])
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Security-Policy: " +
                                     b"c" * n + b"\r\nContent-Length: 2\r\n\r\nok")
                elif path == "/length-list":  # one length, said twice in one field
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc")
                elif path == "/length-twice":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
                                     b"Content-Length: 3\r\n\r\nabc")
                elif path == "/no-content":  # a length where none may be
                    self.wfile.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                elif path == "/not-modified":
                    self.wfile.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n")
                elif path == "/headers":  # the names of the headers that came
                    out = json.dumps(list(self.headers.keys())).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(out)))
                    self.end_headers()
                    self.wfile.write(out)
                elif path == "/switch":
                    self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                                     b"Connection: Upgrade\r\n\r\n")
                    self.close_connection = True
                elif path in ("/stalls", "/stalls-small"):  # part of a body, then nothing
                    small = path.endswith("small")
                    self.send_response(200)
                    self.send_header("Content-Length", "10" if small else "1000000")
                    self.end_headers()
                    self.wfile.write(b"ok" if small else pattern(100_000))
                    self.wfile.flush()
                    time.sleep(3)
                    self.close_connection = True
                elif path in ("/endless-chunk-line", "/endless-trailers"):
                    # A chunk, then a chunk line (or trailer section) that never ends.
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    self.wfile.write(b"5\r\nhello\r\n")
                    self.wfile.write(b"5;x=" if path == "/endless-chunk-line" else
                                     b"0\r\nX-Trailer: ")
                    deadline = time.time() + 10
                    try:
                        while time.time() < deadline:
                            self.wfile.write(b"a" * 65536)
                    except OSError:
                        pass  # Sluice closed the connection, as it should
                    self.close_connection = True
                elif path == "/dies":
                    self.send_response(200)
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    self.wfile.write(pattern(100_000))
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                else:
                    return False
                return True

            def answer(self):
                with self.server.lock:
                    self.server.hits += 1
                if self.stream():
                    return
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length) if length else b""
                if self.path.startswith("/slow"):
                    time.sleep(2)
                if self.path.startswith("/hold"):
                    # Up to HOLD_SECONDS, or until Sluice closes this connection (counted).
                    deadline = time.time() + HOLD_SECONDS
                    while time.time() < deadline:
                        r, _, _ = select.select([self.connection], [], [], 0.05)
                        if r and self.connection.recv(1, socket.MSG_PEEK) == b"":
                            with self.server.lock:
                                self.server.closed_early += 1
                            return
                out = json.dumps({"path": self.path, "method": self.command,
                                  "body": body.decode(),
                                  "xff": self.headers.get("X-Forwarded-For"),
                                  "host": self.headers.get("Host")}).encode()
                self.send_response(201 if self.path.startswith("/created") else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Upstream", "yes")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        # ValueError: a body broken on purpose (a malformed chunk the client sent, cut off).
        if not isinstance(sys.exc_info()[1], (ConnectionError, BrokenPipeError, ValueError)):
            super().handle_error(request, client_address)  # a client hanging up is expected


CONFIG = """
rate_limits:
  default:
    requests_per_minute: 1000
  endpoints:
    - path: /api/login
      method: POST
      limit: 2
      window: 1m
    - path: /queued
      limit: 4
      window: 1s
      algorithm: leaky_queue
      burst: 3
    - path: /queued-slow
      limit: 2
      window: 1s
      algorithm: leaky_queue
      burst: 3
    - path: /shadow
      limit: 1
      window: 1m
      shadow: true
"""


class GatewayFixture(unittest.TestCase):
    def setUp(self):
        self.upstream = Upstream()
        self.addCleanup(self.upstream.server_close)
        self.addCleanup(self.upstream.shutdown)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(CONFIG)
        self.addCleanup(os.unlink, f.name)
        self.config = f.name

    def wait_for_upstream_hits(self, n):
        """Until the upstream has begun answering n requests in this test."""
        deadline = time.monotonic() + 10
        while self.upstream.hits < n:
            self.assertLess(time.monotonic(), deadline, "the request did not reach the upstream")
            time.sleep(0.01)

    def wait_for_metric(self, s, line, what=None):
        """Until /metrics has `line` (ending in a newline); fails after 10 s."""
        deadline = time.monotonic() + 10
        while line not in s.request("GET", "/metrics", admin=True)[2].decode():
            self.assertLess(time.monotonic(), deadline, what or f"no {line!r} in /metrics")
            time.sleep(0.02)

    def raw_answer(self, s, method, path):
        """The bytes of the answer to one request on a connection of its own."""
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(f"{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                      .encode())
            return self.read_to_close(c)

    def read_answer(self, sock):
        """One answer with a Content-Length, read by its length, or what came before the
        peer closed (or reset) the connection."""
        return self.read_to_close(sock, until_whole=True)

    def read_to_close(self, sock, until_whole=False):
        """All the socket gives until the peer closes (or resets) it; with until_whole,
        only until one answer with a Content-Length is whole."""
        answer = b""
        while True:
            if until_whole:
                head, sep, body = answer.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
                if sep and length and len(body) >= int(length.group(1)):
                    return answer
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                return answer
            if not piece:
                return answer
            answer += piece

    def send_on_new_connection(self, s, data):
        """A new connection to `s` (closed at cleanup) that has sent `data`."""
        c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        self.addCleanup(c.close)
        c.sendall(data)
        return c

    def start(self, upstream_port=None, extra=()):
        port = upstream_port or self.upstream.server_address[1]
        s = server_test.Server(self.config, ["--upstream", f"http://127.0.0.1:{port}", *extra])
        self.addCleanup(s.stop)
        return s


class GatewayTest(GatewayFixture):
    def test_allowed_requests_are_forwarded_with_headers(self):
        s = self.start()
        status, h, body = s.request("POST", "/api/login?x=1", body="user=a&pw=b",
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
        self.assertEqual(status, 200)
        self.assertEqual(h["x-upstream"], "yes")
        self.assertEqual(h["x-ratelimit-limit"], "2")
        self.assertEqual(h["x-ratelimit-remaining"], "1")
        echo = json.loads(body)
        self.assertEqual((echo["path"], echo["method"], echo["body"]), ("/api/login?x=1", "POST", "user=a&pw=b"))
        self.assertEqual(echo["xff"], "127.0.0.1")
        status, _, _ = s.request("GET", "/created/1")
        self.assertEqual(status, 201)

    def test_the_upstream_and_its_timeout_may_come_from_the_config_file(self):
        # No --upstream: the file's server: section makes it a gateway, as the flag would.
        port = self.upstream.server_address[1]
        with open(self.config, "a") as f:
            f.write(f"server:\n  upstream: http://127.0.0.1:{port}/\n"
                    "  upstream_timeout: 300ms\n")
        s = server_test.Server(self.config)
        self.addCleanup(s.stop)
        status, h, body = s.request("GET", "/created/1")
        self.assertEqual((status, h.get("x-upstream")), (201, "yes"), body)
        self.assertIn("x-ratelimit-limit", h)
        started = time.monotonic()  # the upstream holds this one for HOLD_SECONDS
        status, _, body = s.request("GET", "/hold", timeout=HOLD_SECONDS)
        self.assertEqual(status, 504, body)
        self.assertLess(time.monotonic() - started, HOLD_SECONDS / 2, "the file's timeout")

    def test_limited_requests_never_reach_the_upstream(self):
        s = self.start()
        for _ in range(2):
            self.assertEqual(s.request("POST", "/api/login")[0], 200)
        hits = self.upstream.hits
        status, h, body = s.request("POST", "/api/login")
        self.assertEqual(status, 429)
        self.assertEqual(json.loads(body)["error"], "rate_limit_exceeded")
        self.assertEqual(self.upstream.hits, hits)

    def test_a_client_cannot_forge_x_forwarded_for(self):
        s = self.start()
        _, _, body = s.request("GET", "/x", headers={"X-Forwarded-For": "198.51.100.7"})
        self.assertEqual(json.loads(body)["xff"], "127.0.0.1")

    def test_upstream_down_gives_502(self):
        s = self.start(upstream_port=server_test.free_port())
        status, h, body = s.request("GET", "/x")
        self.assertEqual(status, 502)
        self.assertEqual(json.loads(body)["error"], "upstream_unavailable")
        self.assertEqual(s.request("GET", "/healthz", admin=True)[0], 200)
        # Counted and logged: the client's 502 is otherwise the only trace.
        self.assertEqual(s.metric('sluice_upstream_failures_total{kind="connect"}'), 1)
        self.assertEqual(s.metric('sluice_upstream_failures_total{kind="timeout"}'), 0)
        s.stop()
        self.assertIn("WARN upstream connect failed: Connection refused", s.stderr)
        self.assertIn("the client is answered 502", s.stderr)

    def test_a_stop_gives_requests_in_flight_the_drain_timeout(self):
        # --drain-timeout-ms: how long SIGTERM lets requests in flight finish. The upstream
        # takes 2 s: with 4 s it is answered; with 300 ms the process ends within it.
        for i, (drain, answered) in enumerate([("4000", True), ("300", False)]):
            s = self.start(extra=["--drain-timeout-ms", drain])
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            self.addCleanup(c.close)
            c.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
            self.wait_for_upstream_hits(i + 1)
            t0 = time.monotonic()
            s.proc.send_signal(signal.SIGTERM)
            data = self.read_to_close(c)
            self.assertEqual(s.proc.wait(timeout=10), 0)
            took = time.monotonic() - t0
            self.assertEqual(data.startswith(b"HTTP/1.1 200 "), answered, (drain, data[:100]))
            if not answered:
                self.assertLess(took, 1.5, drain)

    def test_a_stop_answers_queued_requests_whose_turn_is_past_the_drain(self):
        # Turns at about 0, 1, 2 and 3 s; SIGTERM with 1.5 s to drain: the first two are
        # forwarded at their turns, the last two answered 503 at once (their connections
        # would otherwise be closed unanswered at the deadline), with Retry-After; so is one
        # queued during the drain with a turn past its deadline.
        with open(self.config, "a") as f:
            f.write("    - {path: /queued-drain, limit: 1, window: 1s, algorithm: leaky_queue,"
                    " burst: 5}\n")
        s = self.start(extra=["--drain-timeout-ms", "1500"])
        head = b"GET /queued-drain HTTP/1.1\r\nHost: x\r\n"
        socks = [self.send_on_new_connection(s, head + b"\r\n") for _ in range(4)]
        self.wait_for_upstream_hits(1)  # the first is through; the others wait their turns
        # A fifth whose head is still coming when the drain starts (its turn at about 4 s).
        late = self.send_on_new_connection(s, head)
        socks.append(late)
        time.sleep(0.2)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late.sendall(b"\r\n")
        answers = []
        for c in socks:
            data = self.read_to_close(c)
            answers.append((data.split(b" ", 2)[1], data, time.monotonic() - t0))
        self.assertEqual(s.proc.wait(timeout=10), 0)
        s.stop()  # reads its output
        self.assertEqual(sorted(a[0] for a in answers), [b"200", b"200", b"503", b"503", b"503"],
                         [a[1][:80] for a in answers])
        for status, data, took in answers:
            if status != b"503":
                continue
            self.assertLess(took, 1.0, data[:200])  # at the drain's start, not its end
            head, _, body = data.partition(b"\r\n\r\n")
            self.assertRegex(head.lower(), rb"\r\nretry-after: [1-9]")
            self.assertEqual(json.loads(body)["error"], "shutting_down")
        self.assertIn("queued requests whose turn comes after the drain deadline are answered "
                      "503", s.stderr)

    def test_a_second_sigterm_ends_the_drain_at_once(self):
        # The upstream holds the request 10 s and the drain allows 20 s: the second signal
        # does not wait. A SIGHUP during the drain is not a stop.
        for i, second in enumerate((signal.SIGTERM, signal.SIGINT)):
            s = self.start(extra=["--drain-timeout-ms", "20000"])
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            self.addCleanup(c.close)
            c.sendall(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
            self.wait_for_upstream_hits(i + 1)
            s.proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
            s.proc.send_signal(signal.SIGHUP)
            time.sleep(0.2)
            self.assertIsNone(s.proc.poll(), "a SIGHUP ended the drain")
            t0 = time.monotonic()
            s.proc.send_signal(second)
            self.assertEqual(s.proc.wait(timeout=10), -second)
            self.assertLess(time.monotonic() - t0, 1.5)

    def test_upstream_timeout_gives_504(self):
        s = self.start(extra=["--upstream-timeout", "300"])
        t0 = time.time()
        status, _, body = s.request("GET", "/slow")
        self.assertEqual(status, 504)
        self.assertEqual(json.loads(body)["error"], "upstream_timeout")
        self.assertLess(time.time() - t0, 1.5)
        status, _, _ = s.request("GET", "/fast")  # the worker is not wedged
        self.assertEqual(status, 200)
        self.assertEqual(s.metric('sluice_upstream_failures_total{kind="timeout"}'), 1)
        self.assertEqual(s.metric('sluice_upstream_failures_total{kind="connect"}'), 0)

    def test_a_trace_with_a_body_is_refused_and_harms_nothing(self):
        # A client must not send content with TRACE (RFC 9110 9.3.8). Forwarded at once or
        # after a queue turn (leaky_queue), such a request gets 400 and the server lives on.
        s = self.start()
        for path in ["/x", "/queued-slow", "/queued-slow"]:
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
                c.sendall(f"TRACE {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
                          .encode())
                answer = self.read_answer(c)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
            self.assertIn(b"a TRACE request has no body", answer)
        self.assertEqual(s.request("GET", "/queued-slow")[0], 200)
        # Without a body it goes up: the 501 is the test upstream's, which has no TRACE.
        self.assertEqual(s.request("TRACE", "/x")[0], 501)
        self.assertEqual(s.proc.poll(), None)

    def test_leaky_queue_delays_instead_of_rejecting(self):
        s = self.start()
        # 8 at once into a bucket of 3 draining one per 250 ms: 3 pass, spaced out in time,
        # and the rest find the bucket full. The connections are opened first and the requests
        # sent back to back from one thread, so that they arrive together however slowly the
        # machine starts threads or connections (8 requests spread over 1.25 s would all pass).
        socks = []
        for _ in range(8):
            c = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            self.addCleanup(c.close)
            socks.append(c)
        t0 = time.monotonic()
        for c in socks:
            c.sendall(b"GET /queued HTTP/1.1\r\nHost: x\r\n\r\n")
        results, heads = [], {c: b"" for c in socks}
        deadline = time.monotonic() + 20
        while heads:
            self.assertLess(time.monotonic(), deadline, "answers missing")
            ready, _, _ = select.select(list(heads), [], [], 1)
            for c in ready:
                data = c.recv(65536)
                self.assertTrue(data, "closed before the status line")
                heads[c] += data
                if b"\r\n" in heads[c]:  # the status line: this answer's time
                    results.append((int(heads.pop(c).split()[1]), time.monotonic() - t0))
        passed = [r[1] for r in results if r[0] == 200]
        self.assertGreaterEqual(len(passed), 3)
        self.assertIn(429, [r[0] for r in results])
        self.assertGreaterEqual(max(passed), 0.4)  # the third waited ~500 ms for its turn

    def test_a_queued_request_whose_client_left_is_not_forwarded(self):
        s = self.start()
        hits = self.upstream.hits
        # Three one after another into the bucket draining one per 500 ms: their turns come
        # at about 0, 500 and 1000 ms. The third client leaves before its turn (a whole second
        # ahead: a loaded machine may take a while between the sends and the close).
        # Each is decided before the next is sent, so that they take their turns in order
        # (another worker could decide a later one first): the first is answered, the
        # second is counted as delayed.
        clients = []
        for i in range(3):
            c = self.send_on_new_connection(s, b"GET /queued-slow HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(c)
            if i == 0:
                self.assertTrue(c.recv(65536).startswith(b"HTTP/1.1 200"))
            if i == 1:
                self.wait_for_metric(s, 'sluice_decisions_total{rule="/queued-slow",'
                                        'outcome="delayed"} 1\n')
        clients[2].close()
        self.assertTrue(clients[1].recv(65536).startswith(b"HTTP/1.1 200"))
        self.wait_for_metric(s, "sluice_queue_abandoned_total 1\n",
                             "the abandoned request was not counted")
        self.assertEqual(self.upstream.hits - hits, 2)
        # A client that stays is served in its turn, as before.
        self.assertEqual(s.request("GET", "/queued-slow")[0], 200)
        self.assertEqual(self.upstream.hits - hits, 3)

    def test_a_queued_upload_whose_client_left_is_not_forwarded(self):
        # As above, with a body over 64 KiB (streamed, so unread while it waits): its
        # unread bytes must not hide that the client left, whole body sent or half of it.
        s = self.start()
        hits = self.upstream.hits
        first = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        self.addCleanup(first.close)
        # The first takes the turn at once; it is answered before the uploads are sent, so
        # that they come after it (another worker could decide an upload first).
        first.sendall(b"GET /queued-slow HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(first.recv(65536).startswith(b"HTTP/1.1 200"))
        for sent in (100_000, 50_000):
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
                c.sendall(b"POST /queued-slow HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 100000\r\n\r\n" + pattern(sent))
            time.sleep(0.01)
        self.wait_for_metric(s, "sluice_queue_abandoned_total 2\n",
                             "the abandoned uploads were not counted")
        self.assertEqual(self.upstream.hits - hits, 1)

    def test_out_of_file_descriptors_is_not_blamed_on_the_upstream(self):
        # Each request to /slow holds an upstream connection: past the open files limit,
        # a connect fails for want of a socket, and the 502 and the log say that.
        port = self.upstream.server_address[1]
        proc, sluice_port, _, log = server_test.start_with_open_files(
            self, 48, 48, ["--config", self.config, "--upstream", f"http://127.0.0.1:{port}"])
        login = b"POST /api/login HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        with socket.create_connection(("127.0.0.1", sluice_port), timeout=10) as c:
            for _ in range(2):  # the login limit spent: Sluice answers the next ones itself
                c.sendall(login)
                self.assertTrue(self.read_answer(c).startswith(b"HTTP/1.1 200 "))
        # 24 clients held (each accepted: its 429 came), then a request each that needs an
        # upstream connection: more than the descriptors left.
        clients = []
        for _ in range(24):
            c = socket.create_connection(("127.0.0.1", sluice_port), timeout=10)
            self.addCleanup(c.close)
            c.sendall(login)
            self.assertTrue(self.read_answer(c).startswith(b"HTTP/1.1 429 "))
            clients.append(c)
        for c in clients:
            c.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [self.read_answer(c) for c in clients]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 502 ")]
        self.assertTrue(refused, answers)
        for a in refused:
            self.assertIn(b"upstream connect failed: Too many open files", a)
        self.assertNotIn("Operation canceled", server_test.read_log(log))

    def test_shadow_mode_counts_but_never_rejects(self):
        s = self.start()
        for _ in range(3):
            self.assertEqual(s.request("GET", "/shadow")[0], 200)
        metrics = s.request("GET", "/metrics", admin=True)[2].decode()
        self.assertIn('sluice_decisions_total{rule="/shadow",outcome="shadow_limited"} 2',
                      metrics)

    def test_trace_with_a_body_is_refused_not_fatal(self):
        s = self.start()
        status, _, body = s.request("TRACE", "/x", body="boom")
        self.assertEqual(status, 400)
        self.assertEqual(s.request("GET", "/x")[0], 200)  # still serving

    def test_the_upstreams_date_is_kept_and_not_doubled(self):
        s = self.start()
        raw = self.raw_answer(s, "GET", "/x")  # the test upstream sends its own Date
        head = raw.partition(b"\r\n\r\n")[0].lower()
        self.assertEqual(head.count(b"\r\ndate: "), 1, head)

    def test_head_requests(self):
        s = self.start()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        conn.request("HEAD", "/h")
        r = conn.getresponse()
        self.assertEqual(r.status, 200)
        self.assertEqual(r.getheader("Content-Length"), "64")  # what the upstream's GET has
        self.assertEqual(r.read(), b"")
        conn.request("GET", "/after-head")  # the connection is still in step
        self.assertEqual(json.loads(conn.getresponse().read())["path"], "/after-head")
        conn.close()
        plain = server_test.Server(self.config)  # no upstream: Sluice answers HEAD itself
        self.addCleanup(plain.stop)
        conn = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=5)
        conn.request("HEAD", "/h")
        r = conn.getresponse()
        self.assertEqual((r.status, r.read()), (200, b""))
        self.assertEqual(r.getheader("Content-Length"), str(len(b'{"allowed":true}')))
        conn.request("GET", "/h2")
        self.assertEqual(conn.getresponse().read(), b'{"allowed":true}')
        conn.close()

    def test_expect_100_continue_does_not_shift_answers(self):
        s = self.start()
        sock = socket.create_connection(("127.0.0.1", s.port))
        self.addCleanup(sock.close)
        body = b"x" * 2000
        sock.sendall(b"POST /e1 HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 2000\r\n\r\n" + body +
                     b"GET /e2 HTTP/1.1\r\nHost: a\r\n\r\n")
        sock.settimeout(5)
        data = b""
        while data.count(b'"path"') < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        # Sluice's own interim answer, which the client asked for, and only that one: the
        # upstream's is not relayed as if it were an answer.
        self.assertTrue(data.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"), data[:80])
        self.assertEqual(data.count(b"100 Continue"), 1)
        paths = [json.loads(line)["path"] for line in re.findall(rb'\{"path".*?\}', data)]
        self.assertEqual(paths, ["/e1", "/e2"])

    def test_x_forwarded_for_from_an_untrusted_peer_is_replaced(self):
        with open(self.config, "a") as f:
            f.write("trusted_proxies: [10.0.0.0/8]\n")  # loopback is not a trusted proxy
        s = self.start()
        _, _, body = s.request("GET", "/x", headers={"X-Forwarded-For": "198.51.100.7"})
        self.assertEqual(json.loads(body)["xff"], "127.0.0.1")

    def test_every_x_forwarded_for_line_of_a_trusted_proxy_is_passed_on(self):
        with open(self.config, "a") as f:
            f.write("trusted_proxies: [127.0.0.1/32]\n")
        s = self.start()
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.1.1.1\r\n"
                      b"X-Forwarded-For: 203.0.113.9\r\nConnection: close\r\n\r\n")
            data = self.read_to_close(c)
        echo = json.loads(data.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(echo["xff"], "1.1.1.1, 203.0.113.9, 127.0.0.1")
        # Empty entries name no client: an upstream reading the leftmost would find none.
        for sent, passed in [(b"", "127.0.0.1"), (b"1.2.3.4,,, ", "1.2.3.4, 127.0.0.1"),
                             (b" , 5.6.7.8", "5.6.7.8, 127.0.0.1")]:
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: " + sent +
                          b"\r\nConnection: close\r\n\r\n")
                data = self.read_to_close(c)
            self.assertEqual(json.loads(data.split(b"\r\n\r\n", 1)[1])["xff"], passed, sent)

    def test_behind_a_proxy_that_writes_forwarded_the_upstream_is_told_that_address(self):
        with open(self.config, "a") as f:
            f.write("trusted_proxies: [127.0.0.1/32]\nforwarding_header: forwarded\n")
        s = self.start()
        _, _, body = s.request("GET", "/x", headers={"Forwarded": "for=198.51.100.7",
                                                     "X-Forwarded-For": "1.1.1.1"})
        self.assertEqual(json.loads(body)["xff"], "198.51.100.7, 127.0.0.1")

    def test_hop_by_hop_fields_stop_here_both_ways(self):
        s = self.start()
        _, _, body = s.request("GET", "/headers", headers={
            "Connection": "keep-alive, X-Secret", "X-Secret": "1", "X-Other": "2"})
        names = [n.lower() for n in json.loads(body)]
        self.assertNotIn("x-secret", names)
        self.assertIn("x-other", names)
        # Sluice's own X-Forwarded-For stays, whatever the client's Connection names.
        _, _, body = s.request("GET", "/x", headers={"Connection": "X-Forwarded-For"})
        self.assertEqual(json.loads(body)["xff"], "127.0.0.1")
        status, h, body = s.request("GET", "/hop")
        self.assertEqual((status, body, h.get("x-kept")), (200, b"ok", "yes"))
        for name in ["x-internal-token", "keep-alive", "proxy-connection", "upgrade"]:
            self.assertNotIn(name, h)
        # Sluice's rate limit headers, not the upstream's of the same name: one of each.
        self.assertEqual(h["x-ratelimit-limit"], "1000")
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        conn.request("GET", "/hop")
        r = conn.getresponse()
        r.read()
        conn.close()
        self.assertEqual([v for k, v in r.getheaders() if k.lower() == "x-ratelimit-limit"],
                         ["1000"])

    def test_an_upstream_head_of_tens_of_kib_is_relayed(self):
        # A long Content-Security-Policy or large cookies: up to 64 KiB of head (Envoy's own
        # default bound is 60 KiB); past it, a 502 that says why.
        s = self.start()
        for n in (8_200, 40_000):
            head, _, body = self.raw_answer(s, "GET", f"/long-head?n={n}").partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head[:100])
            self.assertIn(b"\r\nContent-Security-Policy: " + b"c" * n + b"\r\n", head)
            self.assertEqual(body, b"ok")
        status, _, body = s.request("GET", "/long-head?n=70000")
        self.assertEqual(status, 502)
        self.assertIn("header limit exceeded", json.loads(body)["message"])
        self.assertEqual(s.request("GET", "/long-head?n=100")[0], 200)

    def test_an_upstreams_answer_reaches_the_client_as_it_came(self):
        # Plain answers are relayed from the upstream's bytes, others through Beast's parser
        # (a field outside ASCII): the client reads the same either way.
        s = self.start()
        for path in ["/as-sent", "/as-sent-latin1", "/in-pieces"]:
            head, _, body = self.raw_answer(s, "GET", path).partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            fields = [tuple(part.strip() for part in line.split(b":", 1)) for line in lines[1:]]
            lengths = [v for k, v in fields if k.lower() == b"content-length"]
            if path == "/in-pieces":
                self.assertEqual((lines[0], lengths, body), (b"HTTP/1.1 200 OK", [b"5"], b"hello"))
                continue
            self.assertEqual(lines[0], b"HTTP/1.1 201 Made Here", path)
            self.assertEqual([v for k, v in fields if k.lower() == b"set-cookie"],
                             [b"a=1", b"b=2"], path)
            self.assertEqual([v for k, v in fields if k.lower() == b"x-spaced"], [b"v"], path)
            self.assertEqual([v for k, v in fields if k.lower() == b"x-ratelimit-limit"],
                             [b"1000"], path)
            self.assertEqual((lengths, body), ([b"2"], b"ok"), path)
            if path.endswith("latin1"):
                self.assertIn((b"X-Name", b"caf\xe9"), fields)

    def test_an_upstream_closing_through_proxy_connection_is_not_reused(self):
        # Proxy-Connection: close is read as Connection: close: the next request, one that
        # cannot be sent twice, goes on a fresh connection instead of the closing one.
        s = self.start(extra=("--threads", "1"))  # one worker: one pool for every request
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(b"GET /proxy-close HTTP/1.1\r\nHost: a\r\n\r\n")
            answer = self.read_to_close(c, until_whole=True)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])
            c.sendall(b"POST /after HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                      b"Connection: close\r\n\r\nx")
            answer = self.read_to_close(c)
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), answer[:300])
        self.assertEqual(json.loads(body)["path"], "/after")

    def test_fields_an_upstreams_connection_names_are_dropped_alike_on_both_paths(self):
        # A plain answer and one Beast reads (a field outside ASCII) lose the same fields:
        # the ones Connection names, except those that frame a message or name its host.
        s = self.start()
        for path in ["/named-kept", "/named-kept-latin1"]:
            status, h, body = s.request("GET", path)
            self.assertEqual((status, body), (200, b"ok"), path)
            self.assertEqual((h.get("host"), h.get("x-forwarded-for")), ("up", "9.9.9.9"), path)
            self.assertNotIn("x-gone", h, path)

    def test_no_length_is_made_up_for_answers_without_a_body(self):
        s = self.start()
        for method, path, status, length in [("GET", "/no-content", 204, None),
                                             ("GET", "/not-modified", 304, "1234"),
                                             ("HEAD", "/head-chunked", 200, None)]:
            head, _, rest = self.raw_answer(s, method, path).partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 %d " % status), head)
            lengths = re.findall(rb"(?im)^content-length: *(\d+)", head)
            self.assertEqual(lengths, [length.encode()] if length else [], head)
            self.assertEqual(rest, b"")

    def test_answers_framed_so_they_cannot_be_relayed_are_502(self):
        # A coding Sluice does not decode would reach the client as the body itself (Sluice
        # frames bodies in chunks of its own); a repeated length might be read either way.
        # nginx answers both 502.
        s = self.start()
        for path, why in [("/gzip-chunked", b"a transfer coding other than chunked"),
                          ("/gzip", b"a transfer coding other than chunked"),
                          ("/length-list", b"a repeated Content-Length"),
                          ("/length-twice", b"a repeated Content-Length")]:
            answer = self.raw_answer(s, "GET", path)
            self.assertTrue(answer.startswith(b"HTTP/1.1 502 "), (path, answer[:200]))
            self.assertIn(why, answer, path)
            self.assertNotIn(b"\x1f\x8b", answer, path)
        self.assertEqual(s.metric('sluice_upstream_failures_total{kind="bad_answer"}'), 4)

    def test_tiny_chunks_are_relayed_in_pieces_not_one_by_one(self):
        # Relayed a chunk at a time, a body of 1-byte chunks cost a system call and a loop
        # turn per byte each way: 10,000 sends for 60 KB that came in a few reads.
        s = self.start()
        body = b"".join(b"%x\r\n%s\r\n" % (1, bytes([65 + i % 26])) for i in range(10000))
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            c.sendall(b"POST /upload?chunks HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                      b"Connection: close\r\n\r\n" + body + b"0\r\n\r\n")
            answer = self.read_to_close(c)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        got = json.loads(answer.partition(b"\r\n\r\n")[2])
        sent = bytes(65 + i % 26 for i in range(10000))
        self.assertEqual((got["length"], got["sha256"]),
                         (10000, hashlib.sha256(sent).hexdigest()))
        self.assertLess(got["chunks"], 100, got)
        # The other way: an upstream's 5,000 1-byte chunks reach the client in a few.
        answer = self.raw_answer(s, "GET", "/tiny-chunks")
        head, _, rest = answer.partition(b"\r\n\r\n")
        self.assertIn(b"transfer-encoding: chunked", head.lower())
        sizes, data = [], b""
        while True:
            line, _, rest = rest.partition(b"\r\n")
            size = int(line, 16)
            if size == 0:
                break
            sizes.append(size)
            data, rest = data + rest[:size], rest[size + 2:]
        self.assertEqual(data, b"x" * 5000)
        self.assertLess(len(sizes), 100, len(sizes))

    def test_an_empty_reason_is_relayed_empty(self):
        s = self.start()
        for path in ("/no-reason", "/no-reason-chunked"):  # the plain reader, and Beast's
            answer = self.raw_answer(s, "GET", path)
            self.assertTrue(answer.startswith(b"HTTP/1.1 299 \r\n"), (path, answer[:40]))

    def test_no_transfer_encoding_to_an_http_1_0_client(self):
        s = self.start()
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"HEAD /head-chunked HTTP/1.0\r\n\r\n")
            head = self.read_to_close(c)
        self.assertTrue(head.startswith(b"HTTP/1.0 200 "), head)
        self.assertNotIn(b"transfer-encoding", head.lower())
        self.assertIn(b"x-ratelimit-limit", head.lower())

    def test_a_repeated_request_length_is_400_and_not_forwarded(self):
        s = self.start()
        hits = self.upstream.hits
        for lengths in [b"Content-Length: 70000\r\nContent-Length: 70000\r\n",
                        b"Content-Length: 5, 5\r\n", b"Content-Length: 3\r\nContent-Length: 3\r\n"]:
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\n" + lengths + b"\r\nabc")
                answer = self.read_to_close(c)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), (lengths, answer[:200]))
            self.assertIn(b"Content-Length must be one number", answer)
        self.assertEqual(self.upstream.hits, hits)

    def test_one_host_header_or_400(self):
        s = self.start()
        hits = self.upstream.hits
        for head in [b"GET /x HTTP/1.1\r\n", b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n"]:
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(head + b"\r\n")
                self.assertTrue(c.recv(65536).startswith(b"HTTP/1.1 400 "), head)
        self.assertEqual(self.upstream.hits, hits)
        # HTTP/1.0 needs none; the upstream, spoken to in HTTP/1.1, is given one.
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"GET /x HTTP/1.0\r\n\r\n")
            data = self.read_to_close(c)
        self.assertTrue(data.startswith(b"HTTP/1.0 200 "), data[:100])
        self.assertEqual(json.loads(data.split(b"\r\n\r\n", 1)[1])["host"],
                         f"127.0.0.1:{self.upstream.server_address[1]}")

    def test_an_absolute_form_target_goes_up_in_origin_form_with_its_host(self):
        s = self.start()
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"GET http://Example.com:81?q=1 HTTP/1.1\r\nHost: other\r\n"
                      b"Connection: close\r\n\r\n")
            data = self.read_to_close(c)
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data[:100])
        echo = json.loads(data.split(b"\r\n\r\n", 1)[1])
        self.assertEqual((echo["path"], echo["host"]), ("/?q=1", "Example.com:81"))
        # HTTP/1.1 requires a Host line in this form too (RFC 9112 3.2); 1.0 does not.
        for version, status in [(b"1.1", b"400"), (b"1.0", b"200")]:
            with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
                c.sendall(b"GET http://evil/a HTTP/" + version + b"\r\nConnection: close\r\n\r\n")
                data = self.read_to_close(c)
            self.assertEqual(data.split(b" ", 2)[1], status, (version, data[:200]))

    def test_an_upstreams_unasked_bytes_never_answer_another_request(self):
        # Bytes past an answer, or sent while the connection idles, must not be read as the
        # next request's answer (response queue poisoning): that connection is not reused.
        s = self.start(extra=("--threads", "1"))  # one worker: one pool for every request
        for path, late in [("/extra", False), ("/late-408", True)]:
            self.assertEqual(s.request("GET", path)[::2], (200, b"ok"), path)
            # The next request must come once the unasked 408 is there to be seen on the
            # idle connection; sent before it, the 408 would be an answer like any other.
            if late:
                self.assertTrue(self.upstream.late_sent.wait(10), "the upstream's 408 not sent")
            for i in range(3):
                status, _, body = s.request("GET", f"/after?{i}")
                self.assertEqual(status, 200, body)
                self.assertEqual(json.loads(body)["path"], f"/after?{i}", path)
        self.assertEqual(s.request("HEAD", "/head-body")[0], 200)
        status, _, body = s.request("GET", "/after-head")
        self.assertEqual((status, json.loads(body)["path"]), (200, "/after-head"))
        status, _, body = s.request("GET", "/switch")
        self.assertEqual(status, 502)
        self.assertIn(b"upstream switched protocols (101), which Sluice does not relay", body)
        self.assertEqual(json.loads(s.request("GET", "/last")[2])["path"], "/last")

    def test_header_names_with_underscores_do_not_reach_the_upstream(self):
        # As nginx: a CGI or WSGI upstream reads X_User_Id as X-User-Id.
        s = self.start()
        status, _, body = s.request("GET", "/headers", headers={"X_User_Id": "victim",
                                                                 "X-User-Id": "7", "X-Ok": "1"})
        self.assertEqual(status, 200)
        names = [n.lower() for n in json.loads(body)]
        self.assertIn("x-user-id", names)
        self.assertIn("x-ok", names)
        self.assertNotIn("x_user_id", names)

    def test_keep_alive_connections_are_reused(self):
        s = self.start()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=5)
        for i in range(20):
            conn.request("GET", f"/k/{i}")
            r = conn.getresponse()
            self.assertEqual(json.loads(r.read())["path"], f"/k/{i}")
        conn.close()


    @staticmethod
    def sockets_in_close_wait(pid, port):
        """How many of process pid's TCP sockets to `port` the peer closed (CLOSE_WAIT)."""
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        count = 0
        with open("/proc/net/tcp") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                remote_port = int(fields[2].split(":")[1], 16)
                if remote_port == port and fields[3] == "08" and fields[9] in inodes:
                    count += 1
        return count

    def test_pooled_connections_the_upstream_closes_while_idle_are_closed_too(self):
        # An upstream whose keep-alive timeout is 0.3 s, as Node's is 5 s.
        up = socket.socket()
        self.addCleanup(up.close)
        up.bind(("127.0.0.1", 0))
        up.listen(16)
        port = up.getsockname()[1]

        def serve_one(conn):
            with conn:
                conn.settimeout(0.3)
                data = b""
                while True:
                    try:
                        piece = conn.recv(65536)
                    except (socket.timeout, OSError):
                        return
                    if not piece:
                        return
                    data += piece
                    while b"\r\n\r\n" in data:
                        _, _, data = data.partition(b"\r\n\r\n")
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        def serve():
            while True:
                try:
                    conn, _ = up.accept()
                except OSError:
                    return
                threading.Thread(target=serve_one, args=(conn,), daemon=True).start()
        threading.Thread(target=serve, daemon=True).start()
        s = server_test.Server(self.config, ["--upstream", f"http://127.0.0.1:{port}"])
        self.addCleanup(s.stop)
        # Requests in flight together, so the pool holds several connections.
        clients = [socket.create_connection(("127.0.0.1", s.port), timeout=5) for _ in range(6)]
        for c in clients:
            c.sendall(b"GET /idle HTTP/1.1\r\nHost: a\r\n\r\n")
        for c in clients:
            self.assertTrue(self.read_answer(c).startswith(b"HTTP/1.1 200 "))
            c.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if self.sockets_in_close_wait(s.proc.pid, port) == 0:
                break
        self.assertEqual(self.sockets_in_close_wait(s.proc.pid, port), 0,
                         "idle connections the upstream closed are still held")
        # And the next request goes up on a fresh connection.
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
            self.assertTrue(self.read_answer(c).startswith(b"HTTP/1.1 200 "))
        self.assertEqual(s.stop(), 0, s.stderr[-3000:])


class StreamingTest(GatewayFixture):
    """Response bodies that are large, chunked or delimited by the connection's end, and
    request bodies over 64 KiB or chunked, are relayed as they arrive, not held whole."""

    def test_a_large_upload_streams_to_the_upstream(self):
        s = self.start()
        s.request("GET", "/warm")
        before = self.peak_kib(s)
        n = 120 << 20  # far beyond the 1 MiB bound on bodies read whole
        body = pattern(n)
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/upload", body=body)
        r = conn.getresponse()
        got = json.loads(r.read())
        self.assertEqual((r.status, r.getheader("X-RateLimit-Limit")), (200, "1000"))
        self.assertEqual(got, {"length": n, "chunked": False,
                               "sha256": hashlib.sha256(body).hexdigest()})
        conn.request("GET", "/after-upload")  # the client's connection goes on
        self.assertEqual(json.loads(conn.getresponse().read())["path"], "/after-upload")
        conn.close()
        self.assert_held_little(s, before, "120 MiB uploaded")

    def test_a_chunked_upload_goes_up_chunked(self):
        s = self.start()
        pieces = [pattern(100_000 + i) for i in range(20)]
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", "/upload", body=iter(pieces), encode_chunked=True)
        r = conn.getresponse()
        got = json.loads(r.read())
        whole = b"".join(pieces)
        self.assertEqual((r.status, got), (200, {"length": len(whole), "chunked": True,
                                                 "sha256": hashlib.sha256(whole).hexdigest()}))
        conn.close()

    def exchange_with_expect(self, s, path, length):
        """Sends a head with Expect: 100-continue and waits; returns (what came back at
        once, the socket)."""
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        return data, sock

    def test_a_refused_upload_is_never_sent(self):
        s = self.start()
        for _ in range(2):  # /api/login allows 2 POSTs a minute
            self.assertEqual(s.request("POST", "/api/login", body="x")[0], 200)
        hits = self.upstream.hits
        for size in (10 << 20, 1000):  # streamed or not, the answer comes before the body
            data, sock = self.exchange_with_expect(s, "/api/login", size)
            self.assertTrue(data.startswith(b"HTTP/1.1 429 "), data)
            self.assertIn(b"Connection: close", data)
            self.assertNotIn(b"100 Continue", data)
        self.assertEqual(self.upstream.hits, hits)
        # An allowed one is told to go on, and its body reaches the upstream.
        data, sock = self.exchange_with_expect(s, "/upload", 1000)
        self.assertEqual(data, b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(pattern(1000))
        answer = b""
        while not answer.endswith(b"}"):
            piece = sock.recv(65536)
            self.assertTrue(piece, answer)
            answer += piece
        self.assertEqual(json.loads(answer.split(b"\r\n\r\n", 1)[1])["length"], 1000)
        body = pattern(200_000)
        data, sock = self.exchange_with_expect(s, "/upload", len(body))
        self.assertEqual(data, b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answer = b""
        while not answer.endswith(b"}"):
            piece = sock.recv(65536)
            self.assertTrue(piece, answer)
            answer += piece
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertEqual(json.loads(answer.split(b"\r\n\r\n", 1)[1])["length"], len(body))

    def test_an_upload_cut_short_gets_400(self):
        s = self.start()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=20)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" +
                     pattern(300_000))
        sock.shutdown(socket.SHUT_WR)  # the client gives up half way
        answer = self.read_to_close(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
        self.assertIn(b"the request body did not arrive whole", answer)
        status, _, _ = s.request("GET", "/still-serving")
        self.assertEqual(status, 200)

    def test_a_malformed_chunk_in_a_streamed_upload_is_named(self):
        # The body did arrive; what was wrong with it is what the client is told, in the
        # words a body read whole gets.
        s = self.start()
        for chunk in (b"-5\r\nhello\r\n", b"5 \r\nhello\r\n", b"5\r\nhello!!\r\n",
                      b"FFFFFFFFFFFFFFFFF\r\nhello\r\n"):
            with self.subTest(chunk=chunk):
                answer = self.exchange_to_close(
                    s, b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunk + b"0\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
                self.assertIn(b'"message":"malformed HTTP request: bad chunk', answer)

    def test_a_chunk_line_ended_by_a_bare_lf_in_a_streamed_upload_is_refused_at_once(self):
        # Beast's parser passes over a lone LF looking for CRLF: the upload was held,
        # unanswered, until the read deadline.
        s = self.start()
        for framing in (b"5\nhello\n0\n\n", b"5\r\nhello\r\n0\nX-T: 1\n\n",
                        b"5\r\nhello\r\n0\r\nX-T: 1\n\r\n"):
            with self.subTest(framing=framing):
                answer = self.exchange_to_close(
                    s, b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + framing)
                self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
                self.assertIn(b'"message":"malformed HTTP request: a line must end with CRLF"',
                              answer)

    def test_a_transfer_encoding_other_than_chunked_is_refused_and_the_connection_closed(self):
        # Framed any other way, the bytes after the head would be a request to Sluice and a
        # body to an upstream that honours the coding, or the reverse: a smuggled request.
        s = self.start()
        cases = [(b"xchunked", 400, b"Transfer-Encoding must end with chunked"),
                 (b"chunked, identity", 400, b"Transfer-Encoding must end with chunked"),
                 (b"chunked, chunked", 400, b"Transfer-Encoding names chunked more than once"),
                 (b"gzip, chunked", 501, b"no transfer coding but chunked is supported"),
                 (b"gzip\r\nTransfer-Encoding: chunked", 501,
                  b"no transfer coding but chunked is supported")]
        for coding, status, message in cases:
            with self.subTest(coding=coding):
                answer = self.exchange_to_close(
                    s, b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + coding +
                    b"\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
                self.assertTrue(answer.startswith(b"HTTP/1.1 %d " % status), answer[:200])
                self.assertIn(message, answer)
                self.assertEqual(answer.count(b"HTTP/1.1 "), 1, answer)
        self.assertEqual(self.upstream.hits, 0)
        # A chunked body from an HTTP/1.0 client goes up, and its connection ends after the
        # answer, whatever it asked; the upstream reads Sluice's framing, named as Sluice
        # frames it, whatever the client's spelling.
        for version, head in [(b"HTTP/1.0", b"Connection: keep-alive\r\nTransfer-Encoding: chunked"),
                              (b"HTTP/1.1", b"Connection: close\r\nTransfer-Encoding: CHUNKED")]:
            answer = self.exchange_to_close(s, b"POST /upload?te " + version + b"\r\nHost: a\r\n" +
                                           head + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            self.assertTrue(answer.startswith(version + b" 200 "), answer[:200])
            self.assertIn(b'{"te": "chunked", "length": 5}', answer)
        self.assertEqual(self.upstream.hits, 2)

    def exchange_to_close(self, s, data):
        """Sends `data` on a new connection; all the answer until Sluice closes it."""
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=20)
        self.addCleanup(sock.close)
        sock.sendall(data)
        return self.read_to_close(sock)

    def test_an_upstreams_early_answer_reaches_the_uploader(self):
        s = self.start()
        for length in (20 << 20, 600_000):  # streamed, and read whole before forwarding
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=20)
            self.addCleanup(sock.close)
            sock.sendall(f"POST /refuse HTTP/1.1\r\nHost: a\r\n"
                         f"Content-Length: {length}\r\n\r\n".encode())
            try:  # Sluice stops reading once the upstream has answered
                sock.sendall(pattern(length))
            except (BrokenPipeError, ConnectionResetError):
                pass
            # The whole answer, by its length: when the upstream answers only after Sluice
            # has forwarded the whole body (a slow upstream, a loaded machine), the request
            # was read whole and the connection may stay open for the next one.
            answer = self.read_answer(sock)
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:300])
            self.assertIn(b"X-RateLimit-Limit: 1000", answer)
            self.assertTrue(answer.endswith(b'{"error":"too_large"}'), answer[-300:])
        self.assertEqual(s.request("GET", "/still-serving")[0], 200)

    def test_an_early_answer_from_an_upstream_that_stops_reading_is_relayed(self):
        # The upstream answers 413 to the head and then neither reads nor closes (RFC 9112
        # says it should do one or the other): its answer, not a 504 at the timeout.
        s = self.start(extra=["--upstream-timeout", "6000"])
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=20)
        self.addCleanup(sock.close)
        length = 20 << 20
        sock.sendall(f"POST /refuse-open HTTP/1.1\r\nHost: a\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode())
        t0 = time.monotonic()
        sender = threading.Thread(target=self.send_ignoring_errors, args=(sock, pattern(length)),
                                  daemon=True)
        sender.start()
        answer = self.read_answer(sock)
        self.assertLess(time.monotonic() - t0, 4)
        self.assert_upstreams_413(answer)
        self.assertEqual(s.request("GET", "/still-serving")[0], 200)

    def test_an_early_answer_reaches_an_uploader_that_paused(self):
        # The upstream answers 413 to the head while the client, having sent part of its
        # body, pauses: the answer goes to the client then, not when (if ever) it sends on.
        s = self.start()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
        self.addCleanup(sock.close)
        sock.sendall(b"POST /refuse HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" +
                     pattern(70_000))
        t0 = time.monotonic()
        answer = self.read_answer(sock)
        self.assertLess(time.monotonic() - t0, 4)
        self.assert_upstreams_413(answer)
        self.assertEqual(s.request("GET", "/still-serving")[0], 200)

    def test_an_interim_answer_during_an_upload_lets_it_go_on(self):
        # A 103 Early Hints (or a 100 Continue sent unasked) is not the upstream's answer:
        # the body goes on whole and the final answer is relayed.
        s = self.start()
        body = pattern(3 << 20)
        for query in ("hints", "hints-split"):
            status, _, answer = s.request("POST", "/upload?" + query, body=body, timeout=20)
            self.assertEqual(status, 200, answer[:300])
            self.assertEqual(json.loads(answer)["sha256"], hashlib.sha256(body).hexdigest())

    def test_a_streamed_early_answer_reaches_an_uploader_still_sending(self):
        # An upstream answers in chunks without reading the upload. A client that sends
        # its whole body before it reads (as most do) gets to send it, Sluice draining it a
        # moment as after any answer given mid-upload, and then reads the answer, not a reset.
        s = self.start()
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=20)
            self.addCleanup(sock.close)
            length = 12 << 20  # more than loopback's buffers hold, less than the drain
            sock.sendall(f"POST /refuse-streamed HTTP/1.1\r\nHost: a\r\n"
                         f"Content-Length: {length}\r\n\r\n".encode() + pattern(length))
            # Read to the last chunk: when the upstream answers only after Sluice forwarded
            # the whole body (a loaded machine), the connection may stay open.
            answer = b""
            while not answer.endswith(b"\r\n0\r\n\r\n"):
                piece = sock.recv(65536)
                if not piece:
                    break
                answer += piece
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:300])
            self.assertTrue(answer.endswith(b'{"error":"too_large"}\r\n0\r\n\r\n'),
                            answer[-300:])

    def assert_upstreams_413(self, answer):
        """The upstream's early 413 (/refuse), whole, as the client got it."""
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer[:300])
        self.assertTrue(answer.endswith(b'{"error":"too_large"}'), answer[-300:])

    @staticmethod
    def send_ignoring_errors(sock, data):
        try:  # Sluice stops reading once the upstream has answered
            sock.sendall(data)
        except OSError:
            pass

    def test_a_client_leaving_both_streams_frees_everything(self):
        s = self.start()
        for _ in range(3):  # an upload streamed up, its long answer streamed down, cut off
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
                sock.sendall(b"POST /upload?answer=50000000 HTTP/1.1\r\nHost: x\r\n"
                             b"Content-Length: 200000\r\n\r\n" + pattern(200_000))
                status, headers = self.read_head(sock)
                self.assertEqual((status, headers["content-length"]),
                                 ("HTTP/1.1 200 OK", "50000000"))
                sock.recv(65536)
        self.assertEqual(s.request("GET", "/fine")[0], 200)
        # A clean exit: under ASan, a session or exchange left holding each other (a
        # reference cycle) would be reported as a leak and fail the exit status.
        self.assertEqual(s.stop(), 0, s.stderr[-3000:])

    def test_a_client_leaving_before_the_answer_frees_the_upstream_connection(self):
        s = self.start()
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n")
            deadline = time.time() + 10
            while self.upstream.hits == 0:  # until the upstream holds the request
                self.assertLess(time.time(), deadline, "the request never reached the upstream")
                time.sleep(0.02)
        deadline = time.time() + HOLD_SECONDS - 2  # before the upstream would answer
        while self.upstream.closed_early == 0 and time.time() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.upstream.closed_early, 1)
        metrics = s.request("GET", "/metrics", admin=True)[2].decode()
        self.assertIn("sluice_upstream_client_gone_total 1\n", metrics)
        # A client that pipelines its next request is not taken for one that left.
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
                      b"GET /fast HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            data = self.read_to_close(c)
        self.assertEqual(data.count(b"HTTP/1.1 200 "), 2, data[:300])
        self.assertEqual(s.request("GET", "/fine")[0], 200)
        self.assertEqual(s.stop(), 0, s.stderr[-3000:])

    def test_the_decision_api_answers_trusted_clients_only(self):
        # The gateway's listener is public: a client that could call the decision API could
        # spend another user's limits by naming them.
        check = json.dumps({"path": "/api/login", "method": "POST", "user_id": "victim"})
        with open(self.config, "a") as f:
            f.write("trusted_proxies: [127.0.0.1/32]\n")
        s = self.start()
        hits = self.upstream.hits
        # A client behind it, named or not: one the proxy calls "unknown" (RFC 7239, Squid's
        # forwarded_for unknown) stands behind it too, though it is keyed as its address.
        for xff in ("198.51.100.7", "unknown", "198.51.100.7, unknown", "_hidden"):
            status, _, body = s.request("POST", "/v1/check", check, {"X-Forwarded-For": xff})
            self.assertEqual((status, json.loads(body)["error"]), (403, "forbidden"), xff)
        status, _, body = s.request("POST", "/v1/check/batch?x", json.dumps({"checks": []}),
                                    {"X-Forwarded-For": "198.51.100.7"})
        self.assertEqual(status, 403)
        self.assertEqual(self.upstream.hits, hits)
        status, _, body = s.request("POST", "/v1/check", check)  # the trusted host itself
        self.assertEqual((status, json.loads(body)["remaining"]), (200, 1))

    def test_the_envoy_json_form_answers_trusted_clients_only_too(self):
        envoy = tempfile.mkdtemp(prefix="sluice-gw-envoy-")
        self.addCleanup(shutil.rmtree, envoy, True)
        with open(os.path.join(envoy, "d.yaml"), "w") as f:
            f.write("domain: d\ndescriptors:\n  - key: user\n"
                    "    rate_limit: {unit: minute, requests_per_unit: 2}\n")
        with open(self.config, "a") as f:
            f.write("decision_api: {trust_loopback: false}\n")
        s = self.start(extra=("--envoy-config", envoy, "--grpc",
                              f"127.0.0.1:{server_test.free_port()}"))
        call = json.dumps({"domain": "d", "descriptors": [{"entries": [
            {"key": "user", "value": "victim"}]}]})
        for _ in range(3):
            status, _, body = s.request("POST", "/v1/envoy/ratelimit", call)
            self.assertEqual((status, json.loads(body)["error"]), (403, "forbidden"))

    def test_an_http10_client_is_not_told_to_continue(self):
        s = self.start()
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"POST /a HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
            data = self.read_to_close(c)
        self.assertTrue(data.startswith(b"HTTP/1.0 200 "), data[:60])
        self.assertEqual(json.loads(data.split(b"\r\n\r\n", 1)[1])["body"], "hello")

    def test_an_ipv6_upstream_is_named_in_brackets(self):
        up = socket.socket(socket.AF_INET6)
        self.addCleanup(up.close)
        up.bind(("::1", 0))
        up.listen(1)
        port = up.getsockname()[1]
        heads = []

        def serve():
            conn, _ = up.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                heads.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        threading.Thread(target=serve, daemon=True).start()
        s = server_test.Server(self.config, ["--upstream", f"http://[::1]:{port}"])
        self.addCleanup(s.stop)
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as c:
            c.sendall(b"GET /v6 HTTP/1.0\r\n\r\n")  # no Host: Sluice names the upstream
            self.assertTrue(c.recv(65536).startswith(b"HTTP/1.0 200 "))
        self.assertIn(b"\r\nHost: [::1]:%d\r\n" % port, heads[0])

    def test_the_decision_api_stays_bounded(self):
        s = self.start()
        status, _, _ = s.request("POST", "/v1/check", body="x" * (2 << 20))
        self.assertEqual(status, 413)

    def read_head(self, sock):
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(1)
            if not data:
                raise AssertionError("connection closed in the head: " + repr(head))
            head += data
        lines = head.decode().split("\r\n")
        return lines[0], {k.lower(): v.strip() for k, _, v in
                          (line.partition(":") for line in lines[1:] if line)}

    def assert_held_little(self, s, before, what):
        """Sluice's peak RSS grew by less than 64 MiB since `before` (KiB): a body of
        hundreds of MiB went through without being held. (ASan keeps freed memory in
        quarantine: a few MiB more there.)"""
        grew = self.peak_kib(s) - before
        print(f"\n  {what}: peak RSS grew by {grew} KiB", file=sys.stderr)
        self.assertLess(grew, 64 << 10, f"{what}: Sluice held the body instead of streaming it")

    def peak_kib(self, s):
        with open(f"/proc/{s.proc.pid}/status") as f:
            return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))

    def test_a_large_body_streams_through_in_bounded_memory(self):
        s = self.start()
        s.request("GET", "/warm")
        before = self.peak_kib(s)
        n = 200 << 20  # beyond any whole-body bound, and far beyond what Sluice may hold
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", f"/big?n={n}")
        r = conn.getresponse()
        self.assertEqual((r.status, r.getheader("Content-Length")), (200, str(n)))
        self.assertEqual(r.getheader("X-RateLimit-Limit"), "1000")
        self.assertIsNone(r.getheader("Transfer-Encoding"))
        expected, got = pattern(n), 0
        while True:
            piece = r.read(1 << 20)
            if not piece:
                break
            self.assertEqual(piece, expected[got:got + len(piece)], f"at byte {got}")
            got += len(piece)
        self.assertEqual(got, n)
        # The connection stays usable, and so does the upstream's.
        conn.request("GET", "/after")
        r = conn.getresponse()
        self.assertEqual(json.loads(r.read())["path"], "/after")
        conn.close()
        self.assert_held_little(s, before, "200 MiB streamed")

    def test_a_chunked_body_reaches_the_client_piece_by_piece(self):
        s = self.start()
        # The upstream holds the rest for 10 s: the first piece must come well before.
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=4)
        conn.request("GET", "/chunked")
        r = conn.getresponse()
        self.assertEqual(r.status, 200)
        self.assertEqual(r.getheader("Transfer-Encoding"), "chunked")
        self.assertEqual(r.getheader("X-RateLimit-Remaining"), "999")
        # The first piece arrives while the upstream still holds back the rest.
        self.assertEqual(r.read(5), b"hello")
        self.upstream.release.set()
        self.assertEqual(r.read(), b" world")
        conn.request("GET", "/next")  # keep-alive after a chunked body
        self.assertEqual(json.loads(conn.getresponse().read())["path"], "/next")
        conn.close()

    def test_an_upload_chunk_reaches_the_upstream_before_the_next(self):
        s = self.start()
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"POST /upload?first-chunk HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            # The client thinks before its next chunk; the first is not held back meanwhile.
            self.assertTrue(self.upstream.first_chunk.wait(4), "the first chunk was held back")
            sock.sendall(b"6\r\n world\r\n0\r\n\r\n")
            status, headers = self.read_head(sock)
            self.assertEqual(status, "HTTP/1.1 200 OK")
            body = b""
            while len(body) < int(headers["content-length"]):
                body += sock.recv(65536)
            self.assertEqual(json.loads(body)["length"], len(b"hello world"))

    def test_a_body_delimited_by_the_upstreams_close(self):
        s = self.start()
        for version in ("1.1", "1.0"):
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
                sock.sendall(f"GET /until-close HTTP/{version}\r\nHost: x\r\n\r\n".encode())
                status, headers = self.read_head(sock)
                self.assertEqual(status, f"HTTP/{version} 200 OK")
                body = b""
                if version == "1.1":  # re-framed as chunks; the connection stays open
                    self.assertEqual(headers.get("transfer-encoding"), "chunked")
                    while not body.endswith(b"0\r\n\r\n"):
                        data = sock.recv(65536)
                        self.assertTrue(data, "closed before the last chunk")
                        body += data
                    decoded, rest = b"", body
                    while True:
                        size, _, rest = rest.partition(b"\r\n")
                        if int(size, 16) == 0:
                            break
                        decoded, rest = decoded + rest[:int(size, 16)], rest[int(size, 16) + 2:]
                    self.assertEqual(decoded, pattern(300_000))
                else:  # an HTTP/1.0 client has no chunks: the body ends with the connection
                    self.assertNotIn("transfer-encoding", headers)
                    while True:
                        data = sock.recv(65536)
                        if not data:
                            break
                        body += data
                    self.assertEqual(body, pattern(300_000))

    def test_an_upstream_dying_mid_body_ends_the_clients_connection(self):
        s = self.start()
        self.assert_cut_short(s, "/dies")
        # Counted and logged: the client's cut connection is otherwise the only trace.
        self.assertEqual(s.metric('sluice_upstream_failures_total{kind="body_cut"}'), 1)
        s.stop()
        self.assertIn("WARN upstream answer cut short after its head: ", s.stderr)
        self.assertIn("the client's connection is closed", s.stderr)

    def test_an_endless_chunk_line_or_trailer_from_the_upstream_is_cut_off(self):
        # As a client's are: past 80 KiB the answer is cut short, not buffered on.
        s = self.start()
        s.request("GET", "/warm")
        before = self.peak_kib(s)
        for i, path in enumerate(["/endless-chunk-line", "/endless-trailers"]):
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
                c.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
                t0 = time.monotonic()
                data = self.read_to_close(c)
                self.assertLess(time.monotonic() - t0, 5, path)
            self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data[:100])
            self.assertIn(b"5\r\nhello\r\n", data)
            self.assertFalse(data.endswith(b"0\r\n\r\n"), "the cut answer looked whole")
            self.assertEqual(s.metric('sluice_upstream_failures_total{kind="body_cut"}'), i + 1)
        self.assertLess(self.peak_kib(s) - before, 16 * 1024)
        status, _, body = s.request("GET", "/fine")
        self.assertEqual((status, json.loads(body)["path"]), (200, "/fine"))
        s.stop()
        self.assertIn("cut short after its head: a chunk line or trailers over 80 KiB", s.stderr)

    def assert_cut_short(self, s, path):
        """`path` announces 1 MB and its upstream stops after 100 kB: the client gets those
        and the end of its connection, and the next request is served. Returns the seconds
        the cut-short answer took."""
        t0 = time.time()
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        self.assertEqual(r.getheader("Content-Length"), "1000000")
        with self.assertRaises(http.client.IncompleteRead) as cm:
            r.read()
        took = time.time() - t0
        self.assertEqual(cm.exception.partial, pattern(100_000))
        conn.close()
        status, _, body = s.request("GET", "/fine")
        self.assertEqual((status, json.loads(body)["path"]), (200, "/fine"))
        return took

    def test_an_upstream_stalling_mid_body_is_timed_out(self):
        # A small body is held until whole: its stall is a 504. A streamed one's head and
        # first bytes are already the client's: its stall ends the connection.
        s = self.start(extra=["--upstream-timeout", "300"])
        t0 = time.time()
        status, _, body = s.request("GET", "/stalls-small")
        self.assertEqual((status, json.loads(body)["error"]), (504, "upstream_timeout"))
        self.assertLess(time.time() - t0, 1.5)
        self.assertLess(self.assert_cut_short(s, "/stalls"), 1.5)

    def test_a_slow_reader_of_a_streamed_body_is_not_timed_out(self):
        # The upstream's deadline runs while Sluice waits on the upstream, not while the
        # client takes its time between pieces.
        s = self.start(extra=["--upstream-timeout", "300"])
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            # More than the sockets between them hold: Sluice waits on the client.
            c.sendall(b"GET /big?n=33554432 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            time.sleep(1.0)
            data = self.read_to_close(c)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head[:100])
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
        self.assertEqual((length, body), (1 << 25, pattern(1 << 25)))

    def test_a_client_leaving_mid_body_frees_the_upstream(self):
        s = self.start()
        s.request("GET", "/warm")
        before = self.peak_kib(s)
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as sock:
            sock.sendall(b"GET /big?n=104857600 HTTP/1.1\r\nHost: x\r\n\r\n")
            self.read_head(sock)
            sock.recv(65536)
        # Sluice goes on serving, and its memory did not take the rest of the body.
        for i in range(3):
            status, _, body = s.request("GET", f"/again/{i}")
            self.assertEqual((status, json.loads(body)["path"]), (200, f"/again/{i}"))
        self.assertLess(self.peak_kib(s) - before, 64 << 10)


if __name__ == "__main__":
    server_test.BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=1)
