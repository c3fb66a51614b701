"""pack.tokenize.fixed_pieces: a chat template's fixed text at segment ends is tokenized once, exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, pre_tokenizers

from pack.tokenize import fixed_pieces
from pack.tokenize.loading import load_tokenizer
from pack.templates import Renderer
from test_head_tokens import _variants

# Llama 3's template text around messages, as its layouts cut it into segments
PIECES = ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",
          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
          "<|eot_id|>", "<|start_header_id|>user<|end_header_id|>\n\n",
          "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"]


def _encode(tk):
    return lambda texts: [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]


def _ids(tk, text: str) -> list[int]:
    return tk.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def variants(tokenizer_dir):
    return _variants(tokenizer_dir)


def test_usable_for_local_pipelines_with_plain_added_tokens(tokenizer_dir, variants,
                                                            monkeypatch):
    for name, tk in variants.items():
        assert fixed_pieces.usable(tk), name
    path = str(tokenizer_dir / "tokenizer.json")
    metaspace = Tokenizer.from_file(path)
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()  # its first piece is treated apart
    assert not fixed_pieces.usable(metaspace)
    for flag in ("lstrip", "rstrip", "single_word"):
        tk = Tokenizer.from_file(path)
        tk.add_special_tokens([AddedToken("<x>", **{flag: True})])
        assert not fixed_pieces.usable(tk), flag
    nfc_normalized = variants["qwen2"]  # NFC: a token matched in normalized text is refused
    nfc_normalized.add_tokens([AddedToken("<y>", normalized=True)])
    assert not fixed_pieces.usable(nfc_normalized)
    monkeypatch.setenv("PACKTRAIN_HEAD_TOKENS", "0")
    assert not fixed_pieces.usable(variants["llama3"])


def test_prepare_cuts_at_the_first_and_last_added_token(variants):
    tk = variants["llama3"]
    fronts, backs = fixed_pieces.prepare(tk, PIECES + ["x <|eot_id|> y", "no special"],
                                         _encode(tk))
    ks = {k: (j, ids) for k, j, ids in fronts}
    qs = dict(backs)
    assert "<|eot_id|><|start_header_id|>assistant<|end_header_id|>" in ks
    assert "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" in qs
    assert "x <|eot_id|>" in ks and "<|eot_id|> y" in qs
    assert not any("no special" in k for k in ks) and "no special" not in qs
    for k, (j, ids) in ks.items():
        assert j == len(k) and ids == _ids(tk, k)
    for q, ids in qs.items():
        assert ids == _ids(tk, q)
    assert [len(k) for k, _, _ in fronts] == sorted((len(k) for k in ks), reverse=True)
    assert [len(q) for q, _ in backs] == sorted((len(q) for q in qs), reverse=True)


def test_prepare_refuses_a_cut_an_added_token_could_cross(tokenizer_dir):
    tk = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    # "<a>b" starts like "<a>": after K = "<a>", a text starting with "b" is matched as "<a>b";
    # "x<q" ends where "<q>" starts: before Q = "<q>z", an "x" takes its "<q".
    tk.add_special_tokens(["<a>", "<a>b", "<q>", "x<q"])
    assert _ids(tk, "<a>bc") != _ids(tk, "<a>") + _ids(tk, "bc")  # the cut would be wrong
    assert _ids(tk, "ax<q>z") != _ids(tk, "ax") + _ids(tk, "<q>z")
    fronts, backs = fixed_pieces.prepare(tk, ["<a>", "<q>z", "<|eot_id|>"], _encode(tk))
    # "<a>" is refused as a leading text and "<q>z" as a trailing one; the other ends are safe
    assert [k for k, _, _ in fronts] == ["<|eot_id|>", "<q>"]
    assert [q for q, _ in backs] == ["<|eot_id|>", "<a>"]


def test_cut_takes_the_first_matching_head_then_a_tail_after_it():
    heads = [("<h>ab", 5, [1, 2]), ("<h>", 3, [1])]
    tails = [("<t>\n", [8, 9]), ("<t>", [8])]
    texts, front, back = fixed_pieces.cut(
        ["<h>abc<t>", "<h>x<t>\n", "plain", "<h>", "c<t>", "<t>"], heads, tails)
    assert texts == ["c", "x", "plain", "", "c", ""]
    assert front == [[1, 2], [1], (), [1], (), ()]
    assert back == [[8], [8, 9], (), (), [8], [8]]
    # a tail that overlaps the front cut is not taken
    assert fixed_pieces.cut(["<h>ab"], [("<h>ab", 5, [1])], [("b", [2])]) == (
        [""], [[1]], [()])


SPECIALS = ["<|eot_id|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
MIDDLE = st.lists(st.sampled_from(list("aZ9é中 \n\r\t'.,:#<>|_-!") + SPECIALS + [
    "\u0301", "\u3000", "\xa0", "\U0001F600", "'s", "  ", "\n\n", " \n", "123", "ﬁ", "<|",
    "|>", "eot_id", "_id|>"]), max_size=10).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=MIDDLE, k=st.integers(0, 5), q=st.integers(0, 5),
       name=st.sampled_from(["llama3", "gpt2", "qwen2"]))
def test_property_reused_ids_equal_whole_segment(variants, x, k, q, name):
    tk = variants[name]
    fronts, backs = fixed_pieces.prepare(tk, PIECES, _encode(tk))
    assert len(fronts) == 5 and len(backs) == 5
    text = (fronts[k][0] if k < 5 else "") + x + (backs[q][0] if q < 5 else "")
    (mid,), (f,), (b,) = fixed_pieces.cut([text], fronts, backs)
    assert list(f) + _ids(tk, mid) + list(b) == _ids(tk, text)


CHATS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
     {"role": "assistant", "content": "A."}, {"role": "user", "content": "More"},
     {"role": "assistant", "content": "B"}],
    [{"role": "user", "content": "\n\nleading newlines"},
     {"role": "assistant", "content": " spaced <|eot_id|> special inside\n"}],
    [{"role": "user", "content": "<|start_header_id|>"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}],
    [{"role": "assistant", "content": "starts with the assistant"}],
    [{"role": "user", "content": "only a user"}],  # nothing to train on
]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_renderer_with_reuse_equals_renderer_without(tokenizer_dir, chat_jsonl,
                                                     train_on_prompt):
    tok = load_tokenizer(tokenizer_dir)
    records = [{"messages": m} for m in CHATS] + [
        json.loads(line) for line in chat_jsonl.read_text().splitlines()]
    mine = Renderer(tok, "messages", "chat", train_on_prompt=train_on_prompt)
    plain = Renderer(tok, "messages", "chat", train_on_prompt=train_on_prompt,
                     reuse_head_tokens=False)
    a, b = mine.encode_flat(records), plain.encode_flat(records)
    fronts, backs = mine.encoder.reuse_tables()
    assert len(fronts) >= 3 and len(backs) >= 3  # the template's pieces were offered
    assert plain.encoder.reuse_tables() == ([], [])
    assert [type(x) for x in a[0]] == [type(x) for x in b[0]]
    for x, y in zip(a[1:], b[1:]):
        assert np.array_equal(x, y)

