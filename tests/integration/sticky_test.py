#!/usr/bin/env python3
"""Sticky routing: the shipped load balancer configs (deploy/nginx/sluice-sticky.conf and
deploy/haproxy/sluice-sticky.cfg, with only addresses and ports substituted) in front of two or
three real sluice nodes with the in-memory store, in gateway mode before a real upstream, on
loopback.

Usage: sticky_test.py path/to/sluice
Each test starts its own nodes and load balancer on free ports and stops them by PID. A load
balancer's tests are skipped when its binary is missing (scripts/deps installs both).
"""
import concurrent.futures
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gateway_test  # noqa: E402  (Upstream)
import server_test  # noqa: E402  (Server, free_port)

DEPLOY = os.path.join(server_test.ROOT, "deploy")
NGINX = "/usr/sbin/nginx"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

LIMIT = 10        # per user per minute
LOGIN_LIMIT = 3   # per address per minute, POST /api/login
# A sliding window log is exact over any 60 s, so a test that crosses a minute boundary sees
# the same counts. Limit names: "default/limit" and "login/limit".
CONFIG = f"""
rate_limits:
  default: {{limit: {LIMIT}, window: 1m, key: user_id, algorithm: sliding_window_log}}
  endpoints:
    - {{name: login, path: /api/login, method: POST, limit: {LOGIN_LIMIT}, window: 1m,
       key: ip, algorithm: sliding_window_log}}
trusted_proxies: [127.0.0.1]
"""


def wait_port(port, proc, log):
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited: " + read(log))
            time.sleep(0.05)
    raise RuntimeError(f"{proc.args[0]} did not open port {port}")


def read(path):
    with open(path) as f:
        return f.read()


def substitute(text, server_pattern, listen_pattern, listen, nodes):
    """The deploy file with its two example server lines replaced by one line per node (each
    `(number, "host:port")`: the address replaces the `addr` group, and the number names the
    server and sets its `id` where the line has them) and its listen line by `listen`. Fails
    if the file no longer has the shape these tests rely on."""
    seen, out = 0, []
    for line in text.splitlines():
        m = re.match(server_pattern, line)
        if not m:
            out.append(line)
            continue
        seen += 1
        if seen > 1:
            continue
        for number, addr in nodes:
            node = line[:m.start("addr")] + addr + line[m.end("addr"):]
            if "name" in m.groupdict():
                node = node[:m.start("name")] + f"sluice{number}" + node[m.end("name"):]
            out.append(re.sub(r"\bid \d+", f"id {number}", node))
    if seen != 2:
        raise AssertionError(f"expected two example servers in the deploy file, found {seen}")
    text, n = re.subn(listen_pattern, listen, "\n".join(out) + "\n", flags=re.M)
    if n != 1:
        raise AssertionError(f"expected one listen line in the deploy file, found {n}")
    return text


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return set(f.read().split())
    except OSError:
        return set()


class Proxy:
    """A load balancer process in a temp dir, started from a deploy file and stopped by PID.
    `nodes` as for substitute(); `tweak`, when given, edits the substituted text (a test's
    own change, such as a shorter timeout or the client address from a header)."""

    def __init__(self, port, nodes, tweak=None):
        self.port = port
        self.tweak = tweak or (lambda text: text)
        self.dir = tempfile.mkdtemp(prefix="sluice-sticky-")
        self.log = os.path.join(self.dir, "error.log")
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(self.write_config(nodes), stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_port(port, self.proc, self.log)

    def reload(self, nodes):
        """Rewrites the config for `nodes` and reloads it; returns once the processes that
        served the old config are gone."""
        old = children(self.proc.pid)
        self.write_config(nodes)
        self.proc.send_signal(self.RELOAD)
        deadline = time.time() + 10
        while time.time() < deadline:
            now = children(self.proc.pid)
            if now and not now & old:
                return
            if self.proc.poll() is not None:
                raise RuntimeError("reload ended the process: " + read(self.log))
            time.sleep(0.02)
        raise RuntimeError("the old workers did not exit: " + read(self.log))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Nginx(Proxy):
    TEMPLATE = os.path.join(DEPLOY, "nginx", "sluice-sticky.conf")
    RELOAD = signal.SIGHUP

    def write_config(self, nodes):
        site = substitute(read(self.TEMPLATE), r"^\s*server\s+(?P<addr>\d+\.\d+\.\d+\.\d+:\d+)",
                          r"^(\s*)listen\s+80 default_server;$", rf"\g<1>listen 127.0.0.1:{self.port};", nodes)
        site = self.tweak(site)
        with open(os.path.join(self.dir, "sluice-sticky.conf"), "w") as f:
            f.write(site)
        conf = os.path.join(self.dir, "nginx.conf")
        temps = " ".join(f"{t}_temp_path {self.dir}/{t};" for t in
                         ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        with open(conf, "w") as f:
            f.write(f"pid {self.dir}/nginx.pid;\nerror_log {self.log} warn;\n"
                    "worker_processes 1;\nevents { worker_connections 1024; }\n"
                    f"http {{\n  access_log off;\n  {temps}\n"
                    f"  include {self.dir}/sluice-sticky.conf;\n}}\n")
        return [NGINX, "-p", self.dir, "-c", conf, "-g", "daemon off;"]


class Haproxy(Proxy):
    TEMPLATE = os.path.join(DEPLOY, "haproxy", "sluice-sticky.cfg")
    RELOAD = signal.SIGUSR2  # master-worker mode (-W): the master re-reads the files

    def write_config(self, nodes):
        site = substitute(read(self.TEMPLATE),
                          r"^\s*server\s+(?P<name>\S+)\s+(?P<addr>\d+\.\d+\.\d+\.\d+:\d+)",
                          r"^(\s*)bind\s+:80$", rf"\g<1>bind 127.0.0.1:{self.port}", nodes)
        site = self.tweak(site)
        cfg = os.path.join(self.dir, "sluice-sticky.cfg")
        with open(cfg, "w") as f:
            f.write(site)
        glob = os.path.join(self.dir, "global.cfg")
        with open(glob, "w") as f:
            f.write(f"global\n    maxconn 1024\n    stats socket {self.dir}/stats.sock\n")
        return [HAPROXY, "-W", "-db", "-f", glob, "-f", cfg]

    def server_status(self, name):
        """HAProxy's view of server `name` ("UP", "DOWN", "UP 1/2"...), from its stats
        socket; None while the socket is not there or does not list it."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(os.path.join(self.dir, "stats.sock"))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return None
        for line in data.decode(errors="replace").splitlines():
            fields = line.split(",")  # pxname, svname, ..., status is the 18th
            if len(fields) > 17 and fields[1] == name:
                return fields[17]
        return None


class Client:
    """One keep-alive connection to the load balancer."""

    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def send(self, method, path, user_ids=(), headers=()):
        self.conn.putrequest(method, path)
        for u in user_ids:  # several lines of the header when several ids are given
            self.conn.putheader("X-User-Id", u)
        for name, value in headers:
            self.conn.putheader(name, value)
        self.conn.putheader("Content-Length", "0")
        self.conn.endheaders()
        r = self.conn.getresponse()
        r.read()
        return r.status

    def close(self):
        self.conn.close()


def run_users(port, users, per_user, path="/api/items"):
    """Each user sends `per_user` requests in order on its own connection, users in
    parallel; returns {user: [status, ...]}."""
    def one(user):
        c = Client(port)
        try:
            return user, [c.send("GET", path, [user]) for _ in range(per_user)]
        finally:
            c.close()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, users))


def used(node, limit, key):
    """How much of `limit` the key has spent on this node (0 when the node never saw it)."""
    query = urllib.parse.urlencode({"limit": limit, "key": key})
    status, _, body = node.request("GET", "/v1/keys?" + query, admin=True)
    assert status == 200, body
    d = json.loads(body)
    return d["limit"] - d["remaining"]


class StickyRouting:
    """The tests, for any load balancer class in PROXY."""

    PROXY = None
    USERS = [f"user-{i}" for i in range(40)]

    def setUp(self):
        self.upstream = gateway_test.Upstream()
        # Its answer goes out in two writes (head, body): without TCP_NODELAY the body waits
        # for Sluice's delayed ACK, 40 ms a request.
        self.upstream.RequestHandlerClass.disable_nagle_algorithm = True
        self.addCleanup(self.upstream.server_close)
        self.addCleanup(self.upstream.shutdown)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(CONFIG)
        self.addCleanup(os.unlink, f.name)
        self.config = f.name

    def start(self, count, routed=None, tweak=None):
        """Starts `count` nodes and the balancer with the nodes `routed` (indexes; all),
        its config edited by `tweak` (see Proxy)."""
        upstream = f"http://127.0.0.1:{self.upstream.server_address[1]}"
        self.nodes = []
        for _ in range(count):
            node = server_test.Server(self.config, ["--upstream", upstream])
            self.addCleanup(node.stop)
            self.nodes.append(node)
        self.routed = list(range(count)) if routed is None else routed
        self.proxy = self.PROXY(server_test.free_port(), self.addresses(self.routed), tweak)
        self.addCleanup(self.proxy.stop)

    def addresses(self, indexes):
        return [(i + 1, f"127.0.0.1:{self.nodes[i].port}") for i in indexes]

    def holders(self, limit, key):
        """{node index: amount spent} for every running node that has counted the key."""
        spent = {i: used(n, limit, key) for i, n in enumerate(self.nodes)
                 if n.proc.poll() is None}
        return {i: s for i, s in spent.items() if s}

    def exact_per_user(self):
        """Every user sends twice its limit: exactly the limit passes, all on one node, and
        every node holds some users. Returns {user: node index}."""
        results = run_users(self.proxy.port, self.USERS, 2 * LIMIT)
        for user, statuses in results.items():
            self.assertEqual(statuses, [200] * LIMIT + [429] * LIMIT, user)
        self.assertEqual(self.upstream.hits, LIMIT * len(self.USERS))
        home = {}
        for user in self.USERS:
            held = self.holders("default/limit", f"user_id={user}")
            self.assertEqual(list(held.values()), [LIMIT], (user, held))
            home[user] = next(iter(held))
        self.assertEqual(set(home.values()), set(self.routed), home)
        return home

    def again_after_removal(self, home, gone):
        """Every user sends twice its limit again once node `gone` has left: its users
        start fresh on another node (one more limit, once), the others keep their counts
        and node. Returns the over-admission in requests."""
        results = run_users(self.proxy.port, self.USERS, 2 * LIMIT)
        moved = [u for u in self.USERS if home[u] == gone]
        for user, statuses in results.items():
            held = self.holders("default/limit", f"user_id={user}")
            if home[user] == gone:
                self.assertEqual(statuses, [200] * LIMIT + [429] * LIMIT, user)
                # A node taken out of the config still runs: it got nothing new.
                self.assertEqual(held.pop(gone, LIMIT), LIMIT, (user, held))
                self.assertEqual(list(held.values()), [LIMIT], (user, held))
            else:
                self.assertEqual(statuses, [429] * (2 * LIMIT), user)
                self.assertEqual(held, {home[user]: LIMIT}, user)
        extra = sum(statuses.count(200) for statuses in results.values())
        self.assertEqual(extra, LIMIT * len(moved))
        print(f"\n{self.PROXY.__name__}, {len(self.nodes)} nodes, node {gone + 1} removed: "
              f"{len(moved)}/{len(self.USERS)} users moved; over-admission {extra} requests = "
              f"{extra / (LIMIT * len(self.USERS)):.2f} of the users' total limit ({LIMIT} "
              "per moved user, 0 for the others)", file=sys.stderr)
        return extra

    def test_each_user_gets_exactly_its_limit_on_one_node(self):
        self.start(2)
        self.exact_per_user()

    def test_users_of_a_failed_node_start_fresh_on_the_other(self):
        self.start(2)
        home = self.exact_per_user()
        self.nodes[1].stop()  # the balancer finds out on its own
        self.again_after_removal(home, 1)

    def test_a_node_taken_out_of_the_config_moves_only_its_users(self):
        # Three nodes and the middle one removed: with consistent hashing on fixed ring
        # positions, the users of the other two stay where they are.
        self.start(3)
        home = self.exact_per_user()
        self.proxy.reload(self.addresses([0, 2]))
        self.again_after_removal(home, 1)

    def test_an_added_node_takes_users_only_onto_itself(self):
        # Users either stay where they are, keeping their counts, or move to the new node
        # and start fresh there; nobody moves between the old nodes.
        self.start(3, routed=[0, 1])
        home = self.exact_per_user()
        self.proxy.reload(self.addresses([0, 1, 2]))
        results = run_users(self.proxy.port, self.USERS, 2 * LIMIT)
        moved = 0
        for user, statuses in results.items():
            held = self.holders("default/limit", f"user_id={user}")
            if 2 in held:
                self.assertEqual(statuses, [200] * LIMIT + [429] * LIMIT, user)
                self.assertEqual(held, {home[user]: LIMIT, 2: LIMIT}, user)
                moved += 1
            else:
                self.assertEqual(statuses, [429] * (2 * LIMIT), user)
                self.assertEqual(held, {home[user]: LIMIT}, user)
        self.assertGreater(moved, 0)
        print(f"\n{self.PROXY.__name__}, node 3 added to 2: {moved}/{len(self.USERS)} users "
              f"moved onto it; over-admission {LIMIT * moved} requests", file=sys.stderr)

    def test_duplicate_user_headers_cannot_spread_a_count(self):
        self.start(2)
        # Two X-User-Id lines: the balancer hashes one of them and must send Sluice only that
        # one, or a client could be routed by a varying line and counted under a fixed one,
        # on every node in turn.
        c = Client(self.proxy.port)
        self.addCleanup(c.close)
        for i in range(2 * LIMIT):
            c.send("GET", "/api/items", [f"rotating-{i}", "fixed"])
            c.send("GET", "/api/items", ["fixed2", f"rotating2-{i}"])
        for key in ["fixed", "fixed2"] + [f"rotating-{i}" for i in range(2 * LIMIT)]:
            held = self.holders("default/limit", f"user_id={key}")
            self.assertLessEqual(len(held), 1, (key, held))
            self.assertTrue(all(s <= LIMIT for s in held.values()), (key, held))

    def test_address_keyed_requests_are_routed_by_address(self):
        self.start(2)
        c = Client(self.proxy.port)
        self.addCleanup(c.close)
        # No user id: keyed by address, so routed by address.
        statuses = [c.send("GET", "/anonymous") for _ in range(2 * LIMIT)]
        self.assertEqual(statuses, [200] * LIMIT + [429] * LIMIT)
        self.assertEqual(list(self.holders("default/limit", "ip=127.0.0.1").values()), [LIMIT])
        # The per-address login rule: rotating the user id and the path's spelling does not
        # spread the attempts over the nodes. A balancer that cannot tell how Sluice reads a
        # spelling refuses it (400) rather than guess; these ones both balancers route.
        routed = ["/api/login", "/API/login/", "/api//login", "/api/login;jsessionid=abc",
                  "/api/%6cogin", "/api;x/login", "/api/login;"]
        # Dot segments: nginx resolves them as Sluice does, HAProxy 2.6 cannot; with ";"
        # parameters, nginx resolves them before the parameters are dropped, Sluice after.
        # A leading "//" Sluice itself refuses (an upstream may read a host in it).
        refusable = ["/api/x/../login", "/api/x/..;/login", "/api/login/x/..;", "/api/./LOGIN",
                     "/api/%2e/login", "/api/x/%2e%2e/login", "//api/login"]
        spellings = routed + refusable
        sent = [spellings[i % len(spellings)] for i in range(4 * len(spellings))]
        statuses = [c.send("POST", path, [f"attacker-{i}"]) for i, path in enumerate(sent)]
        for path, status in zip(sent, statuses):
            self.assertIn(status, (200, 429, 400) if path in refusable else (200, 429), path)
        decided = [s for s in statuses if s != 400]
        self.assertEqual(decided, [200] * LOGIN_LIMIT + [429] * (len(decided) - LOGIN_LIMIT))
        self.assertEqual(list(self.holders("login/limit", "ip=127.0.0.1").values()),
                         [LOGIN_LIMIT])

    def test_login_method_in_any_case_is_routed_by_address(self):
        # Sluice matches a rule's method in any case: "post /api/login" is the login rule's,
        # and must be routed by address too. (nginx refuses a method not in upper case.)
        self.start(2)
        c = Client(self.proxy.port)
        self.addCleanup(c.close)
        statuses = [c.send(("post", "Post", "pOST")[i % 3], "/api/login", [f"attacker-{i}"])
                    for i in range(4 * LOGIN_LIMIT)]
        if statuses != [400] * len(statuses):
            # Admitted ones reach the test's upstream, which has no handler for "post" (501).
            self.assertEqual([s == 429 for s in statuses],
                             [False] * LOGIN_LIMIT + [True] * (3 * LOGIN_LIMIT), statuses)
            self.assertNotIn(400, statuses)
        held = self.holders("login/limit", "ip=127.0.0.1")
        self.assertLessEqual(len(held), 1, held)
        self.assertTrue(all(s <= LOGIN_LIMIT for s in held.values()), held)

    def test_user_keyed_paths_that_mention_login_stay_on_the_users_node(self):
        # Paths Sluice counts under the user-keyed default rule, though they hold "login"
        # and ";" parameters, "//" or dot segments: routed by user, or refused, never by
        # address (which would put part of a user's count on the address's node).
        self.start(2)
        tricky = ["/api/items;login", "/api/items;x/login;y", "/api//items/login/..",
                  "/api/login%3Bx", "/api/items/..;/login-history", "/api/x/login/..;/.."]
        never_refused = {"/api/items;login", "/api/items;x/login;y"}
        for user in self.USERS[:10]:
            c = Client(self.proxy.port)
            self.addCleanup(c.close)
            sent = [tricky[i // 2 % len(tricky)] if i % 2 == 0 else "/api/items"
                    for i in range(2 * LIMIT)]
            statuses = [c.send("POST" if path in tricky else "GET", path, [user])
                        for path in sent]
            for path, status in zip(sent, statuses):
                self.assertIn(status, (200, 429) if path in never_refused or path == "/api/items"
                              else (200, 429, 400), (user, path))
            decided = [s for s in statuses if s != 400]
            self.assertEqual(decided, [200] * LIMIT + [429] * (len(decided) - LIMIT), user)
            self.assertEqual(list(self.holders("default/limit", f"user_id={user}").values()),
                             [LIMIT], user)

    def test_every_address_of_an_ipv6_64_goes_to_one_node(self):
        # Sluice keys IPv6 clients by /64. The client address comes from a header in this
        # test only (loopback has one IPv6 address); nginx prints it in its own form, "::"
        # included, as it would a peer's.
        if self.PROXY is Nginx:
            def tweak(text):
                return text.replace("    listen 127.0.0.1", "    set_real_ip_from 127.0.0.1;\n"
                                    "    real_ip_header X-Real-IP;\n    listen 127.0.0.1", 1)
        else:
            def tweak(text):
                return text.replace("    http-request set-var(txn.sluice_user)",
                                    "    http-request set-src req.hdr(x-real-ip)\n"
                                    "    http-request set-var(txn.sluice_user)", 1)
        self.start(2, tweak=tweak)
        networks = {
            "2001:db8:1234::/64": ["2001:db8:1234::1", "2001:db8:1234::9:1",
                                   "2001:db8:1234:0:1::1", "2001:db8:1234:0:a:b:c:d",
                                   "2001:db8:1234::a:b:c"],
            "2001:0:0:5::/64": ["2001:0:0:5:1:2:3:4", "2001:0:0:5::1", "2001:0:0:5:1::",
                                "2001:0:0:5:0:1:0:1"],
            "0:0:3:4::/64": ["::3:4:5:6:7:8", "0:0:3:4::1", "0:0:3:4::", "0:0:3:4:1:0:0:1"],
            "1::/64": ["1::1", "1::1:2:3:4", "1::4:0:0:1", "1:0:0:0:1:0:1:0"],
            "::/64": ["::5", "::2:0:0:1", "::1:2:3:4", "::ffff:1:0:1"],
        }
        for net, addresses in networks.items():
            c = Client(self.proxy.port)
            self.addCleanup(c.close)
            statuses = [c.send("GET", "/anonymous", headers=[("X-Real-IP", addresses[i % len(addresses)])])
                        for i in range(2 * LIMIT)]
            self.assertEqual(statuses, [200] * LIMIT + [429] * LIMIT, net)
            statuses = [c.send("POST", "/api/login", [f"attacker-{i}"],
                               [("X-Real-IP", addresses[i % len(addresses)])])
                        for i in range(3 * LOGIN_LIMIT)]
            self.assertEqual(statuses, [200] * LOGIN_LIMIT + [429] * (2 * LOGIN_LIMIT), net)

    def test_a_hung_node_is_not_waited_for_nor_counted_twice(self):
        # A node that stops answering while its kernel still accepts connections (here
        # SIGSTOP). HAProxy's health check must take it out, so its users are answered by
        # the next node; nginx has no active checks and waits proxy_read_timeout (2 s in
        # this test only), then answers 504 without sending the request to another node,
        # which would count it a second time once the hung node resumes and counts it too.
        tweak = None
        if self.PROXY is Nginx:
            def tweak(text):
                text, n = re.subn(r"proxy_read_timeout \S+;", "proxy_read_timeout 2s;", text)
                return text if n else text.replace("    location / {",
                                                   "    proxy_read_timeout 2s;\n    location / {")
        self.start(2, tweak=tweak)
        users = self.USERS[:10]
        run_users(self.proxy.port, users, 1)
        home = {u: next(iter(self.holders("default/limit", f"user_id={u}"))) for u in users}
        user = next(u for u in users if home[u] == 1)
        hung = self.nodes[1].proc
        hung.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: hung.poll() is None and hung.send_signal(signal.SIGCONT))
        try:
            c = Client(self.proxy.port)
            self.addCleanup(c.close)
            c.conn.timeout = 8
            if self.PROXY is Haproxy:  # two failed checks, 1 s apart, each given 1 s
                deadline = time.monotonic() + 15
                while self.proxy.server_status("sluice2") != "DOWN":
                    self.assertLess(time.monotonic(), deadline, "the hung node is not DOWN")
                    time.sleep(0.1)
            start = time.monotonic()
            try:
                status = c.send("GET", "/api/items", [user])
            except OSError as e:
                self.fail(f"no answer within 8 s: {e!r}")
            took = time.monotonic() - start
        finally:
            hung.send_signal(signal.SIGCONT)
        if self.PROXY is Haproxy:
            # Answered at once by the next node, where the user starts fresh.
            self.assertEqual(status, 200)
            self.assertLess(took, 2)
            held = self.holders("default/limit", f"user_id={user}")
            self.assertEqual(held, {0: 1, 1: 1}, held)
        else:
            self.assertEqual(status, 504)
            self.assertLess(took, 5)
            # The resumed node may still read the request and count it; no other node has.
            deadline = time.time() + 3
            while time.time() < deadline:
                held = self.holders("default/limit", f"user_id={user}")
                if held.get(1) == 2:
                    break
                time.sleep(0.1)
            self.assertEqual(set(held), {1}, held)
            self.assertIn(held[1], (1, 2), held)

    def test_user_keyed_requests_on_login_like_paths_stay_on_the_users_node(self):
        # Paths that only look like the login rule's are counted by the user-keyed rule:
        # the balancer must route them by user too, or a user's count splits over nodes.
        self.start(2)
        paths = ["/api/login-history", "/api/logins", "/login", "/api/user/login/events"]
        for user in self.USERS[:6]:
            c = Client(self.proxy.port)
            self.addCleanup(c.close)
            # Mixed with the user's other requests, as a real client's are.
            statuses = [c.send("POST", paths[i // 2 % len(paths)], [user]) if i % 2
                        else c.send("GET", "/api/items", [user]) for i in range(LIMIT + 2)]
            self.assertEqual(statuses, [200] * LIMIT + [429] * 2, user)
            self.assertEqual(list(self.holders("default/limit", f"user_id={user}").values()),
                             [LIMIT], user)


@unittest.skipUnless(os.access(NGINX, os.X_OK), f"nginx not installed ({NGINX}); "
                     "scripts/deps installs it")
class NginxStickyTest(StickyRouting, unittest.TestCase):
    PROXY = Nginx


@unittest.skipUnless(os.access(HAPROXY, os.X_OK), f"haproxy not installed ({HAPROXY}); "
                     "scripts/deps installs it")
class HaproxyStickyTest(StickyRouting, unittest.TestCase):
    PROXY = Haproxy

    def test_a_node_whose_check_key_is_spent_stays_in(self):
        # The health check is a decision keyed by the balancer's address, which the clients
        # behind it without a user id share: once they spend it, the check's answer is 429,
        # and the node, which decided, stays in the ring.
        self.start(2)
        c = Client(self.proxy.port)
        self.addCleanup(c.close)
        statuses = [c.send("GET", "/anonymous") for _ in range(LIMIT + 1)]
        self.assertEqual(statuses, [200] * LIMIT + [429])
        self.assertEqual(list(self.holders("default/limit", "ip=127.0.0.1").values()), [LIMIT])
        time.sleep(3.5)  # three checks, 1 s apart: two failed would take a node out
        self.assertEqual([self.proxy.server_status(n) for n in ("sluice1", "sluice2")],
                         ["UP", "UP"])


if __name__ == "__main__":
    server_test.BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=1)
