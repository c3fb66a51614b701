"""Small file helpers every stage shares: SHA-256 of a file (or while writing it), durable
renames and atomic writes (temporary name, fsync, rename)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class HashingSink:
    """A write-only file that hashes what it writes on a thread of its own (hashlib lets go of
    the GIL), so a shard's SHA-256 costs no second read and overlaps the gathering of the next
    packs. :meth:`hexdigest` after :meth:`close` is ``file_sha256`` of the file."""

    def __init__(self, path: str | os.PathLike, backlog: int = 16):
        import queue
        import threading

        self._f = open(path, "wb")
        self._h = hashlib.sha256()
        # bounded (Arrow writes a batch's buffers, ~4 MB at most each): if hashing lags, writing
        # waits instead of memory growing
        self._q: Any = queue.Queue(maxsize=backlog)
        self._pos = 0
        self._t = threading.Thread(target=self._hash, name="shard-sha256", daemon=True)
        self._t.start()

    def _hash(self) -> None:
        while (block := self._q.get()) is not None:
            self._h.update(block)

    def write(self, data) -> int:
        n = self._f.write(data)
        self._q.put(bytes(data))  # a copy: the caller may reuse its buffer
        self._pos += len(data)
        return n

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    @property
    def closed(self) -> bool:
        return self._f.closed

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self._f.closed:
            try:
                self._f.close()
            finally:
                self._q.put(None)
                self._t.join()

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable; ignored where directories cannot be opened (some platforms)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name, fsync, rename: readers see the old file or the whole new one.
    The temporary name is per process and thread: two threads writing the same file (a shard's
    verified marker from the prefetch thread and the reader) must not rename each other's."""
    import threading

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
