"""Writing a build's eval split (:mod:`pack.eval_split` decides it): the held-out samples are
packed into ``OUT/eval/`` and published there (manifest last) before the parent's manifest, so a
complete parent always has a complete eval dataset; a failure removes ``OUT/eval/`` whole.

The samples of both sides stay in the build's one sample store; each side is a view of the
encoded build (its samples' lengths, record numbers and rows in the store) with its own counts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import format as fmt_mod
from .eval_split import EvalRule, choose, parent_entry, split_counts
from .files import file_sha256
from .outdir import EVAL_DIR, cleanup, prepare_out_dir

# write(encoded side, its directory, its shard writer, more manifest fields) -> its manifest
WriteFn = Callable[[Any, Path, fmt_mod.ShardWriter, dict], dict]


class HeldOut:
    """The eval dataset of one build, from creating ``OUT/eval/`` to publishing it."""

    def __init__(self, out: Path, max_packs: int | None, max_bytes: int | None):
        self.out = out / EVAL_DIR
        self.writer: fmt_mod.ShardWriter | None = None
        self.max_packs, self.max_bytes = max_packs, max_bytes

    def write(self, rule: EvalRule, encoded: Any, write: WriteFn) -> tuple[Any, dict]:
        """Divide ``encoded`` (the whole build's samples), write the held-out side as
        ``OUT/eval/``; return the training side and the parent's extra manifest fields."""
        per = encoded.per_sample
        held, threshold = choose(per["hash"], rule)
        train_counts, eval_counts = split_counts(encoded.counts, held, per["labels"], per["cut"])
        split = rule.record(threshold)
        prepare_out_dir(self.out, overwrite=True)  # OUT's own preparation emptied it
        self.writer = fmt_mod.ShardWriter(self.out, max_packs=self.max_packs,
                                          max_bytes=self.max_bytes)
        manifest = write(_side(encoded, held, eval_counts), self.out, self.writer,
                         {"eval_of": {"parent": "..", "split": split}})
        sha = file_sha256(self.out / fmt_mod.MANIFEST)
        return (_side(encoded, ~held, train_counts),
                {"eval": parent_entry(manifest, sha, split)})

    def abort(self) -> None:
        """After a failure: remove everything of ``OUT/eval/``, its manifest first."""
        if self.writer is None:  # nothing written yet (OUT's preparation removed any old one)
            return
        (self.out / fmt_mod.MANIFEST).unlink(missing_ok=True)  # first: never complete-looking
        cleanup(self.out, self.writer, remove_shards=True, remove_dir=True)


def _side(encoded: Any, mask: np.ndarray, counts: Any) -> Any:
    """The samples of ``encoded`` where ``mask`` holds, as a view onto the same sample store."""
    rows = np.flatnonzero(mask)
    return dataclasses.replace(encoded, lengths=encoded.lengths[rows],
                               sample_index=encoded.sample_index[rows], counts=counts,
                               per_sample=None, rows=rows, store_lengths=encoded.lengths)
