"""Hugging Face datasets as pack-build inputs: save_to_disk directories (Dataset and
DatasetDict), recorded in the manifest, reproducible; the hub gives a one-line error offline."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pack import format as F
from pack.build import build
from pack.cli import build_main
from pack.hf_source import is_hf_dataset_dir

datasets = pytest.importorskip("datasets")

MAXLEN = 1024


def run(inputs, out, tok, **kw) -> dict:
    args = dict(inputs=[str(i) for i in inputs], out=str(out), tokenizer=str(tok),
                max_length=MAXLEN, workers=1, quiet=True)
    args.update(kw)
    return build(args)


def digests(out: Path) -> dict[str, str]:
    return {p.name: F.file_sha256(p) for p in sorted(out.glob("shard-*.arrow"))}


@pytest.fixture(scope="module")
def records(chat_jsonl) -> list[dict]:
    return [json.loads(line) for line in chat_jsonl.read_text().splitlines()]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, records) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hf")
    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(records)
    ds.save_to_disk(str(d / "ds"), max_shard_size="200KB")  # several Arrow files
    dd = datasets.DatasetDict({"train": ds.select(range(150)),
                               "test": ds.select(range(150, 200))})
    dd.save_to_disk(str(d / "dd"))
    return {"ds": d / "ds", "dd": d / "dd"}


@pytest.fixture(scope="module")
def jsonl_build(tmp_path_factory, tokenizer_dir, chat_jsonl):
    out = tmp_path_factory.mktemp("jsonl") / "out"
    return out, run([chat_jsonl], out, tokenizer_dir)


def test_save_to_disk_dir_packs_like_the_same_records_in_jsonl(hf_dirs, jsonl_build,
                                                               tokenizer_dir, tmp_path):
    src = hf_dirs["ds"]
    files = sorted(src.glob("data-*.arrow"))
    assert len(files) > 1 and is_hf_dataset_dir(src)
    m = run([src], tmp_path / "out", tokenizer_dir)
    ref_out, ref = jsonl_build
    # same records through the same detection, template and packing: the same shards
    assert digests(tmp_path / "out") == digests(ref_out)
    assert m["stats"]["samples_packed"] == ref["stats"]["samples_packed"]
    assert m["template"] == ref["template"] and m["template"]["format"] == "messages"
    (s,) = m["sources"]
    assert s["path"] == str(src) and s["kind"] == "hf-dataset" and s["records"] == 200
    assert s["split"] is None
    assert [f["path"] for f in s["files"]] == [f.name for f in files]
    listing = "".join(f"{F.file_sha256(f)}  {f.name}\n" for f in files)
    assert s["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert s["bytes"] == sum(f.stat().st_size for f in files)
    assert F.verify(tmp_path / "out") == []


def test_rebuild_from_a_dataset_dir_is_byte_identical(hf_dirs, tokenizer_dir, tmp_path):
    a = run([hf_dirs["dd"]], tmp_path / "a", tokenizer_dir, workers=2)
    b = run([hf_dirs["dd"]], tmp_path / "b", tokenizer_dir)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert a["sources"] == b["sources"]
    card = tmp_path / "a" / "README.md"
    assert card.read_bytes() == (tmp_path / "b" / "README.md").read_bytes()


def test_datasetdict_split(hf_dirs, tokenizer_dir, tmp_path, capsys):
    dd = hf_dirs["dd"]
    m = run([dd], tmp_path / "train", tokenizer_dir)  # default: train
    assert m["sources"][0]["split"] == "train" and m["sources"][0]["records"] == 150
    m = run([dd], tmp_path / "test", tokenizer_dir, split="test")
    (s,) = m["sources"]
    assert s["split"] == "test" and s["records"] == 50 and m["arguments"]["split"] == "test"
    assert all(f["path"].startswith("test/") for f in s["files"])
    assert {int(i) for row in F.PackedDataset(tmp_path / "test")
            for i in row["sample_index"]} == set(range(50))

    rc = build_main(["--tokenizer", str(tokenizer_dir), str(dd), str(tmp_path / "x"),
                     "--split", "validation", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "no split 'validation' (splits: train, test); pass --split NAME" in err
    assert not (tmp_path / "x").exists()


def test_mixed_inputs_and_partitions_of_a_dataset_dir(hf_dirs, tokenizer_dir, chat_jsonl,
                                                       tmp_path):
    """A dataset directory mixes with files and partitions like a file does."""
    from pack.merge import merge

    whole = run([chat_jsonl, hf_dirs["ds"]], tmp_path / "w", tokenizer_dir)
    assert [s.get("kind") for s in whole["sources"]] == [None, "hf-dataset"]
    assert whole["stats"]["records"] == 400
    for i in range(2):
        run([chat_jsonl, hf_dirs["ds"]], tmp_path / f"p{i}", tokenizer_dir, num_partitions=2,
            partition=i)
    m = merge([str(tmp_path / "p0"), str(tmp_path / "p1")], str(tmp_path / "m"))
    for k in ("records", "samples_packed", "tokens", "label_tokens"):
        assert m["stats"][k] == whole["stats"][k]


def test_broken_dataset_dirs(hf_dirs, tokenizer_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hf_dirs["ds"], bad)
    first = sorted(bad.glob("data-*.arrow"))[0]
    first.unlink()
    rc = build_main(["--tokenizer", str(tokenizer_dir), str(bad), str(tmp_path / "o"),
                     "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{first}: missing" in err and err.count("\n") == 1

    plain = tmp_path / "plain"
    plain.mkdir()
    rc = build_main(["--tokenizer", str(tokenizer_dir), str(plain), str(tmp_path / "o"),
                     "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "is a directory" in err
    assert not (tmp_path / "o").exists()


def test_hub_name_offline_is_one_line_error(tokenizer_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([str(Path(sys.executable).parent / "pack-build"), "--tokenizer",
                        str(tokenizer_dir), "hf://datasets/someone/some-data",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0]
    assert "save_to_disk" in lines[0]
    assert not (tmp_path / "o").exists()


def test_hub_dataset_is_cached_and_recorded(records, tokenizer_dir, tmp_path, monkeypatch):
    """The code around the hub call (no network here): the loaded split is saved once under
    PACKTRAIN_CACHE, read like a directory, and the manifest names the hub dataset."""
    import huggingface_hub

    calls = []

    def load_dataset(name, split=None, revision=None, **kw):
        assert not kw.get("trust_remote_code")
        calls.append((name, split, revision))
        return datasets.Dataset.from_list(records[:60])

    monkeypatch.setenv("PACKTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, *a, **k: None)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    name = "hf://datasets/someone/chat@v1"
    m = run([name], tmp_path / "a", tokenizer_dir, split="test")
    (s,) = m["sources"]
    assert calls == [("someone/chat", "test", "v1")]
    assert s["hub"] == name and s["split"] == "test" and s["records"] == 60
    assert Path(s["path"]).is_relative_to(tmp_path / "cache" / "hub")
    assert m["arguments"]["inputs"] == [name]
    saved = {p: p.stat().st_mtime_ns for p in Path(s["path"]).glob("data-*.arrow")}
    m2 = run([name], tmp_path / "b", tokenizer_dir, split="test")
    assert m2["sources"] == m["sources"] and len(calls) == 2  # loaded again, saved once
    assert {p: p.stat().st_mtime_ns for p in Path(s["path"]).glob("data-*.arrow")} == saved
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert not [p for p in Path(s["path"]).parent.iterdir() if p.name.startswith(".")]
