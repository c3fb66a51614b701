"""Preference data (format 2.1): record shapes detected and rendered, pairs packed whole as two
adjacent segments, the pair columns and their invariants, the eval split by pair, partitions and
pack-merge, the version rule, and pack-build / pack-verify / pack-info end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from pack import format as F
from pack.build import build
from pack.encode_pairs import pair_caps
from pack.errors import PacktrainError
from pack.offline import llama3_tokenizer_dir
from pack.sources import detect_format
from pack.templates import NothingToTrain, Renderer
from pack.tokenize.loading import load_tokenizer

PROMPT = "What is two plus two?"
STANDARD = {"prompt": PROMPT, "chosen": "It is 4!", "rejected": "Five, I think."}
CONVERSATIONAL = {"prompt": [{"role": "user", "content": PROMPT}],
                  "chosen": [{"role": "assistant", "content": "It is 4!"}],
                  "rejected": [{"role": "assistant", "content": "Five, I think."}]}
MESSAGES_PROMPT = {"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": PROMPT}],
                   "chosen": "It is 4!", "rejected": [{"role": "assistant", "content": "Five."}]}
IMPLICIT = {"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                       {"role": "user", "content": PROMPT},
                       {"role": "assistant", "content": "It is 4!"}],
            "rejected": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hey"},
                         {"role": "user", "content": PROMPT},
                         {"role": "assistant", "content": "Five."}]}
HH = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: " + PROMPT + "\n\nAssistant: It is 4!",
      "rejected": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: " + PROMPT + "\n\nAssistant: Five."}
SHAPES = {"standard": STANDARD, "conversational": CONVERSATIONAL,
          "messages-prompt": MESSAGES_PROMPT, "implicit": IMPLICIT, "hh": HH}


@pytest.fixture(scope="module")
def chat_tok(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    """The Llama 3 tokenizer without a chat template."""
    return llama3_tokenizer_dir(tmp_path_factory.mktemp("tok") / "plain", template=None)


def sides(renderer: Renderer, record: dict) -> tuple[tuple, tuple]:
    out, ids, labels, starts, ends = renderer.encode_flat([record])
    assert all(type(k) is int for k in out), out
    return tuple((ids[starts[k]:ends[k]], labels[starts[k]:ends[k]]) for k in out)


def check_pair(tok, renderer: Renderer, record: dict, chosen: str, rejected: str) -> None:
    """Labels only on the completions, -100 at each side's start, the same prompt ids first."""
    (ci, cl), (ri, rl) = sides(renderer, record)
    assert cl[0] == F.IGNORE_INDEX and rl[0] == F.IGNORE_INDEX
    pc = int(np.flatnonzero(cl != F.IGNORE_INDEX)[0])
    pr = int(np.flatnonzero(rl != F.IGNORE_INDEX)[0])
    assert pc == pr and np.array_equal(ci[:pc], ri[:pr])  # the same prompt, untrained
    for ids, labels, text in ((ci, cl, chosen), (ri, rl, rejected)):
        trained = tok.decode(labels[labels != F.IGNORE_INDEX])
        assert trained.startswith(text) or trained.startswith(" " + text), trained
        assert np.all(labels[labels != F.IGNORE_INDEX] == ids[labels != F.IGNORE_INDEX])
        assert PROMPT not in trained


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_is_detected_and_rendered_with_the_chat_template(chat_tok, shape):
    record = SHAPES[shape]
    assert detect_format([record], "f.jsonl") == "preference"
    r = Renderer(chat_tok, "preference", "chat")
    rejected = "Five, I think." if shape in ("standard", "conversational") else "Five."
    check_pair(chat_tok, r, record, "It is 4!", rejected)
    (ci, _), _ = sides(r, record)
    if shape in ("implicit", "hh"):  # earlier turns are prompt: rendered, not trained
        assert "Hey" in chat_tok.decode(ci)


@pytest.mark.parametrize("shape", ["standard", "hh"])
def test_plain_text_without_a_chat_template(plain_dir, shape):
    tok = load_tokenizer(str(plain_dir))
    r = Renderer(tok, "preference", "none")
    record = SHAPES[shape]
    check_pair(tok, r, record, "It is 4!", "Five")
    (ci, cl), _ = sides(r, record)
    assert ci[0] == tok.bos_token_id and ci[-1] == tok.eos_token_id and cl[-1] == ci[-1]
    with pytest.raises(PacktrainError, match="need a chat template"):
        r.kind.pair_segments(CONVERSATIONAL)


def test_dropped_and_refused_pairs(chat_tok):
    r = Renderer(chat_tok, "preference", "chat")
    for rec, reason in (({**STANDARD, "rejected": STANDARD["chosen"]}, "identical-pair"),
                        ({**STANDARD, "rejected": "  "}, "empty-response"),
                        ({"chosen": HH["chosen"], "rejected": HH["chosen"]}, "identical-pair")):
        with pytest.raises(NothingToTrain) as e:
            r.kind.pair_segments(rec)
        assert e.value.reason == reason
    with pytest.raises(PacktrainError, match="share no prompt"):
        r.kind.pair_segments({"chosen": "Human: a", "rejected": "Bob: b"})
    with pytest.raises(PacktrainError, match="share no prompt"):
        r.kind.pair_segments({"chosen": [{"role": "user", "content": "a"}],
                              "rejected": [{"role": "user", "content": "b"}]})
    with pytest.raises(PacktrainError, match="field chosen"):
        r.kind.pair_segments({**STANDARD, "chosen": 3})
    with pytest.raises(PacktrainError, match="train-on-prompt"):
        Renderer(chat_tok, "preference", "chat", train_on_prompt=True)


def test_pair_caps_fit_and_keep_the_shorter_side():
    rng = np.random.default_rng(0)
    for L in (7, 8, 64):
        c, r = rng.integers(1, 3 * L, 500), rng.integers(1, 3 * L, 500)
        cap = pair_caps(c, r, L)
        mc, mr = np.minimum(c, cap), np.minimum(r, cap)
        assert np.all(mc + mr <= L)
        fits = c + r <= L
        assert np.all((mc == c)[fits] & (mr == r)[fits])
        short_whole = np.minimum(c, r) <= L // 2
        assert np.all(np.minimum(mc, mr)[short_whole] == np.minimum(c, r)[short_whole])


# ---------------------------------------------------------------- builds

def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def random_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs of random lengths; the completions end in '!' (Llama 3 id 0)."""
    rng = np.random.default_rng(seed)
    words = ["apple", "river", "stone", "cloud", "seven", "green", "quick", "table"]

    def text(k: int) -> str:
        return " ".join(rng.choice(words, size=k))

    return [{"prompt": text(int(rng.integers(1, 12))), "chosen": text(int(rng.integers(1, 30))) + "!",
             "rejected": text(int(rng.integers(1, 30)))} for _ in range(n)]


def build_pref(tokenizer_dir, inputs, out: Path, **kw) -> dict:
    args = dict(inputs=[str(p) for p in inputs], out=str(out), tokenizer=str(tokenizer_dir),
                max_length=96, workers=1, quiet=True, overwrite=True)
    args.update(kw)
    return build(args)


def all_packs(ds_dir: Path) -> list[dict]:
    return list(F.PackedDataset(ds_dir))


def check_whole_pairs(ds_dir: Path) -> set[int]:
    """Every pack: whole pairs, roles 0/1, pair_id = sample_index; each pair in one pack only."""
    seen: set[int] = set()
    for row in all_packs(ds_dir):
        pid, role, cu = row["pair_id"], row["role"], row["cu_seqlens"]
        assert len(pid) == len(role) == len(cu) - 1 and len(pid) % 2 == 0
        assert np.array_equal(role, np.arange(len(role)) % 2)
        assert np.array_equal(pid[0::2], pid[1::2]) and np.array_equal(pid, row["sample_index"])
        assert np.all(row["labels"][cu[:-1]] == F.IGNORE_INDEX)
        for k in pid[0::2].tolist():
            assert k not in seen
            seen.add(k)
        ids, labels = row["input_ids"], row["labels"]
        for a, b, c in zip(cu[0:-1:2], cu[1::2], cu[2::2]):  # the same prompt starts both sides
            pc = int(np.flatnonzero(labels[a:b] != F.IGNORE_INDEX)[0])
            pr = int(np.flatnonzero(labels[b:c] != F.IGNORE_INDEX)[0])
            assert pc == pr and np.array_equal(ids[a:a + pc], ids[b:b + pr])
    return seen


@pytest.fixture(scope="module")
def pref_build(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("pref")
    records = random_pairs(300) + [{"prompt": "x", "chosen": "same", "rejected": "same"}]
    jsonl = write_jsonl(d / "pairs.jsonl", records)
    out = d / "ds"
    return jsonl, out, build_pref(tokenizer_dir, [jsonl], out, shard_size="20")


def test_pairs_are_packed_whole_with_the_pair_columns(pref_build):
    jsonl, out, m = pref_build
    assert m["format_version"] == "2.1" and m["kind"] == "preference"
    p = m["stats"]["pairs"]
    assert p == {"in": 301, "packed": 300, "dropped": {"identical-pair": 1}}
    assert m["stats"]["samples_packed"] == 600 and len(m["shards"]) > 1
    assert check_whole_pairs(out) == set(range(300))
    st = m["stats"]
    assert st["lower_bound"] <= st["packs"] and st["fill"] == round(
        st["tokens"] / (st["packs"] * 96), 6)
    assert F.verify(out) == []
    # token id 0 ("!") inside a completion is a label like any other
    assert any(np.any(row["labels"] == 0) for row in all_packs(out))
    with open(out / m["shards"][0]["path"], "rb") as f:
        assert F.read_arrow(out / m["shards"][0]["path"]).schema.equals(
            F.PREFERENCE_SCHEMA, check_metadata=True) and f.read(6) != b"ARROW1"


def test_overlong_pairs_truncate_or_drop(tmp_path, tokenizer_dir):
    jsonl = write_jsonl(tmp_path / "p.jsonl", random_pairs(120, seed=3))
    m = build_pref(tokenizer_dir, [jsonl], tmp_path / "t", max_length=48)
    assert m["stats"]["truncated"] > 0 and check_whole_pairs(tmp_path / "t")
    assert max(len(r["input_ids"]) for r in all_packs(tmp_path / "t")) <= 48
    assert F.verify(tmp_path / "t") == []
    m = build_pref(tokenizer_dir, [jsonl], tmp_path / "d", max_length=48, overlong="drop")
    assert m["stats"]["truncated"] == 0 and m["stats"]["pairs"]["dropped"]["overlong"] > 0
    assert m["stats"]["pairs"]["packed"] + m["stats"]["pairs"]["dropped"]["overlong"] == 120


def test_broken_pair_columns_are_reported(pref_build, tmp_path):
    _, out, m = pref_build
    row = dict(F.PackedDataset(out)[0])
    bad = {**row, "role": row["role"][::-1].copy()}
    assert F.check_pack(bad, 96, None).startswith("pair-roles")
    bad = {**row, "pair_id": row["pair_id"] + 1}
    assert F.check_pack(bad, 96, None).startswith("pair-id")
    cu = row["cu_seqlens"]
    odd = {c: row[c] for c in row}
    odd.update(cu_seqlens=cu[:-2].tolist() + [cu[-1]], sample_index=row["sample_index"][:-1],
               pair_id=row["pair_id"][:-1], role=row["role"][:-1])
    odd["cu_seqlens"] = np.asarray(odd["cu_seqlens"], dtype=np.int32)
    odd["position_ids"] = F.positions_from_cu(odd["cu_seqlens"])
    odd["labels"] = row["labels"].copy()
    assert F.check_pack(odd, 96, None).startswith("pair-split")


def test_eval_split_holds_out_whole_pairs(tmp_path, tokenizer_dir, pref_build):
    jsonl, _, _ = pref_build
    m = build_pref(tokenizer_dir, [jsonl], tmp_path / "ds", eval_fraction=0.25)
    ev = F.read_manifest(tmp_path / "ds" / "eval")
    assert ev["kind"] == "preference" and ev["format_version"] == "2.1"
    train_ids, eval_ids = check_whole_pairs(tmp_path / "ds"), check_whole_pairs(tmp_path / "ds" / "eval")
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 300
    assert ev["stats"]["pairs"]["packed"] == len(eval_ids) > 30
    assert m["stats"]["pairs"]["packed"] == len(train_ids)
    assert F.verify(tmp_path / "ds") == []


def test_version_rule_on_a_preference_dataset(pref_build, monkeypatch):
    _, out, _ = pref_build
    assert F.read_manifest(out)["format_version"] == "2.1"
    monkeypatch.setattr(F, "FORMAT_MINOR", 0)  # a 2.0 reader
    with pytest.raises(PacktrainError, match=r"format_version 2\.1 is newer .*upgrade packtrain"):
        F.read_manifest(out)
    assert "newer" in F.verify(out)[0]


def test_preference_kind_needs_2_1(pref_build, tmp_path):
    _, out, m = pref_build
    bad = copy.deepcopy(m)
    bad["format_version"] = "2.0"
    (tmp_path / F.MANIFEST).write_text(json.dumps(bad))
    with pytest.raises(PacktrainError, match="kind preference needs format_version 2.1"):
        F.read_manifest(tmp_path)


def test_partitions_merge_into_one_preference_dataset(tmp_path, tokenizer_dir):
    from pack.merge import merge

    jsonl = write_jsonl(tmp_path / "p.jsonl", random_pairs(300, seed=5))
    parts = []
    for i in range(2):
        parts.append(tmp_path / f"part{i}")
        build_pref(tokenizer_dir, [jsonl], parts[-1], num_partitions=2, partition=i)
    m = merge([str(p) for p in parts], str(tmp_path / "merged"))
    assert m["kind"] == "preference" and m["stats"]["pairs"]["in"] == 300
    assert m["stats"]["pairs"]["packed"] == 300
    assert check_whole_pairs(tmp_path / "merged") == set(range(300))
    assert F.verify(tmp_path / "merged") == []


def test_cli_end_to_end(tmp_path, tokenizer_dir, capsys):
    from pack.cli import build_main, info_main, verify_main

    records = [SHAPES[k] for k in sorted(SHAPES)] * 3
    jsonl = write_jsonl(tmp_path / "mixed-shapes.jsonl", records[:6])
    out = tmp_path / "out"
    rc = build_main(["--tokenizer", str(tokenizer_dir), "--max-length", "256", "--workers", "1",
                     str(jsonl), str(out)])
    assert rc in (0, None)
    err = capsys.readouterr().err
    assert "pairs           6 packed of 6" in err
    assert verify_main([str(out), "--quiet"]) == 0
    assert info_main([str(out)]) in (0, None)
    assert "pairs" in capsys.readouterr().out
    rc = build_main(["--tokenizer", str(tokenizer_dir), "--workers", "1", str(jsonl),
                     str(tmp_path / "dry"), "--dry-run"])
    assert rc in (0, None) and not (tmp_path / "dry").exists()
    assert "pairs          ~6" in capsys.readouterr().out
    rc = build_main(["--tokenizer", str(tokenizer_dir), "--workers", "1", "--train-on-prompt",
                     str(jsonl), str(tmp_path / "top")])
    assert rc != 0 and "train-on-prompt" in capsys.readouterr().err


def random_pair_pack(rng: np.random.Generator, max_length: int = 64):
    n = 2 * int(rng.integers(1, 3))
    lens = rng.integers(1, max_length // n + 1, size=n)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ids = rng.integers(0, 1000, size=int(cu[-1])).astype(np.int32)
    labels = np.where(rng.random(len(ids)) < 0.5, ids, F.IGNORE_INDEX).astype(np.int32)
    labels[cu[:-1]] = F.IGNORE_INDEX
    return ids, labels, cu, np.repeat(rng.integers(0, 10_000, size=n // 2), 2)


def test_writer_batches_give_the_pack_by_pack_bytes_and_whole_pairs(tmp_path):
    """ShardWriter(preference=True): add() and plan()/add_batch() write the same bytes, with
    pair_id and role derived from sample_index; an odd number of segments is refused."""
    rng = np.random.default_rng(8)
    packs = [random_pair_pack(rng) for _ in range(17)]
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    wa = F.ShardWriter(a, max_packs=5, batch_packs=2, preference=True)
    for ids, labels, cu, index in packs:
        wa.add(ids, labels, cu, index)
    one_by_one = wa.close()
    wb = F.ShardWriter(b, max_packs=5, batch_packs=2, preference=True)
    segs = np.array([len(p[3]) for p in packs])
    for s, z, close in wb.plan(np.array([len(p[0]) for p in packs]), segs):
        group = packs[s:z]
        lens = np.concatenate([np.diff(p[2]) for p in group])
        wb.add_batch(np.concatenate([p[0] for p in group]), np.concatenate([p[1] for p in group]),
                     np.concatenate([[0], np.cumsum(lens)]), segs[s:z],
                     np.concatenate([p[3] for p in group]), close)
    assert [x.to_json() for x in wb.close()] == [x.to_json() for x in one_by_one]
    table = F.read_arrow(a / one_by_one[0].path)
    assert table.schema.equals(F.PREFERENCE_SCHEMA, check_metadata=True)
    cols = F.table_columns(table)
    assert list(F.pack_problems(cols, 64, 1000)) == []
    off, role = cols["role"]
    assert role.dtype == np.int8 and np.array_equal(role[off[0]:off[1]],
                                                    np.arange(off[1] - off[0]) % 2)
    ids, labels, cu, index = packs[0]
    with pytest.raises(ValueError, match="whole pairs"):
        F.ShardWriter(tmp_path, preference=True).add(ids, labels, [0, len(ids)], index[:1])
