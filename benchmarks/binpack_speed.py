"""How fast is pack.binpack? Each strategy on one million sample lengths.

Lengths are drawn from a lognormal distribution with a median of 300 tokens (sigma 1.0, a long tail
like chat and instruction data), clipped to [1, max_length], seed 0. Each (strategy, max_length) is
timed three times and the median reported; the time covers the whole `pack()` call (validation,
sort, packing and building the list of index arrays).

    python benchmarks/binpack_speed.py [--n 1000000] [--repeats 3]

Prints a table and writes benchmarks/results/binpack_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import environment, table, write_json

from pack import binpack

MAX_LENGTHS = (4096, 32768)


def lognormal_lengths(n: int, max_length: int, median: float = 300.0, sigma: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.lognormal(np.log(median), sigma, n)
    return np.clip(np.rint(x), 1, max_length).astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="number of lengths (default 1,000,000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is reported")
    args = ap.parse_args()

    rows = []
    for max_length in MAX_LENGTHS:
        lengths = lognormal_lengths(args.n, max_length)
        for strategy in binpack.STRATEGIES:
            if strategy == "none":
                continue  # no packing: nothing to time
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                bins = binpack.pack(lengths, max_length, strategy)
                times.append(time.perf_counter() - t0)
            binpack.check_bins(bins, lengths, max_length)
            st = binpack.stats(bins, lengths, max_length)
            rows.append({
                "strategy": strategy,
                "max_length": max_length,
                "n": args.n,
                "seconds_median": statistics.median(times),
                "seconds": times,
                "us_per_sample": statistics.median(times) / args.n * 1e6,
                "packs": st["packs"],
                "lower_bound": st["lower_bound"],
                "ratio": st["ratio"],
                "fill": st["fill"],
            })
            print(f"  {strategy:9s} max_length={max_length:6d}: {statistics.median(times):.3f} s", flush=True)

    print()
    print(f"pack.binpack on {args.n:,} lognormal lengths (median 300, sigma 1), median of {args.repeats} runs")
    print(table(rows, [
        ("strategy", "strategy", "s"),
        ("max_length", "max_length", "d"),
        ("seconds_median", "seconds", ".3f"),
        ("us_per_sample", "us/sample", ".2f"),
        ("packs", "packs", ","),
        ("lower_bound", "lower bound", ","),
        ("ratio", "packs/LB", ".5f"),
        ("fill", "fill", ".4f"),
    ]))
    path = write_json("binpack_speed.json", {
        "benchmark": "binpack_speed",
        "lengths": {"distribution": "lognormal", "median": 300, "sigma": 1.0, "seed": 0, "n": args.n},
        "repeats": args.repeats,
        "environment": environment(),
        "results": rows,
    })
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
