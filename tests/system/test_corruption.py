"""Corrupted data is named, never trained on: for each kind of damage, pack-verify names the
shard, row and rule, and train-run's pre-flight refuses to start with one line naming the shard;
damage that appears after the pre-flight (a shard changed under a running job) stops the data
stream with the shard and row.

tests/pack/test_verify.py (pack-verify) and tests/train/test_checks.py (pre-flight) already cover a flipped
byte, a truncated shard, a missing shard and most manifest edits for pack-verify, and a flipped
byte, a truncated shard, a wrong label and edited stats for the pre-flight; this file fills the
rest of the matrix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pack.cli import verify_main
from pack.errors import FormatError, PacktrainError
from pack.format import IGNORE_INDEX, PackedDataset, read_manifest
from helpers import rewrite_shard, rows_of
from train.checks import preflight
from train.data import PackStream, checked_pack


@pytest.fixture(scope="module")
def packed(chat_shards) -> Path:
    assert len(read_manifest(chat_shards)["shards"]) >= 3
    return chat_shards


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    from train.tiny import make_tiny_model

    return make_tiny_model("qwen3", tokenizer_dir, hidden=16, layers=1, heads=2, kv_heads=1)


@pytest.fixture
def ds(packed, tmp_path) -> Path:
    return Path(shutil.copytree(packed, tmp_path / "ds"))


# ---------------------------------------------------------------- the damage

def _first_label(r: dict) -> int:
    return int(np.nonzero(r["labels"] != IGNORE_INDEX)[0][0])


def bad_rows(ds: Path, kind: str, row: int) -> None:
    """Damage pack `row` of shard 1 (a valid Arrow file with a matching manifest entry, so only
    the invariant itself can object)."""
    rows = rows_of(ds, 1)
    r = rows[row]
    t = len(r["input_ids"])
    vocab = read_manifest(ds)["tokenizer"]["vocab_size"]
    if kind == "token-range":
        r["input_ids"][3] = vocab + 5
        r["labels"][3] = IGNORE_INDEX
    elif kind == "token-negative":
        r["input_ids"][3] = -7
        r["labels"][3] = IGNORE_INDEX
    elif kind == "cu-end":  # cu_seqlens does not end at T
        r["cu_seqlens"][-1] = t - 1
    elif kind == "cu-order":  # not strictly increasing
        assert len(r["cu_seqlens"]) > 2
        r["cu_seqlens"][1] = r["cu_seqlens"][2]
    elif kind == "position":
        r["position_ids"][t // 2] += 1
    elif kind == "labels":
        j = _first_label(r)
        r["labels"][j] = (r["input_ids"][j] + 1) % vocab
    elif kind == "labels-garbage":  # neither -100 nor the token: e.g. -1
        r["labels"][_first_label(r)] = -1
    else:  # pragma: no cover
        raise ValueError(kind)
    rewrite_shard(ds, rows, index=1)


RULES = {"token-range": "token-range", "token-negative": "token-range", "cu-end": "cu-seqlens",
         "cu-order": "cu-seqlens", "position": "position-ids", "labels": "labels",
         "labels-garbage": "labels"}


def fails(ds: Path, capsys, *flags: str) -> list[str]:
    capsys.readouterr()
    assert verify_main([str(ds), "--quiet", *flags]) == 1
    cap = capsys.readouterr()
    assert "Traceback" not in cap.out + cap.err
    return [line for line in cap.out.splitlines() if line.startswith("FAIL")]


def refused(ds: Path, model, tokenizer_dir, **kw) -> str:
    with pytest.raises(PacktrainError) as e:
        preflight(ds, read_manifest(ds), model, tokenizer_dir, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(ds) in msg, msg
    return msg


@pytest.mark.parametrize("kind", list(RULES))
def test_bad_pack_named_by_verify_and_refused_by_train(ds, kind, model, tokenizer_dir, capsys):
    bad_rows(ds, kind, row=7)
    lines = fails(ds, capsys)
    assert len(lines) == 1, lines
    assert "shard-00001.arrow row 7:" in lines[0] and f"[rule: {RULES[kind]}]" in lines[0]
    msg = refused(ds, model, tokenizer_dir)
    assert "shard-00001.arrow row 7:" in msg and f"[rule: {RULES[kind]}]" in msg


def test_missing_shard_refused_by_train(ds, model, tokenizer_dir):
    (ds / "shard-00002.arrow").unlink()
    msg = refused(ds, model, tokenizer_dir)
    assert "shard-00002.arrow" in msg and "[rule: shard-missing]" in msg


def test_truncated_to_header_refused(ds, model, tokenizer_dir, capsys):
    """Cut to a few bytes and the manifest edited to agree on the size: the file itself must
    then be refused as unreadable, not taken as an empty shard."""
    p = ds / "shard-00001.arrow"
    p.write_bytes(p.read_bytes()[:64])
    m = json.loads((ds / "manifest.json").read_text())
    m["shards"][1]["bytes"] = 64
    (ds / "manifest.json").write_text(json.dumps(m))
    (line,) = fails(ds, capsys, "--no-checksums")
    assert "shard-00001.arrow" in line and "[rule: shard-arrow]" in line
    msg = refused(ds, model, tokenizer_dir)
    assert "shard-00001.arrow" in msg and "[rule: shard-arrow]" in msg


@pytest.mark.parametrize("edit, rule, checksums", [
    (lambda m: m["shards"][2].update(packs=m["shards"][2]["packs"] - 1), "shard-rows", False),
    (lambda m: m["shards"][2].update(bytes=m["shards"][2]["bytes"] + 8), "shard-size", False),
    (lambda m: m["shards"][2].update(sha256="f" * 64), "checksum", True),
    (lambda m: m["shards"][2].update(tokens=m["shards"][2]["tokens"] + 3), "shard-tokens", False),
    (lambda m: m["shards"].pop(2), "stats-", False),
    (lambda m: m["tokenizer"].update(vocab_size=1000), "token-range", False),
    (lambda m: m.update(max_length=8), "max-length", False),
    (lambda m: m["stats"].update(samples_packed=m["stats"]["samples_packed"] + 1),
     "stats-samples-packed", False),
], ids=["packs", "bytes", "sha256", "tokens", "shard-dropped", "vocab", "max_length",
        "samples"])
def test_hand_edited_manifest_refused_by_train(ds, model, tokenizer_dir, capsys, edit, rule,
                                               checksums):
    m = json.loads((ds / "manifest.json").read_text())
    edit(m)
    (ds / "manifest.json").write_text(json.dumps(m, indent=2))
    lines = fails(ds, capsys)
    assert any(f"[rule: {rule}" in line for line in lines), lines
    if rule == "token-range":  # the vocabulary shrank: the model check or the scan refuses
        with pytest.raises(PacktrainError) as e:
            preflight(ds, read_manifest(ds), model, tokenizer_dir)
        assert "\n" not in str(e.value) and str(ds) in str(e.value)
        return
    msg = refused(ds, model, tokenizer_dir, full_checksums=checksums)
    assert f"[rule: {rule}" in msg, msg
    if rule.startswith("shard"):
        assert "shard-00002.arrow" in msg


def test_edited_format_version_stops_train_run_at_once(ds, tmp_path, capsys):
    from train.cli import run_main

    m = json.loads((ds / "manifest.json").read_text())
    m["format_version"] = "7.0"
    (ds / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert run_main(["--shards", str(ds), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert "manifest.json" in err and "format_version" in err and "[rule: format-version]" in err


# ---------------------------------------------------------------- found while streaming

def stream_all(ds: Path) -> int:
    stream = PackStream(PackedDataset(ds), seed=0, micro_batch=2, grad_accum=2)
    for _ in range(stream.steps_per_epoch):
        stream.next_step()
    return stream.steps_per_epoch


@pytest.mark.parametrize("kind", ["cu-end", "position", "token-range", "labels"])
def test_stream_stops_at_a_bad_pack(ds, kind):
    """A dataset that was never checked (or was changed after the check): the stream names the
    shard and the row instead of handing the pack to the model."""
    bad_rows(ds, kind, row=4)
    with pytest.raises(FormatError) as e:
        stream_all(ds)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{ds / 'shard-00001.arrow'} row 4:" in msg and f"[rule: {RULES[kind]}]" in msg
    assert "found while training" in msg


def test_shard_rewritten_in_place_after_preflight(ds, model, tokenizer_dir):
    """Pre-flight passes and the stream is set up; then a shard's cu_seqlens change on disk
    (same file and size, written in place) before the stream reaches it: the pack is refused
    when it is read, naming the shard and row."""
    assert preflight(ds, read_manifest(ds), model, tokenizer_dir) == []
    pd = PackedDataset(ds)
    stream = PackStream(pd, seed=0, micro_batch=1, grad_accum=1)
    probe = PackedDataset(ds)
    s = 1
    # the row with the most samples: its cu_seqlens bytes occur once in the file
    r = max(range(probe.shards[s]["packs"]),
            key=lambda k: len(probe[int(probe.offsets[s]) + k]["cu_seqlens"]))
    cu = np.array(probe[int(probe.offsets[s]) + r]["cu_seqlens"], dtype=np.int32)
    del probe
    path = ds / pd.shards[s]["path"]
    data = path.read_bytes()
    assert data.count(cu.tobytes()) == 1, "pattern not unique; pick another row"
    at = data.index(cu.tobytes()) + 4 * (len(cu) - 1)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(np.int32(cu[-1] - 2).tobytes())
    with pytest.raises(FormatError) as e:
        for _ in range(stream.steps_per_epoch):
            stream.next_step()
    assert f"shard-00001.arrow row {r}:" in str(e.value) and "[rule: cu-seqlens]" in str(e.value)


def test_streaming_check_costs_little_next_to_a_step(packed, model):
    """The per-pack check runs on every pack read; it must cost a small fraction of even a
    tiny model's forward+backward on that pack (real models take orders of magnitude longer)."""
    import torch

    from train.attention import enable_packed_attention
    from train.data import collate

    pd = PackedDataset(packed)
    longest = int(np.argmax(pd.lengths()))
    reps = 200
    t0 = time.perf_counter()
    for _ in range(reps):
        checked_pack(pd, longest)
    check_s = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        pd[longest]
    read_s = (time.perf_counter() - t0) / reps

    mb = collate([pd[longest]])
    enable_packed_attention(model, "packtrain_sdpa")
    step = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False,
                    cu_seq_lens_q=mb.cu_seqlens, cu_seq_lens_k=mb.cu_seqlens,
                    max_length_q=mb.max_seqlen, max_length_k=mb.max_seqlen)
        out.logits.float().sum().backward()
        step.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    step_s = min(step)
    if True:  # shown with -s
        print(f"\n[corruption] per-pack check {1e6 * (check_s - read_s):.0f} us "
              f"({mb.num_tokens} tokens), tiny-model fwd+bwd {1e3 * step_s:.1f} ms: "
              f"{100 * (check_s - read_s) / step_s:.2f}% of a step")
    assert check_s - read_s < 0.05 * step_s, (check_s, read_s, step_s)
    assert torch.isfinite(out.logits).all()


# ---------------------------------------------------------------- the real command line

@pytest.mark.slow
def test_train_run_cli_refuses_corrupt_dataset(ds, packed, tokenizer_dir, tmp_path):
    """train-run itself (a fresh process, DeepSpeed and all): exit 2, one line naming the
    shard, row and rule, no traceback, no checkpoint written."""
    from train.tiny import make_tiny_model

    model_dir = make_tiny_model("llama", tokenizer_dir, tmp_path / "model", hidden=16,
                                layers=1, heads=2, kv_heads=1)
    bad_rows(ds, "cu-end", row=2)
    out = tmp_path / "run"
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "train.cli", "--shards", str(ds), "--model",
                        str(model_dir), "--output", str(out), "--zero", "0", "--dtype", "fp32",
                        "--max-steps", "1", "--no-export"],
                       capture_output=True, text=True, timeout=500, env=env,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, r.stderr[-2000:]
    assert "shard-00001.arrow row 2:" in errors[0] and "[rule: cu-seqlens]" in errors[0]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())

    # A changed prompt token keeps every invariant valid: only the checksum, on by default for
    # a local dataset, can object.
    flip = Path(shutil.copytree(packed, tmp_path / "flip"))
    flip_prompt_token(flip)
    r = subprocess.run([sys.executable, "-m", "train.cli", "--shards", str(flip), "--model",
                        str(model_dir), "--output", str(tmp_path / "run2"), "--zero", "0",
                        "--dtype", "fp32", "--max-steps", "1", "--no-export"],
                       capture_output=True, text=True, timeout=500, env=env,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "shard-00000.arrow" in errors[0] and "sha256" in errors[0], \
        r.stderr[-2000:]


def flip_prompt_token(ds: Path) -> None:
    """Change one prompt token's id in place (file size and Arrow structure unchanged)."""
    shard = ds / "shard-00000.arrow"
    row = PackedDataset(ds)[0]
    ids, labels = row["input_ids"], row["labels"]
    data = bytearray(shard.read_bytes())
    for j in np.nonzero(labels == IGNORE_INDEX)[0][8:]:
        needle = ids[j - 8:j + 8].astype("<i4").tobytes()
        if data.count(needle) == 1:  # 16 tokens of user text: found once, in this row
            k = data.find(needle) + 4 * 8
            data[k:k + 4] = np.int32((int(ids[j]) + 1) % 1000).tobytes()
            shard.write_bytes(bytes(data))
            return
    raise AssertionError("no unique prompt span to change")


def test_changed_prompt_token_passes_invariants_but_not_checksums(packed, model, tokenizer_dir,
                                                                  tmp_path):
    from train.cli import parse_run_args
    from train.setup import checksums_wanted

    ds = Path(shutil.copytree(packed, tmp_path / "ds"))
    flip_prompt_token(ds)
    assert preflight(ds, read_manifest(ds), model, tokenizer_dir, full_checksums=False) == []
    msg = refused(ds, model, tokenizer_dir, full_checksums=True)
    assert "shard-00000.arrow" in msg and "sha256" in msg
    base = ["--shards", str(ds), "--output", str(tmp_path / "r")]
    assert checksums_wanted(parse_run_args(base)) is True
    assert checksums_wanted(parse_run_args(base + ["--no-verify"])) is False
    assert checksums_wanted(parse_run_args(base + ["--verify"])) is True


def test_hf_trainer_dataset_stops_at_a_bad_pack(ds):
    """The Trainer/TRL path (train.hf_data) checks each pack as the training loop does."""
    from train.hf_data import PackedTorchDataset

    bad_rows(ds, "cu-end", row=7)
    tds = PackedTorchDataset(ds)
    i = int(tds.packed.offsets[1]) + 7
    assert len(tds[i - 1]["input_ids"]) > 0
    with pytest.raises(FormatError) as e:
        tds[i]
    assert "shard-00001.arrow row 7" in str(e.value) and e.value.rule == "cu-seqlens"


# ---------------------------------------------------------------- links, duplicates, odd JSON

def _verify_lines(ds: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = verify_main([str(ds), "--quiet"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_symlinked_shard_is_refused(ds, tmp_path, capsys):
    """A shard that is a symbolic link (to the same bytes elsewhere, or to /etc/passwd) is
    refused by name: the manifest vouches only for files inside the dataset."""
    name = read_manifest(ds)["shards"][1]["path"]
    outside = tmp_path / "elsewhere.arrow"
    shutil.move(ds / name, outside)
    (ds / name).symlink_to(outside)  # the very bytes the manifest's sha256 names
    rc, text = _verify_lines(ds, capsys)
    assert rc == 1 and f"{name}: shard is a symbolic link" in text and "Traceback" not in text
    with pytest.raises(FormatError, match="symbolic link"):
        [PackedDataset(ds)[i] for i in range(len(PackedDataset(ds)))]
    (ds / name).unlink()
    (ds / name).symlink_to("/etc/passwd")
    rc, text = _verify_lines(ds, capsys)
    assert rc == 1 and "symbolic link" in text


def test_shard_listed_twice_is_refused(ds, capsys):
    m = json.loads((ds / "manifest.json").read_text())
    m["shards"].append(dict(m["shards"][0]))
    m["shards"][-1]["path"] = "./" + m["shards"][0]["path"]  # the same file, spelt otherwise
    for key in ("packs", "tokens"):
        m["stats"][key] += m["shards"][0][key]
    (ds / "manifest.json").write_text(json.dumps(m))
    rc, text = _verify_lines(ds, capsys)
    assert rc == 1 and "listed twice" in text
    with pytest.raises(FormatError, match="listed twice"):
        read_manifest(ds)


def test_duplicate_keys_and_deep_nesting_are_refused(ds, capsys):
    raw = (ds / "manifest.json").read_text()
    dup = raw.replace('"max_length":', '"max_length": 99999, "max_length":', 1)
    assert dup != raw
    (ds / "manifest.json").write_text(dup)
    rc, text = _verify_lines(ds, capsys)
    assert rc == 1 and "'max_length' appears twice" in text and "Traceback" not in text
    (ds / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    rc, text = _verify_lines(ds, capsys)
    assert rc == 1 and "nested too deeply" in text and "Traceback" not in text
    deep = raw.rstrip()[:-1] + ', "extra": ' + '{"x": ' * 100_000 + "{}" + "}" * 100_000 + "}"
    (ds / "manifest.json").write_text(deep)
    rc, text = _verify_lines(ds, capsys)
    assert rc == 1 and "nested too deeply" in text and "Traceback" not in text
