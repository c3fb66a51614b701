"""train.checks: what train-run refuses before its first step (fast; no DeepSpeed)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from helpers import rewrite_shard, rows_of
from pack.errors import FormatError, PacktrainError
from pack.tokenize.loading import load_tokenizer
from pack.format import (check_pack, COLUMNS, IGNORE_INDEX, open_shard, read_manifest, SHARD_SCHEMA, verify)
from train import checks
from train.checks import (check_dataset, check_token_range, check_tokenizer, embedding_rows,
                          preflight, scan_invariants)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer_dir, chat_jsonl):
    from pack.cli import build_main

    out = tmp_path_factory.mktemp("packed") / "ds"
    rc = build_main([str(chat_jsonl), str(out), "--tokenizer", str(tokenizer_dir),
                     "--max-length", "512", "--quiet", "--workers", "1"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def model(tokenizer_dir):
    from train.tiny import make_tiny_model

    return make_tiny_model("qwen3", tokenizer_dir, hidden=16, layers=1, heads=2, kv_heads=1)


def one_line(e) -> str:
    s = str(e.value)
    assert "\n" not in s
    return s


def copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------- passing

def test_matching_dataset_and_model_pass(packed, model, tokenizer_dir):
    m = read_manifest(packed)
    assert preflight(packed, m, model, tokenizer_dir) == []
    assert preflight(packed, m, model, tokenizer_dir, full_checksums=True) == []
    scan = check_dataset(packed, m)
    assert scan.tokens == m["stats"]["tokens"] and scan.packs == m["stats"]["packs"]
    assert 0 <= scan.min_token_id <= scan.max_token_id < m["tokenizer"]["vocab_size"]


def test_embedding_rows_of_peft_model(model):
    from peft import LoraConfig, get_peft_model

    rows = embedding_rows(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    try:
        assert embedding_rows(wrapped) == rows == (model.config.vocab_size,) * 2
    finally:
        wrapped.unload()


# ---------------------------------------------------------------- tokenizer

def _tok_copy(tokenizer_dir, dst):
    shutil.copytree(tokenizer_dir, dst)
    return dst


def test_changed_chat_template_refused(packed, model, tokenizer_dir, tmp_path):
    other = _tok_copy(tokenizer_dir, tmp_path / "tok")
    tok = load_tokenizer(other)
    tok.chat_template = tok.chat_template + "{# edited #}"
    tok.save_pretrained(str(other))
    m = read_manifest(packed)
    with pytest.raises(PacktrainError) as e:
        preflight(packed, m, model, other)
    msg = one_line(e)
    assert msg.startswith(f"tokenizer mismatch: dataset {packed} was packed with tokenizer ")
    assert f"model dir {other} has fingerprint sha256:" in msg
    assert f"re-pack with --tokenizer {other} or pass --allow-tokenizer-mismatch" in msg
    warnings = preflight(packed, m, model, other, allow_tokenizer_mismatch=True)
    assert len(warnings) == 1 and "allowed by --allow-tokenizer-mismatch" in warnings[0]


def test_added_token_refused(packed, model, tokenizer_dir, tmp_path):
    other = _tok_copy(tokenizer_dir, tmp_path / "tok")
    tok = load_tokenizer(other)
    tok.add_tokens(["<packtrain_new_token>"])
    tok.save_pretrained(str(other))
    m = read_manifest(packed)
    with pytest.raises(PacktrainError, match="tokenizer mismatch") as e:
        check_tokenizer(packed, m, other)
    one_line(e)
    assert check_tokenizer(packed, m, other, allow_tokenizer_mismatch=True)


def test_model_dir_without_tokenizer(packed, model, tmp_path):
    bare = tmp_path / "bare_model"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(model.config.to_dict()))
    m = read_manifest(packed)
    with pytest.raises(PacktrainError, match="has no tokenizer files") as e:
        preflight(packed, m, model, bare)
    assert "--allow-tokenizer-mismatch" in one_line(e)
    warnings = preflight(packed, m, model, bare, allow_tokenizer_mismatch=True)
    assert any("no tokenizer files" in w for w in warnings)


# ---------------------------------------------------------------- vocabulary

def test_token_ids_beyond_embedding_refused(packed, tokenizer_dir):
    from train.tiny import make_tiny_model

    small = make_tiny_model("qwen3", None, vocab_size=1000, hidden=16, layers=1, heads=2,
                            kv_heads=1)
    m = read_manifest(packed)
    vocab = m["tokenizer"]["vocab_size"]
    with pytest.raises(PacktrainError) as e:
        preflight(packed, m, small, tokenizer_dir)
    msg = one_line(e)
    assert f"{vocab} ids" in msg and "only 1000 rows" in msg
    # allowing a tokenizer mismatch still refuses ids the model cannot embed: the real max id
    scan = check_dataset(packed, m)
    with pytest.raises(PacktrainError) as e:
        preflight(packed, m, small, tokenizer_dir, allow_tokenizer_mismatch=True)
    msg = one_line(e)
    assert f"holds token id {scan.max_token_id}" in msg and "only 1000 rows" in msg
    # a model just big enough for the ids present passes with the flag, with a warning
    fits = make_tiny_model("qwen3", None, vocab_size=scan.max_token_id + 1, hidden=16, layers=1,
                           heads=2, kv_heads=1)
    warnings = preflight(packed, m, fits, tokenizer_dir, allow_tokenizer_mismatch=True)
    assert any("only the ids present are checked" in w for w in warnings)


def test_output_rows_checked_too(packed, model):
    m = read_manifest(packed)
    vocab = m["tokenizer"]["vocab_size"]

    class Head:  # labels index the logits: a smaller lm_head is as bad as a smaller embedding
        out_features = vocab - 1

    class Fake:
        config = model.config

        def get_input_embeddings(self):
            return model.get_input_embeddings()

        def get_output_embeddings(self):
            return Head()

    with pytest.raises(PacktrainError, match=r"output \(lm_head\) has only"):
        check_token_range(packed, m, Fake())


def test_context_length_warning(packed, model, tokenizer_dir):
    m = dict(read_manifest(packed))
    old = model.config.max_position_embeddings
    model.config.max_position_embeddings = 128
    try:
        warnings = preflight(packed, m, model, tokenizer_dir)
    finally:
        model.config.max_position_embeddings = old
    assert len(warnings) == 1 and "max_position_embeddings is 128" in warnings[0]


# ---------------------------------------------------------------- corrupt datasets

def test_flipped_byte_refused_with_checksums(packed, model, tokenizer_dir, tmp_path):
    ds = copy_dataset(packed, tmp_path / "ds")
    shard = ds / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    m = read_manifest(ds)
    with pytest.raises(FormatError, match=r"checksum") as e:
        preflight(ds, m, model, tokenizer_dir, full_checksums=True)
    assert str(ds) in one_line(e)


def test_truncated_shard_refused(packed, model, tokenizer_dir, tmp_path):
    ds = copy_dataset(packed, tmp_path / "ds")
    shard = ds / "shard-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(FormatError, match=r"shard-size") as e:
        preflight(ds, read_manifest(ds), model, tokenizer_dir)
    one_line(e)


def test_broken_invariant_refused_without_checksums(packed, model, tokenizer_dir, tmp_path):
    ds = copy_dataset(packed, tmp_path / "ds")
    rows = rows_of(ds)
    r = rows[5]
    i = int(np.nonzero(r["labels"] != IGNORE_INDEX)[0][0])
    r["labels"][i] = (r["input_ids"][i] + 1) % 1000  # a label that is not the input token
    rewrite_shard(ds, rows)
    assert verify(ds, checksums=True, invariants=False) == []  # sizes and sums agree
    with pytest.raises(FormatError) as e:
        preflight(ds, read_manifest(ds), model, tokenizer_dir)
    msg = one_line(e)
    assert "shard-00000.arrow row 5" in msg and "[rule: labels]" in msg


def test_manifest_stats_must_match(packed, model, tokenizer_dir, tmp_path):
    ds = copy_dataset(packed, tmp_path / "ds")
    m = json.loads((ds / "manifest.json").read_text())
    m["stats"]["label_tokens"] += 1
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="label tokens"):
        preflight(ds, read_manifest(ds), model, tokenizer_dir)


# ---------------------------------------------------------------- the vectorised scan = check_pack

CORRUPTIONS = ["label_value", "label_start", "position", "cu_not_increasing", "cu_end",
               "cu_start", "token_negative", "token_too_big", "too_long", "sample_index",
               "lengths", "empty", "none"]


def corrupt(row: dict, kind: str, rng: np.random.Generator, vocab: int, max_length: int) -> dict:
    r = {c: np.array(v) for c, v in row.items()}
    t = len(r["input_ids"])
    if t == 0 or len(r["labels"]) != t:  # already emptied or shortened: leave it so
        return r
    j = int(rng.integers(0, t))
    if kind == "label_value":
        r["labels"][j] = (r["input_ids"][j] + 1) % vocab
    elif kind == "label_start":
        s = int(rng.choice(r["cu_seqlens"][:-1]))
        r["labels"][s] = r["input_ids"][s]
    elif kind == "position":
        r["position_ids"][j] += 1
    elif kind == "cu_not_increasing" and len(r["cu_seqlens"]) > 2:
        r["cu_seqlens"][1] = r["cu_seqlens"][2]
    elif kind == "cu_end":
        r["cu_seqlens"][-1] -= 1
    elif kind == "cu_start":
        r["cu_seqlens"][0] = 1
    elif kind == "token_negative":
        r["input_ids"][j] = -5
        r["labels"][j] = IGNORE_INDEX
    elif kind == "token_too_big":
        r["input_ids"][j] = vocab
        r["labels"][j] = IGNORE_INDEX
    elif kind == "too_long":
        extra = max_length - t + 1
        for c in ("input_ids", "labels"):
            r[c] = np.concatenate([r[c], np.full(extra, IGNORE_INDEX if c == "labels" else 7,
                                                 dtype=np.int32)])
        r["cu_seqlens"][-1] += extra
        last = int(r["cu_seqlens"][-2])
        r["position_ids"] = np.concatenate([r["position_ids"], np.arange(
            t - last, t - last + extra, dtype=np.int32)])
    elif kind == "sample_index":
        r["sample_index"] = np.concatenate([r["sample_index"], [1]])
    elif kind == "lengths":
        r["labels"] = r["labels"][:-1]
    elif kind == "empty":
        r = {c: np.zeros(0, dtype=v.dtype) for c, v in r.items()}
        r["cu_seqlens"] = np.zeros(1, dtype=np.int32)
    return r


@pytest.mark.parametrize("chunk", [1 << 22, 700])
def test_scan_flags_exactly_the_rows_check_pack_flags(packed, monkeypatch, chunk):
    monkeypatch.setattr(checks, "CHUNK_TOKENS", chunk)
    m = read_manifest(packed)
    vocab, max_length = m["tokenizer"]["vocab_size"], m["max_length"]
    clean = rows_of(packed)[:40]
    rng = np.random.default_rng(0)
    for trial in range(int(__import__("os").environ.get("CHECKS_TRIALS", "60"))):
        rows = [dict(r) for r in clean]

        for _ in range(int(rng.integers(1, 3))):
            i = int(rng.integers(0, len(rows)))
            kind = CORRUPTIONS[int(rng.integers(0, len(CORRUPTIONS)))]
            rows[i] = corrupt(rows[i], kind, rng, vocab, max_length)
        truth = {i for i, r in enumerate(rows) if check_pack(r, max_length, vocab)}
        table = pa.table({c: pa.array([r[c] for r in rows], type=SHARD_SCHEMA.field(c).type)
                          for c in COLUMNS}, schema=SHARD_SCHEMA)
        problems, res = scan_invariants(table, "s.arrow", max_length, vocab)
        got = {int(p.split(" row ")[1].split(":")[0]) for p in problems}
        # unequal column lengths misalign every later token, so then the scan reports only
        # those rows (never a clean one); otherwise it flags exactly check_pack's rows
        assert got <= truth, (trial, got, truth)
        assert bool(got) == bool(truth), (trial, got, truth)
        if not any(check_pack(rows[i], max_length, vocab).startswith("lengths") for i in truth):
            assert got == truth, (trial, got, truth)
        assert res.tokens == sum(len(r["input_ids"]) for r in rows)



def test_scan_is_faster_than_per_pack_loop(packed):
    """Not a benchmark; a guard that the vectorised path stays vectorised."""
    import time

    m = read_manifest(packed)
    t = open_shard(packed, m["shards"][0])
    t0 = time.perf_counter()
    for _ in range(5):
        problems, _ = scan_invariants(t, "s", m["max_length"], m["tokenizer"]["vocab_size"])
    fast = (time.perf_counter() - t0) / 5
    assert problems == []
    t0 = time.perf_counter()
    assert verify(packed, checksums=False, invariants=True) == []
    slow = time.perf_counter() - t0
    assert fast < slow, (fast, slow)
