"""pack-build end to end on real data with the real Llama 3 tokenizer."""

from __future__ import annotations

import copy
import gzip
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pack import format as F
from pack.build import build
from pack.errors import PacktrainError
from pack.stats import TIMING_FIELDS
from pack.tokenize.loading import load_tokenizer

MAXLEN = 512


def run(inputs, out, tokenizer, **kw) -> dict:
    args = dict(inputs=[str(i) for i in inputs], out=str(out),
                tokenizer=None if tokenizer is None else str(tokenizer),
                max_length=MAXLEN, workers=1, quiet=True)
    args.update(kw)
    return build(args)


def comparable(manifest: dict, ignore_args=()) -> dict:
    """The manifest without the fields that may differ between equal builds."""
    m = copy.deepcopy(manifest)
    for k in TIMING_FIELDS:
        m["stats"].pop(k, None)
    for k in ignore_args:
        m["arguments"].pop(k, None)
    return m


def shard_digests(out) -> dict[str, str]:
    return {p.name: F.file_sha256(p) for p in sorted(out.glob("shard-*.arrow"))}


def records_of(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def packs(out) -> list[dict]:
    return list(F.PackedDataset(out))


def samples(out):
    """(record number, input_ids, labels) of every packed sample."""
    for row in packs(out):
        cu = row["cu_seqlens"]
        for k, rec in enumerate(row["sample_index"]):
            s, e = cu[k], cu[k + 1]
            yield int(rec), row["input_ids"][s:e], row["labels"][s:e]


def label_runs(ids, labels) -> list[np.ndarray]:
    trained = labels != F.IGNORE_INDEX
    runs, start = [], None
    for i, t in enumerate(trained):
        if t and start is None:
            start = i
        elif not t and start is not None:
            runs.append(ids[start:i])
            start = None
    if start is not None:
        runs.append(ids[start:])
    return runs


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def chat_build(tmp_path_factory, tokenizer_dir, chat_jsonl):
    out = tmp_path_factory.mktemp("chat") / "ds"
    manifest = run([chat_jsonl], out, tokenizer_dir, overwrite=True)
    return out, manifest


@pytest.fixture(scope="module")
def alpaca_build(tmp_path_factory, tokenizer_dir, alpaca_jsonl):
    out = tmp_path_factory.mktemp("alpaca") / "ds"
    return out, run([alpaca_jsonl], out, tokenizer_dir)


# ---------------------------------------------------------------- contents

@pytest.mark.parametrize("which", ["chat_build", "alpaca_build"])
def test_every_sample_exactly_once_and_packs_valid(request, which):
    out, m = request.getfixturevalue(which)
    s = m["stats"]
    vocab = m["tokenizer"]["vocab_size"]
    seen = []
    for row in packs(out):
        assert F.check_pack(row, MAXLEN, vocab) is None
        seen.extend(row["sample_index"].tolist())
    assert len(seen) == len(set(seen)) == s["samples_packed"]
    assert all(0 <= i < s["records"] for i in seen)
    assert F.verify(out) == []


def test_stats_add_up(chat_build):
    out, m = chat_build
    s = m["stats"]
    assert s["records"] == sum(src["records"] for src in m["sources"]) == 200
    assert s["records"] == (s["samples_packed"] + sum(s["dropped"].values())
                            + s["skipped_invalid"].get("invalid-record", 0))
    rows = packs(out)
    lengths = np.array([len(r["input_ids"]) for r in rows])
    assert s["packs"] == len(rows) == sum(sh["packs"] for sh in m["shards"])
    assert s["tokens"] == lengths.sum() == sum(sh["tokens"] for sh in m["shards"])
    assert s["label_tokens"] == sum(int((r["labels"] != -100).sum()) for r in rows)
    assert s["lower_bound"] == math.ceil(s["tokens"] / MAXLEN) <= s["packs"]
    assert s["fill"] == pytest.approx(s["tokens"] / (s["packs"] * MAXLEN), abs=1e-6)
    h = s["length_histogram"]
    assert sum(h["counts"]) == s["samples_packed"] and len(h["edges"]) == len(h["counts"]) + 1
    assert sum(s["fill_histogram"]["counts"]) == s["packs"]
    assert s["truncated"] > 0  # chitchat has conversations longer than 512 tokens
    assert all(len(x[1]) <= MAXLEN for x in samples(out))
    assert m["packing"] == {**m["packing"], "strategy": "bfd", "seed": 0, "overlong": "truncate"}
    assert m["template"]["name"] == "chat" and m["template"]["format"] == "messages"
    assert m["tokenizer"]["fingerprint"].startswith("sha256:")
    assert (out / "README.md").is_file() and not list(out.glob(".*"))
    assert set(m["created_by"]) >= {"packtrain", "python", "pyarrow", "tokenizers",
                                    "transformers"}
    assert m["sources"][0]["sha256"] == F.file_sha256(m["sources"][0]["path"])


def test_alpaca_labels_decode_to_outputs(alpaca_build, alpaca_jsonl, tok):
    out, m = alpaca_build
    recs = records_of(alpaca_jsonl)
    n = 0
    for rec_no, ids, labels in samples(out):
        runs = label_runs(ids, labels)
        assert len(runs) == 1
        assert tok.decode(runs[0].tolist()) == recs[rec_no]["output"] + tok.eos_token
        assert labels[0] == -100
        n += 1
    assert n == m["stats"]["samples_packed"] > 300


def test_chat_labels_decode_to_assistant_turns(chat_build, chat_jsonl, tok):
    out, m = chat_build
    recs = records_of(chat_jsonl)
    full = cut = 0
    for rec_no, ids, labels in samples(out):
        replies = [msg["content"].strip() + "<|eot_id|>" for msg in recs[rec_no]["messages"]
                   if msg["role"] == "assistant"]
        runs = [tok.decode(r.tolist()) for r in label_runs(ids, labels)]
        if len(ids) == MAXLEN and len(runs) <= len(replies):  # possibly truncated
            assert runs[:-1] == replies[:len(runs) - 1]
            cut += 1
        else:
            assert runs == replies
            full += 1
    assert full > 100 and cut > 0


# ---------------------------------------------------------------- determinism

def test_rebuild_is_byte_identical(chat_build, tokenizer_dir, chat_jsonl, tmp_path):
    out, m1 = chat_build
    digests = shard_digests(out)
    card = (out / "README.md").read_bytes()
    m2 = run([chat_jsonl], out, tokenizer_dir, overwrite=True)  # same arguments, same dir
    assert shard_digests(out) == digests
    assert (out / "README.md").read_bytes() == card
    assert comparable(m2) == comparable(m1)
    on_disk = json.loads((out / F.MANIFEST).read_text())
    assert comparable(on_disk) == comparable(m2)

    # and with two worker processes
    out2 = tmp_path / "w2"
    m3 = run([chat_jsonl], out2, tokenizer_dir, overwrite=True, workers=2)
    assert shard_digests(out2) == digests
    assert comparable(m3, ignore_args=("out", "workers")) == \
        comparable(m1, ignore_args=("out", "workers"))
    assert m3["arguments"]["workers"] == 2


def test_task_size_does_not_change_the_dataset(alpaca_build, tokenizer_dir, alpaca_jsonl,
                                               tmp_path, monkeypatch):
    """JSON Lines tasks are cut by bytes; however they are cut (one record per task, or the
    whole file in one), the shards and the manifest are the same."""
    from pack import tasks as T

    out, m1 = alpaca_build
    for size in (1, 1 << 30):
        monkeypatch.setattr(T, "RAW_CHUNK_BYTES", size)
        o = tmp_path / f"bytes{size}"
        m = run([alpaca_jsonl], o, tokenizer_dir, workers=2)
        assert shard_digests(o) == shard_digests(out)
        assert comparable(m, ignore_args=("out", "workers")) == \
            comparable(m1, ignore_args=("out", "workers"))


def test_jsonl_tasks_end_at_the_byte_budget(tmp_path, monkeypatch):
    from collections import Counter

    from pack import tasks as T

    lines = [json.dumps({"text": "x" * n}) for n in (10, 500, 3, 3, 3, 900, 1, 1)]
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(lines[:4]) + "\n\n" + "\n".join(lines[4:]) + "\n")
    monkeypatch.setattr(T, "RAW_CHUNK_RECORDS", 3)
    _, tasks = T.read_sources([src], "text", False, Counter(), [{}], chunk_bytes=520)
    tasks = list(tasks)
    # 10+500 (+ quotes and keys) passes 520 at the second line; a run of short lines stops at
    # RAW_CHUNK_RECORDS; the blank line 5 is not a record
    assert [t.linenos for t in tasks] == [[1, 2], [3, 4, 6], [7], [8, 9]]
    assert [json.loads(r) for t in tasks for r in t.payload] == [json.loads(x) for x in lines]


def test_seed_shuffles_pack_order(alpaca_build, tokenizer_dir, alpaca_jsonl, tmp_path):
    out, m = alpaca_build
    m1 = run([alpaca_jsonl], tmp_path / "s1", tokenizer_dir, seed=1)
    a = [tuple(r["sample_index"].tolist()) for r in packs(out)]
    b = [tuple(r["sample_index"].tolist()) for r in packs(tmp_path / "s1")]
    assert a != b and sorted(a) == sorted(b)
    assert m1["packing"]["seed"] == 1 and m1["stats"]["packs"] == m["stats"]["packs"]


# ---------------------------------------------------------------- options

@pytest.mark.parametrize("strategy", ["ffd", "next-fit"])
def test_strategies(strategy, alpaca_build, tokenizer_dir, alpaca_jsonl, tmp_path):
    _, bfd = alpaca_build
    m = run([alpaca_jsonl], tmp_path / strategy, tokenizer_dir, strategy=strategy,
            max_length=256)
    assert m["packing"]["strategy"] == strategy
    assert F.verify(tmp_path / strategy) == []
    s = m["stats"]
    assert s["lower_bound"] <= s["packs"]
    assert s["samples_packed"] == bfd["stats"]["samples_packed"]
    if strategy == "next-fit":
        assert s["fill"] < 0.97  # the streaming packer wastes what BFD/FFD fill
    else:
        assert s["packs"] <= 1.05 * s["lower_bound"] + 2


def test_truncate_vs_drop(chat_build, tokenizer_dir, chat_jsonl, tmp_path):
    _, trunc = chat_build
    drop = run([chat_jsonl], tmp_path / "drop", tokenizer_dir, overlong="drop")
    t, d = trunc["stats"], drop["stats"]
    overlong = t["truncated"] + t["dropped"].get("no-labels-after-truncation", 0)
    assert d["dropped"]["overlong"] == overlong > 0
    assert d["truncated"] == 0
    assert d["samples_packed"] == t["samples_packed"] - t["truncated"]
    assert drop["packing"]["overlong"] == "drop"
    assert F.verify(tmp_path / "drop") == []


def test_input_kinds_and_glob(alpaca_jsonl, tokenizer_dir, tmp_path):
    recs = records_of(alpaca_jsonl)[:120]
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.json").write_text(json.dumps(recs[:40]))
    pq.write_table(pa.Table.from_pylist(recs[40:80]), d / "b.parquet")
    with gzip.open(d / "c.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs[80:])
    m = run([str(d / "*")], tmp_path / "out", tokenizer_dir)
    assert [s["path"] for s in m["sources"]] == [str(d / n) for n in
                                                 ("a.json", "b.parquet", "c.jsonl.gz")]
    assert [s["records"] for s in m["sources"]] == [40, 40, 40]
    assert m["stats"]["records"] == 120 and m["arguments"]["inputs"] == [str(d / "*")]
    # record numbers run across the files in order: compare with a build of one JSONL
    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run([one], tmp_path / "ref", tokenizer_dir)
    assert shard_digests(tmp_path / "out") == shard_digests(tmp_path / "ref")


def test_tokenizer_from_environment(alpaca_jsonl, tokenizer_dir, tmp_path, monkeypatch):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(open(alpaca_jsonl).readlines()[:20]))
    monkeypatch.setenv("PACKTRAIN_TOKENIZER", str(tokenizer_dir))
    m = run([small], tmp_path / "env", None)
    assert m["tokenizer"]["path"] == str(tokenizer_dir)
    assert m["arguments"]["tokenizer"] == str(tokenizer_dir)
    monkeypatch.delenv("PACKTRAIN_TOKENIZER")
    with pytest.raises(PacktrainError, match="PACKTRAIN_TOKENIZER") as e:
        run([small], tmp_path / "none", None)
    assert "--tokenizer" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "none").exists()


def test_output_dir_rules(alpaca_jsonl, tokenizer_dir, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(open(alpaca_jsonl).readlines()[:20]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(PacktrainError, match="--overwrite") as e:
        run([small], out, tokenizer_dir)
    assert str(out) in str(e.value)
    m = run([small], out, tokenizer_dir, overwrite=True, shard_size="1")
    assert len(m["shards"]) == m["stats"]["packs"] >= 2
    m = run([small], out, tokenizer_dir, overwrite=True)  # fewer shards: old ones removed
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "manifest.json", "notes.txt",
                                                     "shard-00000.arrow"]
    assert F.verify(out) == []
    with pytest.raises(PacktrainError, match="shard-size"):
        run([small], tmp_path / "x", tokenizer_dir, shard_size="lots")


def test_sources_are_hashed_beside_the_workers(tmp_path, alpaca_jsonl, tokenizer_dir):
    """The inputs' sha256 is computed on a thread while the workers tokenize; every source gets
    its own digest, with one worker and with several."""
    lines = alpaca_jsonl.read_text().splitlines(keepends=True)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(lines[:200]))
    b.write_text("".join(lines[200:500]))
    for workers in (1, 2):
        m = run([a, b], tmp_path / f"out{workers}", tokenizer_dir, workers=workers)
        assert [s["sha256"] for s in m["sources"]] == [F.file_sha256(a), F.file_sha256(b)]
        assert [s["records"] for s in m["sources"]] == [200, 300]


def test_sample_store_gathers_a_batch_releasing_pages_as_it_goes(tmp_path, monkeypatch):
    """A record batch gathers thousands of samples from the spill file; mapped pages are
    released every RELEASE_EVERY samples within it, so resident memory stays bounded."""
    from pack.store import SampleStore

    rng = np.random.default_rng(5)
    lens = rng.integers(1, 40, size=50)
    samples = [rng.integers(0, 1000, size=n).astype(np.int32) for n in lens]
    store = SampleStore(tmp_path / "spill.arrow")
    for s in range(0, 50, 20):  # appended in chunks, as results come back
        part = samples[s:s + 20]
        store.append(lens[s:s + 20], np.concatenate(part), np.concatenate(part) + 1)
    store.finish_writing()
    store.open(50)
    released = []
    monkeypatch.setattr(SampleStore, "RELEASE_EVERY", 7)
    monkeypatch.setattr(store, "release", lambda: released.append(store._since_release)
                        or setattr(store, "_since_release", 0))
    idx = rng.permutation(50)[:45]
    ids, labels, cu = store.gather(idx, lens)
    assert released == [7] * 6  # 45 samples: a release after each 7
    np.testing.assert_array_equal(ids, np.concatenate([samples[i] for i in idx]))
    want = np.concatenate([samples[i] + 1 for i in idx])
    want[cu[:-1]] = F.IGNORE_INDEX
    np.testing.assert_array_equal(labels, want)
    np.testing.assert_array_equal(cu, np.concatenate([[0], np.cumsum(lens[idx])]))
    store.close()
