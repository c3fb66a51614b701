"""Reused prompt-header tokens (pack/head_tokens.py) give exactly the ids of whole texts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from pack.tokenize import head_tokens
from pack.build import build
from pack.files import file_sha256
from pack.tokenize.loading import load_tokenizer
from pack.templates import PROMPT_INPUT, PROMPT_NO_INPUT, Renderer

FIXED = [p[:p.index("{instruction}")] for p in (PROMPT_INPUT, PROMPT_NO_INPUT)]


def _variants(tokenizer_dir: Path) -> dict[str, Tokenizer]:
    """The Llama 3 tokenizer, and the same vocabulary behind GPT-2's and Qwen2's (NFC)
    pre-tokenization: the three pipelines head_tokens accepts."""
    path = str(tokenizer_dir / "tokenizer.json")
    llama3 = Tokenizer.from_file(path)
    gpt2 = Tokenizer.from_file(path)
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    qwen2 = Tokenizer.from_file(path)
    qwen2.normalizer = normalizers.NFC()
    qwen2.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(head_tokens.QWEN2_PATTERN), behavior="isolated",
                             invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return {"llama3": llama3, "gpt2": gpt2, "qwen2": qwen2}


@pytest.fixture(scope="module")
def variants(tokenizer_dir):
    return _variants(tokenizer_dir)


def _encode(tk):
    return lambda texts: [e.ids for e in tk.encode_batch(texts, add_special_tokens=False)]


def test_the_three_pipelines_split_locally(variants):
    for name, tk in variants.items():
        assert head_tokens.splits_locally(tk), name


def test_other_pipelines_get_no_reuse(tokenizer_dir):
    path = str(tokenizer_dir / "tokenizer.json")

    def changed(fn) -> Tokenizer:
        tk = Tokenizer.from_file(path)
        fn(tk)
        return tk

    cases = {
        "metaspace": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace()),
        "other regex": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\S+\s*"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])),
        "prefix space": lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.ByteLevel(
            add_prefix_space=True, use_regex=True)),
        "no pre-tokenizer": lambda t: setattr(t, "pre_tokenizer", None),
        "lowercase": lambda t: setattr(t, "normalizer", normalizers.Lowercase()),
        "truncation": lambda t: t.enable_truncation(16),
        "padding": lambda t: t.enable_padding(),
    }
    for name, fn in cases.items():
        assert not head_tokens.splits_locally(changed(fn)), name
    dropout = Tokenizer.from_file(path)
    vocab, merges = {"a": 0, "b": 1, "ab": 2}, [("a", "b")]
    dropout.model = BPE(vocab, merges, dropout=0.5)
    assert not head_tokens.splits_locally(dropout)
    assert not head_tokens.splits_locally(object())
    assert head_tokens.prepare(changed(cases["metaspace"]), FIXED, lambda t: 1 / 0) == []


def test_cut_point_is_letter_space_letter_clear_of_added_tokens():
    head = FIXED[1]
    j = head_tokens.cut_point(head, [])
    assert head[j - 1:j + 2] == "e r" and head[j:].startswith(" request.")
    # an added token that could match over the cut moves it earlier
    for token in ("the request", "e r", "the", " request", "request", "he", "re"):
        k = head_tokens.cut_point(head, [token])
        assert k is not None and k < j, token
        assert not head_tokens._could_touch(token, head, k)
    assert head_tokens.cut_point(head, ["st.\n\n### I", "<|eot_id|>", ""]) == j  # clear of it
    # one that fits only past the head's end counts too (what follows the head is unknown)
    assert head_tokens._could_touch("k ZZ", "ab k", 3 - 1)
    assert head_tokens.cut_point("no-cut.here! 9 x", []) is None
    assert head_tokens.cut_point("ab", []) is None


TAIL = st.lists(st.sampled_from(list("aZ9é中 \n\r\t'.,:#<>|_-") + [
    "\u0301", "\u3000", "\xa0", "\U0001F600", "'s", "'LL", "<|eot_id|>", "<|begin_of_text|>",
    "  ", "\n\n", " \n", "123", "ﬁ", "Å"]), max_size=12).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tail=TAIL, which=st.integers(0, 3), name=st.sampled_from(["llama3", "gpt2", "qwen2"]))
def test_property_reused_ids_equal_whole_text(variants, tail, which, name):
    tk = variants[name]
    heads = head_tokens.prepare(tk, ["<|begin_of_text|>" + f for f in FIXED] + FIXED,
                                _encode(tk))
    assert len(heads) == 4
    head, j, ids = heads[which]
    for rest in ("", tail):  # the head alone, then with a tail
        text = head + rest
        whole = tk.encode(text, add_special_tokens=False).ids
        assert ids + tk.encode(text[j:], add_special_tokens=False).ids == whole


RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Translate", "input": "bonjour\n", "output": "hello"},
    {"instruction": "\nStarts with a newline", "input": " spaced", "output": " x"},
    {"instruction": "<|eot_id|>special", "input": "<|begin_of_text|>", "output": "ok"},
    {"instruction": "q", "output": "a", "system": "You are terse."},
    {"instruction": "second", "output": "two", "history": [["first", "one"], ["'s", "'ll"]]},
    {"instruction": "", "input": "", "output": "only output"},
    {"instruction": "e", "output": ""},  # nothing to train on
    {"instruction": "x", "output": 5},  # invalid
]


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_renderer_with_reuse_equals_renderer_without(tokenizer_dir, alpaca_jsonl,
                                                     train_on_prompt):
    tok = load_tokenizer(tokenizer_dir)
    records = RECORDS + [json.loads(line) for line in
                         alpaca_jsonl.read_text().splitlines()[:300]]
    mine = Renderer(tok, "alpaca", train_on_prompt=train_on_prompt)
    plain = Renderer(tok, "alpaca", train_on_prompt=train_on_prompt, reuse_head_tokens=False)
    assert len(mine.encoder.head_tokens()) == 4 and plain.encoder.head_tokens() == []
    a, b = mine.encode_flat(records), plain.encode_flat(records)
    assert [type(x) for x in a[0]] == [type(x) for x in b[0]]
    for x, y in zip(a[1:], b[1:]):
        assert np.array_equal(x, y)
    messages = Renderer(tok, "messages", "alpaca")
    assert len(messages.encoder.head_tokens()) == 4
    assert Renderer(tok, "messages", "chat").encoder.head_tokens() == []


@pytest.mark.parametrize("corpus", ["alpaca_jsonl", "chat_jsonl"])
def test_build_is_byte_identical_without_reuse(tokenizer_dir, corpus, request, tmp_path,
                                               monkeypatch):
    """PACKTRAIN_HEAD_TOKENS=0 turns off the reuse of both modules: Alpaca's header
    (head_tokens) and template text at segment ends (fixed_pieces)."""
    src = request.getfixturevalue(corpus)
    digests = []
    for flag in ("1", "0"):
        monkeypatch.setenv("PACKTRAIN_HEAD_TOKENS", flag)
        out = tmp_path / f"reuse{flag}"
        build(dict(inputs=[str(src)], out=str(out), tokenizer=str(tokenizer_dir),
                   max_length=1024, workers=2, quiet=True))
        digests.append({p.name: file_sha256(p) for p in sorted(out.glob("shard-*.arrow"))})
    assert digests[0] and digests[0] == digests[1]
