"""Writing a build's eval split (:mod:`pack.eval_split` decides it): the held-out samples are
packed into ``OUT/eval/`` and published there (manifest last) before the parent's manifest, so a
complete parent always has a complete eval dataset; a failure removes ``OUT/eval/`` whole.

The samples of both sides stay in the build's one sample store; each side is a view of the
encoded build (its samples' lengths, record numbers and rows in the store) with its own counts.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import format as fmt_mod
from .eval_split import EvalRule, choose, parent_entry
from .files import file_sha256
from .outdir import EVAL_DIR, cleanup, prepare_out_dir
from .stats import Counts

# write(encoded side, its directory, its shard writer, more manifest fields) -> its manifest
WriteFn = Callable[[Any, Path, fmt_mod.ShardWriter, dict], dict]


class HeldOut:
    """The eval dataset of one build, from creating ``OUT/eval/`` to publishing it."""

    def __init__(self, out: Path, max_packs: int | None, max_bytes: int | None,
                 preference: bool = False):
        self.out = out / EVAL_DIR
        self.writer: fmt_mod.ShardWriter | None = None
        self.max_packs, self.max_bytes = max_packs, max_bytes
        self.preference = preference

    def write(self, rule: EvalRule, encoded: Any, write: WriteFn) -> tuple[Any, dict]:
        """Divide ``encoded`` (the whole build's samples), write the held-out side as
        ``OUT/eval/``; return the training side and the parent's extra manifest fields."""
        per = encoded.per_sample
        held, threshold = choose(per["hash"], rule)
        train_counts, eval_counts = split_counts(encoded.counts, held, per["labels"], per["cut"])
        split = rule.record(threshold)
        prepare_out_dir(self.out, overwrite=True)  # OUT's own preparation emptied it
        self.writer = fmt_mod.ShardWriter(self.out, max_packs=self.max_packs,
                                          max_bytes=self.max_bytes, preference=self.preference)
        manifest = write(_side(encoded, held, eval_counts), self.out, self.writer,
                         {"eval_of": {"parent": "..", "split": split}})
        sha = file_sha256(self.out / fmt_mod.MANIFEST)
        return (_side(encoded, ~held, train_counts),
                {"eval": parent_entry(manifest, sha, split)})

    def abort(self) -> None:
        """After a failure: remove everything of ``OUT/eval/``, its manifest first."""
        # anything in OUT/eval is this build's: OUT's preparation removed any older one
        (self.out / fmt_mod.MANIFEST).unlink(missing_ok=True)  # first: never complete-looking
        cleanup(self.out, self.writer, remove_shards=True, remove_dir=True)


def _side(encoded: Any, mask: np.ndarray, counts: Any) -> Any:
    """The samples of ``encoded`` where ``mask`` holds, as a view onto the same sample store."""
    rows = np.flatnonzero(mask)
    return dataclasses.replace(encoded, lengths=encoded.lengths[rows],
                               sample_index=encoded.sample_index[rows], counts=counts,
                               per_sample=None, rows=rows, store_lengths=encoded.lengths,
                               splits=None if encoded.splits is None else encoded.splits[rows])


def split_counts(counts: Counts, held: np.ndarray, sample_labels: np.ndarray,
                 sample_cut: np.ndarray) -> tuple[Counts, Counts]:
    """The build's counts divided between training and eval: held-out samples' records, label
    tokens and truncation move to eval; what was dropped or invalid stays with training."""
    cut = sample_cut[held]
    ev = Counts(skipped=Counter(), records=int(np.count_nonzero(held)),
                own_records=int(np.count_nonzero(held)),
                truncated=int(np.count_nonzero(cut)), truncated_tokens=int(cut.sum()),
                label_tokens=int(sample_labels[held].sum()))
    train = dataclasses.replace(counts, own_records=counts.own_records - ev.own_records,
                                truncated=counts.truncated - ev.truncated,
                                truncated_tokens=counts.truncated_tokens - ev.truncated_tokens,
                                label_tokens=counts.label_tokens - ev.label_tokens)
    return train, ev
