"""The pack-build pipeline: read records, render + tokenize them in worker processes, bin-pack the
whole dataset, write Arrow shards and, last, the manifest.

Stages (each with a progress bar on stderr unless ``quiet``):

1. expand the inputs (files and globs) and hash every source file (sha256, bytes);
2. read records in order (inputs in the order given, records in file order; record ``k`` of the
   build is ``sample_index`` ``k``) and hand them in chunks of :data:`CHUNK` records to ``workers``
   processes that render and tokenize them (``workers == 1`` runs in-process). Results come back in
   submission order, so the output does not depend on the number of workers. At most a few chunks
   per worker are in flight, so memory does not grow with the corpus;
3. truncate (keep the first ``max_length`` tokens) or drop overlong samples, force the label at
   every sample start to -100, and append each kept sample (``input_ids``, ``labels``) as one row
   of a *temporary* Arrow IPC file in the output directory. Only the per-sample lengths and record
   numbers stay in memory;
4. bin-pack all lengths at once (:func:`pack.binpack.pack`), shuffle the pack order with
   ``numpy.random.default_rng(seed)``;
5. gather each pack's samples from the memory-mapped temporary file and write it through
   :class:`pack.format.ShardWriter` (shards are written under temporary names and renamed when
   complete);
6. remove the temporary file, write the dataset card ``README.md`` and, last, ``manifest.json``
   (atomically). A directory without a manifest is not a dataset.

``--num-partitions N --partition I`` packs one partition: the records are cut into blocks of
:data:`PARTITION_BLOCK` consecutive records of one file and block b is partition b mod N's.
Every partition still reads (and, for JSON Lines, parses) all inputs, so record numbers
(``sample_index``), source counts and parse errors are those of the whole build; only its own
blocks are rendered, tokenized and packed. Round-robin blocks make each partition a spread
sample of the whole corpus, so it packs like the whole (benchmarks/partition_quality.py);
contiguous ranges would save reading but give a partition of one kind of data when inputs
differ. ``pack.merge`` joins the partitions. ``--dry-run`` stops after the checks and hands
over to ``pack.dry_run``: nothing is written.

On any error (or Ctrl-C) the temporary files and the shards of this build are removed and no
manifest is left behind. Same inputs and arguments give byte-identical shards and a manifest that
differs only in ``stats.seconds`` and ``stats.tokens_per_s``.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import hashlib
import itertools
import mmap
import os
import platform
import re
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa

from . import __version__
from . import format as fmt_mod
from .files import file_sha256, fsync_dir, write_atomic
from .tokenize.loading import load_tokenizer, tokenizer_record
from .errors import PacktrainError
from .format import IGNORE_INDEX, MANIFEST

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
IN_FLIGHT_PER_WORKER = 3
DETECT_RECORDS = 256   # records looked at to detect a file's format
TMP_SAMPLES = ".packtrain-samples.tmp.arrow"
CARD = "README.md"
TEMPLATE_FOR_FORMAT = {"alpaca": "alpaca", "messages": "chat", "text": "none"}
FORMATS = ("auto", "alpaca", "messages", "text")
TEMPLATES = ("auto", "alpaca", "chat", "none")
OVERLONG = ("truncate", "drop")
TIMING_FIELDS = ("seconds", "tokens_per_s")  # the only stats that vary between equal builds
_SAMPLE_SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
                            pa.field("labels", pa.list_(pa.int32()), nullable=False)])


@dataclasses.dataclass
class BuildConfig:
    """Every pack-build argument, with its default. ``tokenizer=None`` means the environment
    variable ``PACKTRAIN_TOKENIZER``; ``workers=None`` means all usable cores."""

    inputs: list[str]
    out: str
    tokenizer: str | None = None
    max_length: int = 4096
    format: str = "auto"
    template: str = "auto"
    chat_template: str | None = None
    train_on_prompt: bool = False
    overlong: str = "truncate"
    strategy: str = "bfd"
    seed: int = 0
    workers: int | None = None
    shard_size: str = "256MB"
    overwrite: bool = False
    skip_invalid: bool = False
    quiet: bool = False
    dry_run: bool = False
    split: str | None = None          # of a Hugging Face DatasetDict input (default: train)
    num_partitions: int = 1
    partition: int | None = None      # 0 .. num_partitions - 1 (with num_partitions > 1)

    @classmethod
    def from_args(cls, args: Any) -> "BuildConfig":
        if isinstance(args, cls):
            return args
        d = dict(args) if isinstance(args, dict) else dict(vars(args))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------- small helpers

def parse_shard_size(text: str | int) -> tuple[int | None, int | None]:
    """``"1000"`` -> (1000 packs, no byte limit); ``"256MB"``/``"1GB"``/``"512KiB"`` -> bytes."""
    s = str(text).strip()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?", s, flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise PacktrainError(f"--shard-size {text!r}: expected a number of packs (e.g. 1000) or a "
                             f"size such as 256MB or 1GB")
    if not m.group(2):
        if "." in m.group(1):
            raise PacktrainError(f"--shard-size {text!r}: a pack count must be a whole number")
        return int(m.group(1)), None
    unit = m.group(2).upper().replace("I", "")
    mult = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}[unit]
    return None, max(1, int(float(m.group(1)) * mult))


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_tokenizer(path: str | None) -> str:
    if path:
        return path
    env = os.environ.get("PACKTRAIN_TOKENIZER")
    if env:
        return env
    raise PacktrainError("no tokenizer: pass --tokenizer PATH (a Hugging Face tokenizer directory "
                         "or tokenizer.json) or set PACKTRAIN_TOKENIZER")


_TOKENIZER_CACHE: dict[tuple, Any] = {}


def load_tokenizer_cached(path: str, lite: bool = False):
    """:func:`pack.tokenize.loading.load_tokenizer` (or, with ``lite``, :func:`pack.fast_tokenizer.load_lite`,
    which may give None), remembered per process for an unchanged path (loading a
    128k-vocabulary tokenizer takes seconds; tests and library callers build many times).
    Nothing in the pipeline modifies a tokenizer, so sharing it is safe."""
    from .fast_tokenizer import load_lite

    load = load_lite if lite else load_tokenizer
    p = Path(path)
    try:
        files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
        key = (lite, str(p.resolve()), tuple((x.name, x.stat().st_mtime_ns, x.stat().st_size)
                                             for x in files))
    except OSError:
        return load(path)
    if key not in _TOKENIZER_CACHE:
        tok = load(path)
        for k in [k for k in _TOKENIZER_CACHE if k[0] == lite]:
            del _TOKENIZER_CACHE[k]
        _TOKENIZER_CACHE[key] = tok
    return _TOKENIZER_CACHE[key]


class _LiteMismatch(Exception):
    """The transformers-free tokenizer view disagreed with transformers: build again without."""


@dataclasses.dataclass
class _LiteCheck:
    """Where the check of a lite tokenizer view (:mod:`pack.fast_tokenizer`) stands."""

    record: dict | None = None  # the manifest's tokenizer entry, once known to be right
    key: str | None = None  # the check cache's key, once computed
    template: str | None = None  # the chat template the key covers
    lookup: bool = False  # compute the key and look in the cache in the check thread
    result: tuple[str | None, dict | None] | None = None  # (why it failed, record) from the thread
    cached: bool = False  # the result came from the cache: nothing to remember
    thread: Any = None


def _build_tokenizer(tok_path: str, chat_template: str | None, workers: int, dry_run: bool,
                     allow_lite: bool) -> tuple[Any, _LiteCheck | None]:
    """The tokenizer a build renders and tokenizes with, and the state of its check: None for
    transformers' own object; for a lite view (:mod:`pack.fast_tokenizer`) whose check passed
    before, a :class:`_LiteCheck` holding the cached ``record``; with several workers, one whose
    check or remembered answer :func:`_start_check` looks up beside them (``lookup``: hashing
    the tokenizer's files for the cache key took 0.1 s of the serial start). A lite view is not
    worth its check with one worker (no core to run it on) or in a dry run."""
    from . import fast_tokenizer as ft

    if allow_lite and ft.enabled():
        if workers > 1 and not dry_run:  # the view is used whatever the cache holds
            lite = load_tokenizer_cached(tok_path, lite=True)
            if lite is not None:
                return lite, _LiteCheck(template=chat_template, lookup=True)
        else:
            try:
                key = ft.check_key(tok_path, chat_template)
            except OSError:
                key = None
            record = ft.cached_record(key) if key is not None else None
            if record is not None:
                lite = load_tokenizer_cached(tok_path, lite=True)
                if lite is not None:
                    return lite, _LiteCheck(record=record, key=key)
    return load_tokenizer_cached(tok_path), None


def _start_check(check: _LiteCheck, tokenizer, tok_path: str, spec: "EncodeSpec",
                 first: "_Task | None") -> None:
    """Run :func:`pack.fast_tokenizer.compare` in a thread of the parent (idle while workers
    tokenize) on the first records of the build, unless the check's cache already holds its
    answer (looked up first, in the same thread, when ``check.lookup``); the answer lands in
    ``check.result`` (``check.cached``: it came from the cache).
    Started only after the workers are forked: a fork must not copy a thread mid-import."""
    import threading

    from .fast_tokenizer import cached_record, check_key, compare

    records: list[dict] = []
    if first is not None and first.kind in ("raw", "count"):
        records = _parse_raw(first.payload[:32])[0]
    elif first is not None and first.kind == "rec":
        records = list(first.payload[:32])
    args = dict(fmt=spec.fmt, template=spec.template, train_on_prompt=spec.train_on_prompt,
                chat_template=spec.chat_template)

    def run() -> None:
        try:
            if check.lookup:
                try:
                    check.key = check_key(tok_path, check.template)
                except OSError:  # unreadable now: check, and remember nothing
                    pass
                known = cached_record(check.key) if check.key else None
                if known is not None:
                    check.cached = True
                    check.result = (None, known)
                    return
            check.result = compare(tokenizer, tok_path, args, records)
        except BaseException as e:  # any failure of the check means: do not trust the view
            check.result = (f"the check failed ({type(e).__name__}: {e})", None)

    check.thread = threading.Thread(target=run, name="tokenizer-check", daemon=True)
    check.thread.start()


def _tokenizer_entry(check: _LiteCheck | None, tokenizer, tok_path: str) -> dict:
    """The manifest's tokenizer entry; for a lite view, once its check has passed."""
    if check is None:
        return tokenizer_record(tokenizer, tok_path)
    if check.record is not None:
        return check.record
    from .fast_tokenizer import remember

    check.thread.join()
    why, record = check.result
    if why is not None:
        raise _LiteMismatch(why)
    if check.key is not None and not check.cached:
        remember(check.key, record)
    return record


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"packtrain": __version__,
                                  "python": platform.python_version(),
                                  "pyarrow": pa.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("tokenizers", "transformers"):
        try:  # package metadata: importing transformers for its version costs over a second
            out[mod] = version(mod)
        except PackageNotFoundError:  # pragma: no cover - both are dependencies
            out[mod] = None
    return out


def _source_info(path: Path, split: str | None = None,
                 hub: dict[str, str] | None = None) -> dict[str, Any]:
    if path.is_dir():  # a Hugging Face save_to_disk directory
        from .hf_source import DEFAULT_SPLIT, source_info

        info = source_info(path, split)
        for local, name in (hub or {}).items():
            if Path(local) == path:
                info["hub"], info["split"] = name, split or DEFAULT_SPLIT
        return info
    try:  # the sha256 comes later, from _hash_sources, beside the workers
        return {"path": str(path), "sha256": None, "records": 0, "bytes": path.stat().st_size}
    except OSError as e:
        raise _cannot_read(path, e) from None


def _cannot_read(path: Path, e: OSError) -> PacktrainError:
    return PacktrainError(f"{path}: cannot read ({e.strerror or e})")


def _hash_sources(paths: list[Path], sources: list[dict], load_validator: bool = True):
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


def length_histogram(lengths: np.ndarray, max_length: int) -> dict[str, list[int]]:
    """Counts of sample lengths in ``[edges[i], edges[i+1])``; edges are 1, then powers of two
    from 16 below max_length, then max_length + 1."""
    edges = [1] + [1 << k for k in range(4, 40) if (1 << k) < max_length] + [max_length + 1]
    counts, _ = np.histogram(np.asarray(lengths), bins=np.asarray(edges))
    return {"edges": [int(e) for e in edges], "counts": [int(c) for c in counts]}


FILL_EDGES = [0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


def fill_histogram(pack_tokens: np.ndarray, max_length: int) -> dict[str, list]:
    """Counts of packs by fill (tokens / max_length) in ``[edges[i], edges[i+1])``, the last bin
    closed."""
    fills = np.asarray(pack_tokens, dtype=np.float64) / max_length
    counts, _ = np.histogram(fills, bins=np.asarray(FILL_EDGES))
    return {"edges": FILL_EDGES, "counts": [int(c) for c in counts]}


# ---------------------------------------------------------------- the worker side

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


@dataclasses.dataclass
class ChunkResult:
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


@dataclasses.dataclass
class _Task:
    """One chunk of work: ``kind == "rec"``: parsed records (``wheres`` names each);
    ``kind == "raw"``: raw JSON Lines lines of source ``file`` (``path``, ``linenos``), parsed by
    the worker."""

    kind: str
    payload: list
    wheres: list[str] | None = None
    file: int = -1
    path: str = ""
    linenos: list[int] | None = None
    # invalid records the reader skipped around this task's records (parsed files only)
    skipped: Counter | None = None

    def where(self, j: int) -> str:
        return self.wheres[j] if self.kind == "rec" else f"{self.path}:{self.linenos[j]}"


def _renderer_from_spec(spec: EncodeSpec, tokenizer=None):
    from .templates import Renderer

    if tokenizer is None:
        tokenizer = load_tokenizer(spec.tokenizer)
    return Renderer(tokenizer, spec.fmt, spec.template, train_on_prompt=spec.train_on_prompt,
                    chat_template=spec.chat_template)


def _parse_raw(lines: list[bytes]) -> tuple[list[dict], list[int], list[tuple[int, str, str]]]:
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

    def __init__(self, spec: EncodeSpec, renderer=None):
        from . import templates

        self.spec = spec
        self.renderer = renderer if renderer is not None else _renderer_from_spec(spec)
        self._nothing = getattr(templates, "NothingToTrain", ())

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
        records, pos, parse_errors = _parse_raw(payload)
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
        L = int(spec.max_length)
        out, ids, labels, starts, ends = self.renderer.encode_flat(records)
        errors: list[tuple[int, str, str]] = []
        dropped: Counter = Counter()
        js: list[int] = []
        ks: list[int] = []
        for j, r in enumerate(out):
            if type(r) is int:
                js.append(j)
                ks.append(r)
            elif self._nothing and isinstance(r, self._nothing):
                dropped[getattr(r, "reason", None) or "empty-response"] += 1
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
        s, m, n, cut = s[keep], m[keep], n[keep], cut[keep]
        # every kept sample's first m tokens, back to back
        total = int(m.sum())
        first = np.concatenate([[0], np.cumsum(m)[:-1]]) if len(m) else m
        at = np.repeat(s - first, m) + np.arange(total, dtype=np.int64)
        return ChunkResult(np.asarray(js, dtype=np.int64)[keep], m.astype(np.int32),
                           ids[at], labels[at], int(nl[keep].sum()), int(np.count_nonzero(cut)),
                           int((n - m).sum()), {k: v for k, v in dropped.items() if v}, errors)


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
    while _OUT_LOCKS:
        os.close(_OUT_LOCKS.popitem()[1])
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; no rayon pool
    try:
        inherited = _WORKER.pop("inherit", None)
        renderer = inherited[1] if inherited is not None and inherited[0] == spec else None
        _WORKER["encoder"] = Encoder(spec, renderer)
    except BaseException as e:  # reported on the first task instead of a respawn loop
        _WORKER["error"] = e
    # What the worker inherited (modules, the tokenizer view) lives as long as it does: frozen,
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


# ---------------------------------------------------------------- the parent side

class _Progress:
    """tqdm bars on stderr (none when quiet); bars still open when an error stops the build are
    closed so that the error line starts on a line of its own."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars: list = []

    def bar(self, **kw):
        from tqdm import tqdm

        b = tqdm(disable=self.quiet, file=sys.stderr, dynamic_ncols=True, leave=True, **kw)
        self.bars.append(b)
        return b

    def close_all(self) -> None:
        for b in self.bars:
            try:
                b.close()
            except Exception:
                pass
        self.bars.clear()


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory without --overwrite (before any slow work)."""
    if out.exists() and not out.is_dir():
        raise PacktrainError(f"{out}: exists and is not a directory; choose another output "
                             f"directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not _interrupted_build(out):
        raise PacktrainError(f"{out}: output directory is not empty; pass --overwrite to "
                             f"replace the dataset in it, or choose another directory")


def _interrupted_build(out: Path) -> bool:
    """Whether ``out`` holds only what a killed pack-build leaves: no manifest, nothing but
    plain files a build writes, and at least one that is not the card (a lone README.md may
    be the user's own). Such leftovers are removed without --overwrite."""
    try:
        entries = list(out.iterdir())
    except OSError:
        return False
    names = [p.name for p in entries]
    return (bool(names) and MANIFEST not in names and any(n != CARD for n in names)
            and all(_is_ours(p.name) and p.is_file() and not p.is_symlink() for p in entries))


_OUT_LOCKS: dict[str, int] = {}


def _lock_out_dir(out: Path) -> None:
    """Hold an exclusive flock on the output directory while this build runs, so that a
    second pack-build into it never mistakes a live build's files for leftovers and deletes
    them. The kernel drops the lock when the process dies, however it dies."""
    import fcntl

    if str(out.resolve()) in _OUT_LOCKS:  # already held by this process (pack-merge)
        return
    fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise PacktrainError(f"{out}: another pack-build is writing to this directory; wait "
                             f"for it to finish or choose another directory") from None
    _OUT_LOCKS[str(out.resolve())] = fd


def _unlock_out_dirs() -> None:
    while _OUT_LOCKS:
        os.close(_OUT_LOCKS.popitem()[1])


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    _check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _lock_out_dir(out)
    if any(out.iterdir()):
        if not overwrite:  # _check_out_dir let it through: leftovers of a killed build
            print(f"note: {out}: removing the leftovers of an interrupted pack-build (no "
                  f"{MANIFEST}) and building again", file=sys.stderr, flush=True)
        # The manifest goes first: an interrupted rebuild must never look complete.
        manifest = out / MANIFEST
        if manifest.exists():
            manifest.unlink()
            fsync_dir(out)
        for p in out.iterdir():
            if _is_ours(p.name):
                p.unlink()


def _is_ours(name: str) -> bool:
    """Files a build writes (and --overwrite removes); anything else in the directory stays."""
    return (name in (MANIFEST, CARD, TMP_SAMPLES)
            or re.fullmatch(r"shard-\d{5,}\.arrow", name) is not None
            or re.fullmatch(r"\.shard-\d{5,}\.arrow\.tmp", name) is not None
            or name.startswith((f".{MANIFEST}.tmp-", f".{CARD}.tmp-")))


def _cleanup(out: Path, shard_writer=None, remove_shards: bool = True,
             remove_dir: bool = False) -> None:
    """After a failed build or merge: delete the files it wrote (temporary ones always, shards
    with `remove_shards`) and, with `remove_dir`, the output directory it created if now empty."""
    if shard_writer is not None:
        try:
            shard_writer.abort()
        except Exception:
            pass
    if not out.is_dir():
        return
    for p in out.iterdir():
        name = p.name
        temp = name == TMP_SAMPLES or name.startswith(".")
        if _is_ours(name) and (temp or remove_shards):
            try:
                p.unlink()
            except OSError:
                pass
    if remove_dir:
        try:
            out.rmdir()
        except OSError:
            pass


def _peek(it: Iterator, n: int) -> tuple[list, Iterator]:
    head = list(itertools.islice(it, n))
    return head, itertools.chain(head, it)


def _chunked(it: Iterable, n: int) -> Iterator[list]:
    it = iter(it)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


class _SampleStore:
    """The temporary Arrow file: one row per kept sample, written as chunks come back, then
    memory-mapped for gathering packs. Pages already gathered are released from the process
    (MADV_DONTNEED) every few packs, so resident memory does not grow with the corpus."""

    # Each sample read maps the pages around it too (the kernel's fault-around, 64 KB by
    # default, which MADV_RANDOM does not switch off everywhere): release every so many samples.
    RELEASE_EVERY = 128  # samples gathered between releases: at most ~16 MB mapped

    def __init__(self, path: Path):
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, _SAMPLE_SCHEMA)
        self._mm = None
        self._refs: list[Any] = []

    def append(self, lengths: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        off = fmt_mod.numpy_to_arrow(offsets, pa.int32())
        batch = pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(off, fmt_mod.numpy_to_arrow(ids, pa.int32())),
             pa.ListArray.from_arrays(off, fmt_mod.numpy_to_arrow(labels, pa.int32()))],
            schema=_SAMPLE_SCHEMA)
        self._writer.write_batch(batch)

    def finish_writing(self) -> None:
        self._writer.close()
        self._sink.close()

    def open(self, n_samples: int) -> None:
        """Map the file; compute each sample's element offset (in int32 units from the start of
        the file) of its input_ids and of its labels."""
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            try:  # packs gather samples from all over the file: no readahead, no fault-around
                self._mm.madvise(mmap.MADV_RANDOM)
            except (OSError, ValueError):
                pass
        buf = pa.py_buffer(self._mm)
        reader = pa.ipc.open_file(pa.BufferReader(buf))
        base = buf.address
        self.ids_at = np.zeros(n_samples, dtype=np.int64)
        self.labels_at = np.zeros(n_samples, dtype=np.int64)
        k = 0
        for b in range(reader.num_record_batches):
            rb = reader.get_batch(b)
            starts = {}
            for c in ("input_ids", "labels"):
                col = rb.column(c)
                vals = col.values
                addr = vals.buffers()[1].address - base
                assert addr % 4 == 0, "Arrow buffers are 8-byte aligned"
                # offsets straight from the buffer (Array.to_numpy would import pandas)
                off = np.frombuffer(col.buffers()[1], dtype=np.int32)[
                    col.offset:col.offset + len(col) + 1]
                starts[c] = addr // 4 + vals.offset + off[:-1]
            m = rb.num_rows
            self.ids_at[k:k + m] = starts["input_ids"]
            self.labels_at[k:k + m] = starts["labels"]
            k += m
            del rb
        assert k == n_samples, (k, n_samples)
        del reader, buf
        self.flat = np.frombuffer(self._mm, dtype=np.int32, count=len(self._mm) // 4)
        self.release()  # reading every batch's metadata mapped a page or more per batch

    def gather(self, idx: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
        """Tokens and labels of samples ``idx`` back to back, and the samples' boundaries in
        them (int64, from 0)."""
        lens = lengths[idx].astype(np.int64)
        cu = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        ids = np.empty(int(cu[-1]), dtype=np.int32)
        labels = np.empty(int(cu[-1]), dtype=np.int32)
        step = self.RELEASE_EVERY
        for s in range(0, len(idx), step):  # a record batch holds thousands of samples
            e = min(s + step, len(idx))
            a, z = int(cu[s]), int(cu[e])
            ramp = np.arange(a, z, dtype=np.int64)
            ids[a:z] = self.flat[np.repeat(self.ids_at[idx[s:e]] - cu[s:e], lens[s:e]) + ramp]
            labels[a:z] = self.flat[np.repeat(self.labels_at[idx[s:e]] - cu[s:e], lens[s:e])
                                    + ramp]
            self._since_release += e - s
            if self._since_release >= step:
                self.release()
        labels[cu[:-1]] = IGNORE_INDEX
        return ids, labels, cu

    def release(self) -> None:
        self._since_release = 0
        if self._mm is not None and hasattr(self._mm, "madvise"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        for name in ("flat", "ids_at", "labels_at"):
            self.__dict__.pop(name, None)
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; the unlink below is enough
                pass
            self._mm = None
        try:
            if not self._sink.closed:
                self._writer.close()
                self._sink.close()
        except Exception:
            pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _read_sources(paths: list[Path], fmt: str, skip_invalid: bool, skipped: Counter,
                  sources: list[dict], chunk: int = CHUNK, split: str | None = None,
                  chunk_bytes: int | None = None) -> tuple[str, Iterator[_Task]]:
    """Return the (detected) format and an iterator over the tasks (chunks of at most ``chunk``
    records of one file) of all files in order. JSON Lines files are read as raw lines that the
    workers parse (the head of a file is parsed here too, to detect the format); with
    ``chunk_bytes`` their tasks end at that many bytes of lines or :data:`RAW_CHUNK_RECORDS`
    records, whichever comes first. Other files are parsed here. With ``--format auto`` every
    file's format is detected from its first records and all files must agree. Each source's
    ``records`` count of parsed files is filled in as the iterator is consumed (that of raw
    files as their results come back). Records of parsed files skipped as invalid are counted
    in each task's ``skipped`` (the caller adds them up), so that a partition counts only those
    around its own tasks. ``split`` picks the split of a Hugging Face DatasetDict directory."""
    from .sources import LineError, detect_format, is_jsonl, iter_raw_lines, iter_records, \
        parse_line

    resolved = {"fmt": None if fmt == "auto" else fmt}

    def detect(path: Path, head: list[dict]) -> None:
        got = detect_format(head, str(path))
        if resolved["fmt"] is None:
            resolved["fmt"] = got
        elif got != resolved["fmt"]:
            raise PacktrainError(
                f"{path}: records are in {got!r} format but earlier inputs are in "
                f"{resolved['fmt']!r}; pack them separately or pass --format")

    def raw_tasks(i: int, path: Path) -> Iterator[_Task]:
        lines: Iterator[tuple[int, bytes]] = iter_raw_lines(path)
        if fmt == "auto":
            head_lines: list[tuple[int, bytes]] = []
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
                detect(path, head)
            del head
            lines = itertools.chain(head_lines, lines)
        sp = str(path)

        def task(block: list[tuple[int, bytes]]) -> _Task:
            return _Task("raw", [r for _, r in block], file=i, path=sp,
                         linenos=[n for n, _ in block])

        # with chunk_bytes, many short records per task: per-task costs fall, tasks stay small
        most = RAW_CHUNK_RECORDS if chunk_bytes else chunk
        block: list[tuple[int, bytes]] = []
        size = 0
        for item in lines:
            block.append(item)
            size += len(item[1])
            if len(block) >= most or (chunk_bytes and size >= chunk_bytes):
                yield task(block)
                block, size = [], 0
        if block:
            yield task(block)

    def parsed_tasks(i: int, path: Path) -> Iterator[_Task]:
        local: Counter = Counter()
        it = iter_records(path, skip_invalid=skip_invalid, skipped=local, split=split)
        if fmt == "auto":
            head, it = _peek(it, DETECT_RECORDS)
            if head:
                detect(path, [r for _, r in head])
        n = 0
        prev: _Task | None = None
        seen: Counter = Counter()
        # One task held back, so that invalid records after a file's last good one are
        # counted with its last task.
        for block in _chunked(it, chunk):
            n += len(block)
            if prev is not None:
                yield prev
            prev = _Task("rec", [r for _, r in block], wheres=[w for w, _ in block], file=i,
                         skipped=local - seen)
            seen = local.copy()
        if prev is not None:
            prev.skipped = prev.skipped + (local - seen)
            yield prev
        elif local:  # every record invalid: an empty task still carries the count
            yield _Task("rec", [], wheres=[], file=i, skipped=local)
        sources[i]["records"] = n

    iters = [(raw_tasks if is_jsonl(p) else parsed_tasks)(i, p) for i, p in enumerate(paths)]
    stream: Iterator[_Task] = itertools.chain.from_iterable(iters)
    if resolved["fmt"] is None:
        # Detect from the first file that has records (empty files are skipped over here and
        # still counted with 0 records).
        buffered: list[_Task] = []
        for task in stream:
            buffered.append(task)
            if resolved["fmt"] is not None:
                break
        if resolved["fmt"] is None:
            raise PacktrainError(f"{', '.join(str(p) for p in paths)}: no records found in the "
                                 f"inputs")
        stream = itertools.chain(buffered, stream)
    return resolved["fmt"], stream


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


def _partition_tasks(stream: Iterator[_Task], n: int, i: int) -> Iterator[_Task]:
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


def build(args: Any) -> dict:
    """Run the whole pipeline; return the manifest written to ``args.out``. ``args`` is a
    :class:`BuildConfig`, an ``argparse.Namespace`` or a dict with the same names."""
    cfg = BuildConfig.from_args(args)
    from .remote import build_to_url, is_url

    if is_url(cfg.out):  # s3://, gs://, ...: build into a staging directory, then upload
        return build_to_url(cfg, build)
    # One core per worker process (and one in-process with --workers 1); this also keeps
    # tokenizers from warning about a fork after its thread pool was used.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        try:
            return _build(cfg)
        except _LiteMismatch as e:
            _unlock_out_dirs()
            print(f"pack-build: note: the quick tokenizer load differs from transformers' ({e}); "
                  f"building again through transformers", file=sys.stderr, flush=True)
            return _build(cfg, allow_lite=False)
    except OSError as e:
        full = _disk_full(e)
        if full is None:
            raise
        # pyarrow's write errors name no file: say which directory filled up (it is cleaned)
        raise PacktrainError(f"{cfg.out}: {full} while writing the dataset; nothing was kept. "
                             f"Free space or choose another output directory") from None
    finally:
        _unlock_out_dirs()
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _build(cfg: BuildConfig, allow_lite: bool = True) -> dict:
    t0 = time.perf_counter()
    ui = _Progress(cfg.quiet)
    from . import binpack
    from .sources import expand_inputs

    # ---- validate arguments (cheap checks first: no tokenizer needed to reject a bad call)
    if not cfg.inputs:
        raise PacktrainError("no inputs: pass one or more .jsonl/.json/.parquet files or globs "
                             "before the output directory")
    if cfg.max_length < 1:
        raise PacktrainError(f"--max-length {cfg.max_length}: must be a positive number of "
                             f"tokens")
    for name, value, allowed in (("--format", cfg.format, FORMATS),
                                 ("--template", cfg.template, TEMPLATES),
                                 ("--overlong", cfg.overlong, OVERLONG),
                                 ("--strategy", cfg.strategy, binpack.STRATEGIES)):
        if value not in allowed:
            raise PacktrainError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
    max_packs, max_bytes = parse_shard_size(cfg.shard_size)
    workers = cfg.workers if cfg.workers else default_workers()
    if workers < 1:
        raise PacktrainError(f"--workers {cfg.workers}: must be at least 1")
    tok_path = resolve_tokenizer(cfg.tokenizer)
    chat_template_text = None
    if cfg.chat_template:
        try:
            chat_template_text = Path(cfg.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PacktrainError(f"{cfg.chat_template}: cannot read the chat template "
                                 f"({getattr(e, 'strerror', None) or e})") from None

    n_parts, part = check_partition(cfg.num_partitions, cfg.partition)

    out = Path(cfg.out)
    _check_out_dir(out, cfg.overwrite)
    from .hf_source import resolve_hub_inputs

    inputs, hub = resolve_hub_inputs(list(cfg.inputs), cfg.split)
    paths = expand_inputs(inputs)
    resolved_out = out.resolve()
    for p in paths:
        if resolved_out in p.resolve().parents:
            raise PacktrainError(f"{p}: input lies inside the output directory {out}; choose "
                                 f"another output directory")
    tokenizer, lite_check = _build_tokenizer(tok_path, chat_template_text, workers,
                                             bool(cfg.dry_run), allow_lite)
    sources = [_source_info(p, cfg.split, hub) for p in paths]

    skipped: Counter = Counter()
    if part is None:
        chunking = dict(chunk=CHUNK, chunk_bytes=RAW_CHUNK_BYTES)
    else:  # partitions are exact blocks of records: part of their contract
        chunking = dict(chunk=PARTITION_BLOCK)
    fmt, stream = _read_sources(paths, cfg.format, cfg.skip_invalid, skipped, sources,
                                split=cfg.split, **chunking)
    if part is not None:
        stream = _partition_tasks(stream, n_parts, part)
    template = TEMPLATE_FOR_FORMAT[fmt] if cfg.template == "auto" else cfg.template
    spec = EncodeSpec(tok_path, fmt, template, bool(cfg.train_on_prompt), chat_template_text,
                      int(cfg.max_length), cfg.overlong)
    # Built here first so that configuration errors surface once, cleanly, in this process.
    renderer = _renderer_from_spec(spec, tokenizer)
    if cfg.dry_run:  # nothing below this line runs: nothing is written
        from .dry_run import plan

        _hash_sources(paths, sources, load_validator=False)()

        return plan(cfg, paths=paths, sources=sources, fmt=fmt, template=template,
                    stream=stream, spec=spec, renderer=renderer, tokenizer=tokenizer,
                    tok_path=tok_path, skipped=skipped, partition=(part, n_parts))

    created_out = not out.exists()
    _prepare_out_dir(out, cfg.overwrite)
    store: _SampleStore | None = None
    writer: fmt_mod.ShardWriter | None = None
    pool = None
    try:
        # ---- read, render, tokenize -> temporary sample file
        store = _SampleStore(out / TMP_SAMPLES)
        lengths_parts: list[np.ndarray] = []
        index_parts: list[np.ndarray] = []
        dropped: Counter = Counter()
        truncated = truncated_tokens = label_tokens = records = own_records = 0
        invalid: Counter = Counter()

        if workers == 1:
            encoder = Encoder(spec, renderer)
            results: Iterator = ((t, encoder.run(t.kind, t.payload)) for t in stream)
            hashed = _hash_sources(paths, sources)
        else:
            import multiprocessing as mp

            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            _WORKER["inherit"] = (spec, renderer)  # seen by forked workers only
            # Ctrl-C is held back while the pool starts, so it never lands half-way through
            # Pool() and leaves workers that nothing here can stop.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                pool = mp.get_context(method).Pool(workers, initializer=_worker_init,
                                                   initargs=(spec,))
            finally:
                _WORKER.pop("inherit", None)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            hashed = _hash_sources(paths, sources)  # after the fork, like the check below
            if lite_check is not None and lite_check.record is None:
                head, stream = _peek(stream, 1)
                _start_check(lite_check, tokenizer, tok_path, spec, head[0] if head else None)
            results = _ordered_map(pool, stream, workers * IN_FLIGHT_PER_WORKER)
        bar = ui.bar(desc="tokenize", unit="rec")  # after the fork: no tqdm thread in workers
        for task, res in results:
            own = task.kind in ("rec", "raw")  # not another partition's
            base = records
            records += res.n_records
            own_records += res.n_records if own else 0
            if task.kind in ("raw", "count"):
                sources[task.file]["records"] += res.n_records
            if own and task.skipped:
                skipped.update(task.skipped)
            if not cfg.skip_invalid and res.parse_errors and res.errors:
                # name the first bad line of the chunk, whichever stage found it
                j, msg = min([(j, m) for j, m, _ in res.parse_errors]
                             + [(j, f"{m} (pass --skip-invalid to skip invalid records and "
                                    f"count them)") for j, m, _ in res.errors])
                raise PacktrainError(f"{task.where(j)}: {msg}")
            if res.parse_errors:  # raised by the reader before, ahead of render errors
                if not cfg.skip_invalid:
                    j, msg, _ = res.parse_errors[0]
                    raise PacktrainError(f"{task.where(j)}: {msg}")
                for _, _, reason in (res.parse_errors if own else ()):
                    skipped[reason] += 1
            if res.errors:
                if not cfg.skip_invalid:
                    j, msg, _ = res.errors[0]
                    raise PacktrainError(f"{task.where(j)}: {msg} (pass --skip-invalid to skip "
                                         f"invalid records and count them)")
                for _, _, reason in res.errors:
                    invalid[reason] += 1
            dropped.update(res.dropped)
            truncated += res.truncated
            truncated_tokens += res.truncated_tokens
            label_tokens += res.label_tokens
            store.append(res.lengths, res.ids, res.labels)
            lengths_parts.append(res.lengths)
            index_parts.append(res.keep + base)
            bar.update(res.n_records + len(res.parse_errors))
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        store.finish_writing()
        if records == 0:
            raise PacktrainError(f"{', '.join(str(p) for p in paths)}: no records found in the "
                                 f"inputs")
        if own_records == 0:
            raise PacktrainError(f"--partition {part}: this partition got no records (the "
                                 f"inputs hold {records} records, in blocks of "
                                 f"{PARTITION_BLOCK} per file); use fewer partitions")
        lengths = (np.concatenate(lengths_parts) if lengths_parts
                   else np.zeros(0, np.int32)).astype(np.int64)
        sample_index = (np.concatenate(index_parts) if index_parts
                        else np.zeros(0, np.int64))
        del lengths_parts, index_parts
        if len(lengths) == 0:
            why = ", ".join(f"{k} {v}" for k, v in sorted((dropped + invalid).items()))
            raise PacktrainError(f"{cfg.out}: none of the {own_records} records left a sample "
                                 f"to pack ({why or 'nothing kept'})")

        # ---- pack globally, shuffle the pack order
        pbar = ui.bar(desc="pack", unit="sample", total=len(lengths))
        bins = binpack.pack(lengths, int(cfg.max_length), cfg.strategy, seed=int(cfg.seed))
        pbar.update(len(lengths))
        pbar.close()
        order = np.random.default_rng(int(cfg.seed)).permutation(len(bins))

        # ---- write shards
        store.open(len(lengths))
        writer = fmt_mod.ShardWriter(out, max_packs=max_packs, max_bytes=max_bytes)
        # the samples of every pack, in write order; each record batch is gathered and
        # written in one go (per pack, the numpy calls cost more than the copying)
        in_order = [bins[b] for b in order]
        pack_samples = np.fromiter(map(len, in_order), dtype=np.int64, count=len(in_order))
        all_idx = np.concatenate(in_order)
        first = np.zeros(len(in_order) + 1, dtype=np.int64)
        np.cumsum(pack_samples, out=first[1:])
        pack_tokens = np.add.reduceat(lengths[all_idx], first[:-1])
        del in_order
        wbar = ui.bar(desc="write", unit="pack", total=len(bins))
        for a, z, close in writer.plan(pack_tokens, pack_samples):
            idx = all_idx[first[a]:first[z]]
            ids, labels, cu = store.gather(idx, lengths)
            writer.add_batch(ids, labels, cu, pack_samples[a:z], sample_index[idx], close)
            wbar.update(z - a)
        shards = writer.close()
        wbar.close()
        store.close()

        # ---- statistics, card, manifest (last)
        hashed()
        tok_entry = _tokenizer_entry(lite_check, tokenizer, tok_path)
        tokens = int(lengths.sum())
        seconds = time.perf_counter() - t0
        lb = binpack.lower_bound(lengths, int(cfg.max_length))
        stats = {
            "records": own_records,
            "samples_packed": int(len(lengths)),
            "dropped": dict(sorted(dropped.items())),
            "skipped_invalid": dict(sorted((skipped + invalid).items())),
            "truncated": int(truncated),
            "truncated_tokens": int(truncated_tokens),
            "tokens": tokens,
            "label_tokens": int(label_tokens),
            "packs": len(bins),
            "lower_bound": int(lb),
            "fill": round(tokens / (len(bins) * int(cfg.max_length)), 6),
            "length_histogram": length_histogram(lengths, int(cfg.max_length)),
            "fill_histogram": fill_histogram(pack_tokens, int(cfg.max_length)),
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        }
        arguments = dataclasses.asdict(cfg)
        arguments["tokenizer"] = tok_path
        arguments["workers"] = cfg.workers if cfg.workers else "auto"
        resolved_ct = getattr(renderer, "chat_template", None)
        template_rec = {"name": template, "format": fmt,
                        "train_on_prompt": bool(cfg.train_on_prompt),
                        "chat_template": cfg.chat_template,
                        "chat_template_sha256": (hashlib.sha256(resolved_ct.encode()).hexdigest()
                                                 if resolved_ct else None)}
        manifest = {
            "format": fmt_mod.FORMAT_NAME,
            "format_version": fmt_mod.FORMAT_VERSION,
            "created_by": _versions(),
            "arguments": arguments,
            "max_length": int(cfg.max_length),
            "tokenizer": tok_entry,
            "template": template_rec,
            "sources": sources,
            "packing": {"strategy": cfg.strategy, "seed": int(cfg.seed),
                        "overlong": cfg.overlong, "shuffled": True,
                        "max_packs_per_shard": max_packs, "max_bytes_per_shard": max_bytes},
            "stats": stats,
            "shards": [s.to_json() for s in shards],
        }
        if part is not None:  # stats cover this partition; sources the whole build
            manifest["partition"] = {"index": part, "count": n_parts,
                                     "block_records": PARTITION_BLOCK, "rule": "round-robin"}
        fmt_mod.validate_manifest(manifest)
        from .card import dataset_card

        write_atomic(out / CARD, dataset_card(manifest).encode())
        fmt_mod.write_manifest(out, manifest)
    except BaseException:
        ui.close_all()
        if pool is not None:
            _stop_pool(pool)
        if store is not None:
            store.close()
        _cleanup(out, writer, remove_shards=True, remove_dir=created_out)
        raise
    if not cfg.quiet:
        from .tokenize.allocator import describe

        print(summary(manifest), file=sys.stderr)
        print(f"allocator       {describe()}", file=sys.stderr, flush=True)
    return manifest


def _disk_full(e: OSError) -> str | None:
    """'No space left on device' (or quota / file-size limit) when `e` says the output file
    system is full, else None. pyarrow's OSErrors carry the errno only in their text."""
    import errno

    names = {errno.ENOSPC: os.strerror(errno.ENOSPC), errno.EDQUOT: os.strerror(errno.EDQUOT),
             errno.EFBIG: f"{os.strerror(errno.EFBIG)} (the file system's or the process's "
                          f"file-size limit)"}
    if e.errno in names:
        return names[e.errno]
    m = re.search(r"\[errno (\d+)\]", str(e))
    return names.get(int(m.group(1))) if m else None


def _stop_pool(pool, deadline_s: float = 10.0) -> None:
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


def _ordered_map(pool, tasks: Iterator[_Task], window: int
                 ) -> Iterator[tuple[_Task, ChunkResult]]:
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


def summary(manifest: dict) -> str:
    """The closing summary of a build."""
    from .card import _fmt_bytes

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
        f"shards          {len(manifest['shards'])} ({_fmt_bytes(size)})",
    ]
    if "seconds" in s:
        lines.append(f"time            {s['seconds']:.1f} s ({s.get('tokens_per_s', 0):,.0f} "
                     f"tokens/s)")
    return "\n".join(lines)
