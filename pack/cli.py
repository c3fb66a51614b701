"""Command lines: ``pack-build``, ``pack-info``, ``pack-verify``, ``pack-merge``.

Every command prints ``error: <one line>`` on stderr and exits 2 for a user error
(:class:`pack.errors.PacktrainError`), exits 130 on Ctrl-C after cleaning up, and never shows a
traceback for either. ``python -m pack.cli {build,info,verify,merge} ...`` runs the same commands.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

from . import __version__
from .cli_config import add_config_arg, dump_config, expand_config, manifest_config
from .errors import PacktrainError

EXIT_PROBLEMS = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _run(fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None) -> int:
    try:
        return fn(argv)
    except PacktrainError as e:
        msg = " ".join(str(e).split("\n"))
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted; nothing was left half-written", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `pack-info out | head`
        return 0
    except OSError as e:  # disk full, permission denied, ...: the machine's problem, not a bug
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


# ---------------------------------------------------------------- pack-build

def build_parser() -> argparse.ArgumentParser:
    from .binpack import STRATEGIES
    from .config import FORMATS, MAX_RECORD_BYTES_DEFAULT, OVERLONG, TEMPLATES
    from .sanity import add_arguments as add_check_arguments

    p = argparse.ArgumentParser(
        prog="pack-build",
        description="Pre-pack a fine-tuning corpus into verifiable Arrow shards: read records, "
                    "apply the template, tokenize, mask labels, bin-pack whole samples over the "
                    "whole dataset, write shard-*.arrow and manifest.json to OUT.",
        epilog="Example: pack-build --tokenizer path/to/tokenizer --max-length 4096 "
               "data/*.jsonl out/")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="input files (.jsonl, .json, .parquet, .jsonl.gz/.zst) or globs "
                        "(quoted, so that the shell does not expand them); a Hugging Face "
                        "save_to_disk directory; a hub dataset hf://datasets/OWNER/NAME")
    p.add_argument("out", metavar="OUT", help="output directory, or a URL such as "
                                              "s3://bucket/prefix/ (must be empty unless "
                                              "--overwrite)")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="Hugging Face tokenizer directory or tokenizer.json "
                        "(default: $PACKTRAIN_TOKENIZER)")
    p.add_argument("--max-length", type=_positive_int, default=4096, metavar="N",
                   help="tokens per pack (default: 4096)")
    p.add_argument("--format", choices=FORMATS, default="auto",
                   help="record format (default: auto-detected per file)")
    p.add_argument("--template", choices=TEMPLATES, default="auto",
                   help="prompt template (default: alpaca for alpaca records, the tokenizer's "
                        "chat template for messages, none for text; for preference "
                        "pairs the chat template, or none when the tokenizer has none)")
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template to use instead of the tokenizer's")
    p.add_argument("--train-on-prompt", action="store_true",
                   help="take loss on prompt tokens too (default: responses only)")
    p.add_argument("--overlong", choices=OVERLONG, default="truncate",
                   help="samples longer than --max-length: keep the first N tokens or drop them "
                        "(counted either way; default: truncate); a preference pair is cut "
                        "on both completions, never split")
    p.add_argument("--strategy", choices=STRATEGIES, default="bfd",
                   help="bin-packing strategy (default: bfd, best-fit decreasing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the pack order (default: 0)")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="tokenizer processes (default: all usable cores; 1 = in-process)")
    p.add_argument("--shard-size", default="256MB", metavar="SIZE",
                   help="packs per shard (e.g. 1000) or bytes (e.g. 256MB, 1GB; default: 256MB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset in a non-empty OUT")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip invalid records (bad JSON, missing fields) and count them instead "
                        "of stopping at the first")
    p.add_argument("--max-record-bytes", default=MAX_RECORD_BYTES_DEFAULT, metavar="SIZE",
                   help="longest JSON Lines record (line) to read, e.g. 64MB or 1GB; a longer "
                        "one is an error, or skipped and counted with --skip-invalid (default: "
                        f"{MAX_RECORD_BYTES_DEFAULT})")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--dry-run", action="store_true",
                   help="check the inputs, tokenizer and arguments, count the records and "
                        "estimate the tokens from a sample; write nothing")
    p.add_argument("--split", metavar="NAME",
                   help="split of a Hugging Face DatasetDict input (default: train)")
    p.add_argument("--num-partitions", type=_positive_int, default=1, metavar="N",
                   help="pack one of N partitions of the inputs (with --partition); join them "
                        "with pack-merge")
    p.add_argument("--partition", type=int, default=None, metavar="I",
                   help="which partition to pack, 0 to N-1: blocks of 128 records, block b "
                        "goes to partition b mod N")
    p.add_argument("--eval-fraction", type=float, default=None, metavar="F",
                   help="hold out this share (0 < F < 1) of the records, chosen by a seeded "
                        "hash of each record's content, packed into OUT/eval/")
    p.add_argument("--eval-records", type=int, default=None, metavar="N",
                   help="hold out exactly N records (those with the smallest hashes) instead")
    p.add_argument("--eval-seed", type=int, default=0, metavar="S",
                   help="key of the eval split's hash (default: 0; independent of --seed)")
    add_check_arguments(p)
    p.add_argument("--version", action="version", version=f"packtrain {__version__}")
    add_config_arg(p)
    return p


def _build(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    ns = parser.parse_args(expand_config(build_parser, sys.argv[1:] if argv is None else argv))
    from .build import BuildConfig, build

    result = build(BuildConfig.from_args(ns))
    if ns.dry_run:
        from .dry_run import plan_text

        print(plan_text(result), flush=True)
    return 0


def build_main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the pack-build command itself, not a call from Python
        _faster_allocator()
    return _run(_build, argv)


def _faster_allocator() -> None:
    """Re-execute on jemalloc/mimalloc where installed (pack/allocator.py): the tokenizer's
    malloc traffic is about half its time on glibc's allocator."""
    from .tokenize.allocator import reexec

    try:
        reexec()
    except PacktrainError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


# ---------------------------------------------------------------- pack-info

def info_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pack-info",
                                description="Summarise a packed dataset from its manifest.")
    p.add_argument("out", metavar="OUT", help="packed dataset directory or URL (s3://, gs://, ...)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw histograms of sample lengths and pack fill (needs matplotlib)")
    p.add_argument("--config", action="store_true",
                   help="print the recorded pack-build arguments as a YAML config for "
                        "pack-build --config")
    return p


def _info(argv: Sequence[str] | None) -> int:
    ns = info_parser().parse_args(argv)
    if ns.plot:
        check_plot_path(ns.plot)
    from .card import info_text
    from .remote import read_manifest  # a directory or a URL

    manifest = read_manifest(ns.out)
    if ns.config:
        print(dump_config(manifest_config(manifest), header="pack-build arguments the manifest records"),
              end="")
        return 0
    if ns.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(info_text(manifest))
    if ns.plot:
        plot(manifest, ns.plot)
        if not ns.json:
            print(f"plot             {ns.plot}")
    return 0


PLOT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def check_plot_path(path: str) -> None:
    # matplotlib would add .png to a name without a suffix (so the file written is not the one
    # reported) and fails with a traceback on one it does not know
    if Path(path).is_dir() or Path(path).suffix.lower() not in PLOT_SUFFIXES:
        raise PacktrainError(f"--plot {path}: name an image file ending in "
                             f"{', '.join(PLOT_SUFFIXES)}")


def plot(manifest: dict, path: str) -> None:
    """Two bar charts: sample lengths (tokens) and pack fill."""
    check_plot_path(path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PacktrainError("--plot needs matplotlib; pip install matplotlib "
                             "(or packtrain[plot])") from None
    s = manifest["stats"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    h = s.get("length_histogram") or {"edges": [0, 1], "counts": [0]}
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(h["edges"][:-1], h["edges"][1:])]
    a.bar(range(len(h["counts"])), h["counts"], color="tab:blue")
    a.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    a.set_title(f"pair lengths ({s['pairs']['packed']:,} pairs)" if "pairs" in s
                else f"sample lengths ({s['samples_packed']:,} samples)")
    a.set_xlabel("tokens")
    a.set_ylabel("samples")
    f = s.get("fill_histogram")
    if f:
        flabels = [f"{100 * lo:.0f}-{100 * hi:.0f}%" for lo, hi in zip(f["edges"][:-1],
                                                                       f["edges"][1:])]
        b.bar(range(len(f["counts"])), f["counts"], color="tab:green")
        b.set_xticks(range(len(flabels)), flabels, rotation=45, ha="right", fontsize=8)
    b.set_title(f"pack fill ({s['packs']:,} packs, mean {100 * s['fill']:.2f}% of "
                f"{manifest['max_length']:,})")
    b.set_xlabel("tokens / max_length")
    b.set_ylabel("packs")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise PacktrainError(f"{path}: cannot write the plot ({e.strerror or e})") from None
    finally:
        plt.close(fig)


def info_main(argv: Sequence[str] | None = None) -> int:
    return _run(_info, argv)


# ---------------------------------------------------------------- pack-verify

def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pack-verify",
        description="Check a packed dataset: manifest schema, every shard's size, schema, row "
                    "count and sha256, and every pack's invariants. Exit 0 when valid, 1 when "
                    "a problem is found (each printed with shard, row and rule).")
    p.add_argument("out", metavar="OUT", help="packed dataset directory or URL (s3://, gs://, ...)")
    p.add_argument("--no-checksums", action="store_true", help="skip the sha256 of every shard")
    p.add_argument("--cache-dir", metavar="DIR", help="for a URL: where fetched shards are "
                   "cached (default: $PACKTRAIN_CACHE or ~/.cache/packtrain)")
    p.add_argument("--quiet", action="store_true", help="no progress bar; print only problems")
    return p


def _verify(argv: Sequence[str] | None) -> int:
    ns = verify_parser().parse_args(argv)
    from .remote import read_manifest, verify  # a directory or a URL

    problems = verify(ns.out, cache_dir=ns.cache_dir, checksums=not ns.no_checksums,
                      progress=not ns.quiet)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        print(f"{ns.out}: {len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_PROBLEMS
    if not ns.quiet:
        m = read_manifest(ns.out)
        what = "verified" if not ns.no_checksums else "verified (checksums skipped)"
        ev = m.get("eval")
        also = f"; eval split {ev['path']}/: {ev['packs']} packs, {ev['tokens']} tokens" if ev else ""
        refs = m.get("reference_logps") or []
        also += f"; reference log-probs of {len(refs)} model(s)" if refs else ""
        print(f"OK: {len(m['shards'])} shards, {m['stats']['packs']} packs, "
              f"{m['stats']['tokens']} tokens {what}{also}")
    return 0


def verify_main(argv: Sequence[str] | None = None) -> int:
    return _run(_verify, argv)


# ---------------------------------------------------------------- pack-merge

def merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pack-merge",
        description="Join the partitions of one pack-build (--num-partitions N --partition I) "
                    "into one dataset with one manifest. Shards are hard-linked when OUT is on "
                    "the same filesystem as the parts (no bytes copied), else copied.",
        epilog="Example: pack-merge part-0/ part-1/ part-2/ part-3/ merged/")
    p.add_argument("parts", nargs="+", metavar="PART",
                   help="the output directories of the N partition builds, any order")
    p.add_argument("out", metavar="OUT", help="output directory (created; must be empty unless "
                                              "--overwrite)")
    p.add_argument("--copy", action="store_true",
                   help="copy the shards even where they could be hard-linked")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the dataset in a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no summary")
    return p


def _merge(argv: Sequence[str] | None) -> int:
    ns = merge_parser().parse_args(argv)
    from .merge import merge
    from .stats import summary

    manifest = merge(ns.parts, ns.out, copy=ns.copy, overwrite=ns.overwrite)
    if not ns.quiet:
        m = manifest["merged"]
        print(summary(manifest), file=sys.stderr)
        print(f"merged           {m['partitions']} partitions; shards {m['shard_files']}",
              file=sys.stderr, flush=True)
    return 0


def merge_main(argv: Sequence[str] | None = None) -> int:
    return _run(_merge, argv)


# ---------------------------------------------------------------- dispatch

COMMANDS = {"build": build_main, "info": info_main, "verify": verify_main, "merge": merge_main}


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m pack.cli {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return EXIT_USER_ERROR
    if from_command_line and argv[0] == "build":
        _faster_allocator()
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    if hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
