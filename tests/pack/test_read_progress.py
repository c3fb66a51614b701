"""pack-build's reading bar (pack.progress): every task carries how far the reading had got in
bytes of the inputs' total size, for every kind of input, whole builds and partitions; the
``tokenize`` bar of a real build reaches that total with records and tokens/s; --quiet shows
no bar."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tqdm import tqdm

from pack.build import build
from pack.tasks import read_sources, read_tasks, source_info


@pytest.fixture(scope="module")
def records(chat_jsonl) -> list[dict]:
    return [json.loads(line) for line in chat_jsonl.read_text().splitlines()[:90]]


def _hf_dir(d, records):
    """A save_to_disk-style directory of two Arrow stream files (written with pyarrow)."""
    d.mkdir()
    names = []
    for k, part in enumerate((records[:50], records[50:])):
        name = f"data-0000{k}-of-00002.arrow"
        table = pa.Table.from_pylist(part)
        with pa.ipc.new_stream(str(d / name), table.schema) as w:
            for batch in table.to_batches(max_chunksize=7):
                w.write_batch(batch)
        names.append({"filename": name})
    (d / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "x"}))
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, records) -> dict:
    d = tmp_path_factory.mktemp("progress")
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    paths = {"jsonl": d / "a.jsonl", "jsonl.gz": d / "a.jsonl.gz", "jsonl.zst": d / "a.jsonl.zst",
             "json": d / "a.json", "parquet": d / "a.parquet"}
    paths["jsonl"].write_bytes(lines)
    paths["jsonl.gz"].write_bytes(gzip.compress(lines))
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(lines))
    paths["json"].write_text(json.dumps(records, indent=1))
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"], row_group_size=20)
    paths["hf"] = _hf_dir(d / "hf", records)
    return paths


def _ends(paths, **kw) -> tuple[list[tuple[int, int, str]], list[int]]:
    """(task end, records, kind) of every task, and each input's end in the total."""
    sources = [source_info(p) for p in paths]
    if "n_parts" in kw:
        _, stream = read_tasks(paths, sources, "messages", False, Counter(), None, **kw)
    else:  # (--format auto would read the first 256 records ahead to detect it)
        _, stream = read_sources(paths, "messages", False, Counter(), sources, chunk=16, **kw)
    tasks = [(t.end, len(t.payload), t.kind) for t in stream]
    bounds, total = [], 0
    for s in sources:
        total += s["bytes"]
        bounds.append(total)
    return tasks, bounds


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "jsonl.zst", "json", "parquet", "hf"])
def test_task_ends_advance_to_the_file_size(inputs, kind):
    tasks, (total,) = _ends([inputs[kind]])
    ends = [e for e, _, _ in tasks]
    assert len(tasks) == 6  # 90 records, 16 a task
    assert ends == sorted(ends) and ends[-1] == total
    if not kind.endswith(("gz", "zst")):  # (these ~100 KB are decompressed at the first read)
        assert 0 < ends[0] and len(set(ends)) == 6  # it moves inside the file
    if kind in ("json", "parquet"):  # the share of the records read
        assert ends[:-1] == [total * 16 * k // 90 for k in range(1, 6)]


@pytest.mark.parametrize("suffix, compress", [
    ("gz", gzip.compress), ("zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_compressed_positions_are_the_compressed_files(tmp_path, suffix, compress):
    """A 4 MB file: its tasks end at positions in the compressed file (read ahead by the
    decompressor's 1 MiB buffer), the last at its size."""
    rng = np.random.default_rng(0)
    text = "".join(json.dumps({"text": rng.bytes(1500).hex()}) + "\n" for _ in range(1400))
    path = tmp_path / f"big.jsonl.{suffix}"
    path.write_bytes(compress(text.encode()))
    _, stream = read_sources([path], "text", False, Counter(), [source_info(path)], chunk=100)
    ends = [t.end for t in stream]
    size = path.stat().st_size
    assert ends == sorted(ends) and ends[-1] == size
    assert len({e for e in ends if 0 < e < size}) >= 3


def test_several_inputs_and_partitions_count_the_whole_corpus(inputs):
    """Ends run across the inputs (each one's last task ends at its place in the total); a
    partition's tasks and the other partitions' ("count"/"skip") advance the same positions."""
    paths = [inputs[k] for k in ("jsonl.gz", "parquet", "hf", "jsonl")]
    tasks, bounds = _ends(paths, chunk_bytes=None)
    ends = [e for e, _, _ in tasks]
    assert ends == sorted(ends) and ends[-1] == bounds[-1]
    assert set(bounds) <= set(ends)  # every input's last task ends exactly at its boundary
    part0, _ = _ends(paths, n_parts=2, part=0)
    part1, _ = _ends(paths, n_parts=2, part=1)
    assert [e for e, _, _ in part0] == [e for e, _, _ in part1]
    assert part0[-1][0] == bounds[-1]
    assert {k for _, _, k in part1} == {"raw", "count", "rec", "skip"}


def _tokenize_lines(err: str) -> list[str]:
    return [s for s in err.replace("\r", "\n").splitlines() if s.startswith("tokenize:")]


def test_build_bar_counts_bytes_to_the_total(inputs, records, tokenizer_dir, tmp_path, capsys):
    small = tmp_path / "small.json"
    small.write_text(json.dumps(records[:20]))
    paths = [small, inputs["jsonl.gz"]]
    total = sum(p.stat().st_size for p in paths)
    args = dict(inputs=[str(p) for p in paths], tokenizer=str(tokenizer_dir), max_length=1024,
                workers=1)
    m = build(dict(args, out=str(tmp_path / "a")))
    lines = _tokenize_lines(capsys.readouterr().err)
    assert lines, "no tokenize bar"
    size = tqdm.format_sizeof(total, divisor=1024)
    last = lines[-1]
    assert "100%" in last and f"| {size}/{size} [" in last, last
    assert f"{m['stats']['records']:,} rec" in last and "tok/s" in last, last
    assert any("%|" in s and "<" in s for s in lines)  # tqdm's ETA column

    build(dict(args, inputs=[str(small)], out=str(tmp_path / "q"), quiet=True))
    assert _tokenize_lines(capsys.readouterr().err) == []
