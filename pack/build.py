"""The pack-build pipeline: read records, render + tokenize them in worker processes, bin-pack the
whole dataset, write Arrow shards and, last, the manifest. :func:`build` runs these stages, in
this order (each with a progress bar on stderr unless ``quiet``):

0. check: the arguments (:mod:`pack.config`), the output directory (:mod:`pack.outdir`), the
   inputs (files, globs, Hugging Face datasets) and the tokenizer, before anything is written;
1. read: the records in order, in tasks of consecutive records of one file (:mod:`pack.tasks`:
   record ``k`` of the build is ``sample_index`` ``k``; with ``--num-partitions N --partition
   I`` only partition I's blocks are encoded, the others only counted);
2. encode: ``workers`` processes render and tokenize the tasks (:mod:`pack.encode`;
   ``workers == 1`` runs in-process), truncate (keep the first ``max_length`` tokens) or drop
   overlong samples and set the label at every sample start to -100. Results come back in
   submission order, so the output does not depend on the number of workers, with a few tasks
   per worker in flight, so memory does not grow with the corpus. The source files are hashed
   meanwhile, on a thread;
3. store: each kept sample is appended to a temporary Arrow file in the output directory
   (:mod:`pack.store`); only per-sample lengths and record numbers stay in memory;
4. pack: all lengths at once (:func:`pack.binpack.pack`), the pack order shuffled with
   ``numpy.random.default_rng(seed)``;
5. write: each pack's samples gathered from the memory-mapped temporary file and written through
   :class:`pack.format.ShardWriter` (shards under temporary names, renamed when complete);
6. manifest: the statistics (:mod:`pack.stats`), the dataset card ``README.md`` and, last,
   ``manifest.json`` (atomically). A directory without a manifest is not a dataset.

With ``--eval-fraction``/``--eval-records`` (:mod:`pack.eval_split`) the encoded samples are
divided by a hash of each record's content, and stages 4 to 6 run for the held-out side into
``OUT/eval/`` (:mod:`pack.eval_held_out`), published before the parent.

The sanity checks (:mod:`pack.sanity`) refuse, in stage 1, a chat template that renders user
and assistant turns alike; in stage 2 they flag records left with no label token (refused above
``--max-no-label-share``), samples starting with two BOS and truncated samples. They describe
the whole input, held-out records included.

``--dry-run`` stops after reading the heads of the inputs and hands over to
:mod:`pack.dry_run`: nothing is written. ``pack.merge`` joins the partitions of a build.

On any error (or Ctrl-C) the workers are stopped, the temporary files and the shards of this
build are removed and no manifest is left behind. Same inputs and arguments give byte-identical
shards and a manifest that differs only in ``stats.seconds`` and ``stats.tokens_per_s``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from . import __version__, sanity
from . import format as fmt_mod
from .config import TEMPLATE_FOR_FORMAT, BuildConfig, Settings, check_arguments
from .encode import (IN_FLIGHT_PER_WORKER, ChunkResult, EncodeSpec, Encoder, ordered_map,
                     renderer_from_spec, worker_pool)
from .errors import PacktrainError
from .eval_split import EvalRule, eval_rule
from .outdir import (TMP_SAMPLES, check_out_dir, cleanup, disk_full, prepare_out_dir, publish,
                     unlock_out_dirs)
from .progress import ReadBar
from .stats import Counts, build_stats, summary
from .store import SampleStore
from .tasks import PARTITION_BLOCK, Task, hash_sources, read_tasks, source_info
from .tokenize.choose import load_tokenizer_cached
from .tokenize.loading import tokenizer_record

__all__ = ["BuildConfig", "PARTITION_BLOCK", "build"]


def build(args: Any) -> dict:
    """Run the whole pipeline; return the manifest written to ``args.out``. ``args`` is a
    :class:`BuildConfig`, an ``argparse.Namespace`` or a dict with the same names."""
    cfg = BuildConfig.from_args(args)
    from .remote import build_to_url, is_url

    eval_rule(cfg)  # its one-line errors before any slow work, a URL's too

    if is_url(cfg.out):  # s3://, gs://, ...: build into a staging directory, then upload
        return build_to_url(cfg, build)
    # One core per worker process (and one in-process with --workers 1); this also keeps
    # tokenizers from warning about a fork after its thread pool was used.
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        return _build_local(cfg)
    except OSError as e:
        full = disk_full(e)
        if full is None:
            raise
        # pyarrow's write errors name no file: say which directory filled up (it is cleaned)
        raise PacktrainError(f"{cfg.out}: {full} while writing the dataset; nothing was kept. "
                             f"Free space or choose another output directory") from None
    finally:
        unlock_out_dirs()
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _build_local(cfg: BuildConfig) -> dict:
    """The stages of a build into a local directory (see the module docstring)."""
    t0 = time.perf_counter()
    ui = _Progress(cfg.quiet)
    job = _check(cfg)
    reading = _read(job)
    if cfg.dry_run:  # nothing below this line runs: nothing is written
        return _dry_run(job, reading)
    created_out = not job.out.exists()
    prepare_out_dir(job.out, cfg.overwrite)
    store: SampleStore | None = None
    # creating a writer writes nothing: it exists from here so that cleanup can always abort it
    writer = fmt_mod.ShardWriter(job.out, max_packs=job.settings.max_packs,
                                 max_bytes=job.settings.max_bytes,
                                 preference=reading.fmt == "preference")
    held_out = None
    try:
        store = SampleStore(job.out / TMP_SAMPLES)
        encoded = _encode(job, reading, store, ui)
        store.open(len(encoded.lengths))
        extra = None
        if job.eval is not None:
            from .eval_held_out import HeldOut

            held_out = HeldOut(job.out, job.settings.max_packs, job.settings.max_bytes,
                               preference=reading.fmt == "preference")
            encoded, extra = held_out.write(job.eval, encoded, lambda enc, where, w, more: (
                _manifest(job, reading, enc, *_pack_write(cfg, enc, store, w, ui), t0, where,
                          more)))
        written = _pack_write(cfg, encoded, store, writer, ui)
        store.close()
        manifest = _manifest(job, reading, encoded, *written, t0, job.out, extra)
    except BaseException:
        ui.close_all()
        if store is not None:
            store.close()
        if held_out is not None:
            held_out.abort()
        cleanup(job.out, writer, remove_shards=True, remove_dir=created_out)
        raise
    if not cfg.quiet:
        from .tokenize.allocator import describe

        print(summary(manifest, encoded.found.where), file=sys.stderr)
        if "eval" in manifest:
            from .eval_split import summary_line

            print(summary_line(manifest), file=sys.stderr)
        print(f"allocator       {describe()}", file=sys.stderr, flush=True)
    else:  # the summary holds them otherwise
        for line in sanity.warnings(manifest["checks"], encoded.found.where):
            print(line, file=sys.stderr, flush=True)
    return manifest


class _Progress:
    """tqdm bars on stderr (none when quiet); bars still open when an error stops the build are
    closed so that the error line starts on a line of its own."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars: list = []

    def bar(self, **kw: Any) -> Any:
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


# ---------------------------------------------------------------- 0. check

@dataclasses.dataclass
class _Job:
    """What the checks settle, before anything is read or written."""

    cfg: BuildConfig
    settings: Settings
    out: Path
    paths: list[Path]
    sources: list[dict]  # the manifest's entries, filled in as the build reads and hashes
    tokenizer: Any
    eval: EvalRule | None = None  # the held-out split asked for (pack.eval_split)


def _check(cfg: BuildConfig) -> _Job:
    """Check the arguments, the output directory and the inputs; load the tokenizer."""
    from .hf_source import resolve_hub_inputs
    from .sources import expand_inputs

    settings = check_arguments(cfg)
    held_out = eval_rule(cfg)
    out = Path(cfg.out)
    check_out_dir(out, cfg.overwrite)
    inputs, hub = resolve_hub_inputs(list(cfg.inputs), cfg.split)
    paths = expand_inputs(inputs)
    resolved_out = out.resolve()
    for p in paths:
        if resolved_out in p.resolve().parents:
            raise PacktrainError(f"{p}: input lies inside the output directory {out}; choose "
                                 f"another output directory")
    tokenizer = load_tokenizer_cached(settings.tok_path)
    sources = [source_info(p, cfg.split, hub) for p in paths]
    return _Job(cfg, settings, out, paths, sources, tokenizer, held_out)


# ---------------------------------------------------------------- 1. read

@dataclasses.dataclass
class _Reading:
    """The tasks of the build (read lazily) and how they are rendered."""

    fmt: str
    template: str
    stream: Iterator[Task]
    spec: EncodeSpec
    renderer: Any
    skipped: Counter  # invalid records the reader skipped (parsed files), added up by stage 2
    turns: dict | None = None  # pack.sanity.check_turns: the chat template's turns


def _read(job: _Job) -> _Reading:
    """Start reading (the heads of the inputs are read to detect their format) and set up the
    renderer."""
    cfg, s = job.cfg, job.settings
    skipped: Counter = Counter()
    fmt, stream = read_tasks(job.paths, job.sources, cfg.format, cfg.skip_invalid, skipped,
                             cfg.split, n_parts=s.n_parts, part=s.part,
                             max_record_bytes=s.max_record_bytes)
    template = TEMPLATE_FOR_FORMAT[fmt] if cfg.template == "auto" else cfg.template
    if (fmt == "preference" and cfg.template == "auto" and not cfg.chat_template
            and not getattr(job.tokenizer, "chat_template", None)):
        template = "none"  # plain text: BOS + prompt, completion + EOS
    spec = EncodeSpec(s.tok_path, fmt, template, bool(cfg.train_on_prompt), s.chat_template_text,
                      int(cfg.max_length), cfg.overlong,
                      eval_seed=None if job.eval is None else job.eval.seed)
    # Built here first so that configuration errors surface once, cleanly, in this process.
    renderer = renderer_from_spec(spec, job.tokenizer)
    turns = sanity.check_turns(renderer, cfg.chat_template, cfg.allow_indistinct_turns)
    return _Reading(fmt, template, stream, spec, renderer, skipped, turns)


def _dry_run(job: _Job, reading: _Reading) -> dict:
    """``--dry-run``: hand over to :func:`pack.dry_run.plan`, which reads and estimates."""
    from .dry_run import plan

    hash_sources(job.paths, job.sources, load_validator=False)()
    s = job.settings
    return plan(job.cfg, paths=job.paths, sources=job.sources, fmt=reading.fmt,
                template=reading.template, stream=reading.stream, spec=reading.spec,
                renderer=reading.renderer, tokenizer=job.tokenizer, tok_path=s.tok_path,
                skipped=reading.skipped, partition=(s.part, s.n_parts))


# ---------------------------------------------------------------- 2. encode, 3. store

@dataclasses.dataclass
class _Encoded:
    """What encoding leaves in memory: each kept sample's length and record number (the rest
    is in the sample store), what it counted, and the wait for the sources' hashes."""

    lengths: np.ndarray       # int64
    sample_index: np.ndarray  # int64
    counts: Counts
    hashed: Callable[[], None]
    found: sanity.Findings
    # with an eval split (pack.eval_held_out): each sample's record hash, label tokens and
    # tokens cut off; and, in a share of the samples, each one's row in the sample store
    per_sample: dict[str, np.ndarray] | None = None
    rows: np.ndarray | None = None  # None: sample i is row i
    store_lengths: np.ndarray | None = None  # every row's length, when rows is set
    # preference pairs: each sample's chosen length (the sample is chosen + rejected)
    splits: np.ndarray | None = None


def _encode(job: _Job, reading: _Reading, store: SampleStore, ui: _Progress) -> _Encoded:
    """Render and tokenize every task, in order, appending the kept samples to ``store``."""
    s = job.settings
    counts = Counts(skipped=reading.skipped)
    found = sanity.Findings()
    if s.workers == 1:
        encoder = Encoder(reading.spec, reading.renderer)
        hashed = hash_sources(job.paths, job.sources)
        results = ((t, encoder.run(t.kind, t.payload)) for t in reading.stream)
        lengths, sample_index, per_sample, splits = _collect(results, job, counts, found,
                                                             store, ui)
    else:
        with worker_pool(reading.spec, reading.renderer, s.workers) as pool:
            # after the fork: a child must not inherit a copy of a running thread
            hashed = hash_sources(job.paths, job.sources)
            results = ordered_map(pool, reading.stream, s.workers * IN_FLIGHT_PER_WORKER)
            lengths, sample_index, per_sample, splits = _collect(results, job, counts, found,
                                                                 store, ui)
    store.finish_writing()
    if counts.records == 0:
        raise PacktrainError(f"{', '.join(str(p) for p in job.paths)}: no records found in the "
                             f"inputs")
    if counts.own_records == 0:
        raise PacktrainError(f"--partition {s.part}: this partition got no records (the "
                             f"inputs hold {counts.records} records, in blocks of "
                             f"{PARTITION_BLOCK} per file); use fewer partitions")
    if len(lengths) == 0:
        why = ", ".join(f"{k} {v}" for k, v in sorted((counts.dropped + counts.invalid).items()))
        raise PacktrainError(f"{job.cfg.out}: none of the {counts.own_records} records left a "
                             f"sample to pack ({why or 'nothing kept'})")
    sanity.refuse_no_labels(found, counts.own_records, float(job.cfg.max_no_label_share))
    return _Encoded(lengths, sample_index, counts, hashed, found, per_sample, splits=splits)


def _collect(results: Iterator[tuple[Task, ChunkResult]], job: _Job, counts: Counts,
             found: sanity.Findings, store: SampleStore, ui: _Progress
             ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray] | None, np.ndarray | None]:
    """Take the results in order into ``counts`` and ``store``; return the kept samples'
    lengths and record numbers (int64), with an eval split their per-sample arrays, and for
    preference pairs each one's chosen length."""
    lengths_parts: list[np.ndarray] = []
    index_parts: list[np.ndarray] = []
    split_parts: list[np.ndarray] = []
    per_sample: dict[str, list[np.ndarray]] | None = None if job.eval is None else {}
    # after the fork: no tqdm thread in workers
    bar = ReadBar(ui.bar, sum(int(s.get("bytes") or 0) for s in job.sources))
    for task, res in results:
        base = counts.records
        _count(task, res, counts, job.sources, job.cfg.skip_invalid)
        found.add(task, res, base)
        store.append(res.lengths, res.ids, res.labels)
        lengths_parts.append(res.lengths)
        index_parts.append(res.keep + base)
        if res.split is not None:
            split_parts.append(res.split)
        if per_sample is not None and res.per_sample is not None:
            for k, v in res.per_sample.items():
                per_sample.setdefault(k, []).append(v)
        bar.update(task.end, res.n_records + len(res.parse_errors), res.lengths)
    bar.finish()
    lengths = (np.concatenate(lengths_parts) if lengths_parts
               else np.zeros(0, np.int32)).astype(np.int64)
    sample_index = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
    splits = np.concatenate(split_parts).astype(np.int64) if split_parts else None
    if per_sample is not None:
        from .encode import per_sample_arrays

        return lengths, sample_index, per_sample_arrays(per_sample), splits
    return lengths, sample_index, None, splits


def _count(task: Task, res: ChunkResult, counts: Counts, sources: list[dict],
           skip_invalid: bool) -> None:
    """Add one task's result to ``counts``; without ``skip_invalid``, raise on its first
    invalid record."""
    own = task.kind in ("rec", "raw")  # not another partition's
    counts.records += res.n_records
    counts.own_records += res.n_records if own else 0
    if task.kind in ("raw", "count"):
        sources[task.file]["records"] += res.n_records
    if own and task.skipped:
        counts.skipped.update(task.skipped)
    if not skip_invalid and res.parse_errors and res.errors:
        # name the first bad line of the chunk, whichever stage found it
        j, msg = min([(j, m) for j, m, _ in res.parse_errors]
                     + [(j, f"{m} (pass --skip-invalid to skip invalid records and "
                            f"count them)") for j, m, _ in res.errors])
        raise PacktrainError(f"{task.where(j)}: {msg}")
    if res.parse_errors:  # raised by the reader before, ahead of render errors
        if not skip_invalid:
            j, msg, _ = res.parse_errors[0]
            raise PacktrainError(f"{task.where(j)}: {msg}")
        for _, _, reason in (res.parse_errors if own else ()):
            counts.skipped[reason] += 1
    if res.errors:
        if not skip_invalid:
            j, msg, _ = res.errors[0]
            raise PacktrainError(f"{task.where(j)}: {msg} (pass --skip-invalid to skip "
                                 f"invalid records and count them)")
        for _, _, reason in res.errors:
            counts.invalid[reason] += 1
    counts.dropped.update(res.dropped)
    counts.truncated += res.truncated
    counts.truncated_tokens += res.truncated_tokens
    counts.label_tokens += res.label_tokens


# ---------------------------------------------------------------- 4. pack

def _pack(cfg: BuildConfig, lengths: np.ndarray, ui: _Progress) -> tuple[list, np.ndarray]:
    """Bin-pack all samples at once; the packs (sample indices each) and their shuffled order."""
    from . import binpack

    pbar = ui.bar(desc="pack", unit="sample", total=len(lengths))
    bins = binpack.pack(lengths, int(cfg.max_length), cfg.strategy, seed=int(cfg.seed))
    pbar.update(len(lengths))
    pbar.close()
    order = np.random.default_rng(int(cfg.seed)).permutation(len(bins))
    return bins, order


# ---------------------------------------------------------------- 5. write

def _write(writer: fmt_mod.ShardWriter, store: SampleStore, encoded: _Encoded, bins: list,
           order: np.ndarray, ui: _Progress) -> tuple[list, np.ndarray]:
    """Write the packs in ``order``; return the shards written and each pack's token count."""
    lengths = encoded.lengths
    rows = encoded.rows
    store_lengths = lengths if rows is None else encoded.store_lengths
    # the samples of every pack, in write order; each record batch is gathered and
    # written in one go (per pack, the numpy calls cost more than the copying)
    in_order = [bins[b] for b in order]
    pack_samples = np.fromiter(map(len, in_order), dtype=np.int64, count=len(in_order))
    pairs = encoded.splits is not None  # each sample is a pair: two segments
    pack_segments = pack_samples * 2 if pairs else pack_samples
    all_idx = np.concatenate(in_order)
    first = np.zeros(len(in_order) + 1, dtype=np.int64)
    np.cumsum(pack_samples, out=first[1:])
    pack_tokens = np.add.reduceat(lengths[all_idx], first[:-1])
    del in_order
    wbar = ui.bar(desc="write", unit="pack", total=len(bins))
    for a, z, close in writer.plan(pack_tokens, pack_segments):
        idx = all_idx[first[a]:first[z]]
        ids, labels, cu = store.gather(idx if rows is None else rows[idx], store_lengths)
        index = encoded.sample_index[idx]
        if pairs:
            cu, index = pair_segments(cu, encoded.splits[idx], labels, index)
        writer.add_batch(ids, labels, cu, pack_segments[a:z], index, close)
        wbar.update(z - a)
    shards = writer.close()
    wbar.close()
    return shards, pack_tokens


def pair_segments(cu: np.ndarray, splits: np.ndarray, labels: np.ndarray, index: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Pairs' boundaries (``cu``) and record numbers -> their segments': each pair's chosen
    side ends ``splits`` tokens into it; the rejected side's first label is set to -100."""
    seg = np.empty(2 * len(cu) - 1, dtype=np.int64)
    seg[0::2] = cu
    seg[1::2] = cu[:-1] + splits
    labels[seg[1:-1:2]] = fmt_mod.IGNORE_INDEX
    return seg, np.repeat(index, 2)


def _pack_write(cfg: BuildConfig, encoded: _Encoded, store: SampleStore,
                writer: fmt_mod.ShardWriter, ui: _Progress) -> tuple[np.ndarray, int, list]:
    """Stages 4 and 5 for the samples of ``encoded`` (all of the build's, or one side of its
    eval split): each pack's token count, the number of packs, the shards written."""
    bins, order = _pack(cfg, encoded.lengths, ui)
    shards, pack_tokens = _write(writer, store, encoded, bins, order, ui)
    return pack_tokens, len(bins), shards


# ---------------------------------------------------------------- 6. manifest

def _manifest(job: _Job, reading: _Reading, encoded: _Encoded, pack_tokens: np.ndarray,
              packs: int, shards: list, t0: float, out: Path, extra: dict | None) -> dict:
    """Complete the manifest; write the dataset card, then, last, the manifest."""
    from .card import dataset_card

    cfg, s = job.cfg, job.settings
    encoded.hashed()
    tok_entry = tokenizer_record(job.tokenizer, s.tok_path)
    seconds = time.perf_counter() - t0
    stats = build_stats(encoded.counts, encoded.lengths, pack_tokens, packs,
                        int(cfg.max_length), seconds)
    preference = encoded.splits is not None
    if preference:  # a sample is a pair; samples_packed counts segments, as the shards hold
        stats["samples_packed"] = 2 * len(encoded.lengths)
        stats["pairs"] = {"in": encoded.counts.own_records, "packed": len(encoded.lengths),
                          "dropped": stats["dropped"]}
    arguments = dataclasses.asdict(cfg)
    arguments["tokenizer"] = s.tok_path
    arguments["workers"] = cfg.workers if cfg.workers else "auto"
    resolved_ct = getattr(reading.renderer, "chat_template", None)
    manifest = {
        "format": fmt_mod.FORMAT_NAME,
        "format_version": fmt_mod.PREFERENCE_VERSION if preference else fmt_mod.FORMAT_VERSION,
        **({"kind": fmt_mod.PREFERENCE} if preference else {}),
        "created_by": _versions(),
        "arguments": arguments,
        "max_length": int(cfg.max_length),
        "tokenizer": tok_entry,
        "template": {"name": reading.template, "format": reading.fmt,
                     "train_on_prompt": bool(cfg.train_on_prompt),
                     "chat_template": cfg.chat_template,
                     "chat_template_sha256": (hashlib.sha256(resolved_ct.encode()).hexdigest()
                                              if resolved_ct else None)},
        "sources": job.sources,
        "packing": {"strategy": cfg.strategy, "seed": int(cfg.seed),
                    "overlong": cfg.overlong, "shuffled": True,
                    "max_packs_per_shard": s.max_packs, "max_bytes_per_shard": s.max_bytes},
        "stats": stats,
        "checks": sanity.manifest_checks(encoded.found, stats, float(cfg.max_no_label_share),
                                         reading.turns),
        "shards": [sh.to_json() for sh in shards],
    }
    if s.part is not None:  # stats cover this partition; sources the whole build
        manifest["partition"] = {"index": s.part, "count": s.n_parts,
                                 "block_records": PARTITION_BLOCK, "rule": "round-robin"}
    manifest.update(extra or {})
    fmt_mod.validate_manifest(manifest)
    publish(out, manifest, dataset_card(manifest))
    return manifest


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
