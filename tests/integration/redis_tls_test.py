#!/usr/bin/env python3
"""Sluice talking to Redis over TLS (a real redis-server with --tls-port, certificates made
here with the openssl command, loopback only).

Usage: redis_tls_test.py path/to/sluice
Checks: decisions go through Redis over TLS with the server's certificate verified against a
given CA; a certificate from another CA is refused (rules fall back to their fail_mode,
nothing crashes); mutual TLS with a client certificate; store mode local_sync syncing its
counts over mutual TLS, and holding them while the certificate does not verify. (Bad TLS settings in a config are
tests/config/bad fixtures.)
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import server_test  # noqa: E402
from redis_fixture import RedisServer, RespClient, free_port  # noqa: E402
from multiregion_test import DelayProxy  # noqa: E402
from redis_test import far_window, wait_for  # noqa: E402


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d)


def make_cert(d, ca, name, server):
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n" if server else
                "extendedKeyUsage=clientAuth\n")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.crt", cwd=d)


def make_pki(d, server):
    """In `d`: CAs "ca" and "other-ca"; a server certificate `server` (for 127.0.0.1 and
    localhost) and a client certificate "client", both signed by "ca"."""
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", server, server=True)
    make_cert(d, "ca", "client", server=False)


class RedisTlsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        d = cls.d = cls.tmp.name
        make_pki(d, "redis")

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def start_redis(self, auth_clients):
        self.tls_port = free_port()
        p = lambda n: os.path.join(self.d, n)  # noqa: E731
        # The plain port stays open for the fixture's readiness check and for inspection.
        redis = RedisServer(extra_args=[
            "--tls-port", str(self.tls_port), "--tls-cert-file", p("redis.crt"),
            "--tls-key-file", p("redis.key"), "--tls-ca-cert-file", p("ca.crt"),
            "--tls-auth-clients", auth_clients])
        self.addCleanup(redis.stop)
        return redis

    def start_sluice(self, tls, mode="remote"):
        config = os.path.join(self.d, f"sluice-{self.id().split('.')[-1]}-{mode}.yaml")
        with open(config, "w") as f:
            f.write(f"""
store:
  type: redis
  address: 127.0.0.1:{self.tls_port}
  connect_timeout: 1s
  tls: {json.dumps(tls)}
  mode: {mode}
  {"sync_interval: 50ms" if mode == "local_sync" else "fail_mode: closed"}
  {"" if mode == "local_sync" else "timeout: 2s  # these tests count, not deadlines"}
rate_limits:
  default: {{limit: 2, window: {far_window()}, algorithm: fixed_window}}
""")
        server = server_test.Server(config)
        self.addCleanup(server.stop)
        server.config_path = config
        return server

    def decisions(self, server, ip):
        return [server.check({"path": "/x", "ip": ip}) for _ in range(3)]

    def assert_through_redis(self, server, redis, ip):
        answers = self.decisions(server, ip)
        self.assertEqual([s for s, _, _ in answers], [200, 200, 429])
        for _, _, body in answers:
            self.assertNotIn("degraded", body)
        with RespClient(redis.address) as r:
            self.assertEqual(len(r.call("KEYS", "sluice:{ip=" + ip + "}:*")), 1)

    def test_verified_tls(self):
        redis = self.start_redis("no")
        server = self.start_sluice({"ca_file": os.path.join(self.d, "ca.crt")})
        self.assert_through_redis(server, redis, "192.0.2.1")

    def test_certificate_from_another_ca_is_refused(self):
        redis = self.start_redis("no")
        server = self.start_sluice({"ca_file": os.path.join(self.d, "other-ca.crt")})
        for status, _, body in self.decisions(server, "192.0.2.2"):
            self.assertEqual(status, 429)  # fail_mode closed: never decided in Redis
            self.assertEqual(body["degraded"], "closed")
        with RespClient(redis.address) as r:
            self.assertEqual(r.call("KEYS", "*"), [])
        self.assertIsNone(server.proc.poll())
        # /readyz and the log say why: which check of the certificate failed.
        status, _, body = server.request("GET", "/readyz", admin=True)
        ready = json.loads(body)
        self.assertTrue(ready["degraded"], ready)
        self.assertIn("certificate verify failed", ready["store_state"])
        self.assertIn("(self-signed certificate in certificate chain)", ready["store_state"])
        server.stop()
        self.assertIn("TLS handshake: certificate verify failed (SSL routines) (self-signed "
                      "certificate in certificate chain)", server.stderr)

    def test_a_key_that_does_not_match_its_certificate_is_refused_before_a_start(self):
        # `validate` and a reload load the files as the connections will: a mismatch found
        # only at the next start would take the service down then.
        p = lambda n: os.path.join(self.d, n)  # noqa: E731
        self.start_redis("yes")
        good = {"ca_file": p("ca.crt"), "cert_file": p("client.crt"), "key_file": p("client.key")}
        server = self.start_sluice(good)
        config = server.config_path
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace(json.dumps(good), json.dumps(dict(good, key_file=p("redis.key")))))
        done = subprocess.run([server_test.BIN, "validate", config], capture_output=True, text=True)
        message = (f"{config}: redis TLS setup: store.key_file {p('redis.key')}: key values "
                   "mismatch")
        self.assertEqual(done.returncode, 1, done)
        self.assertIn(message, done.stderr)
        status, _, body = server.request("POST", "/v1/reload", admin=True)
        self.assertEqual(status, 400, body)
        self.assertIn(message, json.loads(body)["message"])
        status, _, _ = server.check({"path": "/x", "ip": "192.0.2.9"})
        self.assertEqual(status, 200)  # the running store is untouched

    def wait_for_decisions_on_redis(self, server):
        """Until four decisions in a row, each on a connection of its own (so on any worker),
        are made in Redis. /readyz is one probe's view: each worker redials on its own
        backoff (at most 200 ms) and is back on Redis within a second of Redis answering."""
        fresh = iter(range(10**6))

        def on_redis():
            return all("degraded" not in server.check({"path": "/x", "ip": f"198.51.100.{i % 250}"})[2]
                       for i in (next(fresh) for _ in range(4)))
        wait_for(on_redis, 10, "decisions made in Redis on every worker")

    def wait_for_store_state(self, server, text):
        """Until /readyz says degraded with `text` in its store_state (no decision asked)."""
        def says():
            ready = json.loads(server.request("GET", "/readyz", admin=True)[2])
            return ready.get("degraded") and text in ready.get("store_state", "")
        wait_for(says, 10, f"/readyz naming {text!r}")

    def test_clear_text_to_a_tls_port_is_named_before_any_decision(self):
        # Redis resets a connection that does not speak TLS: a connection is usable only
        # once Redis has answered on it, so /readyz says so before any decision fails.
        self.start_redis("no")
        server = self.start_sluice(False)
        self.wait_for_store_state(server, "before answering (does it expect TLS? see store.tls)")

    def test_tls_to_a_clear_text_port_is_named(self):
        redis = self.start_redis("no")
        self.tls_port = int(redis.address.rsplit(":", 1)[1])  # the plain port
        server = self.start_sluice({"ca_file": os.path.join(self.d, "ca.crt")})
        self.wait_for_store_state(
            server, "TLS handshake timed out (does the server speak TLS on this port?)")

    def test_a_certificate_for_another_host_is_named_a_mismatch(self):
        d = self.d
        with open(os.path.join(d, "elsewhere.ext"), "w") as f:
            f.write("subjectAltName=DNS:other.example\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=elsewhere", "-keyout",
                "elsewhere.key", "-out", "elsewhere.csr", cwd=d)
        openssl("x509", "-req", "-in", "elsewhere.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "elsewhere.ext", "-out",
                "elsewhere.crt", cwd=d)
        self.tls_port = free_port()
        redis = RedisServer(extra_args=[
            "--tls-port", str(self.tls_port), "--tls-cert-file", os.path.join(d, "elsewhere.crt"),
            "--tls-key-file", os.path.join(d, "elsewhere.key"), "--tls-ca-cert-file",
            os.path.join(d, "ca.crt"), "--tls-auth-clients", "no"])
        self.addCleanup(redis.stop)
        server = self.start_sluice({"ca_file": os.path.join(d, "ca.crt")})
        self.wait_for_store_state(server, "certificate verify failed (SSL routines) "
                                          "(IP address mismatch)")
        named = self.start_sluice({"ca_file": os.path.join(d, "ca.crt"),
                                   "server_name": "redis.internal"})
        self.wait_for_store_state(named, "(hostname mismatch)")

    def test_an_encrypted_key_is_refused_without_a_prompt(self):
        # With a terminal, OpenSSL would ask for the passphrase there and wait, signals and
        # all: `script` gives the command one.
        p = lambda n: os.path.join(self.d, n)  # noqa: E731
        openssl("pkey", "-in", "client.key", "-aes256", "-passout", "pass:x", "-out",
                "client-enc.key", cwd=self.d)
        self.tls_port = free_port()
        config = p("encrypted-key.yaml")
        with open(config, "w") as f:
            f.write(f"""
store:
  type: redis
  address: 127.0.0.1:{self.tls_port}
  tls: {{ca_file: {p("ca.crt")}, cert_file: {p("client.crt")}, key_file: {p("client-enc.key")}}}
rate_limits:
  default: {{limit: 2, window: 1h}}
""")
        done = subprocess.run(["script", "-qec", f"{server_test.BIN} validate {config}",
                               "/dev/null"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=30)
        self.assertEqual(done.returncode, 1, done)
        self.assertIn(f"store.key_file {p('client-enc.key')}: the key is encrypted (Sluice reads "
                      "unencrypted PEM keys only; decrypt it with `openssl pkey`)", done.stdout)
        self.assertNotIn("pass phrase", done.stdout)

    def test_mutual_tls(self):
        redis = self.start_redis("yes")
        server = self.start_sluice({
            "ca_file": os.path.join(self.d, "ca.crt"),
            "cert_file": os.path.join(self.d, "client.crt"),
            "key_file": os.path.join(self.d, "client.key")})
        self.assert_through_redis(server, redis, "192.0.2.3")
        # Without a client certificate Redis refuses the connection.
        anonymous = self.start_sluice({"ca_file": os.path.join(self.d, "ca.crt")})
        status, _, body = anonymous.check({"path": "/x", "ip": "192.0.2.4"})
        self.assertEqual((status, body.get("degraded")), (429, "closed"))


    def test_rotated_files_apply_to_new_connections_without_a_restart(self, mode="remote"):
        # The CA file is rewritten in place (a Secret's update) to the one that signed
        # Redis' certificate: connections made after that verify it, without a restart. The
        # client certificate and key are read again with it.
        redis = self.start_redis("yes")
        live = tempfile.mkdtemp(dir=self.d)
        put = lambda name, source: (  # noqa: E731
            subprocess.run(["cp", os.path.join(self.d, source), os.path.join(live, "tmp")],
                           check=True),
            os.replace(os.path.join(live, "tmp"), os.path.join(live, name)))
        put("ca.crt", "other-ca.crt")
        put("client.crt", "client.crt")
        put("client.key", "client.key")
        server = self.start_sluice({n + "_file": os.path.join(live, f"{f}")
                                    for n, f in (("ca", "ca.crt"), ("cert", "client.crt"),
                                                 ("key", "client.key"))}, mode=mode)
        degraded = lambda: json.loads(  # noqa: E731
            server.request("GET", "/readyz", admin=True)[2]).get("degraded")
        if mode == "remote":
            self.wait_for_store_state(server, "certificate verify failed")
        else:
            wait_for(degraded, 10, "degraded readiness")
        put("ca.crt", "ca.crt")
        wait_for(lambda: not degraded(), 15, "/readyz ok with the new CA")
        if mode == "remote":
            self.wait_for_decisions_on_redis(server)
            self.assert_through_redis(server, redis, "192.0.2.7")
        # A key that is not the certificate's (caught half-written) is refused; the
        # current files stay in use.
        put("client.key", "redis.key")
        wait_for(lambda: server.metric("sluice_reload_failures_total") == 1, 10,
                 "the refused key")
        self.assertFalse(degraded())
        self.assertEqual(server.metric("sluice_reloads_total"), 1)
        server.stop()
        self.assertIn("INFO reloaded the store's TLS files", server.stderr)
        self.assertIn("WARN reload failed, keeping the current certificate: redis TLS setup: "
                      f"store.key_file {live}/client.key: key values mismatch", server.stderr)

    def test_rotated_files_apply_to_the_syncers_connections(self):
        self.test_rotated_files_apply_to_new_connections_without_a_restart(mode="local_sync")

    def test_local_sync_over_mutual_tls(self):
        redis = self.start_redis("yes")
        files = {"ca_file": os.path.join(self.d, "ca.crt"),
                 "cert_file": os.path.join(self.d, "client.crt"),
                 "key_file": os.path.join(self.d, "client.key")}
        server = self.start_sluice(files, mode="local_sync")
        # Decided locally (limit 2 an hour), and the two hits reach Redis over TLS.
        self.assertEqual([s for s, _, _ in self.decisions(server, "192.0.2.5")], [200, 200, 429])
        with RespClient(redis.address) as r:
            wait_for(lambda: [sum(int(v) for v in r.call("HVALS", k))
                              for k in r.call("KEYS", "sluice:{ip=192.0.2.5}:*")] == [2],
                     10, "the hits in Redis")
        # A syncer whose certificate check fails holds its hits and says it is degraded.
        unverified = self.start_sluice({"ca_file": os.path.join(self.d, "other-ca.crt")},
                                       mode="local_sync")
        self.assertEqual([s for s, _, _ in self.decisions(unverified, "192.0.2.6")],
                         [200, 200, 429])
        wait_for(lambda: json.loads(unverified.request("GET", "/readyz", admin=True)[2])
                 .get("degraded"), 10, "degraded readiness")
        with RespClient(redis.address) as r:
            self.assertEqual(r.call("KEYS", "sluice:{ip=192.0.2.6}:*"), [])
        self.assertIsNone(unverified.proc.poll())

    def test_a_peer_region_over_tls_across_a_slow_link(self):
        # A round trip of 300 ms: the TCP and TLS handshakes to the other region's Redis take
        # two, more than the 200 ms connect timeout sized for this region's own Redis.
        self.start_redis("no")
        east_tls = self.tls_port
        west = self.start_redis("no")
        proxy = DelayProxy(self.tls_port, delay=0.15)
        self.addCleanup(proxy.close)
        config = os.path.join(self.d, "sluice-peer-over-tls.yaml")
        with open(config, "w") as f:
            f.write(f"""
region: us-east
store:
  type: redis
  address: 127.0.0.1:{east_tls}
  mode: local_sync
  sync_interval: 100ms
  tls: {{ca_file: {os.path.join(self.d, "ca.crt")}}}
  peers: [{{region: eu-west, address: "{proxy.address}"}}]
rate_limits:
  default: {{limit: 100, window: {far_window()}, algorithm: fixed_window}}
""")
        server = server_test.Server(config)
        self.addCleanup(server.stop)
        self.assertEqual([s for s, _, _ in self.decisions(server, "192.0.2.7")], [200] * 3)
        with RespClient(west.address) as r:
            wait_for(lambda: [int(r.call("GET", k))
                              for k in r.call("KEYS", "sluice:{ip=192.0.2.7}:*@us-east")] == [3],
                     15, "us-east's 3 published in eu-west's Redis over TLS")
        self.assertEqual(server.metric("sluice_sync_peer_failures_total"), 0)


if __name__ == "__main__":
    server_test.BIN = os.path.abspath(sys.argv.pop(1))
    unittest.main(verbosity=1)
