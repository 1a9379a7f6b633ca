#!/usr/bin/env python3
"""Summarizes bench/micro's JSON output (medians) into the table the README quotes."""
import json
import re
import sys

ALGORITHMS = ["fixed_window", "sliding_window_log", "sliding_window_counter",
              "token_bucket", "gcra", "leaky_queue"]
COMPACT = {"fixed_window", "sliding_window_counter", "token_bucket", "gcra"}


def main(path):
    with open(path) as f:
        data = json.load(f)
    med = {}
    for b in data["benchmarks"]:
        if b.get("aggregate_name") != "median":
            continue
        name = b["run_name"]
        med[name] = b
    def find(prefix, algo, threads):
        for name, b in med.items():
            if name.startswith(f"{prefix}/{algo}/") and name.endswith(f"threads:{threads}"):
                return b
        return None

    dram = next((b for n, b in med.items() if n.startswith("dram_latency_reference")), None)
    dram_ns = dram["real_time"] if dram else float("nan")
    print(f"DRAM latency reference (one dependent cache-missing load): {dram_ns:.0f} ns\n")
    print("| algorithm | hot key ns | 1M keys ns | 10M keys ns | 10M / DRAM | 2T/1T at 1M | "
          "2T/1T at 10M | bytes/key at 10M |")
    print("|---|---|---|---|---|---|---|---|")
    for a in ALGORITHMS:
        hot = find("hot_key", a, 1)
        k1, k1t2 = find("keys_1M", a, 1), find("keys_1M", a, 2)
        k10, k10t2 = find("keys_10M", a, 1), find("keys_10M", a, 2)
        if not all([hot, k1, k1t2, k10, k10t2]):
            continue
        ratio1 = k1t2["items_per_second"] / k1["items_per_second"]
        ratio10 = k10t2["items_per_second"] / k10["items_per_second"]
        bpk = k10.get("bytes_per_key", float("nan"))
        mark = lambda ok: "" if ok else " ✗"
        print(f"| {a} | {hot['real_time']:.1f}{mark(hot['real_time'] <= 25)} "
              f"| {k1['real_time']:.0f} | {k10['real_time']:.0f}{mark(k10['real_time'] <= 150)} "
              f"| {k10['real_time'] / dram_ns:.2f} "
              f"| {ratio1:.2f}{mark(ratio1 >= 1.7)} | {ratio10:.2f}{mark(ratio10 >= 1.7)} "
              f"| {bpk:.1f}{mark(a not in COMPACT or bpk <= 48)} |")
    print("\n✗: misses the target (hot key <= 25 ns, 10M keys <= 150 ns, 2T/1T >= 1.7, "
          "<= 48 bytes/key for fixed window, sliding window counter, token bucket, GCRA)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/micro.json")
