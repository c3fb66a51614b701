"""Rendering and tokenizing records, in worker processes or in-process: what a worker needs
(:class:`EncodeSpec`), what it sends back (:class:`ChunkResult`), the :class:`Encoder` that turns
a task's records into kept samples under the overlong policy, and the pool that runs it.

Workers are forked where the platform allows, and then reuse the parent's renderer (its
tokenizer loaded once, shared copy-on-write); under ``spawn`` each loads the tokenizer itself.
Results come back in submission order (:func:`ordered_map`) with a bounded number of tasks in
flight, so the output does not depend on the number of workers and memory does not grow with
the corpus.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import os
import signal
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from . import sanity
from .errors import PacktrainError
from .format import IGNORE_INDEX
from .outdir import unlock_out_dirs
from .tokenize.loading import load_tokenizer

if TYPE_CHECKING:
    from .tasks import Task

IN_FLIGHT_PER_WORKER = 3  # tasks handed to each worker ahead of the results read back


@dataclasses.dataclass(frozen=True)
class EncodeSpec:
    """What a worker needs to re-create the renderer: everything is picklable."""

    tokenizer: str
    fmt: str
    template: str
    train_on_prompt: bool
    chat_template: str | None
    max_length: int
    overlong: str
    eval_seed: int | None = None  # with an eval split: the seed of each record's split hash


@dataclasses.dataclass
class ChunkResult:
    """What a worker sends back for one task: its kept samples, flat, and what it counted."""

    keep: np.ndarray          # int64 local indices (in the chunk) of the kept samples
    lengths: np.ndarray       # int32 length of each kept sample (after truncation)
    ids: np.ndarray           # int32, kept samples back to back
    labels: np.ndarray        # int32, same layout; -100 at every sample start
    label_tokens: int
    truncated: int
    truncated_tokens: int     # tokens cut off the truncated samples
    dropped: dict[str, int]
    errors: list[tuple[int, str, str]]  # (local index, message, reason) of invalid records
    n_records: int = 0        # records of the task that reached the renderer
    # raw tasks: (line index in the task, message, reason) of lines that are not a JSON object
    parse_errors: list[tuple[int, str, str]] = dataclasses.field(default_factory=list)
    # with an eval split: per kept sample, its record's split hash (uint64), its label tokens
    # and the tokens truncation cut off (int64): what pack.eval_split divides the build by
    per_sample: dict[str, np.ndarray] | None = None
    # local record indices each sanity check flagged (pack.sanity.chunk_flags)
    flagged: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # preference pairs (int32): each kept pair's chosen length; its sample is chosen + rejected
    split: np.ndarray | None = None


def renderer_from_spec(spec: EncodeSpec, tokenizer: Any = None) -> Any:
    """The renderer of ``spec``, on ``tokenizer`` or, without one, on the tokenizer it names."""
    from .templates import Renderer

    if tokenizer is None:
        tokenizer = load_tokenizer(spec.tokenizer)
    return Renderer(tokenizer, spec.fmt, spec.template, train_on_prompt=spec.train_on_prompt,
                    chat_template=spec.chat_template)


def parse_raw(lines: list[bytes]) -> tuple[list[dict], list[int], list[tuple[int, str, str]]]:
    """Parse raw JSON Lines lines: the records, the index of each one's line, and
    ``(line index, message, reason)`` of every line that is not a JSON object."""
    from .sources import LineError, parse_line

    records: list[dict] = []
    pos: list[int] = []
    errors: list[tuple[int, str, str]] = []
    for j, raw in enumerate(lines):
        try:
            records.append(parse_line(raw))
        except LineError as e:
            errors.append((j, e.message, e.reason))
            continue
        pos.append(j)
    return records, pos, errors


class Encoder:
    """Renders and tokenizes chunks of records and applies the overlong policy."""

    def __init__(self, spec: EncodeSpec, renderer: Any = None):
        from . import templates

        self.spec = spec
        self.renderer = renderer if renderer is not None else renderer_from_spec(spec)
        self._nothing = getattr(templates, "NothingToTrain", ())
        self._bos = getattr(self.renderer.tokenizer, "bos_token_id", None)

    def run(self, kind: str, payload: list) -> ChunkResult:
        """One task: parsed records (``"rec"``) or raw JSON Lines lines (``"raw"``), parsed
        here; error indices of a raw task are line indices in the task. With partitions, the
        other partitions' tasks are ``"count"`` (raw lines, parsed and counted, not rendered)
        and ``"skip"`` (payload ``[number of parsed records]``)."""
        if kind == "rec":
            res = self(payload)
            res.n_records = len(payload)
            return res
        if kind == "skip":  # another partition's parsed records: only their number matters
            return _counted(payload[0])
        records, pos, parse_errors = parse_raw(payload)
        if kind == "count":  # another partition's lines: parsed for the record numbers only
            res = _counted(len(records))
            res.parse_errors = parse_errors
            return res
        res = self(records)
        res.n_records = len(records)
        res.parse_errors = parse_errors
        if parse_errors and res.errors:
            res.errors = [(pos[j], m, r) for j, m, r in res.errors]
        return res

    def __call__(self, records: list[dict]) -> ChunkResult:
        """Render and tokenize ``records``, then apply the overlong policy to all of them at
        once on the flat token arrays (a Python loop over records cost more than rendering
        short Alpaca records)."""
        spec = self.spec
        if spec.fmt == "preference":
            from .encode_pairs import encode_pairs

            return ChunkResult(**encode_pairs(self, records))
        L = int(spec.max_length)
        out, ids, labels, starts, ends = self.renderer.encode_flat(records)
        errors: list[tuple[int, str, str]] = []
        dropped: Counter = Counter()
        js: list[int] = []
        ks: list[int] = []
        nothing: list[int] = []  # records the renderer found nothing to train in
        for j, r in enumerate(out):
            if type(r) is int:
                js.append(j)
                ks.append(r)
            elif self._nothing and isinstance(r, self._nothing):
                dropped[getattr(r, "reason", None) or "empty-response"] += 1
                nothing.append(j)
            elif isinstance(r, PacktrainError):
                errors.append((j, str(r), str(getattr(r, "reason", None) or "invalid-record")))
            else:
                raise r
        row = np.asarray(ks, dtype=np.int64)
        s = starts[row]
        n = ends[row] - s
        cut = n > L
        keep = n > 0
        dropped["empty"] += int(np.count_nonzero(~keep))
        if spec.overlong == "drop":
            dropped["overlong"] += int(np.count_nonzero(keep & cut))
            keep &= ~cut
        m = np.minimum(n, L)
        trained = np.concatenate([[0], np.cumsum(labels != IGNORE_INDEX)])
        nl = trained[s + m] - trained[s]  # trained tokens left after truncation
        lost = keep & (nl == 0)
        dropped["no-labels-after-truncation"] += int(np.count_nonzero(lost & cut))
        dropped["empty-response"] += int(np.count_nonzero(lost & ~cut))
        keep &= nl > 0
        jrow = np.asarray(js, dtype=np.int64)
        no_labels = np.concatenate([np.asarray(nothing, dtype=np.int64), jrow[(n == 0) | lost]])
        s, m, n, cut = s[keep], m[keep], n[keep], cut[keep]
        kept = jrow[keep]
        flagged = sanity.chunk_flags(no_labels, kept, s, m, cut, ids, self._bos)
        # every kept sample's first m tokens, back to back
        total = int(m.sum())
        first = np.concatenate([[0], np.cumsum(m)[:-1]]) if len(m) else m
        at = np.repeat(s - first, m) + np.arange(total, dtype=np.int64)
        res = ChunkResult(kept, m.astype(np.int32), ids[at], labels[at], int(nl[keep].sum()),
                          int(np.count_nonzero(cut)), int((n - m).sum()),
                          {k: v for k, v in dropped.items() if v}, errors, flagged=flagged)
        if spec.eval_seed is not None:
            from .eval_split import record_hashes

            res.per_sample = {"hash": record_hashes([records[j] for j in kept], spec.eval_seed),
                              "labels": nl[keep].astype(np.int64),
                              "cut": (n - m).astype(np.int64)}
        return res


def per_sample_arrays(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """The per-sample arrays of all results (:attr:`ChunkResult.per_sample`), joined."""
    empty = {"hash": np.zeros(0, np.uint64), "labels": np.zeros(0, np.int64),
             "cut": np.zeros(0, np.int64)}
    return {k: np.concatenate(parts[k]) if parts.get(k) else v for k, v in empty.items()}


def _counted(n_records: int) -> ChunkResult:
    """The result of a task of another partition: ``n_records`` records, no samples."""
    z32, z64 = np.zeros(0, np.int32), np.zeros(0, np.int64)
    return ChunkResult(z64, z32, z32, z32, 0, 0, 0, {}, [], n_records=n_records)


_WORKER: dict[str, Any] = {}


def _worker_init(spec: EncodeSpec) -> None:
    """Set up one worker process. Under ``fork`` the parent's renderer (tokenizer loaded once,
    in the parent) is inherited copy-on-write and reused; under ``spawn``/``forkserver`` the
    worker loads the tokenizer itself, once."""
    # Ctrl-C goes to the whole process group: the parent handles it and terminates the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    # A forked worker shares the parent's lock on the output directory: let go of it, so that
    # only the parent's life decides when the directory is free again.
    unlock_out_dirs()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; no rayon pool
    try:
        inherited = _WORKER.pop("inherit", None)
        renderer = inherited[1] if inherited is not None and inherited[0] == spec else None
        _WORKER["encoder"] = Encoder(spec, renderer)
    except BaseException as e:  # reported on the first task instead of a respawn loop
        _WORKER["error"] = e
    # What the worker inherited (modules, the tokenizer) lives as long as it does: frozen,
    # the cyclic collector stops traversing it on every full collection, and stops writing to
    # those pages, which copy-on-write would otherwise copy into each worker.
    gc.freeze()


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this worker when the parent dies. A parent killed with
    SIGKILL (OOM killer, scheduler) cannot stop its pool, and idle workers would otherwise wait
    for work forever, holding memory and the output directory's lock."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl: best effort
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _worker_encode(kind: str, payload: list) -> ChunkResult:
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _WORKER["encoder"].run(kind, payload)


@contextlib.contextmanager
def worker_pool(spec: EncodeSpec, renderer: Any, workers: int) -> Iterator[Any]:
    """A pool of ``workers`` processes set up by :func:`_worker_init`: closed and joined when
    the block ends, stopped in bounded time (:func:`stop_pool`) if it raises."""
    import multiprocessing as mp

    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    _WORKER["inherit"] = (spec, renderer)  # seen by forked workers only
    # Ctrl-C is held back while the pool starts, so it never lands half-way through
    # Pool() and leaves workers that nothing here can stop.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        pool = mp.get_context(method).Pool(workers, initializer=_worker_init, initargs=(spec,))
    finally:
        _WORKER.pop("inherit", None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        yield pool
        pool.close()
        pool.join()
    except BaseException:
        stop_pool(pool)
        raise


def stop_pool(pool: Any, deadline_s: float = 10.0) -> None:
    """Stop the workers after an error or Ctrl-C, in bounded time. Pool.terminate() first takes
    the task queue's lock, which an idle worker holds while it waits for work, so it can block;
    it runs in a thread with a deadline and the workers are killed if it has not finished."""
    import threading

    t = threading.Thread(target=pool.terminate, daemon=True)
    t.start()
    t.join(deadline_s)
    if t.is_alive():
        for proc in list(getattr(pool, "_pool", ())):
            if proc.exitcode is None:
                proc.kill()
                proc.join(deadline_s)
    else:
        pool.join()


def ordered_map(pool: Any, tasks: Iterator[Task], window: int
                ) -> Iterator[tuple[Task, ChunkResult]]:
    """Like ``pool.imap`` (results in submission order) but with at most ``window`` tasks in
    flight, so reading never runs ahead of tokenizing and memory stays bounded."""
    pending: collections.deque = collections.deque()
    for task in tasks:
        pending.append((task, pool.apply_async(_worker_encode, (task.kind, task.payload))))
        if len(pending) >= window:
            c, res = pending.popleft()
            yield c, res.get()
    while pending:
        c, res = pending.popleft()
        yield c, res.get()
