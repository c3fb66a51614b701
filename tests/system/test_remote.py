"""Remote datasets (pack/remote.py) against a real S3-compatible server on loopback.

moto's S3 server runs in a thread on 127.0.0.1 (a real HTTP endpoint: pyarrow's S3 client talks
to it through AWS_ENDPOINT_URL exactly as it would to AWS). The dataset is real chat data packed
by pack-build with the real Llama 3 tokenizer, in 4 shards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import exchanges_jsonl

pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
BUCKET = "packtrain-test"
BUILD = ["--max-length", "128", "--shard-size", "8", "--workers", "1", "--quiet"]
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
            "AWS_DEFAULT_REGION", "AWS_EC2_METADATA_DISABLED", "PACKTRAIN_CACHE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on loopback, the AWS environment pointing at it, and one bucket."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in AWS_VARS}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_REGION="us-east-1",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                      PACKTRAIN_CACHE=str(tmp_path_factory.mktemp("cache")))
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def keys(client, prefix: str) -> list[str]:
    """Object names under a prefix. pyarrow's delete_file leaves an empty "prefix/" directory
    marker behind (S3 has no directories); it is not a file and is left out here."""
    got = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"][len(prefix):] for o in got if o["Key"] != prefix)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return exchanges_jsonl(tmp_path_factory.mktemp("corpus") / "ex.jsonl", 84)


@pytest.fixture(scope="module")
def local_ds(tokenizer_dir, corpus, tmp_path_factory) -> Path:
    from pack.cli import build_main

    out = tmp_path_factory.mktemp("local") / "ds"
    assert build_main(["--tokenizer", str(tokenizer_dir), *BUILD, str(corpus), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def published(s3, tokenizer_dir, corpus) -> str:
    """pack-build straight into s3://BUCKET/ds/."""
    from pack.cli import build_main

    url = f"s3://{BUCKET}/ds/"
    assert build_main(["--tokenizer", str(tokenizer_dir), *BUILD, str(corpus), url]) == 0
    return url


def publish_copy(local: Path, prefix: str) -> str:
    """Upload an already built dataset under another prefix (pack.remote.upload_dataset)."""
    from pack.remote import check_target, upload_dataset

    url = f"s3://{BUCKET}/{prefix}/"
    upload_dataset(local, check_target(url, overwrite=False), quiet=True)
    return url


# ---------------------------------------------------------------- publish, verify, info

def test_pack_build_to_s3_then_verify_and_info(s3, published, local_ds, capsys):
    from pack.cli import info_main, verify_main
    from pack.format import read_manifest
    from pack.remote import read_manifest as read_any

    local = read_manifest(local_ds)
    names = [s["path"] for s in local["shards"]]
    assert len(names) == 4
    # everything uploaded, nothing else (no directory markers, no staging files)
    assert keys(s3, "ds/") == sorted(names + ["README.md", "manifest.json"])
    remote = read_any(published)
    # the same bytes as a local build of the same inputs and arguments
    assert [(s["path"], s["sha256"]) for s in remote["shards"]] == \
        [(s["path"], s["sha256"]) for s in local["shards"]]
    assert remote["arguments"]["out"] == f"s3://{BUCKET}/ds/"
    body = s3.get_object(Bucket=BUCKET, Key="ds/shard-00002.arrow")["Body"].read()
    assert body == (local_ds / "shard-00002.arrow").read_bytes()

    capsys.readouterr()
    assert verify_main([published, "--quiet"]) == 0
    assert verify_main([published]) == 0
    out = capsys.readouterr().out
    assert f"OK: 4 shards, {local['stats']['packs']} packs" in out
    assert info_main([published]) == 0
    out = capsys.readouterr().out
    assert str(local["stats"]["packs"]) in out and local["tokenizer"]["fingerprint"][:20] in out
    assert info_main([published, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == remote["shards"]


def test_shards_fetched_on_first_use_then_served_from_cache(s3, local_ds, tmp_path):
    """Opening a URL fetches only the manifest; reading a pack fetches its shard alone (checked
    and renamed into place); a second open of the unchanged dataset reads nothing but the
    manifest: it still works after the shard objects are deleted from the server."""
    import numpy as np
    from pack.format import PackedDataset
    from pack.remote import RemotePackedDataset, resolve

    url = publish_copy(local_ds, "lazy")
    cache = tmp_path / "cache"
    view = Path(resolve(url, cache))
    assert view.parent == cache
    assert sorted(p.name for p in view.iterdir() if not p.name.startswith(".")) == \
        ["manifest.json"]
    ref = PackedDataset(local_ds)
    ds = RemotePackedDataset(view, prefetch=False)
    last = len(ds) - 1  # a pack in the last shard
    assert all(np.array_equal(ds[last][c], ref[last][c]) for c in ref[last])
    assert sorted(p.name for p in view.glob("shard-*.arrow")) == ["shard-00003.arrow"]
    assert not list(view.glob(".*.part-*"))  # no temporary file left behind

    for i in range(len(ds)):  # the rest, through the background prefetch this time
        assert np.array_equal(RemotePackedDataset(view)[i]["input_ids"], ref[i]["input_ids"])
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in view.glob("shard-*")}
    assert len(stamps) == 4

    for name in stamps:  # the server no longer has the shards: only the cache can serve them
        s3.delete_object(Bucket=BUCKET, Key=f"lazy/{name}")
    again = Path(resolve(url, cache))
    assert again == view
    ds2 = RemotePackedDataset(again)
    assert all(np.array_equal(ds2[i]["labels"], ref[i]["labels"]) for i in range(len(ds2)))
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in view.glob("shard-*")} == stamps


def test_concurrent_readers_fetch_each_shard_once(s3, local_ds, tmp_path, monkeypatch):
    """Threads (like ranks sharing a node's cache) asking for the same shard download it once;
    scan_ready(fetch_all=True) (train-run --verify) brings every shard local, in order."""
    import threading
    import time

    from pack import remote

    url = publish_copy(local_ds, "shared")
    view = remote.resolve(url, tmp_path / "cache")
    real, fetched = remote.Store.download, []

    def slow(self, name, dest, size, stop=None):
        fetched.append(name)
        time.sleep(0.3)  # long enough for every thread to be waiting on the lock
        return real(self, name, dest, size, stop)

    monkeypatch.setattr(remote.Store, "download", slow)
    threads = [threading.Thread(target=remote.Fetcher(view).ensure, args=(2,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetched == ["shard-00002.arrow"]
    assert not remote.scan_ready(view)  # streaming: preflight leaves shards to the fetcher
    assert remote.scan_ready(view, fetch_all=True)
    assert sorted(fetched) == [f"shard-0000{i}.arrow" for i in range(4)]
    assert remote.Fetcher(view).missing() == []


# ---------------------------------------------------------------- refusals

def test_tampered_or_missing_shard_is_refused(s3, local_ds, tmp_path, capsys):
    from pack.cli import verify_main
    from pack.errors import FormatError
    from pack.remote import RemotePackedDataset, resolve, scan_ready

    url = publish_copy(local_ds, "tampered")
    body = bytearray(s3.get_object(Bucket=BUCKET, Key="tampered/shard-00001.arrow")["Body"].read())
    body[len(body) // 2] ^= 0xFF  # same size, one byte changed
    s3.put_object(Bucket=BUCKET, Key="tampered/shard-00001.arrow", Body=bytes(body))
    cache = tmp_path / "cache"
    capsys.readouterr()
    assert verify_main([url, "--quiet", "--cache-dir", str(cache)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("FAIL ")
    assert f"s3://{BUCKET}/tampered/shard-00001.arrow: sha256" in out[0]
    assert "republish" in out[0]
    view = Path(resolve(url, cache))
    assert not (view / "shard-00001.arrow").exists()   # never cached under its final name
    assert (view / "shard-00002.arrow").exists()       # the good ones are
    ds = RemotePackedDataset(view, prefetch=False)
    first_of_shard1 = int(ds.offsets[1])
    with pytest.raises(FormatError, match="shard-00001.arrow: sha256"):
        ds[first_of_shard1]
    with pytest.raises(FormatError, match="shard-00001.arrow: sha256"):
        scan_ready(view, fetch_all=True)  # train-run --verify refuses it before training

    s3.delete_object(Bucket=BUCKET, Key="tampered/shard-00003.arrow")
    ds = RemotePackedDataset(Path(resolve(url, tmp_path / "cache2")), prefetch=False)
    with pytest.raises(FormatError, match="shard-00003.arrow: no such object"):
        ds[len(ds) - 1]


def test_url_errors_are_one_line(s3, capsys):
    from pack.cli import info_main, verify_main

    cases = [
        ([f"s3://{BUCKET}/nothing-here/"], "manifest.json: missing"),
        (["s3://no-such-bucket-x/ds/"], "bucket 'no-such-bucket-x' does not exist"),
        (["foo://somewhere/ds/"], "unsupported storage URL"),
        ([f"s3://{BUCKET}/ds/?endpoint_override=127.0.0.1:1&scheme=http"],
         "cannot reach the storage endpoint"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert info_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and expected in err, err
        assert "Traceback" not in err
    capsys.readouterr()
    assert verify_main([f"s3://{BUCKET}/nothing-here/", "--quiet"]) == 1
    assert "manifest.json: missing" in capsys.readouterr().out
    from train.cli import run_main

    assert run_main(["--shards", f"s3://{BUCKET}/nothing-here/", "--model", "m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nothing-here/manifest.json: missing" in err


def test_overwrite_semantics(s3, tokenizer_dir, corpus, local_ds, monkeypatch, capsys):
    from pack import remote
    from pack.cli import build_main, info_main
    from pack.errors import PacktrainError

    url = publish_copy(local_ds, "ow")
    argv = ["--tokenizer", str(tokenizer_dir), *BUILD, str(corpus), url]
    capsys.readouterr()
    assert build_main(argv) == 2
    assert "holds a packed dataset; pass --overwrite" in capsys.readouterr().err
    # a prefix holding someone else's files is not written into without --overwrite either
    s3.put_object(Bucket=BUCKET, Key="other/notes.txt", Body=b"keep me")
    assert build_main(argv[:-1] + [f"s3://{BUCKET}/other/"]) == 2
    assert "is not empty (1 objects); pass --overwrite" in capsys.readouterr().err

    # --overwrite with 2 shards instead of 4: the old shards go, the new dataset verifies
    bigger = [a if a != "8" else "16" for a in argv]
    assert build_main([*bigger, "--overwrite"]) == 0
    assert keys(s3, "ow/") == ["README.md", "manifest.json", "shard-00000.arrow",
                               "shard-00001.arrow"]
    assert len(remote.read_manifest(url)["shards"]) == 2
    assert remote.verify(url) == []
    assert build_main(argv[:-1] + [f"s3://{BUCKET}/other/", "--overwrite"]) == 0
    assert "notes.txt" in keys(s3, "other/")  # not ours: left alone

    # an upload cut short leaves no manifest: the half-replaced dataset never looks complete
    real = remote.Store.upload
    calls = []

    def flaky(self, local, name, bar=None):
        calls.append(name)
        if len(calls) == 2:
            raise PacktrainError(f"{self.where}/{name}: network down")
        return real(self, local, name, bar)

    monkeypatch.setattr(remote.Store, "upload", flaky)
    assert build_main([*argv, "--overwrite"]) == 2
    assert "network down" in capsys.readouterr().err
    assert "manifest.json" not in keys(s3, "ow/")
    assert info_main([url]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["fsspec-memory", "pyarrow-file"])
def test_other_filesystems_roundtrip(local_ds, tmp_path, kind):
    """A scheme pyarrow does not know goes through fsspec (here its in-memory filesystem);
    file:// through pyarrow's local filesystem (directories made as needed)."""
    from pack import remote

    if kind == "fsspec-memory":
        url = "memory://packtrain-test/ds"
    else:
        url = (tmp_path / "published" / "ds").as_uri()
    store = remote.check_target(url, overwrite=False)
    assert (type(store.fs).__name__ == "PyFileSystem") == (kind == "fsspec-memory")
    remote.upload_dataset(local_ds, store, quiet=True)
    assert remote.verify(url, cache_dir=tmp_path / "cache") == []
    with pytest.raises(remote.PacktrainError, match="holds a packed dataset"):
        remote.check_target(url, overwrite=False)


def test_local_paths_pass_through(local_ds):
    from pack.format import PackedDataset
    from pack.remote import is_remote, is_url, open_dataset, resolve, scan_ready

    assert resolve(str(local_ds)) == str(local_ds)
    assert not is_url(str(local_ds)) and not is_url("C:\\data") and is_url("gs://b/p")
    assert type(open_dataset(local_ds)) is PackedDataset
    assert not is_remote(local_ds) and scan_ready(local_ds)


# ---------------------------------------------------------------- training from S3

def _train(shards: str, model: Path, out: Path, *extra: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [str(Path(sys.executable).parent / "train-run"), "--shards", shards, "--model",
           str(model), "--output", str(out), "--zero", "0", "--dtype", "fp32", "--max-steps",
           "1", "--micro-batch", "2", "--grad-accum", "2", "--lr", "1e-3", "--no-export",
           "--seed", "0", *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_train_one_step_from_s3_equals_local(s3, published, local_ds, tokenizer_dir, tmp_path):
    from train.tiny import make_tiny_model

    model = make_tiny_model("llama", tokenizer_dir, tmp_path / "model", hidden=32, layers=2,
                            heads=4, kv_heads=2, seed=0)
    cache = tmp_path / "cache"
    remote = _train(published, model, tmp_path / "from-s3", "--cache-dir", str(cache))
    local = _train(str(local_ds), model, tmp_path / "local")
    assert len(remote) == len(local) == 1
    assert remote[0]["loss"] == local[0]["loss"] and remote[0]["loss"] > 0
    run = json.loads((tmp_path / "from-s3" / "run.json").read_text())
    assert run["args"]["shards_url"] == published
    # OUTPUT/config.yaml records the URL, not the local cache view, so it repeats the run
    import yaml

    config = yaml.safe_load((tmp_path / "from-s3" / "config.yaml").read_text())
    assert config["shards"] == [published]  # --shards repeats: a list
    assert Path(run["shards"]).parent == cache.resolve()
    # the stream fetched what it read (and the prefetch the rest); all of it checked
    assert len(list(Path(run["shards"]).glob("shard-*.arrow"))) == 4
    shutil.rmtree(cache)


# ---------------------------------------------------------------- the cache is checked on reuse

def test_cached_shard_changed_in_place_is_fetched_again(s3, local_ds, tmp_path, capsys):
    """A cached shard edited in place (same size) used to be trained on, and pack-verify URL
    reported it but left it there. Now a shard whose verified marker no longer matches is hashed
    again before use; a bad one is deleted and fetched anew."""
    import numpy as np
    from pack.cli import verify_main
    from pack.files import file_sha256
    from pack.format import PackedDataset
    from pack.remote import Fetcher, RemotePackedDataset, resolve

    url = publish_copy(local_ds, "cached")
    cache = tmp_path / "cache"
    view = Path(resolve(url, cache))
    assert Fetcher(view).fetch_all() == []
    manifest = json.loads((view / "manifest.json").read_text())
    shard = view / manifest["shards"][1]["path"]
    assert (view / f".{shard.name}.verified").is_file()

    def tamper() -> None:
        body = bytearray(shard.read_bytes())
        body[len(body) // 2] ^= 0xFF
        with open(shard, "r+b") as f:  # in place: same inode, same size
            f.write(body)

    tamper()
    ref = PackedDataset(local_ds)
    ds = RemotePackedDataset(view, prefetch=False)
    i = int(ds.offsets[1])
    assert all(np.array_equal(ds[i][c], ref[i][c]) for c in ref[i])
    assert file_sha256(shard) == manifest["shards"][1]["sha256"]

    tamper()
    capsys.readouterr()
    assert verify_main([url, "--quiet", "--cache-dir", str(cache)]) == 0
    assert file_sha256(shard) == manifest["shards"][1]["sha256"]

    # a shard fetched before markers existed (or whose marker is lost) is hashed once, then
    # trusted again without a second download
    (view / f".{shard.name}.verified").unlink()
    before = shard.stat().st_ino
    assert Fetcher(view).missing() == []
    assert shard.stat().st_ino == before and (view / f".{shard.name}.verified").is_file()


def test_secrets_never_in_messages(capsys):
    """user:password and query values are redacted from every message, pyarrow's and fsspec's
    texts included; a missing fsspec back-end is named (not 'fsspec is not installed')."""
    from pack.cli import info_main, verify_main
    from pack.remote import reopenable

    secret = "SuperSecret123"
    cases = [f"http://user:{secret}@127.0.0.1:1/ds/", f"gs://b/ds/?access_token={secret}",
             f"s3://b/ds/?endpoint_override=127.0.0.1:1&scheme=http&secret_key={secret}",
             f"foo://u:{secret}@x/ds?token={secret}"]
    for url in cases:
        for main in (info_main, verify_main):
            capsys.readouterr()
            rc = main([url])
            out = capsys.readouterr()
            text = out.out + out.err
            assert rc in (1, 2), (url, rc)
            assert secret not in text, text
            assert "Traceback" not in text and len(text.strip().splitlines()) == 1, text
            assert "fsspec is not installed" not in text, text
    import importlib.util

    if importlib.util.find_spec("aiohttp") is None:  # the test extra does not install it
        capsys.readouterr()
        assert info_main([cases[0]]) == 2
        assert "pip install aiohttp" in capsys.readouterr().err
    assert reopenable(f"s3://u:{secret}@b/ds/?endpoint_override=h:1&access_token={secret}") \
        == "s3://b/ds/?endpoint_override=h:1"


def test_shard_in_a_subfolder_is_fetched(s3, local_ds, tmp_path):
    """A manifest may name a shard in a subfolder (sub/x.arrow): it is fetched into the same
    subfolder of the cache (its lock and download files beside it), not refused with a
    confusing lock-file error."""
    import numpy as np
    from pack.cli import verify_main
    from pack.format import PackedDataset, verify
    from pack.remote import RemotePackedDataset, resolve

    local = Path(shutil.copytree(local_ds, tmp_path / "nested"))
    m = json.loads((local / "manifest.json").read_text())
    (local / "sub").mkdir()
    for s in m["shards"][1:]:
        (local / s["path"]).rename(local / "sub" / s["path"])
        s["path"] = f"sub/{s['path']}"
    (local / "manifest.json").write_text(json.dumps(m))
    assert verify(local) == []
    url = f"s3://{BUCKET}/nested/"
    for s in m["shards"]:
        s3.upload_file(str(local / s["path"]), BUCKET, f"nested/{s['path']}")
    s3.upload_file(str(local / "manifest.json"), BUCKET, "nested/manifest.json")
    ref = PackedDataset(local_ds)
    ds = RemotePackedDataset(Path(resolve(url, tmp_path / "cache")), prefetch=False)
    assert all(np.array_equal(ds[i]["input_ids"], ref[i]["input_ids"]) for i in range(len(ds)))
    assert verify_main([url, "--quiet", "--cache-dir", str(tmp_path / "cache2")]) == 0
