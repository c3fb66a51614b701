"""Bin packing of sample lengths into packs of at most ``max_length`` tokens.

This module is the packing step of ``pack-build``: it sees only an array of sample lengths (token counts)
and returns *bins*, each an int64 array of indices into that array. It knows nothing about tokens,
Arrow or torch; it is pure numpy + stdlib, so it can be tested and benchmarked on its own.

Contract of :func:`pack`:

* every index ``0 .. len(lengths) - 1`` appears in exactly one bin, and no bin holds more than
  ``max_length`` tokens;
* samples are never cut: a length ``> max_length`` (or ``<= 0``) raises ``ValueError``; the caller
  truncates or drops overlong samples first, and counts them;
* the result depends only on the inputs: sorts are stable, ties are broken by sample index or bin
  number, never by hash order. Bins come back in the order they were opened; inside a bin the
  indices are ascending, so a pack reads in dataset order. The caller shuffles packs with its own seed.

Strategies (:data:`STRATEGIES`):

``bfd`` (default)
    Best-fit decreasing over the whole dataset: samples are taken longest first (ties by index) and
    each goes into the open bin with the *least* remaining room that still fits it (ties: lowest bin
    number); a new bin is opened only when none fits. Bins are kept grouped by remaining capacity (a
    dict ``capacity -> heap of bin numbers`` plus a sorted list of the capacities in use, searched with
    ``bisect``), and a run of equal lengths is placed one capacity level at a time (same result as
    item by item): one million lengths pack in well under a second.
``ffd``
    First-fit decreasing: same order, each sample goes into the *lowest-numbered* bin that fits it.
    Gives exactly the classic FFD result, computed one run of equal lengths at a time with numpy
    (a run of identical items fills the fitting bins in bin order, each taking as many as fit), using
    per-block maxima of the remaining capacity to skip full regions.
``next-fit``
    Dataset order; close the current bin and open a new one when the next sample does not fit
    (torchtune's packer). Only one bin is ever open, so it streams, but it wastes the most.
``none``
    One sample per bin: no packing (the padding baseline).

Why BFD over the whole dataset instead of per batch: a greedy packer wastes room in the bins whose
gap no remaining sample can fill. Packing per batch of ~1,000 samples (TRL's ``pack_dataset`` through
``datasets.map``, LLaMA-Factory's knapsack) leaves every batch with its own half-empty last bins, and a
long sample can only be paired with the few short ones that happen to share its batch. That loss is
paid once per batch, so it does not shrink as the dataset grows, and it grows with max_length: 1,000
chat turns of ~70 tokens fill barely two 32k packs, so the ragged last pack of each batch costs ~20 %
(benchmarks/pack_quality.py: TRL needs 3.0 % more packs than the lower bound at 4k and 21.9 % at
32k on chitchat turn pairs). Sorting the *whole* dataset gives the long samples the entire pool of
short ones to fill their gaps, and only the last few bins stay partly empty: on the same data BFD
ends 0.00-0.08 % above the lower bound ``ceil(sum(lengths) / max_length)``.

The ``seed`` argument is accepted for a stable signature and recorded by callers; none of the current
strategies is random, so it does not change the result.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["STRATEGIES", "DEFAULT_STRATEGY", "pack", "lower_bound", "stats", "check_bins"]

STRATEGIES: tuple[str, ...] = ("bfd", "ffd", "next-fit", "none")
DEFAULT_STRATEGY = "bfd"

# FFD: bins are grouped in blocks of this many for the per-block maximum of remaining capacity.
_FFD_BLOCK = 512
# FFD: most blocks examined in one numpy step (the step starts at 1 and doubles up to this).
_FFD_MAX_BATCH = 64


def _as_lengths(lengths: np.ndarray | Sequence[int], max_length: int) -> np.ndarray:
    """Validate and return ``lengths`` as a 1-D int64 array."""
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)):
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"lengths must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize >= 8 and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError("length too large")
    arr = arr.astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo <= 0:
        bad = int(np.flatnonzero(arr <= 0)[0])
        raise ValueError(f"sample {bad} has length {int(arr[bad])}; lengths must be >= 1")
    if hi > max_length:
        bad = int(np.flatnonzero(arr > max_length)[0])
        raise ValueError(
            f"sample {bad} has length {int(arr[bad])} > max_length {max_length}; "
            "truncate or drop overlong samples before packing"
        )
    return arr


def lower_bound(lengths: np.ndarray | Sequence[int], max_length: int) -> int:
    """The fewest packs any packer could use: ``ceil(sum(lengths) / max_length)``."""
    arr = _as_lengths(lengths, max_length)
    total = int(arr.sum())
    return -(-total // max_length)


def _split_bins(bin_of: np.ndarray, nbins: int) -> list[np.ndarray]:
    """Turn ``bin_of[i] = bin number of sample i`` into a list of ascending index arrays."""
    order = np.argsort(bin_of, kind="stable").astype(np.int64, copy=False)
    bounds = np.cumsum(np.bincount(bin_of, minlength=nbins)).tolist()
    out: list[np.ndarray] = []
    start = 0
    for end in bounds:
        out.append(order[start:end])
        start = end
    return out


def _bfd(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, int]:
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    # Runs of equal length L in the sorted order are placed together. Item by item, best fit puts the
    # first item of a run into the lowest-numbered bin of the smallest capacity c >= L; that bin is
    # then still the tightest fit (c - L < c, and no bin has room in [L, c)) until it has taken
    # c // L items; then the next bin at c, and so on up the capacities. So each capacity level is
    # handled in one step, and its bins move together to capacity c % L. Exactly item-by-item BFD.
    starts = np.flatnonzero(np.concatenate(([True], sorted_lengths[1:] != sorted_lengths[:-1])))
    ends = np.append(starts[1:], n)
    caps: list[int] = []  # ascending remaining capacities (> 0) that currently have bins
    heaps: dict[int, list[int]] = {}  # capacity -> min-heap of the bin numbers at that capacity
    out = [0] * n  # bin number of each sample, in sorted order
    nbins = 0
    bisect_left = bisect.bisect_left
    heappop, heappush, heapify = heapq.heappop, heapq.heappush, heapq.heapify

    def add(cap: int, ids: list[int]) -> bool:
        """Put bins ``ids`` at capacity ``cap``; True if ``cap`` is a new entry of ``caps``."""
        heap = heaps.get(cap)
        if heap is None:
            heaps[cap] = sorted(ids) if len(ids) > 1 else ids
            caps.insert(bisect_left(caps, cap), cap)
            return True
        if len(ids) * 8 < len(heap):
            for b in ids:
                heappush(heap, b)
        else:
            heap.extend(ids)
            heapify(heap)
        return False

    def spread(ids: list[int], per: int) -> list[int]:
        return [b for b in ids for _ in range(per)] if per > 1 else ids

    for s, e, length in zip(starts.tolist(), ends.tolist(), sorted_lengths[starts].tolist()):
        todo = e - s
        pos = s
        i = bisect_left(caps, length)
        while todo and i < len(caps):
            cap = caps[i]
            heap = heaps[cap]
            per = cap // length
            nfull, rest = divmod(todo, per)
            if nfull >= len(heap):  # every bin at this capacity takes `per` items
                ids = sorted(heap)
                del caps[i]
                del heaps[cap]
                got = len(ids) * per
                out[pos : pos + got] = spread(ids, per)
                pos += got
                todo -= got
                left = cap - per * length
                if left and add(left, ids):
                    i += 1  # left < length <= cap: the new entry went in below i
            else:  # the run ends at this capacity
                full = [heappop(heap) for _ in range(nfull)]
                out[pos : pos + nfull * per] = spread(full, per)
                pos += nfull * per
                part = heappop(heap) if rest else -1
                out[pos : pos + rest] = [part] * rest
                if not heap:
                    del caps[i]
                    del heaps[cap]
                todo = 0
                left = cap - per * length
                if full and left:
                    add(left, full)
                if rest:
                    add(cap - rest * length, [part])
        if todo:  # nothing fits: open bins, each taking as many of the run as fit
            per = max_length // length
            nfull, rest = divmod(todo, per)
            full = list(range(nbins, nbins + nfull))
            nbins += nfull
            out[pos : pos + nfull * per] = spread(full, per)
            pos += nfull * per
            left = max_length - per * length
            if full and left:
                add(left, full)
            if rest:
                out[pos : pos + rest] = [nbins] * rest
                add(max_length - rest * length, [nbins])
                nbins += 1
    bin_of = np.empty(n, dtype=np.int64)
    bin_of[order] = np.asarray(out, dtype=np.int64)
    return bin_of, nbins


def _ffd(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, int]:
    n = len(lengths)
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    # Runs of equal length in the sorted order. Items of one run are identical, so first fit places
    # them by walking the bins that fit in bin order, each taking as many as its room allows; then
    # opening new bins that take floor(max_length / L) each. This is exactly item-by-item FFD.
    starts = np.flatnonzero(np.concatenate(([True], sorted_lengths[1:] != sorted_lengths[:-1])))
    ends = np.append(starts[1:], n)
    block = _FFD_BLOCK
    nblocks_max = -(-n // block)
    caps = np.zeros(nblocks_max * block, dtype=np.int64)  # remaining room; 0 for unopened bins
    caps2d = caps.reshape(nblocks_max, block)
    block_max = np.zeros(nblocks_max, dtype=np.int64)
    in_block = np.arange(block, dtype=np.int64)
    bin_of_sorted = np.empty(n, dtype=np.int64)
    nbins = 0
    for s, e, length in zip(starts.tolist(), ends.tolist(), sorted_lengths[starts].tolist()):
        todo = e - s
        pos = s
        if todo == 1:  # a lone length (common in the long tail): scalar fast path
            fits = block_max[: -(-nbins // block)] >= length
            blk = int(fits.argmax()) if len(fits) else 0
            if len(fits) and fits[blk]:
                row = caps2d[blk]
                j = int((row >= length).argmax())
                row[j] -= length
                block_max[blk] = row.max()
                bin_of_sorted[s] = blk * block + j
            else:
                blk = nbins // block
                caps[nbins] = max_length - length
                block_max[blk] = max(int(block_max[blk]), max_length - length)
                bin_of_sorted[s] = nbins
                nbins += 1
            continue
        cand = np.flatnonzero(block_max[: -(-nbins // block)] >= length)
        ci, step = 0, 1
        while todo and ci < len(cand):
            blocks = cand[ci : ci + step]
            ci += step
            step = min(step * 2, _FFD_MAX_BATCH)
            idx = (blocks[:, None] * block + in_block).ravel()
            room = caps[idx]
            fits = room >= length
            targets = idx[fits]
            take = room[fits] // length
            cum = np.cumsum(take)
            if cum[-1] >= todo:
                t = int(np.searchsorted(cum, todo))  # first bin where the run is used up
                targets = targets[: t + 1]
                take = take[: t + 1].copy()
                take[-1] = todo - (int(cum[t - 1]) if t else 0)
            placed = int(take.sum())
            caps[targets] -= take * length
            bin_of_sorted[pos : pos + placed] = np.repeat(targets, take)
            pos += placed
            todo -= placed
            block_max[blocks] = caps2d[blocks].max(axis=1)
        if todo:  # open new bins, each filled with as many of the run as fit
            per = max_length // length
            nnew = -(-todo // per)
            new = np.arange(nbins, nbins + nnew, dtype=np.int64)
            take = np.full(nnew, per, dtype=np.int64)
            take[-1] = todo - per * (nnew - 1)
            caps[new] = max_length - take * length
            bin_of_sorted[pos : pos + todo] = np.repeat(new, take)
            touched = np.arange(nbins // block, (nbins + nnew - 1) // block + 1)
            block_max[touched] = caps2d[touched].max(axis=1)
            nbins += nnew
    bin_of = np.empty(n, dtype=np.int64)
    bin_of[order] = bin_of_sorted
    return bin_of, nbins


def _next_fit(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, int]:
    n = len(lengths)
    opens = [False] * n  # opens[i]: sample i starts a new bin
    used = max_length  # forces a new bin for the first sample
    for i, length in enumerate(lengths.tolist()):
        used += length
        if used > max_length:
            opens[i] = True
            used = length
    bin_of = np.cumsum(np.asarray(opens, dtype=np.int64)) - 1
    return bin_of, int(bin_of[-1]) + 1 if n else 0


def _none(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, int]:
    return np.arange(len(lengths), dtype=np.int64), len(lengths)


_PACKERS = {"bfd": _bfd, "ffd": _ffd, "next-fit": _next_fit, "none": _none}
assert tuple(_PACKERS) == STRATEGIES


def pack(
    lengths: np.ndarray | Sequence[int],
    max_length: int,
    strategy: str = DEFAULT_STRATEGY,
    seed: int = 0,
) -> list[np.ndarray]:
    """Pack samples of the given ``lengths`` into bins of at most ``max_length`` tokens.

    Returns a list of bins in the order they were opened; each bin is an int64 array of sample
    indices, ascending. Every index appears in exactly one bin. Raises ``ValueError`` if any length
    is ``<= 0`` or ``> max_length`` or the strategy is unknown. ``seed`` does not affect the current
    (deterministic) strategies; see the module docstring.
    """
    if strategy not in _PACKERS:
        raise ValueError(f"unknown packing strategy {strategy!r}; choose one of {STRATEGIES}")
    arr = _as_lengths(lengths, max_length)
    if arr.size == 0:
        return []
    bin_of, nbins = _PACKERS[strategy](arr, int(max_length))
    return _split_bins(bin_of, nbins)


def check_bins(bins: Sequence[np.ndarray], lengths: np.ndarray | Sequence[int], max_length: int) -> None:
    """Raise ``ValueError`` unless ``bins`` is a valid packing of ``lengths`` (each index once, no bin
    over ``max_length``, no empty bin)."""
    arr = _as_lengths(lengths, max_length)
    n = len(arr)
    if not bins:
        if n:
            raise ValueError(f"no bins for {n} samples")
        return
    sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    if (sizes == 0).any():
        raise ValueError(f"bin {int(np.flatnonzero(sizes == 0)[0])} is empty")
    flat = np.concatenate([np.asarray(b, dtype=np.int64) for b in bins])
    if len(flat) != n or (n and (flat.min() < 0 or flat.max() >= n)):
        raise ValueError(f"bins hold {len(flat)} indices for {n} samples (or an index out of range)")
    if (np.bincount(flat, minlength=n) != 1).any():
        raise ValueError("some sample is in no bin or in more than one")
    tokens = np.add.reduceat(arr[flat], np.concatenate(([0], np.cumsum(sizes)[:-1])))
    if (tokens > max_length).any():
        bad = int(np.flatnonzero(tokens > max_length)[0])
        raise ValueError(f"bin {bad} holds {int(tokens[bad])} tokens > max_length {max_length}")


def stats(bins: Sequence[np.ndarray], lengths: np.ndarray | Sequence[int], max_length: int) -> dict:
    """Quality of a packing: packs, samples, tokens, lower_bound, ratio (packs / lower bound) and
    fill (tokens / (packs * max_length))."""
    arr = _as_lengths(lengths, max_length)
    packs = len(bins)
    flat = np.concatenate([np.asarray(b, dtype=np.int64) for b in bins]) if packs else np.zeros(0, np.int64)
    tokens = int(arr[flat].sum())
    lb = -(-tokens // max_length)
    return {
        "packs": packs,
        "samples": len(flat),
        "tokens": tokens,
        "lower_bound": lb,
        "ratio": packs / lb if lb else (1.0 if packs == 0 else math.inf),
        "fill": tokens / (packs * max_length) if packs else 0.0,
    }
