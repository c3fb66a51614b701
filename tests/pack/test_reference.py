"""pack.reference: the reference log-prob sidecar of a preference dataset, written from fake
rows (numpy; no torch in pack): resumable writes, the manifest commit, the reader, pack-verify's
checks and what they catch, and the model fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pack import format as F
from pack.build import build
from pack.errors import FormatError, PacktrainError
from pack.files import file_sha256
from pack.reference import (ReferenceReader, ReferenceWriter, find_reference,
                            model_fingerprint)

FP = "0123456789abcdef" * 4
FP2 = "fedcba9876543210" * 4


def fake_rows(ds: F.PackedDataset, shard: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + shard)
    first = int(ds.offsets[shard])
    return [-rng.random(len(ds[first + r]["cu_seqlens"]) - 1) * 50
            for r in range(ds.shards[shard]["packs"])]


@pytest.fixture()
def pref_ds(tmp_path_factory, tokenizer_dir) -> Path:
    """A small preference dataset of three shards (a fresh copy per test: they edit it)."""
    d = tmp_path_factory.mktemp("ref")
    recs = [{"prompt": f"Count to {i}.", "chosen": " ".join(map(str, range(i % 9 + 1))),
             "rejected": "No."} for i in range(40)]
    (d / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    build(dict(inputs=[str(d / "p.jsonl")], out=str(d / "ds"), tokenizer=str(tokenizer_dir),
               max_length=128, workers=1, quiet=True, shard_size="3", eval_records=8))
    return d / "ds"


def write_all(ds_dir: Path, fp: str = FP, seed: int = 0) -> dict:
    w = ReferenceWriter(ds_dir, "org/ref-model", fp, "bfloat16")
    for i in range(len(w.manifest["shards"])):
        w.write_shard(i, fake_rows(w.data, i, seed))
    return w.commit()


def test_write_resume_commit_read(pref_ds):
    w = ReferenceWriter(pref_ds, "org/ref-model", FP, "bfloat16")
    n = len(w.manifest["shards"])
    assert n >= 3 and not any(w.done(i) for i in range(n))
    w.write_shard(0, fake_rows(w.data, 0))
    with pytest.raises(FormatError, match="sidecar shards are missing"):
        w.commit()
    # an interrupted run: a new writer sees shard 0 done, a half-written temp file is not
    (w.path(1).parent / ".shard-00001.arrow.tmp-1-2").write_bytes(b"partial")
    w2 = ReferenceWriter(pref_ds, "org/ref-model", FP, "bfloat16")
    assert w2.done(0) and not w2.done(1)
    # a file of another model in the same place is not done
    assert not ReferenceWriter(pref_ds, "other", FP[:16] + FP2[16:], "float32").done(0)
    for i in range(1, n):
        w2.write_shard(i, fake_rows(w2.data, i))
    entry = w2.commit()
    m = F.read_manifest(pref_ds)
    assert find_reference(m, FP) == entry and find_reference(m, FP2) is None
    assert entry["dir"] == f"reference/{FP[:16]}" and len(entry["shards"]) == n
    reader, ds = ReferenceReader(pref_ds, entry), F.PackedDataset(pref_ds)
    assert len(reader) == len(ds)
    for i in range(len(ds)):
        shard, row = ds.locate(i)
        assert np.array_equal(reader[i], fake_rows(ds, shard)[row])
        assert len(reader[i]) == len(ds[i]["role"])
    assert F.verify(pref_ds) == []
    # a second model is added beside it; recommitting one replaces its entry
    write_all(pref_ds, FP2)
    write_all(pref_ds, FP, seed=7)
    refs = F.read_manifest(pref_ds)["reference_logps"]
    assert sorted(e["fingerprint"] for e in refs) == sorted([FP, FP2])
    assert F.verify(pref_ds) == []


def test_eval_dataset_commit_keeps_the_parent_valid(pref_ds):
    write_all(pref_ds / "eval")
    assert F.read_manifest(pref_ds / "eval")["reference_logps"]
    assert F.verify(pref_ds) == []  # parent's eval.manifest_sha256 follows


def test_writer_refuses_bad_rows_and_sft_data(pref_ds, tmp_path, tokenizer_dir, alpaca_jsonl):
    w = ReferenceWriter(pref_ds, "m", FP, "float32")
    rows = fake_rows(w.data, 0)
    with pytest.raises(ValueError, match="values, the pack has"):
        w.write_shard(0, [r[:-1] for r in rows])
    with pytest.raises(ValueError, match="rows, the data shard has"):
        w.write_shard(0, rows[:-1])
    with pytest.raises(ValueError, match="finite and <= 0"):
        w.write_shard(0, [np.abs(r) + 1 for r in rows])
    with pytest.raises(ValueError, match="finite and <= 0"):
        w.write_shard(0, [r * np.nan for r in rows])
    assert not w.done(0)
    sft = tmp_path / "sft"
    build(dict(inputs=[str(alpaca_jsonl)], out=str(sft), tokenizer=str(tokenizer_dir),
               max_length=256, workers=1, quiet=True))
    with pytest.raises(FormatError, match="not a preference dataset"):
        ReferenceWriter(sft, "m", FP, "float32")


def rewrite_manifest(ds: Path, edit) -> None:
    m = json.loads((ds / F.MANIFEST).read_text())
    edit(m)
    (ds / F.MANIFEST).write_text(json.dumps(m))


def test_verify_catches_corrupt_sidecars(pref_ds):
    entry = write_all(pref_ds)
    first = pref_ds / entry["shards"][0]["path"]
    data = bytearray(first.read_bytes())
    data[-20] ^= 0xFF  # same size, other bytes
    first.write_bytes(bytes(data))
    problems = F.verify(pref_ds)
    assert any("reference-checksum" in p and entry["shards"][0]["path"] in p for p in problems)
    # a sidecar of the right size and checksum whose rows do not fit the data shard
    w = ReferenceWriter(pref_ds, "m", FP, "float32")
    other = pref_ds / entry["shards"][1]["path"]
    rows = [np.append(r, -1.0) for r in fake_rows(w.data, 1)]
    table = pa.table({"ref_logps": pa.array(rows, type=pa.list_(pa.float64()))})
    with pa.OSFile(str(other), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as out:
        out.write_table(table)

    def fix(m):
        m["reference_logps"][0]["shards"][1].update(bytes=other.stat().st_size,
                                                    sha256=file_sha256(other))
    rewrite_manifest(pref_ds, fix)
    problems = F.verify(pref_ds, max_problems=50)
    assert any("reference-rows" in p and "the pack has" in p and other.name in p
               for p in problems), problems
    assert not w.done(1)  # a resumed run redoes it
    other.unlink()
    assert any("reference-missing" in p for p in F.verify(pref_ds, max_problems=50))


def test_verify_catches_an_edited_entry(pref_ds):
    write_all(pref_ds)
    rewrite_manifest(pref_ds, lambda m: m["reference_logps"][0]["shards"].pop())
    assert any("reference-entry" in p for p in F.verify(pref_ds))


def test_model_fingerprint(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(PacktrainError, match="no weight files"):
        model_fingerprint(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    a = model_fingerprint(d)
    assert len(a) == 64 and a == model_fingerprint(d)
    (d / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    b = model_fingerprint(d)
    (d / "extra.bin").write_bytes(b"ignored when safetensors exist")
    assert a != b == model_fingerprint(d)
    (d / "config.json").write_text('{"model_type": "qwen2"}')
    assert model_fingerprint(d) != b
    with pytest.raises(PacktrainError, match="not a directory"):
        model_fingerprint(tmp_path / "nope")


def test_a_remote_dataset_fetches_its_reference_files(pref_ds, tmp_path):
    """A dataset read through a URL (file:// here) fetches the sidecar files into its cache view
    (size and sha256 checked); pack-verify of the URL checks them, and a corrupt one fails."""
    import shutil

    from pack import remote

    write_all(pref_ds)
    published = tmp_path / "bucket" / "ds"
    shutil.copytree(pref_ds, published)
    shutil.rmtree(published / "eval")  # URL datasets carry no eval split
    rewrite_manifest(published, lambda m: m.pop("eval"))
    url = f"file://{published}"
    cache = tmp_path / "cache"
    assert remote.verify(url, cache_dir=cache) == []
    view = Path(remote.resolve(url, cache))
    entry = F.read_manifest(view)["reference_logps"][0]
    reader = ReferenceReader(view, entry)
    assert len(reader) == len(F.PackedDataset(view)) and reader[0].dtype == np.float64
    bad = published / entry["shards"][1]["path"]
    data = bytearray(bad.read_bytes())
    data[-20] ^= 0xFF
    bad.write_bytes(bytes(data))
    problems = remote.verify(url, cache_dir=tmp_path / "cache2")
    assert problems and "sha256" in problems[0] and entry["shards"][1]["path"] in problems[0]
