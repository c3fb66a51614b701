"""``pack-build --dry-run``: say what a build would make, and write nothing.

:func:`pack.build.build` runs its usual checks (arguments, output directory, inputs expanded and
hashed, tokenizer and template loaded, formats detected) and then hands over to :func:`plan`
instead of creating the output directory. :func:`plan` reads every record of the inputs (so
record counts are exact and unreadable lines fail as in a real build), renders and tokenizes an
evenly spread sample of at most :data:`SAMPLE` of them, and extrapolates samples, tokens, label
tokens, truncation and the lower bound on packs. Those numbers are estimates and are labelled so;
errors in records outside the sample (a missing field, say) only show in the real build.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .encode import Encoder, parse_raw
from .errors import PacktrainError
from .tokenize.loading import tokenizer_record

SAMPLE = 512  # records rendered and tokenized for the estimate


class _Spread:
    """An evenly spread sample of a stream of unknown length: keep every ``stride``-th item; when
    ``2 * size`` are kept, drop every other one and double the stride. Deterministic, and the
    kept items are spread over the whole stream."""

    def __init__(self, size: int):
        self.size, self.stride, self.items = size, 1, []

    def offer(self, index: int, make) -> None:
        if index % self.stride:
            return
        self.items.append(make())
        if len(self.items) >= 2 * self.size:
            self.items = self.items[::2]
            self.stride *= 2


def plan(cfg: Any, *, paths: list[Path], sources: list[dict], fmt: str, template: str,
         stream: Iterator, spec: Any, renderer: Any, tokenizer: Any, tok_path: str,
         skipped: Counter, partition: tuple[int | None, int]) -> dict:
    """Read everything, estimate from a sample, return the plan (see :func:`plan_text`)."""
    part, n_parts = partition
    from .eval_split import eval_rule

    rule = eval_rule(cfg)
    held: list[int] = []  # records of the eval split (--eval-fraction: counted exactly)
    on_records = None if rule is None or rule.fraction is None else _held_counter(rule, held)
    records, own_records, items = _read_all(stream, sources, skipped, bool(cfg.skip_invalid),
                                            on_records)
    if records == 0:
        raise PacktrainError(f"{', '.join(str(p) for p in paths)}: no records found in the "
                             f"inputs")
    if own_records == 0:
        raise PacktrainError(f"--partition {part}: this partition got no records (the inputs "
                             f"hold {records} records); use fewer partitions")

    # between SAMPLE and 2 * SAMPLE spread items, or all records
    picked = [items[k] for k in
              np.unique(np.linspace(0, len(items) - 1, min(SAMPLE, len(items))).round()
                        .astype(np.int64))]
    res = Encoder(spec, renderer)([r for _, r in picked])
    if res.errors and not cfg.skip_invalid:
        j, msg, _ = res.errors[0]
        raise PacktrainError(f"{picked[j][0]}: {msg} (pass --skip-invalid to skip invalid "
                             f"records and count them)")
    max_len = int(cfg.max_length)
    out = Path(cfg.out)
    if not out.exists():
        out_state = "would be created"
    elif any(out.iterdir()):
        out_state = "exists; its dataset would be replaced (--overwrite)"
    else:
        out_state = "exists and is empty"
    resolved_ct = getattr(renderer, "chat_template", None)
    return {
        "dry_run": True,
        "out": str(out),
        "out_state": out_state,
        "sources": sources,
        "format": fmt,
        "template": template,
        "chat_template": cfg.chat_template or ("tokenizer's" if resolved_ct else None),
        "train_on_prompt": bool(cfg.train_on_prompt),
        "tokenizer": tokenizer_record(tokenizer, tok_path),
        "max_length": max_len,
        "strategy": cfg.strategy,
        "overlong": cfg.overlong,
        "seed": int(cfg.seed),
        "shard_size": cfg.shard_size,
        "partition": None if part is None else {"index": part, "count": n_parts},
        "records": own_records,
        "records_total": records,
        "skipped_invalid": dict(sorted(skipped.items())),
        "estimate": _estimate(res, len(picked), own_records, max_len),
        "eval": None if rule is None else {
            "flag": (f"--eval-fraction {rule.fraction}" if rule.records is None
                     else f"--eval-records {rule.records}"),
            "records": sum(held) if rule.records is None else min(rule.records, own_records)},
    }


def _held_counter(rule: Any, held: list[int]) -> Any:
    """A callback adding to ``held`` how many of a task's records --eval-fraction holds out."""
    from .eval_split import fraction_bound, record_hashes

    bound = np.uint64(fraction_bound(rule.fraction))

    def count(recs: list) -> None:
        held.append(int(np.count_nonzero(record_hashes(recs, rule.seed) < bound)))

    return count


def _read_all(stream: Iterator, sources: list[dict], skipped: Counter, skip_invalid: bool,
              on_records: Any = None) -> tuple[int, int, list]:
    """Read every task: the number of records of the build and of this partition, and an
    evenly spread sample of the partition's ``(where, record)``; ``on_records`` (if given) is
    called with the records of each of the partition's tasks."""
    sample = _Spread(SAMPLE)
    records = own_records = 0
    for task in stream:
        own = task.kind in ("rec", "raw")
        if task.kind in ("raw", "count"):
            parsed, pos, errors = parse_raw(task.payload)
            if errors and not skip_invalid:
                j, message, _ = errors[0]
                raise PacktrainError(f"{task.where(j)}: {message}")
            n = len(parsed)
            if own:
                if on_records is not None:
                    on_records(parsed)
                skipped.update(reason for _, _, reason in errors)
                for k, (j, rec) in enumerate(zip(pos, parsed)):
                    sample.offer(own_records + k, lambda: (task.where(j), rec))
            sources[task.file]["records"] += n
        elif task.kind == "skip":
            n = task.payload[0]
        else:
            n = len(task.payload)
            if on_records is not None:
                on_records(task.payload)
            for j, rec in enumerate(task.payload):
                sample.offer(own_records + j, lambda: (task.where(j), rec))
            if task.skipped:
                skipped.update(task.skipped)
        records += n
        own_records += n if own else 0
    return records, own_records, sample.items


def _estimate(res: Any, n: int, own_records: int, max_len: int) -> dict:
    """Extrapolate the :class:`pack.encode.ChunkResult` of ``n`` sampled records to all
    ``own_records``."""
    per_record = np.zeros(n, dtype=np.float64)  # tokens each sampled record would add
    per_record[res.keep] = res.lengths
    scale = own_records / n
    tokens = float(per_record.sum()) * scale
    # 95% interval of the total from the sample's spread (normal approximation)
    half = 1.96 * own_records * float(per_record.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return {
        "sampled_records": n,
        "samples": round(len(res.keep) * scale),
        "tokens": round(tokens),
        "tokens_95pct": [max(0, round(tokens - half)), round(tokens + half)],
        "label_tokens": round(res.label_tokens * scale),
        "truncated": round(res.truncated * scale),
        "dropped": {k: round(v * scale) for k, v in sorted(res.dropped.items())},
        "mean_sample_length": (round(float(res.lengths.mean()), 1) if len(res.lengths)
                               else 0.0),
        "packs_lower_bound": math.ceil(tokens / max_len),
    }


def plan_text(p: dict) -> str:
    """The dry-run report, one screen."""
    e = p["estimate"]
    tok = p["tokenizer"]
    lines = ["dry run: nothing was written"]
    lines.append(f"inputs           {len(p['sources'])}")
    for s in p["sources"]:
        what = f" (Hugging Face dataset{', split ' + s['split'] if s.get('split') else ''})" \
            if s.get("kind") == "hf-dataset" else ""
        lines.append(f"  {s['path']}{what}  {s['records']:,} records, sha256 {s['sha256']}")
    part = p["partition"]
    recs = f"{p['records']:,}"
    if part:
        recs += f" in partition {part['index']} of {part['count']} ({p['records_total']:,} in all)"
    skipped = ", ".join(f"{k} {v:,}" for k, v in p["skipped_invalid"].items()) or "none"
    lines += [
        f"records          {recs}; skipped invalid: {skipped}",
        f"format           {p['format']}",
        f"template         {p['template']}"
        + (f" (chat template: {p['chat_template']})" if p["chat_template"] else "")
        + f"; train on prompt: {'yes' if p['train_on_prompt'] else 'no'}",
        f"tokenizer        {tok.get('name') or tok['path']} (vocab {tok['vocab_size']:,})",
        f"  fingerprint    {tok['fingerprint']}",
        f"max_length       {p['max_length']:,}",
        f"packing          {p['strategy']}, seed {p['seed']}, overlong: {p['overlong']}, "
        f"shards of {p['shard_size']}",
        f"output           {p['out']} ({p['out_state']})",
        f"estimate         from {e['sampled_records']:,} records rendered and tokenized "
        f"(an estimate, not a count):",
        (f"  pairs          ~{e['samples']:,} (two segments each)" if p["format"] == "preference"
         else f"  samples        ~{e['samples']:,}"),
        f"  tokens         ~{e['tokens']:,} (95%: {e['tokens_95pct'][0]:,} to "
        f"{e['tokens_95pct'][1]:,}); ~{e['label_tokens']:,} with labels",
        f"  mean length    ~{e['mean_sample_length']:,} tokens; truncated ~{e['truncated']:,}"
        + (", dropped " + ", ".join(f"{k} ~{v:,}" for k, v in e["dropped"].items())
           if e["dropped"] else ""),
        f"  packs          at least ~{e['packs_lower_bound']:,} of {p['max_length']:,} tokens",
    ]
    ev = p.get("eval")
    if ev:
        lines.append(f"eval split       {ev['records']:,} records held out into "
                     f"{p['out']}/eval ({ev['flag']}; a record that gives no sample is in "
                     f"neither dataset)")
    return "\n".join(lines)
