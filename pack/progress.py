"""pack-build's reading progress, with an ETA: how far the readers have got in bytes of the
inputs' total size on disk (:class:`ReadPosition`, set by the readers of :mod:`pack.sources` and
:mod:`pack.hf_source`, asked by :mod:`pack.tasks` once per task, never per record) and the
``tokenize`` bar that counts those bytes as the tasks' results come back (:class:`ReadBar`).

A position is the byte offset the reader has read up to in the file as stored: for a
compressed file, in the compressed file (so the total is the sum of the files' sizes); for a
JSON array or Parquet file, the file's size times the share of its records read so far; for a
Hugging Face dataset, its Arrow files' sizes before the current one plus the offset in it.
Read-ahead buffering only makes the bar run slightly ahead of the records tokenized.
"""

from __future__ import annotations

import time
from typing import Any, Callable


class ReadPosition:
    """The bytes of one input its reader has read so far. A reader sets ``tell`` (a callable
    returning that offset) once it has opened the input; until then the position is 0, and a
    ``tell`` that fails (its file closed at the end) gives ``None``: the caller knows the size."""

    __slots__ = ("tell",)

    def __init__(self) -> None:
        self.tell: Callable[[], int] | None = None

    def __call__(self) -> int | None:
        if self.tell is None:
            return 0
        try:
            return int(self.tell())
        except (ValueError, OSError):  # a closed file
            return None


def task_end(start: int, size: int, position: ReadPosition) -> int:
    """The cumulative position (``start`` of this input in the total, plus the bytes read of
    it, at most its ``size``) at which a task is cut."""
    pos = position()
    return start + (size if pos is None else min(size, pos))


class ReadBar:
    """The ``tokenize`` bar: bytes read of the inputs' ``total`` (so tqdm shows a rate and an
    ETA), with the records and the tokens per second of kept samples so far as postfix.
    ``make_bar`` makes the tqdm bar (``pack.build``'s, disabled with ``--quiet``)."""

    def __init__(self, make_bar: Callable[..., Any], total: int) -> None:
        self.total = total
        self.bar = make_bar(desc="tokenize", unit="B", unit_scale=True, unit_divisor=1024,
                            total=total or None)
        self.done = self.records = self.tokens = 0
        self.t0 = time.perf_counter()

    def update(self, end: int, records: int, lengths: Any) -> None:
        """One task's result is in: it ends at input position ``end``; ``records`` were read
        and ``lengths`` are its kept samples' token counts."""
        if self.bar.disable:
            return
        from tqdm import tqdm

        self.records += records
        self.tokens += int(lengths.sum())
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{self.records:,} rec, {tqdm.format_sizeof(rate)} tok/s",
                                 refresh=False)
        if end > self.done:
            self.bar.update(end - self.done)
            self.done = end

    def finish(self) -> None:
        """Every result is in, so every input was read (the last task of a file that ends on a
        task boundary may have been cut before the reader saw the end of the file)."""
        if not self.bar.disable and self.total > self.done:
            self.bar.update(self.total - self.done)
            self.done = self.total
        self.bar.close()
