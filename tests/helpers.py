"""Helpers several test groups share: a small real-data packed dataset, and rewriting a
shard behind the manifest's back (for the corruption tests). tests/conftest.py puts this folder
on the import path, so any test imports them as `from helpers import ...`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from pack.files import file_sha256
from pack.format import COLUMNS, SHARD_SCHEMA, open_shard, read_manifest, verify
from pack.offline import chitchat_conversations

# what a launcher sets; tests that launch or emulate ranks remove them from their environment
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")


def exchanges_jsonl(path: Path, limit: int = 160) -> Path:
    """Single user/assistant exchanges from real chitchat conversations, as `messages` JSONL
    (short samples, so a small max_length holds several per pack)."""
    n = 0
    with open(path, "w") as f:
        for rec in chitchat_conversations():
            msgs = rec["messages"]
            for i in range(0, len(msgs) - 1, 2):
                pair = msgs[i:i + 2]
                if len(pair[0]["content"]) + len(pair[1]["content"]) > 300:
                    continue
                f.write(json.dumps({"messages": pair}) + "\n")
                n += 1
                if n >= limit:
                    return path
    return path


def make_packed_dataset(tokenizer_dir: Path, work: Path, max_length: int = 128,
                        records: int = 160) -> Path:
    """A packed dataset of real chat exchanges built by `pack-build` (in-process), checked with
    verify()."""
    from pack.cli import build_main

    work.mkdir(parents=True, exist_ok=True)
    jsonl = exchanges_jsonl(work / "exchanges.jsonl", records)
    out = work / "packed"
    if out.exists():
        shutil.rmtree(out)
    rc = build_main(["--tokenizer", str(tokenizer_dir), "--max-length", str(max_length),
                     str(jsonl), str(out)])
    assert rc in (0, None), f"pack-build exited {rc}"
    problems = verify(out)
    assert not problems, problems
    return out


def randomise_lora_b(model, seed: int = 1) -> None:
    """LoRA starts with B = 0, so A gets no gradient on the first step (and under DPO with the
    adapters-disabled reference, policy = reference); a random B makes every LoRA weight's
    gradient informative."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def rewrite_shard(ds, rows: list[dict], index: int = 0) -> None:
    """Replace shard `index` with `rows` and fix its manifest entry (size, sha256, counts) so
    only the pack invariants can object."""
    m = read_manifest(ds)
    info = m["shards"][index]
    table = pa.table({c: pa.array([np.asarray(r[c]) for r in rows], type=SHARD_SCHEMA.field(c).type)
                      for c in COLUMNS}, schema=SHARD_SCHEMA)
    path = ds / info["path"]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, SHARD_SCHEMA) as w:
        w.write_table(table)
    info.update(bytes=path.stat().st_size, sha256=file_sha256(path), packs=len(rows),
                tokens=int(sum(len(r["input_ids"]) for r in rows)))
    m["stats"].update(packs=sum(s["packs"] for s in m["shards"]),
                      tokens=sum(s["tokens"] for s in m["shards"]))
    (ds / "manifest.json").write_text(json.dumps(m, indent=2))


def rows_of(ds, index: int = 0) -> list[dict]:
    m = read_manifest(ds)
    t = open_shard(ds, m["shards"][index])
    return [{c: np.array(t.column(c)[r].values.to_numpy()) for c in COLUMNS}
            for r in range(t.num_rows)]


def preference_jsonl(path: Path, limit: int = 60) -> Path:
    """TRL-style preference records from real chitchat exchanges: the user turn as the prompt,
    its real reply as `chosen` and the next exchange's reply as `rejected`."""
    rows = [json.loads(line)["messages"] for line in
            exchanges_jsonl(path.with_suffix(".src.jsonl"), limit + 1).read_text().splitlines()]
    with open(path, "w") as f:
        for a, b in zip(rows, rows[1:]):
            if a[1]["content"] == b[1]["content"]:
                continue
            f.write(json.dumps({"prompt": a[0]["content"], "chosen": a[1]["content"],
                                "rejected": b[1]["content"]}) + "\n")
    return path


def make_preference_dataset(tokenizer_dir: Path, work: Path, max_length: int = 128,
                            records: int = 60, *extra: str) -> Path:
    """A preference dataset (format 2.1) of real chat pairs built by `pack-build`, verified."""
    from pack.cli import build_main

    work.mkdir(parents=True, exist_ok=True)
    jsonl = preference_jsonl(work / "pairs.jsonl", records)
    out = work / "packed"
    if out.exists():
        shutil.rmtree(out)
    rc = build_main(["--tokenizer", str(tokenizer_dir), "--max-length", str(max_length),
                     str(jsonl), str(out), "--quiet", *extra])
    assert rc in (0, None), f"pack-build exited {rc}"
    problems = verify(out)
    assert not problems, problems
    return out
