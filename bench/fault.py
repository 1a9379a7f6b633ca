#!/usr/bin/env python3
"""Load and fault runs against the real Sluice binary, loopback only, each bounded in time.

Usage: fault.py SLUICE LOADGEN SCENARIO [options]   (scripts/fault builds and calls this)

Scenarios (each prints its figures and ends with PASS or FAIL and the reasons):
  keys   a flood of distinct client keys (10M by default) against the in-memory store with
         --max-keys as the configured bound: resident memory must stay under
         baseline + max_keys * 128 B per limit, and a probe client must be answered
         (200 or 429) throughout.
  slow   a flood of slow clients (slowloris from 6 addresses: headers dripped a byte at a
         time, never finished, reconnecting when closed) against --max-connections, then
         again with --max-connections-per-ip: the open connections never pass the bound,
         slow ones are closed by the read timeout, a keep-alive client connected before the
         flood is served throughout, and with the per-address bound every new client from
         another address is served.
  soak   gateway mode in front of a real nginx upstream (which logs every request's id),
         shared state in a real Redis restarted every --restart-every seconds, at 80% of
         the measured peak for --seconds: no crash, resident memory flat, only 200/429
         reach clients (fail_mode local while Redis is away), and every request is
         answered exactly once and reaches the upstream exactly once when allowed.
"""
import argparse
import http.client
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))
from redis_fixture import RedisServer, free_port  # noqa: E402

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


class Sluice:
    """One sluice process, logs to a file (a pipe could fill and stall it), stopped by PID."""

    def __init__(self, binary, workdir, config_text, extra=()):
        self.port, self.admin_port = free_port(), free_port()
        self.config = os.path.join(workdir, "sluice.yaml")
        with open(self.config, "w") as f:
            f.write(config_text)
        self.log_path = os.path.join(workdir, "sluice.log")
        self.log = open(self.log_path, "w")
        args = [binary, "serve", "--config", self.config, "--listen", f"127.0.0.1:{self.port}",
                "--admin", f"127.0.0.1:{self.admin_port}", *extra]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("sluice exited:\n" + open(self.log_path).read()[-3000:])
                time.sleep(0.05)
        raise RuntimeError("sluice did not start")

    def alive(self):
        return self.proc.poll() is None

    def rss_mib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        return 0.0

    def sockets(self):
        n = 0
        for fd in os.listdir(f"/proc/{self.proc.pid}/fd"):
            try:
                if os.readlink(f"/proc/{self.proc.pid}/fd/{fd}").startswith("socket:"):
                    n += 1
            except OSError:
                pass
        return n

    def metrics(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def loadgen(args, port, rate, seconds, conns, *flags):
    """Runs bench/loadgen; returns its last line's fields and every slice line."""
    cmd = [args.loadgen, "127.0.0.1", str(port), "/api/x", str(rate), str(seconds), str(conns),
           *map(str, flags)]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=seconds + 120).stdout
    lines = [dict(kv.split("=") for kv in line.split()) for line in out.strip().splitlines()]
    return lines[-1], lines[:-1]


def peak(args, port, *flags):
    """Decisions/s the server sustains: open loop far above it for a few seconds."""
    last, _ = loadgen(args, port, 200000, 4, 128, *flags)
    return float(last["rate"])


class Probe(threading.Thread):
    """One keep-alive client sending a request every `interval`: latencies and failures."""

    def __init__(self, port, headers, interval=0.05):
        super().__init__(daemon=True)
        self.port, self.headers, self.interval = port, headers, interval
        self.latencies, self.failures, self.statuses = [], [], {}
        self.stop_event = threading.Event()

    def run(self):
        conn = None
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/api/probe", headers=self.headers)
                r = conn.getresponse()
                r.read()
                self.latencies.append(time.monotonic() - t0)
                self.statuses[r.status] = self.statuses.get(r.status, 0) + 1
                if r.status not in (200, 429):
                    self.failures.append(f"status {r.status}")
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                self.failures.append(repr(e))
                if conn is not None:
                    conn.close()
                conn = None
            self.stop_event.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self):
        self.stop_event.set()
        self.join()

    def summary(self):
        lat = sorted(self.latencies)
        if not lat:
            return "probe: no answers"
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        return (f"probe: {len(lat)} answers {self.statuses}, p50 {p(0.5):.2f} ms, "
                f"p99 {p(0.99):.2f} ms, max {lat[-1] * 1000:.1f} ms, "
                f"failures {len(self.failures)} {self.failures[:3]}")


class Sampler(threading.Thread):
    def __init__(self, fn, interval):
        super().__init__(daemon=True)
        self.fn, self.interval, self.values = fn, interval, []
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            try:
                self.values.append((time.monotonic(), self.fn()))
            except OSError:
                pass
            self.stop_event.wait(self.interval)

    def stop(self):
        self.stop_event.set()
        self.join()


def verdict(problems):
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print("PASS")
    return 0


# ---------------------------------------------------------------------------------------------

def scenario_keys(args, work):
    config = ("rate_limits:\n  default:\n    limit: 100\n    window: 1h\n"
              "    key: header:X-User-Id\n")
    s = Sluice(args.sluice, work, config, ["--max-keys", str(args.max_keys)])
    problems = []
    try:
        base = s.rss_mib()
        bound = base + args.max_keys * 128 / 2**20
        rate = peak(args, s.port, "--key-header", "X-User-Id", "--keys", "0",
                    "--first-id", 10**12)
        print(f"keys: peak {rate:.0f} decisions/s; baseline RSS {base:.1f} MiB, "
              f"bound {bound:.1f} MiB (max_keys {args.max_keys} x 128 B)")
        rss = Sampler(s.rss_mib, 0.5)
        probe = Probe(s.port, {"X-User-Id": "probe"})
        rss.start()
        probe.start()
        sent, started, other, errors = 0, time.monotonic(), 0, 0
        while sent < args.keys and time.monotonic() - started < args.max_seconds:
            secs = min(60.0, (args.keys - sent) / (rate * 0.9) + 0.5)
            last, _ = loadgen(args, s.port, rate * 0.9, secs, 128, "--key-header", "X-User-Id",
                              "--keys", "0", "--first-id", sent)
            sent += int(last["sent"])
            other += int(last["status_other"])
            errors += int(last["errors"])
            print(f"  {sent:,} distinct keys sent, RSS {s.rss_mib():.1f} MiB, "
                  f"{last['rate']}/s, p99 {last['p99_ms']} ms")
        elapsed = time.monotonic() - started
        probe.stop()
        rss.stop()
        m = s.metrics()
        held = m['sluice_keys{limit="default/limit"}']
        evicted = m['sluice_evictions_total{limit="default/limit"}']
        peak_rss = max(v for _, v in rss.values)
        print(f"keys: {sent:,} distinct keys in {elapsed:.0f} s ({sent / elapsed:,.0f}/s); "
              f"held {held:,.0f}, evicted {evicted:,.0f}; RSS max {peak_rss:.1f} MiB, final "
              f"{s.rss_mib():.1f} MiB (bound {bound:.1f}); answers other than 200/429: {other}; "
              f"transport errors {errors}")
        print("keys: " + probe.summary())
        if sent < args.keys:
            problems.append(f"only {sent} keys sent in {args.max_seconds} s")
        if peak_rss > bound:
            problems.append(f"RSS {peak_rss:.1f} MiB over the bound {bound:.1f}")
        if held > args.max_keys:
            problems.append(f"{held} keys held, over max_keys {args.max_keys}")
        if probe.failures:
            problems.append(f"probe failures: {probe.failures[:3]}")
        if other:
            problems.append(f"{other} answers other than 200/429")
        if not s.alive():
            problems.append("sluice died")
    finally:
        code = s.stop()
    if code != 0:
        problems.append(f"sluice exited {code}")
    return verdict(problems)


def scenario_slow(args, work):
    # First with the server-wide bound alone, then with a bound per client address too.
    problems = run_slow(args, work, 0) + run_slow(args, work, args.per_ip)
    return verdict(problems)


def run_slow(args, work, per_ip):
    """Slow clients from 127.0.0.2-7, new clients from 127.0.0.1; returns the problems."""
    config = "rate_limits:\n  default:\n    limit: 1000000\n    window: 1m\n"
    s = Sluice(args.sluice, work, config,
               ["--max-connections", str(args.max_connections), "--read-timeout-ms", "2000",
                "--idle-timeout-ms", "5000", "--max-connections-per-ip", str(per_ip)])
    problems = []
    label = f"slow (max_connections_per_ip {per_ip or 'off'})"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    attackers = min(args.slow_clients, hard - 200)
    try:
        base_sockets = s.sockets()
        probe = Probe(s.port, {}, interval=0.02)
        probe.start()
        time.sleep(0.3)  # the probe's keep-alive connection is in before the flood
        stop = threading.Event()
        lifetimes, refused = [], [0]
        lock = threading.Lock()

        def drip(first, count, source):
            socks = {}
            while not stop.is_set():
                for i in range(first, first + count):
                    if stop.is_set():
                        break
                    if i not in socks:
                        try:
                            c = socket.create_connection(("127.0.0.1", s.port), timeout=1,
                                                         source_address=(source, 0))
                            c.setblocking(False)
                            c.send(b"GET /api/slow HTTP/1.1\r\nHost: x\r\n")
                            socks[i] = (c, time.monotonic())
                        except OSError:
                            with lock:
                                refused[0] += 1
                        continue
                    c, since = socks[i]
                    try:
                        c.send(b"X")  # a header that never ends
                        c.recv(1, socket.MSG_PEEK)  # an answer (408) or EOF: closed
                        raise ConnectionResetError()
                    except BlockingIOError:
                        pass
                    except OSError:
                        with lock:
                            lifetimes.append(time.monotonic() - since)
                        c.close()
                        del socks[i]
                stop.wait(0.2)
            for c, _ in socks.values():
                c.close()

        threads = [threading.Thread(target=drip, args=(i * 500, min(500, attackers - i * 500),
                                                       f"127.0.0.{2 + i}"))
                   for i in range((attackers + 499) // 500)]
        sockets = Sampler(s.sockets, 0.2)
        sockets.start()
        for t in threads:
            t.start()
        time.sleep(args.slow_seconds)
        # New clients while the flood goes on: how many get served.
        fresh_ok, fresh_tries = 0, 50
        for _ in range(fresh_tries):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=3)
                conn.request("GET", "/api/fresh")
                if conn.getresponse().status == 200:
                    fresh_ok += 1
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        sockets.stop()
        probe.stop()
        most = max(v for _, v in sockets.values)
        bound = args.max_connections + base_sockets
        # Closed within 0.5 s: refused at accept, over the connection bound.
        at_once = sum(1 for x in lifetimes if x < 0.5)
        timed_out = [x for x in lifetimes if x >= 0.5]
        life = statistics.median(timed_out) if timed_out else float("nan")
        print(f"{label}: {attackers} slowloris clients from {len(threads)} addresses for "
              f"{args.slow_seconds} s against max_connections {args.max_connections}: "
              f"sockets held at most {most} "
              f"(bound {bound}: connections + listeners); {len(timed_out)} slow connections "
              f"closed by the read timeout (2 s) after a median {life:.2f} s, {at_once} "
              f"refused at once over a bound; "
              f"{refused[0]} connects failed; new clients served during the flood: "
              f"{fresh_ok}/{fresh_tries}")
        print(f"{label}: keep-alive client " + probe.summary())
        if most > bound:
            problems.append(f"{most} sockets held, over the bound {bound}")
        if not timed_out or life > 4.0:
            problems.append(f"slow connections not closed by the read timeout ({life})")
        if probe.failures:
            problems.append(f"keep-alive client failures: {probe.failures[:3]}")
        # Slow addresses hold at most 6 x per_ip slots: new clients always find one.
        if per_ip and len(threads) * per_ip < args.max_connections and fresh_ok < fresh_tries:
            problems.append(f"only {fresh_ok}/{fresh_tries} new clients served with a "
                            f"per-address bound")
        if not s.alive():
            problems.append("sluice died")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        code = s.stop()
    if code != 0:
        problems.append(f"sluice exited {code}")
    return problems


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  log_format ids '$http_x_request_id';
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    location / {{
      access_log {dir}/ids.log ids buffer=256k flush=1s;
      return 200 "ok\\n";
    }}
  }}
}}
"""


def scenario_soak(args, work):
    problems = []
    nginx_port = free_port()
    with open(os.path.join(work, "nginx.conf"), "w") as f:
        f.write(NGINX_CONF.format(dir=work, port=nginx_port))
    nginx = subprocess.Popen([NGINX, "-p", work, "-c", os.path.join(work, "nginx.conf"),
                              "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    redis = RedisServer()
    users = 1000
    s = None
    try:
        time.sleep(0.3)
        config = ("store:\n  type: redis\n  address: {addr}\n  timeout: 100ms\n"
                  "  fail_mode: local\n  circuit_breaker: {{failures: 3, open_for: 300ms}}\n"
                  "rate_limits:\n  default:\n    limit: LIMIT\n    window: 1s\n"
                  "    key: header:X-User-Id\n").format(addr=redis.address)
        s = Sluice(args.sluice, work, config.replace("LIMIT", "1000000"),
                   ["--upstream", f"http://127.0.0.1:{nginx_port}"])
        top = peak(args, s.port, "--key-header", "X-User-Id", "--keys", users)
        rate = 0.8 * top
        # About half of each user's requests over the limit: both answers are exercised.
        limit = max(1, int(rate / users / 2))
        s.stop()  # (the peak run's requests carry no id: the upstream logs them as "-")
        s = Sluice(args.sluice, work, config.replace("LIMIT", str(limit)),
                   ["--upstream", f"http://127.0.0.1:{nginx_port}"])
        print(f"soak: peak {top:.0f} req/s through sluice -> nginx; soak at {rate:.0f}/s for "
              f"{args.seconds} s, {users} users at {limit}/s each, Redis restarted every "
              f"{args.restart_every} s")
        rss = Sampler(s.rss_mib, 5)
        degraded = Sampler(lambda: s.metrics()['sluice_degraded_decisions_total{fail_mode="local"}'],
                           1)
        rss.start()
        degraded.start()
        stop = threading.Event()
        restarts = []

        def restarter():
            while not stop.wait(args.restart_every):
                t0 = time.monotonic()
                redis.restart()
                restarts.append(time.monotonic() - t0)

        rt = threading.Thread(target=restarter, daemon=True)
        rt.start()
        ok_ids = os.path.join(work, "ok_ids.txt")
        last, slices = loadgen(args, s.port, rate, args.seconds, 128, "--key-header", "X-User-Id",
                               "--keys", users, "--id-header", "X-Request-Id", "--ok-ids", ok_ids,
                               "--every", 60)
        stop.set()
        rt.join()
        rss.stop()
        degraded.stop()
        time.sleep(1.5)  # nginx flushes its buffered log every second
        for i, sl in enumerate(slices):
            print(f"  minute {i + 1}: {sl['rate']}/s p50 {sl['p50_ms']} ms p99 {sl['p99_ms']} ms "
                  f"max {sl['max_ms']} ms, 2xx {sl['status_2xx']} 429 {sl['status_429']} "
                  f"other {sl['status_other']} errors {sl['errors']}")
        sent, answered = int(last["sent"]), int(last["answered"])
        errors, other = int(last["errors"]), int(last["status_other"])
        with open(ok_ids) as f:
            client_ok = [int(x) for x in f]
        with open(os.path.join(work, "ids.log")) as f:
            upstream = [int(x) for x in f if x.strip().isdigit()]
        dup_client = len(client_ok) - len(set(client_ok))
        dup_upstream = len(upstream) - len(set(upstream))
        lost = len(set(client_ok) - set(upstream))
        unseen = len(set(upstream) - set(client_ok))
        values = [v for _, v in rss.values]
        first_min = [v for t, v in rss.values if t - rss.values[0][0] < 60]
        last_min = [v for t, v in rss.values if rss.values[-1][0] - t < 60]
        growth = statistics.median(last_min) - statistics.median(first_min)
        d = [v for _, v in degraded.values]
        print(f"soak: sent {sent:,}, answered {answered:,}, transport errors {errors}, "
              f"answers other than 200/429 {other}; 2xx {last['status_2xx']}, 429 "
              f"{last['status_429']}; p50 {last['p50_ms']} ms p99 {last['p99_ms']} ms "
              f"p99.9 {last['p999_ms']} ms max {last['max_ms']} ms")
        print(f"soak: upstream saw {len(upstream):,} requests; allowed answers not at the "
              f"upstream {lost}, at the upstream but not answered 2xx {unseen}, duplicates "
              f"client {dup_client} upstream {dup_upstream}")
        print(f"soak: RSS first minute {statistics.median(first_min):.1f} MiB, last minute "
              f"{statistics.median(last_min):.1f} MiB, max {max(values):.1f} MiB; Redis "
              f"restarted {len(restarts)} times; degraded (local) decisions "
              f"{(d[-1] if d else 0):,.0f}")
        if not s.alive():
            problems.append("sluice died")
        if errors or other:
            problems.append(f"{errors} transport errors, {other} answers other than 200/429")
        if sent != answered + errors:
            problems.append(f"{sent - answered - errors} requests never answered")
        if lost or unseen or dup_client or dup_upstream:
            problems.append("requests lost or answered twice")
        if growth > max(8.0, 0.1 * statistics.median(first_min)):
            problems.append(f"RSS grew {growth:.1f} MiB")
        if restarts and (not d or d[-1] == 0):
            problems.append("no degraded decision while Redis restarted")
    finally:
        code = s.stop() if s else 0
        redis.stop()
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(timeout=10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
    if code != 0:
        problems.append(f"sluice exited {code}")
    return verdict(problems)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sluice")
    p.add_argument("loadgen")
    p.add_argument("scenario", choices=["keys", "slow", "soak"])
    p.add_argument("--keys", type=int, default=10_000_000)
    p.add_argument("--max-keys", type=int, default=1_000_000)
    p.add_argument("--max-seconds", type=float, default=1800)
    p.add_argument("--max-connections", type=int, default=1000)
    p.add_argument("--slow-clients", type=int, default=3000)
    p.add_argument("--slow-seconds", type=float, default=15)
    p.add_argument("--per-ip", type=int, default=100)
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--restart-every", type=float, default=60)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-fault-") as work:
        sys.exit({"keys": scenario_keys, "slow": scenario_slow,
                  "soak": scenario_soak}[args.scenario](args, work))


if __name__ == "__main__":
    main()
