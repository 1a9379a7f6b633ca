#!/usr/bin/env python3
"""Sticky routing, measured: the same users straight to one Sluice node and through the
shipped nginx (and haproxy) configs to several nodes with the in-memory store, on loopback.

Reports, per path: how exactly each user's limit held (admitted / limit), the decision's
round trip seen by the client (p50/p99, one request at a time on a keep-alive connection,
so the figures include Python's client overhead: compare them between paths), and the
over-admission when one node of N is taken out of the config (the users that move start
fresh; consistent hashing should move about 1/N of them).

Usage: bench/sticky.py path/to/sluice [users, default 200] [rounds, default 3]
Bounded: a few tens of seconds. Nodes run decision-only (no upstream), so the latency is the
decision plus the balancer's hop.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                "integration"))
import server_test  # noqa: E402
import sticky_test  # noqa: E402  (Nginx, Haproxy, Client, run_users, CONFIG, LIMIT)

LIMIT = sticky_test.LIMIT


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_pass(port, users, tag):
    """Every user sends twice its limit, one request at a time. Returns (per-user admitted
    counts, latencies in microseconds)."""
    client = sticky_test.Client(port)
    admitted, lat = [], []
    try:
        for u in users:
            ok = 0
            for _ in range(2 * LIMIT):
                t0 = time.perf_counter()
                status = client.send("GET", "/api/items", [f"{tag}-{u}"])
                lat.append((time.perf_counter() - t0) * 1e6)
                ok += status == 200
            admitted.append(ok)
    finally:
        client.close()
    return admitted, lat


def start_nodes(config, count):
    return [server_test.Server(config) for _ in range(count)]


def stop_all(things):
    for t in things:
        t.stop()


def addresses(nodes, indexes):
    return [(i + 1, f"127.0.0.1:{nodes[i].port}") for i in indexes]


def latency_table(config, users, rounds, proxies):
    rows = {}
    for r in range(rounds):
        nodes = start_nodes(config, 2)
        fronts = [("direct to one node", nodes[0].port, None)]
        for proxy in proxies:
            p = proxy(server_test.free_port(), addresses(nodes, [0, 1]))
            fronts.append((f"{proxy.__name__.lower()} -> 2 nodes", p.port, p))
        try:
            for name, port, _ in fronts:
                admitted, lat = one_pass(port, range(users), f"r{r}-{name.split()[0]}")
                row = rows.setdefault(name, {"p50": [], "p99": [], "exact": [], "ratio": []})
                row["p50"].append(percentile(lat, 0.50))
                row["p99"].append(percentile(lat, 0.99))
                row["exact"].append(sum(a == LIMIT for a in admitted))
                row["ratio"].append(sum(admitted) / (LIMIT * len(admitted)))
        finally:
            stop_all([p for _, _, p in fronts if p] + nodes)
    direct = statistics.median(rows["direct to one node"]["p50"])
    print(f"\n{users} users x {2 * LIMIT} requests (limit {LIMIT}/min each), medians of "
          f"{rounds} rounds\n")
    print("| path | users held exactly to the limit | admitted / limit | p50 µs | p99 µs "
          "| p50 vs direct |")
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        p50 = statistics.median(row["p50"])
        print(f"| {name} | {min(row['exact'])}/{users} | {statistics.median(row['ratio']):.3f} "
              f"| {p50:.0f} | {statistics.median(row['p99']):.0f} | {p50 / direct:.2f}x |")


def removal_table(config, users, proxies):
    print(f"\nOne node taken out of the config (reload), {users} users, each filled to its "
          f"limit before and sending {LIMIT} more after\n")
    print("| balancer | nodes | users moved | expected 1/N | over-admission (requests) "
          "| over-admission / users' total limit | others' extra admissions |")
    print("|---|---|---|---|---|---|---|")
    for proxy in proxies:
        for count in (2, 3, 4):
            nodes = start_nodes(config, count)
            p = proxy(server_test.free_port(), addresses(nodes, range(count)))
            try:
                names = [f"{proxy.__name__}-{count}-{u}" for u in range(users)]
                before = sticky_test.run_users(p.port, names, LIMIT)
                assert all(s == [200] * LIMIT for s in before.values())
                gone = count // 2  # a middle one: the ring positions of the rest must hold
                home = {}
                for n in names:
                    for i, node in enumerate(nodes):
                        if sticky_test.used(node, "default/limit", f"user_id={n}"):
                            home[n] = i
                p.reload(addresses(nodes, [i for i in range(count) if i != gone]))
                after = sticky_test.run_users(p.port, names, LIMIT)
                moved = [n for n in names if home[n] == gone]
                extra_moved = sum(after[n].count(200) for n in moved)
                extra_others = sum(after[n].count(200) for n in names if home[n] != gone)
                print(f"| {proxy.__name__.lower()} | {count} | {len(moved)}/{users} "
                      f"({len(moved) / users:.2f}) | {1 / count:.2f} | {extra_moved} "
                      f"({LIMIT} x {len(moved)}) | {extra_moved / (LIMIT * users):.2f} "
                      f"| {extra_others} |")
            finally:
                stop_all([p] + nodes)


def main():
    server_test.BIN = os.path.abspath(sys.argv[1])
    users = int(sys.argv[2]) if len(sys.argv) > 2 else 200
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    proxies = [sticky_test.Nginx]
    if os.access(sticky_test.HAPROXY, os.X_OK):
        proxies.append(sticky_test.Haproxy)
    else:
        print(f"haproxy not installed ({sticky_test.HAPROXY}): nginx only", file=sys.stderr)
    config = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sluice-sticky-{os.getpid()}.yaml")
    with open(config, "w") as f:
        f.write(sticky_test.CONFIG)
    try:
        latency_table(config, users, rounds, proxies)
        removal_table(config, users, proxies)
    finally:
        os.unlink(config)


if __name__ == "__main__":
    main()
