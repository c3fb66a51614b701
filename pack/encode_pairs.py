"""Encoding preference records (:mod:`pack.templates.preference`): each record becomes one
sample holding its chosen side then its rejected side, back to back, with the chosen side's
length beside it (:attr:`pack.encode.ChunkResult.split`), so that the rest of pack-build
(sample store, bin packing, the eval split) treats a pair as one item and never splits it;
the shard writer turns it into two segments.

Overlong pairs (chosen + rejected longer than ``max_length``): ``--overlong drop`` drops and
counts them (``overlong``); ``truncate`` cuts each side at the same cap, the shorter side kept
whole where it fits in half of ``max_length``, so both sides keep their prompt and the start of
their completion: cap = max_length - shorter side when that side is at most max_length // 2,
else max_length // 2. A pair left without a trained token on either side is dropped
(``no-labels-after-truncation``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from . import sanity
from .errors import PacktrainError
from .format import IGNORE_INDEX


def pair_caps(chosen: np.ndarray, rejected: np.ndarray, max_length: int) -> np.ndarray:
    """Per pair, the most tokens each side keeps so that both fit in ``max_length`` (no cut
    where they fit already)."""
    short = np.minimum(chosen, rejected)
    half = max_length // 2
    return np.where(short <= half, max_length - short, half)


def encode_pairs(encoder: Any, records: list[dict]) -> dict[str, Any]:
    """:meth:`pack.encode.Encoder.__call__` for preference records: the fields of its
    :class:`pack.encode.ChunkResult`."""
    from .templates import NothingToTrain

    spec = encoder.spec
    L = int(spec.max_length)
    out, ids, labels, starts, ends = encoder.renderer.encode_flat(records)
    errors: list[tuple[int, str, str]] = []
    dropped: Counter = Counter()
    js: list[int] = []
    kc: list[int] = []
    kr: list[int] = []
    nothing: list[int] = []  # pairs a side of which has nothing to train
    for j in range(len(records)):
        c, r = out[2 * j], out[2 * j + 1]
        if type(c) is int and type(r) is int:
            js.append(j)
            kc.append(c)
            kr.append(r)
            continue
        e = r if type(c) is int else c
        if isinstance(e, NothingToTrain):
            reason = getattr(e, "reason", None) or "empty-response"
            dropped[reason] += 1
            if reason != "identical-pair":  # two whole completions: not a record without labels
                nothing.append(j)
        elif isinstance(e, PacktrainError):
            errors.append((j, str(e), str(getattr(e, "reason", None) or "invalid-record")))
        else:
            raise e
    cs, rs = starts[np.asarray(kc, dtype=np.int64)], starts[np.asarray(kr, dtype=np.int64)]
    cn, rn = ends[np.asarray(kc, dtype=np.int64)] - cs, ends[np.asarray(kr, dtype=np.int64)] - rs
    n = cn + rn
    cut = n > L
    keep = np.ones(len(n), dtype=bool)
    if spec.overlong == "drop":
        dropped["overlong"] += int(np.count_nonzero(cut))
        keep &= ~cut
    cap = pair_caps(cn, rn, L)
    mc, mr = np.minimum(cn, cap), np.minimum(rn, cap)
    trained = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
    nlc, nlr = trained[cs + mc] - trained[cs], trained[rs + mr] - trained[rs]
    lost = keep & ((nlc == 0) | (nlr == 0))
    dropped["no-labels-after-truncation"] += int(np.count_nonzero(lost & cut))
    dropped["empty-response"] += int(np.count_nonzero(lost & ~cut))
    keep &= ~lost
    jrow = np.asarray(js, dtype=np.int64)
    no_labels = np.concatenate([np.asarray(nothing, dtype=np.int64), jrow[lost]])
    cs, rs, mc, mr, cn, rn, cut = (a[keep] for a in (cs, rs, mc, mr, cn, rn, cut))
    kept = jrow[keep]
    m = mc + mr
    flagged = sanity.chunk_flags(no_labels, kept, cs, mc, cut, ids, encoder._bos)
    # chosen then rejected side of every kept pair, back to back
    seg_start = np.stack([cs, rs], axis=1).reshape(-1)
    seg_len = np.stack([mc, mr], axis=1).reshape(-1)
    total = int(seg_len.sum())
    first = np.concatenate([[0], np.cumsum(seg_len)[:-1]]) if len(seg_len) else seg_len
    at = np.repeat(seg_start - first, seg_len) + np.arange(total, dtype=np.int64)
    nl = (nlc + nlr)[keep]
    lost_tokens = (cn + rn) - m
    res = dict(keep=kept, lengths=m.astype(np.int32), ids=ids[at], labels=labels[at],
               label_tokens=int(nl.sum()), truncated=int(np.count_nonzero(cut)),
               truncated_tokens=int(lost_tokens.sum()),
               dropped={k: v for k, v in dropped.items() if v}, errors=errors, flagged=flagged,
               split=mc.astype(np.int32))
    if spec.eval_seed is not None:
        from .eval_split import record_hashes

        res["per_sample"] = {"hash": record_hashes([records[j] for j in kept], spec.eval_seed),
                             "labels": nl.astype(np.int64), "cut": lost_tokens.astype(np.int64)}
    return res
