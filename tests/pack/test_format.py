"""The packed-dataset contract: pack.format against schemas/ and against a real build."""

from __future__ import annotations

import copy
import json
import re

import jsonschema
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings, strategies as st

from pack import format as F
from pack.build import build

ARROW_TYPES = {"int8": pa.int8(), "int32": pa.int32(), "int64": pa.int64()}


def arrow_type(text: str) -> pa.DataType:
    m = re.fullmatch(r"list<(\w+)>", text)
    assert m, f"unknown type {text} in shard.schema.json"
    return pa.list_(ARROW_TYPES[m.group(1)])


def random_pack(rng: np.random.Generator, max_length: int = 64, vocab: int = 1000):
    n = int(rng.integers(1, 5))
    lens = rng.integers(1, max_length // n + 1, size=n)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ids = rng.integers(0, vocab, size=int(cu[-1])).astype(np.int32)
    labels = np.where(rng.random(len(ids)) < 0.5, ids, F.IGNORE_INDEX).astype(np.int32)
    labels[cu[:-1]] = F.IGNORE_INDEX
    return ids, labels, cu, rng.integers(0, 10_000, size=n).astype(np.int64)


def minimal_manifest(shards: list[dict], packs: int, tokens: int, max_length: int = 64,
                     vocab: int = 1000, samples: int = 0, label_tokens: int = 0) -> dict:
    return {
        "format": F.FORMAT_NAME, "format_version": F.FORMAT_VERSION,
        "created_by": {"packtrain": "test"}, "arguments": {}, "max_length": max_length,
        "tokenizer": {"path": "t", "vocab_size": vocab, "fingerprint": "sha256:" + "0" * 64},
        "template": {"name": "none", "format": "text", "train_on_prompt": True},
        "sources": [{"path": "x.jsonl", "sha256": "0" * 64, "records": samples}],
        "packing": {"strategy": "bfd", "seed": 0, "overlong": "truncate"},
        "stats": {"records": samples, "samples_packed": samples, "dropped": {}, "truncated": 0,
                  "tokens": tokens, "label_tokens": label_tokens, "packs": packs,
                  "lower_bound": -(-tokens // max_length), "fill": 0.5},
        "shards": shards,
    }


def write_dataset(tmp_path, packs, **writer_kw) -> tuple[dict, list[F.ShardInfo]]:
    w = F.ShardWriter(tmp_path, **writer_kw)
    for p in packs:
        w.add(*p)
    infos = w.close()
    m = minimal_manifest([s.to_json() for s in infos], len(packs),
                         sum(len(p[0]) for p in packs),
                         samples=sum(len(p[3]) for p in packs),
                         label_tokens=sum(int((p[1] != F.IGNORE_INDEX).sum()) for p in packs))
    F.write_manifest(tmp_path, m)
    return m, infos


# ---------------------------------------------------------------- writer / reader

@pytest.mark.parametrize("kw, expect_shards", [
    (dict(max_packs=3, max_bytes=None, batch_packs=2), 4),   # 10 packs by 3
    (dict(max_packs=None, max_bytes=2000, batch_packs=4), None),
    (dict(max_packs=None, max_bytes=None), 1),
])
def test_shardwriter_roundtrip_and_rollover(tmp_path, kw, expect_shards):
    rng = np.random.default_rng(0)
    packs = [random_pack(rng) for _ in range(10)]
    m, infos = write_dataset(tmp_path, packs, **kw)
    if expect_shards is not None:
        assert len(infos) == expect_shards
    else:
        assert len(infos) > 1  # rolled over on bytes
    assert [s.path for s in infos] == [F.shard_name(i) for i in range(len(infos))]
    assert sum(s.packs for s in infos) == 10
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary shard left behind
    for s in infos:
        assert (tmp_path / s.path).stat().st_size == s.bytes
        assert F.file_sha256(tmp_path / s.path) == s.sha256
    ds = F.PackedDataset(tmp_path)
    assert len(ds) == 10
    for i, (ids, labels, cu, si) in enumerate(packs):
        row = ds[i]
        np.testing.assert_array_equal(row["input_ids"], ids)
        np.testing.assert_array_equal(row["labels"], labels)
        np.testing.assert_array_equal(row["cu_seqlens"], cu)
        np.testing.assert_array_equal(row["sample_index"], si)
        np.testing.assert_array_equal(row["position_ids"], F.positions_from_cu(cu))
        assert F.check_pack(row, 64, 1000) is None
    np.testing.assert_array_equal(ds.lengths(), [len(p[0]) for p in packs])
    assert F.verify(tmp_path) == []


def test_shardwriter_same_packs_same_bytes(tmp_path):
    rng = np.random.default_rng(1)
    packs = [random_pack(rng) for _ in range(7)]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _, ia = write_dataset(a, packs, max_packs=4)
    _, ib = write_dataset(b, packs, max_packs=4)
    assert [s.sha256 for s in ia] == [s.sha256 for s in ib]


@pytest.mark.parametrize("kw", [
    dict(max_packs=3, max_bytes=None, batch_packs=2),
    dict(max_packs=None, max_bytes=2000, batch_packs=4),
    dict(max_packs=None, max_bytes=None, batch_packs=3),
    dict(max_packs=5, max_bytes=1500, batch_packs=256),
])
def test_batches_as_planned_give_the_same_bytes_as_pack_by_pack(tmp_path, kw):
    """pack-build writes each record batch in one go (plan, add_batch); the shards are the
    bytes that adding the same packs one by one writes."""
    rng = np.random.default_rng(4)
    packs = [random_pack(rng) for _ in range(23)]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _, one_by_one = write_dataset(a, packs, **kw)
    w = F.ShardWriter(b, **kw)
    pack_samples = np.array([len(p[3]) for p in packs])
    plan = w.plan(np.array([len(p[0]) for p in packs]), pack_samples)
    assert [z for _, z, _ in plan][-1] == len(packs)
    assert all(z - s <= kw["batch_packs"] for s, z, _ in plan)
    for s, z, close in plan:
        group = packs[s:z]
        lens = np.concatenate([np.diff(p[2]) for p in group])
        cu = np.concatenate([[0], np.cumsum(lens)])
        w.add_batch(np.concatenate([p[0] for p in group]), np.concatenate([p[1] for p in group]),
                    cu, pack_samples[s:z], np.concatenate([p[3] for p in group]), close)
    batched = w.close()
    assert [x.to_json() for x in batched] == [x.to_json() for x in one_by_one]
    assert len(batched) == sum(close for _, _, close in plan) + (not plan[-1][2])


def test_hashing_sink_hashes_exactly_what_it_wrote(tmp_path):
    """The digest is the file's even when the caller reuses its buffer and the hash queue is
    full (backlog 1: every write waits for the one before to be hashed)."""
    rng = np.random.default_rng(3)
    sink = F.HashingSink(tmp_path / "f", backlog=1)
    buf = bytearray(1 << 16)
    for n in rng.integers(0, 1 << 16, size=200):
        buf[:n] = rng.bytes(int(n))
        assert sink.write(memoryview(buf)[:n]) == n  # then overwritten by the next round
    sink.write(pa.py_buffer(b"tail"))
    sink.close()
    sink.close()  # twice is harmless
    assert sink.closed
    assert sink.hexdigest() == F.file_sha256(tmp_path / "f")
    assert sink.tell() == (tmp_path / "f").stat().st_size


def test_shardwriter_abort_leaves_no_temp(tmp_path):
    w = F.ShardWriter(tmp_path, batch_packs=1)
    w.add(*random_pack(np.random.default_rng(2)))
    assert list(tmp_path.glob(".shard-*.tmp"))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_positions_from_cu_examples():
    np.testing.assert_array_equal(F.positions_from_cu(np.array([0, 3, 5])), [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(F.positions_from_cu(np.array([0, 1])), [0])
    np.testing.assert_array_equal(F.positions_from_cu(np.array([0])), [])
    assert F.positions_from_cu(np.array([0, 2])).dtype == np.int32


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_positions_from_cu_property(lens):
    cu = np.concatenate([[0], np.cumsum(lens)])
    pos = F.positions_from_cu(cu)
    assert len(pos) == cu[-1]
    expect = np.concatenate([np.arange(n) for n in lens])
    np.testing.assert_array_equal(pos, expect)


# ---------------------------------------------------------------- schemas

def test_schemas_have_no_duplicate_keys():
    """json.loads keeps the last of two equal keys: a merge that left two "$defs" in the
    manifest schema silently dropped one set of definitions."""
    from importlib.resources import files

    def unique(pairs):
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys {keys}"
        return dict(pairs)

    names = [p.name for p in files(F.SCHEMA_PACKAGE).iterdir() if p.name.endswith(".json")]
    assert "manifest.schema.json" in names
    for name in names:
        json.loads(F.read_schema(name), object_pairs_hook=unique)


def test_shard_schema_matches_json_description():
    desc = json.loads(F.read_schema("shard.schema.json"))
    assert desc["format"] == F.FORMAT_NAME and desc["format_version"] == F.FORMAT_VERSION
    cols = desc["columns"]
    assert [c["name"] for c in cols] == F.SHARD_SCHEMA.names == list(F.COLUMNS)
    for c in cols:
        field = F.SHARD_SCHEMA.field(c["name"])
        assert field.type == arrow_type(c["type"]), c["name"]
        assert field.nullable == c["nullable"], c["name"]
    meta = {k.decode(): v.decode() for k, v in F.SHARD_SCHEMA.metadata.items()}
    assert meta == desc["schema_metadata"]
    # format 2.1 (preference): the same columns, then the optional pair columns
    pref = desc["preference"]
    assert pref["format_version"] == F.PREFERENCE_VERSION
    names = [c["name"] for c in cols + pref["columns"]]
    assert names == F.PREFERENCE_SCHEMA.names == list(F.COLUMNS + F.PAIR_COLUMNS)
    for c in pref["columns"]:
        field = F.PREFERENCE_SCHEMA.field(c["name"])
        assert field.type == arrow_type(c["type"]), c["name"]
        assert field.nullable == c["nullable"], c["name"]
    meta = {k.decode(): v.decode() for k, v in F.PREFERENCE_SCHEMA.metadata.items()}
    assert meta == pref["schema_metadata"]
    assert desc["compression"] is None and desc["file_format"] == "arrow-ipc-stream"


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, tokenizer_dir, alpaca_jsonl):
    out = tmp_path_factory.mktemp("fmt") / "ds"
    manifest = build(dict(inputs=[str(alpaca_jsonl)], out=str(out), tokenizer=str(tokenizer_dir),
                          max_length=256, workers=1, quiet=True, shard_size="40"))
    return out, manifest


def test_real_shards_have_exactly_the_schema(small_build):
    out, manifest = small_build
    assert len(manifest["shards"]) > 1
    for s in manifest["shards"]:
        with pa.memory_map(str(out / s["path"])) as src:
            reader = pa.ipc.open_stream(src)
            assert reader.schema.equals(F.SHARD_SCHEMA, check_metadata=True)
            for batch in reader:
                for col in batch.columns:
                    assert col.null_count == 0
        with open(out / s["path"], "rb") as f:
            assert f.read(6) != F.ARROW_FILE_MAGIC  # IPC *stream* format since 2.0


def test_real_manifest_validates_with_jsonschema(small_build):
    out, _ = small_build
    schema = json.loads(F.read_schema("manifest.schema.json"))
    manifest = json.loads((out / F.MANIFEST).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(manifest, schema, cls=jsonschema.Draft202012Validator)
    bad = copy.deepcopy(manifest)
    bad["stats"]["fill"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)


def test_newer_major_version_refused(small_build, tmp_path):
    out, manifest = small_build
    m = copy.deepcopy(manifest)
    m["format_version"] = f"{F.FORMAT_MAJOR + 1}.0"
    (tmp_path / F.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(F.FormatError, match=rf"{F.FORMAT_MAJOR + 1}\.0") as e:
        F.read_manifest(tmp_path)
    assert e.value.rule == "format-version"
    # a newer minor is refused too (since 2.1: a minor adds meaning an older reader misreads)
    m["format_version"] = f"{F.FORMAT_MAJOR}.{F.FORMAT_MINOR + 1}"
    (tmp_path / F.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(F.FormatError, match=r"newer than this packtrain reads .*upgrade"):
        F.read_manifest(tmp_path)
    for older in ("1.0", "2.0", f"{F.FORMAT_MAJOR}.{F.FORMAT_MINOR}"):  # older ones are read
        m["format_version"] = older
        (tmp_path / F.MANIFEST).write_text(json.dumps(m))
        assert F.read_manifest(tmp_path)["format_version"] == older


def test_format_1_file_encoded_shards_still_read(tmp_path):
    """Format 1.x wrote the Arrow IPC *file* encoding; a 2.x reader must read those datasets."""
    rng = np.random.default_rng(5)
    packs = [random_pack(rng) for _ in range(4)]
    m, infos = write_dataset(tmp_path, packs)
    for info in infos:
        path = tmp_path / info.path
        table = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all()
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        assert path.read_bytes()[:6] == F.ARROW_FILE_MAGIC
    m = F.read_manifest(tmp_path)
    for s, info in zip(m["shards"], infos):
        path = tmp_path / info.path
        s.update(bytes=path.stat().st_size, sha256=F.file_sha256(path))
    m["format_version"] = "1.0"
    F.write_manifest(tmp_path, m)
    ds = F.PackedDataset(tmp_path)
    for i, p in enumerate(packs):
        np.testing.assert_array_equal(ds[i]["input_ids"], p[0])
    assert F.verify(tmp_path) == []


def test_unknown_extra_columns_ignored(tmp_path):
    rng = np.random.default_rng(3)
    packs = [random_pack(rng) for _ in range(3)]
    _, infos = write_dataset(tmp_path, packs)
    path = tmp_path / infos[0].path
    table = pa.ipc.open_stream(pa.BufferReader(path.read_bytes())).read_all()  # not mapped:
    # the file is rewritten below
    extra = table.append_column("quality", pa.array([0.5, 0.1, 0.9]))
    extra = extra.replace_schema_metadata(F.SHARD_SCHEMA.metadata)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, extra.schema) as w:
        w.write_table(extra)
    m = F.read_manifest(tmp_path)
    m["shards"][0].update(bytes=path.stat().st_size, sha256=F.file_sha256(path))
    F.write_manifest(tmp_path, m)
    ds = F.PackedDataset(tmp_path)
    assert set(ds[0]) == set(F.COLUMNS)
    np.testing.assert_array_equal(ds[2]["input_ids"], packs[2][0])
    assert F.verify(tmp_path) == []


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.arrow", "sub/../../x.arrow",
                                 "C:\\x.arrow", ""])
def test_shard_paths_must_stay_inside(tmp_path, bad):
    rng = np.random.default_rng(4)
    m, _ = write_dataset(tmp_path, [random_pack(rng)])
    m["shards"][0]["path"] = bad
    (tmp_path / F.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(F.FormatError) as e:
        F.read_manifest(tmp_path)
    assert e.value.rule in ("shard-path", "manifest-schema")
    problems = F.verify(tmp_path)
    assert len(problems) == 1 and ("shard-path" in problems[0] or "manifest-schema"
                                   in problems[0])


def test_missing_manifest_is_not_a_dataset(tmp_path):
    with pytest.raises(F.FormatError, match="not a complete packed dataset"):
        F.read_manifest(tmp_path)
    with pytest.raises(F.FormatError, match="no such dataset directory"):
        F.read_manifest(tmp_path / "nope")


def test_write_atomic_from_many_threads(tmp_path):
    """Threads of one process writing the same file (the remote cache's verified marker is
    written by the prefetch thread and the reader) never rename each other's temporary file."""
    import threading

    from pack.files import write_atomic

    target = tmp_path / "marker.json"
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            for i in range(40):
                write_atomic(target, f"{k}:{i}".encode())
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text().split(":")[1] == "39"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["marker.json"]
