"""What a build reads: the records of its inputs, in order, cut into tasks for the workers
(:class:`Task`), the share of them that is one partition's, and each source's manifest entry
(path, sha256, records, bytes).

Inputs are read in the order given, records in file order: record ``k`` of the build is
``sample_index`` ``k``. JSON Lines files travel as raw lines that the workers parse; other
files are parsed here. ``--num-partitions N --partition I``: tasks are blocks of
:data:`PARTITION_BLOCK` consecutive records of one file and block b is partition b mod N's;
the other blocks are still read (and parsed) so that record numbers, source counts and parse
errors are those of the whole build. Round-robin blocks make each partition a spread sample of
the whole corpus, so it packs like the whole (benchmarks/partition_quality.py); contiguous
ranges would save reading but give a partition of one kind of data when inputs differ.

Each task also carries how far the reading had got when it was cut (``end``, in bytes of the
inputs' total size on disk, :mod:`pack.progress`): what pack-build's bar counts.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from . import format as fmt_mod
from .errors import PacktrainError
from .files import file_sha256
from .progress import ReadPosition, task_end
from .sources import (MAX_RECORD_BYTES, LineError, detect_format, is_jsonl, iter_raw_lines,
                      iter_records, parse_line)

CHUNK = 128            # records per task handed to a worker (small: little idle tail)
# JSON Lines tasks end at this many bytes of lines (or RAW_CHUNK_RECORDS records): 128 short
# Alpaca records (~40 KB) made the per-task costs (pickling, the pool's threads, numpy calls)
# about 10% of the CPU; 256 KB is ~128 records of long chat conversations.
RAW_CHUNK_BYTES = 256 << 10
RAW_CHUNK_RECORDS = 4096
# --num-partitions: the inputs are cut into blocks of this many consecutive records of one file
# (non-blank lines for JSON Lines) and block b goes to partition b mod N. Part of the contract
# of a partitioned build (recorded in the manifest, checked by pack-merge): never change it.
PARTITION_BLOCK = 128
DETECT_RECORDS = 256   # records looked at to detect a file's format


@dataclasses.dataclass
class Task:
    """One chunk of work: ``kind == "rec"``: parsed records (``wheres`` names each);
    ``kind == "raw"``: raw JSON Lines lines of source ``file`` (``path``, ``linenos``), parsed by
    the worker. Another partition's tasks are ``"count"`` (raw lines) and ``"skip"`` (payload
    ``[number of parsed records]``)."""

    kind: str
    payload: list
    wheres: list[str] | None = None
    file: int = -1
    path: str = ""
    linenos: list[int] | None = None
    # invalid records the reader skipped around this task's records (parsed files only)
    skipped: Counter | None = None
    # bytes of all the inputs (their sizes on disk, in order) read when the task was cut
    end: int = 0

    def where(self, j: int) -> str:
        return self.wheres[j] if self.kind == "rec" else f"{self.path}:{self.linenos[j]}"


# ---------------------------------------------------------------- sources

def source_info(path: Path, split: str | None = None,
                hub: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest entry of one input; a file's ``sha256`` is filled in by
    :func:`hash_sources`, its ``records`` as its tasks are read or come back."""
    if path.is_dir():  # a Hugging Face save_to_disk directory
        from .hf_source import DEFAULT_SPLIT, source_info as hf_source_info

        info = hf_source_info(path, split)
        for local, name in (hub or {}).items():
            if Path(local) == path:
                info["hub"], info["split"] = name, split or DEFAULT_SPLIT
        return info
    try:  # the sha256 comes later, from hash_sources, beside the workers
        return {"path": str(path), "sha256": None, "records": 0, "bytes": path.stat().st_size}
    except OSError as e:
        raise _cannot_read(path, e) from None


def _cannot_read(path: Path, e: OSError) -> PacktrainError:
    return PacktrainError(f"{path}: cannot read ({e.strerror or e})")


def hash_sources(paths: list[Path], sources: list[dict],
                 load_validator: bool = True) -> Callable[[], None]:
    """Fill in the sha256 of each source file on a thread (hashlib lets go of the GIL), started
    once the workers are forked, so hashing the inputs overlaps tokenizing them instead of
    delaying the start; the thread then loads the manifest validator (importing jsonschema),
    needed at the end, unless ``load_validator`` is false (a dry run writes no manifest).
    Returns ``finish()``, which waits and raises the first error."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            for path, info in zip(paths, sources):
                if info.get("sha256", "") is None:
                    try:
                        info["sha256"] = file_sha256(path)
                    except OSError as e:
                        raise _cannot_read(path, e) from None
            if load_validator:
                fmt_mod.manifest_validator()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, name="hash-sources", daemon=True)
    t.start()

    def finish() -> None:
        t.join()
        if errors:
            raise errors[0]

    return finish


# ---------------------------------------------------------------- tasks

def read_tasks(paths: list[Path], sources: list[dict], fmt: str, skip_invalid: bool,
               skipped: Counter, split: str | None, n_parts: int = 1, part: int | None = None,
               max_record_bytes: int = MAX_RECORD_BYTES) -> tuple[str, Iterator[Task]]:
    """The (detected) format and the tasks of a build, or of its partition ``part`` of
    ``n_parts`` (see :func:`read_sources`)."""
    if part is None:
        chunking: dict[str, Any] = dict(chunk=CHUNK, chunk_bytes=RAW_CHUNK_BYTES)
    else:  # partitions are exact blocks of records: part of their contract
        chunking = dict(chunk=PARTITION_BLOCK)
    fmt, stream = read_sources(paths, fmt, skip_invalid, skipped, sources, split=split,
                               max_record_bytes=max_record_bytes, **chunking)
    if part is not None:
        stream = partition_tasks(stream, n_parts, part)
    return fmt, stream


class _Formats:
    """The format of the inputs: the one given, or detected from each file's first records
    (with ``--format auto``), in which case all files must agree."""

    def __init__(self, fmt: str):
        self.auto = fmt == "auto"
        self.fmt: str | None = None if self.auto else fmt

    def detect(self, path: Path, head: list[dict]) -> None:
        got = detect_format(head, str(path))
        if self.fmt is None:
            self.fmt = got
        elif got != self.fmt:
            raise PacktrainError(
                f"{path}: records are in {got!r} format but earlier inputs are in "
                f"{self.fmt!r}; pack them separately or pass --format")


def read_sources(paths: list[Path], fmt: str, skip_invalid: bool, skipped: Counter,
                 sources: list[dict], chunk: int = CHUNK, split: str | None = None,
                 chunk_bytes: int | None = None, max_record_bytes: int = MAX_RECORD_BYTES
                 ) -> tuple[str, Iterator[Task]]:
    """Return the (detected) format and an iterator over the tasks (chunks of at most ``chunk``
    records of one file) of all files in order. JSON Lines files are read as raw lines that the
    workers parse (the head of a file is parsed here too, to detect the format); with
    ``chunk_bytes`` their tasks end at that many bytes of lines or :data:`RAW_CHUNK_RECORDS`
    records, whichever comes first. Other files are parsed here. With ``--format auto`` every
    file's format is detected from its first records and all files must agree. Each source's
    ``records`` count of parsed files is filled in as the iterator is consumed (that of raw
    files as their results come back). Records of parsed files skipped as invalid are counted
    in each task's ``skipped`` (the caller adds them up), so that a partition counts only those
    around its own tasks. ``split`` picks the split of a Hugging Face DatasetDict directory.
    A JSON Lines line longer than ``max_record_bytes`` is not read (an invalid record,
    ``too-large``)."""
    formats = _Formats(fmt)
    spans = _spans(sources)
    iters = [_raw_tasks(i, p, formats, skip_invalid, chunk, chunk_bytes, max_record_bytes,
                        spans[i])
             if is_jsonl(p)
             else _parsed_tasks(i, p, formats, skip_invalid, sources, chunk, split,
                                max_record_bytes, spans[i])
             for i, p in enumerate(paths)]
    stream: Iterator[Task] = itertools.chain.from_iterable(iters)
    if formats.fmt is None:
        # Detect from the first file that has records (empty files are skipped over here and
        # still counted with 0 records).
        buffered: list[Task] = []
        for task in stream:
            buffered.append(task)
            if formats.fmt is not None:
                break
        if formats.fmt is None:
            raise PacktrainError(f"{', '.join(str(p) for p in paths)}: no records found in the "
                                 f"inputs")
        stream = itertools.chain(buffered, stream)
    return formats.fmt, stream


def _spans(sources: list[dict]) -> list[tuple[int, int]]:
    """``(start, size)`` of each input in the total of their sizes on disk."""
    spans, start = [], 0
    for info in sources:
        size = int(info.get("bytes") or 0)
        spans.append((start, size))
        start += size
    return spans


def _raw_tasks(i: int, path: Path, formats: _Formats, skip_invalid: bool, chunk: int,
               chunk_bytes: int | None, max_record_bytes: int,
               span: tuple[int, int] = (0, 0)) -> Iterator[Task]:
    """The tasks of JSON Lines file ``i``: its raw lines, parsed by the workers (a line too
    long to read travels as a :class:`pack.sources.LongLine`, of length 0); ``span``: the
    file's (start, size) in the inputs' total bytes."""
    position = ReadPosition()
    lines: Iterator[tuple[int, Any]] = iter_raw_lines(path, max_record_bytes, position)
    if formats.auto:
        lines = _detect_from_lines(path, lines, formats, skip_invalid)
    sp = str(path)

    def task(block: list[tuple[int, bytes]], end: int) -> Task:
        return Task("raw", [r for _, r in block], file=i, path=sp,
                    linenos=[n for n, _ in block], end=end)

    # with chunk_bytes, many short records per task: per-task costs fall, tasks stay small
    most = RAW_CHUNK_RECORDS if chunk_bytes else chunk
    block: list[tuple[int, bytes]] = []
    size = 0
    for item in lines:
        block.append(item)
        size += len(item[1])
        if len(block) >= most or (chunk_bytes and size >= chunk_bytes):
            yield task(block, task_end(*span, position))
            block, size = [], 0
    if block:
        yield task(block, sum(span))


def _detect_from_lines(path: Path, lines: Iterator[tuple[int, Any]], formats: _Formats,
                       skip_invalid: bool) -> Iterator[tuple[int, Any]]:
    """Detect the format of a JSON Lines file from its first records; return all its lines."""
    head_lines: list[tuple[int, Any]] = []
    head: list[dict] = []
    for lineno, raw in lines:
        head_lines.append((lineno, raw))
        try:
            head.append(parse_line(raw))
        except LineError as e:
            if skip_invalid:
                continue  # counted when the worker parses it
            raise PacktrainError(f"{path}:{lineno}: {e.message}") from None
        if len(head) >= DETECT_RECORDS:
            break
    if head:
        formats.detect(path, head)
    return itertools.chain(head_lines, lines)


def _parsed_tasks(i: int, path: Path, formats: _Formats, skip_invalid: bool,
                  sources: list[dict], chunk: int, split: str | None,
                  max_record_bytes: int, span: tuple[int, int] = (0, 0)) -> Iterator[Task]:
    """The tasks of file ``i`` read here (JSON arrays, Parquet, Hugging Face datasets);
    ``span``: the file's (start, size) in the inputs' total bytes."""
    local: Counter = Counter()
    position = ReadPosition()
    it = iter_records(path, skip_invalid=skip_invalid, skipped=local, split=split,
                      max_record_bytes=max_record_bytes, position=position)
    if formats.auto:
        head, it = _peek(it, DETECT_RECORDS)
        if head:
            formats.detect(path, [r for _, r in head])
    n = 0
    prev: Task | None = None
    seen: Counter = Counter()
    # One task held back, so that invalid records after a file's last good one are
    # counted with its last task.
    for block in _chunked(it, chunk):
        n += len(block)
        if prev is not None:
            yield prev
        prev = Task("rec", [r for _, r in block], wheres=[w for w, _ in block], file=i,
                    skipped=local - seen, end=task_end(*span, position))
        seen = local.copy()
    if prev is not None:
        prev.skipped = prev.skipped + (local - seen)
        prev.end = sum(span)  # the file was read to its end
        yield prev
    elif local:  # every record invalid: an empty task still carries the count
        yield Task("rec", [], wheres=[], file=i, skipped=local, end=sum(span))
    sources[i]["records"] = n


def _peek(it: Iterator, n: int) -> tuple[list, Iterator]:
    """The first ``n`` items of ``it``, and an iterator over all of them."""
    head = list(itertools.islice(it, n))
    return head, itertools.chain(head, it)


def _chunked(it: Iterable, n: int) -> Iterator[list]:
    """Lists of ``n`` consecutive items of ``it`` (the last one shorter)."""
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


# ---------------------------------------------------------------- partitions

def check_partition(num_partitions: int, partition: int | None) -> tuple[int, int | None]:
    """``(N, I)`` of a partitioned build, ``(1, None)`` for a whole one; one-line errors."""
    n = 1 if num_partitions is None else int(num_partitions)
    if n < 1:
        raise PacktrainError(f"--num-partitions {num_partitions}: must be at least 1")
    if partition is None:
        if n > 1:
            raise PacktrainError(f"--num-partitions {n} needs --partition I (0 to {n - 1}): "
                                 f"which partition this run packs")
        return 1, None
    if not 0 <= int(partition) < n:
        raise PacktrainError(f"--partition {partition}: must be between 0 and {n - 1} "
                             f"(--num-partitions {n})")
    return n, int(partition)


def partition_tasks(stream: Iterator[Task], n: int, i: int) -> Iterator[Task]:
    """Task (block) b is partition I's when b mod N == I; the others only count their records
    (raw lines are still parsed, by the workers, so record numbers and errors are those of the
    whole build)."""
    for b, task in enumerate(stream):
        if b % n == i:
            yield task
        elif task.kind == "raw":
            yield dataclasses.replace(task, kind="count")
        else:
            yield dataclasses.replace(task, kind="skip", payload=[len(task.payload)],
                                      skipped=None)
