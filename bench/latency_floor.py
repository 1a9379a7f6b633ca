#!/usr/bin/env python3
"""The machine's latency floor: round trips of a bare TCP echo on loopback, between the two
cores the benchmarks use, with nothing of Sluice in the path.

Usage: latency_floor.py [--client-core 0] [--server-core 1] [--count 4000] [--gap-ms 0.5]

A forked echo server pinned to --server-core answers each 16-byte message at once; the
client, pinned to --client-core, sends one, waits for the echo, sleeps --gap-ms, and so on
(about 1,500 round trips a second: a light load, where both cores idle between messages).
Prints one line: p50_ms= p99_ms= p999_ms= max_ms= count=. A server's p99 on this machine
cannot be below this floor: whatever the figure is above 0.1 ms is the kernel's and the
hypervisor's wakeups, not the server's work. Loopback only; the server is stopped by PID.
"""
import argparse
import os
import signal
import socket
import time


def serve(listener, core):
    os.sched_setaffinity(0, {core})
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(64)
        if not data:
            os._exit(0)
        conn.sendall(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--client-core", type=int, default=0)
    ap.add_argument("--server-core", type=int, default=1)
    ap.add_argument("--count", type=int, default=4000)
    ap.add_argument("--gap-ms", type=float, default=0.5)
    a = ap.parse_args()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    pid = os.fork()
    if pid == 0:
        serve(listener, a.server_core)
    try:
        os.sched_setaffinity(0, {a.client_core})
        c = socket.create_connection(listener.getsockname(), timeout=5)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * 16
        lat = []
        for i in range(a.count + 100):
            t0 = time.perf_counter()
            c.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(c.recv(64))
            if i >= 100:  # the first ones warm up
                lat.append((time.perf_counter() - t0) * 1000)
            time.sleep(a.gap_ms / 1000)
        c.close()
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    lat.sort()
    n = len(lat)
    print(f"p50_ms={lat[n // 2]:.3f} p99_ms={lat[int(n * 0.99)]:.3f} "
          f"p999_ms={lat[int(n * 0.999)]:.3f} max_ms={lat[-1]:.3f} count={n}")


if __name__ == "__main__":
    main()
