"""pack.sources: inputs, every container and compression, every bad input, skip counting,
format detection; records from real chitchat data."""

from __future__ import annotations

import collections
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from pack.errors import PacktrainError
from pack.sources import detect_format, expand_inputs, iter_records
from pack.templates import NothingToTrain, Renderer


def records_of(path, **kw):
    return [rec for _, rec in iter_records(path, **kw)]


def error_of(path, **kw) -> str:
    with pytest.raises(PacktrainError) as e:
        list(iter_records(path, **kw))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def chat_records(chat_jsonl):
    return records_of(chat_jsonl)


# ---------------------------------------------------------------- inputs

def test_expand_inputs_order_globs_duplicates(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.parquet", "sub/d.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    t = str(tmp_path)
    got = expand_inputs([f"{t}/c.parquet", f"{t}/*.jsonl", f"{t}/a.jsonl", f"{t}/**/*.jsonl"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == \
        ["c.parquet", "a.jsonl", "b.jsonl", "sub/d.jsonl"]
    with pytest.raises(PacktrainError, match=r"\*\.json: no file matches this pattern"):
        expand_inputs([f"{t}/*.json"])
    with pytest.raises(PacktrainError, match="missing.jsonl: no such file"):
        expand_inputs([f"{t}/a.jsonl", f"{t}/missing.jsonl"])
    with pytest.raises(PacktrainError, match="is a directory"):
        expand_inputs([f"{t}/sub"])
    with pytest.raises(PacktrainError, match="no input files"):
        expand_inputs([])


# ---------------------------------------------------------------- round trips

def test_jsonl_where_and_blank_lines(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n\n   \n{"text": "b"}\r\n{"text": "c"}')  # no final newline
    got = list(iter_records(p))
    assert got == [(f"{p}:1", {"text": "a"}), (f"{p}:4", {"text": "b"}),
                   (f"{p}:5", {"text": "c"})]
    p.write_bytes(b"\xef\xbb\xbf" + b'{"text": "bom"}\n')
    assert records_of(p) == [{"text": "bom"}]


def test_compressed_json_parquet_round_trips(tmp_path, chat_jsonl, chat_records):
    body = chat_jsonl.read_bytes()
    files = {
        "c.jsonl.gz": gzip.compress(body),
        "c.JSONL.GZ": gzip.compress(body),
        "c.jsonl.zst": zstandard.ZstdCompressor().compress(body),
        # two zstd frames back to back, as `cat a.zst b.zst` gives
        "c2.ndjson.zstd": (zstandard.ZstdCompressor().compress(body[:len(body) // 3 + 7]) +
                           zstandard.ZstdCompressor().compress(body[len(body) // 3 + 7:])),
        "c.json": json.dumps(chat_records, indent=1).encode(),
        "lines.json": body,  # JSON Lines in a .json file
        "c.json.gz": gzip.compress(json.dumps(chat_records).encode()),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert records_of(tmp_path / name) == chat_records, name
    pq.write_table(pa.Table.from_pylist(chat_records), tmp_path / "c.parquet",
                   row_group_size=37)  # several row groups, read in batches
    got = list(iter_records(tmp_path / "c.parquet"))
    assert [r for _, r in got] == chat_records
    assert got[0][0] == f"{tmp_path / 'c.parquet'}:record 1"
    assert got[-1][0] == f"{tmp_path / 'c.parquet'}:record {len(chat_records)}"
    arr = list(iter_records(tmp_path / "c.json"))
    assert arr[1][0] == f"{tmp_path / 'c.json'}:record 2"


def test_streams_lazily(tmp_path):
    """Records come before a later broken line is read: JSONL is not loaded whole."""
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n' * 1000 + "{broken\n")
    it = iter_records(p)
    assert next(it) == (f"{p}:1", {"text": "a"})
    with pytest.raises(PacktrainError, match=r"x\.jsonl:1001: invalid JSON"):
        list(it)


# ---------------------------------------------------------------- bad inputs

def test_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n')
    msg = error_of(p)
    assert msg.startswith(f"{p}:3: invalid JSON") and "--skip-invalid" in msg


@pytest.mark.parametrize("line,kind", [("[1, 2]", "array"), ('"hi"', "string"), ("3", "number"),
                                       ("null", "null")])
def test_line_not_an_object(tmp_path, line, kind):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "a"}\n' + line + "\n")
    assert f"{p}:2: expected a JSON object per line, got {kind}" in error_of(p)


def test_invalid_utf8_and_nul(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    msg = error_of(p)
    assert msg.startswith(f"{p}:2: invalid UTF-8 at byte 14") and "re-encode" in msg
    p.write_bytes(b'{"text": "a"}\n{"text": "a\x00b"}\n')
    assert error_of(p).startswith(f"{p}:2: NUL byte at column 12")
    p.write_bytes('{"text": "a"}\n'.encode("utf-16"))
    assert "UTF-16" in error_of(p)


def test_empty_files(tmp_path):
    for name, data in (("e.jsonl", b""), ("w.jsonl", b"\n  \n\n"), ("e.json", b"[]"),
                       ("e.jsonl.gz", gzip.compress(b"")),
                       ("e.jsonl.zst", zstandard.ZstdCompressor().compress(b"\n"))):
        (tmp_path / name).write_bytes(data)
        assert "no records" in error_of(tmp_path / name), name
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    assert "no records" in error_of(tmp_path / "e.parquet")


def test_unsupported_and_misnamed(tmp_path):
    for name in ("x.csv", "x.txt", "x.gz", "x.parquet.gz", "noext"):
        (tmp_path / name).write_text("a,b\n")
        assert "unsupported file type; expected .jsonl" in error_of(tmp_path / name), name
    (tmp_path / "g.jsonl").write_bytes(gzip.compress(b'{"a": 1}\n'))
    assert "is gzip data, not text; name it *.jsonl.gz" in error_of(tmp_path / "g.jsonl")
    (tmp_path / "z.jsonl").write_bytes(zstandard.ZstdCompressor().compress(b'{"a": 1}\n'))
    assert "is zstd data" in error_of(tmp_path / "z.jsonl")
    assert "no such file" in error_of(tmp_path / "gone.jsonl")


def test_corrupt_compressed(tmp_path, chat_jsonl):
    body = chat_jsonl.read_bytes() * 3
    gz = gzip.compress(body)
    (tmp_path / "t.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    msg = error_of(tmp_path / "t.jsonl.gz")
    assert "corrupt or truncated gzip" in msg and "t.jsonl.gz:" in msg
    (tmp_path / "n.jsonl.gz").write_bytes(b"\x1f\x8b not gzip at all")
    assert "corrupt or unreadable gzip" in error_of(tmp_path / "n.jsonl.gz")
    zs = zstandard.ZstdCompressor().compress(body)
    (tmp_path / "t.jsonl.zst").write_bytes(zs[: len(zs) - 5])
    assert "truncated zstd frame" in error_of(tmp_path / "t.jsonl.zst")
    (tmp_path / "n.jsonl.zst").write_bytes(b"this is not zstd")
    assert "zstd" in error_of(tmp_path / "n.jsonl.zst")
    (tmp_path / "n.parquet").write_bytes(b"PAR1 garbage")
    assert "not a readable Parquet file" in error_of(tmp_path / "n.parquet")


def test_json_array_errors(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('[\n {"text": "a"},\n 7\n]')
    assert error_of(p).startswith(f"{p}:record 2: expected a JSON object, got number")
    p.write_text('[\n {"text": "a"},\n {"text": }\n]')
    assert error_of(p).startswith(f"{p}:3: invalid JSON")
    p.write_bytes(b'[\n {"text": "a"},\n {"text": "\xff"}\n]')
    assert error_of(p).startswith(f"{p}:3: invalid UTF-8")
    p.write_text(json.dumps({"data": [{"text": "a"}]}, indent=2))
    assert "the file is one JSON object (keys: data)" in error_of(p)


def test_skip_invalid_counts(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join([
        b'{"text": "ok1"}',
        b'{"text": broken}',
        b'[1]',
        b'{"text": "\xc3\x28"}',
        b'{"text": "ok2"}',
        b'{"text": "nul\x00"}',
        b'',
        b'{"text": "ok3"',
        b'{"text": "ok4"}',
    ]) + b"\n")
    skipped = collections.Counter()
    got = list(iter_records(p, skip_invalid=True, skipped=skipped))
    assert got == [(f"{p}:1", {"text": "ok1"}), (f"{p}:5", {"text": "ok2"}),
                   (f"{p}:9", {"text": "ok4"})]
    assert skipped == {"invalid-json": 2, "not-an-object": 1, "invalid-utf8": 1, "nul-byte": 1}
    assert records_of(p, skip_invalid=True) == [{"text": "ok1"}, {"text": "ok2"},
                                                {"text": "ok4"}]  # no counter: still skips
    # a file of only bad lines is not "empty": it yields nothing and counts them
    (tmp_path / "allbad.jsonl").write_text("nope\nnope\n")
    c = collections.Counter()
    assert records_of(tmp_path / "allbad.jsonl", skip_invalid=True, skipped=c) == []
    assert c == {"invalid-json": 2}


def test_field_errors_with_where(tmp_path, tokenizer_dir):
    """Wrong types and missing fields: the Renderer names the field, the caller the line."""
    from pack.tokenize.loading import load_tokenizer

    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"instruction": "a", "output": "b"},
        {"instruction": "a", "output": 5},
        {"instruction": "a"},
        {"instruction": "a", "output": ""},
    ]) + "\n")
    items = list(iter_records(p))
    r = Renderer(load_tokenizer(tokenizer_dir), detect_format([x for _, x in items], str(p)))
    msgs = [f"{where}: {res}" if isinstance(res, Exception) else None
            for (where, _), res in zip(items, r.encode_batch([x for _, x in items]))]
    assert msgs[0] is None
    assert msgs[1] == f"{p}:2: field output: expected a string, got number"
    assert msgs[2] == f"{p}:3: field output: missing"
    assert msgs[3].startswith(f"{p}:4: field output: empty response")
    assert isinstance(r.encode_batch([items[3][1]])[0], NothingToTrain)


# ---------------------------------------------------------------- formats

def test_detect_format(chat_records, alpaca_jsonl):
    assert detect_format(chat_records[:5], "c") == "messages"
    assert detect_format(records_of(alpaca_jsonl)[:5], "a") == "alpaca"
    assert detect_format([{"conversations": [{"from": "human", "value": "x"}]}], "s") \
        == "messages"
    assert detect_format([{"text": "x", "meta": 1}], "t") == "text"
    assert detect_format([{"instruction": "i", "output": "o", "text": "t"}], "t") == "alpaca"
    # a record with a field missing does not decide (the renderer reports it)
    assert detect_format([{"instruction": "i"}, {"instruction": "i", "output": "o"}], "t") \
        == "alpaca"
    with pytest.raises(PacktrainError, match=r"f.jsonl: cannot tell the record format from its "
                                             r"keys \[prompt, response\]"):
        detect_format([{"prompt": "p", "response": "r"}], "f.jsonl")
    with pytest.raises(PacktrainError, match="record 1 looks like text but record 2 like alpaca"):
        detect_format([{"text": "x"}, {"instruction": "i", "output": "o"}], "m")
    with pytest.raises(PacktrainError, match="no records"):
        detect_format([], "m")
