"""Reference-model log-probs stored beside a preference dataset (format 2.1), no torch here.

A sidecar per reference model: ``DATASET/reference/<fingerprint[:16]>/shard-NNNNN.arrow``, one
file per data shard with the same rows (packs) in the same order and one column ``ref_logps``
list<float64>, one value per segment: the sum over that segment's label positions t of
``log p(input_ids[t] | the segment's tokens before t)`` under the reference model. The manifest's
top-level ``reference_logps`` lists one entry per model::

    {"model": "as the user named it", "fingerprint": "<sha256 hex>", "dtype": "bfloat16",
     "dir": "reference/<fingerprint[:16]>",
     "shards": [{"path": "reference/<fp16>/shard-00000.arrow", "packs", "bytes", "sha256"}]}

(shard paths relative to the dataset directory, like the data shards'). The computing side
(``pack-ref``, torch) uses :class:`ReferenceWriter`: each sidecar file is written under a
temporary name and renamed, and records in its Arrow metadata the sha256 of the data shard it
belongs to and the model's fingerprint, so a rerun skips the files an interrupted run finished
(:meth:`ReferenceWriter.done`) and never reuses one of another dataset or model. The manifest
entry is added last (:meth:`ReferenceWriter.commit`), by atomically rewriting manifest.json.
:class:`ReferenceReader` reads them aligned with :class:`pack.format.PackedDataset`. The
sidecar's layout and its checks (:func:`pack.format.reference_problems`, pack-verify's part) are
part of the contract, in :mod:`pack.format`; this module re-exports them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from . import format as fmt
from .errors import FormatError
from .files import file_sha256, fsync_dir, write_atomic
from .format import (REF_COLUMN, REFERENCE_DIR, SIDECAR_SCHEMA, open_sidecar,  # noqa: F401
                     reference_dir, reference_problems)

_META_DATA_SHA = b"data_sha256"
_META_FINGERPRINT = b"fingerprint"
_META_DTYPE = b"dtype"  # a rerun in another dtype recomputes: one sidecar, one precision


# ---------------------------------------------------------------- the model

def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 over ``config.json`` and the weight files (``*.safetensors``, else ``*.bin``) of a
    local model directory, in sorted name order: for each file its name, a NUL byte, its size
    (8 bytes little-endian) and its contents."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FormatError(f"{d}: not a directory; pass a local model directory (config.json "
                          f"and *.safetensors or *.bin weights)", rule="reference-model")
    weights = sorted(d.glob("*.safetensors")) or sorted(d.glob("*.bin"))
    if not weights:
        raise FormatError(f"{d}: no weight files (*.safetensors or *.bin); pass a local model "
                          f"directory with its weights", rule="reference-model")
    config = d / "config.json"
    if not config.is_file():
        raise FormatError(f"{d}: no config.json; pass a local model directory",
                          rule="reference-model")
    h = hashlib.sha256()
    for p in sorted([config, *weights], key=lambda p: p.name):
        h.update(p.name.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def find_reference(manifest: dict, fingerprint: str) -> dict | None:
    """The manifest's ``reference_logps`` entry for this model fingerprint, or None."""
    for entry in manifest.get("reference_logps") or ():
        if entry.get("fingerprint") == fingerprint:
            return entry
    return None


# ---------------------------------------------------------------- writing

class ReferenceWriter:
    """Writes one reference model's sidecar shard by shard (resumable), then its manifest
    entry. ``rows`` of shard i are one float64 array per pack, one value per segment."""

    def __init__(self, data_dir: str | os.PathLike, model: str, fingerprint: str, dtype: str):
        self.dir = Path(data_dir)
        self.manifest = fmt.read_manifest(self.dir)
        if not fmt.is_preference(self.manifest):
            raise FormatError(f"{self.dir}: not a preference dataset (manifest kind is "
                              f"{self.manifest.get('kind', 'sft')!r}); reference log-probs are "
                              f"stored for preference datasets only", rule="reference-kind")
        if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"fingerprint must be a sha256 hex digest, got {fingerprint!r}")
        self.model, self.fingerprint, self.dtype = str(model), fingerprint, str(dtype)
        self.rel = fmt.reference_dir(fingerprint)
        self.out = self.dir / self.rel
        self.data = fmt.PackedDataset(self.dir, self.manifest)

    def path(self, shard_index: int) -> Path:
        return self.out / fmt.shard_name(shard_index)

    def _meta(self, shard_index: int) -> dict[bytes, bytes]:
        return {_META_DATA_SHA: self.manifest["shards"][shard_index]["sha256"].encode(),
                _META_FINGERPRINT: self.fingerprint.encode(), _META_DTYPE: self.dtype.encode()}

    def done(self, shard_index: int) -> bool:
        """Whether shard ``shard_index``'s sidecar file is finished (an earlier, interrupted run
        wrote it for this data shard and this model): it can be skipped."""
        path = self.path(shard_index)
        if not path.is_file() or path.is_symlink():
            return False
        try:
            table = fmt.read_arrow(path)
        except (pa.ArrowInvalid, OSError):
            return False
        meta = table.schema.metadata or {}
        if any(meta.get(k) != v for k, v in self._meta(shard_index).items()):
            return False
        return fmt.sidecar_problem(table, fmt.segments_per_pack(self.data, shard_index)) is None

    def write_shard(self, shard_index: int, rows: list[np.ndarray]) -> None:
        """Write shard ``shard_index``'s sidecar: one array per pack, as many values as the
        pack has segments, finite and <= 0. Atomic (temporary name, then rename)."""
        want = fmt.segments_per_pack(self.data, shard_index)
        if len(rows) != len(want):
            raise ValueError(f"shard {shard_index}: {len(rows)} rows, the data shard has "
                             f"{len(want)} packs")
        arrs = [np.asarray(r, dtype=np.float64).reshape(-1) for r in rows]
        lens = np.fromiter(map(len, arrs), dtype=np.int64, count=len(arrs))
        bad = np.flatnonzero(lens != want)
        if len(bad):
            r = int(bad[0])
            raise ValueError(f"shard {shard_index} row {r}: {lens[r]} values, the pack has "
                             f"{want[r]} segments")
        values = np.concatenate(arrs) if arrs else np.zeros(0)
        if not np.all(np.isfinite(values) & (values <= 0)):
            raise ValueError(f"shard {shard_index}: log-probs must be finite and <= 0")
        offsets = np.zeros(len(arrs) + 1, dtype=np.int32)
        np.cumsum(lens, out=offsets[1:])
        column = pa.ListArray.from_arrays(fmt.numpy_to_arrow(offsets, pa.int32()),
                                          fmt.numpy_to_arrow(values, pa.float64()))
        schema = fmt.SIDECAR_SCHEMA.with_metadata(self._meta(shard_index))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema) as w:
            w.write_batch(pa.RecordBatch.from_arrays([column], schema=schema))
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path(shard_index), sink.getvalue().to_pybytes())

    def commit(self) -> dict:
        """Add (or replace) this model's ``reference_logps`` entry in manifest.json, atomically,
        once every shard's sidecar is done; return the entry."""
        missing = [i for i in range(len(self.manifest["shards"])) if not self.done(i)]
        if missing:
            raise FormatError(f"{self.out}: {len(missing)} of {len(self.manifest['shards'])} "
                              f"sidecar shards are missing (first: {fmt.shard_name(missing[0])}); "
                              f"compute them before committing", rule="reference-incomplete")
        shards = []
        for i, info in enumerate(self.manifest["shards"]):
            p = self.path(i)
            shards.append({"path": f"{self.rel}/{p.name}", "packs": int(info["packs"]),
                           "bytes": p.stat().st_size, "sha256": file_sha256(p)})
        entry = {"model": self.model, "fingerprint": self.fingerprint, "dtype": self.dtype,
                 "dir": self.rel, "shards": shards}
        manifest = fmt.read_manifest(self.dir)  # as it is now, not as it was when we started
        if manifest["shards"] != self.manifest["shards"]:
            raise FormatError(f"{self.dir}: the dataset was rebuilt while the reference "
                              f"log-probs were computed; compute them again",
                              rule="reference-stale")
        others = [e for e in manifest.get("reference_logps") or ()
                  if e["fingerprint"] != self.fingerprint]
        manifest["reference_logps"] = others + [entry]
        fsync_dir(self.out)
        fmt.write_manifest(self.dir, manifest)
        _update_parent(self.dir, manifest)
        return entry


def _update_parent(data_dir: Path, manifest: dict) -> None:
    """An eval dataset's manifest is recorded (sha256) in its parent's: record the new one."""
    if not isinstance(manifest.get("eval_of"), dict):
        return
    parent = (data_dir / manifest["eval_of"]["parent"]).resolve()
    try:
        pm = fmt.read_manifest(parent)
    except FormatError:
        return  # an eval dataset copied away from its parent: nothing to keep in step
    if isinstance(pm.get("eval"), dict) and (parent / pm["eval"]["path"]).resolve() \
            == data_dir.resolve():
        pm["eval"]["manifest_sha256"] = file_sha256(data_dir / fmt.MANIFEST)
        fmt.write_manifest(parent, pm)


# ---------------------------------------------------------------- reading

class ReferenceReader:
    """``reader[pack_index]``: the reference log-probs of one pack, one float64 per segment,
    aligned with ``pack.format.PackedDataset(data_dir)[pack_index]``. Each sidecar shard is
    memory-mapped when first used, its size and row count checked against the manifest."""

    def __init__(self, data_dir: str | os.PathLike, entry: dict):
        self.dir = Path(data_dir)
        self.entry = entry
        self.shards = entry["shards"]
        counts = np.array([s["packs"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._cols: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _column(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if s not in self._cols:
            table = fmt.open_sidecar(self.dir, self.shards[s])
            arr = table.column(fmt.REF_COLUMN).combine_chunks()
            self._cols[s] = (arr.offsets.to_numpy(zero_copy_only=False),
                             arr.values.to_numpy(zero_copy_only=False))
        return self._cols[s]

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        r = i - int(self.offsets[s])
        off, vals = self._column(s)
        return vals[off[r]:off[r + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]
