"""Hugging Face datasets as pack-build inputs: a ``save_to_disk`` directory, or a hub name.

A directory written by ``datasets.Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``) or
``datasets.DatasetDict.save_to_disk`` (``dataset_dict.json`` + one such directory per split; the
split is chosen with ``--split``, default ``train``) is an input like a file: its rows are the
records, read here straight from its Arrow *stream* files with pyarrow (no ``datasets`` import),
one batch at a time, and flow through the same format detection and templates as JSON Lines.

Its manifest source entry records the split, the data files with their sha256 and size, and as
``sha256`` the sha256 of the ``sha256sum``-style listing of those files (``"<sha256>  <name>\\n"``
per file, in order), so ``sha256sum data-*.arrow | sha256sum`` in the split's directory gives the
same value.

A hub dataset is named ``hf://datasets/OWNER/NAME`` (optionally ``@REVISION``). It is loaded with
``datasets.load_dataset`` (never with ``trust_remote_code``), saved once under
``$PACKTRAIN_CACHE`` (default ``~/.cache/packtrain``) ``/hub/`` keyed by its fingerprint, and then
read as a directory. With ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, or without a
reachable hub, it is a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import PacktrainError
from .files import file_sha256
from .progress import ReadPosition

HUB_PREFIX = "hf://datasets/"
BATCH_ROWS = 1024
DEFAULT_SPLIT = "train"


# ---------------------------------------------------------------- local directories

def is_hf_dataset_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by ``Dataset``/``DatasetDict.save_to_disk``."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PacktrainError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e}); "
                             f"re-create the dataset with save_to_disk") from None


def split_dir(path: str | os.PathLike, split: str | None) -> Path:
    """The directory holding the chosen split's ``state.json``: ``path`` itself for a Dataset,
    ``path/SPLIT`` for a DatasetDict (``--split``, default ``train``)."""
    p = Path(path)
    dd = p / "dataset_dict.json"
    if not dd.is_file():
        return p
    meta = _read_json(dd)
    splits = meta.get("splits") if isinstance(meta, dict) else None
    if not isinstance(splits, list):
        raise PacktrainError(f"{dd}: field splits missing; re-create the dataset with "
                             f"DatasetDict.save_to_disk")
    name = split or DEFAULT_SPLIT
    if name not in splits:
        raise PacktrainError(f"{p}: this DatasetDict has no split {name!r} (splits: "
                             f"{', '.join(map(str, splits))}); pass --split NAME")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise PacktrainError(f"{dd}: split name {name!r} is not a directory name")
    return p / name


def data_files(path: str | os.PathLike, split: str | None) -> list[Path]:
    """The split's Arrow files in row order, from its ``state.json``."""
    d = split_dir(path, split)
    state_path = d / "state.json"
    if not state_path.is_file():
        raise PacktrainError(f"{state_path}: missing; {d} is not a save_to_disk dataset "
                             f"directory")
    state = _read_json(state_path)
    entries = state.get("_data_files") if isinstance(state, dict) else None
    if not isinstance(entries, list) or not entries:
        raise PacktrainError(f"{state_path}: field _data_files missing or empty; re-create the "
                             f"dataset with save_to_disk")
    if state.get("_indices_data_files"):
        # save_to_disk flattens indices; a mapping here means a hand-made directory.
        raise PacktrainError(f"{state_path}: has an indices mapping; save the dataset with "
                             f"ds.flatten_indices().save_to_disk(...)")
    files = []
    for e in entries:
        name = e.get("filename") if isinstance(e, dict) else None
        if not isinstance(name, str) or not name or Path(name).is_absolute() \
                or ".." in Path(name).parts:
            raise PacktrainError(f"{state_path}: data file {name!r} is not a file name inside "
                                 f"the dataset directory")
        f = d / name
        if not f.is_file():
            raise PacktrainError(f"{f}: missing (listed in {state_path}); the dataset directory "
                                 f"is incomplete")
        files.append(f)
    return files


def source_info(path: str | os.PathLike, split: str | None) -> dict[str, Any]:
    """The manifest ``sources`` entry of a save_to_disk directory (``records`` is filled in by
    the reader as it goes)."""
    p = Path(path)
    d = split_dir(p, split)
    files = data_files(p, split)
    listed = []
    listing = []
    for f in files:
        try:
            sha, size = file_sha256(f), f.stat().st_size
        except OSError as e:
            raise PacktrainError(f"{f}: cannot read ({e.strerror or e})") from None
        rel = f.relative_to(p).as_posix()
        listed.append({"path": rel, "sha256": sha, "bytes": size})
        listing.append(f"{sha}  {f.name}\n")
    state = _read_json(d / "state.json")
    return {"path": str(p), "sha256": hashlib.sha256("".join(listing).encode()).hexdigest(),
            "records": 0, "bytes": sum(x["bytes"] for x in listed),
            "kind": "hf-dataset", "split": (d.name if d != p else None),
            "fingerprint": state.get("_fingerprint") if isinstance(state, dict) else None,
            "files": listed}


def iter_hf_records(path: str | os.PathLike, split: str | None,
                    position: ReadPosition | None = None) -> Iterator[tuple[str, dict]]:
    """``("DIR:record N", record)`` for every row of the split (1-based), streaming one batch of
    at most :data:`BATCH_ROWS` rows at a time from the memory-mapped Arrow files. ``position``
    follows the bytes read: the earlier files' sizes plus the offset in the current one."""
    import pyarrow as pa

    p = Path(path)
    n = before = 0
    for f in data_files(p, split):
        try:
            mapped = pa.memory_map(str(f))
            if position is not None:
                position.tell = lambda start=before, m=mapped: start + m.tell()
            before += mapped.size()
            reader = pa.ipc.open_stream(mapped)
            for batch in reader:
                for start in range(0, batch.num_rows, BATCH_ROWS):
                    for record in batch.slice(start, BATCH_ROWS).to_pylist():
                        n += 1
                        yield f"{p}:record {n}", record
        except (pa.ArrowException, OSError) as e:
            raise PacktrainError(f"{f}: not a readable Arrow stream after record {n} ({e}); "
                                 f"re-create the dataset with save_to_disk") from None
    if n == 0:
        raise PacktrainError(f"{p}: no records (the dataset has no rows); remove it from the "
                             f"inputs")


# ---------------------------------------------------------------- the hub

def is_hub_name(text: str) -> bool:
    return str(text).startswith(HUB_PREFIX)


def _parse_hub(text: str) -> tuple[str, str | None]:
    m = re.fullmatch(r"([A-Za-z0-9][\w.-]*/[\w.-]+|[\w.-]+)(?:@([\w./-]+))?",
                     text[len(HUB_PREFIX):].rstrip("/"))
    if not m:
        raise PacktrainError(f"{text}: not a hub dataset name; expected "
                             f"{HUB_PREFIX}OWNER/NAME or {HUB_PREFIX}OWNER/NAME@REVISION")
    return m.group(1), m.group(2)


def _offline() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return var
    return None


def resolve_hub(text: str, split: str | None) -> Path:
    """Load hub dataset ``text`` (one split) and return a save_to_disk directory of it under
    :func:`pack.remote.cache_root`; reused when the same fingerprint is already there."""
    name, revision = _parse_hub(text)
    var = _offline()
    if var:
        raise PacktrainError(f"{text}: the Hugging Face hub is off ({var} is set); on a machine "
                             f"that reaches the hub run datasets.load_dataset({name!r})"
                             f".save_to_disk(DIR) and pass DIR instead")
    try:
        import datasets
    except ImportError:
        raise PacktrainError(f"{text}: reading hub datasets needs the datasets package; pip "
                             f"install datasets (or packtrain[data])") from None
    want = split or DEFAULT_SPLIT
    try:
        # One quick request first: without a network load_dataset retries for ~25 s and
        # logs every retry.
        from huggingface_hub import HfApi

        HfApi().dataset_info(name, revision=revision, timeout=15)
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise PacktrainError(f"{text}: the Hugging Face hub cannot be reached or has no such "
                             f"dataset ({msg[:300]}); check the name and the network, or "
                             f"save_to_disk it elsewhere and pass the directory") from None
    try:
        ds = datasets.load_dataset(name, split=want, revision=revision)
    except Exception as e:  # network, auth, missing split: all one line for the user
        msg = " ".join(str(e).split()) or type(e).__name__
        raise PacktrainError(f"{text}: cannot load split {want!r} from the hub ({msg[:300]}); "
                             f"check the name, --split and the network, or save_to_disk it "
                             f"elsewhere and pass the directory") from None
    safe = re.sub(r"[^\w.-]", "_", f"{name}@{revision or 'default'}")
    from .remote import cache_root

    target = cache_root() / "hub" / safe / f"{want}-{ds._fingerprint}"
    if not is_hf_dataset_dir(target):
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ds.save_to_disk(str(tmp))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)  # a half-saved copy never has the final name
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not is_hf_dataset_dir(target):  # another process may have won the race
                raise PacktrainError(f"{target}: cannot save the hub dataset "
                                     f"({e.strerror or e}); set PACKTRAIN_CACHE to a writable "
                                     f"directory") from None
    return target


def resolve_hub_inputs(inputs: list[str], split: str | None) -> tuple[list[str], dict[str, str]]:
    """Replace hub names by their cached directories; return the new list and a map
    ``directory -> hub name`` for the manifest."""
    out: list[str] = []
    hub: dict[str, str] = {}
    for text in inputs:
        if is_hub_name(str(text)):
            local = str(resolve_hub(str(text), split))
            hub[local] = str(text)
            out.append(local)
        else:
            out.append(str(text))
    return out, hub
