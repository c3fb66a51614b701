"""pack-verify: passes a good dataset, catches every kind of damage with shard, row and rule."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pack import format as F
from pack.build import build
from pack.cli import verify_main


@pytest.fixture(scope="module")
def good(tmp_path_factory, tokenizer_dir, alpaca_jsonl):
    out = tmp_path_factory.mktemp("verify") / "good"
    build(dict(inputs=[str(alpaca_jsonl)], out=str(out), tokenizer=str(tokenizer_dir),
               max_length=256, workers=1, quiet=True, shard_size="30"))
    return out


@pytest.fixture
def ds(good, tmp_path):
    """A fresh copy of the good dataset to damage."""
    dst = tmp_path / "ds"
    shutil.copytree(good, dst)
    return dst


def manifest_of(path) -> dict:
    return json.loads((path / F.MANIFEST).read_text())


def save_manifest(path, m: dict) -> None:
    (path / F.MANIFEST).write_text(json.dumps(m, indent=2))


def verify(path, *flags, capsys) -> tuple[int, str, str]:
    code = verify_main([str(path), "--quiet", *flags])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_good_dataset_passes(good, capsys):
    m = manifest_of(good)
    code = verify_main([str(good)])
    out = capsys.readouterr().out
    assert code == 0
    assert (f"OK: {len(m['shards'])} shards, {m['stats']['packs']} packs, "
            f"{m['stats']['tokens']} tokens verified") in out
    assert len(m["shards"]) > 1
    assert verify_main([str(good), "--no-checksums", "--quiet"]) == 0


def test_flipped_byte_fails_checksum(ds, capsys):
    path = ds / "shard-00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    code, out, _ = verify(ds, capsys=capsys)
    assert code == 1
    assert "shard-00001.arrow" in out and "[rule: checksum]" in out


def test_truncated_shard(ds, capsys):
    path = ds / "shard-00000.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    code, out, _ = verify(ds, capsys=capsys)
    assert code == 1 and "shard-00000.arrow" in out and "[rule: shard-size]" in out


def test_missing_shard(ds, capsys):
    (ds / "shard-00002.arrow").unlink()
    code, out, _ = verify(ds, capsys=capsys)
    assert code == 1 and "shard-00002.arrow" in out and "[rule: shard-missing]" in out


def test_missing_manifest(ds, capsys):
    (ds / F.MANIFEST).unlink()
    code, out, _ = verify(ds, capsys=capsys)
    assert code == 1 and "[rule: manifest-missing]" in out


@pytest.mark.parametrize("edit, rule", [
    (lambda m: m["stats"].update(tokens=m["stats"]["tokens"] + 1), "stats-tokens"),
    (lambda m: m["stats"].update(packs=m["stats"]["packs"] - 1), "stats-packs"),
    (lambda m: m["stats"].update(label_tokens=7), "stats-label-tokens"),
    (lambda m: m["stats"].update(samples_packed=3), "stats-samples-packed"),
    (lambda m: m["shards"][1].update(sha256="0" * 64), "checksum"),
    (lambda m: m["shards"][0].update(packs=m["shards"][0]["packs"] + 1), "shard-rows"),
    (lambda m: m["shards"][0].update(tokens=1), "shard-tokens"),
    (lambda m: m.update(max_length="big"), "manifest-schema"),
    (lambda m: m["stats"].update(fill=1.5), "manifest-schema"),
    (lambda m: m["shards"][0].pop("sha256"), "manifest-schema"),
    (lambda m: m.update(format_version="9.0"), "format-version"),
    (lambda m: m["shards"][0].update(path="../elsewhere.arrow"), "shard-path"),
])
def test_edited_manifest(ds, capsys, edit, rule):
    m = manifest_of(ds)
    edit(m)
    save_manifest(ds, m)
    code, out, _ = verify(ds, capsys=capsys)
    assert code == 1
    assert f"[rule: {rule}]" in out


def test_manifest_not_json(ds, capsys):
    (ds / F.MANIFEST).write_text('{"format": "packtrain-packed", ')
    code, out, _ = verify(ds, capsys=capsys)
    assert code == 1 and "[rule: manifest-json]" in out and "manifest.json" in out


def replace_shard(ds, shard: str, packs: list[tuple]) -> None:
    """Write `packs` with ShardWriter (bypassing the builder) in place of `shard`, and fix the
    manifest up (size, sha256, counts, stats) so only the packs' own invariants can fail."""
    tmp = ds / "tmp-writer"
    tmp.mkdir()
    w = F.ShardWriter(tmp)
    for p in packs:
        w.add(*p)
    (info,) = w.close()
    shutil.move(str(tmp / info.path), str(ds / shard))
    tmp.rmdir()
    m = manifest_of(ds)
    entry = next(s for s in m["shards"] if s["path"] == shard)
    st = m["stats"]
    old = F.PackedDataset(ds, manifest_of(ds)).table(m["shards"].index(entry))
    st["tokens"] += info.tokens - entry["tokens"]
    st["packs"] += info.packs - entry["packs"]
    st["samples_packed"] += (sum(len(p[3]) for p in packs)
                             - len(old.column("sample_index").combine_chunks().values))
    st["label_tokens"] += (sum(int((p[1] != -100).sum()) for p in packs)
                           - int((old.column("labels").combine_chunks().values.to_numpy()
                                  != -100).sum()))
    entry.update(packs=info.packs, tokens=info.tokens, bytes=info.bytes, sha256=info.sha256)
    save_manifest(ds, m)


def good_packs(ds, shard_no: int) -> list[tuple]:
    m = manifest_of(ds)
    pd = F.PackedDataset(ds, m)
    first = int(pd.offsets[shard_no])
    rows = [pd[i] for i in range(first, int(pd.offsets[shard_no + 1]))]
    return [(r["input_ids"].copy(), r["labels"].copy(), r["cu_seqlens"].copy(),
             r["sample_index"].copy()) for r in rows]


def test_rewritten_good_shard_still_passes(ds, capsys):
    replace_shard(ds, "shard-00001.arrow", good_packs(ds, 1))
    assert verify(ds, capsys=capsys)[0] == 0


def test_out_of_range_token(ds, capsys):
    packs = good_packs(ds, 1)
    vocab = manifest_of(ds)["tokenizer"]["vocab_size"]
    ids = packs[3][0]
    ids[5] = vocab  # one past the end of the vocabulary
    packs[3][1][5] = -100
    replace_shard(ds, "shard-00001.arrow", packs)
    code, out, _ = verify(ds, capsys=capsys)
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(lines) == 1, out
    assert "shard-00001.arrow row 3" in lines[0] and "[rule: token-range]" in lines[0]


def test_wrong_cu_seqlens(ds, capsys):
    packs = good_packs(ds, 0)
    ids, labels, cu, si = packs[2]
    t = len(ids)
    packs[2] = (ids, labels, np.array([0, 3, 3, t], dtype=np.int32),
                np.array([1, 2, 3], dtype=np.int64))
    labels[[0, 3]] = -100
    replace_shard(ds, "shard-00000.arrow", packs)
    code, out, _ = verify(ds, "--no-checksums", capsys=capsys)
    assert code == 1
    assert "shard-00000.arrow row 2" in out and "[rule: cu-seqlens]" in out


def test_label_at_sample_start(ds, capsys):
    packs = good_packs(ds, 0)
    ids, labels, cu, si = packs[0]
    labels[cu[1]] = ids[cu[1]]  # the first token of sample 2 learns from sample 1
    replace_shard(ds, "shard-00000.arrow", packs)
    code, out, _ = verify(ds, capsys=capsys)
    assert code == 1 and "row 0" in out and "[rule: labels-start]" in out


def test_verify_not_a_directory(tmp_path, capsys):
    code, out, _ = verify(tmp_path / "missing", capsys=capsys)
    assert code == 1 and "no such dataset directory" in out
