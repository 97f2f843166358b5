#!/usr/bin/env python3
"""Plots deliveries/s and p99 latency against subscribers for the fan-out
runs of scripts/bench-compare.sh: Volna, the bare-quinn ceiling, NATS core.

usage: plot-bench.py RESULTS.jsonl OUT.svg
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SERIES = {
    "volna": ("Volna (persisted, durability=wal)", "tab:blue"),
    "ceiling": ("bare quinn, no broker", "tab:gray"),
    "nats": ("NATS core (no persistence)", "tab:orange"),
}


def main(results_path, out_path):
    points = {label: [] for label in SERIES}
    with open(results_path) as f:
        for line in f:
            run = json.loads(line)
            if run["label"] in points:
                r = run["result"]
                points[run["label"]].append(
                    (r["subscribers"], r["deliveries_per_sec"], r["latency_us"]["p99"] / 1000)
                )
    fig, (rate, p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, (name, color) in SERIES.items():
        pts = sorted(points[label])
        if not pts:
            continue
        s = [p[0] for p in pts]
        rate.plot(s, [p[1] / 1e6 for p in pts], marker="o", color=color, label=name)
        p99.plot(s, [p[2] for p in pts], marker="o", color=color, label=name)
    for ax in (rate, p99):
        ax.set_xscale("log")
        ax.set_xlabel("subscribers (one connection each)")
        ax.grid(True, which="both", alpha=0.3)
    rate.set_ylabel("million deliveries / s")
    rate.set_title("Fan-out throughput, 64 B, max rate")
    p99.set_yscale("log")
    p99.set_ylabel("p99 end-to-end latency (ms)")
    p99.set_title("p99 latency at max rate")
    rate.legend(loc="best", fontsize=8)
    fig.suptitle("volna bench on 2 cores (broker and generator share them)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
