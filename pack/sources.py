"""Read training records from corpus files: JSON Lines, JSON arrays, Parquet, gzip/zstd JSONL.

API (used by ``pack.tasks``):

``expand_inputs(inputs) -> list[Path]``
    Files and glob patterns, in the order given (each glob's matches sorted), duplicates removed.
``iter_records(path, skip_invalid=False, skipped=None, split=None, max_record_bytes=16MiB,
position=None)``
    Streams ``(where, record)`` pairs, ``where`` being ``"FILE:LINE"`` (JSON Lines, 1-based line) or
    ``"FILE:record N"`` (JSON array, Parquet; 1-based). Bad input raises a one-line
    :class:`PacktrainError` naming file and line; with ``skip_invalid=True`` a bad *record* is
    skipped and counted in ``skipped[reason]`` instead (reasons: ``invalid-json``,
    ``not-an-object``, ``invalid-utf8``, ``nul-byte``, ``too-large``: a JSON Lines line longer
    than ``max_record_bytes``, which is read no further than that). File-level problems
    (missing, empty, corrupt compressed data, unsupported type) always raise. A
    :class:`pack.progress.ReadPosition` given as ``position`` tells how far the reader has got.
``detect_format(records, where) -> "alpaca" | "messages" | "text" | "preference"``
    From the first few records' keys.

Supported files (by name, case-insensitive): ``.jsonl`` / ``.ndjson``; ``.json`` (a top-level
array of objects, or JSON Lines); ``.parquet`` (read one row group batch at a time); and
``.jsonl`` / ``.ndjson`` / ``.json`` compressed as ``.gz`` or ``.zst`` / ``.zstd`` (streamed).
JSON Lines are read line by line, never whole, and a line no further than the record size
limit; a JSON *array* has to be parsed whole (use JSONL for big corpora; its elements, like
Parquet rows, are not measured against the limit). Blank lines are ignored; a UTF-8 byte-order
mark at the start is accepted.
A directory written by Hugging Face ``save_to_disk`` is an input too (read by ``pack.hf_source``).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import glob
import gzip
import io
import json
import os
import zlib
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

from .errors import PacktrainError, json_type
from .progress import ReadPosition

SKIP_HINT = "fix it or pass --skip-invalid to skip bad records"
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
COMPRESSED = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
PARQUET_BATCH_ROWS = 1024
_GLOB_CHARS = set("*?[")
_MAGIC = {b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"PAR1": "parquet"}
SUPPORTED = (".jsonl, .ndjson, .json, .parquet, or .jsonl/.json compressed as .gz, .zst or .zstd")
# pack-build --max-record-bytes: the default longest JSON Lines line (why: pack.config).
MAX_RECORD_BYTES = 16 << 20
PASS_OVER_PIECE = 1 << 20  # the rest of a longer line is read in pieces of this many bytes


# ---------------------------------------------------------------- inputs

def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Expand files and globs (``*``, ``?``, ``[...]``, ``**`` recursive) into a list of files.

    Order: the inputs' order, each glob's matches sorted; a file named twice is kept once (its
    first place). Raises PacktrainError naming the pattern when a glob matches no file, or the
    path when a named file does not exist or is a directory."""
    out: list[Path] = []
    seen: set[str] = set()
    inputs = list(inputs)
    if not inputs:
        raise PacktrainError("no input files given; pass one or more .jsonl/.json/.parquet files "
                             "or globs")
    for pattern in inputs:
        pattern = str(pattern)
        if any(c in _GLOB_CHARS for c in pattern) and not os.path.exists(pattern):
            matches = [m for m in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
                       if os.path.isfile(m)]
            if not matches:
                raise PacktrainError(f"{pattern}: no file matches this pattern; check the path "
                                     f"(quote globs so the shell does not expand them)")
        else:
            p = os.path.expanduser(pattern)
            from .hf_source import is_hf_dataset_dir

            if is_hf_dataset_dir(p):  # a Hugging Face save_to_disk directory is one input
                matches = [p]
            elif os.path.isdir(p):
                raise PacktrainError(f"{pattern}: is a directory; pass the files in it, e.g. "
                                     f"'{pattern.rstrip('/')}/*.jsonl'")
            elif not os.path.isfile(p):
                raise PacktrainError(f"{pattern}: no such file; check the path")
            else:
                matches = [p]
        for m in matches:
            key = os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                out.append(Path(m))
    return out


# ---------------------------------------------------------------- reading

def _kind(path: Path) -> tuple[str, str | None]:
    """(container, compression): container in jsonl|json|parquet, compression None|gzip|zstd."""
    name = path.name.lower()
    compression = None
    for suffix, comp in COMPRESSED.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    if name.endswith(JSON_SUFFIXES):
        return "json", compression
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    raise PacktrainError(f"{path}: unsupported file type; expected {SUPPORTED}")


class LineError(Exception):
    """A JSON Lines line that is not a record: ``reason`` (``"invalid-json"``, ...) and
    ``message`` (naming no place: the caller knows the file and line)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class LongLine:
    """Stands for a JSON Lines line longer than the record size limit, which was not kept:
    ``size`` (its bytes, line ending included) and ``limit``. It holds no bytes (``len`` 0);
    :func:`parse_line` refuses it (reason ``too-large``)."""

    __slots__ = ("size", "limit")

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return True

    def __reduce__(self):
        return LongLine, (self.size, self.limit)

    def message(self) -> str:
        return (f"line of {self.size:,} bytes is longer than --max-record-bytes "
                f"({format_bytes(self.limit)}) and was not read; raise --max-record-bytes or "
                f"pass --skip-invalid to skip such records")


def format_bytes(n: int) -> str:
    """``67108864`` -> ``"64MiB"``; sizes that are no whole number of KiB stay in bytes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n:,} bytes"


def parse_line(raw: bytes | LongLine) -> dict:
    """One JSON Lines line (bytes, stripped of nothing) -> object, or raise :class:`LineError`."""
    if type(raw) is LongLine:
        raise LineError("too-large", raw.message())
    if b"\x00" in raw:
        col = raw.index(b"\x00") + 1
        raise LineError("nul-byte", f"NUL byte at column {col}; the file looks binary or corrupt "
                                f"(it is not UTF-8 JSON Lines); {SKIP_HINT}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 4]
        raise LineError("invalid-utf8", f"invalid UTF-8 at byte {e.start + 1} of the line ({bad!r}); "
                                    f"re-encode the file as UTF-8 or {SKIP_HINT}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LineError("invalid-json", f"invalid JSON: {e.msg} at column {e.colno}; "
                                    f"{SKIP_HINT}") from None
    except RecursionError:
        raise LineError("invalid-json", f"invalid JSON: nested too deeply; {SKIP_HINT}") from None
    if not isinstance(value, dict):
        raise LineError("not-an-object", f"expected a JSON object per line, got {json_type(value)}; "
                                     f"{SKIP_HINT}")
    return value


def _check_magic(path: Path, head: bytes, compression: str | None) -> None:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise PacktrainError(f"{path}: the file is UTF-16 encoded; convert it to UTF-8 "
                             f"(e.g. iconv -f UTF-16 -t UTF-8)")
    if compression is None:
        for magic, what in _MAGIC.items():
            if head.startswith(magic):
                hint = {"gzip": "name it *.jsonl.gz", "zstd": "name it *.jsonl.zst",
                        "parquet": "name it *.parquet"}[what]
                raise PacktrainError(f"{path}: the file is {what} data, not text; {hint}")


def _open_stream(path: Path, compression: str | None) -> IO[bytes]:
    """A buffered binary stream of the (decompressed) file."""
    if compression is None:
        return open(path, "rb", buffering=1 << 20)
    f = open(path, "rb")
    try:
        if compression == "gzip":
            return io.BufferedReader(gzip.GzipFile(fileobj=f, mode="rb"), buffer_size=1 << 20)
        return io.BufferedReader(_ZstdRaw(f), buffer_size=1 << 20)
    except Exception:
        f.close()
        raise


class _ZstdRaw(io.RawIOBase):
    """Streamed zstd decompression across concatenated frames that, unlike zstandard's
    stream_reader alone, reports a truncated last frame as an error instead of a silent EOF.

    zstandard's stream_reader decompresses straight into the caller's buffer, at most its size
    per call, so time is linear in the output and memory bounded (by the frames' window) however
    much a frame expands; the compressed bytes it reads pass through :class:`_FrameWalker`, which
    tells at the end whether the input stopped inside a frame."""

    def __init__(self, f: IO[bytes], chunk: int = 1 << 17):
        import zstandard

        self._zstd, self._f = zstandard, f
        self.fileobj = f  # as GzipFile's: the compressed file (pack.progress reads its position)
        self._walker = _FrameWalker(f)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self._walker, read_size=chunk, read_across_frames=True, closefd=False)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._reader.readinto(b)
        if not n and self._walker.inside:
            raise self._zstd.ZstdError("truncated zstd frame (unexpected end of file)")
        return n

    def close(self) -> None:
        if not self.closed:
            self._reader.close()
            self._f.close()
        super().close()


_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MAGIC = 0x184D2A50  # the low 4 bits are free
_FCS_BYTES = (0, 2, 4, 8)      # frame content size field by its flag (0: 1 byte if single segment)
_DICT_ID_BYTES = (0, 1, 2, 4)


class _FrameWalker:
    """Follows the frame and block headers of a zstd stream fed in pieces, skipping the blocks'
    contents, to tell whether the stream so far ends between frames (RFC 8878: a frame is a
    magic number, a header, blocks of 3-byte headers the last of which is flagged, and an
    optional 4-byte checksum; a skippable frame is a magic number, a 4-byte size and that many
    bytes). Data that is not zstd stops the walk: the decompressor reports it. ``read`` reads
    the file ``f`` and walks what it returns."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._head = bytearray()  # the header being read
        self._need = 4            # its length
        self._state = "magic"
        self._skip = 0            # bytes of content to pass over first
        self._checksum = False

    @property
    def inside(self) -> bool:
        """Whether the bytes fed so far stop inside a frame (or in a magic number)."""
        return self._state != "stop" and bool(self._skip or self._head or self._state != "magic")

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._feed(data)
        return data

    def _feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end and self._state != "stop":
            if self._skip:
                k = min(self._skip, end - pos)
                self._skip -= k
                pos += k
                continue
            k = min(self._need - len(self._head), end - pos)
            self._head += data[pos:pos + k]
            pos += k
            if len(self._head) == self._need:
                head = bytes(self._head)
                self._head.clear()
                self._header(head)

    def _expect(self, state: str, need: int, skip: int = 0) -> None:
        self._state, self._need, self._skip = state, need, skip

    def _header(self, head: bytes) -> None:
        state = self._state
        if state == "magic":
            magic = int.from_bytes(head, "little")
            if magic == _ZSTD_MAGIC:
                self._expect("frame", 1)
            elif magic & ~0xF == _SKIPPABLE_MAGIC:
                self._expect("skippable", 4)
            else:
                self._state = "stop"
        elif state == "skippable":
            self._expect("magic", 4, skip=int.from_bytes(head, "little"))
        elif state == "frame":  # the frame header descriptor, then the rest of the header
            d = head[0]
            single = (d >> 5) & 1
            self._checksum = bool((d >> 2) & 1)
            fcs = _FCS_BYTES[d >> 6] or single
            self._expect("block", 3, skip=(1 - single) + _DICT_ID_BYTES[d & 3] + fcs)
        elif state == "block":
            h = int.from_bytes(head, "little")
            last, kind, size = h & 1, (h >> 1) & 3, h >> 3
            content = 1 if kind == 1 else size  # an RLE block holds one byte
            if not last:
                self._expect("block", 3, skip=content)
            else:  # the frame ends after its checksum, if any
                self._expect("magic", 4, skip=content + 4 * self._checksum)


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [OSError, EOFError, zlib.error]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return tuple(errs)


def iter_records(path: Path, skip_invalid: bool = False,
                 skipped: collections.Counter | None = None,
                 split: str | None = None,
                 max_record_bytes: int = MAX_RECORD_BYTES,
                 position: ReadPosition | None = None) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` for every record of one file, streaming.

    ``where`` is ``"FILE:LINE"`` for JSON Lines (1-based, blank lines count) and
    ``"FILE:record N"`` (1-based) for JSON arrays and Parquet. Errors are PacktrainError with
    one line naming the place; with ``skip_invalid`` bad records are counted in
    ``skipped[reason]`` and skipped. A file with no records at all raises ("no records").
    ``position`` is kept up to date with the bytes of the input read (:mod:`pack.progress`)."""
    path = Path(path)
    if path.is_dir():  # a Hugging Face save_to_disk directory (``split``: of a DatasetDict)
        from .hf_source import iter_hf_records

        yield from iter_hf_records(path, split, position)
        return
    container, compression = _kind(path)
    if not path.is_file():
        raise PacktrainError(f"{path}: no such file; check the path")
    if container == "parquet":
        yield from _iter_parquet(path, position)
        return
    yield from _iter_json(path, container, compression, skip_invalid, skipped, max_record_bytes,
                          position)


def _iter_json(path: Path, container: str, compression: str | None, skip_invalid: bool,
               skipped: collections.Counter | None, max_record_bytes: int,
               position: ReadPosition | None = None) -> Iterator[tuple[str, dict]]:
    errors = _decompress_errors()
    what = f"{compression} " if compression else ""
    with _open_checked(path, compression, errors, what) as stream:
        if position is not None:
            position.tell = _disk_tell(stream)
        if container == "json":
            try:
                start = stream.peek(4096)
            except errors as e:  # pragma: no cover - peek(4) succeeded
                raise PacktrainError(f"{path}: corrupt {what}file ({e})") from None
            if start.startswith(b"\xef\xbb\xbf"):
                start = start[3:]
            if start.lstrip()[:1] == b"[":
                yield from _iter_json_array(path, stream, errors, what, position)
                return
        first = True
        for lineno, raw in _nonblank_lines(path, stream, errors, what, max_record_bytes):
            try:
                record = parse_line(raw)
            except LineError as s:
                if skip_invalid:
                    if skipped is not None:
                        skipped[s.reason] += 1
                    first = False
                    continue
                if container == "json" and first and s.reason == "invalid-json" \
                        and raw.lstrip()[:1] == b"{":
                    _whole_json_object_hint(path, stream, raw, errors)
                raise PacktrainError(f"{path}:{lineno}: {s.message}") from None
            first = False
            yield f"{path}:{lineno}", record


@contextlib.contextmanager
def _open_checked(path: Path, compression: str | None, errors, what: str) -> Iterator[IO[bytes]]:
    """Open a (possibly compressed) JSON file and check its first bytes (magic numbers,
    UTF-16); errors name the file and what to do."""
    try:
        stream = _open_stream(path, compression)
    except errors as e:
        raise PacktrainError(f"{path}: cannot read the file ({e})") from None
    with stream:
        try:
            head = stream.peek(4)[:4]
        except errors as e:
            raise PacktrainError(f"{path}: corrupt or unreadable {what}file ({e}); re-create "
                                 f"or re-download it") from None
        _check_magic(path, head, compression)
        yield stream


def _nonblank_lines(path: Path, stream: IO[bytes], errors, what: str,
                    max_bytes: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes | LongLine]]:
    """(1-based line number, raw line) for every non-blank line, BOM stripped; a decompression
    error names the line after the last good one; a file with no such line is an error. A line
    longer than ``max_bytes`` (its line ending not counted) is read no further than that: the
    rest is passed over in pieces and a :class:`LongLine` stands for it."""
    lineno = nonblank = 0
    readline = functools.partial(stream.readline, max_bytes + 1)
    try:
        for raw in iter(readline, b""):
            lineno += 1
            if len(raw) > max_bytes and raw[-1] != 10:
                nonblank += 1
                yield lineno, _pass_over(stream, len(raw), max_bytes)
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            nonblank += 1
            yield lineno, raw
    except errors as e:
        raise PacktrainError(f"{path}:{lineno + 1}: corrupt or truncated {what}data after "
                             f"line {lineno} ({e}); re-create or re-download the file") from None
    if nonblank == 0:
        raise PacktrainError(f"{path}: no records (the file is empty); remove it from the inputs")


def _pass_over(stream: IO[bytes], size: int, max_bytes: int) -> LongLine:
    """Read the rest of a line too long to keep, ``size`` bytes of which were read, in pieces
    of at most :data:`PASS_OVER_PIECE` bytes, keeping none."""
    while True:
        piece = stream.readline(PASS_OVER_PIECE)
        size += len(piece)
        if not piece or piece[-1] == 10:
            return LongLine(size, max_bytes)


def is_jsonl(path: Path) -> bool:
    """Whether ``path`` is a JSON Lines file by name (plain or compressed): its records can be
    read as raw lines by :func:`iter_raw_lines` and parsed elsewhere with :func:`parse_line`."""
    return not Path(path).is_dir() and _kind(Path(path))[0] == "jsonl"


def iter_raw_lines(path: Path, max_record_bytes: int = MAX_RECORD_BYTES,
                   position: ReadPosition | None = None
                   ) -> Iterator[tuple[int, bytes | LongLine]]:
    """``(line number, raw line)`` of every non-blank line of a JSON Lines file, unparsed (a
    UTF-8 byte-order mark at the start removed), with the same file-level checks and errors as
    :func:`iter_records`; :func:`parse_line` turns a line into its record (raising
    :class:`LineError`). A line longer than ``max_record_bytes`` comes as a :class:`LongLine`,
    which :func:`parse_line` refuses. ``position`` follows the bytes of the file read."""
    path = Path(path)
    _, compression = _kind(path)
    if not path.is_file():
        raise PacktrainError(f"{path}: no such file; check the path")
    errors = _decompress_errors()
    what = f"{compression} " if compression else ""
    with _open_checked(path, compression, errors, what) as stream:
        if position is not None:
            position.tell = _disk_tell(stream)
        yield from _nonblank_lines(path, stream, errors, what, max_record_bytes)


def _disk_tell(stream: IO[bytes]) -> Callable[[], int]:
    """The position in the file on disk of a stream of :func:`_open_stream`: the stream's own
    for a plain file, the compressed file's (read ahead of the lines by the decompressor's
    buffer) for gzip and zstd."""
    fileobj = getattr(getattr(stream, "raw", None), "fileobj", None)
    return stream.tell if fileobj is None else fileobj.tell


def _whole_json_object_hint(path: Path, stream: IO[bytes], first: bytes, errors) -> None:
    """A .json file whose first line is not a complete object: if the whole file is one JSON
    object (e.g. {"data": [...]}), say so instead of reporting line 1 as broken."""
    try:
        data = json.loads(first + stream.read())
    except (ValueError, RecursionError, *errors):
        return
    if isinstance(data, dict):
        keys = ", ".join(list(map(str, data))[:8])
        raise PacktrainError(f"{path}: the file is one JSON object (keys: {keys}), not an array "
                             f"of records or JSON Lines; extract the records into a JSON array or "
                             f"JSONL file (e.g. jq -c '.KEY[]' {path.name} > data.jsonl)")


def _iter_json_array(path: Path, stream: IO[bytes], errors, what: str,
                     position: ReadPosition | None = None) -> Iterator[tuple[str, dict]]:
    try:
        data = stream.read()
    except errors as e:
        raise PacktrainError(f"{path}: corrupt or truncated {what}file ({e}); re-create or "
                             f"re-download it") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if b"\x00" in data:
        line = data.count(b"\n", 0, data.index(b"\x00")) + 1
        raise PacktrainError(f"{path}:{line}: NUL byte; the file looks binary or corrupt (it is "
                             f"not UTF-8 JSON); fix or re-create it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PacktrainError(f"{path}:{line}: invalid UTF-8 ({data[e.start:e.start + 4]!r}); "
                             f"re-encode the file as UTF-8") from None
    del data
    try:
        array = json.loads(text)
    except json.JSONDecodeError as e:
        raise PacktrainError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}; "
                             f"fix the file (a JSON array of objects) or convert it to "
                             f"JSONL") from None
    except RecursionError:
        raise PacktrainError(f"{path}: invalid JSON: nested too deeply") from None
    del text
    if not isinstance(array, list):  # pragma: no cover - starts with '['
        raise PacktrainError(f"{path}: expected a JSON array of objects")
    if not array:
        raise PacktrainError(f"{path}: no records (the JSON array is empty); remove it from the "
                             f"inputs")
    i, n = 0, len(array)
    if position is not None:  # the share of the records read: the array is parsed whole
        size = path.stat().st_size
        position.tell = lambda: size * i // n
    for i, record in enumerate(array, 1):
        if not isinstance(record, dict):
            raise PacktrainError(f"{path}:record {i}: expected a JSON object, got "
                                 f"{json_type(record)}; every array element must be a record")
        array[i - 1] = None  # let records go as they are consumed
        yield f"{path}:record {i}", record


def _iter_parquet(path: Path, position: ReadPosition | None = None
                  ) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except (pa.ArrowException, OSError) as e:
        raise PacktrainError(f"{path}: not a readable Parquet file ({e}); re-create or "
                             f"re-download it") from None
    if pf.metadata.num_rows == 0:
        raise PacktrainError(f"{path}: no records (the Parquet file has no rows); remove it from "
                             f"the inputs")
    n, rows = 0, pf.metadata.num_rows
    if position is not None:  # the share of the rows read
        size = path.stat().st_size
        position.tell = lambda: size * n // rows
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                n += 1
                yield f"{path}:record {n}", record
    except (pa.ArrowException, OSError) as e:
        raise PacktrainError(f"{path}:record {n + 1}: corrupt Parquet data ({e}); re-create or "
                             f"re-download the file") from None


# ---------------------------------------------------------------- formats

FORMATS = ("alpaca", "messages", "text", "preference")


def record_format(record: dict) -> str | None:
    """The format one record looks like, or None. ``chosen`` + ``rejected`` make a preference
    record whatever else it holds (its prompt may be ``messages``)."""
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record or "conversations" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def detect_format(records: list[dict], where: str) -> str:
    """Tell the format from the first few records (up to 8 are looked at):
    ``messages`` (``messages: [{role, content}]`` or ShareGPT ``conversations: [{from, value}]``),
    ``alpaca`` (``instruction`` and ``output``), ``text`` (``text``), ``preference``
    (``chosen`` and ``rejected``, :mod:`pack.templates.preference`). ``where`` names the
    source in errors. Records that fit no format (a field missing) do not count: the renderer
    reports them. Raises PacktrainError listing the keys found when none fits, or when two of
    the first records fit different formats."""
    if not records:
        raise PacktrainError(f"{where}: no records to tell the format from")
    found = [(record_format(r) if isinstance(r, dict) else None) for r in records[:8]]
    known = [(i, f) for i, f in enumerate(found, 1) if f is not None]
    if not known:
        keys = sorted(records[0]) if isinstance(records[0], dict) else []
        raise PacktrainError(
            f"{where}: cannot tell the record format from its keys "
            f"[{', '.join(map(str, keys))}]; expected 'messages' (or ShareGPT 'conversations'), "
            f"'instruction' + 'output' (alpaca), 'text' or 'chosen' + 'rejected' (preference); "
            f"rename the fields or pass --format")
    first_i, first = known[0]
    for i, fmt in known[1:]:
        if fmt != first:  # records with a field missing are left to the renderer's errors
            raise PacktrainError(
                f"{where}: record {first_i} looks like {first} but record {i} like {fmt}; use "
                f"one format per file or pass --format")
    return first
