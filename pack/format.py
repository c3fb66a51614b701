"""The packed-dataset format: the one contract between `pack` and `train`.

A packed dataset is a directory holding ``manifest.json`` and ``shard-NNNNN.arrow`` files
(Arrow IPC *stream* format since 2.0, uncompressed, so readers memory-map them; 1.x
used the IPC file format and is still read). One row is one pack:

    input_ids    list<int32>  the tokens of all samples in the pack, back to back (T <= max_length)
    labels       list<int32>  token id where loss is taken, -100 elsewhere; unshifted (HF style)
    position_ids list<int32>  restart at 0 at every sample start
    cu_seqlens   list<int32>  0, end of sample 1, ..., T
    sample_index list<int64>  the input record each sample came from

Preference datasets (format 2.1, manifest ``"kind": "preference"``) add, one entry per sample
(here: per segment):

    pair_id      list<int64>  the pair's record number (equal to sample_index)
    role         list<int8>   0 = chosen, 1 = rejected; segments 2k and 2k+1 are one pair

Worked example: two samples, A = [a0 a1 a2] (prompt a0, response a1 a2) and B = [b0 b1]
(prompt b0, response b1), packed together:

    input_ids    = [a0,   a1, a2, b0,   b1]
    labels       = [-100, a1, a2, -100, b1]     labels[cu_seqlens[i]] is always -100, so the
    position_ids = [0,    1,  2,  0,    1]      last token of A never learns to predict b0
    cu_seqlens   = [0, 3, 5]
    sample_index = [17, 4]                      (record numbers in the source order)

A preference pack of one pair P (record 9): prompt p0 p1, chosen c0 c1, rejected r0:

    input_ids    = [p0,   p1,   c0, c1, p0,   p1,   r0]
    labels       = [-100, -100, c0, c1, -100, -100, r0]
    cu_seqlens   = [0, 4, 7]
    sample_index = [9, 9]   pair_id = [9, 9]   role = [0, 1]

The manifest (validated against ``schemas/manifest.schema.json``) is written last and atomically:
a directory without it is not a dataset. This module holds the schema, the shard writer, the
memory-mapped reader, manifest read/validate, invariant checks and verify, and the layout and
checks of the reference log-prob sidecar of preference datasets (:mod:`pack.reference` writes
and reads it).
It imports no torch: `train` reads shards through it, `pack` writes through it.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from .errors import FormatError
from .files import HashingSink, file_sha256, fsync_dir, write_atomic

FORMAT_NAME = "packtrain-packed"
FORMAT_VERSION = "2.0"  # what SFT datasets are stamped with (2.0 readers read them)
PREFERENCE_VERSION = "2.1"  # preference datasets: 2.0 + the pair_id and role columns
# The newest format this reader reads. A newer minor is refused too: a minor adds meaning (2.1's
# pairs) that an older reader would silently misread. Readers before 2.1 accepted any minor.
FORMAT_MAJOR = 2
FORMAT_MINOR = 1
PREFERENCE = "preference"
CHOSEN, REJECTED = 0, 1  # the role column's values
# 2.0 moved shards from the Arrow IPC *file* to the IPC *stream* encoding, the one Hugging Face
# datasets memory-maps (Dataset.from_file reads only streams). Both map zero-copy; this reader
# still reads 1.x file-format shards, told apart by the file format's leading magic.
ARROW_FILE_MAGIC = b"ARROW1"
MANIFEST = "manifest.json"
IGNORE_INDEX = -100
# schemas/ at the repository's top level ships inside the package as `pack.schemas`
# (pyproject.toml maps it), so an installed wheel validates with the same files.
SCHEMA_PACKAGE = "pack.schemas"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        pa.field("position_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("cu_seqlens", pa.list_(pa.int32()), nullable=False),
        pa.field("sample_index", pa.list_(pa.int64()), nullable=False),
    ],
    metadata={"format": FORMAT_NAME, "format_version": FORMAT_VERSION},
)
COLUMNS = tuple(SHARD_SCHEMA.names)
PAIR_COLUMNS = ("pair_id", "role")
PREFERENCE_SCHEMA = pa.schema(
    list(SHARD_SCHEMA) + [pa.field("pair_id", pa.list_(pa.int64()), nullable=False),
                          pa.field("role", pa.list_(pa.int8()), nullable=False)],
    metadata={"format": FORMAT_NAME, "format_version": PREFERENCE_VERSION},
)


def is_preference(manifest: dict) -> bool:
    """Whether a manifest describes a preference dataset (``kind``; absent means SFT)."""
    return manifest.get("kind") == PREFERENCE


def shard_schema(preference: bool) -> pa.Schema:
    """The Arrow schema of one shard of an SFT (2.0) or a preference (2.1) dataset."""
    return PREFERENCE_SCHEMA if preference else SHARD_SCHEMA


# ---------------------------------------------------------------- writing shards

@dataclass
class ShardInfo:
    path: str
    packs: int
    tokens: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return dict(path=self.path, packs=self.packs, tokens=self.tokens, bytes=self.bytes,
                    sha256=self.sha256)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.arrow"


class ShardWriter:
    """Append packs; rolls over to a new shard after `max_packs` packs or `max_bytes` bytes.

    Each shard is written under a temporary name and renamed when closed, so a shard file with
    its final name is always complete. Packs are buffered in record batches of `batch_packs`.
    Output bytes depend only on the packs written, so equal inputs give byte-identical shards.

    ``preference=True`` writes format 2.1 shards: samples are the segments of pairs (chosen,
    rejected, adjacent), and ``pair_id`` (= sample_index) and ``role`` (0, 1, 0, 1, ...) are
    derived here from sample_index, as position_ids are from cu_seqlens.
    """

    def __init__(self, out_dir: str | os.PathLike, max_packs: int | None = None,
                 max_bytes: int | None = 256 << 20, batch_packs: int = 256,
                 preference: bool = False):
        self.out_dir = Path(out_dir)
        self.max_packs, self.max_bytes, self.batch_packs = max_packs, max_bytes, batch_packs
        self.preference = bool(preference)
        self.schema = shard_schema(self.preference)
        self.columns = tuple(self.schema.names)
        # pair_id and role: 8 + 1 bytes per segment
        self._seg_bytes = 9 if self.preference else 0
        self.shards: list[ShardInfo] = []
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._sink = None
        self._tmp: Path | None = None
        self._buf: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        self._shard_packs = self._shard_tokens = self._shard_bytes = 0

    def add(self, input_ids: np.ndarray, labels: np.ndarray, cu_seqlens: np.ndarray,
            sample_index: np.ndarray) -> None:
        """Add one pack. position_ids are derived from cu_seqlens, never trusted from callers."""
        cu = np.asarray(cu_seqlens, dtype=np.int32)
        self._buf["input_ids"].append(np.asarray(input_ids, dtype=np.int32))
        self._buf["labels"].append(np.asarray(labels, dtype=np.int32))
        self._buf["position_ids"].append(positions_from_cu(cu))
        self._buf["cu_seqlens"].append(cu)
        index = np.asarray(sample_index, dtype=np.int64)
        self._buf["sample_index"].append(index)
        if self.preference:
            check_pairs(len(cu) - 1)
            self._buf["pair_id"].append(index)
            self._buf["role"].append(roles(len(index)))
        n = len(self._buf["input_ids"][-1])
        self._shard_packs += 1
        self._shard_tokens += n
        self._shard_bytes += _pack_bytes(n, len(cu), len(sample_index)) \
            + self._seg_bytes * len(index)
        if len(self._buf["input_ids"]) >= self.batch_packs:
            self._flush()
        if self._full(self._shard_packs, self._shard_bytes):
            self._close_shard()

    def _full(self, packs: int, size: int) -> bool:
        """Whether a shard of ``packs`` packs and about ``size`` bytes is to be closed."""
        return bool((self.max_packs and packs >= self.max_packs)
                    or (self.max_bytes and size >= self.max_bytes))

    def plan(self, pack_tokens: np.ndarray, pack_samples: np.ndarray
             ) -> list[tuple[int, int, bool]]:
        """The record batches that :meth:`add` would write for these packs, added next and in
        this order: ``(first, end, the shard closes after it)``, for :meth:`add_batch`. The
        bytes written are the same either way."""
        if any(self._buf.values()):
            raise RuntimeError("plan() after add() without a flush")
        out: list[tuple[int, int, bool]] = []
        start, packs, size = 0, self._shard_packs, self._shard_bytes
        for i, (n, s) in enumerate(zip(pack_tokens.tolist(), pack_samples.tolist())):
            packs += 1
            size += _pack_bytes(n, s + 1, s) + self._seg_bytes * s
            full = self._full(packs, size)
            if full or i + 1 - start >= self.batch_packs:
                out.append((start, i + 1, full))
                start = i + 1
                if full:
                    packs = size = 0
        if start < len(pack_tokens):
            out.append((start, len(pack_tokens), False))
        return out

    def add_batch(self, input_ids: np.ndarray, labels: np.ndarray, cu_samples: np.ndarray,
                  pack_samples: np.ndarray, sample_index: np.ndarray,
                  close_shard: bool = False) -> None:
        """Write packs as one record batch, as :meth:`plan` cut them: their tokens and labels
        back to back, ``cu_samples`` the samples' boundaries in them (from 0), ``pack_samples``
        how many samples each pack holds. position_ids and each pack's cu_seqlens are derived
        here, as :meth:`add` derives them."""
        cu = np.asarray(cu_samples, dtype=np.int64)
        ps = np.zeros(len(pack_samples) + 1, dtype=np.int64)
        np.cumsum(pack_samples, out=ps[1:])
        tok_off = cu[ps]  # each pack's first token
        k, total = len(pack_samples), int(cu[-1])
        positions = positions_from_cu(cu)  # restart at every sample, so at every pack too
        # each pack's cu_seqlens: its samples' boundaries, from its own first token
        per_pack = np.asarray(pack_samples, dtype=np.int64) + 1
        cu_off = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(per_pack, out=cu_off[1:])
        at = np.repeat(ps[:-1], per_pack) + positions_from_cu(cu_off)  # index into cu
        cu_values = (cu[at] - np.repeat(tok_off[:-1], per_pack)).astype(np.int32)
        self._shard_packs += k
        self._shard_tokens += total
        n_samples = len(cu) - 1
        self._shard_bytes += _pack_bytes(total, n_samples + k, n_samples, k) \
            + self._seg_bytes * n_samples
        cols = {"input_ids": (tok_off, input_ids), "labels": (tok_off, labels),
                "position_ids": (tok_off, positions), "cu_seqlens": (cu_off, cu_values),
                "sample_index": (ps, sample_index)}
        if self.preference:
            for n in np.asarray(pack_samples).tolist():
                check_pairs(n)
            cols["pair_id"] = (ps, sample_index)
            cols["role"] = (ps, roles(n_samples))  # every pack starts with a chosen segment
        arrays = [pa.ListArray.from_arrays(
            numpy_to_arrow(off.astype(np.int32), pa.int32()),
            numpy_to_arrow(vals, self.schema.field(c).type.value_type))
            for c, (off, vals) in cols.items()]
        self._open_shard()
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        if close_shard:
            self._close_shard()

    def _flush(self) -> None:
        if not self._buf["input_ids"]:
            return
        self._open_shard()
        arrays = [_list_array(self._buf[c], self.schema.field(c).type.value_type)
                  for c in self.columns]
        self._writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=self.schema))
        self._buf = {c: [] for c in self.columns}

    def _open_shard(self) -> None:
        if self._writer is None:
            self._tmp = self.out_dir / f".{shard_name(len(self.shards))}.tmp"
            self._sink = HashingSink(self._tmp)
            self._writer = pa.ipc.new_stream(self._sink, self.schema)

    def _close_shard(self) -> None:
        self._flush()
        if self._writer is None:
            return
        self._writer.close()
        self._sink.flush()
        os.fsync(self._sink.fileno())
        self._sink.close()
        name = shard_name(len(self.shards))
        final = self.out_dir / name
        os.replace(self._tmp, final)
        self.shards.append(ShardInfo(name, self._shard_packs, self._shard_tokens,
                                     final.stat().st_size, self._sink.hexdigest()))
        self._writer = self._sink = self._tmp = None
        self._shard_packs = self._shard_tokens = self._shard_bytes = 0

    def close(self) -> list[ShardInfo]:
        self._close_shard()
        fsync_dir(self.out_dir)
        return self.shards

    def abort(self) -> None:
        """After an error: close and delete the shard being written (its temporary file).
        Shards already completed are left to the caller (they are listed in ``shards``)."""
        for obj in (self._writer, self._sink):
            try:
                if obj is not None:
                    obj.close()
            except Exception:
                pass
        if self._tmp is not None:
            try:
                self._tmp.unlink()
            except FileNotFoundError:
                pass
        self._writer = self._sink = self._tmp = None
        self._buf = {c: [] for c in self.columns}


def roles(n_segments: int) -> np.ndarray:
    """The role column of ``n_segments`` segments of whole pairs: chosen, rejected, ..."""
    return (np.arange(n_segments, dtype=np.int64) % 2).astype(np.int8)


def check_pairs(n_segments: int) -> None:
    """A preference pack holds whole pairs: an even number of segments."""
    if n_segments % 2:
        raise ValueError(f"a preference pack holds whole pairs, got {n_segments} segments")


def _pack_bytes(n_tokens: int, n_cu: int, n_index: int, n_packs: int = 1) -> int:
    """Packs' size in a shard, close enough to roll shards on: 4+4+4 bytes per token (ids,
    labels, positions), their cu_seqlens and sample indices, and their list offsets."""
    return 12 * n_tokens + 4 * n_cu + 8 * n_index + 40 * n_packs


def numpy_to_arrow(values: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A numpy int (or float64) array as an Arrow array without copying (beyond a dtype cast) and without
    ``pa.array``, whose first call imports pandas when it is installed (a second or more)."""
    dtype = {pa.int8(): np.int8, pa.int32(): np.int32, pa.int64(): np.int64,
             pa.float64(): np.float64}[value_type]
    values = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(value_type, len(values), [None, pa.py_buffer(values)])


def _list_array(rows: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(numpy_to_arrow(offsets, pa.int32()),
                                    numpy_to_arrow(values, value_type))


def positions_from_cu(cu_seqlens: np.ndarray) -> np.ndarray:
    """position_ids that restart at 0 at every sample start: [0, 3, 5] -> [0 1 2 0 1]."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    total = int(cu[-1]) if len(cu) else 0
    starts = np.repeat(cu[:-1], np.diff(cu))
    return (np.arange(total, dtype=np.int64) - starts).astype(np.int32)


# ---------------------------------------------------------------- manifest

@functools.lru_cache(maxsize=1)
def read_schema(name: str) -> str:
    """The text of one of the JSON schemas that describe the format (``schemas/NAME``)."""
    from importlib.resources import files

    return files(SCHEMA_PACKAGE).joinpath(name).read_text(encoding="utf-8")


def manifest_validator():
    """The JSON Schema validator of schemas/manifest.schema.json (made once per process)."""
    import jsonschema

    schema = json.loads(read_schema("manifest.schema.json"))
    return jsonschema.Draft202012Validator(schema)


def validate_manifest(manifest: dict, where: str = MANIFEST) -> None:
    """Check a manifest against schemas/manifest.schema.json and the path rules."""
    errors = sorted(manifest_validator().iter_errors(manifest), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        field = ".".join(str(p) for p in e.path) or "(top level)"
        raise FormatError(f"{where}: field {field}: {e.message}; the manifest does not follow "
                          f"schemas/manifest.schema.json — rebuild the dataset with pack-build",
                          rule="manifest-schema")
    seen: set[str] = set()
    for s in manifest["shards"]:
        check_relative_path(s["path"], where)
        key = os.path.normpath(s["path"])
        if key in seen:  # its packs would be read, and trained on, twice
            raise FormatError(f"{where}: shard {s['path']!r} is listed twice; the manifest was "
                              f"edited — rebuild the dataset", rule="shard-duplicate")
        seen.add(key)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i]))
        raise ValueError(f"key {dup!r} appears twice")
    return d


def parse_manifest(data: bytes, where: str) -> dict:
    """manifest.json's bytes -> a checked manifest. Duplicate keys (where the last one would
    silently win) and absurd nesting are refused like any other malformed manifest."""
    try:
        manifest = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{where}: not valid JSON ({e}); rebuild the dataset with pack-build",
                          rule="manifest-json") from None
    except RecursionError:
        raise FormatError(f"{where}: not valid JSON (nested too deeply); rebuild the dataset "
                          f"with pack-build", rule="manifest-json") from None
    if not isinstance(manifest, dict):
        raise FormatError(f"{where}: expected a JSON object", rule="manifest-json")
    try:
        check_version(manifest, where)
        validate_manifest(manifest, where)
    except RecursionError:
        raise FormatError(f"{where}: a field is nested too deeply; the manifest does not follow "
                          f"schemas/manifest.schema.json", rule="manifest-schema") from None
    return manifest


def check_relative_path(p: str, where: str = MANIFEST) -> None:
    """Shard paths must be relative and stay inside the dataset directory."""
    parts = Path(p).parts
    if (not p or os.path.isabs(p) or p.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", p)
            or ".." in parts or "://" in p):
        raise FormatError(f"{where}: shard path {p!r} is absolute or leaves the dataset "
                          f"directory; refusing to read it", rule="shard-path")


def check_version(manifest: dict, where: str = MANIFEST) -> None:
    fmt = manifest.get("format")
    if fmt != FORMAT_NAME:
        raise FormatError(f"{where}: field format is {fmt!r}, expected {FORMAT_NAME!r}; this is "
                          f"not a packtrain dataset", rule="format-name")
    ver = str(manifest.get("format_version", ""))
    m = re.fullmatch(r"(\d+)\.(\d+)", ver)
    if not m:
        raise FormatError(f"{where}: field format_version {ver!r} is not MAJOR.MINOR",
                          rule="format-version")
    major, minor = int(m.group(1)), int(m.group(2))
    if major > FORMAT_MAJOR or (major == FORMAT_MAJOR and minor > FORMAT_MINOR):
        raise FormatError(f"{where}: format_version {ver} is newer than this packtrain reads "
                          f"(up to {FORMAT_MAJOR}.{FORMAT_MINOR}); upgrade packtrain to one "
                          f"that reads format {ver}", rule="format-version")
    if is_preference(manifest) and (major, minor) < (2, 1):
        raise FormatError(f"{where}: kind preference needs format_version 2.1 or newer, got "
                          f"{ver}; rebuild the dataset with pack-build", rule="format-version")


def write_manifest(out_dir: str | os.PathLike, manifest: dict) -> None:
    validate_manifest(manifest)
    write_atomic(Path(out_dir) / MANIFEST,
                 (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode())


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Load and validate a manifest; errors name the file and field."""
    path = Path(data_dir) / MANIFEST
    if not Path(data_dir).is_dir():
        raise FormatError(f"{data_dir}: no such dataset directory; pass the output directory of "
                          f"pack-build", rule="manifest-missing")
    if not path.is_file():
        raise FormatError(f"{path}: missing; {data_dir} is not a complete packed dataset "
                          f"(an interrupted pack-build?) — rerun pack-build", rule="manifest-missing")
    return parse_manifest(path.read_bytes(), str(path))


# ---------------------------------------------------------------- reading

class PackedDataset:
    """Memory-mapped, random-access view of a packed dataset: ``ds[i]`` is pack ``i`` as numpy
    int arrays (zero-copy views into the mapped shards). Packs are numbered shard by shard in
    manifest order. Unknown extra columns are ignored; missing or mistyped ones are refused."""

    def __init__(self, data_dir: str | os.PathLike, manifest: dict | None = None):
        self.dir = Path(data_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.dir)
        self.shards = self.manifest["shards"]
        self.preference = is_preference(self.manifest)
        self.schema = shard_schema(self.preference)
        counts = np.array([s["packs"] for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self._tables: dict[int, pa.Table] = {}
        self._cols: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def max_length(self) -> int:
        return int(self.manifest["max_length"])

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return s, i - int(self.offsets[s])

    def table(self, s: int) -> pa.Table:
        if s not in self._tables:
            self._tables[s] = open_shard(self.dir, self.shards[s], self.schema)
        return self._tables[s]

    def _columns(self, s: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if s not in self._cols:
            self._cols[s] = table_columns(self.table(s))
        return self._cols[s]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s, r = self.locate(int(i))
        out = {}
        for c, (off, vals) in self._columns(s).items():
            out[c] = vals[off[r]:off[r + 1]]
        return out

    def lengths(self) -> np.ndarray:
        """Tokens per pack, for every pack, without touching token data beyond offsets."""
        parts = []
        for s in range(len(self.shards)):
            off, _ = self._columns(s)["input_ids"]
            parts.append(np.diff(off))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]


def table_columns(table: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each format column of a shard table (the pair columns when it has them) as (offsets,
    values) numpy arrays: pack r of column c is ``values[offsets[r]:offsets[r + 1]]``."""
    cols = {}
    names = table.schema.names
    for c in COLUMNS + tuple(c for c in PAIR_COLUMNS if c in names):
        arr = table.column(c).combine_chunks()
        cols[c] = (arr.offsets.to_numpy(zero_copy_only=False),
                   arr.values.to_numpy(zero_copy_only=False))
    return cols


def pack_problems(cols: dict[str, tuple[np.ndarray, np.ndarray]], max_length: int,
                  vocab_size: int | None) -> Iterator[tuple[int, str]]:
    """``(row, broken rule)`` for every pack of a shard (as :func:`table_columns` gives it) that
    breaks an invariant of :func:`check_pack`."""
    for r in range(len(cols["input_ids"][0]) - 1):
        row = {c: vals[off[r]:off[r + 1]] for c, (off, vals) in cols.items()}
        rule = check_pack(row, max_length, vocab_size)
        if rule:
            yield r, rule


def read_arrow(path: str | os.PathLike) -> pa.Table:
    """Memory-map an Arrow IPC stream (format 2.x) or file (format 1.x) as a zero-copy table."""
    source = pa.memory_map(str(path), "r")
    if source.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC:
        return pa.ipc.open_file(source).read_all()
    source.seek(0)
    return pa.ipc.open_stream(source).read_all()


def shard_path(data_dir: str | os.PathLike, name: str) -> Path:
    """Where a shard the manifest names lives: inside the dataset directory, and not through a
    symbolic link (the manifest vouches for files inside the dataset; a link could point
    anywhere, and a copy or hard link of the dataset would still depend on its target)."""
    check_relative_path(name)
    path = Path(data_dir) / name
    if path.is_symlink() or (path.exists() and not path.resolve().is_relative_to(
            Path(data_dir).resolve())):
        raise FormatError("shard is a symbolic link (or inside a linked folder); a dataset holds "
                          "its shards as plain files — copy the file in", shard=name,
                          rule="shard-path")
    return path


def open_shard(data_dir: Path, info: dict, schema: pa.Schema = SHARD_SCHEMA) -> pa.Table:
    """Memory-map one shard and check its size, columns (those of ``schema``: pass
    :func:`shard_schema` of the manifest's kind) and row count against the manifest."""
    name = info["path"]
    path = shard_path(data_dir, name)
    if not path.is_file():
        raise FormatError("shard file is missing; the dataset is incomplete — re-copy it or "
                          "rebuild with pack-build", shard=name, rule="shard-missing")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise FormatError(f"size {size} bytes, manifest says {info['bytes']}; the shard is "
                          f"truncated or altered — re-copy it or rebuild", shard=name,
                          rule="shard-size")
    try:
        table = read_arrow(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"not a readable Arrow IPC shard ({e}); re-copy it or rebuild",
                          shard=name, rule="shard-arrow") from None
    for field in schema:
        if field.name not in table.schema.names:
            raise FormatError(f"column {field.name} is missing", shard=name, rule="shard-schema")
        got = table.schema.field(field.name).type
        if got != field.type:
            raise FormatError(f"column {field.name} has type {got}, expected {field.type}",
                              shard=name, rule="shard-schema")
    if table.num_rows != info["packs"]:
        raise FormatError(f"{table.num_rows} packs, manifest says {info['packs']}", shard=name,
                          rule="shard-rows")
    return table


# ---------------------------------------------------------------- invariants

def check_pack(row: dict[str, np.ndarray], max_length: int, vocab_size: int | None) -> str | None:
    """Return the name of the first broken invariant of one pack, or None. Rules (DESIGN.md):
    cu_seqlens starts at 0, strictly increases, ends at T; position_ids restart exactly at
    cu_seqlens; ids below the vocabulary size; T <= max_length; labels are -100 or equal to
    input_ids; labels at every sample start are -100; one sample_index per sample; with pair
    columns (format 2.1): whole pairs, roles 0, 1, ..., pair_id equal to sample_index."""
    ids, labels, pos, cu = row["input_ids"], row["labels"], row["position_ids"], row["cu_seqlens"]
    t = len(ids)
    if len(labels) != t or len(pos) != t:
        return "lengths: input_ids, labels and position_ids must have equal length"
    if t == 0:
        return "empty-pack: a pack holds at least one token"
    if t > max_length:
        return f"max-length: {t} tokens > max_length {max_length}"
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != t or np.any(np.diff(cu) <= 0):
        return "cu-seqlens: must start at 0, strictly increase and end at the pack length"
    if len(row["sample_index"]) != len(cu) - 1:
        return "sample-index: one entry per sample"
    if not np.array_equal(pos, positions_from_cu(cu)):
        return "position-ids: must restart at 0 exactly at each cu_seqlens start"
    if ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size):
        return f"token-range: token ids must lie in [0, {vocab_size})"
    trained = labels != IGNORE_INDEX
    if np.any(labels[trained] != ids[trained]):
        return "labels: every label is -100 or equals input_ids at the same place"
    if np.any(labels[cu[:-1]] != IGNORE_INDEX):
        return "labels-start: labels at each sample start must be -100"
    if "pair_id" in row:
        return _pair_problem(row, len(cu) - 1)
    return None


def _pair_problem(row: dict[str, np.ndarray], n: int) -> str | None:
    """The broken pair invariant of a preference pack, or None."""
    pair_id, role = row["pair_id"], row.get("role")
    if role is None or len(pair_id) != n or len(role) != n:
        return "pair-columns: one pair_id and one role per segment"
    if n % 2:
        return "pair-split: a preference pack holds whole pairs (an even number of segments)"
    if not np.array_equal(role, roles(n)):
        return "pair-roles: roles must alternate 0 (chosen), 1 (rejected)"
    if np.any(pair_id[0::2] != pair_id[1::2]) or np.any(pair_id != row["sample_index"]):
        return "pair-id: both segments of a pair carry its record number (= sample_index)"
    return None


def verify(data_dir: str | os.PathLike, checksums: bool = True, invariants: bool = True,
           max_problems: int = 20, progress: bool = False) -> list[str]:
    """Check a dataset: manifest, every shard's size/schema/rows, optionally sha256 and every
    pack's invariants. Returns messages (empty when valid), each naming shard, row and rule."""
    problems: list[str] = []
    try:
        manifest = read_manifest(data_dir)
    except FormatError as e:
        return [str(e)]
    vocab = manifest["tokenizer"].get("vocab_size")
    max_length = int(manifest["max_length"])
    schema = shard_schema(is_preference(manifest))
    tokens_total = samples_total = label_total = 0
    shards = manifest["shards"]
    it = shards
    if progress:
        from tqdm import tqdm
        it = tqdm(shards, desc="verify", unit="shard")
    for info in it:
        name = info["path"]
        try:
            table = open_shard(Path(data_dir), info, schema)
        except FormatError as e:
            problems.append(str(e))
            if len(problems) >= max_problems:
                break
            continue
        if checksums:
            digest = file_sha256(Path(data_dir) / name)
            if digest != info["sha256"]:
                problems.append(str(FormatError(
                    "sha256 does not match the manifest; the shard is corrupt or altered — "
                    "re-copy it or rebuild", shard=name, rule="checksum")))
        if invariants:
            cols = table_columns(table)
            ids_off = cols["input_ids"][0]
            shard_tokens = int(ids_off[-1] - ids_off[0])
            samples_total += int(len(cols["sample_index"][1]))
            label_total += int(np.count_nonzero(cols["labels"][1] != IGNORE_INDEX))
            for r, rule in pack_problems(cols, max_length, vocab):
                problems.append(str(FormatError(rule, shard=name, row=r,
                                                rule=rule.split(":")[0])))
                if len(problems) >= max_problems:
                    return problems
            if shard_tokens != info["tokens"]:
                problems.append(str(FormatError(
                    f"{shard_tokens} tokens, manifest says {info['tokens']}", shard=name,
                    rule="shard-tokens")))
            tokens_total += shard_tokens
        if len(problems) >= max_problems:
            break
    if not problems:
        stats = manifest["stats"]
        found = {"packs": sum(int(s["packs"]) for s in shards)}
        if invariants:
            found.update(tokens=tokens_total, samples_packed=samples_total,
                         label_tokens=label_total)
        for key, got in found.items():
            if got != stats[key]:
                problems.append(str(FormatError(
                    f"shards hold {got} {key.replace('_', ' ')}, stats.{key} says {stats[key]}; "
                    f"the manifest was edited — rebuild the dataset", shard=MANIFEST,
                    rule=f"stats-{key.replace('_', '-')}")))
        pairs = stats.get("pairs")
        if invariants and pairs is not None and 2 * pairs["packed"] != samples_total:
            problems.append(str(FormatError(
                f"shards hold {samples_total} segments, stats.pairs.packed says "
                f"{pairs['packed']} pairs; the manifest was edited — rebuild the dataset",
                shard=MANIFEST, rule="stats-pairs")))
    if manifest.get("reference_logps") and len(problems) < max_problems:
        problems += reference_problems(Path(data_dir), manifest, checksums,
                                       max_problems - len(problems))
    if isinstance(manifest.get("eval"), dict) and len(problems) < max_problems:
        problems += _eval_problems(Path(data_dir), manifest["eval"], checksums, invariants,
                                   max_problems - len(problems), progress)
    return problems


def _eval_problems(data_dir: Path, entry: dict, checksums: bool, invariants: bool,
                   max_problems: int, progress: bool) -> list[str]:
    """The eval dataset a manifest names (field ``eval``): its manifest is the one recorded
    (sha256) and it verifies like any dataset; its problems name it."""
    where = data_dir / entry["path"]  # the schema allows only "eval"
    try:
        digest = file_sha256(where / MANIFEST)
    except OSError as e:
        return [f"{where}/{MANIFEST}: cannot read the eval dataset's manifest "
                f"({e.strerror or e}); rebuild the dataset with its eval split"]
    if digest != entry["manifest_sha256"]:
        return [f"{where}/{MANIFEST}: sha256 differs from eval.manifest_sha256 of the parent "
                f"manifest; the eval dataset was replaced or altered — rebuild both"]
    return [f"{where}: {p}" for p in verify(where, checksums, invariants, max_problems,
                                            progress)]


# ---------------------------------------------------------------- reference log-probs
# The sidecar's layout and checks are part of the contract (pack.reference writes and reads it).

REFERENCE_DIR = "reference"
REF_COLUMN = "ref_logps"
SIDECAR_SCHEMA = pa.schema([pa.field(REF_COLUMN, pa.list_(pa.float64()), nullable=False)])


def reference_dir(fingerprint: str) -> str:
    """The sidecar's directory, relative to the dataset: ``reference/<fingerprint[:16]>``."""
    return f"{REFERENCE_DIR}/{fingerprint[:16]}"


def segments_per_pack(data: PackedDataset, shard_index: int) -> np.ndarray:
    """Segments (samples) of every pack of one data shard, from its cu_seqlens offsets."""
    off, _ = data._columns(shard_index)["cu_seqlens"]
    return np.diff(off).astype(np.int64) - 1


def sidecar_problem(table: pa.Table, segments: np.ndarray) -> str | None:
    """What is wrong with a sidecar table for a data shard with ``segments`` per pack."""
    if REF_COLUMN not in table.schema.names or table.schema.field(REF_COLUMN).type != \
            SIDECAR_SCHEMA.field(REF_COLUMN).type:
        return f"column {REF_COLUMN} list<double> is missing"
    if table.num_rows != len(segments):
        return f"{table.num_rows} rows, the data shard has {len(segments)} packs"
    arr = table.column(REF_COLUMN).combine_chunks()
    lens = np.diff(arr.offsets.to_numpy(zero_copy_only=False))
    bad = np.flatnonzero(lens != segments)
    if len(bad):
        r = int(bad[0])
        return f"row {r} holds {lens[r]} values, the pack has {segments[r]} segments"
    values = arr.values.to_numpy(zero_copy_only=False)
    if not np.all(np.isfinite(values) & (values <= 0)):
        return "log-probs must be finite and <= 0"
    return None


def open_sidecar(data_dir: Path, info: dict) -> pa.Table:
    """Memory-map one sidecar shard; check its size, column and row count against ``info``."""
    name = info["path"]
    path = shard_path(data_dir, name)
    if not path.is_file():
        raise FormatError("reference log-prob file is missing; recompute them (pack-ref)",
                          shard=name, rule="reference-missing")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise FormatError(f"size {size} bytes, manifest says {info['bytes']}; the file is "
                          f"truncated or altered — recompute the reference log-probs",
                          shard=name, rule="reference-size")
    try:
        table = read_arrow(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"not a readable Arrow IPC file ({e}); recompute the reference "
                          f"log-probs", shard=name, rule="reference-arrow") from None
    if REF_COLUMN not in table.schema.names or table.schema.field(REF_COLUMN).type != \
            SIDECAR_SCHEMA.field(REF_COLUMN).type:
        raise FormatError(f"column {REF_COLUMN} list<double> is missing", shard=name,
                          rule="reference-schema")
    if table.num_rows != info["packs"]:
        raise FormatError(f"{table.num_rows} rows, manifest says {info['packs']}", shard=name,
                          rule="reference-rows")
    return table


def reference_problems(data_dir: Path, manifest: dict, checksums: bool = True,
                       max_problems: int = 20) -> list[str]:
    """pack-verify's check of every ``reference_logps`` entry: its directory, one file per data
    shard (size, sha256, rows), one value per segment, values finite and <= 0."""
    problems: list[str] = []
    data = PackedDataset(data_dir, manifest)
    for entry in manifest.get("reference_logps") or ():
        where = f"reference_logps[{entry['model']}]"
        shards = entry["shards"]
        if entry["dir"] != reference_dir(entry["fingerprint"]) or \
                len(shards) != len(manifest["shards"]):
            problems.append(f"{Path(data_dir) / MANIFEST}: {where}: expected dir "
                            f"{reference_dir(entry['fingerprint'])} and one file per data "
                            f"shard ({len(manifest['shards'])}); recompute the reference "
                            f"log-probs [rule: reference-entry]")
            continue
        for i, info in enumerate(shards):
            problems += _sidecar_problems(data_dir, data, i, info, checksums)
            if len(problems) >= max_problems:
                return problems[:max_problems]
    return problems


def _sidecar_problems(data_dir: Path, data: PackedDataset, i: int, info: dict,
                      checksums: bool) -> list[str]:
    """The problems of sidecar file ``info`` that belongs to data shard ``i``."""
    name = info["path"]
    if not name.startswith(f"{REFERENCE_DIR}/"):
        return [str(FormatError("a reference log-prob file lies outside reference/",
                                shard=name, rule="reference-entry"))]
    try:
        table = open_sidecar(data_dir, info)
        segments = segments_per_pack(data, i)
    except FormatError as e:
        return [str(e)]
    out = []
    if checksums and file_sha256(data_dir / name) != info["sha256"]:
        out.append(str(FormatError("sha256 does not match the manifest; the file is corrupt or "
                                   "altered — recompute the reference log-probs", shard=name,
                                   rule="reference-checksum")))
    problem = sidecar_problem(table, segments)
    if problem:
        out.append(str(FormatError(problem, shard=name, rule="reference-rows")))
    return out
