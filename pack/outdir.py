"""The output directory of pack-build and pack-merge: refuse one that holds something else,
lock it while a build writes, clear what an earlier or interrupted build left, and after a
failure remove exactly the files this build wrote.

Only files a build wrote are ever deleted: those a previous manifest lists (with
--overwrite), or, where a build was killed, the files named like a build's beside the marker
``.packtrain-building`` that every build writes before anything else and removes after its
manifest. Anything else in the directory stays, a user's README.md or stray shard file too. A
directory without ``manifest.json`` is not a dataset, so the manifest is always the first file
removed and the last one written.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

from .errors import PacktrainError
from .files import fsync_dir, write_atomic
from .format import MANIFEST

CARD = "README.md"
TMP_SAMPLES = ".packtrain-samples.tmp.arrow"
BUILDING = ".packtrain-building"  # written first and removed last by every build and merge
EVAL_DIR = "eval"  # a build's held-out split: a dataset of its own inside OUT (pack.eval_split)

_OUT_LOCKS: dict[str, int] = {}  # resolved directory -> file descriptor holding its flock


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty directory without --overwrite (before any slow work)."""
    if out.exists() and not out.is_dir():
        raise PacktrainError(f"{out}: exists and is not a directory; choose another output "
                             f"directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not interrupted_build(out):
        raise PacktrainError(f"{out}: output directory is not empty; pass --overwrite to "
                             f"replace the dataset in it, or choose another directory")


def interrupted_build(out: Path) -> bool:
    """Whether ``out`` holds only what a killed pack-build leaves: its marker, no manifest, and
    nothing but plain files a build writes. Such leftovers are removed without --overwrite."""
    try:
        entries = list(out.iterdir())
    except OSError:
        return False
    names = [p.name for p in entries]
    return (BUILDING in names and MANIFEST not in names
            and all(_plain_ours(p) or (p.name == EVAL_DIR and _eval_dir_ours(p))
                    for p in entries))


def _plain_ours(p: Path) -> bool:
    return is_ours(p.name) and p.is_file() and not p.is_symlink()


def _eval_dir_ours(p: Path) -> bool:
    """OUT/eval holding nothing but what a build writes (its manifest too: the eval dataset is
    published before its parent's)."""
    return (p.is_dir() and not p.is_symlink()
            and all(_plain_ours(q) for q in p.iterdir()))


def lock_out_dir(out: Path) -> None:
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


def unlock_out_dirs() -> None:
    """Let go of every output directory this process holds (also run in each forked worker,
    so that only the parent's life decides when a directory is free again)."""
    while _OUT_LOCKS:
        os.close(_OUT_LOCKS.popitem()[1])


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create and lock ``out`` and remove the files of the dataset it held (with
    ``overwrite``) or of an interrupted build."""
    check_out_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    lock_out_dir(out)
    if any(out.iterdir()):
        if not overwrite:  # check_out_dir let it through: leftovers of a killed build
            print(f"note: {out}: removing the leftovers of an interrupted pack-build (no "
                  f"{MANIFEST}) and building again", file=sys.stderr, flush=True)
        for p in _written_by_a_build(out):
            p.unlink(missing_ok=True)
            if p.name == MANIFEST:  # first: an interrupted rebuild must never look complete
                fsync_dir(out)
    remove_eval_dir(out)
    (out / BUILDING).write_text(f"{os.getpid()}\n")
    fsync_dir(out)


def _written_by_a_build(out: Path) -> list[Path]:
    """What an earlier build or merge provably wrote, manifest first: the files its manifest
    lists (and the card), or, after a killed build (its marker is there), every file named like
    a build's."""
    if (out / BUILDING).is_file():
        found = sorted((p for p in out.iterdir() if is_ours(p.name)),
                       key=lambda p: p.name != MANIFEST)
        return found
    try:
        from .format import read_manifest

        manifest = read_manifest(out)
    except PacktrainError:  # no readable manifest: nothing here is provably a build's
        return []
    listed = [s["path"] for s in manifest["shards"]]
    # reference log-probs of the old dataset (pack.reference) belong to it
    listed += [s["path"] for e in manifest.get("reference_logps") or () for s in e["shards"]]
    return [out / MANIFEST, out / CARD, *(out / name for name in listed)]


def remove_eval_dir(out: Path) -> None:
    """Remove the eval dataset a build wrote into ``out`` (manifest first), and the directory
    when that leaves it empty: a rebuild, with or without an eval split, never keeps an old one
    beside a new parent."""
    ev = out / EVAL_DIR
    if not ev.is_dir() or ev.is_symlink():
        return
    for p in _written_by_a_build(ev):
        p.unlink(missing_ok=True)
        if p.name == MANIFEST:
            fsync_dir(ev)
    (ev / BUILDING).unlink(missing_ok=True)
    try:
        ev.rmdir()
    except OSError:  # something else is in it: it stays
        pass


def publish(out: Path, manifest: dict, card: str) -> None:
    """The last step of a build or merge: the card, then the manifest (the dataset is complete
    from here on), then the marker goes."""
    from .format import write_manifest

    write_atomic(out / CARD, card.encode())
    write_manifest(out, manifest)
    (out / BUILDING).unlink(missing_ok=True)
    fsync_dir(out)


def is_ours(name: str) -> bool:
    """Files a build writes (and --overwrite removes); anything else in the directory stays."""
    return (name in (MANIFEST, CARD, TMP_SAMPLES, BUILDING)
            or re.fullmatch(r"shard-\d{5,}\.arrow", name) is not None
            or re.fullmatch(r"\.shard-\d{5,}\.arrow\.tmp", name) is not None
            or name.startswith((f".{MANIFEST}.tmp-", f".{CARD}.tmp-")))


def cleanup(out: Path, shard_writer: Any = None, remove_shards: bool = True,
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
        if is_ours(name) and (temp or remove_shards):
            try:
                p.unlink()
            except OSError:
                pass
    if remove_dir:
        try:
            out.rmdir()
        except OSError:
            pass


def disk_full(e: OSError) -> str | None:
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
