"""pack-build's arguments (:class:`BuildConfig`, the same names as the command line's options)
and their checks, run before any slow work: cheap ones first, so a bad call is rejected
without loading a tokenizer. Each failure is a one-line :class:`PacktrainError`."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

from .errors import PacktrainError
from .sanity import MAX_NO_LABEL_SHARE, check_share
from .tasks import check_partition
from .tokenize.choose import resolve_tokenizer

# preference: "chat", or "none" for a tokenizer without a chat template (pack.build._read)
TEMPLATE_FOR_FORMAT = {"alpaca": "alpaca", "messages": "chat", "text": "none",
                       "preference": "chat"}
FORMATS = ("auto", "alpaca", "messages", "text", "preference")
TEMPLATES = ("auto", "alpaca", "chat", "none")
OVERLONG = ("truncate", "drop")
# --max-record-bytes: a JSON Lines line longer than this is refused (skipped and counted with
# --skip-invalid) without being read whole. A record is tokenized whole before it is truncated to
# --max-length, at some 80 to 150 bytes of memory per byte of text (a 50 MB record: 4.2 GB peak
# RSS as words, 7.4 GB as "a a a ..."), so 16 MiB keeps one record under ~2.5 GB per worker, yet
# it is some 4 million tokens, 1,000 times the default --max-length, and beyond any real
# fine-tuning record (a whole book is 1 to 2 MB). Equal to pack.sources.MAX_RECORD_BYTES.
MAX_RECORD_BYTES_DEFAULT = "16MB"


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
    max_record_bytes: str | int = MAX_RECORD_BYTES_DEFAULT  # longest JSON Lines line read
    eval_fraction: float | None = None  # hold out this share of the records (pack.eval_split)
    eval_records: int | None = None     # ... or this many records
    eval_seed: int = 0                  # key of the records' split hash
    max_no_label_share: float = MAX_NO_LABEL_SHARE  # pack.sanity: refuse above this share
    allow_indistinct_turns: bool = False              # pack.sanity.check_turns

    @classmethod
    def from_args(cls, args: Any) -> "BuildConfig":
        if isinstance(args, cls):
            return args
        d = dict(args) if isinstance(args, dict) else dict(vars(args))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the arguments resolve to once checked."""

    workers: int
    max_packs: int | None
    max_bytes: int | None
    tok_path: str
    chat_template_text: str | None  # the --chat-template file's text
    n_parts: int
    part: int | None
    max_record_bytes: int


# cu_seqlens and position_ids are int32 columns: a pack can hold no more tokens than that.
MAX_LENGTH_LIMIT = 2 ** 31 - 1
# More tokenizer processes than this per core only add memory (each loads its own tokenizer).
WORKERS_PER_CORE = 4


def check_arguments(cfg: BuildConfig) -> Settings:
    """Check ``cfg`` (no tokenizer needed to reject a bad call) and resolve its defaults."""
    from .binpack import STRATEGIES

    if not cfg.inputs:
        raise PacktrainError("no inputs: pass one or more .jsonl/.json/.parquet files or globs "
                             "before the output directory")
    if not 1 <= cfg.max_length <= MAX_LENGTH_LIMIT:
        raise PacktrainError(f"--max-length {cfg.max_length}: must be a number of tokens from 1 "
                             f"to {MAX_LENGTH_LIMIT:,} (the format stores offsets as int32)")
    if not 0 <= cfg.seed < 2 ** 63:
        raise PacktrainError(f"--seed {cfg.seed}: must be a whole number from 0 to 2**63 - 1")
    for name, value, allowed in (("--format", cfg.format, FORMATS),
                                 ("--template", cfg.template, TEMPLATES),
                                 ("--overlong", cfg.overlong, OVERLONG),
                                 ("--strategy", cfg.strategy, STRATEGIES)):
        if value not in allowed:
            raise PacktrainError(f"{name} {value!r}: choose one of {', '.join(allowed)}")
    check_share(cfg.max_no_label_share)
    max_packs, max_bytes = parse_shard_size(cfg.shard_size)
    max_record_bytes = parse_record_bytes(cfg.max_record_bytes)
    workers = cfg.workers if cfg.workers else default_workers()
    if not 1 <= workers <= WORKERS_PER_CORE * default_workers():
        raise PacktrainError(f"--workers {cfg.workers}: must be from 1 to {WORKERS_PER_CORE}x the "
                             f"{default_workers()} usable cores (each worker holds a tokenizer)")
    tok_path = resolve_tokenizer(cfg.tokenizer)
    chat_template_text = None
    if cfg.chat_template:
        try:
            chat_template_text = Path(cfg.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PacktrainError(f"{cfg.chat_template}: cannot read the chat template "
                                 f"({getattr(e, 'strerror', None) or e})") from None
    n_parts, part = check_partition(cfg.num_partitions, cfg.partition)
    return Settings(workers, max_packs, max_bytes, tok_path, chat_template_text, n_parts, part,
                    max_record_bytes)


def _number_and_unit(text: str | int, flag: str, expected: str) -> tuple[str, str | None]:
    """``"256MB"`` -> ``("256", "MB")``, ``"1000"`` -> ``("1000", None)``; a positive number or
    a one-line error naming ``flag`` and what was ``expected``."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?", str(text).strip(), flags=re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise PacktrainError(f"{flag} {text!r}: expected {expected}")
    return m.group(1), m.group(2)


def _bytes(number: str, unit: str) -> int:
    """Binary units: ``KB`` and ``KiB`` are both 1024 bytes."""
    mult = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
    return max(1, int(float(number) * mult[unit.upper().replace("I", "")]))


def parse_shard_size(text: str | int) -> tuple[int | None, int | None]:
    """``"1000"`` -> (1000 packs, no byte limit); ``"256MB"``/``"1GB"``/``"512KiB"`` -> bytes."""
    number, unit = _number_and_unit(text, "--shard-size", "a number of packs (e.g. 1000) or a "
                                                          "size such as 256MB or 1GB")
    if not unit:
        if "." in number:
            raise PacktrainError(f"--shard-size {text!r}: a pack count must be a whole number")
        return int(number), None
    return None, _bytes(number, unit)


def parse_record_bytes(text: str | int) -> int:
    """``--max-record-bytes``: ``"64MB"``/``"1GiB"``/``"500000"`` (bytes) -> bytes."""
    number, unit = _number_and_unit(text, "--max-record-bytes", "a size such as 64MB or 1GB, "
                                                               "or a number of bytes")
    if not unit and "." in number:
        raise PacktrainError(f"--max-record-bytes {text!r}: a number of bytes must be a whole "
                             f"number")
    return _bytes(number, unit or "B")


def default_workers() -> int:
    """All usable cores (those this process may run on)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
