"""``pack-merge``: join the partitions of one partitioned pack-build into one packed dataset.

``pack-build --num-partitions N --partition I`` packs partition I of the inputs (blocks of
:data:`pack.tasks.PARTITION_BLOCK` records, block b to partition b mod N; ``sample_index`` keeps
the global record number). :func:`merge` takes the N output directories, in any order, and:

1. checks that they are the N partitions of one build: each has a ``partition`` record with
   the same N, block size and rule, each index 0..N-1 is there exactly once, and the format
   version, max_length, tokenizer fingerprint, template, sources (path, sha256, records, bytes),
   packing, packtrain and tokenizers versions and arguments (all but those in
   :data:`IGNORED_ARGUMENTS`) are equal; otherwise a one-line error names the part and field;
2. checks that every shard of every part exists with the byte size its manifest gives (the
   sha256 is taken from the part's manifest, not recomputed: ``pack-verify`` does that);
3. puts the shards into OUT as ``shard-00000.arrow``... in partition order (packs keep their
   order inside each part), each as a hard link to the part's file when OUT is on the same
   filesystem (no bytes copied; a part rebuilt later with --overwrite unlinks its files first,
   so the merged dataset keeps the old ones), otherwise (or with ``copy=True``) as a copy
   written under a temporary name and renamed when complete;
4. combines the statistics (counts, token sums and histograms summed; the lower bound
   ``ceil(tokens / max_length)`` and the fill recomputed over the whole dataset; build times
   kept per part) and the sanity checks (:func:`pack.sanity.merge_checks`), and writes the
   dataset card, then, last and atomically, ``manifest.json``.

On any error the files written so far are removed and no manifest is left behind.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from . import format as fmt_mod
from .files import file_sha256, fsync_dir
from .errors import PacktrainError
from .format import MANIFEST
from .outdir import (EVAL_DIR, check_out_dir, cleanup, prepare_out_dir, publish,
                     remove_eval_dir, unlock_out_dirs)
from .sanity import merge_checks

# Arguments that may differ between the partitions of one build: where the output went, which
# partition it was, and options that do not change a byte of the output.
IGNORED_ARGUMENTS = ("out", "partition", "workers", "quiet", "overwrite", "dry_run",
                     "max_no_label_share", "allow_indistinct_turns")
# Statistics that are recomputed or kept per part instead of summed.
_RECOMPUTED = ("lower_bound", "fill", "seconds", "tokens_per_s")
_LINK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP,
                getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)}


def _read_parts(parts: Sequence[str]) -> list[tuple[Path, dict]]:
    out = []
    for part in parts:
        if "://" in str(part):
            raise PacktrainError(f"{part}: pack-merge joins local directories; copy the parts "
                                 f"to local disk (or a mounted filesystem) first")
        p = Path(part)
        m = fmt_mod.read_manifest(p)
        if not isinstance(m.get("partition"), dict):
            raise PacktrainError(f"{p}/{MANIFEST}: no field partition: this is not a partition "
                                 f"build; build the parts with --num-partitions N --partition I")
        out.append((p, m))
    return out


def _order(parts: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """The parts sorted by partition index, after checking that each of 0..N-1 is there once."""
    p0, m0 = parts[0]
    n = int(m0["partition"]["count"])
    by_index: dict[int, Path] = {}
    for p, m in parts:
        part = m["partition"]
        for key in ("count", "block_records", "rule"):
            if part.get(key) != m0["partition"].get(key):
                raise PacktrainError(f"{p}/{MANIFEST}: field partition.{key} is "
                                     f"{part.get(key)!r} but {p0} has "
                                     f"{m0['partition'].get(key)!r}; merge only the partitions "
                                     f"of one build")
        i = int(part["index"])
        if i in by_index:
            raise PacktrainError(f"{p} and {by_index[i]} are both partition {i} of {n}; pass "
                                 f"each partition exactly once")
        by_index[i] = p
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        raise PacktrainError(f"partition{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(map(str, missing))} of {n} missing: pass the output "
                             f"directories of all {n} partition builds")
    return sorted(parts, key=lambda pm: int(pm[1]["partition"]["index"]))


def _first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted path of the first place where two JSON values differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}".lstrip(".")
            d = _first_difference(a[k], b[k], f"{where}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{where} (length {len(a)} vs {len(b)})".lstrip(".")
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else where.lstrip(".") or "(value)"


def _same_build_view(m: dict) -> dict:
    """What must be equal between the partitions of one build."""
    args = {k: v for k, v in m["arguments"].items() if k not in IGNORED_ARGUMENTS}
    created = m.get("created_by", {})
    return {
        "format_version": m["format_version"],
        "max_length": m["max_length"],
        "tokenizer.fingerprint": m["tokenizer"]["fingerprint"],
        "template": m["template"],
        "sources": m["sources"],
        "packing": m["packing"],
        "created_by": {k: created.get(k) for k in ("packtrain", "tokenizers")},
        "arguments": args,
    }


def _check_same_build(parts: list[tuple[Path, dict]]) -> None:
    p0, m0 = parts[0]
    ref = _same_build_view(m0)
    for p, m in parts[1:]:
        d = _first_difference(ref, _same_build_view(m))
        if d:
            raise PacktrainError(f"{p}/{MANIFEST}: {d} differs from that of {p0}; these are "
                                 f"not partitions of one build (same inputs and arguments)")


def _check_shards(parts: list[tuple[Path, dict]]) -> None:
    for p, m in parts:
        for s in m["shards"]:
            fmt_mod.check_relative_path(s["path"], str(p / MANIFEST))
            try:
                f = fmt_mod.shard_path(p, s["path"])
            except PacktrainError as e:
                raise PacktrainError(f"{p}: {e}; a merged dataset must not depend on files "
                                     f"outside its parts") from None
            try:
                size = f.stat().st_size
            except OSError as e:
                raise PacktrainError(f"{f}: cannot read ({e.strerror or e}); the partition "
                                     f"is incomplete, rebuild it") from None
            if size != s["bytes"]:
                raise PacktrainError(f"{f}: {size} bytes but its manifest says {s['bytes']}; "
                                     f"the partition was changed or damaged, rebuild it")


def combine_stats(stats: list[dict], max_length: int) -> dict:
    """Sum the parts' statistics: integers, counters (dicts of integers) and histograms
    (``edges``/``counts``, the edges equal); recompute the lower bound and the fill over the
    whole dataset. Timing fields are left out (they are kept per part)."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in stats for k in s):
        if key in _RECOMPUTED:
            continue
        values = [s.get(key) for s in stats]
        present = [v for v in values if v is not None]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
            out[key] = sum(present)
        elif all(isinstance(v, dict) and "edges" in v and "counts" in v for v in present):
            edges = present[0]["edges"]
            if any(v["edges"] != edges for v in present):
                raise PacktrainError(f"stats.{key}: the parts' histogram edges differ; these "
                                     f"are not partitions of one build")
            out[key] = {"edges": edges,
                        "counts": [sum(c) for c in zip(*(v["counts"] for v in present))]}
        elif all(isinstance(v, dict) for v in present):
            out[key] = _sum_counts(present)
        # anything else (a field this version does not know how to add up) is not carried
    tokens, packs = out.get("tokens", 0), out.get("packs", 0)
    out["lower_bound"] = -(-tokens // max_length)
    out["fill"] = round(tokens / (packs * max_length), 6) if packs else 0.0
    return out


def _place(src: Path, dst: Path, copy: bool) -> str:
    """Put ``src`` at ``dst`` (a temporary name, then renamed): ``"linked"`` or ``"copied"``."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    if tmp.exists():
        tmp.unlink()
    how = "copied"
    if not copy:
        try:
            os.link(src, tmp)
            how = "linked"
        except OSError as e:
            if e.errno not in _LINK_ERRNOS:
                raise
    if how == "copied":
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 22)
            fo.flush()
            os.fsync(fo.fileno())
    os.replace(tmp, dst)
    return how


def merge(parts: Sequence[str], out: str, copy: bool = False, overwrite: bool = False) -> dict:
    """Join partition builds ``parts`` into ``out`` (and their eval splits into ``out/eval``);
    return the manifest written."""
    if not parts:
        raise PacktrainError("no parts: pass the output directories of the partition builds, "
                             "then the output directory")
    if "://" in str(out):
        raise PacktrainError(f"{out}: pack-merge writes a local directory (hard links need "
                             f"one filesystem); merge locally, then copy the result")
    try:
        return _merge_checked(parts, out, copy, overwrite)
    finally:
        unlock_out_dirs()


def _sum_counts(dicts: list[dict]) -> dict:
    """Counters summed key by key; nested counters (stats.pairs.dropped) alike."""
    total: dict[str, Any] = {}
    for v in dicts:
        for k, c in v.items():
            if isinstance(c, dict):
                total[k] = _sum_counts([total.get(k, {}), c])
            else:
                total[k] = total.get(k, 0) + c
    return dict(sorted(total.items()))


def _merge_checked(parts: Sequence[str], out: str, copy: bool, overwrite: bool) -> dict:
    """:func:`merge` after its first checks; the output directories stay locked."""
    from .card import dataset_card

    loaded = _order(_read_parts(parts))
    _check_same_build(loaded)
    out_p = Path(out)
    for p, _ in loaded:
        if out_p.resolve() == p.resolve():
            raise PacktrainError(f"{out}: is also one of the parts; choose another output "
                                 f"directory")
    check_out_dir(out_p, overwrite)
    _check_shards(loaded)

    m0 = loaded[0][1]
    max_length = int(m0["max_length"])
    created = not out_p.exists()
    prepare_out_dir(out_p, overwrite)
    try:
        shards: list[dict] = []
        how: dict[str, int] = {"linked": 0, "copied": 0}
        part_info = []
        for p, m in loaded:
            first = len(shards)
            for s in m["shards"]:
                name = fmt_mod.shard_name(len(shards))
                how[_place(p / s["path"], out_p / name, copy)] += 1
                if (out_p / name).stat().st_size != s["bytes"]:
                    raise PacktrainError(f"{out_p / name}: size differs from {p / s['path']} "
                                         f"after copying; check the disk and retry")
                shards.append({**s, "path": name})
            st = m["stats"]
            part_info.append({"index": int(m["partition"]["index"]), "path": str(p),
                              "shards": [first, len(shards)], "packs": st["packs"],
                              "samples_packed": st["samples_packed"],
                              "seconds": st.get("seconds")})
        fsync_dir(out_p)
        files = ("hard-linked" if not how["copied"] else "copied" if not how["linked"]
                 else f"hard-linked {how['linked']}, copied {how['copied']}")
        manifest = {k: v for k, v in m0.items() if k != "partition"}
        manifest["arguments"] = {**m0["arguments"], "out": str(out), "partition": None}
        manifest["stats"] = combine_stats([m["stats"] for _, m in loaded], max_length)
        manifest.pop("checks", None)
        checks = merge_checks([m.get("checks") for _, m in loaded], manifest["stats"])
        if checks is not None:
            manifest["checks"] = checks
        manifest["shards"] = shards
        manifest["merged"] = {"partitions": len(loaded),
                              "block_records": m0["partition"]["block_records"],
                              "rule": m0["partition"]["rule"], "shard_files": files,
                              "packtrain": __version__, "parts": part_info}
        manifest.pop("eval", None)  # part 0's; replaced by the merged eval split's
        manifest.pop("reference_logps", None)  # the parts' sidecars are not merged: recompute
        manifest.update(_merge_eval(loaded, out_p, copy))
        fmt_mod.validate_manifest(manifest)
        publish(out_p, manifest, dataset_card(manifest))
    except BaseException:
        remove_eval_dir(out_p)
        cleanup(out_p, None, remove_shards=True, remove_dir=created)
        raise
    return manifest


def _merge_eval(loaded: list[tuple[Path, dict]], out: Path, copy: bool) -> dict:
    """The parts' eval splits (pack-build --eval-fraction) merged into ``out/eval`` like the
    parts themselves; the merged parent's ``eval`` field (nothing without eval splits)."""
    from .eval_split import parent_entry

    entries = [m.get("eval") for _, m in loaded]
    if not any(entries):  # equal arguments: all parts have one or none has
        return {}
    for (p, _), e in zip(loaded, entries):
        where = p / e["path"] / MANIFEST
        try:
            same = file_sha256(where) == e["manifest_sha256"]
        except OSError as err:
            raise PacktrainError(f"{where}: cannot read the eval split of {p} "
                                 f"({err.strerror or err}); rebuild that partition") from None
        if not same:
            raise PacktrainError(f"{where}: not the eval split {p} was built with (sha256 "
                                 f"differs); rebuild that partition")
    ev = _merge_checked([str(p / e["path"]) for (p, _), e in zip(loaded, entries)],
                        str(out / EVAL_DIR), copy, overwrite=True)
    sha = file_sha256(out / EVAL_DIR / MANIFEST)
    return {"eval": parent_entry(ev, sha, ev["eval_of"]["split"])}

