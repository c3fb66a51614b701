"""pack-build --num-partitions/--partition and pack-merge, end to end on real data.

A corpus of two inputs (JSON Lines + Parquet, 11 blocks of 128 records) is packed once whole
and once as 3 partitions that pack-merge joins; the merged dataset must hold exactly the same
samples (record number, tokens, labels) with the same statistics, pass pack-verify, and need
no more packs than the bound the benchmark supports. Bad merges are refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pack import format as F
from pack.build import PARTITION_BLOCK, build
from pack.cli import build_main, merge_main
from pack.errors import PacktrainError
from pack.merge import combine_stats, merge
from pack.offline import chitchat_conversations
from pack.stats import TIMING_FIELDS
from pack.tasks import check_partition

MAXLEN = 256
N = 3


def alpaca_records(n: int, skip: int = 0) -> list[dict]:
    out = []
    for rec in chitchat_conversations():
        msgs = rec["messages"]
        for i in range(0, len(msgs) - 1, 2):
            out.append({"instruction": msgs[i]["content"],
                        "input": msgs[i - 1]["content"] if i > 0 else "",
                        "output": msgs[i + 1]["content"]})
        if len(out) >= n + skip:
            return out[skip:skip + n]
    raise AssertionError("chitchat too small")


def run(inputs, out, tok, **kw) -> dict:
    args = dict(inputs=[str(i) for i in inputs], out=str(out), tokenizer=str(tok),
                max_length=MAXLEN, workers=1, quiet=True)
    args.update(kw)
    return build(args)


def samples(out: Path) -> set[tuple]:
    """(record number, input_ids, labels) of every packed sample, as a set."""
    got = []
    for row in F.PackedDataset(out):
        cu = row["cu_seqlens"]
        for k, rec in enumerate(row["sample_index"]):
            s, e = cu[k], cu[k + 1]
            got.append((int(rec), tuple(row["input_ids"][s:e].tolist()),
                        tuple(row["labels"][s:e].tolist())))
    assert len(got) == len(set(got))
    return set(got)


def packs_bound(single_packs: int, n_parts: int) -> int:
    """benchmarks/partition_quality.py: within 0.5 % of one global pack for partitions of
    100k+ samples; a small corpus adds at most one partly filled last pack per partition."""
    return int(single_packs * 1.005) + n_parts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("corpus")
    recs = alpaca_records(1300)
    a, b = d / "a.jsonl", d / "b.parquet"
    with open(a, "w") as f:
        for r in recs[:1000]:
            f.write(json.dumps(r) + "\n")
    pq.write_table(pa.Table.from_pylist(recs[1000:]), b, row_group_size=100)
    return [a, b]


@pytest.fixture(scope="module")
def single(tmp_path_factory, tokenizer_dir, corpus):
    out = tmp_path_factory.mktemp("single") / "ds"
    return out, run(corpus, out, tokenizer_dir)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, tokenizer_dir, corpus) -> list[Path]:
    d = tmp_path_factory.mktemp("parts")
    outs = []
    for i in range(N):
        out = d / f"part-{i}"
        run(corpus, out, tokenizer_dir, num_partitions=N, partition=i,
            shard_size="40")  # several shards per part: renaming is exercised
        outs.append(out)
    return outs


@pytest.fixture(scope="module")
def merged(tmp_path_factory, parts):
    out = tmp_path_factory.mktemp("merged") / "ds"
    rc = merge_main([str(p) for p in reversed(parts)] + [str(out), "--quiet"])  # any order
    assert rc == 0
    return out, json.loads((out / F.MANIFEST).read_text())


# ---------------------------------------------------------------- partitions

def test_check_partition_arguments():
    assert check_partition(1, None) == (1, None)
    assert check_partition(4, 3) == (4, 3)
    for n, i, msg in ((4, None, "needs --partition"), (4, 4, "between 0 and 3"),
                      (2, -1, "between 0 and 1"), (0, None, "at least 1")):
        with pytest.raises(PacktrainError, match=msg):
            check_partition(n, i)


def test_partitions_are_disjoint_balanced_round_robin_blocks(single, parts):
    _, m = single
    total = m["stats"]["records"]
    assert total == 1300
    seen: set[int] = set()
    for i, p in enumerate(parts):
        pm = json.loads((p / F.MANIFEST).read_text())
        assert pm["partition"] == {"index": i, "count": N, "block_records": PARTITION_BLOCK,
                                   "rule": "round-robin"}
        assert pm["sources"] == m["sources"]  # the whole build's sources and record counts
        idx = {s[0] for s in samples(p)}
        assert not idx & seen
        seen |= idx
        # block b of each file (JSONL: records 0..999, Parquet: 1000..1299) -> partition b % N
        blocks = [(k // PARTITION_BLOCK) if k < 1000 else 8 + (k - 1000) // PARTITION_BLOCK
                  for k in idx]
        assert {b % N for b in blocks} == {i}
        # balanced: within one block of an even share
        assert abs(pm["stats"]["records"] - total / N) <= PARTITION_BLOCK
    assert seen == {s[0] for s in samples(single[0])}


def test_merge_equals_single_build(single, parts, merged):
    s_out, sm = single
    m_out, mm = merged
    assert samples(m_out) == samples(s_out)  # same record numbers, tokens and labels
    a, b = sm["stats"], mm["stats"]
    for k in ("records", "samples_packed", "tokens", "label_tokens", "truncated",
              "truncated_tokens", "dropped", "skipped_invalid", "lower_bound",
              "length_histogram"):
        assert a[k] == b[k], k
    assert a["packs"] <= b["packs"] <= packs_bound(a["packs"], N)
    assert b["fill"] == round(b["tokens"] / (b["packs"] * MAXLEN), 6)
    assert sum(b["fill_histogram"]["counts"]) == b["packs"]
    assert not set(TIMING_FIELDS) & set(b)
    for k in ("sources", "tokenizer", "template", "max_length", "format_version"):
        assert mm[k] == sm[k], k
    for k in ("strategy", "seed", "overlong"):  # the parts were built with other shard sizes
        assert mm["packing"][k] == sm["packing"][k]
    assert "partition" not in mm and mm["arguments"]["partition"] is None
    assert mm["arguments"]["num_partitions"] == N and mm["arguments"]["out"] == str(m_out)
    assert F.verify(m_out) == []
    assert (m_out / "README.md").is_file()


def test_merge_hard_links_shards_in_partition_order(parts, merged):
    out, m = merged
    assert m["merged"]["shard_files"] == "hard-linked"
    names = [s["path"] for s in m["shards"]]
    assert names == [F.shard_name(k) for k in range(len(names))]
    k = 0
    for i, p in enumerate(parts):
        pm = json.loads((p / F.MANIFEST).read_text())
        info = m["merged"]["parts"][i]
        assert info["index"] == i and info["shards"] == [k, k + len(pm["shards"])]
        for s in pm["shards"]:
            dst = out / m["shards"][k]["path"]
            assert dst.stat().st_ino == (p / s["path"]).stat().st_ino
            assert m["shards"][k]["sha256"] == s["sha256"]
            k += 1
    assert k == len(names) > N


def test_merge_copy(parts, tmp_path):
    out = tmp_path / "copied"
    m = merge([str(p) for p in parts], str(out), copy=True)
    assert m["merged"]["shard_files"] == "copied"
    first = parts[0] / json.loads((parts[0] / F.MANIFEST).read_text())["shards"][0]["path"]
    assert (out / F.shard_name(0)).stat().st_ino != first.stat().st_ino
    assert F.verify(out) == []
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_combine_stats_sums_and_recomputes():
    a = {"records": 3, "tokens": 10, "packs": 1, "dropped": {"empty": 1},
         "length_histogram": {"edges": [1, 16, 33], "counts": [1, 2]}, "fill": 0.3,
         "lower_bound": 1, "seconds": 1.0}
    b = {"records": 4, "tokens": 30, "packs": 2, "dropped": {"empty": 2, "overlong": 1},
         "length_histogram": {"edges": [1, 16, 33], "counts": [0, 5]}, "fill": 0.4,
         "lower_bound": 1, "seconds": 2.0}
    c = combine_stats([a, b], 32)
    assert c == {"records": 7, "tokens": 40, "packs": 3, "dropped": {"empty": 3, "overlong": 1},
                 "length_histogram": {"edges": [1, 16, 33], "counts": [1, 7]},
                 "lower_bound": 2, "fill": round(40 / 96, 6)}
    b["length_histogram"]["edges"] = [1, 8, 33]
    with pytest.raises(PacktrainError, match="edges differ"):
        combine_stats([a, b], 32)


# ---------------------------------------------------------------- bad merges

def _copy_part(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst)
    if edit:
        m = json.loads((dst / F.MANIFEST).read_text())
        edit(m)
        (dst / F.MANIFEST).write_text(json.dumps(m))
    return dst


def _refused(capsys, argv, *needles):
    rc = merge_main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_bad_merges_refused(parts, single, tmp_path, capsys):
    p = [str(x) for x in parts]
    out = tmp_path / "out"
    _refused(capsys, [p[0], p[2], str(out)], "partition 1 of 3 missing")
    _refused(capsys, [p[0], p[1], p[1], p[2], str(out)], "both partition 1")
    _refused(capsys, [p[0], p[1], str(single[0]), str(out)], "not a partition build")

    def seed(m):
        m["arguments"]["seed"] = 5
        m["packing"]["seed"] = 5
    other = _copy_part(parts[1], tmp_path / "seed", seed)
    _refused(capsys, [p[0], str(other), p[2], str(out)], "seed differs", "not partitions")

    def tok(m):
        m["tokenizer"]["fingerprint"] = "sha256:" + "0" * 64
    other = _copy_part(parts[1], tmp_path / "tok", tok)
    _refused(capsys, [p[0], str(other), p[2], str(out)], "tokenizer.fingerprint differs")

    def src(m):
        m["sources"][0]["sha256"] = "f" * 64
    other = _copy_part(parts[2], tmp_path / "src", src)
    _refused(capsys, [p[0], p[1], str(other), str(out)], "sources[0].sha256 differs")

    def count(m):
        m["partition"]["count"] = 4
    other = _copy_part(parts[2], tmp_path / "count", count)
    _refused(capsys, [p[0], p[1], str(other), str(out)], "partition.count")

    damaged = _copy_part(parts[1], tmp_path / "damaged")
    shard = damaged / json.loads((damaged / F.MANIFEST).read_text())["shards"][0]["path"]
    with open(shard, "ab") as f:
        f.write(b"x")
    _refused(capsys, [p[0], str(damaged), p[2], str(out)], "rebuild it")
    linked = _copy_part(parts[1], tmp_path / "linked")
    shard = linked / json.loads((linked / F.MANIFEST).read_text())["shards"][0]["path"]
    outside = tmp_path / "outside.arrow"
    shard.rename(outside)
    shard.symlink_to(outside)  # same bytes, but a merge would depend on a file outside
    _refused(capsys, [p[0], str(linked), p[2], str(out)], "symbolic link")
    _refused(capsys, [*p, p[0]], "is also one of the parts")
    _refused(capsys, [*p, "s3://bucket/merged"], "writes a local directory")
    assert not out.exists()  # nothing was left behind by any refusal

    # a merge stopped half-way leaves no manifest and none of its files
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    _refused(capsys, [*p, str(tmp_path / "full")], "not empty")
    assert [x.name for x in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_merge_cleans_up_after_a_failure(parts, tmp_path, monkeypatch):
    import pack.merge as M

    calls = {"n": 0}
    real = M._place

    def failing(src, dst, copy):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device", str(dst))
        return real(src, dst, copy)

    monkeypatch.setattr(M, "_place", failing)
    out = tmp_path / "m"
    with pytest.raises(OSError):
        merge([str(x) for x in parts], str(out))
    assert not out.exists()


# ---------------------------------------------------------------- skipped records, CLI

def test_skip_invalid_counts_and_numbers_survive_partitions(tokenizer_dir, tmp_path):
    """Invalid lines and records are skipped and counted once; record numbers match the whole
    build, in JSON Lines (parsed by workers) and in a .json file (parsed by the reader)."""
    recs = alpaca_records(400, skip=1300)
    lines = [json.dumps(r) for r in recs]
    for k in (5, 140, 141, 300, 399):
        lines[k] = "{not json"
    lines[200] = json.dumps({"instruction": "no output"})  # fails in the template
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("\n".join(lines[:260]) + "\n")
    b.write_text("\n".join(lines[260:]) + "\n{bad\n")  # JSON Lines in a .json file
    whole = run([a, b], tmp_path / "whole", tokenizer_dir, skip_invalid=True, workers=2)
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"p{i}")
        run([a, b], outs[-1], tokenizer_dir, skip_invalid=True, num_partitions=2, partition=i)
    m = merge([str(o) for o in outs], str(tmp_path / "m"))
    assert m["stats"]["skipped_invalid"] == whole["stats"]["skipped_invalid"]
    assert sum(whole["stats"]["skipped_invalid"].values()) == 7
    # 401 lines - 6 that are not JSON (the record that fails its template counts as read)
    assert m["stats"]["records"] == whole["stats"]["records"] == 395
    assert samples(tmp_path / "m") == samples(tmp_path / "whole")
    assert m["sources"] == whole["sources"]


def test_partition_errors(tokenizer_dir, corpus, tmp_path, capsys):
    out = tmp_path / "o"
    for argv, needle in (
            (["--num-partitions", "3"], "needs --partition I (0 to 2)"),
            (["--num-partitions", "3", "--partition", "3"], "between 0 and 2"),
            (["--num-partitions", "20", "--partition", "19"], "got no records")):
        rc = build_main(["--tokenizer", str(tokenizer_dir), "--quiet", "--workers", "1",
                         str(corpus[1]), str(out), *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: ") and needle in err and "\n" not in err, err
        assert not out.exists()


def test_pack_merge_console_script(parts, tmp_path):
    exe = Path(sys.executable).parent / "pack-merge"
    r = subprocess.run([str(exe), *map(str, parts), str(tmp_path / "m")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 partitions; shards hard-linked" in r.stderr
    r = subprocess.run([str(exe), str(parts[0]), str(tmp_path / "m2")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "partitions 1, 2 of 3 missing" in r.stderr


@pytest.mark.slow
def test_train_run_on_merged_dataset(merged, tokenizer_dir, tmp_path):
    """train-run trains on a merged dataset (one process, tiny random Llama, 2 steps)."""
    from train.tiny import make_tiny_model

    out, _ = merged
    model = make_tiny_model("llama", tokenizer_dir, tmp_path / "model", hidden=32, layers=2,
                            heads=4, kv_heads=2, seed=0)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([str(Path(sys.executable).parent / "train-run"), "--shards", str(out),
                        "--model", str(model), "--output", str(tmp_path / "run"),
                        "--dtype", "fp32", "--max-steps", "2", "--no-export"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    assert metrics and all(m["loss"] == m["loss"] for m in metrics)  # not NaN
