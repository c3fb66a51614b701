"""The statistics of a build: what it counts while encoding (:class:`Counts`), the ``stats``
entry of its manifest (:func:`build_stats`, with its histograms) and the closing summary that
pack-build and pack-merge print (:func:`summary`)."""

from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

TIMING_FIELDS = ("seconds", "tokens_per_s")  # the only stats that vary between equal builds
FILL_EDGES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


@dataclasses.dataclass
class Counts:
    """What encoding counted. ``records`` covers every partition's records (they set the
    record numbers); ``own_records`` only this build's (its partition's)."""

    skipped: Counter  # invalid records the reader skipped, by reason
    records: int = 0
    own_records: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    label_tokens: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    invalid: Counter = dataclasses.field(default_factory=Counter)  # records the renderer refused


def build_stats(counts: Counts, lengths: np.ndarray, pack_tokens: np.ndarray, packs: int,
                max_length: int, seconds: float) -> dict:
    """The manifest's ``stats`` of a build that packed samples of ``lengths`` into ``packs``
    packs holding ``pack_tokens`` tokens each."""
    from .binpack import lower_bound

    tokens = int(lengths.sum())
    return {
        "records": counts.own_records,
        "samples_packed": int(len(lengths)),
        "dropped": dict(sorted(counts.dropped.items())),
        "skipped_invalid": dict(sorted((counts.skipped + counts.invalid).items())),
        "truncated": int(counts.truncated),
        "truncated_tokens": int(counts.truncated_tokens),
        "tokens": tokens,
        "label_tokens": int(counts.label_tokens),
        "packs": packs,
        "lower_bound": int(lower_bound(lengths, max_length)),
        "fill": round(tokens / (packs * max_length), 6),
        "length_histogram": length_histogram(lengths, max_length),
        "fill_histogram": fill_histogram(pack_tokens, max_length),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
    }


def length_histogram(lengths: np.ndarray, max_length: int) -> dict[str, list[int]]:
    """Counts of sample lengths in ``[edges[i], edges[i+1])``; edges are 1, then powers of two
    from 16 below max_length, then max_length + 1."""
    edges = [1] + [1 << k for k in range(4, 40) if (1 << k) < max_length] + [max_length + 1]
    counts, _ = np.histogram(np.asarray(lengths), bins=np.asarray(edges))
    return {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}


def fill_histogram(pack_tokens: np.ndarray, max_length: int) -> dict[str, list]:
    """Counts of packs by fill (tokens / max_length) in ``[edges[i], edges[i+1])``, the last bin
    closed."""
    fills = np.asarray(pack_tokens, dtype=np.float64) / max_length
    counts, _ = np.histogram(fills, bins=np.asarray(FILL_EDGES))
    return {"edges": FILL_EDGES, "counts": [int(c) for c in counts]}


def summary(manifest: dict, where: dict[str, str] | None = None) -> str:
    """The closing summary of a build (``where``: the first record of each check, FILE:LINE)."""
    from .card import fmt_bytes
    from .sanity import check_lines

    s = manifest["stats"]

    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v:,}" for k, v in d.items()) if d else "none"

    size = sum(sh["bytes"] for sh in manifest["shards"])
    lines = [
        f"records read    {s['records']:,}",
        f"samples packed  {s['samples_packed']:,}",
        f"dropped         {counts(s.get('dropped', {}))}",
        f"skipped invalid {counts(s.get('skipped_invalid', {}))}",
        f"truncated       {s['truncated']:,} ({s.get('truncated_tokens', 0):,} tokens cut off)",
        f"tokens          {s['tokens']:,} ({s['label_tokens']:,} with labels)",
        f"packs           {s['packs']:,} (lower bound {s['lower_bound']:,}; fill "
        f"{100 * s['fill']:.2f}% of {manifest['max_length']:,})",
        f"shards          {len(manifest['shards'])} ({fmt_bytes(size)})",
    ]
    if "pairs" in s:  # a preference dataset: its samples are the segments of pairs
        p = s["pairs"]
        lines.insert(2, f"pairs           {p['packed']:,} packed of {p['in']:,} (dropped "
                        f"{counts(p['dropped'])}); 2 segments each, chosen then rejected")
    if "seconds" in s:
        lines.append(f"time            {s['seconds']:.1f} s ({s.get('tokens_per_s', 0):,.0f} "
                     f"tokens/s)")
    return "\n".join(lines + check_lines(manifest.get("checks"), where))
