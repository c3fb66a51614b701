"""The temporary on-disk sample store of a build: every kept sample (``input_ids``,
``labels``) appended as rows of an Arrow IPC file in the output directory while results come
back from the workers, then memory-mapped to gather each pack's samples. Only per-sample
lengths and record numbers stay in memory, so a build's memory does not grow with the corpus.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import format as fmt_mod
from .format import IGNORE_INDEX

SAMPLE_SCHEMA = pa.schema([pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
                           pa.field("labels", pa.list_(pa.int32()), nullable=False)])


class SampleStore:
    """The temporary Arrow file: one row per kept sample, written as chunks come back, then
    memory-mapped for gathering packs. Pages already gathered are released from the process
    (MADV_DONTNEED) every few packs, so resident memory does not grow with the corpus."""

    # Each sample read maps the pages around it too (the kernel's fault-around, 64 KB by
    # default, which MADV_RANDOM does not switch off everywhere): release every so many samples.
    RELEASE_EVERY = 128  # samples gathered between releases: at most ~16 MB mapped

    def __init__(self, path: Path):
        self.path = path
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, SAMPLE_SCHEMA)
        self._mm = None

    def append(self, lengths: np.ndarray, ids: np.ndarray, labels: np.ndarray) -> None:
        if len(lengths) == 0:
            return
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        off = fmt_mod.numpy_to_arrow(offsets, pa.int32())
        batch = pa.RecordBatch.from_arrays(
            [pa.ListArray.from_arrays(off, fmt_mod.numpy_to_arrow(ids, pa.int32())),
             pa.ListArray.from_arrays(off, fmt_mod.numpy_to_arrow(labels, pa.int32()))],
            schema=SAMPLE_SCHEMA)
        self._writer.write_batch(batch)

    def finish_writing(self) -> None:
        self._writer.close()
        self._sink.close()

    def open(self, n_samples: int) -> None:
        """Map the file; compute each sample's element offset (in int32 units from the start of
        the file) of its input_ids and of its labels."""
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(self._mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            try:  # packs gather samples from all over the file: no readahead, no fault-around
                self._mm.madvise(mmap.MADV_RANDOM)
            except (OSError, ValueError):
                pass
        buf = pa.py_buffer(self._mm)
        reader = pa.ipc.open_file(pa.BufferReader(buf))
        base = buf.address
        self.ids_at = np.zeros(n_samples, dtype=np.int64)
        self.labels_at = np.zeros(n_samples, dtype=np.int64)
        k = 0
        for b in range(reader.num_record_batches):
            rb = reader.get_batch(b)
            starts = {}
            for c in ("input_ids", "labels"):
                col = rb.column(c)
                vals = col.values
                addr = vals.buffers()[1].address - base
                assert addr % 4 == 0, "Arrow buffers are 8-byte aligned"
                # offsets straight from the buffer (Array.to_numpy would import pandas)
                off = np.frombuffer(col.buffers()[1], dtype=np.int32)[
                    col.offset:col.offset + len(col) + 1]
                starts[c] = addr // 4 + vals.offset + off[:-1]
            m = rb.num_rows
            self.ids_at[k:k + m] = starts["input_ids"]
            self.labels_at[k:k + m] = starts["labels"]
            k += m
            del rb
        assert k == n_samples, (k, n_samples)
        del reader, buf
        self.flat = np.frombuffer(self._mm, dtype=np.int32, count=len(self._mm) // 4)
        self.release()  # reading every batch's metadata mapped a page or more per batch

    def gather(self, idx: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                     np.ndarray]:
        """Tokens and labels of samples ``idx`` back to back, and the samples' boundaries in
        them (int64, from 0)."""
        lens = lengths[idx].astype(np.int64)
        cu = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        ids = np.empty(int(cu[-1]), dtype=np.int32)
        labels = np.empty(int(cu[-1]), dtype=np.int32)
        step = self.RELEASE_EVERY
        for s in range(0, len(idx), step):  # a record batch holds thousands of samples
            e = min(s + step, len(idx))
            a, z = int(cu[s]), int(cu[e])
            ramp = np.arange(a, z, dtype=np.int64)
            ids[a:z] = self.flat[np.repeat(self.ids_at[idx[s:e]] - cu[s:e], lens[s:e]) + ramp]
            labels[a:z] = self.flat[np.repeat(self.labels_at[idx[s:e]] - cu[s:e], lens[s:e])
                                    + ramp]
            self._since_release += e - s
            if self._since_release >= step:
                self.release()
        labels[cu[:-1]] = IGNORE_INDEX
        return ids, labels, cu

    def release(self) -> None:
        self._since_release = 0
        if self._mm is not None and hasattr(self._mm, "madvise"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        for name in ("flat", "ids_at", "labels_at"):
            self.__dict__.pop(name, None)
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; the unlink below is enough
                pass
            self._mm = None
        try:
            if not self._sink.closed:
                self._writer.close()
                self._sink.close()
        except Exception:
            pass
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
