"""pack-build --eval-fraction / --eval-records: a held-out eval split in OUT/eval/.

One corpus of real Alpaca records (with exact and reordered-key duplicates) is packed once
without and once with a split; the split must partition the plain build's samples exactly, share
no record with training (by sample_index and by content), be stable when the corpus is shuffled
and grown, verify, name its parent, merge across partitions, and refuse bad flags in one line.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from pack import format as F
from pack.build import build
from pack.cli import build_main, verify_main
from pack.errors import PacktrainError
from pack.eval_split import canonical, choose, eval_rule, fraction_bound, record_hashes
from pack.files import file_sha256
from pack.merge import merge
from pack.offline import chitchat_conversations
from pack.outdir import BUILDING, check_out_dir, prepare_out_dir, unlock_out_dirs

MAXLEN = 128
FRAC = 0.2


def alpaca(n: int, skip: int = 0) -> list[dict]:
    out = []
    for rec in chitchat_conversations():
        msgs = rec["messages"]
        for i in range(0, len(msgs) - 1, 2):
            out.append({"instruction": msgs[i]["content"], "input": "",
                        "output": msgs[i + 1]["content"]})
        if len(out) >= n + skip:
            return out[skip:skip + n]
    raise AssertionError("chitchat too small")


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def run(inputs, out, tok, **kw) -> dict:
    args = dict(inputs=[str(i) for i in inputs], out=str(out), tokenizer=str(tok),
                max_length=MAXLEN, workers=1, quiet=True)
    args.update(kw)
    return build(args)


def samples(out: Path) -> dict[int, tuple]:
    """sample_index -> (input_ids, labels) of every packed sample."""
    got: dict[int, tuple] = {}
    for row in F.PackedDataset(out):
        cu = row["cu_seqlens"]
        for k, rec in enumerate(row["sample_index"]):
            assert int(rec) not in got
            got[int(rec)] = (tuple(row["input_ids"][cu[k]:cu[k + 1]].tolist()),
                             tuple(row["labels"][cu[k]:cu[k + 1]].tolist()))
    return got


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    recs = alpaca(400)
    # copies of a few records, two with their keys in another order: the same content
    dups = [recs[3], recs[50], dict(reversed(list(recs[120].items()))),
            dict(reversed(list(recs[7].items())))]
    recs = recs + dups
    return write_jsonl(tmp_path_factory.mktemp("evc") / "c.jsonl", recs), recs


@pytest.fixture(scope="module")
def built(corpus, tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    path, _ = corpus
    d = tmp_path_factory.mktemp("evb")
    run([path], d / "plain", tokenizer_dir)
    run([path], d / "split", tokenizer_dir, eval_fraction=FRAC)
    return {"plain": d / "plain", "split": d / "split", "dir": d}


def test_hash_fraction_and_canonical_content():
    recs = alpaca(4000)
    h = record_hashes(recs, 0)
    held, _ = choose(h, eval_rule(_Cfg(eval_fraction=0.1)))
    sigma = (4000 * 0.1 * 0.9) ** 0.5
    assert abs(int(held.sum()) - 400) < 4 * sigma
    # key order and whitespace do not matter; the seed does
    r = recs[0]
    assert canonical(r) == canonical(dict(reversed(list(r.items()))))
    assert record_hashes([r], 0)[0] != record_hashes([r], 1)[0]
    assert 0.05 < np.mean(record_hashes(recs, 7) < fraction_bound(0.1)) < 0.15


class _Cfg:
    def __init__(self, **kw):
        self.eval_fraction = kw.get("eval_fraction")
        self.eval_records = kw.get("eval_records")
        self.eval_seed = kw.get("eval_seed", 0)
        self.num_partitions = kw.get("num_partitions", 1)
        self.out = kw.get("out", "o")


def test_split_partitions_the_plain_build(built, corpus):
    plain, train, held = (samples(built["plain"]), samples(built["split"]),
                          samples(built["split"] / "eval"))
    assert held and train
    assert not set(train) & set(held)                       # by sample_index
    assert {**train, **held} == plain                       # same samples, same tokens
    _, recs = corpus
    content = lambda ids: {canonical(recs[i]) for i in ids}  # noqa: E731
    assert not content(train) & content(held)               # by content, duplicates too
    assert 0.1 < len(held) / len(plain) < 0.3
    # the duplicates (record 400.. copies 3, 50, 120, 7) are on their original's side
    for dup, orig in ((400, 3), (401, 50), (402, 120), (403, 7)):
        assert (dup in held) == (orig in held)
    m, e = F.read_manifest(built["split"]), F.read_manifest(built["split"] / "eval")
    pm = F.read_manifest(built["plain"])
    assert m["stats"]["tokens"] + e["stats"]["tokens"] == pm["stats"]["tokens"]
    assert m["stats"]["label_tokens"] + e["stats"]["label_tokens"] == pm["stats"]["label_tokens"]
    assert m["stats"]["records"] + e["stats"]["records"] == pm["stats"]["records"]


def test_manifests_name_each_other_and_verify(built, tmp_path, capsys):
    out = built["split"]
    m, e = F.read_manifest(out), F.read_manifest(out / "eval")
    F.validate_manifest(m)
    F.validate_manifest(e)
    assert e["eval_of"]["parent"] == ".." and e["eval_of"]["split"] == m["eval"]["split"]
    assert m["eval"]["split"]["rule"] == "fraction" and m["eval"]["split"]["fraction"] == FRAC
    assert m["eval"]["manifest_sha256"] == file_sha256(out / "eval" / "manifest.json")
    assert m["eval"]["samples"] == e["stats"]["samples_packed"]
    for key in ("max_length", "tokenizer", "template", "packing", "sources"):
        assert m[key] == e[key], key
    assert "eval" not in F.read_manifest(built["plain"])
    assert F.verify(out) == [] and F.verify(out / "eval") == []
    assert verify_main([str(out)]) == 0 and "eval split eval/" in capsys.readouterr().out
    # an altered eval dataset fails the parent's verification
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    em = bad / "eval" / "manifest.json"
    em.write_text(em.read_text() + "\n")
    assert any("eval" in p and "sha256" in p for p in F.verify(bad))
    shutil.rmtree(bad / "eval")
    assert any("eval" in p for p in F.verify(bad))


def test_split_is_stable_when_shuffled_and_grown(built, corpus, tokenizer_dir, tmp_path):
    _, recs = corpus
    order = list(range(len(recs)))
    random.Random(1).shuffle(order)
    extra = alpaca(100, skip=400)
    path = write_jsonl(tmp_path / "shuffled.jsonl", [recs[i] for i in order] + extra)
    out = tmp_path / "o"
    run([path], out, tokenizer_dir, eval_fraction=FRAC)
    all_recs = [recs[i] for i in order] + extra
    held_before = {canonical(recs[i]) for i in samples(built["split"] / "eval")}
    held_now = {canonical(all_recs[i]) for i in samples(out / "eval")}
    old = {canonical(r) for r in recs}
    assert held_now & old == held_before
    assert held_now - old  # some new records went to eval too


def test_eval_records_exact_count(corpus, tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, recs = corpus
    path = tmp_path / "c.parquet"  # records parsed by the reader, not by the workers
    pq.write_table(pa.Table.from_pylist(recs), path)
    out = tmp_path / "o"
    m = run([path], out, tokenizer_dir, eval_records=30, eval_seed=5)
    held = samples(out / "eval")
    assert len(held) == 30 and m["eval"]["split"]["records"] == 30
    kept = sorted(set(held) | set(samples(out)))
    h = record_hashes([recs[i] for i in kept], 5)
    smallest = {kept[i] for i in np.argsort(h, kind="stable")[:30]}
    assert set(held) == smallest
    assert F.verify(out) == []


def test_partitions_and_merge(built, corpus, tokenizer_dir, tmp_path):
    path, _ = corpus
    parts = [tmp_path / f"p{i}" for i in range(2)]
    for i, p in enumerate(parts):
        run([path], p, tokenizer_dir, eval_fraction=FRAC, num_partitions=2, partition=i)
        assert F.read_manifest(p / "eval")["partition"]["index"] == i
    m = merge([str(parts[1]), str(parts[0])], str(tmp_path / "merged"))
    merged = tmp_path / "merged"
    assert samples(merged / "eval") == samples(built["split"] / "eval")
    assert samples(merged) == samples(built["split"])
    assert m["eval"]["manifest_sha256"] == file_sha256(merged / "eval" / "manifest.json")
    assert F.read_manifest(merged / "eval")["merged"]["partitions"] == 2
    assert F.verify(merged) == []
    # a part's eval split replaced by another one is refused
    shutil.rmtree(parts[0] / "eval")
    shutil.copytree(parts[1] / "eval", parts[0] / "eval")
    with pytest.raises(PacktrainError, match="eval split"):
        merge([str(p) for p in parts], str(tmp_path / "merged2"))
    assert not (tmp_path / "merged2" / "manifest.json").exists()


def test_dry_run_counts_held_out(built, corpus, tokenizer_dir, capsys):
    path, _ = corpus
    plan = run([path], built["dir"] / "dry", tokenizer_dir, eval_fraction=FRAC, dry_run=True)
    assert plan["eval"]["records"] == len(samples(built["split"] / "eval"))  # nothing dropped
    assert not (built["dir"] / "dry").exists()


@pytest.mark.parametrize("flags, says", [
    (["--eval-fraction", "0.1", "--eval-records", "3"], "not both"),
    (["--eval-fraction", "0"], "--eval-fraction 0.0"),
    (["--eval-fraction", "1"], "--eval-fraction 1.0"),
    (["--eval-fraction", "nan"], "--eval-fraction nan"),
    (["--eval-records", "0"], "--eval-records 0"),
    (["--eval-records", "60"], "--eval-records 60: the build has only"),
    (["--eval-records", "3", "--num-partitions", "2", "--partition", "0"], "--eval-fraction with"),
    (["--eval-seed", "-1", "--eval-fraction", "0.5"], "--eval-seed -1"),
    (["--eval-fraction", "1e-9"], "no record"),
    (["--eval-fraction", "0.999999999"], "none is left to train on"),
])
def test_bad_flags_one_line(flags, says, corpus, tokenizer_dir, tmp_path, capsys):
    small = write_jsonl(tmp_path / "s.jsonl", corpus[1][:40])
    out = tmp_path / "o"
    rc = build_main([str(small), str(out), "--tokenizer", str(tokenizer_dir), "--quiet",
                     "--workers", "1", "--max-length", str(MAXLEN), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and says in err[0], err
    assert not out.exists()  # nothing left, not even OUT/eval


def test_url_out_refused():
    with pytest.raises(PacktrainError, match="local directory"):
        eval_rule(_Cfg(eval_fraction=0.1, out="s3://bucket/x"))


def test_failure_after_eval_removes_both(corpus, tokenizer_dir, tmp_path, monkeypatch):
    import pack.build as B

    small = write_jsonl(tmp_path / "s.jsonl", corpus[1][:40])
    calls = []
    real = B._pack_write

    def failing(*a, **kw):  # the eval split is written; the parent fails
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(B, "_pack_write", failing)
    with pytest.raises(PacktrainError, match="No space left"):
        run([small], tmp_path / "o", tokenizer_dir, eval_fraction=0.3)
    assert len(calls) == 2 and not (tmp_path / "o").exists()


def test_rebuild_and_leftovers_drop_old_eval(built, tmp_path):
    # --overwrite without a split: the old OUT/eval goes with the old parent
    out = tmp_path / "o"
    shutil.copytree(built["split"], out)
    prepare_out_dir(out, overwrite=True)
    unlock_out_dirs()
    assert not (out / "eval").exists() and not (out / "manifest.json").exists()
    # killed after publishing OUT/eval, before the parent's manifest: leftovers, no --overwrite
    killed = tmp_path / "k"
    shutil.copytree(built["split"], killed)
    (killed / "manifest.json").unlink()
    (killed / BUILDING).write_text("1\n")
    check_out_dir(killed, overwrite=False)
    prepare_out_dir(killed, overwrite=False)
    unlock_out_dirs()
    assert not (killed / "eval").exists()
    # a user's file inside OUT/eval is not leftovers: --overwrite needed, and it stays
    (out / "eval").mkdir()
    (out / "eval" / "notes.txt").write_text("mine")
    (out / BUILDING).write_text("1\n")
    with pytest.raises(PacktrainError, match="not empty"):
        check_out_dir(out, overwrite=False)
    prepare_out_dir(out, overwrite=True)
    unlock_out_dirs()
    assert (out / "eval" / "notes.txt").read_text() == "mine"
